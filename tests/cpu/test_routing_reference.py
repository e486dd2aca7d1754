"""Shapes, routers, synthetic routings, placement and the pure-torch references."""

import pytest
import torch

from megakernel import routing
from megakernel.placement import Placement, resolve_ref
from megakernel.reference import combine_ref, dispatch_ref, expert_ffn_ref, moe_ref
from megakernel.shapes import PRESETS, MoEShape, preset
from megakernel.traffic import traffic_model


def test_presets():
    assert (preset("dsv3").hidden, preset("dsv3").ffn, preset("dsv3").num_experts) == (
        7168,
        2048,
        256,
    )
    assert (preset("qwen3_235b").hidden, preset("qwen3_235b").num_experts) == (4096, 128)
    assert (preset("qwen3_30b").hidden, preset("qwen3_30b").ffn) == (2048, 768)
    assert (preset("mixtral").ffn, preset("mixtral").num_experts, preset("mixtral").topk) == (
        14336,
        8,
        2,
    )
    assert all(s.topk <= s.num_experts for s in PRESETS.values())
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="topk is 9 but there are only 8 experts"):
        MoEShape(64, 32, 8, 9, 16)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        MoEShape(0, 32, 8, 2, 16)
    with pytest.raises(ValueError, match="do not split evenly"):
        preset("dsv3").experts_per_rank(3)


def test_router():
    logits = torch.randn(10, 16)
    w, ids = routing.route_topk(logits, 4)
    assert ids.dtype == torch.int32 and ids.shape == (10, 4)
    assert torch.allclose(w.sum(1), torch.ones(10))
    expect = torch.softmax(logits, -1).topk(4)
    assert torch.equal(ids.long(), expect.indices)
    w_raw, _ = routing.route_topk(logits, 4, renormalize=False)
    assert torch.allclose(w_raw, expect.values)
    with pytest.raises(ValueError, match="topk is 17"):
        routing.route_topk(logits, 17)


@pytest.mark.parametrize(
    "make",
    [
        lambda: routing.uniform(4, 64, 16, 4, seed=3),
        lambda: routing.zipf(4, 64, 16, 4, s=1.2, seed=3),
        lambda: routing.hot_expert(4, 64, 16, 4, fraction=0.5, seed=3),
        lambda: routing.restricted(4, 64, 16, 4, experts=[1, 5, 9, 13], seed=3),
    ],
)
def test_synthetic_routings_are_distinct_seeded_global_views(make):
    a, b = make(), make()
    assert a.world_size == 4
    for ids_a, ids_b, w in zip(a.topk_ids, b.topk_ids, a.topk_weights, strict=True):
        assert torch.equal(ids_a, ids_b), "one seed gives one global view"
        assert ids_a.shape == (64, 4) and ids_a.dtype == torch.int32
        assert all(len(set(row)) == 4 for row in ids_a.tolist()), "K distinct experts per token"
        assert bool(((ids_a >= 0) & (ids_a < 16)).all())
        assert torch.allclose(w.sum(1), torch.ones(64), atol=1e-6)


def test_routing_shapes_of_skew():
    hot = routing.hot_expert(2, 500, 16, 2, fraction=1.0, seed=1, hot=7)
    assert all(bool((ids == 7).any(1).all()) for ids in hot.topk_ids)
    z = routing.zipf(1, 4000, 32, 1, s=1.5, seed=0).topk_ids[0]
    top = torch.bincount(z.view(-1).long(), minlength=32).max().item()
    assert top > 4000 / 32 * 5, "s = 1.5 concentrates tokens on the most popular experts"
    one = routing.all_to_one_rank(4, 50, 16, 2, dst=2, seed=0)
    assert all(bool(((ids >= 8) & (ids < 12)).all()) for ids in one.topk_ids)
    dropped = routing.drop(routing.uniform(2, 1000, 8, 2, seed=0), 0.25, seed=1)
    frac = sum(int((ids < 0).sum()) for ids in dropped.topk_ids) / 4000
    assert 0.2 < frac < 0.3
    assert all(
        bool((w[ids < 0] == 0).all())
        for ids, w in zip(dropped.topk_ids, dropped.topk_weights, strict=True)
    )
    ragged = routing.uniform(3, [5, 0, 7], 8, 2, seed=0)
    assert [t.shape[0] for t in ragged.topk_ids] == [5, 0, 7]


def test_placement_tables_and_resolve():
    contiguous = Placement.contiguous(8, 2)
    assert contiguous.slots_per_rank == 4 and contiguous.slot_expert() == list(range(8))
    # non-contiguous, with expert 0 replicated on both ranks
    table = [[(1, 0), (0, 2)], [(0, 0)], [(1, 1)], [(0, 1)], [(1, 2)]]
    pl = Placement.from_slots(2, 3, table)
    assert pl.replicas[0] == (3, 2) and pl.slot_expert() == [1, 3, 0, 0, 2, 4]
    ids = torch.tensor([[0, 1], [0, -1], [4, 0]], dtype=torch.int32)
    assert resolve_ref(ids, 0, pl).tolist() == [[2, 0], [2, -1], [5, 2]]  # own replica first
    assert resolve_ref(ids, 1, pl).tolist() == [[3, 0], [3, -1], [5, 3]]
    three = Placement.from_slots(4, 2, [[(1, 0), (2, 0), (3, 0)], [(0, 0)]])
    spread = resolve_ref(torch.zeros(6, 1, dtype=torch.int32), 0, three)
    assert spread.view(-1).tolist() == [2, 4, 6, 2, 4, 6], "no local replica: token % replicas"
    with pytest.raises(ValueError, match="slot 0 holds both expert 0 and expert 1"):
        Placement.from_slots(2, 2, [[(0, 0)], [(0, 0)]])
    with pytest.raises(ValueError, match=r"expert 1 placed on \(rank 2"):
        Placement.from_slots(2, 2, [[(0, 0)], [(2, 0)]])
    with pytest.raises(ValueError, match="expert 0 has no physical slot"):
        Placement(2, 2, ((),))


def _naive_moe(x, ids, w, w13, w2):
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                xt = x[t : t + 1].double()
                h = xt @ w13[e].double().t()
                a = torch.nn.functional.silu(h[:, : w13.shape[1] // 2]) * h[:, w13.shape[1] // 2 :]
                out[t] += float(w[t, k]) * (a @ w2[e].double().t())[0].float()
    return out


def test_moe_ref_matches_a_naive_per_token_loop():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, K = 37, 24, 12, 6, 3
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    r = routing.drop(routing.uniform(1, T, E, K, seed=4), 0.2, seed=5)
    ids, w = r.topk_ids[0], r.topk_weights[0]
    got = moe_ref(x, ids, w, w13, w2)
    want = _naive_moe(x, ids, w, w13, w2)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, torch.zeros_like(got))


def test_dispatch_and_combine_refs_compose_to_moe_ref():
    g = torch.Generator().manual_seed(1)
    R, T, H, I, E, K = 3, 11, 8, 4, 6, 2
    pl = Placement.contiguous(E, R)
    r = routing.drop(routing.uniform(R, T, E, K, seed=2), 0.1, seed=3)
    xs = [torch.randn(T, H, generator=g) for _ in range(R)]
    w13 = torch.randn(E, 2 * I, H, generator=g)
    w2 = torch.randn(E, H, I, generator=g)
    phys = [resolve_ref(ids, s, pl) for s, ids in enumerate(r.topk_ids)]
    recv = dispatch_ref(xs, phys, pl)
    for d, (buf, layout) in enumerate(recv):
        # expert-major, then source rank, then token
        key = layout.local_slot * 1000000 + layout.src_rank * 1000 + layout.token
        assert torch.equal(key, key.sort().values)
        for row in range(layout.num_rows):
            s, t = int(layout.src_rank[row]), int(layout.token[row])
            assert torch.equal(buf[row], xs[s][t])
            assert int(phys[s][t, layout.k[row]]) == d * pl.slots_per_rank + int(
                layout.local_slot[row]
            )
    outs = []
    for d, (buf, layout) in enumerate(recv):
        y = torch.zeros(layout.num_rows, H)
        for local in range(pl.slots_per_rank):
            rows = layout.local_slot == local
            e = pl.slot_expert()[d * pl.slots_per_rank + local]
            y[rows] = expert_ffn_ref(buf[rows], w13[e], w2[e])
        outs.append(y)
    combined = combine_ref(outs, [lay for _, lay in recv], r.topk_weights)
    for s in range(R):
        want = moe_ref(xs[s], r.topk_ids[s], r.topk_weights[s], w13, w2)
        assert torch.allclose(combined[s], want.float(), rtol=1e-5, atol=1e-5)


def test_traffic_model_dsv3_uniform():
    R, T, E, K = 8, 4096, 256, 8
    pl = Placement.contiguous(E, R)
    r = routing.uniform(R, T, E, K, seed=11)
    phys = [resolve_ref(ids, s, pl) for s, ids in enumerate(r.topk_ids)]
    tm = traffic_model(phys, pl.slots_per_rank)
    # P(a rank holds none of 8 distinct experts out of 256) = C(224, 8) / C(256, 8)
    p_none = 1.0
    for i in range(8):
        p_none *= (224 - i) / (256 - i)
    assert abs(tm.distinct_ranks - 8 * (1 - p_none)) / (8 * (1 - p_none)) < 0.01
    assert abs(tm.distinct_ranks - 5.30) / 5.30 < 0.01
    assert abs(tm.remote_ranks - 4.63) / 4.63 < 0.01
    assert sum(tm.rows_plain) > sum(tm.rows_saved)
    assert abs(sum(tm.rows_plain) / (R * T) - K * 7 / 8) / 7 < 0.01  # 7 of 8 slots are remote
    assert tm.bytes(row_bytes=14336, token_saving=True)[0] == tm.rows_saved[0] * 14336
