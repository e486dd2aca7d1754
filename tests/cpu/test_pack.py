"""Packing strategies (interpreter) against the sequential reference, bit for bit."""

import pytest
import torch

from megakernel import routing
from perf.studies.pack import STRATEGIES, gemm1_ref, grouped_gemm1, pack, pack_ref, same_layout

E, K, H = 16, 4, 32


def case_ids(name: str, T: int) -> torch.Tensor:
    """Rank 0's routing of a named edge case (one rank, so every expert is local)."""
    if name == "all_to_one_expert":
        return torch.full((T, 1), 5, dtype=torch.int64)
    if name == "k1":
        return routing.uniform(1, T, E, 1, seed=T).topk_ids[0]
    if name == "all_dropped":
        return torch.full((T, K), -1, dtype=torch.int64)
    rt, _ = routing.edge_case(name, 2, T, E, K, seed=T + len(name))
    return rt.topk_ids[0]


CASES = ("uniform", "zipf", "one_expert", "empty_experts", "dropped", "ragged")
CASES += ("all_to_one_expert", "k1", "all_dropped")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES)
def test_strategy_equals_reference(strategy, case):
    ids = case_ids(case, 37)  # 37: not a multiple of the chunk or of a program's tokens
    x = torch.randn(ids.shape[0], H, dtype=torch.float16)  # "ragged" gives rank 0 its own T
    want = pack_ref(x, ids, E)
    got = pack(x, ids, E, strategy)
    # the interpreter runs programs in order, so even the atomic strategy keeps token order
    assert same_layout(got, want) == []
    assert (got.rows is None) == (strategy == "gather")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_many_chunks_and_no_tokens(strategy):
    ids = routing.zipf(1, 300, E, K, 1.2, seed=5).topk_ids[0]  # 1200 pairs: 19 chunks
    x = torch.randn(300, H, dtype=torch.float16)
    assert same_layout(pack(x, ids, E, strategy), pack_ref(x, ids, E)) == []
    empty = pack(x[:0], ids[:0], E, strategy)
    assert empty.num_rows == 0 and empty.pos.shape == (0, K)


def test_unordered_comparison_catches_a_misplaced_row():
    ids = routing.uniform(1, 20, E, K, seed=1).topk_ids[0]
    x = torch.randn(20, H, dtype=torch.float16)
    want = pack_ref(x, ids, E)
    got = pack(x, ids, E, "atomic")
    assert same_layout(got, want, exact_order=False) == []
    got.rows[int(got.pos[3, 1])] += 1  # one row's data wrong
    assert same_layout(got, want, exact_order=False) == ["rows"]
    swapped = got.pos.clone()
    swapped[0, 0], swapped[0, 1] = got.pos[0, 1], got.pos[0, 0]  # two experts' rows swapped
    got.pos = swapped
    assert "pos" in same_layout(got, want, exact_order=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grouped_gemm_on_every_layout(strategy):
    T = 23
    ids = routing.drop(routing.zipf(1, T, E, K, 1.0, seed=2), 0.1, 3).topk_ids[0]
    x = torch.randn(T, H, dtype=torch.float16)
    w13 = torch.randn(E, 32, H, dtype=torch.float16) * 0.2
    packed = pack(x, ids, E, strategy)
    out = torch.full((T * K, 16), float("nan"))
    grouped_gemm1(x, packed, w13, out, block_m=16, block_n=16, block_k=16)
    live = packed.pos >= 0
    torch.testing.assert_close(out[packed.pos[live].long()], gemm1_ref(x, ids, w13)[live])


def test_bad_input():
    x = torch.zeros(4, H, dtype=torch.float16)
    with pytest.raises(ValueError, match="strategy must be one of"):
        pack(x, torch.zeros(4, K, dtype=torch.int32), E, "radix")
    with pytest.raises(ValueError, match="expert 16 but the layer has 16 experts"):
        pack(x, torch.full((4, K), 16), E, "scan")
    with pytest.raises(ValueError, match=r"x must be \[T, H\]"):
        pack(x, torch.zeros(5, K, dtype=torch.int32), E, "scan")


def test_selector_defaults_and_override():
    from perf.studies.pack import choose_strategy

    assert choose_strategy(4096, 8, 256) == "gather"  # pack + GEMM: gather everywhere swept
    assert choose_strategy(1024, 8, 8, materialize=True) == "atomic"  # few pairs
    assert choose_strategy(32768, 8, 256, materialize=True) == "scan"  # many, 1024 per expert
    assert choose_strategy(16384, 2, 256, materialize=True) == "atomic"  # 128 per expert
    ids = routing.uniform(1, 9, E, K, seed=4).topk_ids[0]
    x = torch.randn(9, H, dtype=torch.float16)
    assert pack(x, ids, E).rows is None  # the default is the selector's gather
    assert pack(x, ids, E, "scan").rows is not None  # the override
