"""Combine: expert outputs back to their tokens' ranks, and the top-k reduce (DESIGN §5).

Shape legend: T tokens on this rank (at most T_max), H hidden, K top-k, R ranks, C receive rows
per rank. Symmetric buffers: ``combine_y [T_max * K, H]`` (one row per (token, k) of this rank's
tokens) and ``combine_count [groups, token blocks]`` (pieces arrived per column group of H and
block of tokens).

- ``tile_combine_put``: a down-projection block's rows into their source ranks' ``combine_y``,
  counted per (source rank, token block) in the program's pending row;
- ``flush_pieces``: adds a program's pending pieces to the source ranks' counters, with release;
- ``tile_topk_reduce``: ``out[t] = sum_k w[t, k] * y[t, k]`` for a block of tokens and columns,
  in fp32, in a fixed order (deterministic);
- ``reduce_task``: the scheduler's task body around it: wait for the block's pieces, reduce.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megakernel.tasks import FLAG_COMBINE
from symm_mem.device import globaltimer, wait_flag


@triton.jit
def tile_combine_put(
    acc,  # [BM, BN] fp32 expert outputs of rows [row0, row0 + rows), columns of n_block
    recv_tag_ptr,  # [C] int32 (this call's parity): source rank * T_max * K + token * K + k
    combine_base,  # [R] int64: every rank's sym combine_y [T_max * K, H]
    pending_ptr,  # [R * TOKEN_BLOCKS] int32: this program's pieces not yet counted at the sources
    combine_ptr,  # this rank's combine_y (gives the element type)
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    K: tl.constexpr,
    TK: tl.constexpr,  # T_max * K
    COMBINE_BLOCK: tl.constexpr,  # tokens per combine counter
    TOKEN_BLOCKS: tl.constexpr,  # counters per rank
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REMOTE: tl.constexpr = True,
):
    """Store each row of ``acc`` into its source rank's ``combine_y[token * K + k]`` and count, in
    this program's ``pending[piece_key(tag)]``, the (row, column block) pieces each token block
    got. ``flush_pieces`` later adds them to the source ranks' counters with one release for
    many tasks.

    NOTE: a tile's rows are in receive order (one local slot; source rank, then token: DESIGN
    §4), so the rows of one (source, block) key form a run. A run adds its length as two atomics,
    ``-first`` at its first row and ``last + 1`` at its last, instead of comparing every pair of
    rows.

    ``REMOTE=False`` (a timing probe: compute alone) stores the rows into this rank's own
    ``combine_y`` instead and counts nothing."""
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    tag = tl.load(recv_tag_ptr + row0 + r, mask=live, other=0)
    src = tag // TK
    pair = tag % TK
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = live[:, None] & (n < H)[None, :]
    y = acc.to(combine_ptr.dtype.element_ty)
    if not REMOTE:
        tl.store(combine_ptr + pair.to(tl.int64)[:, None] * H + n[None, :], y, mask=n_ok)
        return
    y_rows = tl.load(combine_base + src, mask=live, other=0).to(
        tl.pointer_type(combine_ptr.dtype.element_ty)
    )
    y_rows = tl.multiple_of(y_rows, [16])  # NOTE: symmetric buffers are aligned (see peer_ptr)
    tl.store(y_rows[:, None] + pair.to(tl.int64)[:, None] * H + n[None, :], y, mask=n_ok)
    key = piece_key(tag, TK, K, COMBINE_BLOCK, TOKEN_BLOCKS)
    before = tl.load(recv_tag_ptr + row0 + r - 1, mask=live & (r > 0), other=0)
    after = tl.load(recv_tag_ptr + row0 + r + 1, mask=r + 1 < rows, other=0)
    first = live & ((r == 0) | (piece_key(before, TK, K, COMBINE_BLOCK, TOKEN_BLOCKS) != key))
    last = live & ((r == rows - 1) | (piece_key(after, TK, K, COMBINE_BLOCK, TOKEN_BLOCKS) != key))
    tl.atomic_add(pending_ptr + key, -r, mask=first, sem="relaxed", scope="cta")
    tl.atomic_add(pending_ptr + key, r + 1, mask=last, sem="relaxed", scope="cta")


@triton.jit
def piece_key(
    tag, TK: tl.constexpr, K: tl.constexpr, COMBINE_BLOCK: tl.constexpr, TOKEN_BLOCKS: tl.constexpr
):
    """The combine counter a row's tag feeds: (source rank, token block), as source rank *
    TOKEN_BLOCKS + token // COMBINE_BLOCK."""
    return tag // TK * TOKEN_BLOCKS + tag % TK // K // COMBINE_BLOCK


@triton.jit
def flush_pieces(
    pending_ptr,  # [R * TOKEN_BLOCKS] int32: this program's pieces per (source rank, token block)
    count_base,  # [R] int64: every rank's sym combine_count [groups, TOKEN_BLOCKS] int32
    group,  # the column group of H all these pieces belong to
    R: tl.constexpr,
    TOKEN_BLOCKS: tl.constexpr,
    PENDING_P: tl.constexpr,  # R * TOKEN_BLOCKS rounded up to a power of two
):
    """Add this program's pending pieces, all of column group ``group``, to the source ranks'
    ``combine_count[group]``, with release at system scope (so the rows put before are visible
    first), and clear them.

    NOTE: a release at system scope waits until this program's stores reached the peers; paid
    once per group a program works in instead of once per task, it no longer stalls every down
    task."""
    tl.debug_barrier()  # every thread's rows and pending adds before the releases
    i = tl.arange(0, PENDING_P)
    pieces = tl.load(pending_ptr + i, mask=i < R * TOKEN_BLOCKS, other=0)
    some = pieces != 0
    counters = tl.load(count_base + i // TOKEN_BLOCKS, mask=some, other=0).to(
        tl.pointer_type(tl.int32)
    )
    counters += group * TOKEN_BLOCKS
    tl.atomic_add(counters + i % TOKEN_BLOCKS, pieces, mask=some, sem="release", scope="sys")
    tl.store(pending_ptr + i, tl.zeros([PENDING_P], tl.int32), mask=some)


@triton.jit
def publish_pieces(pending_row, peers, group, M: tl.constexpr):
    """``flush_pieces`` of a program's pending row (``M``: the kernel's ``KernelMeta``)."""
    flush_pieces(pending_row, peers.combine_count, group, M.R, M.TOKEN_BLOCKS, M.PENDING_P)


@triton.jit
def tile_topk_reduce(
    combine_ptr,  # [T_max * K, H] this rank's combine_y: expert output of (token, k)
    weights_ptr,  # [T, K] fp32 routing weights
    phys_ptr,  # [T, K] physical slot of every (token, k), -1 dropped
    out_ptr,  # [T, H]
    t0,
    t_end,
    h0,
    H: tl.constexpr,
    K: tl.constexpr,
    K_P: tl.constexpr,  # K rounded up to a power of two
    TOKENS: tl.constexpr,  # tokens of the task (at most)
    STEP_TOKENS: tl.constexpr,  # tokens per step
    COLS: tl.constexpr,  # columns of the task
    STEP_COLS: tl.constexpr,  # columns per step
):
    """``out[t, h0 : h0 + COLS] = sum_k w[t, k] * y[t, k]`` for tokens ``[t0, t_end)`` (at most
    TOKENS), in fp32, summed over k by one fixed reduction tree: the same inputs give bitwise the
    same output. Dropped slots add nothing.

    NOTE: a step loads all K rows of STEP_TOKENS tokens at once ([STEP_TOKENS, K_P, STEP_COLS]):
    the reduce is a stream from HBM, and one SM's share of the bandwidth is the bytes it has in
    flight over the load latency. Loading row by row, each behind its own mask load, chained the
    latencies: a task took a third longer that way than now, with the column steps pipelined
    (``num_stages=3``; perf/NOTES.md)."""
    k = tl.arange(0, K_P)[None, :]
    for s0 in tl.range(0, TOKENS, STEP_TOKENS):
        t = t0 + s0 + tl.arange(0, STEP_TOKENS)
        t_ok = (t < t_end)[:, None]
        pair = t[:, None] * K + k  # [STEP_TOKENS, K_P]
        live = t_ok & (k < K)
        used = live & (tl.load(phys_ptr + pair, mask=live, other=-1) >= 0)
        w = tl.load(weights_ptr + pair, mask=used, other=0.0)
        rows = combine_ptr + pair.to(tl.int64)[:, :, None] * H
        for c0 in tl.range(0, COLS, STEP_COLS, num_stages=3):
            h = h0 + c0 + tl.arange(0, STEP_COLS)
            y = tl.load(rows + h[None, None, :], mask=used[:, :, None] & (h < H), other=0.0)
            acc = tl.sum(w[:, :, None] * y.to(tl.float32), axis=1)  # [STEP_TOKENS, STEP_COLS]
            out = out_ptr + t.to(tl.int64)[:, None] * H + h[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok & (h < H))


@triton.jit
def reduce_task(
    j, nrb, num_tokens, weights_ptr, out_ptr, plan, mine, state, rank, epoch, deadline,
    M: tl.constexpr,
):  # fmt: skip
    """Top-k reduce task ``j`` of ``nrb`` per column group: group ``g = j // nrb`` (columns
    ``g * GROUP_COLS``), tokens ``(j % nrb) * REDUCE_TOKENS``. Waits until the counter of its
    (group, token block) holds every piece the block's kept slots get there (one per column
    block of the group). While this rank's routing error record holds a bad id (this call's, or
    an earlier call's the host has not raised yet) it writes NaN: never plausible numbers."""
    g = j // nrb
    t0 = (j - g * nrb) * M.REDUCE_TOKENS
    block = t0 // M.COMBINE_BLOCK
    t = block * M.COMBINE_BLOCK + tl.arange(0, M.COMBINE_BLOCK)[:, None]
    k = tl.arange(0, M.K_P)[None, :]
    in_block = (t < num_tokens) & (k < M.K)
    kept = in_block & (tl.load(plan.phys + t * M.K + k, mask=in_block, other=-1) >= 0)
    blocks_in_group = tl.minimum(M.GROUP_BLOCKS, M.DOWN_BLOCKS - g * M.GROUP_BLOCKS)
    expected = tl.sum(tl.sum(kept.to(tl.int32), axis=1), axis=0) * blocks_in_group
    waited = tl.zeros((), tl.int64)
    if M.TRACE:
        waited = globaltimer()
    counter = g * M.TOKEN_BLOCKS + block
    flag = FLAG_COMBINE + counter
    task = M.BASE_REDUCE + j
    ready = wait_flag(mine.combine_count + counter, expected, deadline, state.err, rank, flag, task)
    if M.TRACE:
        waited = globaltimer() - waited
    if ready:
        t_end = tl.minimum(t0 + M.REDUCE_TOKENS, num_tokens)
        if tl.load(state.routing_err) != 0:  # this call's or an earlier one's, not yet raised
            tile_fill_nan(out_ptr, t0, t_end, g * M.GROUP_COLS, M.H, M.REDUCE_TOKENS, M.GROUP_COLS)
        else:
            tile_topk_reduce(
                mine.combine_y,
                weights_ptr,
                plan.phys,
                out_ptr,
                t0,
                t_end,
                g * M.GROUP_COLS,
                M.H,
                M.K,
                M.K_P,
                M.REDUCE_TOKENS,
                M.REDUCE_STEP_TOKENS,
                M.GROUP_COLS,
                M.REDUCE_STEP_COLS,
            )
    return waited


@triton.jit
def tile_fill_nan(
    out_ptr, t0, t_end, h0, H: tl.constexpr, TOKENS: tl.constexpr, COLS: tl.constexpr
):  # fmt: skip
    """``out[t0 : t_end, h0 : h0 + COLS] = NaN``: a reduce task's block of a call that could not
    compute its answer (a bad routing id) holds no plausible numbers."""
    for s0 in tl.range(0, TOKENS, 16):
        t = t0 + s0 + tl.arange(0, 16)[:, None]
        for c0 in tl.range(0, COLS, 256):
            h = h0 + c0 + tl.arange(0, 256)[None, :]
            nan = tl.full([16, 256], float("nan"), tl.float32).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + t.to(tl.int64) * H + h, nan, mask=(t < t_end) & (h < H))
