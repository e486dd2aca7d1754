"""Host cost of an eager layer call: ``python -m perf.bench_host [--presets qwen3_30b]
[--tokens 16 128] [--emulate R]``.

Relaunches itself under torchrun on every visible GPU (NVSHMEM world, one rank each);
``--emulate R`` runs R ranks in one process on one GPU. Each rank holds E / R experts.

Per preset and T, after checking the layer's output against ``moe_ref``: the GPU is kept busy
(``torch.cuda._sleep``) while the host makes ``--calls`` eager calls of ``FusedEPMoE`` with its
default checks, so the host runs ahead and its time per call is what the calls cost it (launches,
checks, bookkeeping), not the GPU's. The figure counts only if the GPU was still busy when the
last call returned (``ahead``). Then the same calls without the busy GPU (eager wall time per
call, synchronised at the end) and CUDA-graph replays, for comparison. Host time is per call of
this process: with R emulated ranks, divide by R for the cost per rank.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megakernel import FusedEPMoE, routing
from megakernel.placement import Placement
from megakernel.shapes import preset
from megakernel.testing import check_layer_output, layer_inputs
from perf.timing import wall_us
from symm_mem import World
from symm_mem.launch import run_in_world

BUSY_MS = 400  # the GPU's head start: longer than --calls calls take the host


def host_us_per_call(call, calls: int) -> tuple[float, bool]:
    """(host microseconds per call, whether the GPU was busy all along) with the GPU kept busy."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(BUSY_MS * 1e-3 * torch.cuda.clock_rate() * 1e6))
    busy = torch.cuda.Event()
    busy.record()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    took = time.perf_counter() - start
    ahead = not busy.query()
    torch.cuda.synchronize()
    return took / calls * 1e6, ahead


def graph_us_per_call(call, calls: int) -> float:
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        call()
    return wall_us(graph.replay, calls)


def bench_point(world: World, name: str, T: int, args) -> dict:
    shape = preset(name).with_tokens(T)
    R, ranks = world.world_size, world.local_ranks
    placement = Placement.contiguous(shape.num_experts, R)
    rt = routing.uniform(R, T, shape.num_experts, shape.topk, seed=1).to(world.device)
    xs, (x, ids, weights, w13, w2) = layer_inputs(shape, placement, rt, ranks, 1, world.device)
    layer = FusedEPMoE(world, shape, w13, w2, placement=placement)
    plain = len(ranks) == 1  # one rank per process: plain tensors, as a user passes them
    args_in = tuple(d[ranks[0]] for d in (x, ids, weights)) if plain else (x, ids, weights)
    out = layer(*args_in)
    layer.check_errors()
    outs = {ranks[0]: out} if plain else out
    for r in ranks:
        wrong = check_layer_output(outs[r], xs[r], ids[r], weights[r], shape, 1, r)
        if wrong:
            raise SystemExit(f"{name} T={T}: wrong output: {wrong[:2]}")
    call = lambda: layer(*args_in)  # noqa: E731
    for _ in range(10):
        call()
    host, ahead = host_us_per_call(call, args.calls)
    eager = wall_us(call, args.calls)
    layer.check_errors()
    replay = graph_us_per_call(lambda: layer.workspace.run(
        x, ids, weights, w13, w2, mode="layer", validate=False), args.calls)  # fmt: skip
    layer.check_errors()
    layer.close()
    return dict(preset=name, T=T, host_us=host, ahead=ahead, eager_us=eager, graph_us=replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["qwen3_30b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--emulate", type=int, default=0, help="R ranks on one GPU instead")
    args = parser.parse_args()

    def job(world: World) -> None:
        rows = [bench_point(world, p, T, args) for p in args.presets for T in args.tokens]
        if world.rank != 0:
            return
        print(
            f"\nhost cost of an eager call, {world.world_size} ranks ({type(world).__name__}), "
            f"{torch.cuda.get_device_name()}, {args.calls} calls"
        )
        print(
            f"{'preset':<11} {'T':>5} {'host us':>8} {'ahead':>5} {'eager us':>9} {'graph us':>9}"
        )
        for row in rows:
            print(
                f"{row['preset']:<11} {row['T']:5d} {row['host_us']:8.1f} {str(row['ahead']):>5} "
                f"{row['eager_us']:9.1f} {row['graph_us']:9.1f}"
            )

    sys.exit(run_in_world("perf.bench_host", job, emulate=args.emulate, symmetric_size="4G"))


if __name__ == "__main__":
    main()
