"""The dispatch + GEMM1 megakernel on one GPU: EmulatedWorld(R, "cuda"), bf16, against the refs."""

import itertools

import pytest
import torch

from megakernel import KernelConfig, Megakernel, routing
from megakernel.kernel import moe_megakernel
from megakernel.placement import Placement
from megakernel.shapes import PRESETS, MoEShape
from megakernel.testing import (
    check_call,
    check_calls,
    make_tokens,
    make_w13,
    run_layer_checked,
    run_poisoned,
)
from symm_mem import CapacityError, EmulatedWorld

pytestmark = pytest.mark.gpu

MEDIUM = MoEShape(hidden=1024, ffn=512, num_experts=64, topk=6, max_tokens_per_rank=700)


def call(ws, rt, placement, w13, xs, mode, overlap=None):
    w_local = {r: placement.local_weights(w13, r) for r in ws.world.local_ranks}
    handles = run_poisoned(ws, xs, rt.topk_ids, w_local, mode, rt.topk_weights, overlap=overlap)
    return handles, w_local


def check(ws, rt, placement, seed, mode="gemm", overlap=None, shape=MEDIUM):
    xs = make_tokens(shape, [ids.shape[0] for ids in rt.topk_ids], seed, "cuda")
    w13 = make_w13(shape, seed, "cuda")
    rt = rt.to("cuda")
    handles, w_local = call(ws, rt, placement, w13, xs, mode, overlap)
    assert check_calls(handles, xs, rt.topk_ids, w_local, placement, mode) == []


@pytest.mark.parametrize("mode", ["dispatch", "gemm", "layer"])
def test_warmup_compiles_the_variant_every_call_launches(mode):
    """After ``warmup(mode)`` a call of that mode compiles nothing more: a kernel compiled at
    launch would run while peers already spin. ``warmup`` compiles for stand-ins holding one
    row of weights, so it allocates far less than a rank's experts. (A shape no other test
    uses, so the variants are not in the cache already.)"""
    shape = MoEShape(hidden=512, ffn=256, num_experts=16, topk=4, max_tokens_per_rank=300)
    R = 2
    placement = Placement.contiguous(shape.num_experts, R)
    rt = routing.uniform(R, 300, shape.num_experts, shape.topk, seed=7)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, shape)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ws.warmup(mode)
        grown = torch.cuda.max_memory_allocated() - allocated
        rank_weights = placement.slots_per_rank * 3 * shape.ffn * shape.hidden * 2
        assert grown < rank_weights // 8, f"warmup took {grown} bytes, experts {rank_weights}"
        compiled = moe_megakernel.device_caches[torch.cuda.current_device()][0]
        before = len(compiled)
        if mode == "layer":
            _, problems = run_layer_checked(ws, rt, placement, 7, shape, "cuda")
            assert problems == []
        else:
            check(ws, rt, placement, 7, mode, shape=shape)
        assert len(compiled) == before, "the call compiled a variant warmup did not"
        ws.close()


def test_dispatch_mode_with_more_programs_than_sms():
    """Mode "dispatch" runs several programs per SM by default where a rank has its own GPU;
    the resolve tasks still find every row (a task only waits on tasks claimed before it).
    Ranks that share one GPU keep their SM share and refuse more."""
    placement = Placement.contiguous(MEDIUM.num_experts, 1)
    rt = routing.uniform(1, 700, MEDIUM.num_experts, MEDIUM.topk, seed=12)
    with EmulatedWorld(1, "cuda") as world:
        ws = Megakernel(world, MEDIUM)
        assert ws.programs("dispatch") == 4 * world.sms_per_rank
        assert ws.programs("gemm") == ws.programs("layer") == world.sms_per_rank
        check(ws, rt, placement, 12, "dispatch")
        ws.close()
    with EmulatedWorld(2, "cuda") as world:
        ws = Megakernel(world, MEDIUM)
        assert ws.programs("dispatch") == world.sms_per_rank
        ws.close()
        with pytest.raises(ValueError, match="ranks share one GPU"):
            Megakernel(world, MEDIUM, config=KernelConfig(num_ctas=world.sms_per_rank + 1))


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("overlap", [False, True])
def test_bf16_emulated_ranks(R, overlap):
    placement = Placement.contiguous(MEDIUM.num_experts, R)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM)
        for seed, case in enumerate(["uniform", "zipf", "dropped", "ragged"]):
            rt, _ = routing.edge_case(case, R, 700 - seed, MEDIUM.num_experts, MEDIUM.topk, seed)
            check(ws, rt, placement, seed, "dispatch", overlap)
            check(ws, rt, placement, seed, "gemm", overlap)


@pytest.mark.parametrize("switches", list(itertools.product([True, False], repeat=3)))
def test_every_switch_combination(switches):
    R = 4
    saving, sort, per_tile = switches
    cfg = KernelConfig(token_saving=saving, sorted_dispatch=sort, per_tile_flags=per_tile)
    placement = Placement.contiguous(MEDIUM.num_experts, R)
    rt = routing.zipf(R, 600, MEDIUM.num_experts, MEDIUM.topk, 1.0, seed=3)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, config=cfg)
        check(ws, rt, placement, 3, "dispatch", overlap=True)
        check(ws, rt, placement, 4, "gemm", overlap=True)


@pytest.mark.parametrize("case", routing.EDGE_CASES)
def test_edge_cases(case):
    R, E = 4, MEDIUM.num_experts
    rt, placement = routing.edge_case(case, R, 333, E, MEDIUM.topk, seed=9)
    placement = placement or Placement.contiguous(E, R)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, placement=placement)
        check(ws, rt, placement, 9, "gemm", overlap=True)


def test_dsv3_8_ranks():
    shape, R = PRESETS["dsv3"], 8
    placement = Placement.contiguous(shape.num_experts, R)
    rt = routing.uniform(R, 4096, shape.num_experts, shape.topk, seed=11)
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, shape)
        check(ws, rt, placement, 11, "gemm", overlap=True, shape=shape)


def test_back_to_back_without_sync_then_overflow():
    R, calls = 4, 20
    placement = Placement.contiguous(MEDIUM.num_experts, R)
    w13 = make_w13(MEDIUM, 0, "cuda")
    w_local = {r: placement.local_weights(w13, r) for r in range(R)}
    inputs = [  # made up front, so nothing between the calls syncs with the host
        (
            routing.zipf(R, 700, MEDIUM.num_experts, MEDIUM.topk, 0.08 * i, seed=i).to("cuda"),
            make_tokens(MEDIUM, [700] * R, i, "cuda"),
        )
        for i in range(calls)
    ]
    with EmulatedWorld(R, "cuda") as world:
        ws = Megakernel(world, MEDIUM, capacity=12000)
        ws.warmup()
        torch.cuda.synchronize()
        outputs = []
        for rt, xs in inputs:
            handles = ws.run(
                dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), None, w_local, validate=False
            )
            outputs.append({r: h.snapshot() for r, h in handles.items()})
        ws.check_errors()
        for (rt, xs), handles in zip(inputs, outputs, strict=True):
            for r, h in handles.items():
                assert check_call(h, xs, rt.topk_ids, w_local[r], placement, "gemm") == []
        assert [h.epoch for h in outputs[-1].values()] == [calls] * R
        rt = routing.all_to_one_rank(R, 700, MEDIUM.num_experts, MEDIUM.topk, dst=2, seed=0)
        xs = make_tokens(MEDIUM, [700] * R, 0, "cuda")
        with pytest.raises(CapacityError, match="rank 2 would receive .* holds 12000"):
            call(ws, rt.to("cuda"), placement, w13, xs, "gemm")
