"""The plan's first two kernels, which never wait (DESIGN §4.1).

Shape legend: T tokens on this rank, K top-k, R ranks, L physical slots per rank, P = R * L, NC
chunks of CT tokens (64 (token, k) pairs).

``plan_count_kernel`` resolves every (token, k) to a physical slot through the placement tables
and histograms each chunk: rows per slot, and *units* per send group (with token saving, the first
slot of each (token, destination rank)). It is the one place that reads every routing id: an id
outside [-1, E) is dropped, so no kernel ever indexes with it, and the first one is recorded
(``report_bad_id``) for the host to raise and the top-k reduce to poison the call's output.

``plan_scan_kernel``: an exclusive scan of the chunk histograms down the chunks, column-parallel
(each program scans a few of the 2 * P columns), in place, giving every chunk its rows and units
before it. The last program out writes this rank's counts into every peer's symmetric count table
(row ``rank``, parity ``epoch % 2``) and raises ``counts_ready[rank] = epoch`` there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class PlacementTables(NamedTuple):
    """The placement as the count kernel reads it (``megakernel.placement``), int32."""

    replica: torch.Tensor  # [E, MAX_REPLICAS] physical slots of each expert
    num_replicas: torch.Tensor  # [E]
    on_rank: torch.Tensor  # [E] this rank's replica of each expert, -1 if none


# the routing error record: [call epoch (0: none), token, k, id], the first bad id of a call,
# then [later calls poisoned, the last of them] (the megakernel's last program out counts them)
ROUTING_ERR_WORDS = 6
ROUTING_POISONED = tl.constexpr(4)


@triton.jit
def report_bad_id(e, bad, t, k, routing_err_ptr, epoch, M: tl.constexpr):
    """Record the first of the ``bad`` ids ``e`` (token ``t``, slot ``k``) of call ``epoch``,
    unless a record is there already (the host clears it when it raises)."""
    pair = tl.where(bad, t * M.K + k, 2**31 - 1)
    first = tl.min(tl.min(pair, 1), 0)
    value = tl.sum(tl.sum(tl.where(pair == first, e, 0), 1), 0)
    zero = tl.zeros((), tl.int64)
    if tl.atomic_cas(routing_err_ptr, zero, tl.cast(epoch, tl.int64), sem="relaxed") == 0:
        tl.store(routing_err_ptr + 1, tl.cast(first // M.K, tl.int64))
        tl.store(routing_err_ptr + 2, tl.cast(first % M.K, tl.int64))
        tl.store(routing_err_ptr + 3, tl.cast(value, tl.int64))


@triton.jit
def resolve_block(ids_ptr, placement, t0, T, routing_err_ptr, epoch, M: tl.constexpr):
    """[CT, K_P] physical slots of tokens [t0, t0 + CT): this rank's replica if it has one, else
    replica ``token % num_replicas``; -1 for dropped and padding, and for an id outside [-1, E),
    which is recorded as the call's error."""
    t = t0 + tl.arange(0, M.CT)[:, None]
    k = tl.arange(0, M.K_P)[None, :]
    inside = (t < T) & (k < M.K)
    e = tl.load(ids_ptr + t * M.K + k, mask=inside, other=-1)
    bad = inside & ((e < -1) | (e >= M.E))
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        report_bad_id(e, bad, t, k, routing_err_ptr, epoch, M)
    live = inside & (e >= 0) & (e < M.E)
    on_rank = tl.load(placement.on_rank + e, mask=live, other=-1)
    num_rep = tl.load(placement.num_replicas + e, mask=live, other=1)
    spread = tl.load(placement.replica + e * M.MAX_REPLICAS + t % num_rep, mask=live, other=-1)
    return tl.where(live, tl.where(on_rank >= 0, on_rank, spread), -1)


@triton.jit
def group_of(slot, R: tl.constexpr, L: tl.constexpr, SORTED: tl.constexpr):
    """Send group of physical slots (see ``megakernel.reference.group_of_slot``)."""
    if SORTED:
        return (slot % L) * R + slot // L
    else:
        return slot // L


@triton.jit
def first_slots(phys, L: tl.constexpr):
    """[CT, K_P] True where (t, k) is the token's lowest slot at its destination rank."""
    valid = phys >= 0
    dst = tl.where(valid, phys // L, -1)
    same = (dst[:, :, None] == dst[:, None, :]) & valid[:, None, :]
    earlier = same & (phys[:, None, :] < phys[:, :, None])
    return valid & (tl.sum(earlier.to(tl.int32), 2) == 0)


@triton.jit
def _count_chunk(
    ids_ptr, placement, phys_ptr, chunk_rows_ptr, c, T, routing_err_ptr, epoch, M: tl.constexpr
):
    """Resolve chunk c's tokens to physical slots and store its two histograms: rows per slot
    and units per send group."""
    phys = resolve_block(ids_ptr, placement, c * M.CT, T, routing_err_ptr, epoch, M)
    t = c * M.CT + tl.arange(0, M.CT)[:, None]
    k = tl.arange(0, M.K_P)[None, :]
    tl.store(phys_ptr + t * M.K + k, phys, mask=(t < T) & (k < M.K))
    valid = phys >= 0
    if M.TOKEN_SAVING:
        units = first_slots(phys, M.L)
    else:
        units = valid
    flat = tl.reshape(tl.where(valid, phys, 0), [M.CT * M.K_P])
    h_all = tl.histogram(flat, M.P_P, mask=tl.reshape(valid, [M.CT * M.K_P]))
    groups = group_of(flat, M.R, M.L, M.SORTED)
    h_units = tl.histogram(groups, M.P_P, mask=tl.reshape(units, [M.CT * M.K_P]))
    p = tl.arange(0, M.P_P)
    tl.store(chunk_rows_ptr + (c * 2) * M.P_P + p, h_all)
    tl.store(chunk_rows_ptr + (c * 2 + 1) * M.P_P + p, h_units)


@triton.jit
def _count_pairs(ids_ptr, c, T, pairs_ptr, M: tl.constexpr):
    """Routing statistics: ``pairs[a * E + b] += 1`` for every two experts a < b that a token
    of chunk c chose (ids outside [0, E) left out)."""
    t = c * M.CT + tl.arange(0, M.CT)[:, None]
    k = tl.arange(0, M.K_P)[None, :]
    e = tl.load(ids_ptr + t * M.K + k, mask=(t < T) & (k < M.K), other=-1)
    e = tl.where((e >= 0) & (e < M.E), e, -1)
    a, b = e[:, :, None], e[:, None, :]  # [CT, K_P, K_P]
    both = (a >= 0) & (a < b)
    tl.atomic_add(pairs_ptr + tl.where(both, a * M.E + b, 0), 1, mask=both, sem="relaxed")


@triton.jit(do_not_specialize=["T"])
def plan_count_kernel(
    ids_ptr,  # [T, K] int32 logical experts, -1 dropped
    placement,  # PlacementTables
    phys_ptr,  # [T, K] int32 out
    chunk_rows_ptr,  # [NC, 2, P_P] int32 out: per chunk, rows per slot and units per group
    routing_err_ptr,  # [ROUTING_ERR_WORDS] int64: the first bad id of a call (report_bad_id)
    pairs_ptr,  # [E * E] int64 routing statistics: co-selected pairs of sampled tokens
    epoch_ptr,  # [1] int64: the last call's epoch (plan_scan_kernel bumps it after this kernel)
    T,
    M: tl.constexpr,  # PlanMeta
):
    c = tl.program_id(0)
    epoch = tl.load(epoch_ptr) + 1  # this call's
    num_chunks = tl.maximum(tl.cdiv(T, M.CT), 1)
    while c < num_chunks:  # persistent: the grid may be smaller than the chunk count
        _count_chunk(ids_ptr, placement, phys_ptr, chunk_rows_ptr, c, T, routing_err_ptr, epoch, M)
        if c % M.PAIR_SAMPLE == 0:
            _count_pairs(ids_ptr, c, T, pairs_ptr, M)
        c += tl.num_programs(0)


@triton.jit
def _publish_counts(totals_ptr, counts_base, ready_base, rank, epoch, M: tl.constexpr):
    """This rank's rows per slot into every peer's count table, then ``counts_ready`` there."""
    P: tl.constexpr = M.R * M.L
    p = tl.arange(0, M.P_P)
    rows = tl.load(totals_ptr + p)
    d = tl.arange(0, M.R_P)
    row = (epoch % 2) * M.R + rank  # parity double-buffers the table (see PlanWorkspace)
    dst = tl.load(counts_base + d, mask=d < M.R, other=0).to(tl.pointer_type(tl.int32))
    ptrs = dst[:, None] + row * P + p[None, :]
    every = tl.broadcast_to(rows[None, :], (M.R_P, M.P_P))
    tl.store(ptrs, every, mask=(d[:, None] < M.R) & (p[None, :] < P))
    tl.debug_barrier()  # every thread's count stores before the releases below
    ready = tl.load(ready_base + d, mask=d < M.R, other=0).to(tl.pointer_type(tl.int64)) + rank
    tl.atomic_xchg(ready, tl.cast(epoch, tl.int64), mask=d < M.R, sem="release", scope="sys")


@triton.jit(do_not_specialize=["rank", "T"])
def plan_scan_kernel(
    chunk_rows_ptr,  # [NC, 2, P_P] int32: histograms in, exclusive prefixes over chunks out
    totals_ptr,  # [2, P_P] int32 out: this rank's rows per slot and units per group
    arrive_ptr,  # [1] int32: programs done; 0 between calls (the last one resets it)
    counts_base,  # [R] int64: every rank's sym counts [2, R, P]
    ready_base,  # [R] int64: every rank's sym counts_ready [R]
    epoch_ptr,  # [1] int64: the last call's epoch; the last program out bumps it
    load_ptr,  # [P_P] int64 routing statistics: rows this rank sent to each slot, all calls
    rank,
    T,
    M: tl.constexpr,  # PlanMeta
):
    """Column-parallel exclusive scan of the chunk histograms (SCAN_COLS columns of the 2 * P_P
    per program, SCAN_ROWS chunks per step), in place; then the last program out publishes the
    counts."""
    CB: tl.constexpr = M.SCAN_COLS
    num_chunks = tl.maximum(tl.cdiv(T, M.CT), 1)
    block = tl.program_id(0)
    while block < (2 * M.P_P) // CB:
        col = block * CB + tl.arange(0, CB)[None, :]
        running = tl.zeros([CB], tl.int32)
        c0 = 0
        while c0 < num_chunks:
            c = c0 + tl.arange(0, M.SCAN_ROWS)[:, None]
            ptrs = chunk_rows_ptr + c * (2 * M.P_P) + col
            h = tl.load(ptrs, mask=c < num_chunks, other=0)
            tl.store(ptrs, running[None, :] + tl.cumsum(h, 0) - h, mask=c < num_chunks)
            running += tl.sum(h, 0)
            c0 += M.SCAN_ROWS
        tl.store(totals_ptr + block * CB + tl.arange(0, CB), running)
        block += tl.num_programs(0)
    tl.debug_barrier()  # this program's stores before its arrival below
    ticket = tl.atomic_add(arrive_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        tl.store(arrive_ptr, 0)
        # this call's epoch: bumped here, by the one program that publishes (saves a launch);
        # the layout kernel and the megakernel read it after this kernel, in stream order
        epoch = tl.load(epoch_ptr) + 1
        tl.store(epoch_ptr, epoch)
        _publish_counts(totals_ptr, counts_base, ready_base, rank, epoch, M)
        p = tl.arange(0, M.P_P)  # routing statistics: this call's rows per slot, added up
        tl.store(load_ptr + p, tl.load(load_ptr + p) + tl.load(totals_ptr + p))
