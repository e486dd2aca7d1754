"""The whole MoE layer (mode "layer" and FusedEPMoE) under the interpreter, EmulatedWorld.

Every call is checked three ways: dispatch bit for bit against dispatch_ref, the first GEMM
against expert_act_ref and the output against moe_ref; outputs are poisoned first. The
interpreter runs each task kind on every rank before the next kind, so the one- and two-kernel
modes launch the same phases here; the GPU tests run them as written.
"""

import gc
import time
import warnings
import weakref

import pytest
import torch
import triton
import triton.language as tl

from megakernel import FusedEPMoE, KernelConfig, Megakernel, TopKRouter, routing
from megakernel.ops.gemm import TILE_COLS, gemm1_coords
from megakernel.placement import Placement
from megakernel.shapes import PRESETS, MoEShape
from megakernel.tasks import combine_order, down_coords
from megakernel.testing import (
    check_calls,
    check_layer_output,
    layer_inputs,
    make_tokens,
    make_w2,
    make_w13,
    poison,
    run_layer_checked,
)
from megakernel.validate import RoutingError
from symm_mem import DeviceCallError, EmulatedWorld, WaitTimeoutError

SHAPE = PRESETS["small"]  # H 64, I 32, E 16, K 4, fp32
T = 21  # not a multiple of the tile (16), the combine block (8) or the chunk (4)


def small_config(**kw) -> KernelConfig:
    knobs = dict(block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16)
    knobs |= dict(combine_block=8, reduce_h=32, block_h=32, chunk=4)
    return KernelConfig(**(knobs | kw))


def layer_call(ws, rt, placement, seed, shape, split=False):
    """One poisoned layer call on every rank, checked against all three references."""
    handles, problems = run_layer_checked(ws, rt, placement, seed, shape, "cpu", split=split)
    assert problems == []
    return handles


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("case", routing.EDGE_CASES)
def test_layer_edge_case_routings(R, case):
    E = max(SHAPE.num_experts, 4 * R)
    rt, placement = routing.edge_case(case, R, T, E, SHAPE.topk, seed=len(case))
    placement = placement or Placement.contiguous(E, R)
    shape = MoEShape(64, 32, E, 4, 100, torch.float32)
    split = len(case) % 2 == 1  # both launch modes over the cases
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, placement=placement, config=small_config())
        layer_call(ws, rt, placement, seed=3, shape=shape, split=split)
        assert all(ws.sym["combine_count"].peer(r).eq(0).all() for r in range(R)), (
            "counters cleared"
        )


@pytest.mark.parametrize("R", [1, 2])
def test_layer_in_bf16_the_default_dtype(R):
    """bf16, the layer's default, computes the reference under the interpreter too (its bf16
    ``tl.dot`` is wrong, so the GEMM tiles feed it fp32 there: ``ops.gemm.DOT_UPCAST``)."""
    shape = MoEShape(64, 32, 8, 2, 100)
    assert shape.dtype == torch.bfloat16
    rt = routing.zipf(R, [T] * R, shape.num_experts, shape.topk, 1.0, seed=7)
    placement = Placement.contiguous(shape.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=small_config())
        layer_call(ws, rt, placement, seed=8, shape=shape, split=R == 2)


def test_layer_top1_one_expert_per_rank_fp16_switches_off():
    R = 2
    shape = MoEShape(64, 32, R, 1, 100, torch.float16)  # K = 1, E = R
    rt = routing.drop(routing.uniform(R, T, R, 1, seed=4), 0.2, seed=5)
    placement = Placement.contiguous(R, R)
    cfg = small_config(
        token_saving=False,
        sorted_dispatch=False,
        per_tile_flags=False,
        gemm1_tma=False,
        down_tma=False,
    )
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=cfg)
        layer_call(ws, rt, placement, seed=6, shape=shape)


@pytest.mark.parametrize("pack", ["auto", "scan"])
@pytest.mark.parametrize("group", [1, 3])
def test_layer_gemm1_groups(pack, group):
    """GEMM1's tasks tile by tile and (``gemm1_group=3``) column block major over up to three
    tiles of one expert; a hot expert has many tiles, the others one or two. ``pack="scan"``:
    a tile's column blocks 1.. wait for block 0's copies, which either order runs first."""
    R = 2
    rt = routing.hot_expert(R, T, SHAPE.num_experts, SHAPE.topk, 0.5, seed=8)
    placement = Placement.contiguous(SHAPE.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config(pack=pack, gemm1_group=group))
        assert ws.meta("layer").GEMM1_GROUP == group
        layer_call(ws, rt, placement, seed=9, shape=SHAPE, split=True)


@pytest.mark.parametrize("half_tiles", [True, False])
@pytest.mark.parametrize("pack", ["auto", "scan"])
def test_half_tiles(pack, half_tiles):
    """``half_tiles`` (the default): tiles of at most 8 rows (half of block_m) run GEMM1 and
    the down projection at half the height, with rows gathered or resolved in place (``pack``);
    off, every tile runs at full height."""
    R, shape = 2, MoEShape(64, 32, 8, 2, 100)
    rt = routing.uniform(R, [T] * R, shape.num_experts, shape.topk, seed=11)
    rows = torch.bincount(torch.cat(rt.topk_ids).flatten(), minlength=shape.num_experts)
    tails = rows % 16
    assert ((tails > 0) & (tails <= 8)).any() and (rows > 8).any()  # both heights run
    placement = Placement.contiguous(shape.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=small_config(half_tiles=half_tiles, pack=pack))
        assert ws.meta("layer").HALF_TILES == half_tiles
        layer_call(ws, rt, placement, seed=12, shape=shape)


@pytest.mark.parametrize(
    "pack,tma,pairs", [("auto", True, True), ("scan", True, False), ("auto", False, False)]
)
def test_tail_rows_join_the_tile_before(pack, tma, pairs):
    """``tail_rows=8``: an expert's last tile of at most 8 rows after a full one (16) joins it,
    and its tasks run those rows as a second, swapped product beside the tile's (GEMM1 by TMA
    or by pointers, rows gathered or resolved in place; the down projection the same), and the
    combine put counts a token block's run across the tile's edge right. With the pairs on,
    the other tiles make gate and up as one product, the tiles with a tail as two."""
    R, shape = 2, MoEShape(64, 32, 8, 2, 100)
    rt = routing.uniform(R, [40] * R, shape.num_experts, shape.topk, seed=12)
    rows = torch.bincount(torch.cat(rt.topk_ids).flatten(), minlength=shape.num_experts)
    tails = rows - 16
    assert ((tails > 0) & (tails <= 8)).any() and (tails > 8).any()  # joined, and not
    placement = Placement.contiguous(shape.num_experts, R)
    cfg = small_config(tail_rows=8, pack=pack, gemm1_tma=tma, down_tma=tma, gemm1_pairs=pairs)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=cfg)
        meta = ws.meta("layer")
        assert meta.TAIL_ROWS == 8 and meta.PAIRS == pairs
        layer_call(ws, rt, placement, seed=12, shape=shape)
        tiles = torch.cat([ws.plan_ws.plan(r).tiles for r in range(R)])
        assert ((tiles[:, 2] > 16) & (tiles[:, 2] <= 24)).any()
        assert (tiles[:, 2] <= 24).all()


def test_tail_rows_knob_is_checked():
    """tail_rows: 0 or a power of two up to block_m / 2, refused for FP8 experts, whose tiles
    have no tail product."""
    assert KernelConfig().tail_rows == 0 and KernelConfig(tail_rows=32).paired_gemm1(True)
    for bad in (3, 128, -16, True):
        with pytest.raises(ValueError, match="tail_rows must be"):
            KernelConfig(tail_rows=bad)
    with pytest.raises(ValueError, match="FP8 tiles do not have .*would spill"):
        KernelConfig(tail_rows=32).for_fp8()


def test_gemm1_as_two_products_and_the_module_keeps_the_weights_as_given():
    """GEMM1 without the paired product (the default makes gate and up as one 2BN-wide product
    from a [L, I, 2, H] view of w13): as two products by TMA, and by pointer loads. The module
    holds w13 as given: pairing is the descriptor's view, not a copy."""
    R = 2
    rt = routing.zipf(R, T, SHAPE.num_experts, SHAPE.topk, 1.2, seed=15)
    placement = Placement.contiguous(SHAPE.num_experts, R)
    assert small_config().paired_gemm1(swiglu=True)
    with EmulatedWorld(R) as world:
        for knobs in (dict(gemm1_pairs=False), dict(gemm1_tma=False)):
            cfg = small_config(**knobs)
            assert not cfg.paired_gemm1(swiglu=True)
            ws = Megakernel(world, SHAPE, config=cfg)
            layer_call(ws, rt, placement, seed=16, shape=SHAPE)
            ws.close()
        w13, w2 = make_w13(SHAPE, 17, "cpu"), make_w2(SHAPE, 17, "cpu")
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config())
        assert torch.equal(layer.w13["1"], placement.local_weights(w13, 1))
        xs = make_tokens(SHAPE, [T, T], seed=18, device="cpu")
        ids, weights = rt.topk_ids, rt.topk_weights
        out = layer({r: xs[r] for r in range(R)}, dict(enumerate(ids)), dict(enumerate(weights)))
        layer.check_errors()
        for r in range(R):
            assert check_layer_output(out[r], xs[r], ids[r], weights[r], SHAPE, 17, r) == []
        layer.close()
    # the pairs need SwiGLU to split them and 2 BN within one n256 MMA
    assert not small_config().paired_gemm1(swiglu=False)
    assert not KernelConfig(block_n=256).paired_gemm1(swiglu=True)


@pytest.mark.parametrize("lag", [1, 0])
def test_one_launch_mixes_the_reduce_into_the_down_tasks(lag):
    """One rank in one launch (``overlap=True``): the interpreter runs programs one after
    another, so the first claims every task in the real order, down tasks column group by group
    (two groups here) with the previous group's reduce tasks mixed in (``combine_order``), and
    must publish each group's pieces before its reduce tasks wait on them."""
    rt = routing.zipf(1, T, SHAPE.num_experts, SHAPE.topk, 1.1, seed=13)
    placement = Placement.contiguous(SHAPE.num_experts, 1)
    with EmulatedWorld(1) as world:
        ws = Megakernel(world, SHAPE, config=small_config(reduce_lag=lag))
        assert ws.sym["combine_count"].shape[0] == 2, "H 64 in column groups of 32"
        _, problems = run_layer_checked(ws, rt, placement, 14, SHAPE, "cpu", overlap=True)
        assert problems == []


def test_module_back_to_back_with_router_is_deterministic():
    R = 2
    g = torch.Generator().manual_seed(7)
    w13, w2 = make_w13(SHAPE, 8, "cpu"), make_w2(SHAPE, 8, "cpu")
    gate = torch.randn(SHAPE.num_experts, SHAPE.hidden, generator=g)
    router = TopKRouter(gate, SHAPE.topk)
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config(), router=router)
        assert "combine_y (sym)" in layer.describe()
        outs = []
        for call in range(3):
            xs = make_tokens(SHAPE, [T - 3 * call, T], seed=20 + call, device="cpu")
            got = layer({r: xs[r] for r in range(R)})
            layer.check_errors()
            for r in range(R):
                weights, ids = router(xs[r])
                assert check_layer_output(got[r], xs[r], ids, weights, SHAPE, 8, r) == []
            outs.append(got)
        again = layer({r: xs[r] for r in range(R)})
        assert all(torch.equal(again[r], outs[-1][r]) for r in range(R)), "bitwise repeatable"
        layer.close()


def test_the_module_says_it_is_forward_only():
    """A call whose tokens or routing weights want gradients warns, once a layer, that none flow
    back through it (its output is still right); under no_grad, or when nothing wants one, it
    says nothing."""
    w13, w2 = make_w13(SHAPE, 9, "cpu"), make_w2(SHAPE, 9, "cpu")
    rt = routing.uniform(1, [T], SHAPE.num_experts, SHAPE.topk, seed=9)
    x = make_tokens(SHAPE, [T], seed=10, device="cpu")[0]
    ids, weights = {0: rt.topk_ids[0]}, {0: rt.topk_weights[0]}
    with EmulatedWorld(1) as world:
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer({0: x}, ids, weights)  # nothing wants a gradient
            with torch.no_grad():
                layer({0: x.clone().requires_grad_()}, ids, weights)
        wanting = {0: weights[0].clone().requires_grad_()}
        with pytest.warns(UserWarning, match="forward only: its output carries no gradient"):
            out = layer({0: x}, ids, wanting)[0]
        layer.check_errors()
        assert not out.requires_grad
        assert check_layer_output(out, x, ids[0], weights[0], SHAPE, 9, 0) == []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer({0: x.clone().requires_grad_()}, ids, weights)  # said once
        layer.close()


def test_module_input_validation():
    R = 2
    w13, w2 = make_w13(SHAPE, 0, "cpu"), make_w2(SHAPE, 0, "cpu")
    L = SHAPE.num_experts // R
    with EmulatedWorld(R) as world:
        with pytest.raises(ValueError, match="that is every expert; FusedEPMoE.from_dense"):
            FusedEPMoE(world, SHAPE, {0: w13, 1: w13}, {0: w2[:L], 1: w2[:L]})
        with pytest.raises(ValueError, match="give w13 as a dict keyed by rank"):
            FusedEPMoE(world, SHAPE, w13[:L], w2[:L])
        with pytest.raises(ValueError, match=r"w2 is given for ranks \[0\]"):
            FusedEPMoE(world, SHAPE, {0: w13[:L], 1: w13[L:]}, {0: w2[:L]})
        with pytest.raises(ValueError, match="w13 of rank 1 is torch.float16"):
            FusedEPMoE(world, SHAPE, {0: w13[:L], 1: w13[L:].half()}, {0: w2[:L], 1: w2[L:]})
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config())
        x = torch.zeros(4, SHAPE.hidden)
        ids = torch.zeros(4, SHAPE.topk, dtype=torch.int32)
        w = torch.full((4, SHAPE.topk), 0.25)
        bad = {
            r"x has shape \(4, 63\)": dict(x=torch.zeros(4, 63)),
            "x is torch.float16 but the layer is torch.float32": dict(x=x.half()),
            "x of rank 0 is not contiguous": dict(x=torch.zeros(SHAPE.hidden, 4).t()),
            "101 tokens but max_tokens_per_rank is 100": dict(
                x=torch.zeros(101, SHAPE.hidden),
                ids=torch.zeros(101, SHAPE.topk, dtype=torch.int32),
                w=torch.zeros(101, SHAPE.topk),
            ),
            "topk_weights has shape": dict(w=torch.zeros(4, 3)),
            "topk_ids without topk_weights": dict(w=None),
            "no topk_ids given and the layer has no router": dict(ids=None, w=None),
        }
        for message, change in bad.items():
            args = dict(x=x, ids=ids, w=w) | change
            per_rank = [
                None if args[k] is None else {r: args[k] for r in range(R)} for k in ("x", "ids")
            ] + [None if args["w"] is None else {r: args["w"] for r in range(R)}]
            with pytest.raises(ValueError, match=message):
                layer(*per_rank)
        with pytest.raises(ValueError, match="give x as a dict keyed by rank"):
            layer(x, ids, w)
        layer.close()
        with pytest.raises(ValueError, match="validate must be one of"):
            FusedEPMoE.from_dense(world, SHAPE, w13, w2, validate="sometimes")
        # validate="host": the id range is read back and checked before anything launches
        strict = FusedEPMoE.from_dense(
            world, SHAPE, w13, w2, config=small_config(), validate="host"
        )
        for message, bad_ids in {
            "expert 16 but the layer has 16 experts": ids + 16,
            "only negative id allowed is -1": ids - 2,
        }.items():
            with pytest.raises(ValueError, match=message):
                strict(
                    {r: x for r in range(R)},
                    {r: bad_ids for r in range(R)},
                    {r: w for r in range(R)},
                )
        strict.close()


def test_a_rank_that_never_calls_fails_the_call_in_time_and_reset_recovers():
    """Rank 1 skips call 1. Rank 0's call raises WaitTimeoutError within the timeout (plus the
    interpreter's own time), its output NaN. Every later call is skipped on the device (output
    NaN) and raises, and ``check_errors`` names the failed call and the skipped ones. After
    ``reset()`` the next call on both ranks computes the reference again."""
    R, timeout = 2, 0.5
    rt = routing.uniform(R, T, SHAPE.num_experts, SHAPE.topk, seed=9)
    w13, w2 = make_w13(SHAPE, 0, "cpu"), make_w2(SHAPE, 0, "cpu")
    xs = make_tokens(SHAPE, [T, T], seed=1, device="cpu")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    with EmulatedWorld(R, timeout_s=timeout) as world:
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config())
        ws = layer.workspace
        weights = {r: layer.w13[str(r)] for r in range(R)}, {r: layer.w2[str(r)] for r in range(R)}
        launch_all = world.run_ranks
        world.run_ranks = lambda launch: launch(0)  # rank 1 never makes call 1
        outs = {r: torch.zeros(T, SHAPE.hidden, dtype=SHAPE.dtype) for r in range(R)}
        start = time.monotonic()
        with pytest.raises(WaitTimeoutError, match="call 1: rank 0 timed out after 0.5 s"):
            ws.run(*args, *weights, out=outs, mode="layer")
        assert time.monotonic() - start < 30, "every wait leaves once one has failed"
        assert outs[0].isnan().all(), "the failed call's output is NaN"
        world.run_ranks = launch_all
        for call in (2, 3):
            outs = {r: torch.zeros(T, SHAPE.hidden, dtype=SHAPE.dtype) for r in range(R)}
            with pytest.raises(DeviceCallError, match=f"call {call} was skipped: call 1 failed"):
                ws.run(*args, *weights, out=outs, mode="layer")
            assert outs[0].isnan().all(), "a skipped call's output is NaN"
        with pytest.raises(WaitTimeoutError, match="call 1: .*calls 2-3 were skipped"):
            layer.check_errors()
        layer.reset()
        out = layer(*args)
        layer.check_errors()
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids, w, SHAPE, 0, r) == []
        layer.close()


def test_routing_stats_accumulate_on_the_device():
    """Per-expert loads and the co-selected pairs of every PAIR_SAMPLE-th chunk, summed over
    calls and ranks, as counted on the host; ``clear_routing_stats`` starts again."""
    from megakernel.placement.stats import RoutingStats
    from megakernel.plan.config import PAIR_SAMPLE

    R, E = 2, SHAPE.num_experts
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(
            world, SHAPE, make_w13(SHAPE, 0, "cpu"), make_w2(SHAPE, 0, "cpu"), config=small_config()
        )
        chunk = layer.workspace.plan_cfg.tokens_per_chunk
        want = None
        for i, tokens in enumerate([[T, 40], [17, 33]]):
            rt = routing.drop(routing.zipf(R, tokens, E, SHAPE.topk, 1.0, seed=i), 0.1, seed=i)
            xs = make_tokens(SHAPE, tokens, seed=i, device="cpu")
            layer(
                dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
            )
            got = RoutingStats.count(rt.topk_ids, E, sample_every=PAIR_SAMPLE, chunk=chunk)
            want = got if want is None else want + got
        st = layer.routing_stats()
        assert torch.equal(st.load, want.load) and torch.equal(st.pairs, want.pairs)
        assert (st.tokens, st.sampled) == (want.tokens, want.sampled) and st.tokens == T + 90
        assert st.pairs.sum() > 0
        layer.clear_routing_stats()
        assert layer.routing_stats().load.sum() == 0
        layer.close()


def test_rebalance_moves_the_experts_and_the_next_call_is_right():
    """A layer with a spare slot per rank, fed a hot-expert routing; its routing statistics give
    a balanced replication, ``rebalance`` moves the weights through symmetric memory, and the
    next call equals the reference; then a co-activation grouping (unused spare slots)."""
    from megakernel.placement.policies import balanced_replication, coactivation_grouping

    R, E, seed = 2, SHAPE.num_experts, 5
    L = E // R + 1
    start = Placement.from_slots(R, L, [[(e // (E // R), e % (E // R))] for e in range(E)])
    rt = routing.hot_expert(R, T, E, SHAPE.topk, 0.5, seed=seed)
    xs = make_tokens(SHAPE, [T] * R, seed=seed, device="cpu")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))

    def check(out):
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids, w, SHAPE, seed, r) == []

    with EmulatedWorld(R) as world:
        w13, w2 = make_w13(SHAPE, seed, "cpu"), make_w2(SHAPE, seed, "cpu")
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, placement=start, config=small_config())
        check(layer(*args))
        balanced = balanced_replication(layer.routing_stats(), R, L)
        assert len(balanced.replicas[0]) == 2, "the hot expert gets the spare slots' replica"
        layer.rebalance(balanced)
        check(layer(*args))
        stats = layer.routing_stats()
        grouped = Placement.from_slots(
            R, L, [[(r, local)] for r, local in _slots_of(coactivation_grouping(stats, R), R)]
        )
        layer.rebalance(grouped)
        check(layer(*args))
        layer.check_errors()
        with pytest.raises(ValueError, match="keeps the experts, the ranks and the slots"):
            layer.rebalance(Placement.contiguous(E, R))
        layer.close()


def _slots_of(pl: Placement, R: int) -> list[tuple[int, int]]:
    """Each expert's (rank, local slot) in a one-replica placement."""
    L = pl.slots_per_rank
    return [divmod(slots[0], L) for slots in pl.replicas]


def test_timing_probes():
    """stage="compute" recomputes the same activations; stage="comm" moves zeros end to end."""
    R = 2
    rt = routing.uniform(R, T, SHAPE.num_experts, SHAPE.topk, seed=11)
    pl = Placement.contiguous(SHAPE.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config())
        handles = layer_call(ws, rt, pl, seed=12, shape=SHAPE)
        act = {r: h.act[: h.num_recv()].clone() for r, h in handles.items()}
        xs = make_tokens(SHAPE, [T] * R, 12, "cpu")
        args = (
            dict(enumerate(xs)),
            dict(enumerate(rt.topk_ids)),
            dict(enumerate(rt.topk_weights)),
            {r: pl.local_weights(make_w13(SHAPE, 12, "cpu"), r) for r in range(R)},
            {r: pl.local_weights(make_w2(SHAPE, 12, "cpu"), r) for r in range(R)},
        )
        for r in range(R):
            ws.act[r].fill_(float("nan"))
        ws.run(*args, mode="layer", stage="compute")
        ws.check_errors()
        assert all(torch.equal(ws.act[r][: len(act[r])], act[r]) for r in range(R))
        probe = ws.run(*args, mode="layer", stage="comm")
        ws.check_errors()
        assert all(probe[r].out.eq(0).all() for r in range(R))
        with pytest.raises(ValueError, match="stage 'tiles' is not one of mode \"layer\""):
            ws.run(*args, mode="layer", stage="tiles")


def test_the_benchmark_baseline_computes_the_layer():
    from megakernel.reference import moe_ref
    from perf.baseline import baseline_moe

    rt = routing.drop(routing.uniform(1, T, SHAPE.num_experts, SHAPE.topk, seed=1), 0.2, 2)
    x = make_tokens(SHAPE, [T], 1, "cpu")[0]
    w13, w2 = make_w13(SHAPE, 1, "cpu"), make_w2(SHAPE, 1, "cpu")
    ids, w = rt.topk_ids[0], rt.topk_weights[0]
    got = baseline_moe(x, ids, w, w13, w2, SHAPE, world_size=1)
    assert torch.allclose(got, moe_ref(x, ids, w, w13, w2), rtol=1e-5, atol=1e-5)


@triton.jit
def _order_kernel(
    out_ptr,
    n,
    num_tiles,
    nrb,
    lag,
    GB: tl.constexpr,
    NB2: tl.constexpr,
    NRH: tl.constexpr,
    NP: tl.constexpr,
):
    u = tl.arange(0, NP)
    is_down, idx = combine_order(u, num_tiles * NB2, num_tiles, nrb, lag, GB, NRH)
    group, tile, n_block = down_coords(tl.where(is_down, idx, 0), num_tiles, GB, NB2)
    ok = u < n
    tl.store(out_ptr + u * 5, is_down.to(tl.int32), mask=ok)
    tl.store(out_ptr + u * 5 + 1, idx, mask=ok)
    tl.store(out_ptr + u * 5 + 2, group, mask=ok)
    tl.store(out_ptr + u * 5 + 3, tile, mask=ok)
    tl.store(out_ptr + u * 5 + 4, n_block, mask=ok)


@pytest.mark.parametrize("lag", [1, 3, 1000])
@pytest.mark.parametrize(
    "num_tiles, nrb, GB, NB2",
    [(3, 4, 2, 5), (5, 2, 4, 8), (1, 7, 1, 3), (0, 3, 2, 4), (4, 0, 2, 3)],
)
def test_down_and_reduce_order(num_tiles, nrb, GB, NB2, lag):
    """The interleaved order visits every down task (tile, column block) and every reduce task
    once; down tasks run group by group; reduce group g comes after every down task of group g
    and, from then on, after the first ``lag`` down tasks of group g + 1 (as one band after
    all of them when the lag is that long)."""
    NRH = triton.cdiv(NB2, GB)
    n = num_tiles * NB2 + nrb * NRH
    out = torch.full((max(n, 1), 5), -1, dtype=torch.int32)
    np2 = triton.next_power_of_2(max(n, 1))
    _order_kernel[(1,)](out, n, num_tiles, nrb, lag, GB, NB2, NRH, np2)
    rows = out[:n].tolist()
    down = [(p, r) for p, r in enumerate(rows) if r[0] == 1]
    red = [(p, r) for p, r in enumerate(rows) if r[0] == 0]
    assert sorted(r[1] for _, r in down) == list(range(num_tiles * NB2))
    assert sorted(r[1] for _, r in red) == list(range(nrb * NRH))
    assert sorted((r[3], r[4]) for _, r in down) == [
        (t, c) for t in range(num_tiles) for c in range(NB2)
    ]
    assert all(r[2] == r[4] // GB for _, r in down), "a down task's group holds its column block"
    assert [r[1] for _, r in down] == sorted(r[1] for _, r in down), "down tasks in id order"
    downs_of = {}
    for p, r in down:
        downs_of.setdefault(r[2], []).append(p)
    for p, r in red:
        g = r[1] // nrb
        assert p > max(downs_of.get(g, [-1])), f"reduce of group {g} before its own down tasks"
        following = downs_of.get(g + 1, [])
        assert sum(q < p for q in following) >= min(lag, len(following))
    assert [r[1] for _, r in red] == sorted(r[1] for _, r in red), "reduce tasks in id order"


@triton.jit
def _gemm1_order_kernel(out_ptr, tiles_ptr, n, GROUP: tl.constexpr, NB: tl.constexpr,
                        NP: tl.constexpr):  # fmt: skip
    i = tl.arange(0, NP)
    tile, n_block = gemm1_coords(tl.minimum(i, n - 1), tiles_ptr, GROUP, NB)  # rows of the table
    tl.store(out_ptr + i * 2, tile, mask=i < n)
    tl.store(out_ptr + i * 2 + 1, n_block, mask=i < n)


@pytest.mark.parametrize("GROUP", [1, 2, 3, 8])
@pytest.mark.parametrize("slot_tiles, NB", [([3, 1, 7, 2], 3), ([1], 4), ([8], 1), ([5, 6], 16)])
def test_gemm1_order(slot_tiles, NB, GROUP):
    """``gemm1_coords`` visits every (tile, column block) once: each slot's tiles in chunks of
    GROUP (its last one shorter), a chunk's tasks column block by column block, its tiles in
    order within a block (so a tile's block 0 precedes its other blocks), a chunk at the ids
    its tiles take tile-major; GROUP 1 is tile-major. The tile table as the plan writes it:
    columns 5 and 6 hold a tile's index among its slot's tiles and their number."""
    rows = [[0] * 5 + [m, n] for n in slot_tiles for m in range(n)]
    table = torch.tensor(rows, dtype=torch.int32)
    assert table.shape[1] == TILE_COLS
    n = table.shape[0] * NB
    out = torch.full((n, 2), -1, dtype=torch.int32)
    _gemm1_order_kernel[(1,)](out, table, n, GROUP, NB, triton.next_power_of_2(n))
    want, first = [], 0
    for tiles in slot_tiles:
        for start in range(0, tiles, GROUP):
            chunk = range(first + start, first + min(start + GROUP, tiles))
            want += [(t, c) for c in range(NB) for t in chunk]
        first += tiles
    assert [tuple(r) for r in out.tolist()] == want


def plant_bad_ids(rt: routing.Routing, rank: int) -> tuple[routing.Routing, routing.Routing]:
    """``rt`` with an id >= E (token 3, k 1) and one < -1 (token 7, k 0) on ``rank``, and the
    same routing with those slots dropped (-1), which is what the layer computes."""
    bad = [ids.clone() for ids in rt.topk_ids]
    bad[rank][3, 1], bad[rank][7, 0] = SHAPE.num_experts + 5, -4
    dropped = [torch.where((ids < -1) | (ids >= SHAPE.num_experts), -1, ids) for ids in bad]
    return routing.Routing(bad, rt.topk_weights), routing.Routing(dropped, rt.topk_weights)


def test_bad_routing_ids_are_dropped_recorded_and_poison_that_rank_only():
    """validate="device" (the default): a rank's ids >= E and < -1 reach the device unchecked.
    Nothing is read or written with them on any rank (every plan, every received row and GEMM1
    equal the references with those slots dropped); that rank's output is NaN, the peer's is
    right; ``check_errors()`` raises RoutingError naming the rank, the token and the id."""
    R, seed = 2, 31
    placement = Placement.contiguous(SHAPE.num_experts, R)
    rt, dropped = plant_bad_ids(routing.uniform(R, T, SHAPE.num_experts, SHAPE.topk, seed=5), 1)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config())
        xs, inputs = layer_inputs(SHAPE, placement, rt, [0, 1], seed, "cpu")
        for r in range(R):
            poison(ws, r)
        ws.errors.after_call = lambda call: None  # the call returns, to show what it left
        handles = ws.run(*inputs, mode="layer")
        assert ws.plan_ws.mismatches(dropped.topk_ids) == {}
        assert check_calls(handles, xs, dropped.topk_ids, inputs[3], placement, "layer") == []
        ids0, w0 = dropped.topk_ids[0], dropped.topk_weights[0]
        assert check_layer_output(handles[0].out, xs[0], ids0, w0, SHAPE, seed, 0) == []
        assert handles[1].out.isnan().all(), "the failed call's output is poisoned"
        expected = rf"rank 1: call 1 routes token 3 \(slot k=1\) to expert {SHAPE.num_experts + 5}"
        with pytest.raises(RoutingError, match=expected):
            ws.check_errors()
        ws.check_errors()  # raised once, then cleared
        # the next good call computes again
        _, good = layer_inputs(SHAPE, placement, dropped, [0, 1], seed, "cpu")
        out = ws.run(*good, mode="layer")
        for r in range(R):
            ids, w = dropped.topk_ids[r], dropped.topk_weights[r]
            assert check_layer_output(out[r].out, xs[r], ids, w, SHAPE, seed, r) == []
        ws.close()


def test_a_bad_id_raises_no_later_than_the_next_call():
    """The layer raises once the device has run the bad call: here, where the device is the host,
    at the end of that call; on a GPU at the latest at the end of the next one. Calls made before
    it was raised are poisoned too and listed; calls after it compute again."""
    R = 2
    rt, dropped = plant_bad_ids(routing.uniform(R, T, SHAPE.num_experts, SHAPE.topk, seed=6), 0)
    w13, w2 = make_w13(SHAPE, 8, "cpu"), make_w2(SHAPE, 8, "cpu")
    xs = make_tokens(SHAPE, [T] * R, seed=9, device="cpu")
    x = dict(enumerate(xs))
    bad = dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    good = dict(enumerate(dropped.topk_ids)), dict(enumerate(dropped.topk_weights))
    with EmulatedWorld(R) as world:
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config())
        with pytest.raises(RoutingError, match=r"rank 0: call 1 routes token 3 .* expert 21"):
            layer(x, *bad)
        layer.check_errors()  # raised once
        # a host running ahead of its GPU makes calls before the alarm is up: those are NaN too
        checks = layer.workspace.errors.after_call
        layer.workspace.errors.after_call = lambda call: None
        outs = [layer(x, *bad), layer(x, *good), layer(x, *good)]
        layer.workspace.errors.after_call = checks
        assert all(out[0].isnan().all() and not out[1].isnan().any() for out in outs)
        with pytest.raises(RoutingError, match=r"call 2 routes .*\(calls 3-4 too, made before"):
            layer.check_errors()
        out = layer(x, *good)
        layer.check_errors()
        for r in range(R):
            ids, w = dropped.topk_ids[r], dropped.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids, w, SHAPE, 8, r) == []
        layer.close()


def test_lifecycle_and_input_errors_are_clear():
    """close() twice is fine; a call after close() says the layer is closed (and touches nothing
    freed); a non-positive capacity is refused; a non-tensor input, int weights and a bad id
    (validate="host") name the argument, the rank, the dtype and the value."""
    R = 2
    w13, w2 = make_w13(SHAPE, 2, "cpu"), make_w2(SHAPE, 2, "cpu")
    x = {r: torch.zeros(4, SHAPE.hidden) for r in range(R)}
    ids = {r: torch.zeros(4, SHAPE.topk, dtype=torch.int32) for r in range(R)}
    w = {r: torch.full((4, SHAPE.topk), 0.25) for r in range(R)}
    with EmulatedWorld(R) as world:
        for capacity in (0, -3):
            with pytest.raises(ValueError, match=f"capacity must be a positive .*{capacity}"):
                FusedEPMoE.from_dense(
                    world, SHAPE, w13, w2, config=small_config(), capacity=capacity
                )
        layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config(), validate="host")
        with pytest.raises(ValueError, match="x of rank 1 must be a torch.Tensor, got ndarray"):
            layer({0: x[0], 1: x[1].numpy()}, ids, w)
        with pytest.raises(
            ValueError, match="rank 0: topk_weights must be floating point, got torch.int64"
        ):
            layer(x, ids, {r: torch.ones(4, SHAPE.topk, dtype=torch.int64) for r in range(R)})
        bad = {0: ids[0], 1: ids[1] + SHAPE.num_experts}
        with pytest.raises(ValueError, match="rank 1: topk_ids has expert 16 but the layer has 16"):
            layer(x, bad, w)
        layer.close()
        layer.close()
        with pytest.raises(RuntimeError, match="this FusedEPMoE is closed"):
            layer(x, ids, w)
        ws = Megakernel(world, SHAPE, config=small_config())
        ws.close()
        with pytest.raises(RuntimeError, match="workspace is closed"):
            ws.run(x, ids, w, {r: w13[:8] for r in range(R)})


def test_a_dropped_layer_frees_its_buffers_without_the_cycle_collector():
    """Deleting a layer (after a call that raised on a bad id, so the error path's objects are
    built too) frees its workspace at once: no reference cycle keeps the buffers until Python's
    cyclic collector happens to run (it does not look at GPU memory; a benchmark building one
    large layer after another ran out of it)."""
    R = 2
    w13, w2 = make_w13(SHAPE, 2, "cpu"), make_w2(SHAPE, 2, "cpu")
    x = {r: torch.randn(4, SHAPE.hidden) for r in range(R)}
    ids = {r: torch.zeros(4, SHAPE.topk, dtype=torch.int32) for r in range(R)}
    w = {r: torch.full((4, SHAPE.topk), 0.25) for r in range(R)}
    collecting = gc.isenabled()
    gc.disable()
    try:
        with EmulatedWorld(R) as world:
            layer = FusedEPMoE.from_dense(world, SHAPE, w13, w2, config=small_config())
            layer(x, ids, w)
            with pytest.raises(RoutingError):  # at this call or, at the latest, the check
                layer(x, {0: ids[0], 1: ids[1] + SHAPE.num_experts}, w)
                layer.check_errors()
            alive = weakref.ref(layer.workspace)
            layer.close()
            del layer
            assert alive() is None, "a reference cycle holds the dropped layer's workspace"
    finally:
        if collecting:
            gc.enable()
