"""The expert GEMMs and the dispatch quantisation of the FP8 path (``MoEShape.fp8``): e4m3
operands with 128-wide block scales (``megakernel.fp8``), e4m3 products accumulated in fp32 and
scaled once per 128-column K block.

Shape legend: H hidden, I expert FFN width, L local slots, C receive rows, B = 128 (the scale
block), BM rows per tile.

- ``tile_gemm1_fp8``: one ``[BM, B]`` block of an expert's SwiGLU output from gathered e4m3 rows
  (``x [*, H]`` with scales ``[*, H/B]``) and ``w13 [L, 2I, H]`` (scales ``[L, 2I/B, H/B]``),
  quantised again per row over its 128 columns: e4m3 ``act [C, I]`` and scales ``[C, I/B]``.
- ``tile_down_fp8``: the fp32 ``[BM, B]`` block of ``act @ w2^T`` from e4m3 ``act`` and
  ``w2 [L, H, I]`` (scales ``[L, H/B, I/B]``).
- ``quantize_copy_rows``: token rows quantised per 128 columns on their way out: the dispatch
  put of the FP8 path (e4m3 rows and their scales into the destination's receive buffers).
- ``fp8_gemm1_kernel`` / ``fp8_down_kernel`` / ``fp8_quantize_kernel``: each alone over a grid,
  for the tests and the compile checks.

A column block is one scale block of the weights (BLOCK_N = B), so one scale per (tile row, K
block) from the activations and one scalar per K block from the weights scale each product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megakernel import shapes
from symm_mem.device import INTERPRET

# the host side's constants (megakernel.fp8), as constexprs
FP8_BLOCK = tl.constexpr(shapes.FP8_BLOCK)
E4M3_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)
# NOTE: the interpreter's fp32 -> e4m3 conversion loses a rounding carry into the exponent (1.98
# becomes 1.0, 31.8 becomes 16.0); there, and only there, values are rounded onto e4m3's grid in
# fp32 first, which that conversion then keeps exactly (compiled kernels convert with cvt.rn)
E4M3_PREROUND = tl.constexpr(INTERPRET)


@triton.jit
def _onto_e4m3_grid(v):
    """``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even (as ``cvt.rn`` and
    torch round), in fp32: 3 mantissa bits, subnormals spaced like the smallest normals (2^-9).
    Ties are common: a bf16 value has only 5 more mantissa bits."""
    mag = tl.abs(v)
    step = tl.exp2(tl.floor(tl.log2(tl.maximum(mag, 2.0**-6))) - 3.0)
    steps = mag / step
    down = tl.floor(steps)
    up = (steps - down > 0.5) | ((steps - down == 0.5) & (down % 2 == 1))
    return tl.where(v < 0, -1.0, 1.0) * tl.where(up, down + 1.0, down) * step


@triton.jit
def quantize_rows(h):
    """``h [BM, B]`` fp32 -> (e4m3 ``[BM, B]``, fp32 scales ``[BM]``): each row's largest
    magnitude maps to 448; an all-zero row gets scale 1 (``megakernel.fp8``'s rule)."""
    amax = tl.max(tl.abs(h), 1)
    scale = tl.where(amax > 0, amax / E4M3_MAX, 1.0)
    return _to_e4m3(h / scale[:, None]), scale


@triton.jit
def _to_e4m3(v):
    """``v`` (|v| <= 448) as e4m3, rounded to nearest, ties to even (see ``E4M3_PREROUND``)."""
    if E4M3_PREROUND:
        v = _onto_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def quantize_copy_rows(src_rows, out_rows, scale_rows, live, H: tl.constexpr):
    """``src_rows[i, :H]`` (``[N, 1]`` row pointers, any float type) quantised per 128 columns
    into e4m3 ``out_rows[i, :H]`` and fp32 ``scale_rows[i, :H / 128]`` where ``live[i]``
    (``[N, 1]``)."""
    c = tl.arange(0, FP8_BLOCK)[None, :]
    for g in tl.range(0, H // FP8_BLOCK):
        x = tl.load(src_rows + g * FP8_BLOCK + c, mask=live, other=0.0).to(tl.float32)
        q, scale = quantize_rows(x)
        tl.store(out_rows + g * FP8_BLOCK + c, q, mask=live)
        tl.store(scale_rows + g, scale[:, None], mask=live)


@triton.jit
def _scaled_gemm(
    a_ptrs, a_scale_ptrs, b_ptrs, b_scale_ptr, live, K: tl.constexpr, BLOCK_M: tl.constexpr,
    b_desc, n0, B_TMA: tl.constexpr,
):  # fmt: skip
    """``sum_k (a_k @ b_k) * a_scale[:, k] * b_scale[k]`` over the K blocks of 128 (the down
    projection's product): ``a_ptrs`` [BM, B] e4m3 row pointers, ``a_scale_ptrs`` [BM] (scales
    of block 0), ``b_ptrs`` [B, B] (a transposed view of one 128-row block of the weight),
    ``b_scale_ptr`` its block-0 scale. ``B_TMA``: the weight blocks come from ``b_desc`` (rows
    ``[n0, n0 + B)``) instead of ``b_ptrs``."""
    acc = tl.zeros([BLOCK_M, FP8_BLOCK], dtype=tl.float32)
    for kb in tl.range(0, K // FP8_BLOCK):
        a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        if B_TMA:
            b = b_desc.load([n0, kb * FP8_BLOCK]).T
        else:
            b = tl.load(b_ptrs)
        part = tl.dot(a, b)
        a_scale = tl.load(a_scale_ptrs + kb, mask=live, other=0.0)
        acc += part * (a_scale * tl.load(b_scale_ptr + kb))[:, None]
        a_ptrs += FP8_BLOCK
        b_ptrs += FP8_BLOCK
    return acc


@triton.jit
def _swiglu_half(
    a_ptrs, a_scales, live, w13_ptr, w13_scale_ptr, w13_desc, local, n_block, half,
    H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, B_TMA: tl.constexpr,
):  # fmt: skip
    """fp32 ``silu(x @ gate^T) * (x @ up^T)`` of columns ``n_block B + half B/2 + [0, B/2)``
    (half of scale block ``n_block``), from the gathered e4m3 A rows ``a_ptrs`` (k block 0) and
    their scales."""
    KB: tl.constexpr = H // FP8_BLOCK
    HALF: tl.constexpr = FP8_BLOCK // 2
    kk = tl.arange(0, FP8_BLOCK)
    n = n_block * FP8_BLOCK + half * HALF + tl.arange(0, HALF)  # gate rows; up rows I further
    w = w13_ptr + tl.cast(local, tl.int64) * (2 * I * H)
    gate_ptrs = w + n.to(tl.int64)[None, :] * H + kk[:, None]  # [B(k), B/2(n)]: w^T
    up_ptrs = gate_ptrs + I * H
    scales = w13_scale_ptr + tl.cast(local, tl.int64) * (2 * I // FP8_BLOCK) * KB
    gate_scales = scales + n_block * KB
    up_scales = scales + (I // FP8_BLOCK + n_block) * KB
    n0 = tl.cast(local, tl.int32) * (2 * I) + n_block * FP8_BLOCK + half * HALF  # (B_TMA)
    gate = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    for kb in tl.range(0, KB):  # one A block feeds both products
        a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        a_scale = tl.load(a_scales + kb, mask=live, other=0.0)
        if B_TMA:
            gate_b = w13_desc.load([n0, kb * FP8_BLOCK]).T
            up_b = w13_desc.load([n0 + I, kb * FP8_BLOCK]).T
        else:
            gate_b = tl.load(gate_ptrs)
            up_b = tl.load(up_ptrs)
        gate += tl.dot(a, gate_b) * (a_scale * tl.load(gate_scales + kb))[:, None]
        up += tl.dot(a, up_b) * (a_scale * tl.load(up_scales + kb))[:, None]
        a_ptrs += FP8_BLOCK
        gate_ptrs += FP8_BLOCK
        up_ptrs += FP8_BLOCK
    return gate * tl.sigmoid(gate) * up


@triton.jit
def tile_gemm1_fp8(
    x_ptr,  # [*, H] e4m3 rows (the receive buffer)
    x_scale_ptr,  # [*, H / B] fp32
    src_ptr,  # [C] int32: the row of x holding each row's data
    w13_ptr,  # [L, 2I, H] e4m3: gate rows, then up rows
    w13_scale_ptr,  # [L, 2I / B, H / B] fp32
    act_ptr,  # [C, I] e4m3 out
    act_scale_ptr,  # [C, I / B] fp32 out
    local,
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    w13_desc=None,  # with B_TMA: a [B / 2, B] block descriptor of w13 as [L * 2I, H]
    B_TMA: tl.constexpr = False,
):
    """Columns ``[n_block B, (n_block + 1) B)`` of ``silu(x @ gate^T) * (x @ up^T)`` for rows
    ``[row0, row0 + rows)`` (A row r is ``x[src[r]]``), quantised per row: e4m3 into ``act`` and
    one scale per row into ``act_scale[:, n_block]``. ``B_TMA``: the weight blocks come by TMA
    (A rows, gathered, cannot).

    NOTE: in two halves of B/2 columns, the A rows read once per half: a block-scaled product
    needs a second accumulator for each k block's partial sum, and gate and up at once over B
    columns took 4 x 64 fp32 registers a thread (8 warps, BM 128): ptxas spilled about 100
    values in every k step. The halves take half that; the first half's output waits in 32."""
    KB: tl.constexpr = H // FP8_BLOCK
    HALF: tl.constexpr = FP8_BLOCK // 2
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    src = tl.load(src_ptr + row0 + r, mask=live, other=0).to(tl.int64)
    a_ptrs = x_ptr + src[:, None] * H + tl.arange(0, FP8_BLOCK)[None, :]
    a_scales = x_scale_ptr + src * KB
    w = (w13_ptr, w13_scale_ptr, w13_desc, local, n_block)
    low = _swiglu_half(a_ptrs, a_scales, live, *w, 0, H, I, BLOCK_M, B_TMA)
    high = _swiglu_half(a_ptrs, a_scales, live, *w, 1, H, I, BLOCK_M, B_TMA)
    # one scale per row over the whole 128-column block (both halves)
    amax = tl.maximum(tl.max(tl.abs(low), 1), tl.max(tl.abs(high), 1))
    scale = tl.where(amax > 0, amax / E4M3_MAX, 1.0)
    out_rows = (row0 + r).to(tl.int64)
    cols = n_block * FP8_BLOCK + tl.arange(0, HALF)
    out = act_ptr + out_rows[:, None] * I + cols[None, :]
    tl.store(out, _to_e4m3(low / scale[:, None]), mask=live[:, None])
    tl.store(out + HALF, _to_e4m3(high / scale[:, None]), mask=live[:, None])
    tl.store(act_scale_ptr + out_rows * (I // FP8_BLOCK) + n_block, scale, mask=live)


@triton.jit
def tile_down_fp8(
    act_ptr,  # [C, I] e4m3
    act_scale_ptr,  # [C, I / B] fp32
    w2_ptr,  # [L, H, I] e4m3
    w2_scale_ptr,  # [L, H / B, I / B] fp32
    local,
    row0,
    rows,
    n_block,
    H: tl.constexpr,
    I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    w2_desc=None,  # with B_TMA: a [B, B] block descriptor of w2 as [L * H, I]
    B_TMA: tl.constexpr = False,
):
    """The fp32 ``[BM, B]`` block ``act[row0 : row0 + rows] @ w2[local, n_block B : +B]^T``
    (rows past ``rows`` are 0). ``B_TMA``: the w2 blocks come by TMA."""
    KB: tl.constexpr = I // FP8_BLOCK
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    rows64 = (row0 + r).to(tl.int64)
    kk = tl.arange(0, FP8_BLOCK)
    a_ptrs = act_ptr + rows64[:, None] * I + kk[None, :]
    n = n_block * FP8_BLOCK + kk
    w2 = w2_ptr + tl.cast(local, tl.int64) * (H * I)
    b_ptrs = w2 + n.to(tl.int64)[None, :] * I + kk[:, None]
    scales = w2_scale_ptr + tl.cast(local, tl.int64) * (H // FP8_BLOCK) * KB + n_block * KB
    n0 = tl.cast(local, tl.int32) * H + n_block * FP8_BLOCK
    return _scaled_gemm(
        a_ptrs, act_scale_ptr + rows64 * KB, b_ptrs, scales, live, I, BLOCK_M, w2_desc, n0, B_TMA
    )


@triton.jit
def fp8_gemm1_kernel(
    x, x_scale, src, w13, w13_scale, act, act_scale, local, rows, H: tl.constexpr,
    I: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``tile_gemm1_fp8`` over a grid (row tiles of ``rows``, I / 128 column blocks)."""
    row0 = tl.program_id(0) * BLOCK_M
    n_block = tl.program_id(1)
    tile_gemm1_fp8(
        x, x_scale, src, w13, w13_scale, act, act_scale, local, row0, rows - row0, n_block, H, I,
        BLOCK_M,
    )  # fmt: skip


@triton.jit
def fp8_down_kernel(
    act, act_scale, w2, w2_scale, out, local, rows, H: tl.constexpr, I: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``tile_down_fp8`` over a grid (row tiles of ``rows``, H / 128 column blocks), fp32 out
    ``[rows, H]``."""
    row0 = tl.program_id(0) * BLOCK_M
    n_block = tl.program_id(1)
    acc = tile_down_fp8(
        act, act_scale, w2, w2_scale, local, row0, rows - row0, n_block, H, I, BLOCK_M
    )
    r = row0 + tl.arange(0, BLOCK_M)
    c = n_block * FP8_BLOCK + tl.arange(0, FP8_BLOCK)
    tl.store(out + r.to(tl.int64)[:, None] * H + c[None, :], acc, mask=(r < rows)[:, None])


@triton.jit
def fp8_quantize_kernel(x, q, q_scale, rows, H: tl.constexpr, BLOCK_M: tl.constexpr):
    """``quantize_copy_rows`` of ``x [rows, H]`` over row tiles: e4m3 ``q`` and ``q_scale``."""
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    live = r < rows
    quantize_copy_rows(x + r * H, q + r * H, q_scale + r * (H // FP8_BLOCK), live, H)
