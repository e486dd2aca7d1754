"""The persistent megakernel: one launch per rank and call pulls every task of the call from
atomic counters and runs it (DESIGN §5). The task kinds, their order and the rule that keeps the
grid free of deadlock are in ``megakernel.tasks``; the task bodies in ``megakernel.ops``.

Shape legend: T tokens on this rank, H hidden, I expert FFN width, K top-k, R ranks, L local
slots per rank, P = R * L, C receive rows per rank (the capacity).

Arguments, by name (``megakernel.workspace`` builds them in one place): the layer's tensors, then
six groups of buffers (the FP8 scales, the experts' biases, the plan, the symmetric buffers as
peers and as this rank's, the rank's state), each a ``NamedTuple`` whose fields the task bodies
read by name, then the per-call scalars, then ``M``, the ``KernelMeta`` of every compile-time
constant.

Back-to-back calls with no host synchronisation: ``recv_x`` / ``recv_src`` / ``recv_tag`` (and
``recv_scale``) are double-buffered by epoch parity. A sender can only reach call e + 2 after its
plan saw every peer's e + 2 counts, which a peer publishes after its call-e megakernel finished
reading parity e % 2. Flags hold epochs and are never reset; counters are reset by the last
program out.

Rounds (a call whose busiest rank receives more than C rows, mode "layer"): one launch per
round, ``rnd`` = 0 .. ROUNDS - 1, each with its round's tables and flags (the host passes views);
launches past the call's rounds do nothing. A round's dispatch to a rank waits for that rank's
previous launch to end (``round_free``), since the round reuses its receive rows; the last
round runs the top-k reduce, and the last launch settles the call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megakernel.ops.combine import publish_pieces, reduce_task, tile_fill_nan
from megakernel.ops.dispatch import dispatch_task
from megakernel.ops.gemm import down_task, gemm1_task
from megakernel.ops.trace import now, trace_begin, trace_end, trace_task
from megakernel.plan.count import ROUTING_POISONED
from megakernel.tasks import (
    COUNTER_COMPUTE,
    COUNTER_DISPATCH,
    COUNTER_EXIT,
    KIND_DISPATCH,
    KIND_DOWN,
    KIND_GEMM1,
    KIND_REDUCE,
    KIND_RESOLVE,
    combine_order,
    down_coords,
    share,
)
from symm_mem.device import deadline_in, no_error, note_call_end, note_skipped, raise_alarm


class PlanBuffers(NamedTuple):
    """This rank's plan of the call (``megakernel.plan``), int32."""

    dispatch_tasks: torch.Tensor  # [max_dispatch, 4] (send group, first unit, units, group tasks)
    tiles: torch.Tensor  # [max_tiles, 5] (local slot, first row, rows, src_lo, src_hi)
    stats: torch.Tensor  # [5] megakernel.plan.STATS (the launch's round)
    totals: torch.Tensor  # [2, P_P] rows per slot, units per send group
    send_units: torch.Tensor  # [U_max] token * K + k in send order
    phys: torch.Tensor  # [T, K] physical slot, -1 dropped
    slot_pos: torch.Tensor  # [T, K] row at the destination
    data_pos: torch.Tensor  # [T, K] row carrying the token's data there


class SymBuffers(NamedTuple):
    """The symmetric buffers: as ``peers``, every rank's base address ([R] int64 tables, which
    ``symm_mem.device.peer_ptr`` turns into a peer's pointer); as ``mine``, this rank's copy."""

    recv_x: torch.Tensor  # [2, C, H] receive rows, by epoch parity
    recv_src: torch.Tensor  # [2, C] int32 the row holding each row's data
    recv_tag: torch.Tensor  # [2, C] int32 where each row's output goes (mode "layer")
    recv_scale: torch.Tensor  # FP8: [2, C, H/128] fp32 scales of recv_x's rows per 128 columns
    expert_ready: torch.Tensor  # [L, R] int64 flags: (local slot, source rank) -> epoch (round's)
    round_free: torch.Tensor  # [ROUNDS] int64 flags: round -> epoch whose launch of it ended
    combine_y: torch.Tensor  # [T_max * K, H] expert outputs of this rank's (token, k)
    combine_count: torch.Tensor  # [groups, token blocks] int32 combine pieces arrived


class Fp8Scales(NamedTuple):
    """The FP8 path's fp32 block scales (``MoEShape.fp8``; without it others stand in, and the
    kernel never reads them)."""

    w13: torch.Tensor  # [L, 2I/128, H/128] of w13's 128 x 128 blocks
    w2: torch.Tensor  # [L, H/128, I/128] of w2's blocks
    act: torch.Tensor  # [C, I/128] of act's rows, per 128 columns


class ExpertBiases(NamedTuple):
    """The experts' fp32 biases (``MoEShape.bias``; without it others stand in, and the kernel
    never reads them)."""

    b13: torch.Tensor  # [L, 2I] added to GEMM1's gate columns, then its up columns
    b2: torch.Tensor  # [L, H] added to the down projection's output


class RankState(NamedTuple):
    """This rank's private flags, counters and records."""

    group_done: torch.Tensor  # [P_P] int32 arrivals per send group (0 between calls)
    act_done: torch.Tensor  # [max_tiles] int32 GEMM1 arrivals per tile (0 between calls)
    act_ready: torch.Tensor  # [max_tiles] int64 flags: tile -> epoch of its activations
    resolved: torch.Tensor  # [max_tiles] int64 flags: tile -> epoch its rows were resolved
    pending: torch.Tensor  # [programs, PENDING_P] int32 combine pieces not yet added
    counters: torch.Tensor  # [3] int32 dispatch, compute and exit counters (0 between launches)
    err: torch.Tensor  # [ERR_WORDS] int64 the error record (symm_mem.errors)
    epoch: torch.Tensor  # [1] int64 this call's epoch (the plan bumped it)
    trace: torch.Tensor  # TRACE: [programs, 1 + TRACE_CAP, 4] int64, zeroed per call
    routing_err: torch.Tensor  # [ROUTING_ERR_WORDS] int64 the first bad routing id (plan.count)
    alarm: torch.Tensor  # [1] int64 host-mapped: set when a record above holds an error


@triton.jit(do_not_specialize=["rank", "num_tokens", "rnd", "task_begin", "task_end", "timeout_ns"])
def moe_megakernel(
    x_ptr,  # [T, H] this rank's tokens
    w13_ptr,  # [L, 2I, H] this rank's experts
    w13_desc,  # GEMM1_TMA: w13's block descriptor (see tile_expert_gemm), else None
    w13_tail_desc,  # GEMM1_TMA with TAIL_ROWS: w13 as [L * 2I, H] in [BN, BK] boxes, else None
    w2_ptr,  # [L, H, I] (LAYER)
    w2_desc,  # DOWN_TMA: [BN2, BK2] block descriptor of w2 as [L * H, I] (else None)
    weights_ptr,  # [T, K] fp32 routing weights (LAYER)
    act_ptr,  # [C, I] (or [C, 2I] without SwiGLU) out: expert activations, receive order
    out_ptr,  # [T, H] out: the layer's output (LAYER)
    scales,  # Fp8Scales (FP8)
    biases,  # ExpertBiases (BIAS)
    plan,  # PlanBuffers
    peers,  # SymBuffers of base tables
    mine,  # SymBuffers of this rank
    state,  # RankState
    rank,
    num_tokens,
    rnd,  # this launch's round (the tables and flags passed are its own)
    task_begin,  # this launch runs the task ids [task_begin, task_end) of the round
    task_end,
    timeout_ns,
    M: tl.constexpr,  # KernelMeta
):
    # NOTE: one loop over the compute tasks, not a function per region: the regions' tasks share
    # the claim counter, the trace record and a program's pending combine pieces (``held``)
    epoch = tl.load(state.epoch)
    deadline = deadline_in(timeout_ns, state.err)
    # this launch's share of each task region (the CPU emulation runs them as separate phases)
    # (none at all when the plan failed (overflow) or an earlier wait timed out: the call is
    # skipped, its output NaN: see _last_out)
    ok = no_error(state.err)  # (uniform: see no_error)
    num_tiles = tl.where(ok, tl.load(plan.stats + 2), 0)
    num_down = 0
    nrb = 0  # reduce tasks per column group
    if M.LAYER:
        num_down = num_tiles * M.DOWN_BLOCKS
        last_round = rnd == tl.load(plan.stats + 4) - 1
        nrb = tl.where(ok & last_round, tl.cdiv(num_tokens, M.REDUCE_TOKENS), 0)
    num_reduce = nrb * M.GROUPS
    d_lo, d_count = share(task_begin, task_end, 0, tl.where(ok, tl.load(plan.stats + 3), 0))
    g_lo, g_count = share(task_begin, task_end, M.MAX_DISPATCH, num_tiles * M.GEMM1_BLOCKS)
    n_lo, n_count = share(task_begin, task_end, M.BASE_DOWN, num_down)
    r_lo, r_count = share(task_begin, task_end, M.BASE_REDUCE, num_reduce)
    # a launch holding both whole regions interleaves them (combine_order); else id order
    interleave = (n_count == num_down) & (r_count == num_reduce) & (nrb > 0)
    shares = (n_lo, n_count, r_lo, num_down, num_tiles, nrb, interleave)
    # TRACE: this program's events so far this call (earlier launches of it appended theirs)
    n_events = trace_begin(state.trace, M.TRACE, M.TRACE_CAP)
    if tl.program_id(0) < M.DISPATCH_CTAS:
        n_events = _dispatch_tasks(
            d_lo, d_count, x_ptr, plan, peers, mine, state, rank, epoch, rnd, deadline, n_events,
            M,
        )  # fmt: skip
    # compute tasks: GEMM1 (or resolve) in id order, then down projection + combine put and
    # top-k reduce, interleaved by column group (combine_order); a task only waits on lower ids
    # here or on dispatch / down tasks of peers
    pending_row = state.pending + tl.program_id(0) * M.PENDING_P
    held = tl.full((), -1, tl.int32)  # column group of the pieces in pending_row; -1: none
    q = tl.atomic_add(state.counters + COUNTER_COMPUTE, 1, sem="relaxed")
    while q < g_count + n_count + r_count:
        start = now(M.TRACE)
        waited = tl.zeros((), tl.int64)
        kind = tl.full((), KIND_RESOLVE, tl.int32)
        if M.GEMM:
            kind = tl.full((), KIND_GEMM1, tl.int32)
        task = M.MAX_DISPATCH + g_lo + q
        if q < g_count:
            waited = gemm1_task(
                g_lo + q, w13_ptr, w13_desc, w13_tail_desc, act_ptr, scales, biases, plan, mine,
                state, rank, epoch, deadline, M,
            )  # fmt: skip
        elif M.LAYER:
            waited, kind, task, held = _combine_step(
                q - g_count, held, pending_row, shares, num_tokens, w2_ptr, w2_desc, act_ptr,
                scales, biases, weights_ptr, out_ptr, plan, peers, mine, state, rank, epoch,
                deadline, M,
            )  # fmt: skip
        n_events = trace_task(
            state.trace, n_events, kind, task, start, waited, M.TRACE, M.TRACE_CAP
        )
        q = tl.atomic_add(state.counters + COUNTER_COMPUTE, 1, sem="relaxed")
    if M.LAYER:
        if held >= 0:
            publish_pieces(pending_row, peers, held, M)
    trace_end(state.trace, n_events, rank, M.TRACE, M.TRACE_CAP)
    _last_out(out_ptr, num_tokens, mine, state, epoch, rnd, task_begin, task_end, M)


@triton.jit
def _combine_step(
    u, held, pending_row, shares, num_tokens, w2_ptr, w2_desc, act_ptr, scales, biases,
    weights_ptr, out_ptr, plan, peers, mine, state, rank, epoch, deadline, M: tl.constexpr,
):  # fmt: skip
    """Task ``u`` of the down + reduce part (``shares``: this launch's part of both regions):
    run it, publishing the program's held combine pieces where it moves on from their column
    group. Returns (ns waited, kind, task id, the column group now held)."""
    n_lo, n_count, r_lo, num_down, num_tiles, nrb, interleave = shares
    is_down = u < n_count
    idx = tl.where(is_down, n_lo + u, r_lo + u - n_count)
    if M.GROUPS > 1:  # one column group: id order is the interleaved order
        if interleave:
            is_down, idx = combine_order(
                u, num_down, num_tiles, nrb, M.LAG, M.GROUP_BLOCKS, M.GROUPS
            )
    if is_down:
        group, tile, n_block = down_coords(idx, num_tiles, M.GROUP_BLOCKS, M.DOWN_BLOCKS)
        # NOTE: a program holds one group's pieces at a time: publish them when it moves on
        if (held >= 0) & (held != group):
            publish_pieces(pending_row, peers, held, M)
        held = group.to(tl.int32)
        kind = tl.full((), KIND_DOWN, tl.int32)
        task = M.BASE_DOWN + idx
        waited = down_task(
            tile, n_block, task, w2_ptr, w2_desc, act_ptr, scales, biases, pending_row, plan,
            peers, mine, state, rank, epoch, deadline, M,
        )  # fmt: skip
    else:
        # NOTE: publish this program's combine pieces before it waits on anybody's
        if held >= 0:
            publish_pieces(pending_row, peers, held, M)
            held = tl.full((), -1, tl.int32)
        kind = tl.full((), KIND_REDUCE, tl.int32)
        task = M.BASE_REDUCE + idx
        waited = reduce_task(
            idx, nrb, num_tokens, weights_ptr, out_ptr, plan, mine, state, rank, epoch, deadline, M
        )
    return waited, kind, task, held


@triton.jit
def _dispatch_tasks(
    d_lo, d_count, x_ptr, plan, peers, mine, state, rank, epoch, rnd, deadline, n_events, M
):  # fmt: skip
    """Claim and run dispatch tasks ``d_lo + [0, d_count)`` until none is left; returns the
    program's trace event count."""
    d = tl.atomic_add(state.counters + COUNTER_DISPATCH, 1, sem="relaxed")
    while d < d_count:
        start = now(M.TRACE)
        dispatch_task(d_lo + d, x_ptr, plan, peers, mine, state, rank, epoch, rnd, deadline, M)
        n_events = trace_task(
            state.trace, n_events, KIND_DISPATCH, d_lo + d, start, 0, M.TRACE, M.TRACE_CAP
        )
        d = tl.atomic_add(state.counters + COUNTER_DISPATCH, 1, sem="relaxed")
    return n_events


@triton.jit
def _last_out(
    out_ptr, num_tokens, mine, state, epoch, rnd, task_begin, task_end, M: tl.constexpr
):  # fmt: skip
    """The last program out resets the counters for the next launch (stream-ordered after it)
    and, with rounds, tells the peers that this rank is done with round ``rnd``'s receive rows;
    where the launch ends the call, it settles the call's records: a call that ends after the
    failed one ended was skipped and is counted, a failed or skipped layer call's output becomes
    NaN, a bad-id record of an earlier call counts this one as poisoned,
    and any record raises the host-mapped alarm."""
    tl.debug_barrier()
    if tl.atomic_add(state.counters + COUNTER_EXIT, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        tl.store(state.counters + COUNTER_DISPATCH, 0)
        tl.store(state.counters + COUNTER_COMPUTE, 0)
        tl.store(state.counters + COUNTER_EXIT, 0)
        holds_reduce = (task_begin <= M.BASE_REDUCE) & (task_end >= M.BASE_REDUCE + M.MAX_REDUCE)
        if M.ROUNDS > 1:
            if holds_reduce:  # (every task of the round is done: the launch's last range)
                value = tl.cast(epoch, tl.int64)
                tl.atomic_xchg(mine.round_free + rnd, value, sem="release", scope="sys")
            holds_reduce = holds_reduce & (rnd == M.ROUNDS - 1)
        if M.LAYER:
            # NOTE: every reduce task of this call has consumed its block's pieces, and no peer
            # puts pieces for the next call before this rank dispatches it: safe to clear
            if holds_reduce:
                b = tl.arange(0, M.COUNTERS_P)
                n = M.GROUPS * M.TOKEN_BLOCKS
                tl.store(mine.combine_count + b, tl.full([M.COUNTERS_P], 0, tl.int32), mask=b < n)
        bad_id_call = tl.load(state.routing_err)
        if holds_reduce:  # this launch ends the call
            note_skipped(state.err, epoch)
            note_call_end(state.err, epoch)
            if (bad_id_call != 0) & (bad_id_call != epoch):
                poisoned = state.routing_err + ROUTING_POISONED
                tl.store(poisoned, tl.load(poisoned) + 1)
                tl.store(poisoned + 1, tl.cast(epoch, tl.int64))
            if M.LAYER:
                if not no_error(state.err):
                    _fill_output_nan(out_ptr, num_tokens, M)
        raise_alarm(state.alarm, state.err, bad_id_call != 0)


@triton.jit
def _fill_output_nan(out_ptr, num_tokens, M: tl.constexpr):
    """``out[:num_tokens] = NaN`` by one program: a failed call's output (an error path)."""
    t0 = tl.zeros((), tl.int32)
    while t0 < num_tokens:
        t_end = tl.minimum(t0 + M.REDUCE_TOKENS, num_tokens)
        for g in range(M.GROUPS):
            tile_fill_nan(out_ptr, t0, t_end, g * M.GROUP_COLS, M.H, M.REDUCE_TOKENS, M.GROUP_COLS)
        t0 += M.REDUCE_TOKENS
