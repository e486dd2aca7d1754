"""The persistent megakernel, part 1: dispatch + the experts' first GEMM (DESIGN §3-6).

Shape legend: T tokens on this rank, H hidden, I expert FFN width, E experts, K top-k, R ranks,
L local slots per rank, P = R * L, C receive rows per rank (capacity), NB = GEMM column blocks.

One launch per rank and call, after that rank's plan (``megakernel.plan``). Its programs pull
tasks from two atomic counters, in id order:

  dispatch tasks  ``[0, max_dispatch)``   the plan's task table (first ``num_dispatch_tasks``);
  tile tasks      ``[max_dispatch, +max_tiles * NB)``  tile ``j // NB``, column block ``j % NB``
                  (``mode="gemm"``); or one resolve task per tile (``mode="dispatch"``).

A dispatch task never waits. The last dispatch task of a send group (found with a per-group
arrival counter) publishes the group on the destination: ``expert_ready[local, rank] = epoch``
(every local slot of that destination when dispatch is unsorted). A tile task waits, bounded, on
the flags of the sources its rows come from (``per_tile_flags``; otherwise every source of its
expert), and with token saving on every earlier local slot too, since a row may take its data
from the token's first slot. Every wait therefore targets a dispatch task, which never waits: no
claim order can deadlock (DESIGN §5). Programs given to dispatch (``dispatch_ctas``) take
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

from megakernel.placement import Placement
from megakernel.plan import STATS, Plan, PlanConfig, PlanWorkspace, _pow2
from megakernel.shapes import MoEShape
from megakernel.tiles import tile_dispatch_put, tile_expert_gemm, tile_resolve_rows
from megakernel.validate import check_routing
from symm_mem.buffer import World
from symm_mem.device import globaltimer, peer_ptr, wait_flags

# error-record flag ids of the tile waits: FLAG_EXPERT_READY + local * RP + source rank
FLAG_EXPERT_READY = tl.constexpr(1 << 20)
# the kernel's counters: [3] int32 per rank
COUNTER_DISPATCH = tl.constexpr(0)
COUNTER_TILE = tl.constexpr(1)
COUNTER_EXIT = tl.constexpr(2)
MODES = ("gemm", "dispatch")  # dispatch + GEMM1 fused, or dispatch + resolve only
STAGES = ("all", "dispatch", "tiles")  # run() parts, for timing each alone


@dataclass(frozen=True)
class KernelConfig:
    """Switches and tile knobs of the dispatch + GEMM1 megakernel.

    GEMM defaults from ``python -m perf.sweep_gemm --ranks 2`` on an H100 (2026-11-24, dsv3 as
    one of 2 ranks: 128 experts x 256 rows): BM 128, BN 128 (gate and up side by side, so 256
    accumulator columns), BK 64, 8 warps, 3 stages gave 441 TFLOP/s; the next best 420, and
    ``torch._grouped_mm`` 383 on the same rows (perf/NOTES.md).
    """

    token_saving: bool = True  # one copy of a token per destination rank
    sorted_dispatch: bool = True  # send expert-major (local slot, dst), else per dst in token order
    per_tile_flags: bool = True  # a tile waits for its own source ranks, else for all of them
    block_m: int = 128  # rows per GEMM tile (the plan's tile height)
    block_n: int = 128  # output columns per GEMM task (of I with SwiGLU)
    block_k: int = 64  # reduction step over H
    block_h: int = 1024  # columns per dispatch copy step
    chunk: int = 8  # units per dispatch task
    num_warps: int = 8
    num_stages: int = 3
    num_ctas: int = 0  # programs per rank; 0: the world's SM share
    dispatch_ctas: int = 0  # programs that take dispatch tasks first; 0: all of them

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                continue
            low = 0 if f.name in ("num_ctas", "dispatch_ctas") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"KernelConfig.{f.name} must be an int >= {low}, got {value!r}")
        for name in ("block_m", "block_n", "block_k", "block_h", "chunk"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")


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
    ready_base,
    recv_x_ptr,
    recv_src_ptr,
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
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
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
    tile_dispatch_put(
        x_ptr,
        send_units_ptr,
        phys_ptr,
        slot_pos_ptr,
        data_pos_ptr,
        recv_x_dst,
        recv_src_dst,
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
    act_ptr,
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
    TOKEN_SAVING: tl.constexpr,
    PER_TILE: tl.constexpr,
    TASK_BASE: tl.constexpr,
):
    """Tile task ``j``: wait for the tile's rows, then GEMM column block ``j % NB`` (or resolve)."""
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
    if arrived:
        parity = epoch % 2
        recv_x = recv_x_ptr + parity * (C * H)
        recv_src = recv_src_ptr + parity * C
        if GEMM:
            tile_expert_gemm(
                recv_x,
                recv_src,
                w13_ptr,
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
            )
        else:
            tile_resolve_rows(recv_x, recv_src, row0, rows, H, CHUNK, BLOCK_H, BLOCK_M)


@triton.jit(do_not_specialize=["rank", "task_begin", "task_end", "timeout_ns"])
def moe_dispatch_gemm_kernel(
    x_ptr,  # [T, H] this rank's tokens
    w13_ptr,  # [L, 2I, H] this rank's experts
    act_ptr,  # [C, I] (or [C, 2I] without SwiGLU) out: expert activations, receive order
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
    ready_base,  # [R] int64: every rank's sym expert_ready [L, R] int64
    recv_x_ptr,  # this rank's recv_x
    recv_src_ptr,  # this rank's recv_src
    ready_ptr,  # this rank's expert_ready
    group_done_ptr,  # [PP] int32: arrivals per send group (0 between calls)
    counters_ptr,  # [3] int32: dispatch, tile and exit counters (0 between launches)
    err_ptr,  # [ERR_WORDS] int64 error record of this rank
    epoch_ptr,  # [1] int64: this call's epoch (the plan bumped it)
    rank,
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
    MAX_DISPATCH: tl.constexpr,
    NB: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DISPATCH_CTAS: tl.constexpr,
    GEMM: tl.constexpr,
    SWIGLU: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    SORTED: tl.constexpr,
    PER_TILE: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
    deadline = globaltimer() + timeout_ns
    # this launch's share of each task region (the CPU emulation runs them as separate phases)
    d_lo = tl.maximum(task_begin, 0)
    d_hi = tl.minimum(task_end, tl.load(stats_ptr + 3))
    t_lo = tl.maximum(task_begin - MAX_DISPATCH, 0)
    t_hi = tl.minimum(task_end - MAX_DISPATCH, tl.load(stats_ptr + 2) * NB)
    if tl.load(err_ptr) != 0:  # the plan failed (overflow) or a wait timed out: run nothing
        d_hi = d_lo
        t_hi = t_lo
    if tl.program_id(0) < DISPATCH_CTAS:
        d = d_lo + tl.atomic_add(counters_ptr + COUNTER_DISPATCH, 1, sem="relaxed")
        while d < d_hi:
            _dispatch_task(
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
                ready_base,
                recv_x_ptr,
                recv_src_ptr,
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
                CHUNK,
                BLOCK_H,
                TOKEN_SAVING,
                SORTED,
            )
            d = d_lo + tl.atomic_add(counters_ptr + COUNTER_DISPATCH, 1, sem="relaxed")
    j = t_lo + tl.atomic_add(counters_ptr + COUNTER_TILE, 1, sem="relaxed")
    while j < t_hi:
        _tile_task(
            j,
            tiles_ptr,
            ready_ptr,
            recv_x_ptr,
            recv_src_ptr,
            w13_ptr,
            act_ptr,
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
            TOKEN_SAVING,
            PER_TILE,
            MAX_DISPATCH,
        )
        j = t_lo + tl.atomic_add(counters_ptr + COUNTER_TILE, 1, sem="relaxed")
    # the last program out resets the counters for the next launch (stream-ordered after it)
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + COUNTER_EXIT, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        tl.store(counters_ptr + COUNTER_DISPATCH, 0)
        tl.store(counters_ptr + COUNTER_TILE, 0)
        tl.store(counters_ptr + COUNTER_EXIT, 0)


# ----------------------------------------------------------------------------- host side


def kernel_meta(
    shape: MoEShape,
    plan_cfg: PlanConfig,
    config: KernelConfig,
    capacity: int,
    swiglu: bool,
    num_ctas: int,
    mode: str,
) -> dict[str, int | bool]:
    """Compile-time constants and launch options of ``moe_dispatch_gemm_kernel``."""
    cfg, pc = config, plan_cfg
    gemm = mode == "gemm"
    width = shape.ffn if swiglu else 2 * shape.ffn
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
        MAX_DISPATCH=pc.max_dispatch_tasks,
        NB=triton.cdiv(width, cfg.block_n) if gemm else 1,
        CHUNK=cfg.chunk,
        BLOCK_H=min(cfg.block_h, _pow2(shape.hidden)),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DISPATCH_CTAS=min(cfg.dispatch_ctas or num_ctas, num_ctas),
        GEMM=gemm,
        SWIGLU=swiglu,
        TOKEN_SAVING=cfg.token_saving,
        SORTED=cfg.sorted_dispatch,
        PER_TILE=cfg.per_tile_flags,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


@dataclass
class DispatchHandle:
    """One rank's result of ``dispatch_gemm``: what the combine needs, as device views.

    ``act [C, I]`` (``[C, 2I]`` without SwiGLU) holds the expert activations of rows
    ``[0, num_recv)`` in the receive order (DESIGN §4); rows past that are stale. Valid until the
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


class DispatchGemm:
    """Workspace of the dispatch + GEMM1 megakernel for every rank this process runs.

    Owns the plan workspace and the symmetric buffers (``sizes()`` lists them):
      ``recv_x [2, C, H]``  receive rows, double-buffered by epoch parity;
      ``recv_src [2, C]``   int32, the row holding each row's data;
      ``expert_ready [L, R]`` int64 flags: (local slot, source rank) -> epoch;
    and per rank ``act [C, I]``, ``group_done [PP]`` and the task counters.
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
    ) -> None:
        R = world.world_size
        self.world, self.shape = world, shape
        self.placement = placement or Placement.contiguous(shape.num_experts, R)
        self.config = cfg = config or KernelConfig()
        self.swiglu = swiglu
        L, H, I = self.placement.slots_per_rank, shape.hidden, shape.ffn  # noqa: E741
        if H % cfg.block_k:
            raise ValueError(f"hidden size {H} is not a multiple of block_k {cfg.block_k}")
        C = capacity or default_capacity(shape, R, L)
        self.plan_cfg = PlanConfig(
            R,
            L,
            shape.topk,
            max_tokens=shape.max_tokens_per_rank,
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
        dev, PP = world.device, _pow2(R * L)
        width = I if swiglu else 2 * I
        self.act = {
            r: torch.zeros(C, width, dtype=shape.dtype, device=dev) for r in world.local_ranks
        }
        self.group_done = {
            r: torch.zeros(PP, dtype=torch.int32, device=dev) for r in world.local_ranks
        }
        self.counters = {
            r: torch.zeros(3, dtype=torch.int32, device=dev) for r in world.local_ranks
        }
        self.epoch = {r: 0 for r in world.local_ranks}  # host mirror of the plan's device epoch
        self.num_ctas = cfg.num_ctas or world.sms_per_rank
        self._warm: set[str] = set()

    # -- sizes ----------------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        """Bytes per rank of each buffer this workspace owns."""
        sym = {
            "recv_x (sym)": self.sym_recv_x.nbytes,
            "recv_src (sym)": self.sym_recv_src.nbytes,
            "expert_ready (sym)": self.sym_ready.nbytes,
        }
        r = self.world.local_ranks[0]
        local = {"act": self.act[r].numel() * self.act[r].element_size()}
        plan = sum(b.numel() * b.element_size() for b in self.plan_ws.bufs[r].values())
        plan += self.plan_ws.sym_counts.nbytes + self.plan_ws.sym_ready.nbytes
        return {**sym, **local, "plan": plan}

    def describe(self) -> str:
        rows = [f"  {name:<20} {size / 2**20:10.2f} MiB" for name, size in self.sizes().items()]
        total = sum(self.sizes().values()) / 2**20
        return "\n".join(
            [f"DispatchGemm workspace per rank (capacity {self.capacity} rows):", *rows]
            + [f"  {'total':<20} {total:10.2f} MiB"]
        )

    # -- launching ------------------------------------------------------------------------

    def _meta(self, mode: str) -> dict[str, int | bool]:
        return kernel_meta(
            self.shape, self.plan_cfg, self.config, self.capacity, self.swiglu, self.num_ctas, mode
        )

    def num_tasks(self, mode: str) -> tuple[int, int]:
        """(dispatch task ids, tile task ids) of one call."""
        return self.plan_cfg.max_dispatch_tasks, self.plan_cfg.max_tiles * self._meta(mode)["NB"]

    def _args(self, rank: int, x: torch.Tensor, w13: torch.Tensor, begin: int, end: int) -> tuple:
        b = self.plan_ws.bufs[rank]
        return (
            x,
            w13,
            self.act[rank],
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
            self.sym_ready.peer_base,
            self.sym_recv_x.peer(rank),
            self.sym_recv_src.peer(rank),
            self.sym_ready.peer(rank),
            self.group_done[rank],
            self.counters[rank],
            self.world.error_record(rank),
            self.plan_ws.epoch[rank],
            rank,
            begin,
            end,
            self.world.timeout_ns(),
        )

    def warmup(self, mode: str = "gemm") -> None:
        """Compile and load the plan kernels and the megakernel before anything spins."""
        if mode in self._warm or self.world.device.type != "cuda":
            return
        self.plan_ws.warmup()
        r = self.world.local_ranks[0]
        dev, shape, L = self.world.device, self.shape, self.plan_cfg.slots_per_rank
        x = torch.zeros(1, shape.hidden, dtype=shape.dtype, device=dev)
        w13 = torch.zeros(L, 2 * shape.ffn, shape.hidden, dtype=shape.dtype, device=dev)
        kernel = moe_dispatch_gemm_kernel.warmup(
            *self._args(r, x, w13, 0, 0), **self._meta(mode), grid=(1,)
        )
        kernel._init_handles()
        self._warm.add(mode)

    def _prepare(self, rank: int, x, topk_ids, topk_weights, w13, validate: bool):
        shape, L, dev = self.shape, self.plan_cfg.slots_per_rank, self.world.device
        if validate:
            check_routing(
                topk_ids,
                topk_weights,
                num_experts=self.placement.num_experts,
                topk=shape.topk,
                max_tokens=shape.max_tokens_per_rank,
                device=dev,
            )
            want = {"x": (topk_ids.shape[0], shape.hidden), "w13": (L, 2 * shape.ffn, shape.hidden)}
            for name, t in (("x", x), ("w13", w13)):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
                if tuple(t.shape) != want[name]:
                    raise ValueError(
                        f"rank {rank}: {name} has shape {tuple(t.shape)}, expected {want[name]}"
                    )
                if t.dtype != shape.dtype:
                    raise ValueError(f"{name} is {t.dtype} but the layer is {shape.dtype}")
                if t.device != dev:
                    raise ValueError(f"{name} is on {t.device}, the layer on {dev}")
        # NOTE: a misaligned view would compile a new kernel variant at launch, while peers spin
        x, w13 = (
            t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone() for t in (x, w13)
        )
        return x, self.plan_ws._prepare(topk_ids, validate=False), topk_weights, w13

    def run(
        self,
        x: dict[int, torch.Tensor],
        topk_ids: dict[int, torch.Tensor],
        topk_weights: dict[int, torch.Tensor] | None,
        w13: dict[int, torch.Tensor],
        *,
        mode: str = "gemm",
        overlap: bool | None = None,
        validate: bool = True,
        stage: str = "all",
    ) -> dict[int, DispatchHandle]:
        """One call on every local rank (inputs keyed by rank). ``mode``: "gemm" (dispatch +
        GEMM1, fused) or "dispatch" (dispatch, then resolve every indirect row).

        ``stage`` (for timing the parts alone): "all"; "dispatch" (plan and dispatch tasks only);
        "tiles" (no plan, no dispatch: rerun the last call's tile tasks on its received rows).

        ``overlap`` (default: when the world runs ranks concurrently) runs each rank's whole task
        range in one launch; otherwise every rank's dispatch tasks run first, then every rank's
        tile tasks (the CPU interpreter must; on one GPU it isolates a hang from a race).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "tiles" and min(self.epoch.values()) == 0:
            raise ValueError('stage="tiles" reruns the last call\'s tiles: make a full call first')
        ranks = self.world.local_ranks
        weights = topk_weights or {r: None for r in ranks}
        ready = {
            r: self._prepare(r, x[r], topk_ids[r], weights[r], w13[r], validate) for r in ranks
        }
        self.warmup(mode)
        if stage != "tiles":
            for phase in self.plan_ws.phases():
                self.world.run_ranks(
                    lambda r, p=phase: self.plan_ws.launch(r, ready[r][1], p, validate=False)
                )
        n_dispatch, n_tiles = self.num_tasks(mode)
        overlap = self.world.concurrent if overlap is None else overlap
        ranges = {
            "dispatch": [(0, n_dispatch)],
            "tiles": [(n_dispatch, n_dispatch + n_tiles)],
            "all": [(0, n_dispatch + n_tiles)]
            if overlap
            else [(0, n_dispatch), (n_dispatch, n_dispatch + n_tiles)],
        }[stage]
        meta = self._meta(mode)
        for begin, end in ranges:

            def launch(r: int, begin: int = begin, end: int = end) -> None:
                xr, _, _, wr = ready[r]
                moe_dispatch_gemm_kernel[(self.num_ctas,)](
                    *self._args(r, xr, wr, begin, end), **meta
                )

            self.world.run_ranks(launch)
        handles = {}
        for r in ranks:
            self.epoch[r] += stage != "tiles"
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
            )
        return handles

    def flag_name(self, flag: int) -> str:
        """Names the flag of a ``WaitTimeoutError`` raised by ``world.check_errors``."""
        base = FLAG_EXPERT_READY.value
        if flag >= base:
            local, src = divmod(flag - base, _pow2(self.plan_cfg.world_size))
            return f"expert_ready[local slot {local}, source rank {src}]"
        return f"counts_ready[source rank {flag}]"

    def check_errors(self) -> None:
        """Wait for the device, then raise if any rank's call failed (timeout, overflow)."""
        self.world.check_errors(self.flag_name)

    def close(self) -> None:
        """Free the symmetric buffers (collective, in allocation order)."""
        self.plan_ws.close()
        for t in (self.sym_recv_x, self.sym_recv_src, self.sym_ready):
            self.world.free(t)


def dispatch_gemm(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    w13: torch.Tensor,
    *,
    workspace: DispatchGemm,
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
            "DispatchGemm.run with inputs keyed by rank"
        )
    (r,) = ranks
    handle = workspace.run({r: x}, {r: topk_ids}, {r: topk_weights}, {r: w13}, mode=mode)[r]
    return handle.act, handle
