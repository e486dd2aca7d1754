"""Skewed routing never fails a layer call: a call whose busiest rank would receive more than the
capacity runs as rounds on the device (DESIGN §4), under the interpreter, EmulatedWorld.

Each output is poisoned first (a fresh NaN tensor) and compared with ``moe_ref``; ``stats()``
must have counted the call's rounds, which are computed here from the routing independently.
"""

from dataclasses import replace

import pytest
import torch
import triton

from megakernel import FusedEPMoE, KernelConfig, routing
from megakernel.plan import MAX_ROUNDS
from megakernel.shapes import MoEShape
from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
from symm_mem import EmulatedWorld

SHAPE = MoEShape(
    hidden=32, ffn=32, num_experts=32, topk=4, max_tokens_per_rank=32, dtype=torch.float32
)


def small_config() -> KernelConfig:
    knobs = dict(block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16)
    return KernelConfig(**knobs, combine_block=8, reduce_h=32, block_h=32, chunk=4)


def rounds_of(rt: routing.Routing, R: int, capacity: int) -> int:
    """The rounds a call takes: ceil(rows / capacity) at the rank receiving the most rows
    (contiguous placement), from the routing alone."""
    L = SHAPE.num_experts // R
    rows = torch.zeros(R, dtype=torch.int64)
    for ids in rt.topk_ids:
        kept = ids[ids >= 0].long()
        rows += torch.bincount(kept // L, minlength=R)
    return max(1, triton.cdiv(int(rows.max()), capacity))


def call_and_check(layer, rt, seed: int) -> dict[int, torch.Tensor]:
    """One layer call with tokens from ``seed`` (the layer's experts were made from it too);
    every rank's output against moe_ref."""
    R, shape = layer.world.world_size, layer.shape
    xs = make_tokens(shape, [ids.shape[0] for ids in rt.topk_ids], seed, "cpu")
    out = layer(dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights)))
    layer.check_errors()
    for r in range(R):
        ids, w = rt.topk_ids[r], rt.topk_weights[r]
        assert check_layer_output(out[r], xs[r], ids, w, shape, seed, r) == [], f"rank {r}"
    return out


def skewed(kind: str, R: int, T: int | list[int], seed: int, dst: int = -1) -> routing.Routing:
    E, K = SHAPE.num_experts, SHAPE.topk
    if kind == "all_to_one":  # every token of every rank to the experts of one rank (the last)
        return routing.all_to_one_rank(R, T, E, K, dst=dst % R, seed=seed)
    return routing.hot_expert(R, T, E, K, fraction=1.0, seed=seed, hot=E // 2)  # one hot expert


@pytest.mark.parametrize(
    "R,capacity,kind,max_tokens",
    [
        (2, 100, "all_to_one", 32),  # (the default holds any routing of 2 ranks: no round needed)
        (2, 100, "hot", 32),
        (4, None, "all_to_one", 32),  # default capacity: twice the uniform average
        (4, 100, "hot", 24),  # (one hot expert takes R T of the 2 T K rows the default holds)
        (8, 192, "all_to_one", 12),  # (2 launches a call, T_max 12: the interpreter's time)
    ],
)
def test_skew_at_max_tokens_is_computed_in_rounds(R, capacity, kind, max_tokens):
    """Every rank sends its max_tokens tokens to one rank (or one expert): the call takes the
    rounds the routing needs, and every output equals moe_ref."""
    seed = 10 * R + len(kind)
    shape = replace(SHAPE, max_tokens_per_rank=max_tokens)
    w13, w2 = make_w13(shape, seed, "cpu"), make_w2(shape, seed, "cpu")
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, shape, w13, w2, config=small_config(), capacity=capacity, graphs=False
        )
        C = layer.workspace.capacity
        rt = skewed(kind, R, max_tokens, seed)
        rounds = rounds_of(rt, R, C)
        assert rounds > 1, "the case must need rounds"
        call_and_check(layer, rt, seed)
        stats = layer.stats()
        assert (stats["calls_in_rounds"], stats["rounds_of_those_calls"]) == (1, rounds)
        # the next call, uniform, fits in one round and is computed as before
        call_and_check(layer, routing.uniform(R, 8, SHAPE.num_experts, SHAPE.topk, seed=1), seed)
        assert layer.stats()["calls_in_rounds"] == 1
        layer.close()


@pytest.mark.parametrize("R,capacity,kind", [(2, 100, "all_to_one"), (4, None, "all_to_one")])
def test_rounds_with_tail_rows(R, capacity, kind):
    """``tail_rows``: each round's tile table makes its own tails (a slot's rows cut at the
    round's edge end in a tail of that round, or in none), and every output equals moe_ref."""
    seed = 10 * R + len(kind)
    w13, w2 = make_w13(SHAPE, seed, "cpu"), make_w2(SHAPE, seed, "cpu")
    config = replace(small_config(), tail_rows=8)
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, SHAPE, w13, w2, config=config, capacity=capacity, graphs=False
        )
        rt = skewed(kind, R, 32, seed)
        assert rounds_of(rt, R, layer.workspace.capacity) > 1
        call_and_check(layer, rt, seed)
        plan_ws = layer.workspace.plan_ws
        tiles = torch.cat([plan_ws.bufs[r]["tiles"].flatten(0, 1) for r in world.local_ranks])
        assert ((tiles[:, 0] >= 0) & (tiles[:, 2] > 16)).any(), "some tile holds a tail"
        layer.close()


def test_rounds_with_a_different_token_count_per_rank_back_to_back():
    """Ranks with 32, 1, 0 and 20 tokens, calls all to one rank around a uniform one: every rank
    agrees on the rounds from the exchanged counts (no host knows the others' T)."""
    R, seed = 4, 7
    w13, w2 = make_w13(SHAPE, seed, "cpu"), make_w2(SHAPE, seed, "cpu")
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, SHAPE, w13, w2, config=small_config(), capacity=130, graphs=False
        )
        Ts = [32, 1, 0, 20]
        rounds = []
        for i, dst in enumerate([3, None, 0]):  # all to rank 3, uniform, all to rank 0
            if dst is None:
                rt = routing.uniform(R, Ts, SHAPE.num_experts, SHAPE.topk, seed=i)
            else:
                rt = skewed("all_to_one", R, Ts, seed + i, dst=dst)
            rounds.append(rounds_of(rt, R, 130))
            call_and_check(layer, rt, seed)
        assert rounds[0] > 1 and rounds[1] == 1 and rounds[2] > 1, rounds
        stats = layer.stats()
        counted = stats["calls_in_rounds"], stats["rounds_of_those_calls"]
        assert counted == (2, rounds[0] + rounds[2])
        layer.close()


def test_a_capacity_that_would_need_too_many_rounds_is_refused_with_the_numbers():
    """Only a capacity whose worst routing needs more than MAX_ROUNDS rounds is refused, when
    the layer is built."""
    R = 2
    worst = R * SHAPE.max_tokens_per_rank * SHAPE.topk  # 256 rows to one rank
    least = triton.cdiv(worst, MAX_ROUNDS)
    w13, w2 = make_w13(SHAPE, 0, "cpu"), make_w2(SHAPE, 0, "cpu")
    with EmulatedWorld(R) as world:
        with pytest.raises(ValueError, match=rf"sends {worst} rows .* pass capacity >= {least}"):
            FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config(), capacity=least - 1)
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config(), capacity=least)
        assert layer.stats()["max_rounds"] == MAX_ROUNDS
        layer.close()
