"""CUDA-event timing shared by the benchmarks: median and p20/p80, max over ranks.

NOTE: under dense GEMMs the GPUs here run at their power limit, and the clock steps down for
runs of 10-20 calls at a time (perf/NOTES.md, "the power cap"). Things to be compared are
timed with ``time_many``, which alternates them, so such a run falls on all of them alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"median": statistics.median(xs), "p20": pick(0.2), "p80": pick(0.8)}


def block_us(fn: Callable[[], object], inner: int) -> float:
    """Per-call microseconds of ``inner`` calls of ``fn`` between two events, all ranks starting
    together (under torch.distributed), the slowest rank's figure."""
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return _max_over_ranks(start.elapsed_time(end) * 1e3 / inner)


def time_many(
    fns: dict[str, Callable[[], object]],
    repeats: int = 10,
    inner: int = 10,
    timer: Callable[[Callable[[], object], int], float] = block_us,
) -> dict[str, dict[str, float]]:
    """Per-call microseconds of each of ``fns`` (name -> function), after one warm-up call of
    each: ``repeats`` rounds, each timing ``inner`` calls of every function with ``timer``, the
    order rotating by one each round. Every rank must pass the same names in the same order."""
    names = list(fns)
    for name in names:
        fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        first = i % len(names)
        for name in names[first:] + names[:first]:
            samples[name].append(timer(fns[name], inner))
    return {name: quantiles(xs) for name, xs in samples.items()}


def time_us(fn, repeats: int = 10, inner: int = 10) -> dict[str, float]:
    """``time_many`` of one function."""
    return time_many({"fn": fn}, repeats, inner)["fn"]


def _max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def graphed(fn):
    """``fn`` captured in a CUDA graph (one replay per call), after one eager warm-up call."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
