"""Device side of the per-program trace (DESIGN §7; ``megakernel.profiler`` reads it back).

With ``KernelConfig(trace=True)`` every program records, per task it runs, (kind << 32 | task id,
start, end, ns spent waiting on flags) from ``%globaltimer`` into its own slice of a
``[programs, 1 + CAP, 4]`` int64 buffer, whose row 0 is a header (SM id, rank, events, 0). With
``TRACE`` off every function here compiles to nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from symm_mem.device import globaltimer, smid


@triton.jit
def now(TRACE: tl.constexpr):
    """The global timer where tracing, else 0 (no clock read)."""
    if TRACE:
        return globaltimer()
    return tl.zeros((), tl.int64)


@triton.jit
def trace_begin(trace_ptr, TRACE: tl.constexpr, CAP: tl.constexpr):
    """Events this program recorded in earlier launches of this call (header word 2)."""
    n = tl.zeros((), tl.int32)
    if TRACE:
        n = tl.load(trace_ptr + tl.program_id(0) * (CAP + 1) * 4 + 2).to(tl.int32)
    return n


@triton.jit
def trace_task(trace_ptr, n, kind, task, start, waited, TRACE: tl.constexpr, CAP: tl.constexpr):
    """Record event ``n`` of this program: (kind << 32 | task id, start, end, ns waited), unless
    the buffer is full (the header's count still grows, so the host sees the overflow)."""
    if TRACE:
        end = globaltimer()
        if n < CAP:
            i = tl.arange(0, 4)
            row = trace_ptr + (tl.program_id(0) * (CAP + 1) + 1 + n) * 4
            tag = (tl.cast(kind, tl.int64) << 32) | tl.cast(task, tl.int64)
            word = tl.where(i == 0, tag, tl.where(i == 1, start, tl.where(i == 2, end, waited)))
            tl.store(row + i, word)
        n += 1
    return n


@triton.jit
def trace_end(trace_ptr, n, rank, TRACE: tl.constexpr, CAP: tl.constexpr):
    """The program's header: (SM id, rank, events recorded or dropped, 0)."""
    if TRACE:
        i = tl.arange(0, 4)
        sm = tl.cast(smid(), tl.int64)
        word = tl.where(i == 0, sm, tl.where(i == 1, tl.cast(rank, tl.int64), 0))
        word = tl.where(i == 2, tl.cast(n, tl.int64), word)
        tl.store(trace_ptr + tl.program_id(0) * (CAP + 1) * 4 + i, word)
