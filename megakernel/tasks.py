"""The task graph of one call: task kinds, their id order, the flags they wait on, and the rule that
keeps the persistent grid free of deadlock (DESIGN §5).

Shape legend: T tokens on this rank, H hidden, R ranks, L local slots per rank.

One ``TaskKind`` enumeration serves the plan (which writes the dispatch task table), the kernel
(which runs and traces every kind) and the profiler (which names them).

Task ids of one call, in claim order (``KernelMeta`` holds the region bounds):

  ============  ==================================  =============================================
  region        ids                                 what one task does; what it waits on
  ============  ==================================  =============================================
  DISPATCH      ``[0, MAX_DISPATCH)``               puts a chunk of one send group's units
                (the plan's dispatch table)         (``ops.dispatch``); the group's last task
                                                    raises ``expert_ready`` on the destination.
                                                    Waits on nothing.
  GEMM1         ``[MAX_DISPATCH, BASE_DOWN)``       GEMM1 + SwiGLU of one (tile, column block)
  (RESOLVE in   one per (tile, column block); an    (``ops.gemm``); the tile's last block raises
  mode          expert's tiles in chunks, column-   ``act_ready[tile]``. Waits on
  "dispatch")   block major (``gemm1_coords``)      ``expert_ready`` of its rows' sources:
                                                    raised by DISPATCH tasks, here or on peers.
  DOWN          ``[BASE_DOWN, BASE_REDUCE)``        down projection of one (tile, column block of
                column-group major (down_coords)    H) and the combine put to the rows' source
                                                    ranks (``ops.gemm``, ``ops.combine``). Waits
                                                    on ``act_ready[tile]``: GEMM1 tasks of this
                                                    rank, lower ids.
  REDUCE        ``[BASE_REDUCE, +MAX_REDUCE)``      top-k reduce of (column group, token block)
                claimed among the next group's      (``ops.combine``). Waits on its
                down tasks (combine_order)          ``combine_count``: DOWN tasks of this rank and
                                                    of peers, of that group, claimed earlier.
  ============  ==================================  =============================================

A call in rounds (more rows for one rank than its capacity, DESIGN §4) is one launch per round,
each with these regions over its own round's tables; only the last round has REDUCE tasks. A
round's DISPATCH tasks to a rank also wait on ``round_free`` of that rank's previous round: set
by the last program out of its launch, which every task of that launch finished before.

NOTE (the deadlock-freedom rule): every wait targets a task claimed earlier on this rank, or a
task of a peer that the peer claims earlier in the same order and that itself waits only on
earlier tasks. Programs claim ids from one atomic counter in order (``moe_megakernel``), so
whatever a claimed task waits on was claimed by a program that is already running: the grid
cannot deadlock even when not every program is resident. ``combine_order`` keeps the rule when
it moves a group's reduce tasks among the next group's down tasks: they follow every down task
of their own group. With ``KernelConfig(pack="scan")`` a tile's column blocks 1.. also wait for
its block 0 (a lower id of this rank) to copy the token-saving rows into place.
"""

from __future__ import annotations

from enum import IntEnum

import triton
import triton.language as tl


class TaskKind(IntEnum):
    """The kinds of task, as the kernel records them in a trace."""

    DISPATCH = 0
    GEMM1 = 1
    RESOLVE = 2  # mode "dispatch": a GEMM1 task's place, copying token-saving rows into place
    DOWN = 3  # down projection + combine put
    REDUCE = 4  # top-k reduce

    @property
    def label(self) -> str:
        """The name traces and summaries show."""
        return _LABELS[self]


_LABELS = {
    TaskKind.DISPATCH: "dispatch",
    TaskKind.GEMM1: "gemm1",
    TaskKind.RESOLVE: "resolve",
    TaskKind.DOWN: "down_combine",
    TaskKind.REDUCE: "topk_reduce",
}

# the same kinds for device code (a jit function reads only constexpr globals)
KIND_DISPATCH = tl.constexpr(TaskKind.DISPATCH.value)
KIND_GEMM1 = tl.constexpr(TaskKind.GEMM1.value)
KIND_RESOLVE = tl.constexpr(TaskKind.RESOLVE.value)
KIND_DOWN = tl.constexpr(TaskKind.DOWN.value)
KIND_REDUCE = tl.constexpr(TaskKind.REDUCE.value)

# error-record flag ids of the waits (below 1 << 20: the plan's counts_ready[source rank])
FLAG_EXPERT_READY = tl.constexpr(1 << 20)  # + local * R_P + source rank
FLAG_ACT_READY = tl.constexpr(2 << 20)  # + tile
FLAG_COMBINE = tl.constexpr(3 << 20)  # + column group * TOKEN_BLOCKS + token block
FLAG_ROWS_RESOLVED = tl.constexpr(4 << 20)  # + tile (KernelConfig.pack = "scan")
FLAG_ROUND_FREE = tl.constexpr(5 << 20)  # + destination rank (a call of several rounds)
# the kernel's counters: [3] int32 per rank
COUNTER_DISPATCH = tl.constexpr(0)
COUNTER_COMPUTE = tl.constexpr(1)
COUNTER_EXIT = tl.constexpr(2)
# timing probes of mode "layer" (KernelConfig has none: run(stage=...) picks them)
PROBE_OFF = tl.constexpr(0)
PROBE_COMM = tl.constexpr(1)  # every task but no GEMM math: plan, dispatch, combine, reduce
PROBE_COMPUTE = tl.constexpr(2)  # both GEMMs on the last call's rows, outputs kept local

# "layer": the whole MoE layer; "gemm": dispatch + GEMM1; "dispatch": dispatch + resolve only
MODES = ("layer", "gemm", "dispatch")
# run() parts, for timing each alone: see Megakernel.run
STAGES = ("all", "dispatch", "sends", "tiles", "comm", "compute")


def task_regions(meta) -> dict[str, tuple[int, int]]:
    """The task id range ``[begin, end)`` of each region of one call (``meta``: a
    ``KernelMeta``), in id order; empty regions left out."""
    bounds = {
        "dispatch": (0, meta.MAX_DISPATCH),
        "gemm1": (meta.MAX_DISPATCH, meta.BASE_DOWN),
        "down": (meta.BASE_DOWN, meta.BASE_REDUCE),
        "reduce": (meta.BASE_REDUCE, meta.BASE_REDUCE + meta.MAX_REDUCE),
    }
    return {kind: (b, e) for kind, (b, e) in bounds.items() if e > b}


def flag_name(flag: int, token_blocks: int, world_size: int) -> str:
    """Names the flag of a ``WaitTimeoutError`` (``token_blocks``: combine counters per column
    group)."""
    if flag >= FLAG_ROUND_FREE.value:
        dst = flag - FLAG_ROUND_FREE.value
        return f"round_free[rank {dst}] (its previous round of the call done)"
    if flag >= FLAG_ROWS_RESOLVED.value:
        return f"resolved[tile {flag - FLAG_ROWS_RESOLVED.value}] (its column block 0)"
    if flag >= FLAG_COMBINE.value:
        group, block = divmod(flag - FLAG_COMBINE.value, token_blocks)
        return (
            f"combine_count[column group {group}, token block {block}] (pieces from the "
            "experts' ranks)"
        )
    if flag >= FLAG_ACT_READY.value:
        return f"act_ready[tile {flag - FLAG_ACT_READY.value}]"
    if flag >= FLAG_EXPERT_READY.value:
        r_p = triton.next_power_of_2(world_size)
        local, src = divmod(flag - FLAG_EXPERT_READY.value, r_p)
        return f"expert_ready[local slot {local}, source rank {src}]"
    return f"counts_ready[source rank {flag}]"


# ----------------------------------------------------------------------------- task order


@triton.jit
def share(task_begin, task_end, base, active):
    """The part of task region ``[base, base + active)`` inside ``[task_begin, task_end)``, as
    (first index in the region, count)."""
    lo = tl.minimum(tl.maximum(task_begin - base, 0), active)
    hi = tl.minimum(tl.maximum(task_end - base, 0), active)
    return lo, hi - lo


@triton.jit
def down_coords(j, num_tiles, GB: tl.constexpr, NB2: tl.constexpr):
    """Down task ``j`` -> (column group, tile, column block); ``GB`` column blocks per group,
    ``NB2`` in all. Tasks are column-group major (the group's ``GB`` column blocks of every tile,
    then the next group's), so each group's combine pieces are complete early enough for its
    top-k reduce to run among later down tasks; within a group a tile's column blocks are
    neighbours and share its activations in L2."""
    full = tl.maximum(num_tiles * GB, 1)  # tasks of a whole group (the last may have fewer)
    g = j // full
    in_group = j - g * full
    width = tl.minimum(GB, NB2 - g * GB)  # column blocks of group g
    return g, in_group // width, g * GB + in_group % width


@triton.jit
def combine_order(u, num_down, num_tiles, nrb, lag, GB: tl.constexpr, NRH: tl.constexpr):
    """Position ``u`` of the down + reduce part of the task order -> (is a down task, index in
    its region). Dg are column group g's down tasks (``GB`` column blocks per tile), Rg its
    ``nrb`` top-k reduce tasks, ``NRH`` groups. The order is D0, then for g = 1 .. NRH - 1 the
    first ``lag`` tasks of Dg followed by the rest of Dg with R(g-1) spread evenly among them,
    then R(NRH-1). ``NRH >= 2``: with one group, id order (D0, then R0) is already that order.

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
