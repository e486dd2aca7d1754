"""The plan's third kernel, ``plan_layout_kernel`` (DESIGN §4.2-4.4): it waits (bounded) for every
rank's counts, then computes, with no host round trip:

  - overflow: if any rank would receive more than ``capacity`` rows, every rank reports it;
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

The dispatch task table holds, per task, (send group, first unit, units): a chunk of one group's
units, every group with at least one task so that an empty group still raises its flags; rows
past the call's tasks are zero. The kernel reads no other task table: GEMM1, down and reduce task
ids follow from the tile count (``megakernel.tasks``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megakernel.ops.dispatch import DISPATCH_TASK_COLS
from megakernel.ops.gemm import TILE_COLS
from megakernel.plan.count import first_slots, group_of
from symm_mem.device import globaltimer, report_overflow, wait_flags


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
    tiles: torch.Tensor  # [max_tiles, TILE_COLS]
    dispatch_tasks: torch.Tensor  # [max_dispatch, DISPATCH_TASK_COLS]
    stats: torch.Tensor  # [4] megakernel.plan.STATS


@triton.jit
def _exclusive_cumsum(x):
    return tl.cumsum(x, 0) - x


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
def _layout_chunk(
    phys_ptr, chunk_rows_ptr, out, slot_base, unit_base, c, T, M: tl.constexpr
):  # fmt: skip
    """Rows, data rows, first slots and send positions of chunk c's tokens: the bases plus the
    chunk's prefix from the scan, plus the ranks within the chunk (a [CE, CE] compare)."""
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
    slot_pos = tl.where(valid, tl.reshape(rows, [M.CT, M.K_P]), -1)
    tl.store(out.slot_pos + t * M.K + k, slot_pos, mask=inside)
    units = first if M.TOKEN_SAVING else valid
    groups = group_of(flat, M.R, M.L, M.SORTED)
    send = chunk_ranks(groups, tl.reshape(units, [CE]), unit_first, CE)
    tl.store(out.send_units + tl.reshape(send, [M.CT, M.K_P]), t * M.K + k, mask=units)
    data_pos, first_at = _token_rows(phys, slot_pos, first, M.L, M.R_P)
    tl.store(out.data_pos + t * M.K + k, data_pos if M.TOKEN_SAVING else slot_pos, mask=inside)
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
def _summary_item(cnt, counts_ptr, parity, totals_ptr, out, M: tl.constexpr):
    """The count table copy, receive offsets, per-slot rows and the call's stats."""
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
    units_g = _group_units(totals_ptr, M.P_P)
    tl.store(out.stats + 0, tl.sum(units_g, 0))
    tl.store(out.stats + 1, tl.sum(rows, 0))
    tl.store(out.stats + 2, tl.sum(tl.cdiv(rows, M.BLOCK_M), 0))
    G: tl.constexpr = M.R * M.L if M.SORTED else M.R
    tl.store(out.stats + 3, tl.sum(_group_chunks(units_g, G, M.CHUNK), 0))


@triton.jit
def _tile_chunk(c, cnt, counts_ptr, parity, rank, out, max_tiles, M: tl.constexpr):
    """Tile table rows [c * TABLE_ROWS, (c + 1) * TABLE_ROWS): BLOCK_M rows per local slot, in
    slot order."""
    rows_l = tl.sum(cnt, 1)
    n_tiles = tl.cdiv(rows_l, M.BLOCK_M)
    tile_end = tl.cumsum(n_tiles, 0)
    lo = tl.arange(0, M.L_P)
    i = c * M.TABLE_ROWS + tl.arange(0, M.TABLE_ROWS)
    local = count_at_most(tl.where(lo < M.L, tile_end, 2**31 - 1), i, M.L_P)
    local = tl.minimum(local, M.L - 1)
    m = i - tl.gather(tile_end - n_tiles, local, 0)
    row0 = tl.gather(_exclusive_cumsum(rows_l), local, 0) + m * M.BLOCK_M
    rows = tl.minimum(M.BLOCK_M, tl.gather(rows_l, local, 0) - m * M.BLOCK_M)
    # source blocks of this slot end at start + inclusive cumsum of its per-source rows
    # NOTE: loaded from the (read-only) count table: a 2-D tl.gather hits a Triton 3.6 assertion
    s = tl.arange(0, M.R_P)[None, :]
    cnt_ptrs = counts_ptr + (parity * M.R + s) * (M.R * M.L) + rank * M.L + local[:, None]
    cnt_rows = tl.load(cnt_ptrs, mask=s < M.R, other=0)  # [TABLE_ROWS, R_P]
    ends = row0[:, None] - m[:, None] * M.BLOCK_M + tl.cumsum(cnt_rows, 1)
    src_lo = tl.sum((ends <= row0[:, None]).to(tl.int32), 1)
    src_hi = tl.sum((ends <= (row0 + rows - 1)[:, None]).to(tl.int32), 1)
    live = i < tl.sum(n_tiles, 0)
    row = out.tiles + i * TILE_COLS
    inside = i < max_tiles
    tl.store(row + 0, tl.where(live, local, -1), mask=inside)
    tl.store(row + 1, tl.where(live, row0, 0), mask=inside)
    tl.store(row + 2, tl.where(live, rows, 0), mask=inside)
    tl.store(row + 3, tl.where(live, src_lo, 0), mask=inside)
    tl.store(row + 4, tl.where(live, src_hi, 0), mask=inside)


@triton.jit
def _dispatch_chunk(c, totals_ptr, out, max_dispatch, M: tl.constexpr):
    """Dispatch table rows [c * TABLE_ROWS, (c + 1) * TABLE_ROWS): chunks of each group's units,
    groups in send order; zero rows past the last."""
    G: tl.constexpr = M.R * M.L if M.SORTED else M.R
    g = tl.arange(0, M.P_P)
    units_g = _group_units(totals_ptr, M.P_P)
    n_chunks = _group_chunks(units_g, G, M.CHUNK)
    chunk_end = tl.cumsum(n_chunks, 0)
    i = c * M.TABLE_ROWS + tl.arange(0, M.TABLE_ROWS)
    grp = tl.minimum(count_at_most(tl.where(g < G, chunk_end, 2**31 - 1), i, M.P_P), G - 1)
    m = i - tl.gather(chunk_end - n_chunks, grp, 0)
    start = tl.gather(_exclusive_cumsum(units_g), grp, 0) + m * M.CHUNK
    count = tl.minimum(M.CHUNK, tl.gather(units_g, grp, 0) - m * M.CHUNK)
    live = i < tl.sum(n_chunks, 0)
    row = out.dispatch_tasks + i * DISPATCH_TASK_COLS
    inside = i < max_dispatch
    tl.store(row + 0, tl.where(live, grp, 0), mask=inside)
    tl.store(row + 1, tl.where(live, start, 0), mask=inside)
    tl.store(row + 2, tl.where(live, count, 0), mask=inside)


@triton.jit
def _pad_chunk(c, totals_ptr, out, max_units, M: tl.constexpr):
    """send_units past the last unit hold -1."""
    num_units = tl.sum(_group_units(totals_ptr, M.P_P), 0)
    i = c * M.PAD_ROWS + tl.arange(0, M.PAD_ROWS)
    pad = tl.full([M.PAD_ROWS], -1, tl.int32)
    tl.store(out.send_units + i, pad, mask=(i >= num_units) & (i < max_units))


@triton.jit
def _table_item(j, counts_ptr, parity, rank, totals_ptr, out, sizes, M: tl.constexpr):
    """Receiver-side table item j: 0 summary, then tile chunks, dispatch-table chunks and
    send_units padding chunks. Items are independent, so any program can take any. ``sizes``:
    (max_units, max_dispatch, max_tiles)."""
    max_units, max_dispatch, max_tiles = sizes
    cnt = _slot_rows(counts_ptr, parity, rank, M)
    n_tile = tl.cdiv(max_tiles, M.TABLE_ROWS)
    n_disp = tl.cdiv(max_dispatch, M.TABLE_ROWS)
    if j == 0:
        _summary_item(cnt, counts_ptr, parity, totals_ptr, out, M)
    elif j - 1 < n_tile:
        _tile_chunk(j - 1, cnt, counts_ptr, parity, rank, out, max_tiles, M)
    elif j - 1 - n_tile < n_disp:
        _dispatch_chunk(j - 1 - n_tile, totals_ptr, out, max_dispatch, M)
    else:
        _pad_chunk(j - 1 - n_tile - n_disp, totals_ptr, out, max_units, M)


@triton.jit
def _check_capacity(all_counts, err_ptr, rank, capacity, epoch, M: tl.constexpr):
    """Whether every rank's receive rows fit ``capacity``; every rank checks every rank's total,
    so an overflow is reported everywhere (program 0 records it)."""
    p = tl.arange(0, M.P_P)
    rows_p = tl.sum(all_counts, 0)
    d = tl.arange(0, M.R_P)
    recv_total = tl.sum(tl.where((p[None, :] // M.L) == d[:, None], rows_p[None, :], 0), 1)
    recv_total = tl.where(d < M.R, recv_total, 0)
    worst = tl.max(recv_total, 0)
    fits = worst <= capacity
    if not fits:
        if tl.program_id(0) == 0:
            worst_rank = tl.argmax(recv_total, 0)
            report_overflow(err_ptr, rank, worst_rank, worst, capacity, epoch)
    return fits


@triton.jit(do_not_specialize=["rank", "T", "capacity", "timeout_ns"])
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
    timeout_ns,
    max_units,
    max_dispatch,
    max_tiles,
    M: tl.constexpr,  # PlanMeta
):
    P: tl.constexpr = M.R * M.L
    pid = tl.program_id(0)
    deadline = globaltimer() + timeout_ns
    epoch = tl.load(epoch_ptr)
    s = tl.arange(0, M.R_P)
    if not wait_flags(ready_ptr + s, s < M.R, epoch, deadline, err_ptr, rank, 0, pid):
        return
    p = tl.arange(0, M.P_P)
    in_table = (s[:, None] < M.R) & (p[None, :] < P)
    table = counts_ptr + ((epoch % 2) * M.R + s[:, None]) * P + p[None, :]
    all_counts = tl.load(table, mask=in_table, other=0)  # [R_P, P_P]
    if not _check_capacity(all_counts, err_ptr, rank, capacity, epoch, M):
        return
    slot_base, unit_base = _row_bases(all_counts, totals_ptr, rank, M)
    num_chunks = tl.maximum(tl.cdiv(T, M.CT), 1)
    num_items = num_chunks + 1 + tl.cdiv(max_tiles, M.TABLE_ROWS)
    num_items += tl.cdiv(max_dispatch, M.TABLE_ROWS) + tl.cdiv(max_units, M.PAD_ROWS)
    item = pid
    while item < num_items:  # persistent; token chunks first, then receiver-side table items
        if item < num_chunks:
            _layout_chunk(phys_ptr, chunk_rows_ptr, out, slot_base, unit_base, item, T, M)
        else:
            sizes = (max_units, max_dispatch, max_tiles)
            _table_item(item - num_chunks, counts_ptr, epoch % 2, rank, totals_ptr, out, sizes, M)
        item += tl.num_programs(0)
