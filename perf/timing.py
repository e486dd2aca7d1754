"""CUDA-event timing shared by the benchmarks: median and p20/p80, max over ranks.

NOTE: under dense GEMMs the GPUs here run at their power limit, and a figure depends on what ran
before it (perf/NOTES.md, "the power cap"): the first ~20 calls of a layer after idle or after a
light kernel run up to 10% faster than its steady state, and later the cap pulls the clock down
for runs of 10-20 calls. ``time_us`` times one function in many calls in a row: its steady
state, as every recorded figure here. ``time_many`` alternates functions, each settling on its
own clock first: for a variant beside its default, where drift between two separate runs would
be as large as the difference sought.
"""

from __future__ import annotations

import math
import statistics
import time
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
    settle_s: float = 0.2,
    timer: Callable[[Callable[[], object], int], float] = block_us,
) -> dict[str, dict[str, float]]:
    """Per-call microseconds of each of ``fns`` (name -> function): ``repeats`` rounds, each
    timing ``inner`` calls of every function with ``timer``, the order rotating by one each
    round, so slow drifts and the cap's dips fall on all of them alike.

    Before a function's timed calls, unless it was also the one timed last, it runs untimed for
    about ``settle_s``: timed at once, it would run on the clock the previous function's power
    left (a light function before a heavy one made the heavy one look 10% faster). The count of
    settling calls comes from a first, discarded block (after one warm-up call), max over ranks,
    so every rank makes the same calls. Every rank must pass the same names in the same order."""
    names = list(fns)
    per_call = {}
    for name in names:
        fns[name]()
        per_call[name] = timer(fns[name], inner)
    settle = {name: math.ceil(settle_s * 1e6 / max(per_call[name], 1.0)) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    last = names[-1]
    for i in range(repeats):
        first = i % len(names)
        for name in names[first:] + names[:first]:
            for _ in range(settle[name] if name != last else 0):
                fns[name]()
            samples[name].append(timer(fns[name], inner))
            last = name
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


def wall_us(call: Callable[[], object], calls: int) -> float:
    """Mean wall time per call of ``calls`` calls, synchronised before and after (what a user
    calling eagerly sees, host work included)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6
