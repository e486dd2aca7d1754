"""Pure-torch oracles (fp32 accumulate) for every public op.

Shape legend: T tokens per rank, H hidden, I expert FFN width, E experts, L physical slots per
rank, K top-k, R ranks, S receive slots on a rank. Weights: ``w13 [E, 2I, H]`` (gate rows, then
up rows), ``w2 [E, H, I]``; an expert computes ``w2 @ (silu(w13_gate @ x) * (w13_up @ x))``.

Receive layout (DESIGN §4): rank d's buffer holds one row per (source rank, token, k) routed to
one of its slots, ordered by local slot, then source rank, then token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megakernel.placement import Placement


def expert_ffn_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU FFN in fp32: ``x [N, H]``, ``w13 [2I, H]``, ``w2 [H, I]`` -> [N, H]."""
    ffn = w13.shape[0] // 2
    h = x.float() @ w13.float().t()
    return (F.silu(h[:, :ffn]) * h[:, ffn:]) @ w2.float().t()


def moe_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """``x [T, H]`` -> ``[T, H]`` (x.dtype): sum over k of ``w_k * FFN_{e_k}(x)``, fp32
    accumulate; dropped slots (id -1) contribute nothing. ``w13 [E, 2I, H]``, ``w2 [E, H, I]``."""
    return moe_ref_by_expert(x, topk_ids, topk_weights, lambda e: (w13[e], w2[e])).to(x.dtype)


def moe_ref_by_expert(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``moe_ref`` in fp32, asking ``expert_weights(e) -> (w13 [2I, H], w2 [H, I])`` for one
    expert at a time, only for the experts the tokens picked: a rank can check its output without
    holding every expert (dsv3: 22 GB of weights)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    ids = topk_ids.to(x.device).long()
    weights = topk_weights.to(x.device).float()
    for e in ids[ids >= 0].unique().tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        w13_e, w2_e = expert_weights(e)
        out.index_add_(0, t, weights[t, k].unsqueeze(1) * expert_ffn_ref(x[t], w13_e, w2_e))
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
    recv: torch.Tensor, layout: RecvLayout, w13_local: torch.Tensor, swiglu: bool = True
) -> torch.Tensor:
    """The experts' first GEMM on one rank's receive buffer, fp32: ``recv [S, H]`` in the order of
    ``layout``, ``w13_local [L, 2I, H]`` -> ``silu(x @ w_gate^T) * (x @ w_up^T)`` ``[S, I]``, or
    ``x @ w13^T`` ``[S, 2I]`` without SwiGLU."""
    ffn = w13_local.shape[1] // 2
    out = torch.zeros(recv.shape[0], ffn if swiglu else 2 * ffn, device=recv.device)
    for local in range(w13_local.shape[0]):
        start, rows = int(layout.expert_start[local]), int(layout.expert_rows[local])
        h = recv[start : start + rows].float() @ w13_local[local].float().t()
        out[start : start + rows] = F.silu(h[:, :ffn]) * h[:, ffn:] if swiglu else h
    return out
