"""The dispatch + GEMM1 megakernel under the interpreter, EmulatedWorld, phase by phase.

Dispatch is checked bit for bit against dispatch_ref, the GEMM against expert_act_ref; every
output is poisoned first. The edge-case routings run in mode "layer" (tests/cpu/test_layer.py),
which checks the same two outputs and the layer's.
"""

import itertools

import pytest
import torch
from triton._C.libtriton import native_specialize_impl as specialize
from triton.backends.nvidia.compiler import CUDABackend

from megakernel import KernelConfig, Megakernel, dispatch_gemm, routing
from megakernel.descriptors import WeightDescriptors
from megakernel.placement import Placement
from megakernel.shapes import PRESETS, MoEShape
from megakernel.testing import check_calls, make_tokens, make_w13, poison, run_poisoned
from symm_mem import CapacityError, EmulatedWorld

SHAPE = PRESETS["small"]  # H 64, I 32, E 16, K 4, fp32
T = 21  # not a multiple of the tile (16) or the chunk (4)
SWITCHES = list(itertools.product([True, False], repeat=3))


def small_config(token_saving=True, sorted_dispatch=True, per_tile_flags=True, **kw):
    knobs = dict(block_m=16, block_n=16, block_k=16, block_h=32, chunk=4, down_block_k=16)
    knobs.update(kw)
    return KernelConfig(
        token_saving=token_saving,
        sorted_dispatch=sorted_dispatch,
        per_tile_flags=per_tile_flags,
        **knobs,
    )


def call_and_check(ws, rt, placement, mode, seed, shape=SHAPE, swiglu=True):
    xs = make_tokens(shape, [ids.shape[0] for ids in rt.topk_ids], seed, "cpu")
    w13 = make_w13(shape, seed, "cpu")
    w_local = {r: placement.local_weights(w13, r) for r in ws.world.local_ranks}
    handles = run_poisoned(ws, xs, rt.topk_ids, w_local, mode, rt.topk_weights)
    assert check_calls(handles, xs, rt.topk_ids, w_local, placement, mode, swiglu) == []
    return handles


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("token_saving,sorted_dispatch,per_tile_flags", SWITCHES)
def test_every_switch_combination(R, token_saving, sorted_dispatch, per_tile_flags):
    rt = routing.drop(routing.zipf(R, T, SHAPE.num_experts, SHAPE.topk, 1.2, seed=R), 0.2, R)
    placement = Placement.contiguous(SHAPE.num_experts, R)
    cfg = small_config(token_saving, sorted_dispatch, per_tile_flags)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=cfg)
        call_and_check(ws, rt, placement, "dispatch", seed=1)
        call_and_check(ws, rt, placement, "gemm", seed=2)


@pytest.mark.parametrize("R", [4])
def test_pack_scan_resolves_rows_in_place_with_the_same_activations(R):
    """pack="scan": GEMM1 reads its rows in place after column block 0 copied the token-saving
    references there; the activations equal pack="gather"'s bit for bit (same rows, same dots)."""
    rt = routing.zipf(R, T, SHAPE.num_experts, SHAPE.topk, 1.2, seed=10 + R)
    placement = Placement.contiguous(SHAPE.num_experts, R)
    acts = {}
    for pack in ("gather", "scan"):
        with EmulatedWorld(R) as world:
            ws = Megakernel(world, SHAPE, config=small_config(pack=pack))
            assert ws.config.gather_a() == (pack == "gather")
            handles = call_and_check(ws, rt, placement, "gemm", seed=3)
            acts[pack] = [handles[r].act[: handles[r].num_recv()] for r in range(R)]
            in_place = [
                torch.equal(h.recv_x[: h.num_recv()], h.resolved()) for h in handles.values()
            ]
            # gather leaves the references unresolved (poisoned) on some rank; scan on none
            assert all(in_place) == (pack == "scan")
    assert all(torch.equal(a, b) for a, b in zip(acts["gather"], acts["scan"], strict=True))


def test_pack_mode_validation_and_auto_choice():
    assert KernelConfig().gather_a()  # the sweep's answer for pack + GEMM: gather
    for bad in ("sort", "atomic", "Gather"):
        with pytest.raises(ValueError, match="KernelConfig.pack must be one of"):
            KernelConfig(pack=bad)


def test_fp16_without_swiglu_and_few_dispatch_programs():
    R = 2
    shape = SHAPE.__class__(64, 32, 8, 2, 100, torch.float16)
    rt = routing.uniform(R, T, shape.num_experts, shape.topk, seed=5)
    placement = Placement.contiguous(shape.num_experts, R)
    cfg = small_config(dispatch_ctas=1, num_ctas=2, copy_stages=3)  # pipelined row copies
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=cfg, swiglu=False, combine=False)
        assert ws.act[0].shape == (ws.capacity, 2 * shape.ffn)
        call_and_check(ws, rt, placement, "gemm", seed=6, shape=shape, swiglu=False)


@pytest.mark.parametrize("swiglu,tma", [(True, True), (False, True), (False, False)])
def test_gemm_mode_with_tail_rows(swiglu, tma):
    """Mode "gemm" with ``tail_rows``: a tile holding an expert's tail (up to 8 rows past 16)
    writes the tail's activations from its swapped products too, with SwiGLU or the raw
    ``x @ w13^T``, w13 by TMA or by pointers, against expert_act_ref."""
    R = 2
    shape = SHAPE.__class__(64, 32, 8, 2, 100, torch.float16)
    rt = routing.uniform(R, [40] * R, shape.num_experts, shape.topk, seed=12)  # tails of 2-8
    placement = Placement.contiguous(shape.num_experts, R)
    cfg = small_config(tail_rows=8, gemm1_tma=tma)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, shape, config=cfg, swiglu=swiglu, combine=False)
        assert ws.meta("gemm").TAIL_ROWS == 8
        call_and_check(ws, rt, placement, "gemm", seed=6, shape=shape, swiglu=swiglu)
        tiles = torch.cat([ws.plan_ws.plan(r).tiles for r in range(R)])
        assert (tiles[:, 2] > 16).any()


def test_back_to_back_calls_alternate_buffers():
    R = 2
    placement = Placement.contiguous(SHAPE.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config())
        parities = []
        for call in range(3):
            rt = routing.zipf(R, [T, T - 2 * call], SHAPE.num_experts, SHAPE.topk, call, call)
            handles = call_and_check(ws, rt, placement, "gemm", seed=10 + call)
            parities.append(handles[0].recv_x.data_ptr())
            assert handles[0].epoch == call + 1
        assert parities[0] == parities[2] != parities[1], "calls alternate the receive buffers"
        assert ws.state["counters"][0].tolist() == [0, 0, 0], (
            "the last program out reset the counters"
        )


def test_sends_stage_puts_the_same_rows_again():
    """stage="sends" (the benchmark's data movement alone) reruns the last call's dispatch tasks:
    without a plan it refuses; after one, the data rows come back into poisoned buffers."""
    R = 2
    rt = routing.uniform(R, T, SHAPE.num_experts, SHAPE.topk, seed=9)
    placement = Placement.contiguous(SHAPE.num_experts, R)
    x = make_tokens(SHAPE, [T] * R, 9, "cpu")
    w13 = {r: placement.local_weights(make_w13(SHAPE, 9, "cpu"), r) for r in range(R)}
    args = (dict(enumerate(x)), dict(enumerate(rt.topk_ids)), None, w13)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config())
        with pytest.raises(ValueError, match="make a full call first"):
            ws.run(*args, stage="sends")
        handles = ws.run(*args)
        ws.check_errors()
        want = {r: h.snapshot() for r, h in handles.items()}
        for r in range(R):
            ws.sym["recv_x"].peer(r).fill_(float("nan"))
        again = ws.run(*args, stage="sends")
        ws.check_errors()
        for r in range(R):
            n = want[r].num_recv()
            data = want[r].recv_src[:n].long().unique()  # the rows that carry a token's data
            assert again[r].epoch == want[r].epoch, "a rerun: same epoch, same buffers"
            assert torch.equal(again[r].recv_x[data], want[r].recv_x[data])


def test_overflow_raises_on_every_rank_and_dispatches_nothing():
    """The call raises (here, where the device is the host, as soon as it was launched); both
    ranks hold the record, nothing was dispatched, and the record stays until ``reset()``."""
    R = 2
    rt = routing.all_to_one_rank(R, T, SHAPE.num_experts, SHAPE.topk, dst=1, seed=0)
    placement = Placement.contiguous(SHAPE.num_experts, R)
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config(), capacity=50)  # needs 168 rows
        for r in range(R):
            poison(ws, r)
        x = make_tokens(SHAPE, [T] * R, 0, "cpu")
        w13 = placement.local_weights(make_w13(SHAPE, 0, "cpu"), 0)
        args = dict(enumerate(x)), dict(enumerate(rt.topk_ids)), None, {0: w13, 1: w13}
        with pytest.raises(
            CapacityError, match="call 1: rank 1 would receive 168 rows .*holds 50.*capacity="
        ):
            ws.run(*args)
        records = torch.stack([world.error_record(r).clone() for r in range(R)])
        assert records[:, 0].tolist() == [2, 2], "both ranks report the overflow"
        assert ws.sym["recv_x"].peer(1).isnan().all(), "nothing was dispatched"
        with pytest.raises(CapacityError, match="until reset()"):
            ws.check_errors()
        ws.reset()
        ws.check_errors()


def test_input_validation():
    R = 2
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=small_config())
        ids = torch.zeros(4, SHAPE.topk, dtype=torch.int32)
        x = torch.zeros(4, SHAPE.hidden)
        w13 = torch.zeros(8, 2 * SHAPE.ffn, SHAPE.hidden)
        bad = {
            r"x has shape \(4, 63\)": dict(x=torch.zeros(4, 63)),
            "rank 0: x is torch.float16 but the layer is torch.float32": dict(x=x.half()),
            r"w13 has shape \(7, 64, 64\), expected \(8, 64, 64\)": dict(w13=w13[:7]),
            "topk_weights has shape": dict(weights=torch.zeros(4, 3)),
            # the id range is read back only with validate="host" (else checked on the device)
            "expert 16 but the layer has 16 experts": dict(ids=ids + 16, validate="host"),
            "validate must be one of": dict(validate="always"),
        }
        for message, change in bad.items():
            args = dict(x=x, ids=ids, weights=None, w13=w13, validate="device") | change
            with pytest.raises(ValueError, match=message):
                ws.run(
                    {r: args["x"] for r in range(R)},
                    {r: args["ids"] for r in range(R)},
                    {r: args["weights"] for r in range(R)},
                    {r: args["w13"] for r in range(R)},
                    validate=args["validate"],
                )
        with pytest.raises(ValueError, match="runs one rank"):
            dispatch_gemm(x, ids, None, w13, workspace=ws)
        with pytest.raises(ValueError, match="mode must be one of"):
            ws.run({}, {}, None, {}, mode="combine")
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        KernelConfig(chunk=3)
    for promote in (16, 256, -1):
        with pytest.raises(ValueError, match="fp8_promote_k must be"):
            KernelConfig(fp8_promote_k=promote)
    with EmulatedWorld(1) as world, pytest.raises(ValueError, match="not a multiple of block_k"):
        Megakernel(world, SHAPE, config=small_config(block_k=128))
    fp16 = SHAPE.__class__(64, 32, 8, 2, 100, torch.float16)
    with EmulatedWorld(1) as world, pytest.raises(ValueError, match="TMA needs a multiple of 16"):
        Megakernel(world, fp16, config=small_config(block_k=4))  # 8-byte rows
    with EmulatedWorld(1) as world, pytest.raises(ValueError, match="down_tma loads w2 in rows"):
        Megakernel(world, fp16, config=small_config(down_block_k=4))
    with EmulatedWorld(1) as world:
        Megakernel(world, fp16, config=small_config(block_k=4, gemm1_tma=False)).close()


@pytest.mark.parametrize("fp8", [False, True])
def test_warmup_stand_ins_hold_one_row_of_weights(fp8):
    """``warmup()`` without inputs compiles for stand-ins: expert weights of the layer's full
    shape that hold one row each (a view, not a second copy of the experts), from which the
    TMA descriptors come out as from real weights: same shapes, same boxes. (That the kernel
    compiled for them is the one a real call launches: tests/gpu/test_dispatch_gemm_cuda.py.)"""
    if fp8:  # H and I whole scale blocks; the FP8 path's tiles
        shape, cfg = MoEShape(256, 128, 8, 2, 24, fp8=True), KernelConfig.interpreter()
    else:
        # (with tails: the tail tiles' descriptor too)
        shape = MoEShape(64, 32, 16, 4, 24, torch.bfloat16)
        cfg = small_config(block_k=32, tail_rows=8)
    with EmulatedWorld(1) as world:
        ws = Megakernel(world, shape, config=cfg)
        L, H, I = shape.num_experts, shape.hidden, shape.ffn
        stand_in = ws._dummy_inputs()
        assert stand_in.w13.shape == (L, 2 * I, H) and stand_in.w2.shape == (L, H, I)
        item = shape.gemm_dtype.itemsize
        assert stand_in.w13.untyped_storage().nbytes() == H * item
        assert stand_in.w2.untyped_storage().nbytes() == I * item
        real = (
            make_w13(shape, 0, "cpu").to(shape.gemm_dtype),
            torch.zeros(L, H, I).to(shape.gemm_dtype),
        )
        meta = ws.meta("layer")
        assert meta.GEMM1_TMA and meta.DOWN_TMA
        made = WeightDescriptors(shape, ws.config)
        stand_in_args = [stand_in.w13, stand_in.w2, *made._make(meta, stand_in.w13, stand_in.w2)]
        real_args = [*real, *made._make(meta, *real)]
        assert [a is None for a in stand_in_args] == [b is None for b in real_args]
        assert (stand_in_args[3] is None) == (meta.TAIL_ROWS == 0)
        for a, b in zip(stand_in_args[2:], real_args[2:], strict=True):
            if a is None:
                continue
            assert list(a.shape) == list(b.shape) and list(a.block_shape) == list(b.block_shape)
        # what Triton's JIT keys a compiled variant on, argument by argument (the CUDA backend's
        # specialisation: a tensor's dtype and 16-byte alignment, a descriptor's dtype and box)
        keys = [[specialize(CUDABackend, a, False, True, True) for a in args]
                for args in (stand_in_args, real_args)]  # fmt: skip
        assert keys[0] == keys[1]
        ws.close()
