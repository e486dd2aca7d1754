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
  through ``recv_src`` (so no resolve copy is needed), bf16/fp16 in, fp32 accumulate, with the
  SwiGLU epilogue ``silu(x @ w_gate^T) * (x @ w_up^T)`` or the raw ``x @ w13^T``.
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
):
    """Put units ``send_units[start : start + count]`` (all bound for rank ``dst``)."""
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
    src = x_ptr + token.to(tl.int64)[:, None] * H
    out = recv_x_dst + row.to(tl.int64)[:, None] * H
    for h0 in tl.range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :]
        m = live[:, None] & (h < H)
        tl.store(out + h, tl.load(src + h, mask=m), mask=m)


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
        for h0 in tl.range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)[None, :]
            m = moved & (h < H)
            tl.store(out_rows + h, tl.load(src_rows + h, mask=m), mask=m)


@triton.jit
def tile_expert_gemm(
    recv_x_ptr,  # [C, H] this rank's receive rows (this call's parity)
    recv_src_ptr,  # [C] row holding each row's data
    w13_ptr,  # [L, 2I, H] gate rows, then up rows, of every local slot
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
):
    """Output columns ``[n_block * BLOCK_N, +BLOCK_N)`` of rows ``[row0, row0 + rows)``.

    NOTE: H must be a multiple of BLOCK_K (checked on the host); rows past ``rows`` read row 0's
    source harmlessly (masked to 0) and are not stored.
    """
    WIDTH: tl.constexpr = I if SWIGLU else 2 * I
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    src = tl.load(recv_src_ptr + row0 + r, mask=live, other=0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = recv_x_ptr + src[:, None] * H + kk[None, :]
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (n < WIDTH)[None, :]
    # B = w^T as a [BLOCK_K, BLOCK_N] view of the [2I, H] weight (H contiguous)
    w = w13_ptr + tl.cast(local, tl.int64) * (2 * I * H)
    gate_ptrs = w + n.to(tl.int64)[None, :] * H + kk[:, None]
    up_ptrs = gate_ptrs + I * H
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
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
