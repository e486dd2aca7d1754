"""Tile functions of the megakernel: one ``@triton.jit`` function per task kind (DESIGN §4-6).

Shape legend: T tokens on this rank, H hidden, I expert FFN width, K top-k, L local slots per
rank, C receive rows per rank (the capacity), BM / BN / BK GEMM block sizes.

Receive side of one call (one parity of the double-buffered symmetric buffers):
  ``recv_x [C, H]``   rows in the receive order of DESIGN §4 (local slot, source rank, token);
  ``recv_src [C]``    for every row, the row that holds its data: itself, or with token saving
                      the token's first slot on this rank (an earlier or equal local slot).

- ``tile_dispatch_put``: a chunk of one send group's units. Each unit's token row is stored once
  into the destination's ``recv_x`` (a peer address), and every slot it feeds there gets its
  ``recv_src`` entry. The caller publishes the group's flag.
- ``tile_resolve_rows``: copies the indirect rows of one GEMM tile in place, so ``recv_x`` holds
  every row (dispatch-only mode; what ``dispatch_ref`` describes, bit for bit).
- ``tile_expert_gemm``: one ``[BM, BN]`` block of the expert's first GEMM, A rows gathered
  through ``recv_src`` (so no resolve copy is needed), the weights loaded by TMA or by pointers,
  bf16/fp16 in, fp32 accumulate, with the SwiGLU epilogue ``silu(x @ w_gate^T) * (x @ w_up^T)``
  or the raw ``x @ w13^T``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dispatch_put(
    x_ptr,  # [T, H] this rank's tokens
    send_units_ptr,  # [U_max] token * K + k in send order
    phys_ptr,  # [T, K] physical slot of every (token, k), -1 dropped
    slot_pos_ptr,  # [T, K] row of every (token, k) at its destination
    data_pos_ptr,  # [T, K] row that carries the token's data there
    recv_x_dst,  # destination's recv_x [C, H] (peer address, this call's parity)
    recv_src_dst,  # destination's recv_src [C] (peer address, this call's parity)
    recv_tag_dst,  # destination's recv_tag [C] (peer address, this call's parity), if TAG
    tag_base,  # this rank * T_max * K: tags name (source rank, token * K + k)
    start,
    count,
    dst,
    K: tl.constexpr,
    KP: tl.constexpr,
    L: tl.constexpr,
    H: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOKEN_SAVING: tl.constexpr,
    TAG: tl.constexpr,
    COPY_STAGES: tl.constexpr = 1,
):
    """Put units ``send_units[start : start + count]`` (all bound for rank ``dst``). With ``TAG``
    every slot fed also gets its tag, which tells the combine where the slot's output goes."""
    i = tl.arange(0, CHUNK)
    live = i < count
    unit = tl.load(send_units_ptr + start + i, mask=live, other=0)
    token = unit // K
    row = tl.load(data_pos_ptr + unit, mask=live, other=0)
    # the slots this unit feeds at dst: itself, and with token saving every slot of the token there
    k = tl.arange(0, KP)[None, :]
    pair = token[:, None] * K + k
    in_k = live[:, None] & (k < K)
    if TOKEN_SAVING:
        phys = tl.load(phys_ptr + pair, mask=in_k, other=-1)
        feeds = in_k & (phys >= 0) & (phys // L == dst)
    else:
        feeds = in_k & (pair == unit[:, None])
    slot_row = tl.load(slot_pos_ptr + pair, mask=feeds, other=0)
    tl.store(recv_src_dst + slot_row, tl.broadcast_to(row[:, None], (CHUNK, KP)), mask=feeds)
    if TAG:
        tl.store(recv_tag_dst + slot_row, tag_base + pair, mask=feeds)
    src = x_ptr + token.to(tl.int64)[:, None] * H
    out = recv_x_dst + row.to(tl.int64)[:, None] * H
    copy_rows(src, out, live[:, None], H, BLOCK_H, COPY_STAGES)


@triton.jit
def copy_rows(
    src_rows, out_rows, live, H: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr = 1
):
    """``out_rows[i, :H] = src_rows[i, :H]`` where ``live[i]``, BLOCK_H columns at a time
    (``src_rows`` / ``out_rows``: [N, 1] row pointers, ``live``: [N, 1]). ``STAGES`` > 1 loads
    that many column steps ahead (through shared memory)."""
    for h0 in tl.range(0, H, BLOCK_H, num_stages=STAGES):
        h = h0 + tl.arange(0, BLOCK_H)[None, :]
        m = live & (h < H)
        tl.store(out_rows + h, tl.load(src_rows + h, mask=m), mask=m)


@triton.jit
def tile_resolve_rows(
    recv_x_ptr,  # [C, H] this rank's receive rows (this call's parity)
    recv_src_ptr,  # [C]
    row0,
    rows,
    H: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Copy rows ``[row0, row0 + rows)`` that point elsewhere from the row holding their data.

    NOTE: a data row never points elsewhere, so tiles resolving at the same time never write a
    row another one reads.
    """
    for m0 in tl.range(0, BLOCK_M, CHUNK):
        r = m0 + tl.arange(0, CHUNK)
        live = r < rows
        src = tl.load(recv_src_ptr + row0 + r, mask=live, other=0)
        moved = (live & (src != row0 + r))[:, None]
        src_rows = recv_x_ptr + src.to(tl.int64)[:, None] * H
        out_rows = recv_x_ptr + (row0 + r).to(tl.int64)[:, None] * H
        copy_rows(src_rows, out_rows, moved, H, BLOCK_H)


@triton.jit
def tile_expert_gemm(
    recv_x_ptr,  # [C, H] this rank's receive rows (this call's parity)
    recv_src_ptr,  # [C] row holding each row's data
    w13_ptr,  # [L, 2I, H] gate rows, then up rows, of every local slot
    w13_desc,  # B_TMA: [BN, BK] blocks of w13 as [L * 2I, H]; PAIRS: [1, BN, 2, BK] of [L, I, 2, H]
    out_ptr,  # [C, I] with SWIGLU, else [C, 2I]
    local,
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741 (the shape legend's I)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWIGLU: tl.constexpr,
    GATHER: tl.constexpr = True,
    B_TMA: tl.constexpr = False,
    PAIRS: tl.constexpr = False,
):
    """Output columns ``[n_block * BLOCK_N, +BLOCK_N)`` of rows ``[row0, row0 + rows)``.
    ``GATHER``: A row ``r`` is ``recv_x[recv_src[r]]``; off: ``recv_x[r]`` (rows resolved first).
    ``B_TMA``: the weight blocks come by TMA through ``w13_desc`` (A rows, gathered, cannot),
    which frees the registers and issue slots the [BK, BN] pointer tiles took: GEMM1 went 424 ->
    475 TFLOP/s on an H200 (perf/NOTES.md).

    ``PAIRS`` (with ``B_TMA`` and ``SWIGLU``): the descriptor's box brings w13's rows in pairs
    (gate j, up j), so one [BM, 2 BN] product per k step gives both halves, split in registers
    (``KernelConfig.gemm1_pairs``: 2-3% on GEMM1, H200).

    NOTE: H must be a multiple of BLOCK_K (checked on the host); rows past ``rows`` read row 0's
    source harmlessly (masked to 0) and are not stored.
    """
    WIDTH: tl.constexpr = I if SWIGLU else 2 * I
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    if GATHER:
        src = tl.load(recv_src_ptr + row0 + r, mask=live, other=0).to(tl.int64)
    else:
        src = (row0 + r).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = recv_x_ptr + src[:, None] * H + kk[None, :]
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (n < WIDTH)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PAIRS:
        # the descriptor views w13 as [L, I, 2, H]: its [1, BN, 2, BK] box holds the rows
        # interleaved (gate j, up j), so one [BM, 2 BN] product per k step, split in registers
        slot = tl.cast(local, tl.int32)
        n0 = n_block * BLOCK_N
        acc2 = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k in tl.range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            b = w13_desc.load([slot, n0, 0, k * BLOCK_K]).reshape([2 * BLOCK_N, BLOCK_K])
            acc2 = tl.dot(a, b.T, acc2)
            a_ptrs += BLOCK_K
        acc, acc_up = tl.split(tl.reshape(acc2, [BLOCK_M, BLOCK_N, 2]))
    elif B_TMA:
        # columns past WIDTH read the next rows (or TMA's zero fill) and are never stored
        n0 = tl.cast(local, tl.int32) * (2 * I) + n_block * BLOCK_N
        for k in tl.range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            acc = tl.dot(a, w13_desc.load([n0, k * BLOCK_K]).T, acc)
            if SWIGLU:
                acc_up = tl.dot(a, w13_desc.load([n0 + I, k * BLOCK_K]).T, acc_up)
            a_ptrs += BLOCK_K
    else:
        # B = w^T as a [BLOCK_K, BLOCK_N] view of the [2I, H] weight (H contiguous)
        w = w13_ptr + tl.cast(local, tl.int64) * (2 * I * H)
        gate_ptrs = w + n.to(tl.int64)[None, :] * H + kk[:, None]
        up_ptrs = gate_ptrs + I * H
        for _ in tl.range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            acc = tl.dot(a, tl.load(gate_ptrs, mask=n_ok, other=0.0), acc)
            if SWIGLU:
                acc_up = tl.dot(a, tl.load(up_ptrs, mask=n_ok, other=0.0), acc_up)
                up_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = out_ptr + (row0 + r).to(tl.int64)[:, None] * WIDTH + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & n_ok)


@triton.jit
def tile_down_gemm(
    act_ptr,  # [C, I] expert activations in the receive order
    w2_ptr,  # [L, H, I] down projections of every local slot
    w2_desc,  # with B_TMA: a [BLOCK_N, BLOCK_K] block descriptor of w2 as [L * H, I]
    local,
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741 (the shape legend's I)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_TMA: tl.constexpr = False,
):
    """The fp32 ``[BM, BN]`` block ``act[row0 : row0 + rows] @ w2[local, n_block * BN : +BN]^T``
    (rows past ``rows`` are 0). ``B_TMA``: the w2 blocks come by TMA through ``w2_desc``, and
    columns past H hold the next rows' products, which the caller never stores; 411 -> 460
    TFLOP/s on an H200 (perf/NOTES.md). NOTE: I must be a multiple of BLOCK_K (checked on the
    host)."""
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + (row0 + r).to(tl.int64)[:, None] * I + kk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if B_TMA:
        n0 = tl.cast(local, tl.int32) * H + n_block * BLOCK_N
        for k in tl.range(0, I // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            acc = tl.dot(a, w2_desc.load([n0, k * BLOCK_K]).T, acc)
            a_ptrs += BLOCK_K
    else:
        n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n < H)[None, :]
        # B = w2^T as a [BLOCK_K, BLOCK_N] view of the [H, I] weight (I contiguous)
        w2 = w2_ptr + tl.cast(local, tl.int64) * (H * I)
        b_ptrs = w2 + n.to(tl.int64)[None, :] * I + kk[:, None]
        for _ in tl.range(0, I // BLOCK_K):
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            acc = tl.dot(a, tl.load(b_ptrs, mask=n_ok, other=0.0), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    return acc


@triton.jit
def tile_combine_put(
    acc,  # [BM, BN] fp32 expert outputs of rows [row0, row0 + rows), columns of n_block
    recv_tag_ptr,  # [C] int32 (this call's parity): source rank * T_max * K + token * K + k
    combine_base,  # [R] int64: every rank's sym combine_y [T_max * K, H]
    pending_ptr,  # [R * NCB] int32: this program's pieces not yet added to the source ranks
    combine_ptr,  # this rank's combine_y (gives the element type)
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    K: tl.constexpr,
    TK: tl.constexpr,  # T_max * K
    CB: tl.constexpr,  # tokens per combine counter
    NCB: tl.constexpr,  # counters per rank
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REMOTE: tl.constexpr = True,
):
    """Store each row of ``acc`` into its source rank's ``combine_y[token * K + k]`` and count, in
    this program's ``pending[source rank * NCB + token // CB]``, the (row, column block) pieces
    each token block got. ``flush_pieces`` later adds them to the source ranks' counters with one
    release for many tasks.

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
    key = _piece_key(tag, TK, K, CB, NCB)
    before = tl.load(recv_tag_ptr + row0 + r - 1, mask=live & (r > 0), other=0)
    after = tl.load(recv_tag_ptr + row0 + r + 1, mask=r + 1 < rows, other=0)
    first = live & ((r == 0) | (_piece_key(before, TK, K, CB, NCB) != key))
    last = live & ((r == rows - 1) | (_piece_key(after, TK, K, CB, NCB) != key))
    tl.atomic_add(pending_ptr + key, -r, mask=first, sem="relaxed", scope="cta")
    tl.atomic_add(pending_ptr + key, r + 1, mask=last, sem="relaxed", scope="cta")


@triton.jit
def _piece_key(tag, TK: tl.constexpr, K: tl.constexpr, CB: tl.constexpr, NCB: tl.constexpr):
    """The combine counter a row's tag feeds: source rank * NCB + token // CB."""
    return tag // TK * NCB + tag % TK // K // CB


@triton.jit
def flush_pieces(
    pending_ptr,  # [R * NCB] int32: this program's pieces per (source rank, token block)
    count_base,  # [R] int64: every rank's sym combine_count [groups, NCB] int32
    group,  # the column group of H all these pieces belong to
    R: tl.constexpr,
    NCB: tl.constexpr,
    RNCBP: tl.constexpr,  # R * NCB rounded up to a power of two
):
    """Add this program's pending pieces, all of column group ``group``, to the source ranks'
    ``combine_count[group]``, with release at system scope (so the rows put before are visible
    first), and clear them.

    NOTE: a release at system scope waits until this program's stores reached the peers; paid
    once per group a program works in instead of once per task, it no longer stalls every down
    task."""
    tl.debug_barrier()  # every thread's rows and pending adds before the releases
    i = tl.arange(0, RNCBP)
    pieces = tl.load(pending_ptr + i, mask=i < R * NCB, other=0)
    some = pieces != 0
    counters = tl.load(count_base + i // NCB, mask=some, other=0).to(tl.pointer_type(tl.int32))
    counters += group * NCB
    tl.atomic_add(counters + i % NCB, pieces, mask=some, sem="release", scope="sys")
    tl.store(pending_ptr + i, tl.zeros([RNCBP], tl.int32), mask=some)


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
    KP: tl.constexpr,  # K rounded up to a power of two
    TB: tl.constexpr,  # tokens of the task (at most)
    RT: tl.constexpr,  # tokens per step
    RH: tl.constexpr,  # columns of the task
    RC: tl.constexpr,  # columns per step
):
    """``out[t, h0 : h0 + RH] = sum_k w[t, k] * y[t, k]`` for tokens ``[t0, t_end)`` (at most TB),
    in fp32, summed over k by one fixed reduction tree: the same inputs give bitwise the same
    output. Dropped slots add nothing.

    NOTE: a step loads all K rows of RT tokens at once ([RT, KP, RC]): the reduce is a stream
    from HBM, and one SM's share of the bandwidth is the bytes it has in flight over the load
    latency. Loading row by row, each behind its own mask load, chained the latencies: a 32-token
    task took 36 us on an H100 (14 GB/s per SM); this way 27 us, and 24 us with the column steps
    pipelined (``num_stages=3``; perf/NOTES.md)."""
    k = tl.arange(0, KP)[None, :]
    for s0 in tl.range(0, TB, RT):
        t = t0 + s0 + tl.arange(0, RT)
        t_ok = (t < t_end)[:, None]
        pair = t[:, None] * K + k  # [RT, KP]
        live = t_ok & (k < K)
        used = live & (tl.load(phys_ptr + pair, mask=live, other=-1) >= 0)
        w = tl.load(weights_ptr + pair, mask=used, other=0.0)
        rows = combine_ptr + pair.to(tl.int64)[:, :, None] * H
        for c0 in tl.range(0, RH, RC, num_stages=3):
            h = h0 + c0 + tl.arange(0, RC)
            y = tl.load(rows + h[None, None, :], mask=used[:, :, None] & (h < H), other=0.0)
            acc = tl.sum(w[:, :, None] * y.to(tl.float32), axis=1)  # [RT, RC]
            out = out_ptr + t.to(tl.int64)[:, None] * H + h[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok & (h < H))
