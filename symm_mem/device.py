"""Device-side primitives for symmetric-memory kernels: flags, timers, peer pointers, NVSHMEM.

Everything here is a ``@triton.jit`` helper (or an ``@core.extern`` NVSHMEM binding) meant to be
called from inside kernels, plus the host-side hook that initialises the NVSHMEM device state of
every compiled module that calls NVSHMEM.

Protocol (DESIGN §4.5-4.6): flags are int64 words holding an *epoch*. A producer stores its
data, runs ``tl.debug_barrier()`` and then ``signal_flag(flag, epoch)`` (one release atomic at
system scope, once per program). A consumer calls ``wait_flag``, which spins with acquire loads
until the flag holds at least ``epoch`` or a ``%globaltimer`` deadline passes. Nobody resets
flags, so back-to-back calls with increasing epochs need no host work.

On timeout ``wait_flag`` writes an *error record* and returns ``False``; the host turns the record
into a ``RuntimeError`` (see ``symm_mem.errors``). Nothing spins forever, and nothing spins on
once its rank has recorded an error: every wait also watches the record, so one failed wait
makes every program of the rank leave at once instead of at its own deadline.

A kernel that leaves a record behind raises its rank's *alarm* (``raise_alarm``): a word in
host-mapped memory the host reads after each call without synchronising.

Under ``TRITON_INTERPRET=1`` inline PTX and extern calls cannot run: ``globaltimer`` falls back to
the host clock and ``smid`` to 0. The NVSHMEM bindings exist only for compiled kernels; kernels
keep them behind a constexpr switch.
"""

from __future__ import annotations

import os
import time

import triton
import triton.language as tl
from triton.language import core

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Error-record layout (int64 words). One record per rank; the first failing wait wins.
# Kept as constexpr so kernels can use them; the host reads them through `.value`.
ERR_WORDS = tl.constexpr(10)  # even: each rank's record stays 16-byte aligned
ERR_CODE = tl.constexpr(0)  # 0: no error; ERR_TIMEOUT: a wait ran past its deadline
ERR_RANK = tl.constexpr(1)  # the rank whose wait failed
ERR_FLAG = tl.constexpr(2)  # caller-chosen id of the flag it waited on
ERR_EPOCH = tl.constexpr(3)  # the epoch it waited for
ERR_SEEN = tl.constexpr(4)  # the flag's value at the deadline
ERR_TASK = tl.constexpr(5)  # caller-chosen id of the task that waited
ERR_SKIPPED = tl.constexpr(6)  # later calls skipped because of this record (the kernel counts)
ERR_LAST = tl.constexpr(7)  # the epoch of the last call skipped
ERR_CALL = tl.constexpr(8)  # the epoch of the call that failed (set when that call ends)
ERR_CLOCK = tl.constexpr(9)  # not part of the record: the rank's shared clock (see deadline_in)
ERR_TIMEOUT = tl.constexpr(1)
# A receive buffer would overflow: ERR_FLAG holds the rank that would overflow, ERR_SEEN the rows
# it would receive and ERR_TASK its capacity (see symm_mem.errors.CapacityError).
ERR_OVERFLOW = tl.constexpr(2)

# NVSHMEM 3.4.5 constants (nvshmem_constants.h). Some published wrappers use SET = 0 / ADD = 5:
# those are wrong for this version.
NVSHMEM_SIGNAL_SET = tl.constexpr(9)
NVSHMEM_SIGNAL_ADD = tl.constexpr(10)
NVSHMEM_CMP_EQ = tl.constexpr(0)
NVSHMEM_CMP_NE = tl.constexpr(1)
NVSHMEM_CMP_GT = tl.constexpr(2)
NVSHMEM_CMP_LE = tl.constexpr(3)
NVSHMEM_CMP_LT = tl.constexpr(4)
NVSHMEM_CMP_GE = tl.constexpr(5)


# ----------------------------------------------------------------------------- timers, ids


def _host_time_ns() -> int:
    return time.monotonic_ns()


if INTERPRET:

    @triton.jit
    def globaltimer():
        """Nanoseconds from the host clock (interpreter fallback for ``%globaltimer``)."""
        return tl.full((), 0, tl.int64) + _host_time_ns()

    @triton.jit
    def smid():
        """SM id; the interpreter has none, so 0."""
        return tl.full((), 0, tl.int32)

else:

    @triton.jit
    def globaltimer():
        """The 64-bit ``%globaltimer`` in nanoseconds (coarse ticks, common to all SMs)."""
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit
    def smid():
        """The SM this program runs on (``%smid``)."""
        return tl.inline_asm_elementwise(
            "mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


# ----------------------------------------------------------------------------- peer addressing


@triton.jit
def peer_ptr(peer_base, peer, like_ptr):
    """Rank ``peer``'s copy of a symmetric buffer, typed like ``like_ptr`` (its local pointer).

    ``peer_base`` is the buffer's int64 table of every rank's base address (``SymmetricTensor
    .peer_base``); stores through the result go straight over NVLink.

    NOTE: the result is declared 16-byte aligned (symmetric buffers are: NVSHMEM's heap and
    torch's allocator both align far more). Without that hint Triton cannot prove alignment of
    a pointer made from an integer and splits every row copy into 2-byte stores.
    """
    ptr = tl.load(peer_base + peer).to(tl.pointer_type(like_ptr.dtype.element_ty))
    return tl.multiple_of(ptr, 16)


# ----------------------------------------------------------------------------- flags


@triton.jit
def signal_flag(flag_ptr, epoch):
    """Publish ``epoch`` on a flag: release at system scope, once per program.

    NOTE: call after ``tl.debug_barrier()`` so every thread's stores are ordered before it.
    """
    tl.atomic_xchg(flag_ptr, tl.cast(epoch, tl.int64), sem="release", scope="sys")


@triton.jit
def report_timeout(err_ptr, rank, flag_id, epoch, seen, task_id):
    """Write a timeout record into ``err_ptr[0:ERR_WORDS]``, unless an earlier one is there."""
    zero = tl.zeros((), tl.int64)
    code = tl.full((), ERR_TIMEOUT, tl.int64)
    first = tl.atomic_cas(err_ptr, zero, code, sem="relaxed") == 0
    if first:
        tl.store(err_ptr + ERR_RANK, tl.cast(rank, tl.int64))
        tl.store(err_ptr + ERR_FLAG, tl.cast(flag_id, tl.int64))
        tl.store(err_ptr + ERR_EPOCH, tl.cast(epoch, tl.int64))
        tl.store(err_ptr + ERR_SEEN, tl.cast(seen, tl.int64))
        tl.store(err_ptr + ERR_TASK, tl.cast(task_id, tl.int64))


@triton.jit
def no_error(err_ptr):
    """No error recorded for this rank yet, as every thread of the program sees it.

    NOTE: a scalar atomic runs in one thread and its result is shared with all of them, so a
    decision made on it is uniform across the program. A plain (volatile) load runs in every
    thread: while another program writes the record, threads could disagree, and a spin loop
    whose body synchronises the program (its flag atomic does) would then leave in some threads
    and not in others. That hung a GPU for good after a timeout (never under the interpreter).
    """
    return tl.atomic_add(err_ptr + ERR_CODE, 0, sem="relaxed") == 0


@triton.jit
def _clock(err_ptr):
    """``%globaltimer`` as every thread of the program sees it (uniform, see ``no_error``): one
    thread's reading, folded into the rank's clock word, which returns the latest earlier one
    (at most one spin step stale)."""
    return tl.atomic_max(err_ptr + ERR_CLOCK, globaltimer(), sem="relaxed")


@triton.jit
def deadline_in(timeout_ns, err_ptr):
    """The deadline ``timeout_ns`` from now, the same in every thread of the program (a
    per-thread ``globaltimer() + timeout_ns`` differs by a tick between threads: see
    ``no_error``)."""
    tl.atomic_max(err_ptr + ERR_CLOCK, globaltimer(), sem="relaxed")
    return tl.atomic_max(err_ptr + ERR_CLOCK, 0, sem="relaxed") + timeout_ns


@triton.jit
def raise_alarm(alarm_ptr, err_ptr, extra):
    """Set the rank's host-mapped alarm word when its error record holds an error, or when
    ``extra`` (another record of the caller's) is set. A plain store: the host synchronises
    before it reads any record."""
    if (tl.load(err_ptr + ERR_CODE, volatile=True) != 0) | extra:
        tl.store(alarm_ptr, tl.full((), 1, tl.int64))


@triton.jit
def note_call_end(err_ptr, epoch):
    """At the end of call ``epoch`` (one program): a record left by this call gets its epoch."""
    if (tl.load(err_ptr + ERR_CODE, volatile=True) != 0) & (tl.load(err_ptr + ERR_CALL) == 0):
        tl.store(err_ptr + ERR_CALL, tl.cast(epoch, tl.int64))


@triton.jit
def note_skipped(err_ptr, epoch):
    """At the end of call ``epoch`` (one program, before ``note_call_end``): if the record is
    an earlier call's, count this one as skipped."""
    failed = tl.load(err_ptr + ERR_CALL)
    if (failed != 0) & (failed != epoch):
        tl.store(err_ptr + ERR_SKIPPED, tl.load(err_ptr + ERR_SKIPPED) + 1)
        tl.store(err_ptr + ERR_LAST, tl.cast(epoch, tl.int64))


@triton.jit
def wait_flag(flag_ptr, epoch, deadline, err_ptr, rank, flag_id, task_id):
    """Spin until ``*flag_ptr >= epoch`` (acquire, system scope) or ``globaltimer() > deadline``.

    Returns True when the flag arrived. On timeout it writes an error record naming ``rank``,
    ``flag_id``, ``epoch`` and ``task_id`` into ``err_ptr`` and returns False; the caller must then
    skip the work that depended on the flag and leave. It also returns False, without a record of
    its own, as soon as another wait of the rank has recorded an error.

    NOTE: every thread of the program spins and leaves together: the flag, the clock and the
    record are all read by scalar atomics, whose results are uniform (see ``no_error``), and
    ``deadline`` must be uniform too (``deadline_in``). So the barrier after the loop is not
    divergent; reads after it see the producer's stores. A flag that has arrived costs one read.
    """
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    waiting = seen < epoch
    while waiting:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        waiting = (seen < epoch) & (_clock(err_ptr) < deadline) & no_error(err_ptr)
    arrived = seen >= epoch
    if not arrived:
        report_timeout(err_ptr, rank, flag_id, epoch, seen, task_id)
    tl.debug_barrier()
    return arrived


@triton.jit
def wait_flags(flag_ptrs, mask, epoch, deadline, err_ptr, rank, flag_id_base, task_id):
    """Vector form of ``wait_flag``: spin until every ``flag_ptrs[i]`` (where ``mask``) holds at
    least ``epoch``. On timeout the record names ``flag_id_base + i`` for the lowest such flag."""
    seen = tl.atomic_add(flag_ptrs, 0, mask=mask, sem="acquire", scope="sys")
    lowest = tl.min(tl.where(mask, seen, epoch), 0)  # a reduction: uniform
    waiting = lowest < epoch
    while waiting:
        seen = tl.atomic_add(flag_ptrs, 0, mask=mask, sem="acquire", scope="sys")
        lowest = tl.min(tl.where(mask, seen, epoch), 0)
        waiting = (lowest < epoch) & (_clock(err_ptr) < deadline) & no_error(err_ptr)
    arrived = lowest >= epoch
    if not arrived:
        late = tl.argmin(tl.where(mask, seen, epoch), 0)
        report_timeout(err_ptr, rank, flag_id_base + late, epoch, lowest, task_id)
    tl.debug_barrier()
    return arrived


@triton.jit
def report_overflow(err_ptr, rank, dst_rank, rows, capacity, epoch):
    """Record that ``dst_rank`` would receive ``rows`` rows into a buffer of ``capacity``."""
    zero = tl.zeros((), tl.int64)
    code = tl.full((), ERR_OVERFLOW, tl.int64)
    if tl.atomic_cas(err_ptr, zero, code, sem="relaxed") == 0:
        tl.store(err_ptr + ERR_RANK, tl.cast(rank, tl.int64))
        tl.store(err_ptr + ERR_FLAG, tl.cast(dst_rank, tl.int64))
        tl.store(err_ptr + ERR_EPOCH, tl.cast(epoch, tl.int64))
        tl.store(err_ptr + ERR_SEEN, tl.cast(rows, tl.int64))
        tl.store(err_ptr + ERR_TASK, tl.cast(capacity, tl.int64))


# ----------------------------------------------------------------------------- NVSHMEM externs
#
# NOTE: Triton turns an int argument equal to 1 into a constexpr, which has no `.to()`; scalars
# that may be such arguments are converted with `tl.cast(x, dtype)` everywhere in this project.
#
# NOTE: a scalar extern call runs in *every thread* of the program. The `_block` functions expect
# exactly that; thread-scope signal ops would be applied once per thread. Pointers are passed as
# int64 and ints cast to the declared width, or the extern lookup fails at compile time.


@core.extern
def my_pe(_semantic=None):
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_my_pe", core.dtype("int32"))}, is_pure=True, _semantic=_semantic
    )


@core.extern
def n_pes(_semantic=None):
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_n_pes", core.dtype("int32"))}, is_pure=True, _semantic=_semantic
    )


@core.extern
def ptr(addr, pe, _semantic=None):
    """``nvshmem_ptr``: the load/store address of ``addr`` on ``pe``, 0 when not reachable."""
    return core.extern_elementwise(
        "",
        "",
        [addr, pe],
        {(core.dtype("int64"), core.dtype("int32")): ("nvshmem_ptr", core.dtype("int64"))},
        is_pure=True,
        _semantic=_semantic,
    )


@core.extern
def putmem_signal_nbi_block(dst, src, nbytes, sig_addr, signal, sig_op, pe, _semantic=None):
    """``nvshmemx_putmem_signal_nbi_block``: all threads of the program call it together."""
    i64, i32 = core.dtype("int64"), core.dtype("int32")
    return core.extern_elementwise(
        "",
        "",
        [dst, src, nbytes, sig_addr, signal, sig_op, pe],
        {(i64, i64, i64, i64, i64, i32, i32): ("nvshmemx_putmem_signal_nbi_block", i32)},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def signal_wait_until(sig_addr, cmp, cmp_value, _semantic=None):
    """``nvshmem_signal_wait_until``: unbounded; prefer ``wait_flag`` where a deadline matters."""
    i64, i32 = core.dtype("int64"), core.dtype("int32")
    return core.extern_elementwise(
        "",
        "",
        [sig_addr, cmp, cmp_value],
        {(i64, i32, i64): ("nvshmem_signal_wait_until", i64)},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def fence(_semantic=None):
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_fence", core.dtype("int32"))}, is_pure=False, _semantic=_semantic
    )


@core.extern
def quiet(_semantic=None):
    return core.extern_elementwise(
        "", "", [], {(): ("nvshmem_quiet", core.dtype("int32"))}, is_pure=False, _semantic=_semantic
    )
