"""The persistent megakernel, part 1: dispatch + the experts' first GEMM (DESIGN §3-6).

Shape legend: T tokens on this rank, H hidden, I expert FFN width, E experts, K top-k, R ranks,
L local slots per rank, P = R * L, C receive rows per rank (capacity), NB = GEMM column blocks.

One launch per rank and call, after that rank's plan (``megakernel.plan``). Its programs pull
tasks from two atomic counters, in id order:

  dispatch tasks  ``[0, max_dispatch)``   the plan's task table (first ``num_dispatch_tasks``);
  tile tasks      ``[max_dispatch, +max_tiles * NB)``  tile ``j // NB``, column block ``j % NB``
                  (``mode="gemm"``); or one resolve task per tile (``mode="dispatch"``).
  down tasks      ``[base_down, +max_tiles * NB2)`` (``mode="layer"``): GEMM2 + combine put, column
                  group major (``_down_coords``);
  reduce tasks    ``[base_reduce, +NRH * cdiv(T, RB))``: top-k reduce per (column group, RB
                  tokens), claimed among the next group's down tasks (``_combine_order``).

A dispatch task never waits. The last dispatch task of a send group (found with a per-group
arrival counter) publishes the group on the destination: ``expert_ready[local, rank] = epoch``
(every local slot of that destination when dispatch is unsorted). A tile task waits, bounded, on
the flags of the sources its rows come from (``per_tile_flags``; otherwise every source of its
expert), and with token saving on every earlier local slot too, since a row may take its data
from the token's first slot. Every wait therefore targets a dispatch task, which never waits: no
claim order can deadlock (DESIGN §5). (With ``KernelConfig(pack="scan")`` a tile's column blocks
1.. also wait for its block 0, a lower id of this rank, to copy the token-saving references into
place.) Programs given to dispatch (``dispatch_ctas``) take
dispatch tasks first, then join the tile tasks.

Back-to-back calls with no host synchronisation: ``recv_x`` / ``recv_src`` are double-buffered by
epoch parity. A sender can only reach call e + 2 after its plan saw every peer's e + 2 counts,
which a peer publishes after its call-e megakernel finished reading parity e % 2. Flags hold
epochs and are never reset; counters are reset by the last program out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from megakernel.pack import choose_strategy
from megakernel.placement import Placement
from megakernel.plan import STATS, Plan, PlanConfig, PlanWorkspace, _pow2
from megakernel.shapes import MoEShape
from megakernel.tiles import (
    flush_pieces,
    tile_combine_put,
    tile_dispatch_put,
    tile_down_gemm,
    tile_expert_gemm,
    tile_resolve_rows,
    tile_topk_reduce,
)
from megakernel.validate import check_routing
from symm_mem.buffer import World
from symm_mem.device import globaltimer, peer_ptr, smid, wait_flag, wait_flags

# error-record flag ids of the waits (below 1 << 20: the plan's counts_ready[source rank])
FLAG_EXPERT_READY = tl.constexpr(1 << 20)  # + local * RP + source rank
FLAG_ACT_READY = tl.constexpr(2 << 20)  # + tile
FLAG_COMBINE = tl.constexpr(3 << 20)  # + column group * NCB + token block
FLAG_ROWS_RESOLVED = tl.constexpr(4 << 20)  # + tile (KernelConfig.pack = "scan")
# the kernel's counters: [3] int32 per rank
COUNTER_DISPATCH = tl.constexpr(0)
COUNTER_COMPUTE = tl.constexpr(1)
COUNTER_EXIT = tl.constexpr(2)
# "layer": the whole MoE layer; "gemm": dispatch + GEMM1; "dispatch": dispatch + resolve only
MODES = ("layer", "gemm", "dispatch")
# a top-k reduce step loads [REDUCE_ROWS tokens, K, columns] with REDUCE_LOAD elements at once:
# 32 KB of bf16 streams at 47 GB/s per program (H100, 16 programs); [16, 8, 64] gave 10, [8, 8,
# 256] 40, 64 KB loads no better in the layer, 32 tokens a step slower (perf/NOTES.md)
REDUCE_ROWS = 16
REDUCE_LOAD = 16384
# mode "dispatch" (no GEMM, little shared memory) launches this many programs per SM where each
# rank has its own GPU: more rows in flight. dsv3, T = 4096, one rank, the puts alone
# (perf.bench_dispatch_gemm --dispatch-programs): H100 74.9 -> 60.4 us, H200 63.1 -> 46.2 us
DISPATCH_ONLY_PROGRAMS_PER_SM = 4
# task kinds in trace records (megakernel.profiler names them)
KIND_DISPATCH = tl.constexpr(0)
KIND_GEMM1 = tl.constexpr(1)
KIND_RESOLVE = tl.constexpr(2)
KIND_DOWN = tl.constexpr(3)
KIND_REDUCE = tl.constexpr(4)
# timing probes of mode "layer" (KernelConfig has none: run(stage=...) picks them)
PROBE_OFF = tl.constexpr(0)
PROBE_COMM = tl.constexpr(1)  # every task but no GEMM math: plan, dispatch, combine, reduce
PROBE_COMPUTE = tl.constexpr(2)  # both GEMMs on the last call's rows, outputs kept local
# run() parts, for timing each alone: see Megakernel.run
STAGES = ("all", "dispatch", "sends", "tiles", "comm", "compute")
# KernelConfig.pack: how GEMM1 reads rows that token saving left as references (see gather_a)
PACK_MODES = ("auto", "gather", "scan")


def _check_tma_rows(knob: str, weight: str, step: str, elems: int, dtype: torch.dtype) -> None:
    """A TMA block's rows (``elems`` of ``dtype``) must be a multiple of 16 bytes."""
    row_bytes = elems * dtype.itemsize
    if row_bytes % 16:
        raise ValueError(
            f"{knob} loads {weight} in rows of {step} = {elems} elements ({row_bytes} bytes): "
            f"TMA needs a multiple of 16 bytes (a larger {step}, or {knob}=False)"
        )


@dataclass(frozen=True)
class KernelConfig:
    """Switches and tile knobs of the megakernel.

    GEMM defaults from ``python -m perf.sweep_gemm --ranks 2`` on an H100 (2026-11-24, dsv3 as
    one of 2 ranks: 128 experts x 256 rows): BM 128, BN 128 (gate and up side by side, so 256
    accumulator columns), BK 64, 8 warps, 3 stages gave 441 TFLOP/s; the next best 420, and
    ``torch._grouped_mm`` 383 on the same rows (perf/NOTES.md). With w13 loaded by TMA
    (``gemm1_tma``; H200, 2026-11-24, ``--vary gemm1_tma=1``) the same tile went 424 -> 475
    TFLOP/s and stayed the best, against ``torch._grouped_mm``'s 420. Down projection from
    ``python -m perf.sweep_gemm --gemm down --ranks 2`` (H100, 2026-11-24, 32768 rows): BN 256,
    BK 64 gave 395 TFLOP/s; BN 128 / BK 128 331, BN 128 / BK 64 287; ``torch._grouped_mm`` 435.
    With w2 loaded by TMA (``down_tma``; H200, 2026-11-24) BN 256 / BK 64 went 411 -> 460 TFLOP/s
    and stayed the best, against ``torch._grouped_mm``'s 432.

    ``gemm1_pairs``: a GEMM1 task makes one [BM, 2 BN] product per k step (m64n256 MMAs) instead
    of a gate and an up product of BN columns that each read A from shared memory again. Its TMA
    descriptor views ``w13 [L, 2I, H]`` as ``[L, I, 2, H]``, so one box brings gate row j and up
    row j side by side and SwiGLU splits the pairs in registers; the weights keep their layout.
    It applies where w13 comes by TMA, with SwiGLU, and 2 BN fits one MMA (BN <= 128). H200:
    GEMM1 2-3% faster (dsv3 as one of 2 ranks), the one-rank layer 1.5-2% (perf/NOTES.md).
    """

    token_saving: bool = True  # one copy of a token per destination rank
    sorted_dispatch: bool = True  # send expert-major (local slot, dst), else per dst in token order
    per_tile_flags: bool = True  # a tile waits for its own source ranks, else for all of them
    pack: str = "auto"  # GEMM1's A rows: one of PACK_MODES (see gather_a)
    block_m: int = 128  # rows per GEMM tile (the plan's tile height)
    block_n: int = 128  # output columns per GEMM task (of I with SwiGLU)
    block_k: int = 64  # reduction step over H
    gemm1_tma: bool = True  # GEMM1 loads w13 by TMA (a tensor descriptor), else by pointers
    gemm1_pairs: bool = True  # gate and up as one [BM, 2 BN] product (see paired_gemm1)
    down_block_n: int = 256  # output columns (of H) per down-projection task
    down_block_k: int = 64  # reduction step over I
    down_tma: bool = True  # the down projection loads w2 by TMA, else by pointers
    combine_block: int = 128  # tokens per combine counter
    reduce_h: int = 1024  # columns per top-k reduce task (at least down_block_n of them)
    reduce_tokens: int = 32  # tokens per top-k reduce task (capped at combine_block)
    reduce_lag: int = 0  # down tasks of group g before R(g-1) mixes in; 0: the programs
    block_h: int = 1024  # columns per dispatch copy step
    copy_stages: int = 1  # dispatch copy steps loaded ahead (1: load, then store, step by step)
    chunk: int = 8  # units per dispatch task
    num_warps: int = 8
    num_stages: int = 3
    num_ctas: int = 0  # programs per rank; 0: the world's SM share (see Megakernel.programs)
    dispatch_ctas: int = 0  # programs that take dispatch tasks first; 0: all of them
    trace: bool = False  # record every task per program (megakernel.profiler); off: no code
    trace_events: int = 1024  # events each program can record per call

    def __post_init__(self) -> None:
        if self.pack not in PACK_MODES:
            raise ValueError(
                f"KernelConfig.pack must be one of {PACK_MODES}, got {self.pack!r}: the plan "
                "fixes the receive order (DESIGN §4), so the pack study's 'sort' and 'atomic' "
                "do not apply to the layer"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", "str"):
                continue
            low = 0 if f.name in ("num_ctas", "dispatch_ctas", "reduce_lag") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"KernelConfig.{f.name} must be an int >= {low}, got {value!r}")
        for name in (
            "block_m",
            "block_n",
            "block_k",
            "down_block_n",
            "down_block_k",
            "combine_block",
            "reduce_h",
            "reduce_tokens",
            "block_h",
            "chunk",
        ):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")

    def paired_gemm1(self, swiglu: bool) -> bool:
        """Whether GEMM1 makes gate and up as one [BM, 2 BN] product (``gemm1_pairs``): only with
        SwiGLU (which splits the pairs), w13 by TMA (whose box interleaves the rows) and 2 BN
        within the widest MMA, n256."""
        return self.gemm1_pairs and swiglu and self.gemm1_tma and self.block_n <= 128

    def reduce_groups(self, hidden: int) -> tuple[int, int, int]:
        """(RH, NRH, GB): a top-k reduce task's columns, the column groups of H, and the
        down-projection column blocks per group. A group is RH wide, a multiple of
        ``down_block_n``, so each down task feeds one group's combine counters."""
        rh = max(min(self.reduce_h, _pow2(hidden)), self.down_block_n)
        return rh, triton.cdiv(hidden, rh), rh // self.down_block_n

    def gather_a(self, shape: MoEShape) -> bool:
        """Whether GEMM1 gathers its A rows through ``recv_src`` (``pack`` "gather") or reads
        them in place after its tile's indirect rows were copied there ("scan": the plan's count
        + scan already put every row at its place, token saving leaves the copies). "auto" asks
        ``megakernel.pack.choose_strategy`` for pack + GEMM with this rank's T * K pairs, which
        the packing sweep answers with "gather" at every point it measured."""
        pack = self.pack
        if pack == "auto":
            T, K, E = shape.max_tokens_per_rank, shape.topk, shape.num_experts
            pack = choose_strategy(T, K, E, materialize=False)
        return pack == "gather"


def default_capacity(shape: MoEShape, world_size: int, slots_per_rank: int) -> int:
    """Receive rows per rank: the most any routing can send one rank (R * T * min(K, L)),
    capped at twice the uniform average (2 T K) for large worlds, where the worst case is
    unaffordable; a routing beyond it raises ``CapacityError`` on every rank."""
    T, K = shape.max_tokens_per_rank, shape.topk
    return max(1, min(world_size * T * min(K, slots_per_rank), 2 * T * K))


# ----------------------------------------------------------------------------- device


@triton.jit
def _dispatch_task(
    d,
    tasks_ptr,
    totals_ptr,
    group_done_ptr,
    x_ptr,
    send_units_ptr,
    phys_ptr,
    slot_pos_ptr,
    data_pos_ptr,
    recv_x_base,
    recv_src_base,
    recv_tag_base,
    ready_base,
    recv_x_ptr,
    recv_src_ptr,
    recv_tag_ptr,
    ready_ptr,
    rank,
    epoch,
    K: tl.constexpr,
    KP: tl.constexpr,
    R: tl.constexpr,
    L: tl.constexpr,
    LP: tl.constexpr,
    PP: tl.constexpr,
    H: tl.constexpr,
    C: tl.constexpr,
    TK: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
    LAYER: tl.constexpr,
    COPY_STAGES: tl.constexpr,
):
    """Run dispatch task ``d``; the group's last task raises its flag(s) on the destination."""
    g = tl.load(tasks_ptr + d * 4 + 1)
    start = tl.load(tasks_ptr + d * 4 + 2)
    count = tl.load(tasks_ptr + d * 4 + 3)
    if SORTED:
        dst = g % R
    else:
        dst = g
    parity = epoch % 2
    recv_x_dst = peer_ptr(recv_x_base, dst, recv_x_ptr) + parity * (C * H)
    recv_src_dst = peer_ptr(recv_src_base, dst, recv_src_ptr) + parity * C
    recv_tag_dst = peer_ptr(recv_tag_base, dst, recv_tag_ptr) + parity * C
    tile_dispatch_put(
        x_ptr,
        send_units_ptr,
        phys_ptr,
        slot_pos_ptr,
        data_pos_ptr,
        recv_x_dst,
        recv_src_dst,
        recv_tag_dst,
        rank * TK,
        start,
        count,
        dst,
        K,
        KP,
        L,
        H,
        CHUNK,
        BLOCK_H,
        TOKEN_SAVING,
        LAYER,
        COPY_STAGES,
    )
    tl.debug_barrier()  # every thread's puts before the arrival below
    num_chunks = tl.maximum(tl.cdiv(tl.load(totals_ptr + PP + g), CHUNK), 1)
    # NOTE: acq_rel at system scope: the last arrival's release below then covers the puts of
    # every earlier task of the group (they released into this counter)
    if tl.atomic_add(group_done_ptr + g, 1, sem="acq_rel", scope="sys") == num_chunks - 1:
        tl.store(group_done_ptr + g, 0)  # nobody else touches it again this call
        local = tl.arange(0, LP)
        if SORTED:
            mine = local == g // R
        else:
            mine = local < L
        flags = peer_ptr(ready_base, dst, ready_ptr) + local * R + rank
        value = tl.full([LP], 0, tl.int64) + tl.cast(epoch, tl.int64)
        tl.atomic_xchg(flags, value, mask=mine, sem="release", scope="sys")


@triton.jit
def _tile_task(
    j,
    tiles_ptr,
    ready_ptr,
    recv_x_ptr,
    recv_src_ptr,
    w13_ptr,
    w13_desc,
    act_ptr,
    act_done_ptr,
    act_ready_ptr,
    resolved_ptr,
    err_ptr,
    rank,
    epoch,
    deadline,
    R: tl.constexpr,
    L: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741 (the shape legend's I)
    C: tl.constexpr,
    NB: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GEMM: tl.constexpr,
    SWIGLU: tl.constexpr,
    GATHER_A: tl.constexpr,
    GEMM1_TMA: tl.constexpr,
    PAIRS: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    PER_TILE: tl.constexpr,
    LAYER: tl.constexpr,
    PROBE: tl.constexpr,
    TRACE: tl.constexpr,
    TASK_BASE: tl.constexpr,
):
    """Tile task ``j``: wait for the tile's rows, then GEMM column block ``j % NB`` (or resolve).
    In the layer, the tile's last column block out publishes ``act_ready[tile] = epoch``.
    Without ``GATHER_A`` (and with token saving) column block 0 first resolves the tile's rows in
    place and publishes ``resolved[tile] = epoch``, which the tile's other blocks (higher ids on
    this rank) wait for. Returns the nanoseconds it waited (with TRACE; else 0)."""
    tile = j // NB
    local = tl.load(tiles_ptr + tile * 5)
    row0 = tl.load(tiles_ptr + tile * 5 + 1)
    rows = tl.load(tiles_ptr + tile * 5 + 2)
    lo = tl.arange(0, LP)[:, None]
    s = tl.arange(0, RP)[None, :]
    if TOKEN_SAVING:
        want = (lo <= local) & (s < R)  # a row's data may sit in the token's first slot
    else:
        want = (lo == local) & (s < R)
    if PER_TILE:
        want = want & (s >= tl.load(tiles_ptr + tile * 5 + 3))
        want = want & (s <= tl.load(tiles_ptr + tile * 5 + 4))
    flags = tl.reshape(ready_ptr + lo * R + s, [LP * RP])
    waited = tl.zeros((), tl.int64)
    if TRACE:
        waited = globaltimer()
    arrived = wait_flags(
        flags,
        tl.reshape(want, [LP * RP]),
        epoch,
        deadline,
        err_ptr,
        rank,
        FLAG_EXPERT_READY,
        TASK_BASE + j,
    )
    if TRACE:
        waited = globaltimer() - waited
    parity = epoch % 2
    recv_x = recv_x_ptr + parity * (C * H)
    recv_src = recv_src_ptr + parity * C
    if arrived:
        if GEMM and TOKEN_SAVING and not GATHER_A:
            # rows that take their data from the token's first slot get a copy of it first
            if j % NB == 0:
                tile_resolve_rows(recv_x, recv_src, row0, rows, H, CHUNK, BLOCK_H, BLOCK_M)
                tl.debug_barrier()  # every thread's copies before the release
                value = tl.cast(epoch, tl.int64)
                tl.atomic_xchg(resolved_ptr + tile, value, sem="release", scope="gpu")
            else:
                if TRACE:
                    waited -= globaltimer()
                arrived = wait_flag(
                    resolved_ptr + tile,
                    epoch,
                    deadline,
                    err_ptr,
                    rank,
                    FLAG_ROWS_RESOLVED + tile,
                    TASK_BASE + j,
                )
                if TRACE:
                    waited += globaltimer()
    if arrived:
        if GEMM:
            if PROBE != PROBE_COMM:
                tile_expert_gemm(
                    recv_x,
                    recv_src,
                    w13_ptr,
                    w13_desc,
                    act_ptr,
                    local,
                    row0,
                    rows,
                    j % NB,
                    H,
                    I,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    SWIGLU,
                    GATHER_A,
                    GEMM1_TMA,
                    PAIRS,
                )
            if LAYER:
                tl.debug_barrier()  # every thread's activations before the arrival
                if tl.atomic_add(act_done_ptr + tile, 1, sem="acq_rel", scope="gpu") == NB - 1:
                    tl.store(act_done_ptr + tile, 0)  # nobody else touches it again this call
                    # a local flag: release at GPU scope is enough (and cheaper than system)
                    value = tl.cast(epoch, tl.int64)
                    tl.atomic_xchg(act_ready_ptr + tile, value, sem="release", scope="gpu")
        else:
            tile_resolve_rows(recv_x, recv_src, row0, rows, H, CHUNK, BLOCK_H, BLOCK_M)
    return waited


@triton.jit
def _down_coords(j, num_tiles, GB: tl.constexpr, NB2: tl.constexpr):
    """Down task ``j`` -> (column group, tile, column block). Tasks are column-group major (the
    group's ``GB`` column blocks of every tile, then the next group's), so each group's combine
    pieces are complete early enough for its top-k reduce to run among later down tasks; within
    a group a tile's column blocks are neighbours and share its activations in L2."""
    full = tl.maximum(num_tiles * GB, 1)  # tasks of a whole group (the last may have fewer)
    g = j // full
    in_group = j - g * full
    width = tl.minimum(GB, NB2 - g * GB)  # column blocks of group g
    return g, in_group // width, g * GB + in_group % width


@triton.jit
def _combine_order(u, num_down, num_tiles, nrb, lag, GB: tl.constexpr, NRH: tl.constexpr):
    """Position ``u`` of the down + reduce part of the task order -> (is a down task, index in
    its region). Dg are column group g's down tasks, Rg its ``nrb`` top-k reduce tasks. The
    order is D0, then for g = 1 .. NRH - 1 the first ``lag`` tasks of Dg followed by the rest of
    Dg with R(g-1) spread evenly among them, then R(NRH-1). ``NRH >= 2``: with one group, id
    order (D0, then R0) is already that order.

    A reduce task waits for its group's pieces from every program here and on the peers (which
    keep the same order); they publish them when they move on from that group, so ``lag`` (about
    one wave of programs) keeps the first reduce tasks of a group from waiting on the group's
    last down tasks. Spread among the GEMMs, the reduce streams from HBM while the tensor cores
    work; as one band (a large ``lag``) it had the whole memory system to itself and the GEMMs
    stopped."""
    full = num_tiles * GB
    period = tl.maximum(full + nrb, 1)  # Dg and R(g-1)
    v = u - full
    g = tl.minimum(tl.maximum(v, 0) // period, NRH - 2) + 1  # the segment holding v
    w = v - (g - 1) * period
    down_len = tl.minimum(full, num_down - g * full)  # the last group may be narrower
    head = tl.minimum(down_len, lag)
    # after the head: down_len - head down tasks and nrb reduce tasks, mixed; position p is a
    # reduce task when the count of reduce tasks up to it steps up (Bresenham)
    p = w - head
    mixed = tl.maximum(down_len - head + nrb, 1)
    upto = (p + 1) * nrb // mixed
    reduce_here = (upto > p * nrb // mixed) & (p >= 0)
    in_mix = tl.where(reduce_here, (g - 1) * nrb + upto - 1, g * full + head + p - upto)
    # in the last segment, past the mix, R(NRH-1) follows as one run
    tail = p >= mixed
    later = tl.where(p < 0, g * full + w, tl.where(tail, (g - 1) * nrb + p - mixed + nrb, in_mix))
    is_down = (u < full) | ((p < 0) | ~(reduce_here | tail))
    idx = tl.where(u < full, u, later)
    return is_down, idx


@triton.jit
def _down_task(
    tile,
    n_block,
    task,
    tiles_ptr,
    act_ready_ptr,
    act_ptr,
    w2_ptr,
    w2_desc,
    recv_tag_ptr,
    combine_base,
    pending_ptr,
    combine_ptr,
    err_ptr,
    rank,
    epoch,
    deadline,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741 (the shape legend's I)
    C: tl.constexpr,
    K: tl.constexpr,
    TK: tl.constexpr,
    CB: tl.constexpr,
    NCB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    DOWN_TMA: tl.constexpr,
    PROBE: tl.constexpr,
    TRACE: tl.constexpr,
):
    """Down-projection task ``task`` (``tile``, column block ``n_block`` of H): wait for the
    tile's activations (GEMM1 tasks of this rank with lower ids), GEMM and put the rows to their
    source ranks."""
    waited = tl.zeros((), tl.int64)
    if TRACE:
        waited = globaltimer()
    ready = wait_flag(
        act_ready_ptr + tile, epoch, deadline, err_ptr, rank, FLAG_ACT_READY + tile, task
    )
    if TRACE:
        waited = globaltimer() - waited
    if ready:
        local = tl.load(tiles_ptr + tile * 5)
        row0 = tl.load(tiles_ptr + tile * 5 + 1)
        rows = tl.load(tiles_ptr + tile * 5 + 2)
        if PROBE == PROBE_COMM:
            acc = tl.zeros([BLOCK_M, BLOCK_N2], dtype=tl.float32)
        else:
            acc = tile_down_gemm(
                act_ptr,
                w2_ptr,
                w2_desc,
                local,
                row0,
                rows,
                n_block,
                H,
                I,
                BLOCK_M,
                BLOCK_N2,
                BLOCK_K2,
                DOWN_TMA,
            )
        tile_combine_put(
            acc,
            recv_tag_ptr + (epoch % 2) * C,
            combine_base,
            pending_ptr,
            combine_ptr,
            row0,
            rows,
            n_block,
            H,
            K,
            TK,
            CB,
            NCB,
            BLOCK_M,
            BLOCK_N2,
            PROBE != PROBE_COMPUTE,
        )
    return waited


@triton.jit
def _reduce_task(
    j,
    nrb,
    num_tokens,
    phys_ptr,
    weights_ptr,
    combine_ptr,
    count_ptr,
    out_ptr,
    err_ptr,
    rank,
    deadline,
    H: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    CB: tl.constexpr,
    NCB: tl.constexpr,
    NB2: tl.constexpr,
    GB: tl.constexpr,
    RB: tl.constexpr,
    RT: tl.constexpr,
    RH: tl.constexpr,
    RC: tl.constexpr,
    TRACE: tl.constexpr,
    TASK_BASE: tl.constexpr,
):
    """Top-k reduce task ``j`` of ``nrb`` per column group: group ``g = j // nrb`` (columns
    ``g * RH``), tokens ``(j % nrb) * RB``. Waits until the counter of its (group, token block)
    holds every piece the block's kept slots get there (one per column block of the group)."""
    g = j // nrb
    t0 = (j - g * nrb) * RB
    block = t0 // CB
    t = block * CB + tl.arange(0, CB)[:, None]
    k = tl.arange(0, KP)[None, :]
    in_block = (t < num_tokens) & (k < K)
    kept = in_block & (tl.load(phys_ptr + t * K + k, mask=in_block, other=-1) >= 0)
    blocks_in_group = tl.minimum(GB, NB2 - g * GB)
    expected = tl.sum(tl.sum(kept.to(tl.int32), axis=1), axis=0) * blocks_in_group
    waited = tl.zeros((), tl.int64)
    if TRACE:
        waited = globaltimer()
    counter = g * NCB + block
    flag = FLAG_COMBINE + counter
    ready = wait_flag(count_ptr + counter, expected, deadline, err_ptr, rank, flag, TASK_BASE + j)
    if TRACE:
        waited = globaltimer() - waited
    if ready:
        t_end = tl.minimum(t0 + RB, num_tokens)
        tile_topk_reduce(
            combine_ptr, weights_ptr, phys_ptr, out_ptr, t0, t_end, g * RH, H, K, KP, RB, RT, RH, RC
        )
    return waited


@triton.jit
def _now(TRACE: tl.constexpr):
    if TRACE:
        return globaltimer()
    return tl.zeros((), tl.int64)


@triton.jit
def _trace_begin(trace_ptr, TRACE: tl.constexpr, CAP: tl.constexpr):
    """Events this program recorded in earlier launches of this call (header word 2)."""
    n = tl.zeros((), tl.int32)
    if TRACE:
        n = tl.load(trace_ptr + tl.program_id(0) * (CAP + 1) * 4 + 2).to(tl.int32)
    return n


@triton.jit
def _trace_task(trace_ptr, n, kind, task, start, waited, TRACE: tl.constexpr, CAP: tl.constexpr):
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
def _trace_end(trace_ptr, n, rank, TRACE: tl.constexpr, CAP: tl.constexpr):
    """The program's header: (SM id, rank, events recorded or dropped, 0)."""
    if TRACE:
        i = tl.arange(0, 4)
        sm = tl.cast(smid(), tl.int64)
        word = tl.where(i == 0, sm, tl.where(i == 1, tl.cast(rank, tl.int64), 0))
        word = tl.where(i == 2, tl.cast(n, tl.int64), word)
        tl.store(trace_ptr + tl.program_id(0) * (CAP + 1) * 4 + i, word)


@triton.jit
def _share(task_begin, task_end, base, active):
    """The part of task region ``[base, base + active)`` inside ``[task_begin, task_end)``, as
    (first index in the region, count)."""
    lo = tl.minimum(tl.maximum(task_begin - base, 0), active)
    hi = tl.minimum(tl.maximum(task_end - base, 0), active)
    return lo, hi - lo


@triton.jit(do_not_specialize=["rank", "num_tokens", "task_begin", "task_end", "timeout_ns"])
def moe_megakernel(
    x_ptr,  # [T, H] this rank's tokens
    w13_ptr,  # [L, 2I, H] this rank's experts
    w13_desc,  # GEMM1_TMA: w13's block descriptor (see tile_expert_gemm), else None
    w2_ptr,  # [L, H, I] (LAYER)
    w2_desc,  # DOWN_TMA: [BN2, BK2] block descriptor of w2 as [L * H, I] (else None)
    weights_ptr,  # [T, K] fp32 routing weights (LAYER)
    act_ptr,  # [C, I] (or [C, 2I] without SwiGLU) out: expert activations, receive order
    out_ptr,  # [T, H] out: the layer's output (LAYER)
    tasks_ptr,  # plan: [num_tasks, 4] int32
    tiles_ptr,  # plan: [max_tiles, 5] int32
    stats_ptr,  # plan: [4] int32
    totals_ptr,  # plan: [2, PP] int32 (units per send group in row 1)
    send_units_ptr,  # plan: [U_max] int32
    phys_ptr,  # plan: [T, K] int32
    slot_pos_ptr,  # plan: [T, K] int32
    data_pos_ptr,  # plan: [T, K] int32
    recv_x_base,  # [R] int64: every rank's sym recv_x [2, C, H]
    recv_src_base,  # [R] int64: every rank's sym recv_src [2, C] int32
    recv_tag_base,  # [R] int64: every rank's sym recv_tag [2, C] int32 (LAYER)
    ready_base,  # [R] int64: every rank's sym expert_ready [L, R] int64
    combine_base,  # [R] int64: every rank's sym combine_y [T_max * K, H] (LAYER)
    count_base,  # [R] int64: every rank's sym combine_count [NRH, NCB] int32 (LAYER)
    recv_x_ptr,  # this rank's recv_x
    recv_src_ptr,  # this rank's recv_src
    recv_tag_ptr,  # this rank's recv_tag
    ready_ptr,  # this rank's expert_ready
    combine_ptr,  # this rank's combine_y
    count_ptr,  # this rank's combine_count
    group_done_ptr,  # [PP] int32: arrivals per send group (0 between calls)
    act_done_ptr,  # [max_tiles] int32: GEMM1 arrivals per tile (0 between calls)
    act_ready_ptr,  # [max_tiles] int64 flags: tile -> epoch of its activations
    resolved_ptr,  # [max_tiles] int64 flags: tile -> epoch its rows were resolved (not GATHER_A)
    pending_ptr,  # [programs, RNCBP] int32: combine pieces not yet added (0 between calls)
    counters_ptr,  # [3] int32: dispatch, compute and exit counters (0 between launches)
    err_ptr,  # [ERR_WORDS] int64 error record of this rank
    epoch_ptr,  # [1] int64: this call's epoch (the plan bumped it)
    trace_ptr,  # TRACE: [programs, 1 + TRACE_CAP, 4] int64 (megakernel.profiler), zeroed per call
    rank,
    num_tokens,
    task_begin,
    task_end,
    timeout_ns,
    K: tl.constexpr,
    KP: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    L: tl.constexpr,
    LP: tl.constexpr,
    PP: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741 (the shape legend's I)
    C: tl.constexpr,
    TK: tl.constexpr,
    MAX_DISPATCH: tl.constexpr,
    BASE_DOWN: tl.constexpr,
    BASE_REDUCE: tl.constexpr,
    MAX_REDUCE: tl.constexpr,
    NB: tl.constexpr,
    NB2: tl.constexpr,
    CB: tl.constexpr,
    NCB: tl.constexpr,
    NCBP: tl.constexpr,
    RNCBP: tl.constexpr,
    NRH: tl.constexpr,
    GB: tl.constexpr,
    RB: tl.constexpr,
    RT: tl.constexpr,
    RH: tl.constexpr,
    RC: tl.constexpr,
    LAG: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COPY_STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    DOWN_TMA: tl.constexpr,
    DISPATCH_CTAS: tl.constexpr,
    GEMM: tl.constexpr,
    SWIGLU: tl.constexpr,
    GATHER_A: tl.constexpr,
    GEMM1_TMA: tl.constexpr,
    PAIRS: tl.constexpr,
    LAYER: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
    PER_TILE: tl.constexpr,
    PROBE: tl.constexpr,
    TRACE: tl.constexpr,
    TRACE_CAP: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
    deadline = globaltimer() + timeout_ns
    # this launch's share of each task region (the CPU emulation runs them as separate phases)
    # (none at all when the plan failed (overflow) or an earlier wait timed out)
    ok = tl.load(err_ptr) == 0
    num_tiles = tl.where(ok, tl.load(stats_ptr + 2), 0)
    num_down = 0
    nrb = 0  # reduce tasks per column group
    if LAYER:
        num_down = num_tiles * NB2
        nrb = tl.where(ok, tl.cdiv(num_tokens, RB), 0)
    num_reduce = nrb * NRH
    d_lo, d_count = _share(task_begin, task_end, 0, tl.where(ok, tl.load(stats_ptr + 3), 0))
    g_lo, g_count = _share(task_begin, task_end, MAX_DISPATCH, num_tiles * NB)
    n_lo, n_count = _share(task_begin, task_end, BASE_DOWN, num_down)
    r_lo, r_count = _share(task_begin, task_end, BASE_REDUCE, num_reduce)
    # a launch holding both whole regions interleaves them (_combine_order); else id order
    interleave = (n_count == num_down) & (r_count == num_reduce)
    # TRACE: this program's events so far this call (earlier launches of it appended theirs)
    n_events = _trace_begin(trace_ptr, TRACE, TRACE_CAP)
    if tl.program_id(0) < DISPATCH_CTAS:
        d = tl.atomic_add(counters_ptr + COUNTER_DISPATCH, 1, sem="relaxed")
        while d < d_count:
            start = _now(TRACE)
            _dispatch_task(
                d_lo + d,
                tasks_ptr,
                totals_ptr,
                group_done_ptr,
                x_ptr,
                send_units_ptr,
                phys_ptr,
                slot_pos_ptr,
                data_pos_ptr,
                recv_x_base,
                recv_src_base,
                recv_tag_base,
                ready_base,
                recv_x_ptr,
                recv_src_ptr,
                recv_tag_ptr,
                ready_ptr,
                rank,
                epoch,
                K,
                KP,
                R,
                L,
                LP,
                PP,
                H,
                C,
                TK,
                CHUNK,
                BLOCK_H,
                TOKEN_SAVING,
                SORTED,
                LAYER,
                COPY_STAGES,
            )
            n_events = _trace_task(
                trace_ptr, n_events, KIND_DISPATCH, d_lo + d, start, 0, TRACE, TRACE_CAP
            )
            d = tl.atomic_add(counters_ptr + COUNTER_DISPATCH, 1, sem="relaxed")
    # compute tasks: GEMM1 (or resolve) in id order, then down projection + combine put and
    # top-k reduce, interleaved by column group (_combine_order); a task only waits on lower ids
    # here or on dispatch / down tasks of peers
    pending_row = pending_ptr + tl.program_id(0) * RNCBP
    held = tl.full((), -1, tl.int32)  # column group of the pieces in pending_row; -1: none
    q = tl.atomic_add(counters_ptr + COUNTER_COMPUTE, 1, sem="relaxed")
    while q < g_count + n_count + r_count:
        start = _now(TRACE)
        waited = tl.zeros((), tl.int64)
        kind = tl.full((), KIND_RESOLVE, tl.int32)
        if GEMM:
            kind = tl.full((), KIND_GEMM1, tl.int32)
        task = MAX_DISPATCH + g_lo + q
        if q < g_count:
            waited = _tile_task(
                g_lo + q,
                tiles_ptr,
                ready_ptr,
                recv_x_ptr,
                recv_src_ptr,
                w13_ptr,
                w13_desc,
                act_ptr,
                act_done_ptr,
                act_ready_ptr,
                resolved_ptr,
                err_ptr,
                rank,
                epoch,
                deadline,
                R,
                L,
                RP,
                LP,
                H,
                I,
                C,
                NB,
                CHUNK,
                BLOCK_H,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                GEMM,
                SWIGLU,
                GATHER_A,
                GEMM1_TMA,
                PAIRS,
                TOKEN_SAVING,
                PER_TILE,
                LAYER,
                PROBE,
                TRACE,
                MAX_DISPATCH,
            )
        elif LAYER:
            u = q - g_count
            is_down = u < n_count
            idx = tl.where(is_down, n_lo + u, r_lo + u - n_count)
            if NRH > 1:  # one column group: id order is the interleaved order
                if interleave:
                    is_down, idx = _combine_order(u, num_down, num_tiles, nrb, LAG, GB, NRH)
            if is_down:
                group, tile, n_block = _down_coords(idx, num_tiles, GB, NB2)
                # NOTE: a program holds one group's pieces at a time: publish them when it moves on
                if (held >= 0) & (held != group):
                    flush_pieces(pending_row, count_base, held, R, NCB, RNCBP)
                held = group.to(tl.int32)
                kind = tl.full((), KIND_DOWN, tl.int32)
                task = BASE_DOWN + idx
                waited = _down_task(
                    tile,
                    n_block,
                    task,
                    tiles_ptr,
                    act_ready_ptr,
                    act_ptr,
                    w2_ptr,
                    w2_desc,
                    recv_tag_ptr,
                    combine_base,
                    pending_row,
                    combine_ptr,
                    err_ptr,
                    rank,
                    epoch,
                    deadline,
                    H,
                    I,
                    C,
                    K,
                    TK,
                    CB,
                    NCB,
                    BLOCK_M,
                    BLOCK_N2,
                    BLOCK_K2,
                    DOWN_TMA,
                    PROBE,
                    TRACE,
                )
            else:
                # NOTE: publish this program's combine pieces before it waits on anybody's
                if held >= 0:
                    flush_pieces(pending_row, count_base, held, R, NCB, RNCBP)
                    held = tl.full((), -1, tl.int32)
                kind = tl.full((), KIND_REDUCE, tl.int32)
                task = BASE_REDUCE + idx
                waited = _reduce_task(
                    idx,
                    nrb,
                    num_tokens,
                    phys_ptr,
                    weights_ptr,
                    combine_ptr,
                    count_ptr,
                    out_ptr,
                    err_ptr,
                    rank,
                    deadline,
                    H,
                    K,
                    KP,
                    CB,
                    NCB,
                    NB2,
                    GB,
                    RB,
                    RT,
                    RH,
                    RC,
                    TRACE,
                    BASE_REDUCE,
                )
        n_events = _trace_task(trace_ptr, n_events, kind, task, start, waited, TRACE, TRACE_CAP)
        q = tl.atomic_add(counters_ptr + COUNTER_COMPUTE, 1, sem="relaxed")
    if LAYER:
        if held >= 0:
            flush_pieces(pending_row, count_base, held, R, NCB, RNCBP)
    _trace_end(trace_ptr, n_events, rank, TRACE, TRACE_CAP)
    # the last program out resets the counters for the next launch (stream-ordered after it)
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + COUNTER_EXIT, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        tl.store(counters_ptr + COUNTER_DISPATCH, 0)
        tl.store(counters_ptr + COUNTER_COMPUTE, 0)
        tl.store(counters_ptr + COUNTER_EXIT, 0)
        if LAYER:
            # NOTE: every reduce task of this call has consumed its block's pieces, and no peer
            # puts pieces for the next call before this rank dispatches it: safe to clear
            if (task_begin <= BASE_REDUCE) & (task_end >= BASE_REDUCE + MAX_REDUCE):
                b = tl.arange(0, NCBP)
                tl.store(count_ptr + b, tl.zeros([NCBP], tl.int32), mask=b < NRH * NCB)


# ----------------------------------------------------------------------------- host side


def kernel_meta(
    shape: MoEShape,
    plan_cfg: PlanConfig,
    config: KernelConfig,
    capacity: int,
    swiglu: bool,
    num_ctas: int,
    mode: str,
    probe: int = 0,
) -> dict[str, int | bool]:
    """Compile-time constants and launch options of ``moe_megakernel`` (``probe``: one of the
    PROBE_* timing probes of mode "layer")."""
    cfg, pc = config, plan_cfg
    gemm, layer = mode in ("gemm", "layer"), mode == "layer"
    width = shape.ffn if swiglu else 2 * shape.ffn
    T, H = shape.max_tokens_per_rank, shape.hidden
    nb = triton.cdiv(width, cfg.block_n) if gemm else 1
    nb2 = triton.cdiv(H, cfg.down_block_n) if layer else 1
    ncb = triton.cdiv(T, cfg.combine_block)
    rh, nrh, gb = cfg.reduce_groups(H)
    rb = min(cfg.reduce_tokens, cfg.combine_block)
    rt = min(REDUCE_ROWS, rb)
    base_down = pc.max_dispatch_tasks + pc.max_tiles * nb
    base_reduce = base_down + (pc.max_tiles * nb2 if layer else 0)
    return dict(
        K=pc.topk,
        KP=_pow2(pc.topk),
        R=pc.world_size,
        RP=_pow2(pc.world_size),
        L=pc.slots_per_rank,
        LP=_pow2(pc.slots_per_rank),
        PP=_pow2(pc.num_slots),
        H=shape.hidden,
        I=shape.ffn,
        C=capacity,
        TK=T * pc.topk,
        MAX_DISPATCH=pc.max_dispatch_tasks,
        BASE_DOWN=base_down,
        BASE_REDUCE=base_reduce,
        MAX_REDUCE=triton.cdiv(T, rb) * nrh if layer else 0,
        NB=nb,
        NB2=nb2,
        CB=cfg.combine_block,
        NCB=ncb,
        NCBP=_pow2(nrh * ncb),
        RNCBP=_pow2(pc.world_size * ncb),
        NRH=nrh,
        GB=gb,
        RB=rb,
        RT=rt,
        RH=rh,
        LAG=cfg.reduce_lag or num_ctas,
        RC=min(rh, max(1, REDUCE_LOAD // (rt * _pow2(pc.topk)))),
        CHUNK=cfg.chunk,
        BLOCK_H=min(cfg.block_h, _pow2(shape.hidden)),
        COPY_STAGES=cfg.copy_stages,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_N2=cfg.down_block_n,
        BLOCK_K2=cfg.down_block_k,
        DOWN_TMA=layer and cfg.down_tma,
        DISPATCH_CTAS=min(cfg.dispatch_ctas or num_ctas, num_ctas),
        GEMM=gemm,
        SWIGLU=swiglu,
        GATHER_A=cfg.gather_a(shape),
        GEMM1_TMA=gemm and cfg.gemm1_tma,
        PAIRS=gemm and cfg.paired_gemm1(swiglu),
        LAYER=layer,
        TOKEN_SAVING=cfg.token_saving,
        SORTED=cfg.sorted_dispatch,
        PER_TILE=cfg.per_tile_flags,
        PROBE=probe,
        TRACE=cfg.trace,
        TRACE_CAP=cfg.trace_events,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


@dataclass
class DispatchHandle:
    """One rank's result of a call, as device views.

    ``act [C, I]`` (``[C, 2I]`` without SwiGLU) holds the expert activations of rows
    ``[0, num_recv)`` in the receive order (DESIGN §4); rows past that are stale. ``out [T, H]``
    is the layer's output (mode "layer"; a fresh tensor per call). The views are valid until the
    workspace's next call on this rank.
    """

    rank: int
    epoch: int
    act: torch.Tensor  # [C, I]
    recv_x: torch.Tensor  # [C, H] this call's receive rows (indirect rows unresolved in "gemm")
    recv_src: torch.Tensor  # [C] int32 row holding each row's data
    stats: torch.Tensor  # [4] int32 the plan's stats (megakernel.plan.STATS)
    topk_weights: torch.Tensor | None  # [T, K]
    plan: Plan | None  # this call's plan (views, overwritten by the next call)
    out: torch.Tensor | None = None  # [T, H] mode "layer"
    trace: torch.Tensor | None = None  # KernelConfig(trace=True): this call's trace records

    def num_recv(self) -> int:
        """Rows this rank received (reads the plan's stats back: one sync)."""
        return int(self.stats[STATS.index("num_recv")])

    def snapshot(self) -> DispatchHandle:
        """A copy of the outputs, made on the current stream (no sync), that later calls do not
        overwrite. The copy has no plan."""
        return replace(
            self,
            act=self.act.clone(),
            recv_x=self.recv_x.clone(),
            recv_src=self.recv_src.clone(),
            stats=self.stats.clone(),
            plan=None,
        )

    def resolved(self) -> torch.Tensor:
        """``[num_recv, H]`` the received rows with every indirect row resolved (torch gather)."""
        n = self.num_recv()
        return self.recv_x[self.recv_src[:n].long()]


class Megakernel:
    """Workspace of the megakernel for every rank this process runs.

    Owns the plan workspace and the symmetric buffers (``sizes()`` lists them):
      ``recv_x [2, C, H]``      receive rows, double-buffered by epoch parity;
      ``recv_src [2, C]``       int32, the row holding each row's data;
      ``expert_ready [L, R]``   int64 flags: (local slot, source rank) -> epoch;
    with ``combine`` (what mode "layer" needs) also
      ``recv_tag [2, C]``       int32, each row's (source rank, token, k): where its output goes;
      ``combine_y [T * K, H]``  the expert outputs of this rank's tokens, one row per (token, k);
      ``combine_count [NRH, NCB]``  int32 pieces arrived per (column group of H, block of
                                ``combine_block`` tokens);
    and per rank ``act [C, I]``, ``act_ready`` / ``act_done`` / ``resolved`` per tile,
    ``group_done [PP]`` and the task counters.

    ``combine_y`` needs no second buffer: a peer puts call n + 1's rows only after this rank
    dispatched call n + 1, which its stream orders after call n's top-k reduce.
    """

    def __init__(
        self,
        world: World,
        shape: MoEShape,
        *,
        placement: Placement | None = None,
        config: KernelConfig | None = None,
        capacity: int | None = None,
        swiglu: bool = True,
        combine: bool = True,
    ) -> None:
        R = world.world_size
        self.world, self.shape = world, shape
        self.placement = placement or Placement.contiguous(shape.num_experts, R)
        self.config = cfg = config or KernelConfig()
        self.swiglu, self.combine = swiglu, combine
        L, H, I = self.placement.slots_per_rank, shape.hidden, shape.ffn  # noqa: E741
        T, K = shape.max_tokens_per_rank, shape.topk
        if H % cfg.block_k:
            raise ValueError(f"hidden size {H} is not a multiple of block_k {cfg.block_k}")
        if cfg.gemm1_tma:
            _check_tma_rows("gemm1_tma", "w13", "block_k", cfg.block_k, shape.dtype)
        if combine and not swiglu:
            raise ValueError("the combine (mode 'layer') runs on SwiGLU activations: swiglu=True")
        if combine and I % cfg.down_block_k:
            raise ValueError(f"ffn size {I} is not a multiple of down_block_k {cfg.down_block_k}")
        if combine and cfg.down_tma:
            _check_tma_rows("down_tma", "w2", "down_block_k", cfg.down_block_k, shape.dtype)
        shared = world.concurrent and len(world.local_ranks) > 1  # ranks on one GPU
        if shared and cfg.num_ctas > world.sms_per_rank:
            # NOTE: with a GPU per rank, extra programs only queue for an SM: a task waits on
            # tasks claimed before it, by programs that run. Ranks sharing a GPU share its SMs too
            raise ValueError(
                f"KernelConfig.num_ctas = {cfg.num_ctas} is more than the {world.sms_per_rank} "
                f"SMs per rank of a world whose {len(world.local_ranks)} ranks share one GPU: one "
                "rank's programs could hold the SMs its peers need while waiting on those peers"
            )
        C = capacity or default_capacity(shape, R, L)
        self.plan_cfg = PlanConfig(
            R,
            L,
            K,
            max_tokens=T,
            capacity=C,
            block_m=cfg.block_m,
            chunk=cfg.chunk,
            token_saving=cfg.token_saving,
            sorted_dispatch=cfg.sorted_dispatch,
        )
        self.plan_ws = PlanWorkspace(world, self.plan_cfg, self.placement)
        self.capacity = C
        self.sym_recv_x = world.alloc((2, C, H), shape.dtype)
        self.sym_recv_src = world.alloc((2, C), torch.int32)
        self.sym_ready = world.alloc((L, R), torch.int64)
        self._sym = [self.sym_recv_x, self.sym_recv_src, self.sym_ready]
        ncb = triton.cdiv(T, cfg.combine_block)  # combine counters (token blocks) per rank
        if combine:
            self.sym_recv_tag = world.alloc((2, C), torch.int32)
            self.sym_combine = world.alloc((T * K, H), shape.dtype)
            self.sym_count = world.alloc((cfg.reduce_groups(H)[1], ncb), torch.int32)
            self._sym += [self.sym_recv_tag, self.sym_combine, self.sym_count]
        dev, PP, MT = world.device, _pow2(R * L), self.plan_cfg.max_tiles
        width = I if swiglu else 2 * I

        def per_rank(*size: int, dtype: torch.dtype = torch.int32) -> dict[int, torch.Tensor]:
            return {r: torch.zeros(size, dtype=dtype, device=dev) for r in world.local_ranks}

        self.act = per_rank(C, width, dtype=shape.dtype)
        self.group_done = per_rank(PP)
        self.act_done = per_rank(MT)
        self.act_ready = per_rank(MT, dtype=torch.int64)
        self.resolved = per_rank(MT, dtype=torch.int64)
        self.counters = per_rank(3)
        self.num_ctas = cfg.num_ctas or world.sms_per_rank
        own_gpu = world.device.type == "cuda" and not shared
        self.dispatch_only_ctas = cfg.num_ctas or world.sms_per_rank * (
            DISPATCH_ONLY_PROGRAMS_PER_SM if own_gpu else 1
        )
        self.pending = per_rank(self.num_ctas, _pow2(R * ncb))
        # [programs, 1 + events, 4] int64: a header, then (kind << 32 | task, start, end, waited)
        programs = max(self.num_ctas, self.dispatch_only_ctas)
        trace_shape = (programs, cfg.trace_events + 1, 4) if cfg.trace else (4,)
        self.trace = per_rank(*trace_shape, dtype=torch.int64)
        self.epoch = {r: 0 for r in world.local_ranks}  # host mirror of the plan's device epoch
        self._warm: set[tuple[str, int]] = set()  # (mode, probe) compiled and loaded

    # -- sizes ----------------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        """Bytes per rank of each buffer this workspace owns."""
        names = ["recv_x", "recv_src", "expert_ready", "recv_tag", "combine_y", "combine_count"]
        sym = {f"{name} (sym)": t.nbytes for name, t in zip(names, self._sym, strict=False)}
        r = self.world.local_ranks[0]
        local = {
            "act": self.act[r].numel() * self.act[r].element_size(),
            "flags, counters": sum(
                t[r].numel() * t[r].element_size()
                for t in (
                    self.group_done,
                    self.act_done,
                    self.act_ready,
                    self.resolved,
                    self.pending,
                    self.counters,
                )
            ),
        }
        if self.config.trace:
            local["trace"] = self.trace[r].numel() * 8
        plan = sum(b.numel() * b.element_size() for b in self.plan_ws.bufs[r].values())
        plan += self.plan_ws.sym_counts.nbytes + self.plan_ws.sym_ready.nbytes
        return {**sym, **local, "plan": plan}

    def describe(self) -> str:
        rows = [f"  {name:<20} {size / 2**20:10.2f} MiB" for name, size in self.sizes().items()]
        total = sum(self.sizes().values()) / 2**20
        return "\n".join(
            [f"Megakernel workspace per rank (capacity {self.capacity} rows):", *rows]
            + [f"  {'total':<20} {total:10.2f} MiB"]
        )

    # -- launching ------------------------------------------------------------------------

    def programs(self, mode: str) -> int:
        """Programs per rank a launch of ``mode`` runs (``KernelConfig.num_ctas``, else one per
        SM; mode "dispatch" several per SM where each rank has its own GPU)."""
        return self.dispatch_only_ctas if mode == "dispatch" else self.num_ctas

    def _meta(self, mode: str, probe: int = 0) -> dict[str, int | bool]:
        return kernel_meta(
            self.shape,
            self.plan_cfg,
            self.config,
            self.capacity,
            self.swiglu,
            self.programs(mode),
            mode,
            probe,
        )

    def task_regions(self, mode: str) -> dict[str, tuple[int, int]]:
        """The task id range ``[begin, end)`` of each task kind of one call, in id order."""
        meta = self._meta(mode)
        bounds = {
            "dispatch": (0, meta["MAX_DISPATCH"]),
            "gemm1": (meta["MAX_DISPATCH"], meta["BASE_DOWN"]),
            "down": (meta["BASE_DOWN"], meta["BASE_REDUCE"]),
            "reduce": (meta["BASE_REDUCE"], meta["BASE_REDUCE"] + meta["MAX_REDUCE"]),
        }
        return {kind: (b, e) for kind, (b, e) in bounds.items() if e > b}

    def _descriptors(self, meta: dict, w13, w2) -> tuple:
        """The weights' TMA descriptors the launch's kernel reads, None for the others.

        NOTE: decided by the launch's meta, not by which weights the caller passed, so a call
        passes the argument types ``warmup`` compiled for its mode (a None descriptor and a
        tensor descriptor are different kernel variants)."""
        cfg, H, I = self.config, self.shape.hidden, self.shape.ffn  # noqa: E741
        w13_desc = w2_desc = None
        if meta["GEMM1_TMA"]:
            if meta["PAIRS"]:
                # w13 [L, 2I, H] as [L, I, 2, H]: a box holds gate row j, then up row j, ...
                L, box = w13.shape[0], [1, cfg.block_n, 2, cfg.block_k]
                w13_desc = TensorDescriptor(w13, [L, I, 2, H], [2 * I * H, H, I * H, 1], box)
            else:
                w13_desc = TensorDescriptor.from_tensor(w13.view(-1, H), [cfg.block_n, cfg.block_k])
        if meta["DOWN_TMA"]:
            block = [cfg.down_block_n, cfg.down_block_k]
            w2_desc = TensorDescriptor.from_tensor(w2.view(-1, I), block)
        return w13_desc, w2_desc

    def _args(self, rank: int, inputs: tuple, meta: dict, begin: int, end: int) -> tuple:
        x, _, weights, w13, w2, out = inputs
        b = self.plan_ws.bufs[rank]
        w13_desc, w2_desc = self._descriptors(meta, w13, w2)
        # without the combine buffers the kernel never touches these arguments (LAYER is off)
        tag, comb, count = (
            (self.sym_recv_tag, self.sym_combine, self.sym_count)
            if self.combine
            else (self.sym_recv_src, self.sym_recv_x, self.sym_recv_src)
        )
        return (
            x,
            w13,
            w13_desc,
            w13 if w2 is None else w2,
            w2_desc,
            x if weights is None else weights,
            self.act[rank],
            x if out is None else out,
            b["tasks"],
            b["tiles"],
            b["stats"],
            b["totals"],
            b["send_units"],
            b["phys"],
            b["slot_pos"],
            b["data_pos"],
            self.sym_recv_x.peer_base,
            self.sym_recv_src.peer_base,
            tag.peer_base,
            self.sym_ready.peer_base,
            comb.peer_base,
            count.peer_base,
            self.sym_recv_x.peer(rank),
            self.sym_recv_src.peer(rank),
            tag.peer(rank),
            self.sym_ready.peer(rank),
            comb.peer(rank),
            count.peer(rank),
            self.group_done[rank],
            self.act_done[rank],
            self.act_ready[rank],
            self.resolved[rank],
            self.pending[rank],
            self.counters[rank],
            self.world.error_record(rank),
            self.plan_ws.epoch[rank],
            self.trace[rank],
            rank,
            x.shape[0],
            begin,
            end,
            self.world.timeout_ns(),
        )

    def _dummy_inputs(self) -> tuple:
        dev, shape, L = self.world.device, self.shape, self.plan_cfg.slots_per_rank
        H, I, K = shape.hidden, shape.ffn, shape.topk  # noqa: E741
        x = torch.zeros(2, H, dtype=shape.dtype, device=dev)
        w13 = torch.zeros(L, 2 * I, H, dtype=shape.dtype, device=dev)
        w2 = torch.zeros(L, H, I, dtype=shape.dtype, device=dev)
        weights = torch.zeros(2, K, dtype=torch.float32, device=dev)
        return x, None, weights, w13, w2, torch.zeros_like(x)

    def warmup(self, mode: str = "gemm", probe: int = 0) -> None:
        """Compile and load the plan kernels and the megakernel before anything spins."""
        if (mode, probe) in self._warm or self.world.device.type != "cuda":
            return
        self.plan_ws.warmup()
        r = self.world.local_ranks[0]
        meta = self._meta(mode, probe)
        kernel = moe_megakernel.warmup(
            *self._args(r, self._dummy_inputs(), meta, 0, 0), **meta, grid=(1,)
        )
        kernel._init_handles()
        self._warm.add((mode, probe))

    def _check_tensor(self, rank: int, name: str, t: object, want: tuple, dtype) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"rank {rank}: {name} has shape {tuple(t.shape)}, expected {want}")
        if t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype} but the layer is {dtype}")
        if t.device != self.world.device:
            raise ValueError(f"{name} is on {t.device}, the layer on {self.world.device}")

    def _prepare(
        self, rank: int, x, topk_ids, topk_weights, w13, w2, out, mode: str, validate: bool
    ):
        shape, L, dev = self.shape, self.plan_cfg.slots_per_rank, self.world.device
        H, I = shape.hidden, shape.ffn  # noqa: E741
        layer = mode == "layer"
        if layer and topk_weights is None:
            raise ValueError('mode "layer" needs topk_weights')
        if layer and w2 is None:
            raise ValueError('mode "layer" needs w2 [L, H, I]')
        if validate:
            check_routing(
                topk_ids,
                topk_weights,
                num_experts=self.placement.num_experts,
                topk=shape.topk,
                max_tokens=shape.max_tokens_per_rank,
                device=dev,
                # NOTE: no host read-back while a CUDA graph is being captured
                check_values=dev.type != "cuda" or not torch.cuda.is_current_stream_capturing(),
            )
            self._check_tensor(rank, "x", x, (topk_ids.shape[0], H), shape.dtype)
            self._check_tensor(rank, "w13", w13, (L, 2 * I, H), shape.dtype)
            if layer:
                self._check_tensor(rank, "w2", w2, (L, H, I), shape.dtype)
            if out is not None:
                self._check_tensor(rank, "out", out, (x.shape[0], H), shape.dtype)
                if not out.is_contiguous():
                    raise ValueError("out must be contiguous")
        # NOTE: a misaligned view would compile a new kernel variant at launch, while peers spin
        x, w13, w2 = (
            t if t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0) else t.clone()
            for t in (x, w13, w2)
        )
        if layer:
            topk_weights = topk_weights.to(torch.float32).contiguous()
            if out is None:
                out = torch.empty(x.shape[0], H, dtype=shape.dtype, device=dev)
        ids = self.plan_ws._prepare(topk_ids, validate=False)
        return x, ids, topk_weights, w13, w2, out

    def run(
        self,
        x: dict[int, torch.Tensor],
        topk_ids: dict[int, torch.Tensor],
        topk_weights: dict[int, torch.Tensor] | None,
        w13: dict[int, torch.Tensor],
        w2: dict[int, torch.Tensor] | None = None,
        *,
        out: dict[int, torch.Tensor] | None = None,
        mode: str = "gemm",
        overlap: bool | None = None,
        split: bool = False,
        validate: bool = True,
        stage: str = "all",
    ) -> dict[int, DispatchHandle]:
        """One call on every local rank (inputs keyed by rank). ``mode``: "layer" (the whole MoE
        layer: needs ``topk_weights`` and ``w2``; writes ``out [T, H]`` when given, else a new
        tensor), "gemm" (dispatch + GEMM1, fused) or "dispatch"
        (dispatch, then resolve every indirect row).

        ``split`` runs the layer as two kernels (dispatch + GEMM1, then down projection + combine
        + top-k reduce) instead of one.

        ``stage`` times parts alone. Modes "gemm" and "dispatch": "dispatch" (plan and dispatch
        tasks only); "sends" (no plan: rerun the last call's dispatch tasks, which put the same
        rows again; the data movement alone); "tiles" (no plan, no dispatch: rerun the last
        call's tile tasks on its received rows). Mode "layer": "comm" (a whole call without the
        GEMM math: communication, flags and the top-k reduce; the outputs are junk); "compute"
        (both GEMMs rerun on the last call's rows, outputs kept on this rank). "all": the real
        call.

        ``overlap`` (default: when the world runs ranks concurrently) runs each rank's task range
        in one launch (two with ``split``); otherwise each task kind runs on every rank before the
        next kind starts (the CPU interpreter must; on one GPU it isolates a hang from a race).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if mode == "layer" and not self.combine:
            raise ValueError('mode "layer" needs a workspace built with combine=True')
        layer_stages = ("all", "comm", "compute")
        if (mode == "layer") != (stage in layer_stages) and stage != "all":
            raise ValueError(f'stage {stage!r} is not one of mode "{mode}"')
        rerun = stage in ("sends", "tiles", "compute")
        if rerun and min(self.epoch.values()) == 0:
            raise ValueError(
                f"stage={stage!r} reruns the last call's tasks: make a full call first"
            )
        probe = {"comm": PROBE_COMM, "compute": PROBE_COMPUTE}.get(stage, PROBE_OFF).value
        ranks = self.world.local_ranks
        weights = topk_weights or {r: None for r in ranks}
        w2 = w2 or {r: None for r in ranks}
        out = out or {r: None for r in ranks}
        ready = {
            r: self._prepare(
                r, x[r], topk_ids[r], weights[r], w13[r], w2[r], out[r], mode, validate
            )
            for r in ranks
        }
        self.warmup(mode, probe)
        if not rerun:
            for phase in self.plan_ws.phases():
                self.world.run_ranks(
                    lambda r, p=phase: self.plan_ws.launch(r, ready[r][1], p, validate=False)
                )
        elif stage != "sends":  # (the puts alone wait on nothing; clearing would be timed too)
            for r in ranks:  # the rerun's tasks wait for its own GEMM1 tasks and resolves
                self.act_ready[r].zero_()
                self.resolved[r].zero_()
        meta = self._meta(mode, probe)
        if self.config.trace:
            for r in ranks:
                self.trace[r].zero_()
        for begin, end in self._ranges(mode, stage, overlap, split):

            def launch(r: int, begin: int = begin, end: int = end) -> None:
                grid = (self.programs(mode),)
                moe_megakernel[grid](*self._args(r, ready[r], meta, begin, end), **meta)

            self.world.run_ranks(launch)
        handles = {}
        for r in ranks:
            self.epoch[r] += not rerun
            parity = self.epoch[r] % 2
            handles[r] = DispatchHandle(
                rank=r,
                epoch=self.epoch[r],
                act=self.act[r],
                recv_x=self.sym_recv_x.peer(r)[parity],
                recv_src=self.sym_recv_src.peer(r)[parity],
                stats=self.plan_ws.bufs[r]["stats"],
                topk_weights=ready[r][2],
                plan=self.plan_ws.plan(r),
                out=ready[r][5],
                trace=self.trace[r] if self.config.trace else None,
            )
        return handles

    def _ranges(
        self, mode: str, stage: str, overlap: bool | None, split: bool
    ) -> list[tuple[int, int]]:
        """The task id ranges to launch, in order (each one launch per rank)."""
        regions = self.task_regions(mode)
        if stage in ("dispatch", "sends"):
            return [regions["dispatch"]]
        if stage == "tiles":
            return [(regions["gemm1"][0], max(e for _, e in regions.values()))]
        if stage == "compute":
            return [(regions["gemm1"][0], regions["down"][1])]
        overlap = self.world.concurrent if overlap is None else overlap
        if not overlap:
            return list(regions.values())
        end = max(e for _, e in regions.values())
        if split and "down" in regions:
            cut = regions["down"][0]
            return [(0, cut), (cut, end)]
        return [(0, end)]

    def flag_name(self, flag: int) -> str:
        """Names the flag of a ``WaitTimeoutError`` raised by ``world.check_errors``."""
        if flag >= FLAG_ROWS_RESOLVED.value:
            return f"resolved[tile {flag - FLAG_ROWS_RESOLVED.value}] (its column block 0)"
        if flag >= FLAG_COMBINE.value:
            ncb = self.sym_count.shape[-1]
            group, block = divmod(flag - FLAG_COMBINE.value, ncb)
            return (
                f"combine_count[column group {group}, token block {block}] (pieces from the "
                "experts' ranks)"
            )
        if flag >= FLAG_ACT_READY.value:
            return f"act_ready[tile {flag - FLAG_ACT_READY.value}]"
        if flag >= FLAG_EXPERT_READY.value:
            local, src = divmod(flag - FLAG_EXPERT_READY.value, _pow2(self.plan_cfg.world_size))
            return f"expert_ready[local slot {local}, source rank {src}]"
        return f"counts_ready[source rank {flag}]"

    def check_errors(self) -> None:
        """Wait for the device, then raise if any rank's call failed (timeout, overflow)."""
        self.world.check_errors(self.flag_name)

    def close(self) -> None:
        """Free the symmetric buffers (collective, in allocation order)."""
        self.plan_ws.close()
        for t in self._sym:
            self.world.free(t)


def dispatch_gemm(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    w13: torch.Tensor,
    *,
    workspace: Megakernel,
    mode: str = "gemm",
) -> tuple[torch.Tensor, DispatchHandle]:
    """This rank's tokens ``x [T, H]`` routed by ``topk_ids [T, K]`` to the experts, whose
    ``w13 [L, 2I, H]`` this rank holds: returns ``act [C, I]`` (rows in the receive order,
    ``handle.num_recv()`` of them valid) and the handle the combine needs.

    For a world with one rank per process (NVSHMEM under torchrun). No host synchronisation:
    errors surface at ``workspace.check_errors()``.
    """
    ranks = workspace.world.local_ranks
    if len(ranks) != 1:
        raise ValueError(
            f"dispatch_gemm runs one rank; this world runs {len(ranks)} in one process: use "
            "Megakernel.run with inputs keyed by rank"
        )
    (r,) = ranks
    handle = workspace.run({r: x}, {r: topk_ids}, {r: topk_weights}, {r: w13}, mode=mode)[r]
    return handle.act, handle
