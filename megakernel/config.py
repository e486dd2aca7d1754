"""What the megakernel is compiled for: ``KernelConfig`` (the knobs), the receive capacity, and
``KernelMeta`` (every compile-time constant of one launch, and the legend of their names).

Shape legend: T tokens per rank (at most T_max), H hidden, I expert FFN width, E experts, K top-k,
R ranks, L local slots per rank, P = R * L, C receive rows per rank (the capacity).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import triton

from megakernel.shapes import ACTIVATIONS, FP8_BLOCK, MoEShape

# KernelConfig.pack: how GEMM1 reads rows that token saving left as references (see gather_a)
PACK_MODES = ("auto", "gather", "scan")
# a top-k reduce step loads [REDUCE_ROWS tokens, K, columns] with REDUCE_LOAD elements at once:
# 32 KB of bf16 in flight per program is what kept the reduce streaming (perf/NOTES.md)
REDUCE_ROWS = 16
REDUCE_LOAD = 16384
# mode "dispatch" (no GEMM, little shared memory) launches this many programs per SM where each
# rank has its own GPU: more rows in flight (perf/NOTES.md, the dispatch-only op)
DISPATCH_ONLY_PROGRAMS_PER_SM = 4
_POW2_KNOBS = (
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
)


def pow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1): Triton block shapes must be powers of two."""
    return triton.next_power_of_2(max(1, n))


def tiles_of(rows: torch.Tensor, block_m: int, tail_rows: int) -> torch.Tensor:
    """The GEMM tiles each slot of ``rows`` rows makes (host side; the plan kernel's is
    ``plan.layout.slot_tiles``): ``block_m`` rows a tile, the last partial, except that a last
    one of at most ``tail_rows`` rows after a full one joins it (``KernelConfig.tail_rows``)."""
    full = -(-rows // block_m)
    return full - ((full >= 2) & (rows - (full - 1) * block_m <= tail_rows)).to(full.dtype)


def check_tma_rows(knob: str, weight: str, step: str, elems: int, dtype: torch.dtype) -> None:
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

    The GEMM tiles are the best of ``python -m perf.sweep_gemm`` (GEMM1) and ``python -m
    perf.sweep_gemm --gemm down`` (the down projection), run with dsv3 as one of two ranks; the
    sweeps, the runner-up tiles and ``torch._grouped_mm`` on the same rows are in perf/NOTES.md.

    ``gemm1_pairs``: a GEMM1 task makes one [BM, 2 BN] product per k step (m64n256 MMAs) instead
    of a gate and an up product of BN columns that each read A from shared memory again. Its TMA
    descriptor views ``w13 [L, 2I, H]`` as ``[L, I, 2, H]``, so one box brings gate row j and up
    row j side by side and SwiGLU splits the pairs in registers; the weights keep their layout.
    It applies where w13 comes by TMA, with SwiGLU, and 2 BN fits one MMA (BN <= 128).
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
    # FP8 GEMMs: k elements an MMA chain sums before its partial is added to the fp32
    # accumulator (32, 64 or 128); 0: never, the whole k loop in the tensor cores' accumulator,
    # whose adds keep too few bits on Hopper (an error that grows with k: perf/NOTES.md)
    fp8_promote_k: int = 128
    # a tile of at most block_m / 2 rows (an expert's last, partly filled one) runs GEMM1 and
    # the down projection at half the height, so its MMAs cover the rows it has, not block_m:
    # FP8 4-6% faster at T = 4096, bf16 2-6% at T = 16 and 128 and 1-2% at T = 1024, within
    # the spread at T = 4096, every preset on an H100 (perf/NOTES.md)
    half_tiles: bool = True
    # an expert's last tile of at most tail_rows rows joins the tile before it, whose tasks run
    # those rows as a second product with the operands swapped (weights as the MMA's M side,
    # the rows as its N side, so tail_rows wide), from the weight block the tile's product
    # loaded: the tail streams no weights of its own. 0: off; else a power of two from 16 (a
    # compiled dot's least N) to block_m / 2, bf16 / fp16 / fp32 experts (perf/NOTES.md,
    # "An expert's tail rows in the tile before")
    tail_rows: int = 0
    # GEMM1 tasks of up to this many tiles of one expert run column block by column block
    # (block 0 of each tile, then block 1, ...), so those tiles read each weight block at the
    # same time and all but the first find it in L2; 1: a tile's column blocks in a row
    # (ops.gemm.gemm1_coords). 16 keeps a chunk's A rows and the weight blocks the programs
    # stream together near their smallest (G A + 132 / G W, W = 2 A, at G = 16): mixtral 1.45x
    # faster at T = 4096 than tile by tile, dsv3 3% with G = 8 (perf/NOTES.md, "GEMM1 tasks by
    # expert")
    gemm1_group: int = 16
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
            if f.type == "str":
                continue
            if f.type == "bool":
                if value not in (False, True):  # 0 and 1 too (``megakernel.profile --set``)
                    raise ValueError(f"KernelConfig.{f.name} must be True or False, got {value!r}")
                continue
            zero_ok = ("num_ctas", "dispatch_ctas", "reduce_lag", "fp8_promote_k", "tail_rows")
            low = 0 if f.name in zero_ok else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"KernelConfig.{f.name} must be an int >= {low}, got {value!r}")
        for name in _POW2_KNOBS:
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")
        tail = self.tail_rows
        if tail and (tail & (tail - 1) or tail > self.block_m // 2):
            raise ValueError(
                f"KernelConfig.tail_rows must be 0 or a power of two up to block_m / 2 = "
                f"{self.block_m // 2}, got {tail}"
            )
        if self.fp8_promote_k not in (0, 32, 64, 128):
            raise ValueError(
                f"KernelConfig.fp8_promote_k must be 0, 32, 64 or 128, got {self.fp8_promote_k}"
            )

    @classmethod
    def interpreter(cls, **knobs: object) -> KernelConfig:
        """Small tiles for small shapes under the Triton interpreter (``TRITON_INTERPRET=1``),
        which runs every program one after another on the CPU: at the GPU tiles a call of a
        small layer takes minutes. ``knobs`` override any field."""
        small = dict(block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16)
        small |= dict(combine_block=16, reduce_h=64, block_h=64, chunk=4)
        return cls(**(small | knobs))

    def for_fp8(self) -> KernelConfig:
        """This config as the FP8 path runs it (``MoEShape.fp8``): k steps are one scale block
        of 128, and so are a GEMM1 task's columns, so each product takes one scale per row and
        one per weight block; gate and up are two products (no pairs); a down task's columns
        are one scale block, or two side by side where ``down_block_n`` >= 256 (two products).
        GEMM1 gathers its rows through ``recv_src`` (their scales too), so ``pack="scan"`` does
        not apply. The weights come by TMA or by pointers as ``gemm1_tma`` / ``down_tma`` say."""
        if self.pack == "scan":
            raise ValueError(
                'KernelConfig(pack="scan") resolves rows in place, which the FP8 path does not: '
                'its GEMM1 gathers each row and its scales ("auto" or "gather")'
            )
        # NOTE: should tail_rows ever default to non-zero for bf16, the default must become 0
        # here, not an error (the layer applies this to the default config of an FP8 shape)
        if self.tail_rows:
            raise ValueError(
                f"KernelConfig(tail_rows={self.tail_rows}) runs an expert's tail rows as a "
                "swapped product, which the FP8 tiles do not have (their k loops would spill: "
                "perf/NOTES.md): tail_rows=0 for FP8 experts"
            )
        b = FP8_BLOCK
        return replace(
            self, block_n=b, block_k=b, down_block_n=b if self.down_block_n <= b else 2 * b,
            down_block_k=b, gemm1_pairs=False,
        )  # fmt: skip

    def paired_gemm1(self, swiglu: bool) -> bool:
        """Whether GEMM1 makes gate and up as one [BM, 2 BN] product (``gemm1_pairs``): only with
        SwiGLU (which splits the pairs), w13 by TMA (whose box interleaves the rows) and 2 BN
        within the widest MMA, n256. (A tile with a tail, ``tail_rows``, makes them as two
        products all the same: ``ops.gemm.tile_expert_gemm``.)"""
        return self.gemm1_pairs and swiglu and self.gemm1_tma and self.block_n <= 128

    def token_blocks(self, max_tokens: int) -> int:
        """Combine counters per column group: blocks of ``combine_block`` tokens."""
        return triton.cdiv(max_tokens, self.combine_block)

    def reduce_groups(self, hidden: int) -> tuple[int, int, int]:
        """(columns per group, column groups of H, down-projection column blocks per group). A
        group is a multiple of ``down_block_n`` wide, so each down task feeds one group's combine
        counters."""
        cols = max(min(self.reduce_h, pow2(hidden)), self.down_block_n)
        return cols, triton.cdiv(hidden, cols), cols // self.down_block_n

    def gather_a(self) -> bool:
        """Whether GEMM1 gathers its A rows through ``recv_src`` (``pack`` "gather", and "auto")
        or reads them in place after its tile's indirect rows were copied there ("scan").

        "auto" is "gather": the packing study (``perf/studies/pack.py``, swept by
        ``perf/sweep_pack.py``) found pack + GEMM fastest by gathering at every point it
        measured, since the GEMM's A load gathers rows as cheaply as it reads packed ones."""
        return self.pack != "scan"


def default_capacity(shape: MoEShape, world_size: int, slots_per_rank: int) -> int:
    """Receive rows per rank: the most any routing can send one rank (R * T * min(K, L)),
    capped at twice the uniform average (2 T K) for large worlds, where the worst case is
    unaffordable; a routing beyond it raises ``CapacityError`` on every rank."""
    T, K = shape.max_tokens_per_rank, shape.topk
    return max(1, min(world_size * T * min(K, slots_per_rank), 2 * T * K))


class KernelMeta(NamedTuple):
    """Every compile-time constant of one ``moe_megakernel`` launch: the kernel takes it as one
    constexpr, ``M``, and its task bodies read ``M.<NAME>``. This is the legend of the names.
    ``*_P`` is the value rounded up to a power of two (a block shape)."""

    # -- sizes
    K: int  # top-k
    K_P: int
    R: int  # ranks
    R_P: int
    L: int  # local slots per rank
    L_P: int
    P_P: int  # physical slots (R * L), rounded up: the send groups' table width
    H: int  # hidden
    I: int  # expert FFN width
    C: int  # receive rows per rank (capacity)
    ROUNDS: int  # launches per call: the most rounds a call may take (1 outside mode "layer")
    TK: int  # T_max * K: a tag's source-rank stride
    # -- the task id regions of one call (megakernel.tasks): dispatch [0, MAX_DISPATCH), GEMM1
    #    [MAX_DISPATCH, BASE_DOWN), down [BASE_DOWN, BASE_REDUCE), reduce [BASE_REDUCE, +MAX_REDUCE)
    MAX_DISPATCH: int
    BASE_DOWN: int
    BASE_REDUCE: int
    MAX_REDUCE: int
    # -- dispatch
    CHUNK: int  # units per dispatch task
    BLOCK_H: int  # columns per dispatch copy step
    COPY_STAGES: int  # copy steps loaded ahead
    DISPATCH_CTAS: int  # programs that take dispatch tasks first
    # -- GEMM1 (+ SwiGLU)
    BLOCK_M: int  # rows per tile
    BLOCK_N: int  # output columns per GEMM1 task
    BLOCK_K: int  # k step over H
    GEMM1_BLOCKS: int  # GEMM1 tasks (column blocks) per tile
    GEMM1_GROUP: int  # an expert's tiles whose GEMM1 tasks interleave by column block
    # -- down projection + combine put
    DOWN_BLOCK_N: int  # output columns (of H) per down task
    DOWN_BLOCK_K: int  # k step over I
    DOWN_BLOCKS: int  # down tasks (column blocks of H) per tile
    FP8_PROMOTE_K: int  # FP8 MMAs: k elements per partial before an fp32 add (0: never)
    HALF_TILES: bool  # tiles of at most BLOCK_M / 2 rows run at half the height
    TAIL_ROWS: int  # a tile of more than BLOCK_M rows holds up to this many more (0: none)
    COMBINE_BLOCK: int  # tokens per combine counter
    TOKEN_BLOCKS: int  # combine counters per column group: cdiv(T_max, COMBINE_BLOCK)
    COUNTERS_P: int  # GROUPS * TOKEN_BLOCKS, rounded up
    PENDING_P: int  # R * TOKEN_BLOCKS, rounded up: a program's pending-piece row
    # -- top-k reduce
    GROUPS: int  # column groups of H
    GROUP_COLS: int  # columns per group (and per reduce task)
    GROUP_BLOCKS: int  # down column blocks per group
    REDUCE_TOKENS: int  # tokens per reduce task
    REDUCE_STEP_TOKENS: int  # tokens per reduce load step
    REDUCE_STEP_COLS: int  # columns per reduce load step
    LAG: int  # down tasks of a group before the previous group's reduce mixes in
    # -- switches
    DOWN_TMA: bool  # w2 by TMA
    GEMM: bool  # the GEMMs run (modes "gemm" and "layer")
    SWIGLU: bool  # GEMM1's SwiGLU epilogue
    GATHER_A: bool  # GEMM1 gathers A rows through recv_src
    GEMM1_TMA: bool  # w13 by TMA
    PAIRS: bool  # gate and up as one product (KernelConfig.paired_gemm1)
    LAYER: bool  # the whole layer (down, combine, reduce)
    FP8: bool  # e4m3 rows, activations and weights with fp32 block scales (MoEShape.fp8)
    ACT: int  # GEMM1's gated activation: MoEShape.activation's index in shapes.ACTIVATIONS
    BIAS: bool  # the experts add their biases (MoEShape.bias): GEMM1's b13, the down's b2
    TOKEN_SAVING: bool
    SORTED: bool  # expert-major send order
    PER_TILE: bool  # a tile waits on its own source ranks' flags only
    PROBE: int  # a timing probe (megakernel.tasks.PROBE_*), 0 off
    TRACE: bool  # record every task (megakernel.profiler)
    TRACE_CAP: int  # events each program can record


# KernelMeta fields that are KernelConfig knobs as they are
_AS_CONFIGURED = dict(
    CHUNK="chunk",
    COPY_STAGES="copy_stages",
    BLOCK_M="block_m",
    BLOCK_N="block_n",
    BLOCK_K="block_k",
    TOKEN_SAVING="token_saving",
    SORTED="sorted_dispatch",
    PER_TILE="per_tile_flags",
    TRACE="trace",
    TRACE_CAP="trace_events",
    FP8_PROMOTE_K="fp8_promote_k",
    GEMM1_GROUP="gemm1_group",
    TAIL_ROWS="tail_rows",
)


def kernel_meta(
    shape: MoEShape,
    plan_cfg,
    config: KernelConfig,
    capacity: int,
    swiglu: bool,
    num_ctas: int,
    mode: str,
    probe: int = 0,
) -> KernelMeta:
    """The constants of ``moe_megakernel`` for one mode ("layer", "gemm", "dispatch") and timing
    probe (``megakernel.tasks.PROBE_*``); ``plan_cfg``: the layer's ``PlanConfig``."""
    cfg, pc = config, plan_cfg
    gemm, layer = mode in ("gemm", "layer"), mode == "layer"
    width = shape.ffn if swiglu else 2 * shape.ffn
    nb = triton.cdiv(width, cfg.block_n) if gemm else 1
    nb2 = triton.cdiv(shape.hidden, cfg.down_block_n) if layer else 1
    combine = _combine_meta(cfg, shape, pc.world_size, pc.topk, nb2, num_ctas)
    max_reduce = combine.pop("MAX_REDUCE")
    base_down = pc.max_dispatch_tasks + pc.max_tiles * nb
    base_reduce = base_down + (pc.max_tiles * nb2 if layer else 0)
    return KernelMeta(
        **pc.sizes(),
        H=shape.hidden,
        I=shape.ffn,
        C=capacity,
        ROUNDS=pc.rounds if layer else 1,
        TK=shape.max_tokens_per_rank * pc.topk,
        MAX_DISPATCH=pc.max_dispatch_tasks,
        BASE_DOWN=base_down,
        BASE_REDUCE=base_reduce,
        MAX_REDUCE=max_reduce if layer else 0,
        BLOCK_H=min(cfg.block_h, pow2(shape.hidden)),
        DISPATCH_CTAS=min(cfg.dispatch_ctas or num_ctas, num_ctas),
        GEMM1_BLOCKS=nb,
        **combine,
        DOWN_TMA=layer and cfg.down_tma,
        GEMM=gemm,
        SWIGLU=swiglu,
        GATHER_A=cfg.gather_a(),
        GEMM1_TMA=gemm and cfg.gemm1_tma,
        PAIRS=gemm and cfg.paired_gemm1(swiglu),
        LAYER=layer,
        FP8=shape.fp8,
        ACT=ACTIVATIONS.index(shape.activation),
        BIAS=gemm and shape.bias,
        HALF_TILES=bool(cfg.half_tiles),
        PROBE=probe,
        **{name: getattr(cfg, knob) for name, knob in _AS_CONFIGURED.items()},
    )


def _combine_meta(
    cfg: KernelConfig, shape: MoEShape, world_size: int, topk: int, nb2: int, num_ctas: int
) -> dict[str, int]:
    """``KernelMeta``'s down-projection, combine and top-k reduce constants (and MAX_REDUCE)."""
    T = shape.max_tokens_per_rank
    token_blocks = cfg.token_blocks(T)
    group_cols, groups, group_blocks = cfg.reduce_groups(shape.hidden)
    rb = min(cfg.reduce_tokens, cfg.combine_block)
    rt = min(REDUCE_ROWS, rb)
    return dict(
        MAX_REDUCE=triton.cdiv(T, rb) * groups,
        DOWN_BLOCK_N=cfg.down_block_n,
        DOWN_BLOCK_K=cfg.down_block_k,
        DOWN_BLOCKS=nb2,
        COMBINE_BLOCK=cfg.combine_block,
        TOKEN_BLOCKS=token_blocks,
        COUNTERS_P=pow2(groups * token_blocks),
        PENDING_P=pow2(world_size * token_blocks),
        GROUPS=groups,
        GROUP_COLS=group_cols,
        GROUP_BLOCKS=group_blocks,
        REDUCE_TOKENS=rb,
        REDUCE_STEP_TOKENS=rt,
        REDUCE_STEP_COLS=min(group_cols, max(1, REDUCE_LOAD // (rt * pow2(topk)))),
        LAG=cfg.reduce_lag or num_ctas,
    )
