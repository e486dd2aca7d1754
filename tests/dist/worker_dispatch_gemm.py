"""torchrun worker: dispatch + GEMM1 in the NVSHMEM world, against the references.

Every rank builds the global-view inputs from one seed and checks its own outputs (dispatch bit
for bit, GEMM within tolerance). Cases, each printing ``[rank r] PASS <case>``:
  <preset>       dsv3, qwen3_235b and mixtral at T = 4096: uniform, zipf and dropped routings,
                 then the dispatch-only op (mode "dispatch", several programs per SM) once
  back_to_back   100 calls (qwen3_30b, T = 1024) with fresh routing and no host sync in between;
                 every call's outputs copied on-stream and checked after the last
  overflow       a routing that overflows the capacity raises CapacityError on every rank
"""

import sys

import torch

import symm_mem
from megakernel import routing
from megakernel import Megakernel
from megakernel.placement import Placement
from megakernel.shapes import PRESETS
from megakernel.testing import check_call, check_calls, local_w13, make_tokens, run_poisoned


def one_call(ws, world, rt, xs, w, placement, mode="gemm"):
    w_local = {world.rank: w}
    handles = run_poisoned(ws, xs, rt.topk_ids, w_local, mode)
    return check_calls(handles, xs, rt.topk_ids, w_local, placement, mode)


def presets(world) -> bool:
    rank, R, ok = world.rank, world.world_size, True
    for name in ("dsv3", "qwen3_235b", "mixtral"):
        shape = PRESETS[name]
        E, K, T = shape.num_experts, shape.topk, 4096
        placement = Placement.contiguous(E, R)
        w = local_w13(shape, placement, rank, 7, world.device)
        ws = Megakernel(world, shape, placement=placement)
        problems = []
        for seed, case in enumerate(["uniform", "zipf", "dropped"]):
            rt, _ = routing.edge_case(case, R, T, E, K, seed=seed)
            xs = make_tokens(shape, [T] * R, seed, world.device)
            problems += one_call(ws, world, rt.to(world.device), xs, w, placement)
        problems += one_call(ws, world, rt.to(world.device), xs, w, placement, "dispatch")
        print(f"[rank {rank}] {'PASS' if not problems else 'FAIL'} {name} {problems[:3]}",
              flush=True)
        ok &= not problems
        ws.close()
        del w
        torch.cuda.empty_cache()
    return ok


def back_to_back(world, calls: int = 100) -> bool:
    rank, R = world.rank, world.world_size
    shape = PRESETS["qwen3_30b"].with_tokens(1024)
    E, K, T = shape.num_experts, shape.topk, shape.max_tokens_per_rank
    placement = Placement.contiguous(E, R)
    w = local_w13(shape, placement, rank, 3, world.device)
    inputs = [
        (
            routing.zipf(R, T, E, K, 0.02 * i, seed=100 + i).to(world.device),
            make_tokens(shape, [T] * R, 100 + i, world.device),
        )
        for i in range(calls)
    ]
    ws = Megakernel(world, shape, placement=placement)
    ws.warmup()
    world.barrier()
    outputs = []
    for rt, xs in inputs:  # no host synchronisation inside this loop
        h = ws.run({rank: xs[rank]}, {rank: rt.topk_ids[rank]}, None, {rank: w}, validate=False)
        outputs.append(h[rank].snapshot())
    ws.check_errors()
    problems = [
        p
        for (rt, xs), h in zip(inputs, outputs, strict=True)
        for p in check_call(h, xs, rt.topk_ids, w, placement, "gemm")
    ]
    ok = not problems and outputs[-1].epoch == calls
    print(f"[rank {rank}] {'PASS' if ok else 'FAIL'} back_to_back {calls} calls {problems[:3]}",
          flush=True)
    ws.close()
    return ok


def overflow(world) -> bool:
    rank, R = world.rank, world.world_size
    shape = PRESETS["qwen3_30b"].with_tokens(512)
    E, K, T = shape.num_experts, shape.topk, 512
    placement = Placement.contiguous(E, R)
    # R T K rows go to the last rank; half of T K overflows at any R, R = 1 included
    ws = Megakernel(world, shape, placement=placement, capacity=T * K // 2)
    rt = routing.all_to_one_rank(R, T, E, K, dst=R - 1, seed=0).to(world.device)
    xs = make_tokens(shape, [T] * R, 0, world.device)
    w = local_w13(shape, placement, rank, 0, world.device)
    try:
        one_call(ws, world, rt, xs, w, placement)
        raised = False
    except symm_mem.CapacityError as e:
        raised = f"to rank {R - 1}" in str(e)
    print(f"[rank {rank}] {'PASS' if raised else 'FAIL'} overflow", flush=True)
    world.barrier()
    ws.close()
    return raised


def main() -> int:
    world = symm_mem.init_world()
    ok = presets(world)
    ok &= back_to_back(world)
    ok &= overflow(world)
    world.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
