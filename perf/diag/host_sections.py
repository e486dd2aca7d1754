"""Where an eager call's host time goes: ``python -m perf.diag.host_sections [--emulate R]
[--tokens 16] [--graphs 0|1]``.

The GPU is kept busy so that the host runs ahead; selected methods are wrapped with wall-clock
accumulators and the table gives microseconds per call in each (nested sections overlap: the
call's total includes its parts). Floors of the host's primitives (a small copy, an empty
tensor, a graph replay, a compiled kernel launch) are printed beside them.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict

import torch

from megakernel import FusedEPMoE, routing
from megakernel.graphs import CallGraphs
from megakernel.launch import Launcher
from megakernel.layer import FusedEPMoE as Layer
from megakernel.placement import Placement
from megakernel.plan.workspace import PlanWorkspace
from megakernel.shapes import preset
from megakernel.testing import layer_inputs
from megakernel.workspace import Megakernel
from symm_mem import World
from symm_mem.launch import run_in_world

SECTIONS = {
    "layer call": (Layer, "__call__"),
    "graphs": (CallGraphs, "__call__"),
    "check_inputs": (Megakernel, "check_inputs"),
    "after_call": (Megakernel, "after_call"),
    "ws.run": (Megakernel, "run"),
    "_prepare": (Megakernel, "_prepare"),
    "plan launch": (PlanWorkspace, "launch"),
    "_launch": (Megakernel, "_launch"),
    "kernel_args": (Megakernel, "kernel_args"),
    "Launcher call": (Launcher, "__call__"),
    "graph replay": (torch.cuda.CUDAGraph, "replay"),
}


def instrument(spent: dict[str, float]) -> None:
    for name, (owner, attr) in SECTIONS.items():
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def timed(*a, _inner=inner, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - t0

        setattr(owner, attr, timed)


def busy_loop(call, calls: int) -> float:
    torch.cuda.synchronize()
    torch.cuda._sleep(int(0.5 * torch.cuda.clock_rate() * 1e6))
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    took = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return took


def floors(calls: int) -> dict[str, float]:
    a, b = torch.zeros(16, 64, device="cuda"), torch.zeros(16, 64, device="cuda")
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        for _ in range(4):
            a.add_(1)
    return {
        "copy_ 4 KiB": busy_loop(lambda: a.copy_(b), calls),
        "torch.empty": busy_loop(lambda: torch.empty(16, 64, device="cuda"), calls),
        "clone 4 KiB": busy_loop(lambda: a.clone(), calls),
        "replay 4-node graph": busy_loop(g.replay, calls),
        "event record": busy_loop(lambda: torch.cuda.Event().record(), calls),
    }


def job(world: World, args) -> None:
    T, name = args.tokens, args.preset
    shape = preset(name).with_tokens(T)
    R, ranks = world.world_size, world.local_ranks
    placement = Placement.contiguous(shape.num_experts, R)
    rt = routing.uniform(R, T, shape.num_experts, shape.topk, seed=1).to(world.device)
    _, (x, ids, w, w13, w2) = layer_inputs(shape, placement, rt, ranks, 1, world.device)
    layer = FusedEPMoE(world, shape, w13, w2, placement=placement, graphs=bool(args.graphs))
    plain = len(ranks) == 1
    call_args = tuple(d[ranks[0]] for d in (x, ids, w)) if plain else (x, ids, w)
    for _ in range(10):
        layer(*call_args)
    layer.check_errors()
    base = floors(args.calls)
    plain_us = busy_loop(lambda: layer(*call_args), args.calls)
    spent: dict[str, float] = defaultdict(float)
    instrument(spent)
    wrapped_us = busy_loop(lambda: layer(*call_args), args.calls)
    layer.check_errors()
    layer.close()
    if world.rank != 0:
        return
    print(f"\n{name} T={T} R={R} {type(world).__name__} graphs={args.graphs} "
          f"{torch.cuda.get_device_name()}: {plain_us:.1f} us per call "
          f"({wrapped_us:.1f} instrumented)")  # fmt: skip
    for section, s in spent.items():
        print(f"  {section:<22} {s / args.calls * 1e6:8.1f} us")
    for floor, us in base.items():
        print(f"  floor {floor:<16} {us:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3_30b")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--graphs", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--emulate", type=int, default=0)
    args = parser.parse_args()
    code = run_in_world(
        "perf.diag.host_sections", lambda w: job(w, args), emulate=args.emulate,
        symmetric_size="4G",
    )  # fmt: skip
    sys.exit(code)


if __name__ == "__main__":
    main()
