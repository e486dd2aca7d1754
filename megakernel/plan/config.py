"""The plan's static sizes (``PlanConfig``), its compile-time constants (``PlanMeta``) and one
call's result (``Plan``).

Shape legend: T tokens on this rank (at most T_max), K top-k, R ranks, L physical slots per rank,
P = R * L physical slots, U send units, G send groups (P with sorted dispatch, else R).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import triton

from megakernel.config import pow2
from megakernel.ops.dispatch import DISPATCH_TASK_COLS
from megakernel.ops.gemm import TILE_COLS

# per round of a call (a row of the plan's stats): units sent, rows received, GEMM tiles and
# dispatch tasks of the round, and the call's rounds (the same in every row)
STATS = ("num_units", "num_recv", "num_tiles", "num_dispatch_tasks", "num_rounds")
MAX_ROUNDS = 16  # the most rounds a layer may need for its worst routing (PlanConfig.rounds)
STATS_STRIDE = 8  # a round's row of the stats buffer (16-byte aligned)
CHUNK_ELEMS = 64  # (token, k) pairs per chunk, the plan's unit of work: a [64, 64] compare
SCAN_COLS = 8  # histogram columns per scan program
SCAN_ROWS = 512  # chunks per step of a scan program
TABLE_BLOCK = 128  # tile/task table rows per table item
PAD_BLOCK = 1024  # send_units entries padded per item
PAIR_SAMPLE = 4  # routing statistics: pairs of the tokens of every 4th chunk
PROGRAMS_PER_SM = 4  # plan programs per SM of a rank's share (see PlanWorkspace.max_programs)


class PlanMeta(NamedTuple):
    """The compile-time constants of the plan kernels (one ``M`` for all three): the legend of
    their names. ``*_P`` is the value rounded up to a power of two (a block shape)."""

    K: int  # top-k
    E: int  # experts (logical): an id outside [-1, E) is an error, dropped
    R: int  # ranks
    L: int  # slots per rank
    K_P: int
    R_P: int
    L_P: int
    P_P: int  # physical slots (R * L)
    CT: int  # tokens per chunk (CHUNK_ELEMS // K_P)
    TOKEN_SAVING: bool
    SORTED: bool  # sorted dispatch: send groups (local slot, destination)
    MAX_REPLICAS: int  # columns of the placement's replica table
    BLOCK_M: int  # rows per GEMM tile
    TAIL_ROWS: int  # an expert's last rows, up to this many, join its tile before (0: never)
    CHUNK: int  # units per dispatch task
    TABLE_ROWS: int  # tile / dispatch-table rows per layout item (TABLE_BLOCK)
    PAD_ROWS: int  # send_units entries padded per layout item (PAD_BLOCK)
    SCAN_COLS: int  # histogram columns per scan program
    SCAN_ROWS: int  # chunks per step of a scan program
    PAIR_SAMPLE: int  # routing statistics: co-selected pairs of every PAIR_SAMPLE-th chunk


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
    # the most rounds a call may take: a call whose busiest rank would receive more than
    # ``capacity`` rows runs as ceil(rows / capacity) rounds (mode "layer"; DESIGN §4)
    rounds: int = 1
    # an expert's last tile of at most this many rows joins the tile before it (a tile of up
    # to block_m + tail_rows rows); 0: never (KernelConfig.tail_rows)
    tail_rows: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                continue
            low, what = (0, "an int >= 0") if f.name == "tail_rows" else (1, "a positive int")
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"PlanConfig.{f.name} must be {what}, got {value!r}")

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    @property
    def num_groups(self) -> int:
        """G: send groups, each with its own dispatch tasks and completion flag(s)."""
        return self.num_slots if self.sorted_dispatch else self.world_size

    @property
    def tokens_per_chunk(self) -> int:
        return max(1, CHUNK_ELEMS // pow2(self.topk))

    @property
    def max_chunks(self) -> int:
        return triton.cdiv(self.max_tokens, self.tokens_per_chunk)

    @property
    def max_units(self) -> int:
        # a call of several rounds sends every row (no token saving: a token's slots at one
        # destination may fall in different rounds)
        saving = self.token_saving and self.rounds == 1
        per_token = min(self.topk, self.world_size) if saving else self.topk
        return self.max_tokens * per_token

    @property
    def max_dispatch_tasks(self) -> int:
        """Dispatch tasks of one round: full chunks, plus at most one partial (or, for an empty
        group, one empty) per group."""
        return self.max_units // self.chunk + self.num_groups

    @property
    def max_tiles(self) -> int:
        """GEMM tiles of one round: full tiles, plus at most one partial tile per local slot
        (a tail that joins the tile before it only lowers the count);
        rounded up to a multiple of 4, so that each round's tables and flags start 16-byte
        aligned (the kernels are compiled for aligned pointers)."""
        return -(-(self.capacity // self.block_m + self.slots_per_rank) // 4) * 4

    @property
    def worst_rows(self) -> int:
        """Rows the worst routing sends one rank: every rank's T_max tokens, each to min(K, L)
        slots of that rank."""
        return self.world_size * self.max_tokens * min(self.topk, self.slots_per_rank)

    def rounds_needed(self) -> int:
        """Rounds of the worst routing at this capacity."""
        return triton.cdiv(self.worst_rows, self.capacity)

    def sizes(self) -> dict[str, int]:
        """The sizes every kernel of the layer is compiled for (``PlanMeta``'s and
        ``KernelMeta``'s first fields): K, R, L and their powers of two, and P's."""
        return dict(
            K=self.topk,
            R=self.world_size,
            L=self.slots_per_rank,
            K_P=pow2(self.topk),
            R_P=pow2(self.world_size),
            L_P=pow2(self.slots_per_rank),
            P_P=pow2(self.num_slots),
        )

    def meta(self, num_experts: int, max_replicas: int = 1) -> PlanMeta:
        """The plan kernels' constants (``max_replicas``: the placement's most replicas of one
        expert)."""
        p_p = pow2(self.num_slots)
        return PlanMeta(
            **self.sizes(),
            E=num_experts,
            CT=self.tokens_per_chunk,
            TOKEN_SAVING=self.token_saving,
            SORTED=self.sorted_dispatch,
            MAX_REPLICAS=max_replicas,
            BLOCK_M=self.block_m,
            TAIL_ROWS=self.tail_rows,
            CHUNK=self.chunk,
            TABLE_ROWS=TABLE_BLOCK,
            PAD_ROWS=PAD_BLOCK,
            SCAN_COLS=min(SCAN_COLS, 2 * p_p),
            SCAN_ROWS=min(SCAN_ROWS, pow2(self.max_chunks)),
            PAIR_SAMPLE=PAIR_SAMPLE,
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
    tiles: torch.Tensor  # [max_tiles, TILE_COLS] int32 (the first round's)
    dispatch_tasks: torch.Tensor  # [max_dispatch_tasks, DISPATCH_TASK_COLS] int32 (first round's)
    stats: torch.Tensor  # [len(STATS)] int32 (the first round's)

    def stat(self, name: str) -> int:
        return int(self.stats[STATS.index(name)])


__all__ = [
    "CHUNK_ELEMS",
    "DISPATCH_TASK_COLS",
    "MAX_ROUNDS",
    "STATS_STRIDE",
    "PAD_BLOCK",
    "PROGRAMS_PER_SM",
    "STATS",
    "TABLE_BLOCK",
    "TILE_COLS",
    "Plan",
    "PlanConfig",
    "PlanMeta",
]
