"""The plan's third kernel, ``plan_layout_kernel`` (DESIGN §4.2-4.4): it waits (bounded) for every
rank's counts, then computes, with no host round trip:

  - rounds: a call whose busiest rank would receive more than ``capacity`` rows runs as
    ``ceil(rows / capacity)`` rounds (every rank computes the same from the count table); round
    r carries rows ``[r C, (r + 1) C)`` of each receiver's order, sends every row (no token
    saving) and has its own tile and dispatch tables and stats row. More rounds than the call
    may take (``max_rounds``: 1 outside mode "layer") is an overflow, reported on every rank;
  - ``slot_pos [T, K]``: the row of each (token, k) in its destination's receive buffer, ordered
    local slot, then source rank, then token: the slot's base at its rank, plus the chunk's
    prefix from the scan, plus its rank within the chunk (a [64, 64] compare);
  - token saving: ``data_pos [T, K]`` (the row that carries the token's data at that
    destination, its first slot there) and ``first_at [T, R]`` ((token, destination) -> first
    slot row or -1);
  - ``send_units [U_max]``: (token * K + k) of every unit in send order: group, then token.
    Sorted dispatch groups by (local slot, destination), ``g = local * R + dst``, so every sender
    fills expert 0 of every receiver first; unsorted groups by destination only (``g = dst``);
    padded with -1;
  - this rank as receiver (table items any program takes): ``recv_offset [L, R]``,
    ``expert_start / expert_rows [L]``, the GEMM tile table and the dispatch task table.

Shape legend: T tokens on this rank, K top-k, R ranks, L physical slots per rank, P = R * L.

The dispatch task table holds, per round and task, (send group, first unit, units, tasks of the
group in the round): a chunk of one group's units, every group with at least one task per round
so that an empty group still raises its flags; rows past the round's tasks are zero. The kernel
reads no other task table: GEMM1, down and reduce task ids follow from the tile count
(``megakernel.tasks``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megakernel.ops.dispatch import DISPATCH_TASK_COLS
from megakernel.ops.gemm import TILE_COLS
from megakernel.plan.count import first_slots, group_of
from symm_mem.device import deadline_in, report_overflow, wait_flags

STATS_COLS = tl.constexpr(8)  # a round's row of the stats (plan.config.STATS_STRIDE)


class LayoutOut(NamedTuple):
    """What the layout kernel writes (int32): this rank's plan of the call (``Plan``)."""

    all_counts: torch.Tensor  # [R, P] a local copy of this call's count table
    slot_pos: torch.Tensor  # [T, K]
    data_pos: torch.Tensor  # [T, K]
    first_at: torch.Tensor  # [T, R]
    send_units: torch.Tensor  # [U_max]
    recv_offset: torch.Tensor  # [L, R]
    expert_start: torch.Tensor  # [L]
    expert_rows: torch.Tensor  # [L]
    tiles: torch.Tensor  # [rounds, max_tiles, TILE_COLS]
    dispatch_tasks: torch.Tensor  # [rounds, max_dispatch, DISPATCH_TASK_COLS]
    stats: torch.Tensor  # [rounds, STATS_STRIDE] megakernel.plan.STATS, then padding
    round_calls: torch.Tensor  # [2] int64: calls that took rounds, and their rounds


@triton.jit
def _exclusive_cumsum(x):
    return tl.cumsum(x, 0) - x


@triton.jit
def _in_round(first, rows, rnd, C):
    """(rows before round ``rnd``, rows inside it) of the receive rows ``[first, first + rows)``,
    which rounds cut every ``C`` rows."""
    before = tl.minimum(tl.maximum(rnd * C - first, 0), rows)
    upto = tl.minimum(tl.maximum((rnd + 1) * C - first, 0), rows)
    return before, upto - before


@triton.jit
def chunk_ranks(slot, member, base, CE: tl.constexpr):
    """Rows of a chunk's members in token order: ``base[slot]`` (rows before this chunk) plus
    the members of the same slot earlier in the chunk."""
    # one key per member, slot-major: the same slot's earlier members hold the keys in
    # [slot * CE, own key), so the [CE, CE] compare needs two operands, not three (registers)
    slot = tl.where(member, slot, 0)
    key = tl.where(member, slot * CE + tl.arange(0, CE), -1)
    # [j, i]: the reduction runs down axis 0, which Triton keeps within a thread's registers
    earlier = (key[:, None] >= (slot * CE)[None, :]) & (key[:, None] < key[None, :])
    return tl.gather(base, slot, 0) + tl.sum(earlier.to(tl.int32), 0)


@triton.jit
def count_at_most(ends, x, N: tl.constexpr):
    """For each x, how many of the non-decreasing ``ends [N]`` are <= x: a binary search of
    log2(N) + 1 gathers (an [x, N] compare would hold x * N values in registers)."""
    pos = tl.zeros(x.shape, tl.int32)
    step = tl.full((), N, tl.int32)
    while step > 0:
        probe = pos + step
        hit = (probe <= N) & (tl.gather(ends, tl.minimum(probe, N) - 1, 0) <= x)
        pos = tl.where(hit, probe, pos)
        step = step // 2
    return pos


@triton.jit
def _token_rows(phys, slot_pos, first, L: tl.constexpr, R_P: tl.constexpr):
    """data_pos [CT, K_P] (the first slot's row at the same destination) and first_at [CT, R_P]."""
    valid = phys >= 0
    dst = tl.where(valid, phys // L, -1)
    same_first = (dst[:, :, None] == dst[:, None, :]) & first[:, None, :] & valid[:, :, None]
    data_pos = tl.sum(tl.where(same_first, slot_pos[:, None, :] + 1, 0), 2) - 1
    d = tl.arange(0, R_P)
    at = (dst[:, None, :] == d[None, :, None]) & first[:, None, :]
    first_at = tl.sum(tl.where(at, slot_pos[:, None, :] + 1, 0), 2) - 1
    return data_pos, first_at


@triton.jit
def _row_bases(all_counts, totals_ptr, rank, M: tl.constexpr):
    """Per slot p, the rows of p at its rank before this rank's first (every (local slot,
    source rank) block before this rank's, DESIGN §4.2); per send group, the units of the
    groups before it."""
    p = tl.arange(0, M.P_P)
    s = tl.arange(0, M.R_P)
    rows_p = tl.sum(all_counts, 0)
    start_in_dst = _exclusive_cumsum(rows_p)
    start_in_dst -= tl.gather(start_in_dst, (p // M.L) * M.L, 0)
    slot_base = start_in_dst + tl.sum(tl.where(s[:, None] < rank, all_counts, 0), 0)
    unit_base = _exclusive_cumsum(tl.load(totals_ptr + M.P_P + p))
    return slot_base, unit_base


@triton.jit
def _slot_of_group(g, M: tl.constexpr):
    """The slot of sorted send group ``g = local * R + dst`` (``dst * L + local``; clamped to a
    valid index past the last group)."""
    return tl.minimum((g % M.R) * M.L + g // M.R, M.P_P - 1)


@triton.jit
def _send_first(totals_ptr, M: tl.constexpr):
    """[P_P] per slot p, the send position of this rank's first row of p in a call of several
    rounds, where every row is a unit: groups in send order, a group's slots in slot order, a
    slot's rows in token order (so a round's rows of one group are consecutive)."""
    P: tl.constexpr = M.R * M.L
    p = tl.arange(0, M.P_P)
    rows_p = tl.load(totals_ptr + p)
    if M.SORTED:  # group g = local * R + dst holds slot dst * L + local alone
        rows_g = tl.where(p < P, tl.gather(rows_p, _slot_of_group(p, M), 0), 0)
        g_of_p = tl.where(p < P, group_of(p, M.R, M.L, M.SORTED), p)
        return tl.gather(_exclusive_cumsum(rows_g), g_of_p, 0)
    else:  # group dst holds its slots in slot order: slot order is send order
        return _exclusive_cumsum(rows_p)


@triton.jit
def _round_units(totals_ptr, slot_base, rnd, n_rounds, capacity, M: tl.constexpr):
    """(first unit [P_P], units [P_P]) of each send group in round ``rnd``. One round: the
    units the scan counted (with token saving, one per (token, destination)); several: every
    row is a unit, and round ``rnd`` holds the rows at positions ``[rnd C, (rnd + 1) C)`` of
    their destination."""
    g = tl.arange(0, M.P_P)
    units_g = _group_units(totals_ptr, M.P_P)
    if n_rounds > 1:
        P: tl.constexpr = M.R * M.L
        rows_p = tl.load(totals_ptr + g)
        before_p, in_p = _in_round(slot_base, rows_p, rnd, capacity)
        if M.SORTED:
            slot_of_g = _slot_of_group(g, M)
            first_g = tl.gather(_send_first(totals_ptr, M) + before_p, slot_of_g, 0)
            units_g = tl.where(g < P, tl.gather(in_p, slot_of_g, 0), 0)
        else:  # sums over each destination's L slots, from inclusive prefix sums
            lo = tl.minimum(g * M.L, M.P_P - 1)
            hi = tl.minimum(g * M.L + M.L - 1, M.P_P - 1)
            cum_before, cum_in = tl.cumsum(before_p, 0), tl.cumsum(in_p, 0)
            seg_before = tl.gather(cum_before, hi, 0) - tl.gather(cum_before - before_p, lo, 0)
            seg_in = tl.gather(cum_in, hi, 0) - tl.gather(cum_in - in_p, lo, 0)
            first_g = tl.gather(_exclusive_cumsum(rows_p), lo, 0) + seg_before
            units_g = tl.where(g < M.R, seg_in, 0)
    else:
        first_g = _exclusive_cumsum(units_g)
    return first_g, units_g


@triton.jit
def _layout_chunk(
    phys_ptr, chunk_rows_ptr, totals_ptr, out, slot_base, unit_base, c, T, n_rounds, capacity,
    M: tl.constexpr,
):  # fmt: skip
    """Rows, data rows, first slots and send positions of chunk c's tokens: the bases plus the
    chunk's prefix from the scan, plus the ranks within the chunk (a [CE, CE] compare). Rows
    are stored within their round (position mod ``capacity``)."""
    CE: tl.constexpr = M.CT * M.K_P
    p = tl.arange(0, M.P_P)
    slot_first = slot_base + tl.load(chunk_rows_ptr + (c * 2) * M.P_P + p)
    unit_first = unit_base + tl.load(chunk_rows_ptr + (c * 2 + 1) * M.P_P + p)
    t = c * M.CT + tl.arange(0, M.CT)[:, None]
    k = tl.arange(0, M.K_P)[None, :]
    inside = (t < T) & (k < M.K)
    phys = tl.load(phys_ptr + t * M.K + k, mask=inside, other=-1)
    valid = phys >= 0
    first = first_slots(phys, M.L)
    flat = tl.reshape(phys, [CE])
    rows = chunk_ranks(flat, tl.reshape(valid, [CE]), slot_first, CE)
    virtual = tl.reshape(rows, [M.CT, M.K_P])  # position in the destination's whole order
    slot_pos = tl.where(valid, virtual % capacity, -1)
    tl.store(out.slot_pos + t * M.K + k, slot_pos, mask=inside)
    data_pos, first_at = _token_rows(phys, slot_pos, first, M.L, M.R_P)
    if n_rounds > 1:  # every row a unit, in (group, slot, token) order
        slot = tl.where(valid, phys, 0)
        base = tl.gather(_send_first(totals_ptr, M) - slot_base, tl.reshape(slot, [CE]), 0)
        at = tl.reshape(base, [M.CT, M.K_P]) + virtual
        tl.store(out.send_units + at, t * M.K + k, mask=valid)
        data_pos = slot_pos
    else:
        units = first if M.TOKEN_SAVING else valid
        groups = group_of(flat, M.R, M.L, M.SORTED)
        send = chunk_ranks(groups, tl.reshape(units, [CE]), unit_first, CE)
        tl.store(out.send_units + tl.reshape(send, [M.CT, M.K_P]), t * M.K + k, mask=units)
        if not M.TOKEN_SAVING:
            data_pos = slot_pos
    tl.store(out.data_pos + t * M.K + k, data_pos, mask=inside)
    d = tl.arange(0, M.R_P)[None, :]
    tl.store(out.first_at + t * M.R + d, first_at, mask=(t < T) & (d < M.R))


@triton.jit
def _slot_rows(counts_ptr, parity, rank, M: tl.constexpr):
    """[L_P, R_P] rows this rank receives per (local slot, source rank), from the count table."""
    P: tl.constexpr = M.R * M.L
    local = tl.arange(0, M.L_P)[:, None]
    s = tl.arange(0, M.R_P)[None, :]
    inside = (local < M.L) & (s < M.R)
    return tl.load(counts_ptr + (parity * M.R + s) * P + rank * M.L + local, mask=inside, other=0)


@triton.jit
def _group_units(totals_ptr, P_P: tl.constexpr):
    """[P_P] units this rank sends per send group (0 past the last group)."""
    return tl.load(totals_ptr + P_P + tl.arange(0, P_P))


@triton.jit
def _group_chunks(units_g, G, CHUNK: tl.constexpr):
    """[P_P] dispatch tasks per group: one per CHUNK units, and one for an empty group (it still
    raises the group's flag)."""
    g = tl.arange(0, units_g.shape[0])
    return tl.where(g < G, tl.maximum(tl.cdiv(units_g, CHUNK), 1), 0)


@triton.jit
def _summary_item(cnt, counts_ptr, parity, totals_ptr, slot_base, out, call, M: tl.constexpr):
    """The count table copy, receive offsets, per-slot rows, and each round's stats row (rows
    past the call's rounds: no work). ``call``: (capacity, rounds, max_rounds)."""
    capacity, n_rounds, max_rounds = call
    P: tl.constexpr = M.R * M.L
    s = tl.arange(0, M.R_P)
    p = tl.arange(0, M.P_P)
    in_table = (s[:, None] < M.R) & (p[None, :] < P)
    table = tl.load(counts_ptr + (parity * M.R + s[:, None]) * P + p[None, :], mask=in_table)
    tl.store(out.all_counts + s[:, None] * P + p[None, :], table, mask=in_table)
    offset = tl.reshape(_exclusive_cumsum(tl.reshape(cnt, [M.L_P * M.R_P])), [M.L_P, M.R_P])
    local = tl.arange(0, M.L_P)
    in_offsets = (local[:, None] < M.L) & (s[None, :] < M.R)
    tl.store(out.recv_offset + local[:, None] * M.R + s[None, :], offset, mask=in_offsets)
    rows = tl.sum(cnt, 1)
    tl.store(out.expert_rows + local, rows, mask=local < M.L)
    tl.store(out.expert_start + local, _exclusive_cumsum(rows), mask=local < M.L)
    G: tl.constexpr = M.R * M.L if M.SORTED else M.R
    recv = tl.sum(rows, 0)
    rnd = tl.zeros((), tl.int32)
    while rnd < max_rounds:
        _, units_g = _round_units(totals_ptr, slot_base, rnd, n_rounds, capacity, M)
        _, seg = _in_round(_exclusive_cumsum(rows), rows, rnd, capacity)
        live = rnd < n_rounds
        row = out.stats + rnd * STATS_COLS
        tl.store(row + 0, tl.where(live, tl.sum(units_g, 0), 0))
        tl.store(row + 1, tl.minimum(tl.maximum(recv - rnd * capacity, 0), capacity))
        tl.store(row + 2, tl.sum(slot_tiles(seg, M.BLOCK_M, M.TAIL_ROWS), 0))
        tl.store(row + 3, tl.where(live, tl.sum(_group_chunks(units_g, G, M.CHUNK), 0), 0))
        tl.store(row + 4, n_rounds)
        rnd += 1


@triton.jit
def slot_tiles(seg, BLOCK_M: tl.constexpr, TAIL_ROWS: tl.constexpr):
    """Tiles of a slot's ``seg`` rows: BLOCK_M rows each, the last partial, except that a last
    one of at most TAIL_ROWS rows after a full one joins it (``KernelConfig.tail_rows``)."""
    n = tl.cdiv(seg, BLOCK_M)
    if TAIL_ROWS:
        n -= ((n >= 2) & (seg - (n - 1) * BLOCK_M <= TAIL_ROWS)).to(n.dtype)
    return n


@triton.jit
def _tile_chunk(c, rnd, cnt, counts_ptr, parity, rank, out, call, max_tiles, M: tl.constexpr):
    """Round ``rnd``'s tile table rows [c * TABLE_ROWS, (c + 1) * TABLE_ROWS): BLOCK_M rows of
    one local slot per tile (a slot's last one fewer, or up to TAIL_ROWS more: ``slot_tiles``),
    in slot order, none across a round's edge; rows as stored (within the round)."""
    capacity = call[0]
    rows_l = tl.sum(cnt, 1)
    start_l = _exclusive_cumsum(rows_l)
    before_l, seg_l = _in_round(start_l, rows_l, rnd, capacity)
    n_tiles = slot_tiles(seg_l, M.BLOCK_M, M.TAIL_ROWS)
    tile_end = tl.cumsum(n_tiles, 0)
    lo = tl.arange(0, M.L_P)
    i = c * M.TABLE_ROWS + tl.arange(0, M.TABLE_ROWS)
    local = count_at_most(tl.where(lo < M.L, tile_end, 2**31 - 1), i, M.L_P)
    local = tl.minimum(local, M.L - 1)
    m = i - tl.gather(tile_end - n_tiles, local, 0)
    first = tl.gather(start_l, local, 0)  # the slot's first row in the whole receive order
    row0 = first + tl.gather(before_l, local, 0) + m * M.BLOCK_M
    rest = tl.gather(seg_l, local, 0) - m * M.BLOCK_M  # the slot's rows from this tile on
    rows = tl.where(m + 1 < tl.gather(n_tiles, local, 0), M.BLOCK_M, rest)
    # source blocks of this slot end at its first row + inclusive cumsum of its per-source rows
    # NOTE: loaded from the (read-only) count table: a 2-D tl.gather hits a Triton 3.6 assertion
    s = tl.arange(0, M.R_P)[None, :]
    cnt_ptrs = counts_ptr + (parity * M.R + s) * (M.R * M.L) + rank * M.L + local[:, None]
    cnt_rows = tl.load(cnt_ptrs, mask=s < M.R, other=0)  # [TABLE_ROWS, R_P]
    ends = first[:, None] + tl.cumsum(cnt_rows, 1)
    src_lo = tl.sum((ends <= row0[:, None]).to(tl.int32), 1)
    src_hi = tl.sum((ends <= (row0 + rows - 1)[:, None]).to(tl.int32), 1)
    live = i < tl.sum(n_tiles, 0)
    row = out.tiles + (rnd * max_tiles + i) * TILE_COLS
    inside = i < max_tiles
    tl.store(row + 0, tl.where(live, local, -1), mask=inside)
    tl.store(row + 1, tl.where(live, row0 - rnd * capacity, 0), mask=inside)
    tl.store(row + 2, tl.where(live, rows, 0), mask=inside)
    tl.store(row + 3, tl.where(live, src_lo, 0), mask=inside)
    tl.store(row + 4, tl.where(live, src_hi, 0), mask=inside)
    tl.store(row + 5, tl.where(live, m, 0), mask=inside)
    tl.store(row + 6, tl.where(live, tl.gather(n_tiles, local, 0), 0), mask=inside)


@triton.jit
def _dispatch_chunk(c, rnd, totals_ptr, slot_base, out, call, max_dispatch, M: tl.constexpr):
    """Round ``rnd``'s dispatch table rows [c * TABLE_ROWS, (c + 1) * TABLE_ROWS): chunks of
    each group's units, groups in send order, with the group's task count; zero rows past the
    last."""
    capacity, n_rounds, _ = call
    G: tl.constexpr = M.R * M.L if M.SORTED else M.R
    g = tl.arange(0, M.P_P)
    first_g, units_g = _round_units(totals_ptr, slot_base, rnd, n_rounds, capacity, M)
    n_chunks = _group_chunks(units_g, G, M.CHUNK)
    chunk_end = tl.cumsum(n_chunks, 0)
    i = c * M.TABLE_ROWS + tl.arange(0, M.TABLE_ROWS)
    grp = tl.minimum(count_at_most(tl.where(g < G, chunk_end, 2**31 - 1), i, M.P_P), G - 1)
    m = i - tl.gather(chunk_end - n_chunks, grp, 0)
    start = tl.gather(first_g, grp, 0) + m * M.CHUNK
    count = tl.minimum(M.CHUNK, tl.gather(units_g, grp, 0) - m * M.CHUNK)
    live = i < tl.sum(n_chunks, 0)
    row = out.dispatch_tasks + (rnd * max_dispatch + i) * DISPATCH_TASK_COLS
    inside = i < max_dispatch
    tl.store(row + 0, tl.where(live, grp, 0), mask=inside)
    tl.store(row + 1, tl.where(live, start, 0), mask=inside)
    tl.store(row + 2, tl.where(live, count, 0), mask=inside)
    tl.store(row + 3, tl.where(live, tl.gather(n_chunks, grp, 0), 0), mask=inside)


@triton.jit
def _pad_chunk(c, totals_ptr, out, n_rounds, max_units, M: tl.constexpr):
    """send_units past the last unit hold -1."""
    num_units = tl.sum(_group_units(totals_ptr, M.P_P), 0)
    if n_rounds > 1:  # every row a unit
        num_units = tl.sum(tl.load(totals_ptr + tl.arange(0, M.P_P)), 0)
    i = c * M.PAD_ROWS + tl.arange(0, M.PAD_ROWS)
    pad = tl.full([M.PAD_ROWS], -1, tl.int32)
    tl.store(out.send_units + i, pad, mask=(i >= num_units) & (i < max_units))


@triton.jit
def _table_item(
    j, counts_ptr, parity, rank, totals_ptr, slot_base, out, call, sizes, M: tl.constexpr
):  # fmt: skip
    """Receiver-side table item j: 0 summary, then per round its tile chunks and dispatch-table
    chunks, then send_units padding chunks. Items are independent, so any program can take
    any. ``call``: (capacity, rounds, max_rounds); ``sizes``: (max_units, max_dispatch,
    max_tiles), the last two per round."""
    max_units, max_dispatch, max_tiles = sizes
    n_rounds = call[1]
    cnt = _slot_rows(counts_ptr, parity, rank, M)
    n_tile = tl.cdiv(max_tiles, M.TABLE_ROWS)
    n_disp = tl.cdiv(max_dispatch, M.TABLE_ROWS)
    per_round = n_tile + n_disp
    if j == 0:
        _summary_item(cnt, counts_ptr, parity, totals_ptr, slot_base, out, call, M)
    elif j - 1 < n_rounds * per_round:
        rnd = (j - 1) // per_round
        k = (j - 1) % per_round
        if k < n_tile:
            _tile_chunk(k, rnd, cnt, counts_ptr, parity, rank, out, call, max_tiles, M)
        else:
            _dispatch_chunk(k - n_tile, rnd, totals_ptr, slot_base, out, call, max_dispatch, M)
    else:
        _pad_chunk(j - 1 - n_rounds * per_round, totals_ptr, out, n_rounds, max_units, M)


@triton.jit
def _rounds(all_counts, err_ptr, rank, capacity, max_rounds, epoch, M: tl.constexpr):
    """The call's rounds: ceil(rows / capacity) for the rank that receives the most rows (every
    rank computes it from the same count table). More than ``max_rounds`` is an overflow, which
    every rank reports (program 0 records it); returns 0 then."""
    p = tl.arange(0, M.P_P)
    rows_p = tl.sum(all_counts, 0)
    d = tl.arange(0, M.R_P)
    recv_total = tl.sum(tl.where((p[None, :] // M.L) == d[:, None], rows_p[None, :], 0), 1)
    recv_total = tl.where(d < M.R, recv_total, 0)
    worst = tl.max(recv_total, 0)
    n_rounds = tl.maximum(tl.cdiv(worst, capacity), 1)
    if n_rounds > max_rounds:
        n_rounds = 0
        if tl.program_id(0) == 0:
            worst_rank = tl.argmax(recv_total, 0)
            report_overflow(err_ptr, rank, worst_rank, worst, capacity * max_rounds, epoch)
    return n_rounds


@triton.jit(do_not_specialize=["rank", "T", "capacity", "max_rounds", "timeout_ns"])
def plan_layout_kernel(
    phys_ptr,  # [T, K] int32 (from plan_count_kernel)
    chunk_rows_ptr,  # [NC, 2, P_P] int32: per chunk, rows and units before it (plan_scan_kernel)
    totals_ptr,  # [2, P_P] int32
    counts_ptr,  # this rank's sym counts [2, R, P]
    ready_ptr,  # this rank's sym counts_ready [R] int64
    out,  # LayoutOut
    err_ptr,
    epoch_ptr,  # [1] int64: this call's epoch
    rank,
    T,
    capacity,
    max_rounds,  # the most rounds this call may take (1: mode "layer" only runs rounds)
    timeout_ns,
    max_units,
    max_dispatch,  # per round
    max_tiles,  # per round
    M: tl.constexpr,  # PlanMeta
):
    P: tl.constexpr = M.R * M.L
    pid = tl.program_id(0)
    deadline = deadline_in(timeout_ns, err_ptr)
    epoch = tl.load(epoch_ptr)
    s = tl.arange(0, M.R_P)
    if not wait_flags(ready_ptr + s, s < M.R, epoch, deadline, err_ptr, rank, 0, pid):
        return
    p = tl.arange(0, M.P_P)
    in_table = (s[:, None] < M.R) & (p[None, :] < P)
    table = counts_ptr + ((epoch % 2) * M.R + s[:, None]) * P + p[None, :]
    all_counts = tl.load(table, mask=in_table, other=0)  # [R_P, P_P]
    n_rounds = _rounds(all_counts, err_ptr, rank, capacity, max_rounds, epoch, M)
    if n_rounds == 0:
        return
    if (pid == 0) & (n_rounds > 1):
        tl.store(out.round_calls, tl.load(out.round_calls) + 1)
        tl.store(out.round_calls + 1, tl.load(out.round_calls + 1) + n_rounds)
    slot_base, unit_base = _row_bases(all_counts, totals_ptr, rank, M)
    num_chunks = tl.maximum(tl.cdiv(T, M.CT), 1)
    per_round = tl.cdiv(max_tiles, M.TABLE_ROWS) + tl.cdiv(max_dispatch, M.TABLE_ROWS)
    num_items = num_chunks + 1 + n_rounds * per_round + tl.cdiv(max_units, M.PAD_ROWS)
    call = (capacity, n_rounds, max_rounds)
    item = pid
    while item < num_items:  # persistent; token chunks first, then receiver-side table items
        if item < num_chunks:
            _layout_chunk(
                phys_ptr, chunk_rows_ptr, totals_ptr, out, slot_base, unit_base, item, T,
                n_rounds, capacity, M,
            )  # fmt: skip
        else:
            sizes = (max_units, max_dispatch, max_tiles)
            _table_item(
                item - num_chunks, counts_ptr, epoch % 2, rank, totals_ptr, slot_base, out, call,
                sizes, M,
            )  # fmt: skip
        item += tl.num_programs(0)
