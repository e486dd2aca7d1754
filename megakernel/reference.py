"""Pure-torch oracles (fp32 accumulate) for every public op.

Shape legend: T tokens per rank, H hidden, I expert FFN width, E experts, L physical slots per
rank, K top-k, R ranks, S receive slots on a rank. Weights: ``w13 [E, 2I, H]`` (gate rows, then
up rows), ``w2 [E, H, I]``; an expert computes ``w2 @ (silu(w13_gate @ x) * (w13_up @ x))``, or
with ``activation`` and biases (``MoEShape.activation``, ``MoEShape.bias``: ``b13 [E, 2I]``,
``b2 [E, H]``) ``w2 @ glu(w13_gate @ x + b_gate, w13_up @ x + b_up) + b2``.

Receive layout (DESIGN §4): rank d's buffer holds one row per (source rank, token, k) routed to
one of its slots, ordered by local slot, then source rank, then token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
import triton

from megakernel.config import tiles_of
from megakernel.placement import Placement, resolve_ref
from megakernel.plan.config import DISPATCH_TASK_COLS, TILE_COLS, Plan, PlanConfig
from megakernel.shapes import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT


def glu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The gated activation (``MoEShape.activation``) of fp32 ``gate`` and ``up``: ``silu(gate) *
    up``, or gpt-oss's ``swigluoai``, ``g * sigmoid(1.702 g) * (u + 1)`` with ``g = min(gate,
    7)``, ``u = clamp(up, -7, 7)``."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "swigluoai":
        g = gate.clamp(max=SWIGLUOAI_LIMIT)
        u = up.clamp(-SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
        return g * torch.sigmoid(SWIGLUOAI_ALPHA * g) * (u + 1)
    raise ValueError(f"unknown activation {activation!r}")


def expert_ffn_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str = "silu",
    between: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One expert's gated FFN in fp32: ``x [N, H]``, ``w13 [2I, H]``, ``w2 [H, I]`` (biases
    ``b13 [2I]``, ``b2 [H]`` where given) -> [N, H]. ``between``: applied to the activations
    before the down projection (the FP8 path's requantisation)."""
    act = expert_gemm1_ref(x, w13, b13, activation)
    return expert_down_ref(act if between is None else between(act), w2, b2)


def expert_gemm1_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    b13: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
) -> torch.Tensor:
    """One expert's GEMM1 in fp32: ``x [N, H]``, ``w13 [2I, H]`` (``b13 [2I]``) -> ``glu(gate,
    up)`` ``[N, I]`` (``glu_ref``), or, not ``gated``, the biased product ``[N, 2I]``."""
    ffn = w13.shape[0] // 2
    h = x.float() @ w13.float().t()
    if b13 is not None:
        h = h + b13.float()
    return glu_ref(h[:, :ffn], h[:, ffn:], activation) if gated else h


def expert_down_ref(
    act: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None = None
) -> torch.Tensor:
    """One expert's down projection in fp32: ``act [N, I]``, ``w2 [H, I]`` (``b2 [H]``) ->
    ``[N, H]``."""
    out = act.float() @ w2.float().t()
    return out if b2 is None else out + b2.float()


def moe_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """``x [T, H]`` -> ``[T, H]`` (x.dtype): sum over k of ``w_k * FFN_{e_k}(x)``, fp32
    accumulate; dropped slots (id -1) contribute nothing. ``w13 [E, 2I, H]``, ``w2 [E, H, I]``;
    the experts' biases ``b13 [E, 2I]`` and ``b2 [E, H]`` where they have them; ``activation``:
    ``MoEShape.activation``."""

    def expert(e: int) -> tuple[torch.Tensor | None, ...]:
        return w13[e], w2[e], None if b13 is None else b13[e], None if b2 is None else b2[e]

    ffn = partial(expert_ffn_ref, activation=activation)
    return moe_ref_by_expert(x, topk_ids, topk_weights, expert, ffn).to(x.dtype)


def moe_ref_by_expert(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor | None, ...]],
    ffn: Callable[..., torch.Tensor] = expert_ffn_ref,
) -> torch.Tensor:
    """``moe_ref`` in fp32, asking ``expert_weights(e) -> (w13 [2I, H], w2 [H, I])`` (then
    ``b13 [2I]``, ``b2 [H]`` where the experts have biases) for one expert at a time, only for
    the experts the tokens picked: a rank can check its output without holding every expert
    (dsv3: 22 GB of weights). ``ffn(x, *expert_weights(e))``: one expert's FFN."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    ids = topk_ids.to(x.device).long()
    weights = topk_weights.to(x.device).float()
    for e in ids[ids >= 0].unique().tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        out.index_add_(0, t, weights[t, k].unsqueeze(1) * ffn(x[t], *expert_weights(e)))
    return out


@dataclass
class RecvLayout:
    """Rank d's receive buffer: which (source rank, token, k) each of its S rows holds."""

    src_rank: torch.Tensor  # [S] int64
    token: torch.Tensor  # [S] int64
    k: torch.Tensor  # [S] int64
    local_slot: torch.Tensor  # [S] int64
    expert_start: torch.Tensor  # [L] first row of each local slot
    expert_rows: torch.Tensor  # [L] rows of each local slot

    @property
    def num_rows(self) -> int:
        return int(self.src_rank.numel())


def recv_layout_ref(phys_ids: list[torch.Tensor], placement: Placement, dst: int) -> RecvLayout:
    """The receive order of rank ``dst`` from every rank's physical ids ``[T_s, K]``."""
    L = placement.slots_per_rank
    src, tok, kk, loc, rows = [], [], [], [], []
    for local in range(L):
        slot = dst * L + local
        n = 0
        for s, ids in enumerate(phys_ids):
            t, k = (ids.cpu() == slot).nonzero(as_tuple=True)  # row-major: token order
            src.append(torch.full_like(t, s))
            tok.append(t)
            kk.append(k)
            loc.append(torch.full_like(t, local))
            n += t.numel()
        rows.append(n)
    expert_rows = torch.tensor(rows, dtype=torch.int64)
    cat = torch.cat
    return RecvLayout(
        src_rank=cat(src),
        token=cat(tok),
        k=cat(kk),
        local_slot=cat(loc),
        expert_start=torch.cumsum(expert_rows, 0) - expert_rows,
        expert_rows=expert_rows,
    )


def dispatch_ref(
    xs: list[torch.Tensor], phys_ids: list[torch.Tensor], placement: Placement
) -> list[tuple[torch.Tensor, RecvLayout]]:
    """Every rank's receive buffer ``[S_d, H]`` (rows copied bit for bit) and its layout."""
    out = []
    for dst in range(placement.world_size):
        layout = recv_layout_ref(phys_ids, placement, dst)
        H = xs[0].shape[1]
        recv = torch.empty(layout.num_rows, H, dtype=xs[0].dtype, device=xs[0].device)
        for s, x in enumerate(xs):
            rows = (layout.src_rank == s).nonzero().squeeze(1)
            recv[rows.to(x.device)] = x[layout.token[rows].to(x.device)]
        out.append((recv, layout))
    return out


def combine_ref(
    expert_out: list[torch.Tensor],
    layouts: list[RecvLayout],
    topk_weights: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Each source rank's ``[T_s, H]`` (fp32): sum over k, in k order, of ``w[t, k]`` times the
    expert output row that rank d computed for (s, t, k)."""
    R = len(topk_weights)
    H = expert_out[0].shape[1]
    per_slot = [
        torch.zeros(w.shape[0], w.shape[1], H, dtype=torch.float32, device=w.device)
        for w in topk_weights
    ]  # R x [T_s, K, H]
    for y, layout in zip(expert_out, layouts, strict=True):
        for s in range(R):
            rows = (layout.src_rank == s).nonzero().squeeze(1)
            dev = per_slot[s].device
            per_slot[s][layout.token[rows].to(dev), layout.k[rows].to(dev)] = y[
                rows.to(y.device)
            ].float()
    outs = []
    for s in range(R):
        acc = torch.zeros(per_slot[s].shape[0], H, dtype=torch.float32, device=per_slot[s].device)
        for k in range(per_slot[s].shape[1]):
            acc += topk_weights[s][:, k].float().unsqueeze(1) * per_slot[s][:, k]
        outs.append(acc)
    return outs


def expert_act_ref(
    recv: torch.Tensor,
    layout: RecvLayout,
    w13_local: torch.Tensor,
    swiglu: bool = True,
    b13_local: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """The experts' first GEMM on one rank's receive buffer, fp32: ``recv [S, H]`` in the order of
    ``layout``, ``w13_local [L, 2I, H]`` (and ``b13_local [L, 2I]``) -> ``glu(x @ w_gate^T,
    x @ w_up^T)`` ``[S, I]`` (``glu_ref``), or ``x @ w13^T`` ``[S, 2I]`` without SwiGLU (biases
    added first where given)."""
    ffn = w13_local.shape[1] // 2
    out = torch.zeros(recv.shape[0], ffn if swiglu else 2 * ffn, device=recv.device)
    for local in range(w13_local.shape[0]):
        start, rows = int(layout.expert_start[local]), int(layout.expert_rows[local])
        b13 = None if b13_local is None else b13_local[local]
        x = recv[start : start + rows]
        out[start : start + rows] = expert_gemm1_ref(x, w13_local[local], b13, activation, swiglu)
    return out


# ----------------------------------------------------------------------------- the plan


def resolve_all_ref(topk_ids: list[torch.Tensor], placement: Placement) -> list[torch.Tensor]:
    """Every rank's physical slots (reference of the resolve step in ``plan_count_kernel``)."""
    return [resolve_ref(ids, r, placement) for r, ids in enumerate(topk_ids)]


def group_of_slot(cfg: PlanConfig) -> torch.Tensor:
    """[P] send group of each physical slot: ``local * R + dst`` (sorted dispatch), else ``dst``."""
    p = torch.arange(cfg.num_slots)
    R, L = cfg.world_size, cfg.slots_per_rank
    return (p % L) * R + p // L if cfg.sorted_dispatch else p // L


def first_mask(phys: torch.Tensor, L: int) -> torch.Tensor:
    """[T, K] True where (t, k) is the token's first (lowest) slot at that destination."""
    valid = phys >= 0
    dst = torch.where(valid, phys // L, -1)
    same = (dst.unsqueeze(2) == dst.unsqueeze(1)) & valid.unsqueeze(1)  # [T, K, K']
    earlier = same & (phys.unsqueeze(1) < phys.unsqueeze(2))
    return valid & ~earlier.any(dim=2)


def _sender_rows(phys: torch.Tensor, all_counts: torch.Tensor, cfg: PlanConfig, rank: int):
    """(slot_pos, data_pos, first_at) of one sender: each (t, k)'s row at its destination, the
    row carrying its data there, and each (token, destination)'s first row (-1: none)."""
    R, L, P = cfg.world_size, cfg.slots_per_rank, cfg.num_slots
    T, K = phys.shape
    rows_p = all_counts.sum(0)
    dst_start = (torch.cumsum(rows_p.view(R, L), 1) - rows_p.view(R, L)).view(P)
    slot_base = dst_start + all_counts[:rank].sum(0)
    slot_pos = torch.full((T, K), -1, dtype=torch.int64)
    for p in range(P):
        t, k = (phys == p).nonzero(as_tuple=True)
        slot_pos[t, k] = slot_base[p] + torch.arange(t.numel())
    first = first_mask(phys, L)
    valid = phys >= 0
    dst = torch.where(valid, phys // L, -1)
    first_at = torch.full((T, R), -1, dtype=torch.int64)
    for d in range(R):
        t, k = (first & (dst == d)).nonzero(as_tuple=True)
        first_at[t, d] = slot_pos[t, k]
    if cfg.token_saving:
        data_pos = torch.where(valid, first_at.gather(1, dst.clamp(min=0)), -1)
    else:
        data_pos = slot_pos.clone()
    return slot_pos, data_pos, first_at


def _send_order(phys: torch.Tensor, cfg: PlanConfig):
    """(send_units [U_max], dispatch_tasks [max_dispatch, 4], tasks made) of one sender: units in
    (send group, token) order, then a task per ``chunk`` of a group's units (one for an empty
    group), each with its group's task count (a call of one round)."""
    T, K = phys.shape
    units = first_mask(phys, cfg.slots_per_rank) if cfg.token_saving else phys >= 0
    t_idx, k_idx = units.nonzero(as_tuple=True)
    unit_g = group_of_slot(cfg)[phys[t_idx, k_idx]]
    order = torch.argsort(unit_g * (T + 1) + t_idx, stable=True)
    send_units = torch.full((cfg.max_units,), -1, dtype=torch.int64)
    send_units[: order.numel()] = (t_idx * K + k_idx)[order]
    units_g = torch.bincount(unit_g, minlength=cfg.num_groups)
    unit_base_g = torch.cumsum(units_g, 0) - units_g
    tasks = torch.zeros(cfg.max_dispatch_tasks, DISPATCH_TASK_COLS, dtype=torch.int64)
    j = 0
    for g in range(cfg.num_groups):
        n = max(1, triton.cdiv(int(units_g[g]), cfg.chunk))  # empty groups: 1
        for m in range(n):
            start = int(unit_base_g[g]) + m * cfg.chunk
            count = min(cfg.chunk, int(units_g[g]) - m * cfg.chunk)
            tasks[j] = torch.tensor([g, start, count, n])
            j += 1
    return send_units, tasks, j


def _tile_table(recv_offset: torch.Tensor, cnt: torch.Tensor, cfg: PlanConfig):
    """(tiles [max_tiles, TILE_COLS], tiles made): ``block_m`` rows of a local slot per tile (the
    slot's last one fewer, or, holding a tail of at most ``tail_rows`` rows, more), with the
    first and last source rank its rows come from, its index among its slot's tiles and their
    number."""
    tiles = torch.zeros(cfg.max_tiles, TILE_COLS, dtype=torch.int64)
    tiles[:, 0] = -1
    expert_rows, expert_start = cnt.sum(1), recv_offset[:, 0]
    i = 0
    for local in range(cfg.slots_per_rank):
        ends = recv_offset[local] + cnt[local]
        seg = int(expert_rows[local])
        n_tiles = int(tiles_of(expert_rows[local], cfg.block_m, cfg.tail_rows))
        for m in range(n_tiles):
            row0 = int(expert_start[local]) + m * cfg.block_m
            rows = seg - m * cfg.block_m if m == n_tiles - 1 else cfg.block_m
            src_lo = int((ends <= row0).sum())
            src_hi = int((ends <= row0 + rows - 1).sum())
            tiles[i] = torch.tensor([local, row0, rows, src_lo, src_hi, m, n_tiles])
            i += 1
    return tiles, i


def plan_ref(phys_all: list[torch.Tensor], cfg: PlanConfig, rank: int) -> Plan:
    """Rank ``rank``'s plan from every rank's physical slots ``[T_s, K]`` (torch, on cpu)."""
    R, L, P = cfg.world_size, cfg.slots_per_rank, cfg.num_slots
    phys_all = [p.cpu().long() for p in phys_all]
    phys = phys_all[rank]
    all_counts = torch.stack([torch.bincount(p[p >= 0], minlength=P) for p in phys_all])  # [R, P]
    slot_pos, data_pos, first_at = _sender_rows(phys, all_counts, cfg, rank)
    send_units, tasks, num_tasks = _send_order(phys, cfg)
    # this rank as receiver
    cnt = all_counts[:, rank * L : (rank + 1) * L].t()  # [L, R]
    recv_offset = (torch.cumsum(cnt.reshape(-1), 0) - cnt.reshape(-1)).view(L, R)
    tiles, num_tiles = _tile_table(recv_offset, cnt, cfg)
    num_units = int((send_units >= 0).sum())
    num_recv = int(all_counts.sum(0).view(R, L).sum(1)[rank])
    stats = torch.tensor([num_units, num_recv, num_tiles, num_tasks, 1])  # (one round)
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
        expert_start=recv_offset[:, 0].to(i32),
        expert_rows=cnt.sum(1).to(i32),
        tiles=tiles.to(i32),
        dispatch_tasks=tasks.to(i32),
        stats=stats.to(i32),
    )


def plan_mismatches(got: Plan, want: Plan) -> list[str]:
    """Names of the plan fields that differ (bit for bit) between two plans."""
    names = [f.name for f in fields(Plan)]
    return [n for n in names if not torch.equal(getattr(got, n).cpu(), getattr(want, n).cpu())]
