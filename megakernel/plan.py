"""The per-call dispatch plan, computed on the device (DESIGN §4-5).

Shape legend: T tokens on this rank (at most T_max), K top-k, R ranks, L physical slots per
rank, P = R * L physical slots (slot ``p = rank * L + local``), S receive rows on a rank
(at most ``capacity``), U send units, G send groups (P with sorted dispatch, else R).

Three kernels per call, one after the other on each rank's stream. The unit of work is a
*chunk* of CT tokens (64 (token, k) pairs), so a rank with a whole GPU spreads a call of 4096
tokens over ~500 programs at once; every step is latency-bound, not bandwidth-bound.

``plan_count_kernel`` (never waits): resolves every (token, k) to a physical slot through the
placement tables and histograms each chunk: rows per slot, and *units* per send group (with token
saving, the first slot of each (token, destination rank)).

``plan_scan_kernel`` (never waits): an exclusive scan of the chunk histograms down the chunks,
column-parallel (each program scans a few of the 2 * P columns), in place, giving every chunk its
rows and units before it. The last program out writes this rank's counts into every peer's
symmetric count table (row ``rank``, parity ``epoch % 2``) and raises ``counts_ready[rank] =
epoch`` there.

``plan_layout_kernel`` (waits for every rank's counts, bounded): from the all-ranks count table
``[R, P]`` and its own resolved slots it computes, with no host round trip:
  - overflow: if any rank would receive more than ``capacity`` rows, every rank reports it;
  - ``slot_pos [T, K]``: the row of each (token, k) in its destination's receive buffer, ordered
    local slot, then source rank, then token (DESIGN §4.2): the slot's base at its rank, plus the
    chunk's prefix from the scan, plus its rank within the chunk (a [64, 64] compare);
  - token saving: ``data_pos [T, K]`` (the row that carries the token's data at that destination,
    its first slot there) and ``first_at [T, R]`` ((token, destination) -> first slot row or -1);
  - ``send_units [U_max]``: (token * K + k) of every unit in send order: group, then token.
    Sorted dispatch groups by (local slot, destination), ``g = local * R + dst``, so every sender
    fills expert 0 of every receiver first; unsorted groups by destination only (``g = dst``);
    padded with -1;
  - this rank as receiver (table items any program takes): ``recv_offset [L, R]``,
    ``expert_start/rows [L]``,
    the grouped-GEMM tile table and the task table.

Task table (one call, ids in claim order): ``[0, max_dispatch_tasks)`` dispatch tasks (a chunk of
one group's units; every group has at least one task, so an empty group still raises its flags),
padded with NOPs, then ``max_tiles`` GEMM tile tasks, padded with NOPs. A tile of local slot l
covering source ranks [src_lo, src_hi] waits on ``expert_ready[l', s]`` for s in that range and
l' = l (l' <= l with token saving, since a row may point at the token's first slot, an earlier
local slot). Those flags are raised by dispatch tasks, which never wait: every wait targets a
dispatch task, so the DESIGN §5 rule holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from megakernel.placement import Placement, resolve_ref
from megakernel.routing import Routing, edge_case
from megakernel.validate import check_routing
from symm_mem.buffer import World
from symm_mem.device import globaltimer, report_overflow, wait_flags

KIND_NOP = 0
KIND_DISPATCH = 1
KIND_GEMM1 = 2
_DISPATCH = tl.constexpr(KIND_DISPATCH)  # the same kinds, for device code
_GEMM1 = tl.constexpr(KIND_GEMM1)
TASK_COLS = 4  # (kind, a, b, c): dispatch (group, unit start, unit count); gemm (tile, -, -)
TILE_COLS = 5  # (local slot, first row, rows, src_lo, src_hi); -1 local slot = empty
STATS = ("num_units", "num_recv", "num_tiles", "num_dispatch_tasks")
CHUNK_ELEMS = 64  # (token, k) pairs per chunk, the plan's unit of work: a [64, 64] compare
SCAN_COLS = 8  # histogram columns per scan program
SCAN_ROWS = 512  # chunks per step of a scan program
TABLE_BLOCK = 128  # tile/task table rows per table item
PAD_BLOCK = 1024  # send_units entries padded per item
PROGRAMS_PER_SM = 4  # plan programs per SM of a rank's share (see PlanWorkspace.max_programs)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@dataclass(frozen=True)
class PlanConfig:
    """Static sizes of one layer's plan (everything the kernels are compiled for)."""

    world_size: int  # R
    slots_per_rank: int  # L
    topk: int  # K
    max_tokens: int  # T_max
    capacity: int  # receive rows per rank
    block_m: int = 128  # grouped-GEMM tile rows
    chunk: int = 8  # units per dispatch task
    token_saving: bool = True
    sorted_dispatch: bool = True  # send order (local slot, dst, token); False: (dst, token)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PlanConfig.{f.name} must be a positive int, got {value!r}")

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    @property
    def num_groups(self) -> int:
        """G: send groups, each with its own dispatch tasks and completion flag(s)."""
        return self.num_slots if self.sorted_dispatch else self.world_size

    @property
    def tokens_per_chunk(self) -> int:
        return max(1, CHUNK_ELEMS // _pow2(self.topk))

    @property
    def max_chunks(self) -> int:
        return triton.cdiv(self.max_tokens, self.tokens_per_chunk)

    @property
    def max_units(self) -> int:
        per_token = min(self.topk, self.world_size) if self.token_saving else self.topk
        return self.max_tokens * per_token

    @property
    def max_dispatch_tasks(self) -> int:
        # full chunks, plus at most one partial (or, for an empty group, one empty) per group
        return self.max_units // self.chunk + self.num_groups

    @property
    def max_tiles(self) -> int:
        # full tiles, plus at most one partial tile per local slot
        return self.capacity // self.block_m + self.slots_per_rank

    @property
    def num_tasks(self) -> int:
        return self.max_dispatch_tasks + self.max_tiles

    def meta(self) -> dict[str, int | bool]:
        """Compile-time constants of the plan kernels."""
        return dict(
            K=self.topk,
            R=self.world_size,
            L=self.slots_per_rank,
            KP=_pow2(self.topk),
            RP=_pow2(self.world_size),
            LP=_pow2(self.slots_per_rank),
            PP=_pow2(self.num_slots),
            CT=self.tokens_per_chunk,
            TOKEN_SAVING=self.token_saving,
            SORTED=self.sorted_dispatch,
        )

    def layout_meta(self) -> dict[str, int | bool]:
        return dict(
            self.meta(),
            BLOCK_M=self.block_m,
            CHUNK=self.chunk,
            TB=TABLE_BLOCK,
            TBP=PAD_BLOCK,
        )


@dataclass
class Plan:
    """One rank's plan for one call (device tensors; the reference builds the same on cpu)."""

    phys: torch.Tensor  # [T, K] int32 physical slot, -1 dropped
    counts: torch.Tensor  # [P] int32 this rank's rows per slot
    all_counts: torch.Tensor  # [R, P] int32 every rank's counts (row s from rank s)
    slot_pos: torch.Tensor  # [T, K] int32 row at the destination, -1 dropped
    data_pos: torch.Tensor  # [T, K] int32 row carrying the data (first slot there with saving)
    first_at: torch.Tensor  # [T, R] int32 (token, dst) -> first slot row, -1 if none
    send_units: torch.Tensor  # [U_max] int32 token * K + k in send order, -1 padded
    recv_offset: torch.Tensor  # [L, R] int32 first row of (local slot, source rank)
    expert_start: torch.Tensor  # [L] int32
    expert_rows: torch.Tensor  # [L] int32
    tiles: torch.Tensor  # [max_tiles, TILE_COLS] int32
    tasks: torch.Tensor  # [num_tasks, TASK_COLS] int32
    stats: torch.Tensor  # [len(STATS)] int32

    def stat(self, name: str) -> int:
        return int(self.stats[STATS.index(name)])


# ----------------------------------------------------------------------------- reference


def group_of_slot(cfg: PlanConfig) -> torch.Tensor:
    """[P] send group of each physical slot: ``local * R + dst`` (sorted dispatch), else ``dst``."""
    p = torch.arange(cfg.num_slots)
    R, L = cfg.world_size, cfg.slots_per_rank
    return (p % L) * R + p // L if cfg.sorted_dispatch else p // L


def _first_mask(phys: torch.Tensor, L: int) -> torch.Tensor:
    """[T, K] True where (t, k) is the token's first (lowest) slot at that destination."""
    valid = phys >= 0
    dst = torch.where(valid, phys // L, -1)
    same = (dst.unsqueeze(2) == dst.unsqueeze(1)) & valid.unsqueeze(1)  # [T, K, K']
    earlier = same & (phys.unsqueeze(1) < phys.unsqueeze(2))
    return valid & ~earlier.any(dim=2)


def plan_ref(phys_all: list[torch.Tensor], cfg: PlanConfig, rank: int) -> Plan:
    """Rank ``rank``'s plan from every rank's physical slots ``[T_s, K]`` (torch, on cpu)."""
    R, L, K, P = cfg.world_size, cfg.slots_per_rank, cfg.topk, cfg.num_slots
    phys_all = [p.cpu().long() for p in phys_all]
    phys = phys_all[rank]
    T = phys.shape[0]
    all_counts = torch.stack([torch.bincount(p[p >= 0], minlength=P) for p in phys_all])  # [R, P]
    rows_p = all_counts.sum(0)
    recv_total = rows_p.view(R, L).sum(1)

    # sender: row of each (t, k) at its destination
    dst_start = (torch.cumsum(rows_p.view(R, L), 1) - rows_p.view(R, L)).view(P)
    slot_base = dst_start + all_counts[:rank].sum(0)
    slot_pos = torch.full((T, K), -1, dtype=torch.int64)
    for p in range(P):
        t, k = (phys == p).nonzero(as_tuple=True)
        slot_pos[t, k] = slot_base[p] + torch.arange(t.numel())

    first = _first_mask(phys, L)
    valid = phys >= 0
    dst = torch.where(valid, phys // L, -1)
    first_at = torch.full((T, R), -1, dtype=torch.int64)
    for d in range(R):
        hit = first & (dst == d)
        t, k = hit.nonzero(as_tuple=True)
        first_at[t, d] = slot_pos[t, k]
    if cfg.token_saving:
        data_pos = torch.where(valid, first_at.gather(1, dst.clamp(min=0)), -1)
        units = first
    else:
        data_pos = slot_pos.clone()
        units = valid

    # send order: group (g = local * R + dst, or dst when unsorted), then token
    group = group_of_slot(cfg)
    t_idx, k_idx = units.nonzero(as_tuple=True)
    unit_g = group[phys[t_idx, k_idx]]
    order = torch.argsort(unit_g * (T + 1) + t_idx, stable=True)
    send_units = torch.full((cfg.max_units,), -1, dtype=torch.int64)
    send_units[: order.numel()] = (t_idx * K + k_idx)[order]
    units_g = torch.bincount(unit_g, minlength=cfg.num_groups)
    unit_base_g = torch.cumsum(units_g, 0) - units_g

    # this rank as receiver
    cnt = all_counts[:, rank * L : (rank + 1) * L].t()  # [L, R]
    recv_offset = (torch.cumsum(cnt.reshape(-1), 0) - cnt.reshape(-1)).view(L, R)
    expert_rows = cnt.sum(1)
    expert_start = recv_offset[:, 0]

    tiles = torch.zeros(cfg.max_tiles, TILE_COLS, dtype=torch.int64)
    tiles[:, 0] = -1
    i = 0
    for local in range(L):
        ends = recv_offset[local] + cnt[local]
        for m in range(triton.cdiv(int(expert_rows[local]), cfg.block_m)):
            row0 = int(expert_start[local]) + m * cfg.block_m
            rows = min(cfg.block_m, int(expert_rows[local]) - m * cfg.block_m)
            src_lo = int((ends <= row0).sum())
            src_hi = int((ends <= row0 + rows - 1).sum())
            tiles[i] = torch.tensor([local, row0, rows, src_lo, src_hi])
            i += 1
    num_tiles = i

    tasks = torch.zeros(cfg.num_tasks, TASK_COLS, dtype=torch.int64)
    j = 0
    for g in range(cfg.num_groups):
        for m in range(max(1, triton.cdiv(int(units_g[g]), cfg.chunk))):  # empty groups: 1
            start = int(unit_base_g[g]) + m * cfg.chunk
            count = min(cfg.chunk, int(units_g[g]) - m * cfg.chunk)
            tasks[j] = torch.tensor([KIND_DISPATCH, g, start, count])
            j += 1
    for i in range(num_tiles):
        tasks[cfg.max_dispatch_tasks + i] = torch.tensor([KIND_GEMM1, i, 0, 0])

    stats = torch.tensor([order.numel(), int(recv_total[rank]), num_tiles, j])
    i32 = torch.int32
    return Plan(
        phys=phys.to(i32),
        counts=all_counts[rank].to(i32),
        all_counts=all_counts.to(i32),
        slot_pos=slot_pos.to(i32),
        data_pos=data_pos.to(i32),
        first_at=first_at.to(i32),
        send_units=send_units.to(i32),
        recv_offset=recv_offset.to(i32),
        expert_start=expert_start.to(i32),
        expert_rows=expert_rows.to(i32),
        tiles=tiles.to(i32),
        tasks=tasks.to(i32),
        stats=stats.to(i32),
    )


# ----------------------------------------------------------------------------- count kernel


@triton.jit
def _resolve_block(
    ids_ptr,
    replica_ptr,
    num_replicas_ptr,
    on_rank_ptr,
    t0,
    T,
    K: tl.constexpr,
    KP: tl.constexpr,
    CT: tl.constexpr,
    MAXREP: tl.constexpr,
):
    """[CT, KP] physical slots of tokens [t0, t0 + CT): this rank's replica if it has one, else
    replica ``token % num_replicas``; -1 for dropped and padding."""
    t = t0 + tl.arange(0, CT)[:, None]
    k = tl.arange(0, KP)[None, :]
    inside = (t < T) & (k < K)
    e = tl.load(ids_ptr + t * K + k, mask=inside, other=-1)
    live = inside & (e >= 0)
    on_rank = tl.load(on_rank_ptr + e, mask=live, other=-1)
    num_rep = tl.load(num_replicas_ptr + e, mask=live, other=1)
    spread = tl.load(replica_ptr + e * MAXREP + t % num_rep, mask=live, other=-1)
    return tl.where(live, tl.where(on_rank >= 0, on_rank, spread), -1)


@triton.jit
def _group_of(slot, R: tl.constexpr, L: tl.constexpr, SORTED: tl.constexpr):
    """Send group of physical slots (see ``group_of_slot``)."""
    if SORTED:
        return (slot % L) * R + slot // L
    else:
        return slot // L


@triton.jit
def _first_slots(phys, L: tl.constexpr):
    """[CT, KP] True where (t, k) is the token's lowest slot at its destination rank."""
    valid = phys >= 0
    dst = tl.where(valid, phys // L, -1)
    same = (dst[:, :, None] == dst[:, None, :]) & valid[:, None, :]
    earlier = same & (phys[:, None, :] < phys[:, :, None])
    return valid & (tl.sum(earlier.to(tl.int32), 2) == 0)


@triton.jit
def _count_chunk(
    ids_ptr,
    replica_ptr,
    num_replicas_ptr,
    on_rank_ptr,
    phys_ptr,
    chunk_rows_ptr,
    c,
    T,
    K: tl.constexpr,
    R: tl.constexpr,
    L: tl.constexpr,
    KP: tl.constexpr,
    PP: tl.constexpr,
    CT: tl.constexpr,
    MAXREP: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
):
    """Resolve chunk c's tokens to physical slots and store its two histograms: rows per slot
    and units per send group."""
    t0 = c * CT
    phys = _resolve_block(
        ids_ptr, replica_ptr, num_replicas_ptr, on_rank_ptr, t0, T, K, KP, CT, MAXREP
    )
    t = t0 + tl.arange(0, CT)[:, None]
    k = tl.arange(0, KP)[None, :]
    tl.store(phys_ptr + t * K + k, phys, mask=(t < T) & (k < K))
    valid = phys >= 0
    if TOKEN_SAVING:
        units = _first_slots(phys, L)
    else:
        units = valid
    flat = tl.reshape(tl.where(valid, phys, 0), [CT * KP])
    h_all = tl.histogram(flat, PP, mask=tl.reshape(valid, [CT * KP]))
    h_units = tl.histogram(_group_of(flat, R, L, SORTED), PP, mask=tl.reshape(units, [CT * KP]))
    p = tl.arange(0, PP)
    tl.store(chunk_rows_ptr + (c * 2) * PP + p, h_all)
    tl.store(chunk_rows_ptr + (c * 2 + 1) * PP + p, h_units)


@triton.jit(do_not_specialize=["T"])
def plan_count_kernel(
    ids_ptr,  # [T, K] int32 logical experts, -1 dropped
    replica_ptr,  # [E, MAXREP] int32 physical slots of each expert
    num_replicas_ptr,  # [E] int32
    on_rank_ptr,  # [E] int32 this rank's replica of each expert, -1 if none
    phys_ptr,  # [T, K] int32 out
    chunk_rows_ptr,  # [NC, 2, PP] int32 out: per chunk, rows per slot and units per group
    T,
    K: tl.constexpr,
    R: tl.constexpr,
    L: tl.constexpr,
    KP: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    PP: tl.constexpr,
    CT: tl.constexpr,
    MAXREP: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
):
    c = tl.program_id(0)
    num_chunks = tl.maximum(tl.cdiv(T, CT), 1)
    while c < num_chunks:  # persistent: the grid may be smaller than the chunk count
        _count_chunk(
            ids_ptr,
            replica_ptr,
            num_replicas_ptr,
            on_rank_ptr,
            phys_ptr,
            chunk_rows_ptr,
            c,
            T,
            K,
            R,
            L,
            KP,
            PP,
            CT,
            MAXREP,
            TOKEN_SAVING,
            SORTED,
        )
        c += tl.num_programs(0)


@triton.jit
def _publish_counts(
    totals_ptr,
    counts_base,
    ready_base,
    rank,
    epoch,
    R: tl.constexpr,
    P: tl.constexpr,
    RP: tl.constexpr,
    PP: tl.constexpr,
):
    """This rank's rows per slot into every peer's count table, then ``counts_ready`` there."""
    p = tl.arange(0, PP)
    rows = tl.load(totals_ptr + p)
    d = tl.arange(0, RP)
    row = (epoch % 2) * R + rank  # parity double-buffers the table (see PlanWorkspace)
    dst = tl.load(counts_base + d, mask=d < R, other=0).to(tl.pointer_type(tl.int32))
    ptrs = dst[:, None] + row * P + p[None, :]
    tl.store(
        ptrs, tl.broadcast_to(rows[None, :], (RP, PP)), mask=(d[:, None] < R) & (p[None, :] < P)
    )
    tl.debug_barrier()  # every thread's count stores before the releases below
    ready = tl.load(ready_base + d, mask=d < R, other=0).to(tl.pointer_type(tl.int64)) + rank
    tl.atomic_xchg(ready, tl.cast(epoch, tl.int64), mask=d < R, sem="release", scope="sys")


@triton.jit(do_not_specialize=["rank", "T"])
def plan_scan_kernel(
    chunk_rows_ptr,  # [NC, 2, PP] int32: histograms in, exclusive prefixes over chunks out
    totals_ptr,  # [2, PP] int32 out: this rank's rows per slot and units per group
    arrive_ptr,  # [1] int32: programs done; 0 between calls (the last one resets it)
    counts_base,  # [R] int64: every rank's sym counts [2, R, P]
    ready_base,  # [R] int64: every rank's sym counts_ready [R]
    epoch_ptr,  # [1] int64: the last call's epoch; the last program out bumps it
    rank,
    T,
    R: tl.constexpr,
    L: tl.constexpr,
    RP: tl.constexpr,
    PP: tl.constexpr,
    CT: tl.constexpr,
    CB: tl.constexpr,
    SR: tl.constexpr,
):
    """Column-parallel exclusive scan of the chunk histograms (CB columns of the 2 * PP per
    program, SR chunks per step), in place; then the last program out publishes the counts."""
    num_chunks = tl.maximum(tl.cdiv(T, CT), 1)
    block = tl.program_id(0)
    while block < (2 * PP) // CB:
        col = block * CB + tl.arange(0, CB)[None, :]
        running = tl.zeros([CB], tl.int32)
        c0 = 0
        while c0 < num_chunks:
            c = c0 + tl.arange(0, SR)[:, None]
            ptrs = chunk_rows_ptr + c * (2 * PP) + col
            h = tl.load(ptrs, mask=c < num_chunks, other=0)
            tl.store(ptrs, running[None, :] + tl.cumsum(h, 0) - h, mask=c < num_chunks)
            running += tl.sum(h, 0)
            c0 += SR
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
        _publish_counts(totals_ptr, counts_base, ready_base, rank, epoch, R, R * L, RP, PP)


# ----------------------------------------------------------------------------- layout kernel


@triton.jit
def _exclusive_cumsum(x):
    return tl.cumsum(x, 0) - x


@triton.jit
def _chunk_ranks(slot, member, base, CE: tl.constexpr):
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
def _token_rows(phys, slot_pos, first, L: tl.constexpr, RP: tl.constexpr):
    """data_pos [CT, KP] (the first slot's row at the same destination) and first_at [CT, RP]."""
    valid = phys >= 0
    dst = tl.where(valid, phys // L, -1)
    same_first = (dst[:, :, None] == dst[:, None, :]) & first[:, None, :] & valid[:, :, None]
    data_pos = tl.sum(tl.where(same_first, slot_pos[:, None, :] + 1, 0), 2) - 1
    d = tl.arange(0, RP)
    at = (dst[:, None, :] == d[None, :, None]) & first[:, None, :]
    first_at = tl.sum(tl.where(at, slot_pos[:, None, :] + 1, 0), 2) - 1
    return data_pos, first_at


@triton.jit
def _row_bases(all_counts, totals_ptr, rank, L: tl.constexpr, RP: tl.constexpr, PP: tl.constexpr):
    """Per slot p, the rows of p at its rank before this rank's first (every (local slot,
    source rank) block before this rank's, DESIGN §4.2); per send group, the units of the
    groups before it."""
    p = tl.arange(0, PP)
    s = tl.arange(0, RP)
    rows_p = tl.sum(all_counts, 0)
    start_in_dst = _exclusive_cumsum(rows_p)
    start_in_dst -= tl.gather(start_in_dst, (p // L) * L, 0)
    slot_base = start_in_dst + tl.sum(tl.where(s[:, None] < rank, all_counts, 0), 0)
    unit_base = _exclusive_cumsum(tl.load(totals_ptr + PP + p))
    return slot_base, unit_base


@triton.jit
def _layout_chunk(
    phys_ptr,
    chunk_rows_ptr,
    slot_pos_ptr,
    data_pos_ptr,
    first_at_ptr,
    send_units_ptr,
    slot_base,
    unit_base,
    c,
    T,
    K: tl.constexpr,
    R: tl.constexpr,
    L: tl.constexpr,
    KP: tl.constexpr,
    RP: tl.constexpr,
    PP: tl.constexpr,
    CT: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
):
    """Rows, data rows, first slots and send positions of chunk c's tokens: the bases plus the
    chunk's prefix from the scan, plus the ranks within the chunk (a [CE, CE] compare)."""
    CE: tl.constexpr = CT * KP
    p = tl.arange(0, PP)
    slot_first = slot_base + tl.load(chunk_rows_ptr + (c * 2) * PP + p)
    unit_first = unit_base + tl.load(chunk_rows_ptr + (c * 2 + 1) * PP + p)
    t = c * CT + tl.arange(0, CT)[:, None]
    k = tl.arange(0, KP)[None, :]
    inside = (t < T) & (k < K)
    phys = tl.load(phys_ptr + t * K + k, mask=inside, other=-1)
    valid = phys >= 0
    first = _first_slots(phys, L)
    flat = tl.reshape(phys, [CE])
    rows = _chunk_ranks(flat, tl.reshape(valid, [CE]), slot_first, CE)
    slot_pos = tl.where(valid, tl.reshape(rows, [CT, KP]), -1)
    tl.store(slot_pos_ptr + t * K + k, slot_pos, mask=inside)
    units = first if TOKEN_SAVING else valid
    send = _chunk_ranks(_group_of(flat, R, L, SORTED), tl.reshape(units, [CE]), unit_first, CE)
    tl.store(send_units_ptr + tl.reshape(send, [CT, KP]), t * K + k, mask=units)
    data_pos, first_at = _token_rows(phys, slot_pos, first, L, RP)
    tl.store(data_pos_ptr + t * K + k, data_pos if TOKEN_SAVING else slot_pos, mask=inside)
    d = tl.arange(0, RP)[None, :]
    tl.store(first_at_ptr + t * R + d, first_at, mask=(t < T) & (d < R))


@triton.jit
def _slot_rows(
    counts_ptr, parity, rank, R: tl.constexpr, L: tl.constexpr, RP: tl.constexpr, LP: tl.constexpr
):
    """[LP, RP] rows this rank receives per (local slot, source rank), from the count table."""
    P: tl.constexpr = R * L
    local = tl.arange(0, LP)[:, None]
    s = tl.arange(0, RP)[None, :]
    inside = (local < L) & (s < R)
    return tl.load(counts_ptr + (parity * R + s) * P + rank * L + local, mask=inside, other=0)


@triton.jit
def _group_units(totals_ptr, PP: tl.constexpr):
    """[PP] units this rank sends per send group (0 past the last group)."""
    return tl.load(totals_ptr + PP + tl.arange(0, PP))


@triton.jit
def _group_chunks(units_g, G, CHUNK: tl.constexpr):
    """[PP] dispatch tasks per group: one per CHUNK units, and one for an empty group (it still
    raises the group's flag)."""
    g = tl.arange(0, units_g.shape[0])
    return tl.where(g < G, tl.maximum(tl.cdiv(units_g, CHUNK), 1), 0)


@triton.jit
def _summary_item(
    cnt,
    counts_ptr,
    parity,
    all_counts_ptr,
    recv_offset_ptr,
    expert_start_ptr,
    expert_rows_ptr,
    stats_ptr,
    totals_ptr,
    R: tl.constexpr,
    L: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    PP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    SORTED: tl.constexpr,
):
    """The count table copy, receive offsets, per-slot rows and the call's stats."""
    P: tl.constexpr = R * L
    s = tl.arange(0, RP)
    p = tl.arange(0, PP)
    in_table = (s[:, None] < R) & (p[None, :] < P)
    table = tl.load(counts_ptr + (parity * R + s[:, None]) * P + p[None, :], mask=in_table)
    tl.store(all_counts_ptr + s[:, None] * P + p[None, :], table, mask=in_table)
    offset = tl.reshape(_exclusive_cumsum(tl.reshape(cnt, [LP * RP])), [LP, RP])
    local = tl.arange(0, LP)
    tl.store(
        recv_offset_ptr + local[:, None] * R + s[None, :],
        offset,
        mask=(local[:, None] < L) & (s[None, :] < R),
    )
    rows = tl.sum(cnt, 1)
    tl.store(expert_rows_ptr + local, rows, mask=local < L)
    tl.store(expert_start_ptr + local, _exclusive_cumsum(rows), mask=local < L)
    units_g = _group_units(totals_ptr, PP)
    tl.store(stats_ptr + 0, tl.sum(units_g, 0))
    tl.store(stats_ptr + 1, tl.sum(rows, 0))
    tl.store(stats_ptr + 2, tl.sum(tl.cdiv(rows, BLOCK_M), 0))
    G: tl.constexpr = R * L if SORTED else R
    tl.store(stats_ptr + 3, tl.sum(_group_chunks(units_g, G, CHUNK), 0))


@triton.jit
def _count_at_most(ends, x, N: tl.constexpr):
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
def _tile_chunk(
    c,
    cnt,
    counts_ptr,
    parity,
    rank,
    tiles_ptr,
    max_tiles,
    R: tl.constexpr,
    L: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TB: tl.constexpr,
):
    """Tile table rows [c * TB, (c + 1) * TB): BLOCK_M rows per local slot, in slot order."""
    rows_l = tl.sum(cnt, 1)
    start_l = _exclusive_cumsum(rows_l)
    n_tiles = tl.cdiv(rows_l, BLOCK_M)
    tile_end = tl.cumsum(n_tiles, 0)
    lo = tl.arange(0, LP)
    i = c * TB + tl.arange(0, TB)
    local = _count_at_most(tl.where(lo < L, tile_end, 2**31 - 1), i, LP)
    local = tl.minimum(local, L - 1)
    m = i - tl.gather(tile_end - n_tiles, local, 0)
    row0 = tl.gather(start_l, local, 0) + m * BLOCK_M
    rows = tl.minimum(BLOCK_M, tl.gather(rows_l, local, 0) - m * BLOCK_M)
    # source blocks of this slot end at start + inclusive cumsum of its per-source rows
    # NOTE: loaded from the (read-only) count table: a 2-D tl.gather hits a Triton 3.6 assertion
    s = tl.arange(0, RP)[None, :]
    cnt_ptrs = counts_ptr + (parity * R + s) * (R * L) + rank * L + local[:, None]
    cnt_rows = tl.load(cnt_ptrs, mask=s < R, other=0)  # [TB, RP]
    ends = row0[:, None] - m[:, None] * BLOCK_M + tl.cumsum(cnt_rows, 1)
    src_lo = tl.sum((ends <= row0[:, None]).to(tl.int32), 1)
    src_hi = tl.sum((ends <= (row0 + rows - 1)[:, None]).to(tl.int32), 1)
    live = i < tl.sum(n_tiles, 0)
    row = tiles_ptr + i * 5
    inside = i < max_tiles
    tl.store(row + 0, tl.where(live, local, -1), mask=inside)
    tl.store(row + 1, tl.where(live, row0, 0), mask=inside)
    tl.store(row + 2, tl.where(live, rows, 0), mask=inside)
    tl.store(row + 3, tl.where(live, src_lo, 0), mask=inside)
    tl.store(row + 4, tl.where(live, src_hi, 0), mask=inside)


@triton.jit
def _dispatch_chunk(
    c,
    totals_ptr,
    tasks_ptr,
    max_dispatch,
    R: tl.constexpr,
    L: tl.constexpr,
    PP: tl.constexpr,
    CHUNK: tl.constexpr,
    TB: tl.constexpr,
    SORTED: tl.constexpr,
):
    """Dispatch task rows [c * TB, (c + 1) * TB): chunks of each group's units, groups in send
    order; NOPs past the last."""
    G: tl.constexpr = R * L if SORTED else R
    g = tl.arange(0, PP)
    units_g = _group_units(totals_ptr, PP)
    n_chunks = _group_chunks(units_g, G, CHUNK)
    chunk_end = tl.cumsum(n_chunks, 0)
    i = c * TB + tl.arange(0, TB)
    grp = tl.minimum(_count_at_most(tl.where(g < G, chunk_end, 2**31 - 1), i, PP), G - 1)
    m = i - tl.gather(chunk_end - n_chunks, grp, 0)
    start = tl.gather(_exclusive_cumsum(units_g), grp, 0) + m * CHUNK
    count = tl.minimum(CHUNK, tl.gather(units_g, grp, 0) - m * CHUNK)
    live = i < tl.sum(n_chunks, 0)
    row = tasks_ptr + i * 4
    inside = i < max_dispatch
    tl.store(row + 0, tl.where(live, _DISPATCH, 0), mask=inside)
    tl.store(row + 1, tl.where(live, grp, 0), mask=inside)
    tl.store(row + 2, tl.where(live, start, 0), mask=inside)
    tl.store(row + 3, tl.where(live, count, 0), mask=inside)


@triton.jit
def _gemm_chunk(
    c, cnt, tasks_ptr, max_dispatch, max_tiles, BLOCK_M: tl.constexpr, TB: tl.constexpr
):
    """GEMM task rows: one per tile, after the dispatch region; NOPs past the last tile."""
    num_tiles = tl.sum(tl.cdiv(tl.sum(cnt, 1), BLOCK_M), 0)
    i = c * TB + tl.arange(0, TB)
    live = i < num_tiles
    row = tasks_ptr + (max_dispatch + i) * 4
    inside = i < max_tiles
    tl.store(row + 0, tl.where(live, _GEMM1, 0), mask=inside)
    tl.store(row + 1, tl.where(live, i, 0), mask=inside)
    tl.store(row + 2, tl.zeros([TB], tl.int32), mask=inside)
    tl.store(row + 3, tl.zeros([TB], tl.int32), mask=inside)


@triton.jit
def _pad_chunk(
    c,
    totals_ptr,
    send_units_ptr,
    max_units,
    R: tl.constexpr,
    L: tl.constexpr,
    PP: tl.constexpr,
    TBP: tl.constexpr,
):
    """send_units past the last unit hold -1."""
    num_units = tl.sum(_group_units(totals_ptr, PP), 0)
    i = c * TBP + tl.arange(0, TBP)
    tl.store(
        send_units_ptr + i, tl.full([TBP], -1, tl.int32), mask=(i >= num_units) & (i < max_units)
    )


@triton.jit
def _table_item(
    j,
    counts_ptr,
    parity,
    rank,
    all_counts_ptr,
    recv_offset_ptr,
    expert_start_ptr,
    expert_rows_ptr,
    stats_ptr,
    totals_ptr,
    tiles_ptr,
    tasks_ptr,
    send_units_ptr,
    max_units,
    max_dispatch,
    max_tiles,
    R: tl.constexpr,
    L: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    PP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    TB: tl.constexpr,
    TBP: tl.constexpr,
    SORTED: tl.constexpr,
):
    """Receiver-side table item j: 0 summary, then tile chunks, dispatch-task chunks, GEMM-task
    chunks and send_units padding chunks. Items are independent, so any program can take any."""
    cnt = _slot_rows(counts_ptr, parity, rank, R, L, RP, LP)
    n_tile = tl.cdiv(max_tiles, TB)
    n_disp = tl.cdiv(max_dispatch, TB)
    if j == 0:
        _summary_item(
            cnt,
            counts_ptr,
            parity,
            all_counts_ptr,
            recv_offset_ptr,
            expert_start_ptr,
            expert_rows_ptr,
            stats_ptr,
            totals_ptr,
            R,
            L,
            RP,
            LP,
            PP,
            BLOCK_M,
            CHUNK,
            SORTED,
        )
    elif j - 1 < n_tile:
        _tile_chunk(
            j - 1, cnt, counts_ptr, parity, rank, tiles_ptr, max_tiles, R, L, RP, LP, BLOCK_M, TB
        )
    elif j - 1 - n_tile < n_disp:
        _dispatch_chunk(
            j - 1 - n_tile, totals_ptr, tasks_ptr, max_dispatch, R, L, PP, CHUNK, TB, SORTED
        )
    elif j - 1 - n_tile - n_disp < n_tile:
        _gemm_chunk(j - 1 - n_tile - n_disp, cnt, tasks_ptr, max_dispatch, max_tiles, BLOCK_M, TB)
    else:
        _pad_chunk(
            j - 1 - 2 * n_tile - n_disp, totals_ptr, send_units_ptr, max_units, R, L, PP, TBP
        )


@triton.jit(do_not_specialize=["rank", "T", "capacity", "timeout_ns"])
def plan_layout_kernel(
    phys_ptr,  # [T, K] int32 (from plan_count_kernel)
    chunk_rows_ptr,  # [NC, 2, PP] int32: per chunk, rows and units before it (plan_scan_kernel)
    totals_ptr,  # [2, PP] int32
    counts_ptr,  # this rank's sym counts [2, R, P]
    ready_ptr,  # this rank's sym counts_ready [R] int64
    all_counts_ptr,  # [R, P] int32 out: a local copy of this call's table
    slot_pos_ptr,  # [T, K] int32 out
    data_pos_ptr,  # [T, K] int32 out
    first_at_ptr,  # [T, R] int32 out
    send_units_ptr,  # [U_max] int32 out
    recv_offset_ptr,  # [L, R] int32 out
    expert_start_ptr,  # [L] int32 out
    expert_rows_ptr,  # [L] int32 out
    tiles_ptr,  # [max_tiles, 5] int32 out
    tasks_ptr,  # [num_tasks, 4] int32 out
    stats_ptr,  # [4] int32 out
    err_ptr,
    epoch_ptr,  # [1] int64: this call's epoch
    rank,
    T,
    capacity,
    timeout_ns,
    max_units,
    max_dispatch,
    max_tiles,
    K: tl.constexpr,
    R: tl.constexpr,
    L: tl.constexpr,
    KP: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    PP: tl.constexpr,
    CT: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    TB: tl.constexpr,
    TBP: tl.constexpr,
):
    P: tl.constexpr = R * L
    pid = tl.program_id(0)
    deadline = globaltimer() + timeout_ns
    epoch = tl.load(epoch_ptr)
    s = tl.arange(0, RP)
    if not wait_flags(ready_ptr + s, s < R, epoch, deadline, err_ptr, rank, 0, pid):
        return
    p = tl.arange(0, PP)
    in_table = (s[:, None] < R) & (p[None, :] < P)
    table = counts_ptr + ((epoch % 2) * R + s[:, None]) * P + p[None, :]
    all_counts = tl.load(table, mask=in_table, other=0)  # [RP, PP]
    # every rank checks every rank's total, so an overflow is reported everywhere
    rows_p = tl.sum(all_counts, 0)
    d = tl.arange(0, RP)
    recv_total = tl.sum(tl.where((p[None, :] // L) == d[:, None], rows_p[None, :], 0), 1)
    worst = tl.max(tl.where(d < R, recv_total, 0), 0)
    if worst > capacity:
        if pid == 0:
            worst_rank = tl.argmax(tl.where(d < R, recv_total, 0), 0)
            report_overflow(err_ptr, rank, worst_rank, worst, capacity, epoch)
        return
    slot_base, unit_base = _row_bases(all_counts, totals_ptr, rank, L, RP, PP)
    num_chunks = tl.maximum(tl.cdiv(T, CT), 1)
    num_items = num_chunks + 1 + 2 * tl.cdiv(max_tiles, TB) + tl.cdiv(max_dispatch, TB)
    num_items += tl.cdiv(max_units, TBP)
    item = pid
    while item < num_items:  # persistent; token chunks first, then receiver-side table items
        if item < num_chunks:
            _layout_chunk(
                phys_ptr,
                chunk_rows_ptr,
                slot_pos_ptr,
                data_pos_ptr,
                first_at_ptr,
                send_units_ptr,
                slot_base,
                unit_base,
                item,
                T,
                K,
                R,
                L,
                KP,
                RP,
                PP,
                CT,
                TOKEN_SAVING,
                SORTED,
            )
        else:
            _table_item(
                item - num_chunks,
                counts_ptr,
                epoch % 2,
                rank,
                all_counts_ptr,
                recv_offset_ptr,
                expert_start_ptr,
                expert_rows_ptr,
                stats_ptr,
                totals_ptr,
                tiles_ptr,
                tasks_ptr,
                send_units_ptr,
                max_units,
                max_dispatch,
                max_tiles,
                R,
                L,
                RP,
                LP,
                PP,
                BLOCK_M,
                CHUNK,
                TB,
                TBP,
                SORTED,
            )
        item += tl.num_programs(0)


# ----------------------------------------------------------------------------- host side


class PlanWorkspace:
    """Buffers and launches of the plan for every rank this process runs.

    Symmetric: ``counts [2, R, P]`` (double-buffered by epoch parity: a rank can publish call
    e + 1 while a peer still reads call e, but cannot reach e + 2 before every peer has read e,
    since its e + 1 layout waits on their e + 1 counts) and ``counts_ready [R]``.
    """

    def __init__(self, world: World, cfg: PlanConfig, placement: Placement) -> None:
        if placement.world_size != world.world_size or cfg.world_size != world.world_size:
            raise ValueError(
                f"plan for {cfg.world_size} ranks, placement for {placement.world_size}, "
                f"world of {world.world_size}"
            )
        if placement.slots_per_rank != cfg.slots_per_rank:
            raise ValueError(
                f"placement has {placement.slots_per_rank} slots per rank, plan "
                f"{cfg.slots_per_rank}"
            )
        self.world, self.cfg, self.placement = world, cfg, placement
        R, P, dev = cfg.world_size, cfg.num_slots, world.device
        PP = _pow2(P)
        self.sym_counts = world.alloc((2, R, P), torch.int32)
        self.sym_ready = world.alloc((R,), torch.int64)
        self.replicas = placement.replica_table(dev)
        self.num_replicas = torch.tensor(
            [len(r) for r in placement.replicas], dtype=torch.int32, device=dev
        )
        L = cfg.slots_per_rank

        def i32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int32, device=dev)

        self.bufs = {}
        for r in world.local_ranks:
            on_rank = torch.full((placement.num_experts,), -1, dtype=torch.int32)
            for e, slots in enumerate(placement.replicas):
                mine = [p for p in slots if p // L == r]
                if mine:
                    on_rank[e] = mine[0]
            T = cfg.max_tokens
            self.bufs[r] = dict(
                on_rank=on_rank.to(dev),
                phys=i32(T, cfg.topk),
                chunk_rows=i32(cfg.max_chunks, 2, PP),
                totals=i32(2, PP),
                arrive=i32(1),
                all_counts=i32(R, P),
                slot_pos=i32(T, cfg.topk),
                data_pos=i32(T, cfg.topk),
                first_at=i32(T, R),
                send_units=i32(cfg.max_units),
                recv_offset=i32(L, R),
                expert_start=i32(L),
                expert_rows=i32(L),
                tiles=i32(cfg.max_tiles, TILE_COLS),
                tasks=i32(cfg.num_tasks, TASK_COLS),
                stats=i32(len(STATS)),
            )
        self.num_tokens = {r: 0 for r in world.local_ranks}
        # this rank's call counter on the device: the epoch of its current call
        self.epoch = {r: torch.zeros(1, dtype=torch.int64, device=dev) for r in world.local_ranks}
        self.calls = 0  # host mirror, counted by run()
        # NOTE: both kernels are persistent, with a few programs per SM of this rank's share.
        # Layout programs spin on peers' counts, which is safe because run() launches every
        # rank's count kernel before any layout kernel.
        self.max_programs = PROGRAMS_PER_SM * world.sms_per_rank

    def phases(self) -> list[int]:
        return [0, 1]

    def launch(
        self, rank: int, topk_ids: torch.Tensor, phase: int | None = None, validate: bool = True
    ) -> None:
        """Plan the next call of ``rank`` (``phase`` 0: bump the epoch and count, 1: layout;
        None: both). ``topk_ids [T, K]`` logical experts (-1 dropped). ``validate`` checks them on
        the host first (one sync); without it, ids must already be valid.

        NOTE: the epoch lives in device memory and the count kernel bumps it, so a captured
        CUDA graph replays with a fresh epoch each time and flags are never reset.
        """
        topk_ids = self._prepare(topk_ids, validate)
        T = topk_ids.shape[0]
        self.num_tokens[rank] = T
        cfg = self.cfg
        chunks = max(1, triton.cdiv(T, cfg.tokens_per_chunk))
        if phase in (None, 0):
            grid = (min(chunks, self.max_programs),)
            plan_count_kernel[grid](*self._count_args(rank, topk_ids), **self._count_meta())
            grid = (min(self._scan_blocks(), self.max_programs),)
            plan_scan_kernel[grid](*self._scan_args(rank, T), **self._scan_meta())
        if phase in (None, 1):
            items = chunks + 1 + 2 * triton.cdiv(cfg.max_tiles, TABLE_BLOCK)
            items += triton.cdiv(cfg.max_dispatch_tasks, TABLE_BLOCK)
            items += triton.cdiv(cfg.max_units, PAD_BLOCK)
            grid = (min(items, self.max_programs),)
            plan_layout_kernel[grid](*self._layout_args(rank, T), **cfg.layout_meta())

    def _prepare(self, topk_ids: torch.Tensor, validate: bool) -> torch.Tensor:
        if validate:
            check_routing(
                topk_ids,
                None,
                num_experts=self.placement.num_experts,
                topk=self.cfg.topk,
                max_tokens=self.cfg.max_tokens,
                device=self.world.device,
            )
        return topk_ids.to(torch.int32).contiguous()

    def _count_meta(self) -> dict[str, int | bool]:
        return dict(self.cfg.meta(), MAXREP=self.replicas.shape[1])

    def _count_args(self, rank: int, topk_ids: torch.Tensor) -> tuple:
        b = self.bufs[rank]
        return (
            topk_ids,
            self.replicas,
            self.num_replicas,
            b["on_rank"],
            b["phys"],
            b["chunk_rows"],
            topk_ids.shape[0],
        )

    def _scan_blocks(self) -> int:
        return 2 * _pow2(self.cfg.num_slots) // self._scan_meta()["CB"]

    def _scan_meta(self) -> dict[str, int]:
        cfg = self.cfg
        PP = _pow2(cfg.num_slots)
        return dict(
            R=cfg.world_size,
            L=cfg.slots_per_rank,
            RP=_pow2(cfg.world_size),
            PP=PP,
            CT=cfg.tokens_per_chunk,
            CB=min(SCAN_COLS, 2 * PP),
            SR=min(SCAN_ROWS, _pow2(cfg.max_chunks)),
        )

    def _scan_args(self, rank: int, T: int) -> tuple:
        b = self.bufs[rank]
        return (
            b["chunk_rows"],
            b["totals"],
            b["arrive"],
            self.sym_counts.peer_base,
            self.sym_ready.peer_base,
            self.epoch[rank],
            rank,
            T,
        )

    def _layout_args(self, rank: int, T: int) -> tuple:
        b, cfg = self.bufs[rank], self.cfg
        return (
            b["phys"],
            b["chunk_rows"],
            b["totals"],
            self.sym_counts.peer(rank),
            self.sym_ready.peer(rank),
            b["all_counts"],
            b["slot_pos"],
            b["data_pos"],
            b["first_at"],
            b["send_units"],
            b["recv_offset"],
            b["expert_start"],
            b["expert_rows"],
            b["tiles"],
            b["tasks"],
            b["stats"],
            self.world.error_record(rank),
            self.epoch[rank],
            rank,
            T,
            cfg.capacity,
            self.world.timeout_ns(),
            cfg.max_units,
            cfg.max_dispatch_tasks,
            cfg.max_tiles,
        )

    def warmup(self) -> None:
        """Compile and load both kernels (no launch) before anything spins: a module load waits
        behind running kernels. A no-op under the interpreter."""
        if self.world.device.type != "cuda":
            return
        ids = torch.zeros(1, self.cfg.topk, dtype=torch.int32, device=self.world.device)
        for r in self.world.local_ranks:
            kernels = [
                plan_count_kernel.warmup(
                    *self._count_args(r, ids), **self._count_meta(), grid=(1,)
                ),
                plan_scan_kernel.warmup(*self._scan_args(r, 1), **self._scan_meta(), grid=(1,)),
                plan_layout_kernel.warmup(
                    *self._layout_args(r, 1), **self.cfg.layout_meta(), grid=(1,)
                ),
            ]
            for kernel in kernels:
                kernel._init_handles()

    def run(self, topk_ids: dict[int, torch.Tensor], validate: bool = True) -> None:
        """Plan the next call on every local rank (``topk_ids[rank] [T, K]``): every rank's count
        kernel, then every rank's layout kernel (each still waits on its peers' counts).

        NOTE: phase order matters in the emulated CUDA world: with 8 ranks on one H100, once
        five ranks' layout kernels spun, the remaining ranks' count grids were never scheduled
        (seen 2026-11-23; more hardware queues did not help), so no kernel is launched behind a
        spinning peer. The NVSHMEM world runs one rank per process and is not affected."""
        # NOTE: every rank's inputs are checked and converted before any rank launches: a torch
        # op launched while a peer's kernel spins can stall on a lazy module load until the
        # peer's wait times out.
        ready = {r: self._prepare(topk_ids[r], validate) for r in self.world.local_ranks}
        for phase in self.phases():
            self.world.run_ranks(lambda r, p=phase: self.launch(r, ready[r], p, validate=False))
        self.calls += 1

    def mismatches(self, topk_ids: list[torch.Tensor]) -> dict[int, list[str]]:
        """Check the last call against ``plan_ref``: ``topk_ids`` is every rank's routing (the
        global view); returns, per local rank whose plan differs, the fields that differ."""
        phys = resolve_all_ref([ids.cpu() for ids in topk_ids], self.placement)
        wrong = {}
        for r in self.world.local_ranks:
            fields_off = plan_mismatches(self.plan(r), plan_ref(phys, self.cfg, r))
            if fields_off:
                wrong[r] = fields_off
        return wrong

    def plan(self, rank: int) -> Plan:
        """Views of ``rank``'s plan buffers (valid after its launch has run)."""
        b, T, R = self.bufs[rank], self.num_tokens[rank], self.cfg.world_size
        P = self.cfg.num_slots
        return Plan(
            phys=b["phys"][:T],
            counts=b["totals"][0, :P],
            all_counts=b["all_counts"],
            slot_pos=b["slot_pos"][:T],
            data_pos=b["data_pos"][:T],
            first_at=b["first_at"][:T, :R],
            send_units=b["send_units"],
            recv_offset=b["recv_offset"],
            expert_start=b["expert_start"],
            expert_rows=b["expert_rows"],
            tiles=b["tiles"],
            tasks=b["tasks"],
            stats=b["stats"],
        )

    def close(self) -> None:
        self.world.free(self.sym_ready)
        self.world.free(self.sym_counts)


def small_case(
    case: str, world_size: int, token_saving: bool
) -> tuple[Routing, Placement, PlanConfig]:
    """A named edge case at test size: T = 37 (not a multiple of block, chunk or tile), K = 4,
    E = max(16, 4 R) so every rank holds at least K experts."""
    R, K, T = world_size, 4, 37
    E = max(16, 4 * R)
    rt, placement = edge_case(case, R, T, E, K, seed=R * 100 + len(case))
    placement = placement or Placement.contiguous(E, R)
    cfg = PlanConfig(
        R,
        placement.slots_per_rank,
        K,
        max_tokens=40,
        capacity=40 * K * R,
        block_m=8,
        chunk=3,
        token_saving=token_saving,
    )
    return rt, placement, cfg


def plan_mismatches(got: Plan, want: Plan) -> list[str]:
    """Names of the plan fields that differ (bit for bit) between two plans."""
    names = [f.name for f in fields(Plan)]
    return [n for n in names if not torch.equal(getattr(got, n).cpu(), getattr(want, n).cpu())]


def resolve_all_ref(topk_ids: list[torch.Tensor], placement: Placement) -> list[torch.Tensor]:
    """Every rank's physical slots (reference of the resolve step in ``plan_count_kernel``)."""
    return [resolve_ref(ids, r, placement) for r, ids in enumerate(topk_ids)]
