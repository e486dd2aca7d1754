"""Traffic models: what each rank sends over NVLink for one routing, with and without token
saving (``traffic_model``), and what a rank's GEMM tasks load into its SMs (``operand_bytes``).

Shape legend: T tokens per rank, K top-k, R ranks, L physical slots per rank, H hidden, I expert
FFN width.

Without token saving a token row crosses NVLink once per (token, k) routed to another rank; with
it, once per distinct other rank among the token's K slots. A rank's own slots cost no NVLink
bytes (their rows are copied locally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from megakernel.config import KernelConfig, tiles_of
from megakernel.shapes import MoEShape


def row_bytes(hidden: int, dtype: torch.dtype, fp8: bool = False) -> int:
    """Bytes of one dispatched token row: ``hidden`` values of ``dtype``, or with ``fp8`` one
    e4m3 byte per value plus an fp32 scale per 128 columns (``megakernel.fp8``)."""
    if fp8:
        return hidden + 4 * (hidden // 128)
    return hidden * dtype.itemsize


@dataclass
class Traffic:
    rows_plain: list[int]  # per source rank: rows sent to other ranks without token saving
    rows_saved: list[int]  # per source rank: rows sent to other ranks with token saving
    tokens: list[int]  # per source rank: tokens with at least one live slot
    distinct_ranks: float  # mean distinct destination ranks per live token (own rank included)
    remote_ranks: float  # mean distinct *other* destination ranks per live token

    def bytes(self, row_bytes: int, token_saving: bool) -> list[int]:
        rows = self.rows_saved if token_saving else self.rows_plain
        return [r * row_bytes for r in rows]

    @property
    def saving(self) -> float:
        """Fraction of NVLink bytes that token saving removes."""
        plain = sum(self.rows_plain)
        return 1.0 - sum(self.rows_saved) / plain if plain else 0.0


def traffic_model(phys_all: list[torch.Tensor], slots_per_rank: int) -> Traffic:
    """From every rank's physical slots ``[T_s, K]`` (-1 dropped)."""
    R = len(phys_all)
    plain, saved, tokens = [], [], []
    distinct_sum = remote_sum = 0
    for src, phys in enumerate(phys_all):
        phys = phys.cpu().long()
        valid = phys >= 0
        dst = torch.where(valid, phys // slots_per_rank, R)  # R: a dropped slot's sink
        hit = torch.zeros(phys.shape[0], R + 1, dtype=torch.bool)
        hit.scatter_(1, dst, True)
        hit = hit[:, :R]  # [T, R]: token t sends to rank d
        live = hit.any(1)
        remote = hit.clone()
        remote[:, src] = False
        plain.append(int((valid & (dst != src)).sum()))
        saved.append(int(remote.sum()))
        tokens.append(int(live.sum()))
        distinct_sum += int(hit.sum())
        remote_sum += int(remote[live].sum())
    n = max(1, sum(tokens))
    return Traffic(plain, saved, tokens, distinct_sum / n, remote_sum / n)


def rows_per_expert(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows each expert receives from ``topk_ids`` (any shape; ids < 0 are dropped slots), on
    the CPU: the ``rows`` of ``operand_bytes`` where slot = expert."""
    ids = topk_ids.flatten().long().cpu()
    return torch.bincount(ids[ids >= 0], minlength=num_experts)


@dataclass(frozen=True)
class OperandBytes:
    weights: int  # the experts' weights a call touches, each byte once: what HBM must deliver
    streamed: int  # what the GEMM tasks load into SMs, from L2 or HBM (see operand_bytes)

    def over(self, seconds: float) -> float:
        """Bytes per second the tasks' loads reach if the call takes ``seconds``."""
        return self.streamed / seconds


def operand_bytes(rows: torch.Tensor, shape: MoEShape, config: KernelConfig) -> OperandBytes:
    """The operand loads of one call's GEMM tasks on one rank, from ``rows [L]``, the rows each
    local slot receives. Each task loads its whole weight block and its tile's live rows of A
    (masked rows load nothing), so an expert of ``n`` rows costs ``ceil(n / block_m)`` weight
    streams, one fewer where its last tile's rows join the tile before (``tail_rows``): GEMM1
    ``ceil(I / BN)`` tasks a tile, each ``[2 BN, H]`` of w13 and ``[rows, H]`` of the received
    rows; the down projection ``ceil(H / down_BN)`` tasks a tile, each ``[down_BN, I]`` of w2
    and ``[rows, I]`` of the activations. Scales (FP8) and outputs are left out: under 2% here.
    """
    cfg = config.for_fp8() if shape.fp8 else config
    H, I = shape.hidden, shape.ffn
    item = 1 if shape.fp8 else shape.dtype.itemsize  # weights and A alike
    rows = rows.long().cpu()
    tiles = int(tiles_of(rows, cfg.block_m, cfg.tail_rows).sum())
    live, n = int((rows > 0).sum()), int(rows.sum())
    gemm1_tasks = triton.cdiv(I, cfg.block_n)
    down_tasks = triton.cdiv(H, cfg.down_block_n)
    gemm1 = gemm1_tasks * (tiles * 2 * cfg.block_n * H + n * H)
    down = down_tasks * (tiles * cfg.down_block_n * I + n * I)
    return OperandBytes(weights=live * 3 * H * I * item, streamed=(gemm1 + down) * item)
