"""CUDA-event timing shared by the benchmarks: median and p20/p80, max over ranks."""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"median": statistics.median(xs), "p20": pick(0.2), "p80": pick(0.8)}


def time_us(fn, repeats: int = 10, inner: int = 10) -> dict[str, float]:
    """Per-call microseconds of ``fn`` after one warm-up call: ``inner`` calls between two events,
    ``repeats`` times; under torch.distributed every repeat starts together on all ranks and
    counts the slowest rank."""
    fn()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        out.append(_max_over_ranks(start.elapsed_time(end) * 1e3 / inner))
    return quantiles(out)


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
