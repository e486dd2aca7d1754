"""The whole MoE layer on one GPU: EmulatedWorld(R, "cuda"), bf16, against moe_ref (and dispatch
and GEMM1 against their references), one- and two-kernel modes, CUDA graphs, repeatability."""

import time
from dataclasses import replace

import pytest
import torch

from megakernel import FusedEPMoE, KernelConfig, Megakernel, routing
from megakernel.placement import Placement
from megakernel.shapes import PRESETS, MoEShape
from megakernel.testing import (
    check_calls,
    check_layer_output,
    compare_layer_output,
    layer_inputs,
    layer_ref,
    local_w2,
    local_w13,
    make_biases,
    make_tokens,
    make_w2,
    make_w13,
    poison,
    run_layer_checked,
)
from megakernel.validate import RoutingError
from symm_mem import DeviceCallError, EmulatedWorld, WaitTimeoutError

pytestmark = pytest.mark.gpu

MEDIUM = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=700)


def layer_call(ws, rt, placement, seed, split, shape=MEDIUM):
    _, problems = run_layer_checked(ws, rt, placement, seed, shape, "cuda", split=split)
    assert problems == []


def layer_cases(ws, cases):
    """Checked one-kernel layer calls of ``ws`` (MEDIUM), one per routing case, back to back."""
    R = ws.world.world_size
    for seed, case in enumerate(cases):
        rt, pl = routing.edge_case(case, R, 700 - seed, MEDIUM.num_experts, MEDIUM.topk, seed)
        layer_call(ws, rt, pl or Placement.contiguous(MEDIUM.num_experts, R), seed, False)


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("split", [False, True])
def test_layer_emulated_ranks(R, split):
    with EmulatedWorld(R, "cuda") as world:
        for seed, case in enumerate(["uniform", "zipf", "dropped", "ragged", "replicated"]):
            rt, pl = routing.edge_case(case, R, 700 - seed, MEDIUM.num_experts, MEDIUM.topk, seed)
            pl = pl or Placement.contiguous(MEDIUM.num_experts, R)
            ws = Megakernel(world, MEDIUM, placement=pl)
            layer_call(ws, rt, pl, seed, split)
            ws.close()


@pytest.mark.parametrize("R", [2, 8])
@pytest.mark.parametrize("lag", [3, 0])
def test_layer_column_groups_with_the_reduce_mixed_in(R, lag):
    """H 1024 in four column groups of 256 (MEDIUM's default is one group), the reduce of each
    mixed into the next group's down tasks after ``lag`` of them, calls back to back."""
    cfg = KernelConfig(reduce_h=256, down_block_n=128, reduce_lag=lag)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=cfg)
        assert ws.sym["combine_count"].shape[0] == 4
        layer_cases(ws, ["uniform", "zipf", "dropped"])
        ws.close()


@pytest.mark.parametrize("R", [2, 4])
def test_layer_pointer_loads_and_pipelined_dispatch_copy(R):
    """The paths off by default: both GEMMs' weights by pointer loads instead of TMA, and the
    dispatch copy pipelined over its 4 column steps (3 stages); dispatch still bit for bit."""
    cfg = KernelConfig(gemm1_tma=False, down_tma=False, copy_stages=3, block_h=256)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=cfg)
        layer_cases(ws, ["uniform", "zipf", "ragged"])
        ws.close()


@pytest.mark.parametrize("R", [1, 4])
def test_layer_gemm1_as_two_products(R):
    """KernelConfig(gemm1_pairs=False): GEMM1 makes gate and up as two BN-wide products instead
    of one 2BN-wide product; calls back to back, and the module."""
    cfg = KernelConfig(gemm1_pairs=False)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=cfg)
        layer_cases(ws, ["uniform", "zipf", "dropped"])
        ws.close()
        w13, w2 = make_w13(MEDIUM, 3, "cuda"), make_w2(MEDIUM, 3, "cuda")
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2, config=cfg)
        rt = routing.zipf(R, 600, MEDIUM.num_experts, MEDIUM.topk, 1.1, seed=4).to("cuda")
        xs = make_tokens(MEDIUM, [600] * R, 5, "cuda")
        ids, weights = dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
        out = layer({r: xs[r] for r in range(R)}, ids, weights)
        layer.check_errors()
        for r in range(R):
            assert check_layer_output(out[r], xs[r], ids[r], weights[r], MEDIUM, 3, r) == []
        layer.close()


@pytest.mark.parametrize("R", [1, 4])
def test_layer_pack_scan(R):
    """KernelConfig(pack="scan"): GEMM1 reads rows resolved in place (R = 1: K - 1 of every
    token's K rows are token-saving references), back to back without a sync."""
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=KernelConfig(pack="scan"))
        layer_cases(ws, ["uniform", "zipf", "one_expert"])
        ws.close()


@pytest.mark.parametrize("R, pack", [(1, "auto"), (4, "auto"), (1, "scan")])
def test_layer_gemm1_groups(R, pack):
    """KernelConfig(gemm1_group=8): GEMM1's tasks column block major over up to eight tiles of
    one expert (one_expert gives one expert every tile), back to back without a sync."""
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=KernelConfig(gemm1_group=8, pack=pack))
        layer_cases(ws, ["uniform", "zipf", "one_expert"])
        ws.close()


@pytest.mark.parametrize("R", [1, 4])
def test_layer_full_height_tiles(R):
    """KernelConfig(half_tiles=False): every tile at full height, an expert's half-empty last one
    too (the default runs those at half the height), back to back without a sync."""
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=KernelConfig(half_tiles=False))
        assert not ws.meta("layer").HALF_TILES
        layer_cases(ws, ["uniform", "zipf", "ragged"])
        ws.close()


TAILED = MoEShape(hidden=1024, ffn=512, num_experts=16, topk=4, max_tokens_per_rank=600)


@pytest.mark.parametrize("R,case", [(1, "uniform"), (4, "zipf")])
@pytest.mark.parametrize("experts", ["silu", "swigluoai+bias"])
def test_layer_tail_rows(R, case, experts):
    """KernelConfig(tail_rows=32): an expert's last rows, up to 32 past a full tile, run as the
    swapped tail products of the tile before (150 rows an expert at R = 1, uniform: most of the
    16 experts have such a tail; zipf at R = 4: some), plain or gpt-oss's experts, one kernel
    and two, against the references."""
    shape = TAILED if experts == "silu" else replace(TAILED, activation="swigluoai", bias=True)
    rt, pl = routing.edge_case(case, R, 600, shape.num_experts, shape.topk, 3)
    rows = torch.bincount(torch.cat(rt.topk_ids).flatten().cpu(), minlength=shape.num_experts)
    tails = (rows > 128) & (rows - (rows - 1) // 128 * 128 <= 32)
    assert tails.any(), rows.tolist()
    pl = pl or Placement.contiguous(shape.num_experts, R)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, shape, placement=pl, config=KernelConfig(tail_rows=32))
        assert ws.meta("layer").TAIL_ROWS == 32
        for split in (False, True):
            layer_call(ws, rt, pl, 5, split, shape=shape)
        ws.close()


GPT_OSS_LIKE = MoEShape(1024, 512, 64, 6, 700, activation="swigluoai", bias=True)


@pytest.mark.parametrize("R", [1, 4])
def test_layer_gpt_oss_experts(R):
    """gpt-oss's experts (``activation="swigluoai"``, ``bias=True``; the test biases put some
    gate and up values past the clamps): dispatch, GEMM1 with b13 and the clamped activation,
    the down projection with b2, one kernel and two, against the references."""
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, GPT_OSS_LIKE)
        for seed, (case, split) in enumerate([("uniform", False), ("zipf", True)]):
            E, K = GPT_OSS_LIKE.num_experts, GPT_OSS_LIKE.topk
            rt, pl = routing.edge_case(case, R, 700 - seed, E, K, seed)
            layer_call(ws, rt, pl or Placement.contiguous(E, R), seed, split, GPT_OSS_LIKE)
        ws.close()


def test_gpt_oss_experts_keep_a_nan_token_nan():
    """A NaN token comes out NaN through the clamps (``min.NaN``: a plain ``min`` would return
    the bound, and the token would come out finite and wrong); the other tokens are right."""
    R, seed, shape = 1, 3, GPT_OSS_LIKE
    rt = routing.uniform(R, [500], shape.num_experts, shape.topk, seed=seed).to("cuda")
    x = make_tokens(shape, [500], seed, "cuda")[0]
    x[17] = float("nan")
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(
            world, shape, make_w13(shape, seed, "cuda"), make_w2(shape, seed, "cuda"),
            **make_biases(shape, seed, "cuda"),
        )  # fmt: skip
        out = layer(x, rt.topk_ids[0], rt.topk_weights[0])
        layer.check_errors()
        assert out[17].isnan().all()
        good = torch.ones(500, dtype=torch.bool, device="cuda")
        good[17] = False
        want = layer_ref(x, rt.topk_ids[0], rt.topk_weights[0], shape, seed)
        assert compare_layer_output(out[good], want[good], shape.dtype, 0) == []
        layer.close()


def test_layer_phase_by_phase_on_the_gpu():
    """The CPU tests' launch order, on the GPU: isolates a race from a missing signal."""
    R = 4
    rt = routing.zipf(R, 500, MEDIUM.num_experts, MEDIUM.topk, 1.2, seed=2)
    pl = Placement.contiguous(MEDIUM.num_experts, R)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM)
        _, problems = run_layer_checked(ws, rt, pl, 2, MEDIUM, "cuda", overlap=False)
        assert problems == []


def test_module_back_to_back_graph_and_repeatability():
    """20 calls without a host sync, then a CUDA graph of one call replayed on 20 new inputs;
    every output checked, and a repeated call equal bit for bit."""
    R, T, seed = 4, 512, 5
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    cases = []
    for i in range(20):
        rt = routing.zipf(R, T, MEDIUM.num_experts, MEDIUM.topk, 0.3 * (i % 4), seed=i).to("cuda")
        cases.append((make_tokens(MEDIUM, [T] * R, 100 + i, "cuda"), rt))

    def args(i):
        xs, rt = cases[i]
        return dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))

    # each case's reference once: the eager calls and the graph replays are checked against it
    wants = [
        [layer_ref(xs[r], rt.topk_ids[r], rt.topk_weights[r], MEDIUM, seed) for r in range(R)]
        for xs, rt in cases
    ]

    def check(i, outs):
        for r in range(R):
            assert compare_layer_output(outs[r], wants[i][r], MEDIUM.dtype, r) == [], f"call {i}"

    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2)
        outs = [layer(*args(i)) for i in range(20)]  # no sync in between
        layer.check_errors()
        for i, o in enumerate(outs):
            check(i, o)
        again = layer(*args(19))
        assert all(torch.equal(again[r], outs[19][r]) for r in range(R)), "bitwise repeatable"

        static = [{r: t.clone() for r, t in d.items()} for d in args(0)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = layer(*static)
        for i in range(20):
            for dst, src in zip(static, args(i), strict=True):
                for r in range(R):
                    dst[r].copy_(src[r])
            graph.replay()
            check(i, {r: t.clone() for r, t in graph_out.items()})
        layer.check_errors()
        layer.close()


@pytest.mark.parametrize("captured", [False, True])
def test_first_call_compiles_for_its_own_inputs(captured):
    """A layer's first call compiles the megakernel for its own inputs, with no stand-in copy of
    the experts: its peak memory stays far under one rank's weights, whether it runs eagerly or
    is captured in a CUDA graph before any eager call (a stand-in allocated there stayed in the
    graph's memory pool, and its zero fill replayed with the graph). The captured call's replays
    are checked."""
    R, T, seed = 2, 300, 9
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    rank_weights = (w13.numel() + w2.numel()) * w13.element_size() // R
    xs = make_tokens(MEDIUM, [T] * R, 40, "cuda")
    rt = routing.uniform(R, T, MEDIUM.num_experts, MEDIUM.topk, seed=41).to("cuda")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2, graphs=False)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if captured:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = layer(*args)
            graph.replay()
            graph.replay()
        else:
            outs = layer(*args)
        torch.cuda.synchronize()
        grown = torch.cuda.max_memory_allocated() - before
        assert grown < rank_weights // 4, (
            f"first call took {grown} bytes, a rank's experts {rank_weights}"
        )
        layer.check_errors()
        for r in range(R):
            want = layer_ref(xs[r], rt.topk_ids[r], rt.topk_weights[r], MEDIUM, seed)
            assert compare_layer_output(outs[r], want, MEDIUM.dtype, r) == []
        layer.close()


BIG_GPU = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 120e9


@pytest.mark.skipif(not BIG_GPU, reason="2 full-size ranks at T = 32768 need an H200's memory")
@pytest.mark.parametrize("name", ["dsv3", "qwen3_235b", "mixtral"])
def test_presets_at_32768_tokens_per_rank(name):
    """Two emulated ranks at the presets' full size: dsv3's receive buffer then holds 524288
    rows of 7168, past 2**31 elements, so every row offset must be 64-bit."""
    R, T, seed = 2, 32768, 1
    shape = PRESETS[name].with_tokens(T)
    placement = Placement.contiguous(shape.num_experts, R)
    rt = routing.uniform(R, T, shape.num_experts, shape.topk, seed).to("cuda")
    xs = make_tokens(shape, [T] * R, seed, "cuda")
    with EmulatedWorld(R, "cuda") as world:
        w13 = {r: local_w13(shape, placement, r, seed, "cuda") for r in range(R)}
        w2 = {r: local_w2(shape, placement, r, seed, "cuda") for r in range(R)}
        layer = FusedEPMoE(world, shape, w13, w2, placement=placement)
        for r in range(R):  # poison: a row the layer never writes cannot pass
            layer.workspace.sym["combine_y"].peer(r).fill_(float("nan"))
        ids = {r: rt.topk_ids[r] for r in range(R)}
        out = layer({r: xs[r] for r in range(R)}, ids, {r: rt.topk_weights[r] for r in range(R)})
        layer.check_errors()
        for r in range(R):
            weights = rt.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids[r], weights, shape, seed, r) == []
        layer.close()


@pytest.mark.parametrize("R", [2, 4])
def test_bad_routing_ids_are_dropped_and_poison_their_rank(R):
    """Ids >= E and < -1 planted on rank 1 reach the device unchecked (validate="device"): every
    received row and GEMM1 equal the references with those slots dropped, rank 1's output is
    NaN, the others' are right, and RoutingError names rank 1, token 3 and the id."""
    seed, E = 3, MEDIUM.num_experts
    placement = Placement.contiguous(E, R)
    rt = routing.uniform(R, 700, E, MEDIUM.topk, seed=seed)
    bad = [ids.clone() for ids in rt.topk_ids]
    bad[1][3, 1], bad[1][7, 0] = E + 5, -4
    dropped = [torch.where((ids < -1) | (ids >= E), -1, ids) for ids in bad]
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, placement=placement)
        xs, inputs = layer_inputs(
            MEDIUM,
            placement,
            routing.Routing(bad, rt.topk_weights).to("cuda"),
            world.local_ranks,
            seed,
            "cuda",
        )
        for r in world.local_ranks:
            poison(ws, r)
        ws.errors.after_call = lambda call: None  # the call returns, to show what it left
        handles = ws.run(*inputs, mode="layer")
        dev_dropped = [ids.cuda() for ids in dropped]
        assert check_calls(handles, xs, dev_dropped, inputs[3], placement, "layer") == []
        for r in world.local_ranks:
            out = handles[r].out
            if r == 1:
                assert out.isnan().all()
            else:
                w = rt.topk_weights[r].cuda()
                assert check_layer_output(out, xs[r], dev_dropped[r], w, MEDIUM, seed, r) == []
        with pytest.raises(RoutingError, match=rf"rank 1: call 1 routes token 3 .* expert {E + 5}"):
            ws.check_errors()
        ws.close()


@pytest.mark.parametrize("R", [1, 2])
def test_module_replays_calls_of_a_t_seen_before(R):
    """FusedEPMoE(graphs=True), the default: a (T, weights) key seen a second time is captured,
    later calls replay it; T changes between calls; every output equals moe_ref and is a fresh
    tensor; a bad id on a replayed call still poisons that rank and raises."""
    E, seed = MEDIUM.num_experts, 4
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2)
        outs = []
        for i, T in enumerate([700, 700, 700, 500, 700, 500, 500]):
            rt = routing.uniform(R, T, E, MEDIUM.topk, seed=i).to("cuda")
            xs = make_tokens(MEDIUM, [T] * R, seed=100 + i, device="cuda")
            ids, w = dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
            out = layer(dict(enumerate(xs)), ids, w)
            layer.check_errors()
            for r in range(R):
                assert check_layer_output(out[r], xs[r], ids[r], w[r], MEDIUM, seed, r) == []
            outs.append(out[0])
        assert len(layer.graphs.graphs) == 2, "T 700 and T 500 were each seen twice"
        assert len({o.data_ptr() for o in outs}) == len(outs), "a fresh output every call"
        bad = dict(ids)
        bad[0] = ids[0].clone()
        bad[0][3, 1] = E + 2
        layer.workspace.errors.after_call = lambda call: None  # (the GPU may be done already)
        out = layer(dict(enumerate(xs)), bad, w)  # T 500: replayed
        assert out[0].isnan().all()
        with pytest.raises(RoutingError, match=rf"rank 0: .* token 3 .* expert {E + 2}"):
            layer.check_errors()
        layer.close()


def _missing_peer_case() -> None:
    """Rank 1 skips call 2 (see the test below); prints each step, so a stall names its step,
    and every thread's Python stack if the case has not ended after 60 s."""
    import faulthandler

    faulthandler.dump_traceback_later(60, exit=True)
    R, timeout, seed, T = 2, 1.0, 5, 700
    E = MEDIUM.num_experts
    t0 = time.monotonic()

    def step(what: str) -> None:
        print(f"missing peer, {time.monotonic() - t0:6.1f} s: {what}", flush=True)

    rt = routing.uniform(R, T, E, MEDIUM.topk, seed=seed).to("cuda")
    xs = make_tokens(MEDIUM, [T] * R, seed=seed, device="cuda")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    w13, w2 = make_w13(MEDIUM, seed, "cuda"), make_w2(MEDIUM, seed, "cuda")
    with EmulatedWorld(R, "cuda", timeout_s=timeout) as world:
        layer = FusedEPMoE.from_dense(world, MEDIUM, w13, w2, graphs=False)
        ws = layer.workspace
        weights = {r: layer.w13[str(r)] for r in range(R)}, {r: layer.w2[str(r)] for r in range(R)}
        layer(*args)
        layer.check_errors()
        step("call 1 done (compiled)")
        launch_all = world.run_ranks
        world.run_ranks = lambda launch: launch(0)  # rank 1 never makes call 2
        outs = {r: torch.zeros_like(xs[r]) for r in range(R)}
        start = time.monotonic()
        with pytest.raises(WaitTimeoutError, match="call 2: rank 0 timed out after 1 s"):
            ws.run(*args, *weights, out=outs, mode="layer")
            layer.check_errors()
        assert time.monotonic() - start < timeout + 1
        assert outs[0].isnan().all(), "the failed call's output is NaN"
        step("call 2 failed in time")
        world.run_ranks = launch_all
        with pytest.raises(DeviceCallError, match="call 3 was skipped: call 2 failed"):
            layer(*args)
        step("call 3 raised")
        layer.reset()
        step("reset")
        out = layer(*args)
        layer.check_errors()
        step("call 4 done")
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            assert check_layer_output(out[r], xs[r], ids, w, MEDIUM, seed, r) == []
        layer.close()


def test_a_missing_peer_fails_the_call_in_time_and_reset_recovers():
    """Rank 1 skips a call: rank 0's call fails within timeout_s + 1 s (every program leaves once
    one wait has failed), its output NaN; a later call is skipped and raises; ``reset()`` brings
    the ranks back in step and the next call equals moe_ref. In a process of its own, bounded:
    the test is about hangs, so one must fail it rather than hold the suite."""
    from _bounded import run_bounded

    run_bounded(_missing_peer_case, seconds=90, what="the missing-peer case (see its last step)")
