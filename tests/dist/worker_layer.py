"""torchrun worker: the whole MoE layer (FusedEPMoE) in the NVSHMEM world, against moe_ref.

Every rank builds the global-view inputs from one seed, holds only its own experts and checks its
own output against moe_ref, rebuilding the experts it needs one at a time. Cases, each printing
``[rank r] PASS <case>``:
  <preset>       dsv3, qwen3_235b, mixtral: T = 4096 (uniform, zipf, dropped; one kernel and two)
                 and T = 32768 (uniform)
  back_to_back   1000 calls (qwen3_30b, T = 512) cycling 16 routings, no host sync in between,
                 every output kept and checked after the last
  graph          one call captured in a CUDA graph, replayed 100 times on new inputs, all checked
  repeatable     the same call twice: outputs equal bit for bit
  fault          rank 1 skips a call: rank 0 raises WaitTimeoutError within its deadline
"""

import sys
import time

import torch

import symm_mem
from megakernel import FusedEPMoE, routing
from megakernel.placement import Placement
from megakernel.shapes import PRESETS
from megakernel.testing import (
    check_layer_output,
    compare_layer_output,
    layer_ref,
    local_w2,
    local_w13,
    make_tokens,
)


def build(world, shape, seed, **kw) -> FusedEPMoE:
    placement = Placement.contiguous(shape.num_experts, world.world_size)
    w13 = local_w13(shape, placement, world.rank, seed, world.device)
    w2 = local_w2(shape, placement, world.rank, seed, world.device)
    return FusedEPMoE(world, shape, w13, w2, placement=placement, **kw)


def inputs(world, shape, case, T, seed):
    R, E, K = world.world_size, shape.num_experts, shape.topk
    rt, _ = routing.edge_case(case, R, T, E, K, seed=seed)
    rt = rt.to(world.device)
    xs = make_tokens(shape, [T] * R, seed, world.device)
    r = world.rank
    return xs[r], rt.topk_ids[r], rt.topk_weights[r]


def report(world, name: str, problems: list[str]) -> bool:
    status = "PASS" if not problems else "FAIL"
    print(f"[rank {world.rank}] {status} {name} {problems[:3]}", flush=True)
    return not problems


def presets(world) -> bool:
    ok, seed = True, 7
    for name in ("dsv3", "qwen3_235b", "mixtral"):
        shape = PRESETS[name].with_tokens(32768)
        layer = build(world, shape, seed)
        problems = []
        calls = [("uniform", 4096, False), ("zipf", 4096, False), ("dropped", 4096, False)]
        calls += [("uniform", 4096, True), ("uniform", 32768, False)]
        for i, (case, T, split) in enumerate(calls):
            layer.split = split
            x, ids, w = inputs(world, shape, case, T, seed=i)
            out = layer(x, ids, w)
            layer.check_errors()
            found = check_layer_output(out, x, ids, w, shape, seed, world.rank)
            problems += [f"{case} T={T} split={split}: {p}" for p in found]
            print(f"[rank {world.rank}] {name} {case} T={T} split={split}: {found or 'ok'}",
                  flush=True)
        ok &= report(world, name, problems)
        layer.close()
        del layer
        torch.cuda.empty_cache()
    return ok


def back_to_back_and_graph(world, calls: int = 1000, replays: int = 100) -> bool:
    shape, seed, T = PRESETS["qwen3_30b"].with_tokens(512), 3, 512
    layer = build(world, shape, seed)
    sets = [inputs(world, shape, "zipf" if i % 2 else "dropped", T, 100 + i) for i in range(16)]
    wants = [layer_ref(*inp, shape, seed) for inp in sets]  # each set's reference, once
    layer(*sets[0])  # compile and load everything before the timed loop
    layer.check_errors()
    world.barrier()
    outs = [layer(*sets[i % 16]) for i in range(calls)]  # no host synchronisation in here
    layer.check_errors()
    problems = []
    for i, out in enumerate(outs):
        found = compare_layer_output(out, wants[i % 16], shape.dtype, world.rank)
        problems += [f"call {i}: {p}" for p in found]
    ok = report(world, f"back_to_back {calls} calls", problems)

    static = [t.clone() for t in sets[0]]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = layer(*static)
    replayed = []
    for i in range(replays):
        for dst, src in zip(static, sets[(i * 7) % 16], strict=True):
            dst.copy_(src)
        graph.replay()
        replayed.append(graph_out.clone())
    layer.check_errors()
    problems = []
    for i, out in enumerate(replayed):
        found = compare_layer_output(out, wants[(i * 7) % 16], shape.dtype, world.rank)
        problems += [f"replay {i}: {p}" for p in found]
    ok &= report(world, f"graph {replays} replays", problems)
    layer.close()
    return ok


def repeatable(world) -> bool:
    shape = PRESETS["dsv3"]
    layer = build(world, shape, seed=11)
    x, ids, w = inputs(world, shape, "zipf", 4096, seed=12)
    first = layer(x, ids, w).clone()
    second = layer(x, ids, w)
    layer.check_errors()
    same = torch.equal(first.view(torch.int16), second.view(torch.int16))
    ok = report(world, "repeatable", [] if same else ["two runs differ"])
    layer.close()
    return ok


def fault(world) -> bool:
    shape = PRESETS["qwen3_30b"].with_tokens(256)
    layer = build(world, shape, seed=1)
    x, ids, w = inputs(world, shape, "uniform", 256, seed=2)
    layer(x, ids, w)
    layer.check_errors()
    world.barrier()
    world.timeout_s = 2.0
    problems = []
    if world.rank != 1:  # rank 1 never makes this call
        start = time.monotonic()
        layer(x, ids, w)
        try:
            layer.check_errors()
            problems.append("no error raised")
        except symm_mem.WaitTimeoutError as e:
            took = time.monotonic() - start
            print(f"[rank {world.rank}] fault: raised after {took:.2f} s: {e}", flush=True)
            if took > 3 * world.timeout_s:
                problems.append(f"raised after {took:.1f} s, deadline {world.timeout_s} s")
    world.barrier()
    ok = report(world, "fault", problems)
    layer.close()
    return ok


def main() -> int:
    world = symm_mem.init_world()
    ok = presets(world)
    ok &= back_to_back_and_graph(world)
    ok &= repeatable(world)
    ok &= fault(world)
    world.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
