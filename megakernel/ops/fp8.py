"""The expert GEMMs and the dispatch quantisation of the FP8 path (``MoEShape.fp8``): e4m3
operands with 128-wide block scales (``megakernel.fp8``), e4m3 products accumulated in fp32 and
scaled once per 128-column K block.

Shape legend: H hidden, I expert FFN width, L local slots, C receive rows, B = 128 (the scale
block), BM rows per tile.

- ``tile_gemm1_fp8``: one ``[BM, B]`` block of an expert's SwiGLU output from gathered e4m3 rows
  (``x [*, H]`` with scales ``[*, H/B]``) and ``w13 [L, 2I, H]`` (scales ``[L, 2I/B, H/B]``),
  quantised again per row over its 128 columns: e4m3 ``act [C, I]`` and scales ``[C, I/B]``.
- ``tile_down_fp8``: the fp32 ``[BM, BN]`` block of ``act @ w2^T`` (BN = B or 2 B) from e4m3
  ``act`` and ``w2 [L, H, I]`` (scales ``[L, H/B, I/B]``).
- ``quantize_copy_rows``: token rows quantised per 128 columns on their way out: the dispatch
  put of the FP8 path (e4m3 rows and their scales into the destination's receive buffers).
- ``fp8_gemm1_kernel`` / ``fp8_down_kernel`` / ``fp8_quantize_kernel``: each alone over a grid,
  for the tests and the compile checks.

NOTE (running scale): K block k's product counts ``s_k = a_scale[row, k] * w_scale[col, k]``
times. The accumulator is kept in units of the current block's scale: before block k,
``acc *= s_(k-1) / s_k``, then ``a_k @ w_k`` is added (by the MMAs in place, or as a fresh
partial in one FMA, ``acc * (s_(k-1) / s_k) + p``: the PROMOTE and WAIT notes), and the last
unit multiplies out at the end; an fp32 rounding per block (a relative 6e-8). In place, a
product needs no registers beside its accumulator (a partial beside each of GEMM1's gate and up
took four 64-register tiles a thread and ptxas spilled; splitting the columns made every task
load its A rows twice). The promoted partial takes one more tile, made one product at a time;
there the plain ``acc += p * s_k`` compiled to spills in the k loops (sm_90, dsv3) and the
running form does not.

NOTE (PROMOTE): Hopper's e4m3 MMAs add into their fp32 accumulator keeping too few bits (about
14, as DeepSeek-V3's report measured), dropping the rest, so an error that grows with k: on
an H100 the dsv3 layer (H = 7168) came out 1.52% from ``moe_fp8_ref`` with the whole k loop in
one accumulator, against 0.6% in the interpreter. ``tl.dot``'s ``max_num_imprecise_acc`` bounds
the chain: the MMAs of ``PROMOTE_K`` k elements sum into a fresh partial, which is added to
``acc`` in full fp32 (DeepSeek's 128-element promotion). ``KernelConfig.fp8_promote_k`` = 0
keeps the old chain for comparison. The interpreter's dot is exact either way.

NOTE (WAIT): Triton lowers ``max_num_imprecise_acc`` by adding each partial to the accumulator
right after its MMAs, before their group is committed and waited for. ptxas answers an
accumulator read inside an MMA group by making every MMA of the kernel wait for the one before
(its advisory C7514; four waits a k step, and the tensor pipe drained between k32 MMAs). At
``PROMOTE_K`` = 128, one k block, ``_scaled_mma`` therefore takes the block's product alone
(``tl.dot(a, b)``: a fresh chain of four MMAs) and adds it to the rescaled accumulator in
its own FMA, which Triton places after the group's wait. 32 and 64 still take Triton's path.

NOTE (STEP): with the MMAs waited for before their adds (WAIT), a k step runs one product's
MMAs, then its adds and everything else, then the next product's MMAs: whatever the step
issues besides the MMAs keeps the tensor cores idle. Two forms cost instructions there
(sm_90, dsv3): fp32 division (``unit / scale``) compiles to its full-range path, a reciprocal
with tests and rescalings for huge and tiny divisors, where the unit change needs only the
fast one (``div.approx``: 2 ulp for divisors under 2^126, which a block's scale stays under for
any finite bf16 row and weight scales under 100; a quotient under 2^-126, two blocks' scales
2^126 apart, flushes to 0. A unit change then costs the sum a relative 2.4e-7 at most, 56 of
them (dsv3's H) 1.3e-5, against FP8's 1e-2); and ``tl.fma(acc,
rescale, partial)`` made ptxas write the sum into the partial's registers and copy half of
up's accumulator back every step. ``acc * rescale + partial`` (contracted to the same FMA)
keeps it in place: GEMM1's step 373 -> 321 instructions, the down step's 367 -> 319.

NOTE (SCALES): a k step's scales (one per row, one per weight block) are plain loads, which
Triton's pipeliner leaves in place: loaded where they are used, each step waited a global
load's latency (the second product's weight scale after the first product's MMAs, so with
nothing in flight to hide it) between MMAs. ``_scaled_products`` loads them a step ahead, in
registers carried over the loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from megakernel import shapes
from megakernel.ops.activation import ACT_SILU, bias_row, glu
from symm_mem.device import INTERPRET

# the host side's constants (megakernel.fp8), as constexprs
FP8_BLOCK = tl.constexpr(shapes.FP8_BLOCK)
E4M3_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)
# NOTE: the interpreter's fp32 -> e4m3 conversion loses a rounding carry into the exponent (1.98
# becomes 1.0, 31.8 becomes 16.0); there, and only there, values are rounded onto e4m3's grid in
# fp32 first, which that conversion then keeps exactly (compiled kernels convert with cvt.rn)
E4M3_PREROUND = tl.constexpr(INTERPRET)
# the unit change's fast reciprocal is an extern (libdevice) call, which the interpreter lacks
FAST_DIV = tl.constexpr(not INTERPRET)
# the smallest scale a running-scale product divides by: fp32's smallest normal (the layer takes
# only positive weight scales, and a row's scale is positive, so only an underflow meets it)
SCALE_FLOOR = tl.constexpr(2.0**-126)


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
def quantize_copy_rows(
    src_rows, out_rows, scale_rows, live, H: tl.constexpr, N: tl.constexpr, STEP: tl.constexpr
):
    """``src_rows[i, :H]`` (``[N, 1]`` row pointers, any float type) quantised per 128 columns
    into e4m3 ``out_rows[i, :H]`` and fp32 ``scale_rows[i, :H / 128]`` where ``live[i]``
    (``[N, 1]``); ``STEP`` columns (a power-of-two multiple of 128) a step: each step's load is
    as wide as the bf16 copy's, so a row takes H / STEP round trips, not H / 128."""
    G: tl.constexpr = STEP // FP8_BLOCK
    c = tl.arange(0, STEP)[None, :]
    g = tl.arange(0, G)[None, :]
    for h0 in tl.range(0, H, STEP):
        in_row = live & (h0 + c < H)
        x = tl.load(src_rows + h0 + c, mask=in_row, other=0.0).to(tl.float32)
        q, scale = quantize_rows(tl.reshape(x, [N * G, FP8_BLOCK]))
        tl.store(out_rows + h0 + c, tl.reshape(q, [N, STEP]), mask=in_row)
        group = h0 // FP8_BLOCK + g
        tl.store(
            scale_rows + group, tl.reshape(scale, [N, G]), mask=live & (group < H // FP8_BLOCK)
        )


@triton.jit
def _scaled_mma(a, b, acc, unit, a_scale, b_scale, PROMOTE_K: tl.constexpr):
    """One K block of a block-scaled product in running-scale units (see the module's note):
    ``acc`` (``[BM, N]``, held in units of ``unit [BM]``) re-expressed in units of this block's
    scale, its rows' ``a_scale [BM]`` times the weight block's ``b_scale`` (at least
    ``SCALE_FLOOR``: the next step divides by it), then ``a @ b`` added: in partials of
    ``PROMOTE_K`` k elements, each added to ``acc`` in fp32 (0: in place; see the PROMOTE
    and WAIT notes). Returns the accumulator and its new unit. The division and the add's form
    are the STEP note's."""
    scale = tl.maximum(a_scale * b_scale, SCALE_FLOOR)
    if FAST_DIV:
        rescale = libdevice.fast_dividef(unit, scale)[:, None]
    else:
        rescale = (unit / scale)[:, None]
    if PROMOTE_K == 0:
        acc = tl.dot(a, b, acc * rescale)
    elif PROMOTE_K == FP8_BLOCK:  # the block's product alone, then added (the WAIT note)
        acc = acc * rescale + tl.dot(a, b)  # (not tl.fma(acc, rescale, p): the STEP note)
    else:
        acc = tl.dot(a, b, acc * rescale, max_num_imprecise_acc=PROMOTE_K)
    return acc, scale


@triton.jit
def _scaled_products(
    a_ptrs, a_scales, live, b_ptrs, b_step, rows_left, scales, scales_step, b_desc, n0, n_step,
    KB: tl.constexpr, BLOCK_M: tl.constexpr, B_TMA: tl.constexpr, TWO: tl.constexpr,
    PROMOTE_K: tl.constexpr,
):  # fmt: skip
    """One or two (``TWO``) block-scaled products of the same e4m3 A rows, each over one 128-row
    weight block, accumulated together in running-scale units, one load of each A block for both:
    ``a_ptrs`` the rows' k block 0 ``[BM, B]`` (``live [BM]``), ``a_scales`` their scales;
    the first weight block by TMA at rows ``[n0, n0 + B)`` of ``b_desc``, or by pointers
    ``b_ptrs`` (a ``[B(k), B(n)]`` view of w^T), with its block scales at ``scales + kb``; the
    second ``n_step`` rows (``b_step`` elements, scales ``scales_step``) further. Weight rows from
    ``rows_left`` on (counted from the first block's first) do not exist: their pointer loads
    and scales are masked (TMA reads whatever lies there; those columns are junk either way).
    ``PROMOTE_K``: see ``_scaled_mma``. Returns both fp32 products (the second 0 without
    ``TWO``)."""
    first = tl.zeros([BLOCK_M, FP8_BLOCK], dtype=tl.float32)
    second = tl.zeros([BLOCK_M, FP8_BLOCK], dtype=tl.float32)
    first_unit = tl.full([BLOCK_M], 1.0, tl.float32)
    second_unit = tl.full([BLOCK_M], 1.0, tl.float32)
    kk = tl.arange(0, FP8_BLOCK)
    second_there = n_step < rows_left
    # the scales of k block 0, then each block's loaded one step ahead (see the SCALES note)
    a_scale_next = tl.load(a_scales, mask=live, other=1.0)
    w_first_next = tl.load(scales)
    w_second_next = tl.load(scales + scales_step, mask=TWO and second_there, other=1.0)
    for kb in tl.range(0, KB):
        a_scale, w_first, w_second = a_scale_next, w_first_next, w_second_next
        ahead = tl.minimum(kb + 1, KB - 1)  # the last step loads its own again: no mask
        a_scale_next = tl.load(a_scales + ahead, mask=live, other=1.0)
        w_first_next = tl.load(scales + ahead)
        if TWO:
            w_second_next = tl.load(scales + scales_step + ahead, mask=second_there, other=1.0)
        a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        if B_TMA:
            b = b_desc.load([n0, kb * FP8_BLOCK]).T
        else:
            b = tl.load(b_ptrs, mask=(kk < rows_left)[None, :], other=0.0)
        first, first_unit = _scaled_mma(a, b, first, first_unit, a_scale, w_first, PROMOTE_K)
        if TWO:
            if B_TMA:
                b = b_desc.load([n0 + n_step, kb * FP8_BLOCK]).T
            else:
                b = tl.load(b_ptrs + b_step, mask=(kk + n_step < rows_left)[None, :], other=0.0)
            second, second_unit = _scaled_mma(
                a, b, second, second_unit, a_scale, w_second, PROMOTE_K
            )
        a_ptrs += FP8_BLOCK
        b_ptrs += FP8_BLOCK
    return first * first_unit[:, None], second * second_unit[:, None]


@triton.jit
def _swiglu_block(
    a_ptrs, a_scales, live, w13_ptr, w13_scale_ptr, w13_desc, local, n_block, b13_ptr,
    H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, B_TMA: tl.constexpr,
    PROMOTE_K: tl.constexpr, ACT: tl.constexpr, BIAS: tl.constexpr,
):  # fmt: skip
    """fp32 ``silu(x @ gate^T) * (x @ up^T)`` (``ACT``: ``glu``'s, with ``b13``'s biases added
    to gate and up where ``BIAS``) of columns ``n_block B + [0, B)`` (scale block ``n_block``)
    from the gathered e4m3 A rows ``a_ptrs`` (k block 0) and their scales: gate and up
    accumulate together, each in running-scale units, from one load of each A block."""
    KB: tl.constexpr = H // FP8_BLOCK
    kk = tl.arange(0, FP8_BLOCK)
    n = n_block * FP8_BLOCK + kk  # gate rows; up rows I further
    w = w13_ptr + tl.cast(local, tl.int64) * (2 * I * H)
    gate_ptrs = w + n.to(tl.int64)[None, :] * H + kk[:, None]  # [B(k), B(n)]: w^T
    scales = w13_scale_ptr + tl.cast(local, tl.int64) * (2 * I // FP8_BLOCK) * KB
    gate_scales = scales + n_block * KB  # up's are I / B scale rows further
    n0 = tl.cast(local, tl.int32) * (2 * I) + n_block * FP8_BLOCK  # (B_TMA)
    gate, up = _scaled_products(
        a_ptrs, a_scales, live, gate_ptrs, I * H, 2 * I, gate_scales, (I // FP8_BLOCK) * KB,
        w13_desc, n0, I, KB, BLOCK_M, B_TMA, True, PROMOTE_K,
    )  # fmt: skip
    if BIAS:
        gate += bias_row(b13_ptr, local, n, 2 * I)
        up += bias_row(b13_ptr, local, I + n, 2 * I)
    return glu(gate, up, ACT)


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
    w13_desc=None,  # with B_TMA: a [B, B] block descriptor of w13 as [L * 2I, H]
    B_TMA: tl.constexpr = False,
    PROMOTE_K: tl.constexpr = FP8_BLOCK,  # KernelConfig.fp8_promote_k
    b13_ptr=None,  # BIAS: [L, 2I] fp32 gate biases, then up biases
    ACT: tl.constexpr = ACT_SILU,  # megakernel.ops.activation
    BIAS: tl.constexpr = False,
):
    """Columns ``[n_block B, (n_block + 1) B)`` of ``silu(x @ gate^T) * (x @ up^T)`` (or
    ``ACT``'s activation, with ``b13`` added to gate and up where ``BIAS``) for rows
    ``[row0, row0 + rows)`` (A row r is ``x[src[r]]``), quantised per row: e4m3 into ``act`` and
    one scale per row into ``act_scale[:, n_block]``. ``B_TMA``: the weight blocks come by TMA
    (A rows, gathered, cannot)."""
    KB: tl.constexpr = H // FP8_BLOCK
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    src = tl.load(src_ptr + row0 + r, mask=live, other=0).to(tl.int64)
    a_ptrs = x_ptr + src[:, None] * H + tl.arange(0, FP8_BLOCK)[None, :]
    h = _swiglu_block(
        a_ptrs, x_scale_ptr + src * KB, live, w13_ptr, w13_scale_ptr, w13_desc, local, n_block,
        b13_ptr, H, I, BLOCK_M, B_TMA, PROMOTE_K, ACT, BIAS,
    )  # fmt: skip
    q, scale = quantize_rows(h)
    out_rows = (row0 + r).to(tl.int64)
    cols = n_block * FP8_BLOCK + tl.arange(0, FP8_BLOCK)
    tl.store(act_ptr + out_rows[:, None] * I + cols[None, :], q, mask=live[:, None])
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
    BLOCK_N: tl.constexpr,  # B or 2 B: one weight scale block, or two side by side
    w2_desc=None,  # with B_TMA: a [B, B] block descriptor of w2 as [L * H, I]
    B_TMA: tl.constexpr = False,
    PROMOTE_K: tl.constexpr = FP8_BLOCK,  # KernelConfig.fp8_promote_k
):
    """The fp32 ``[BM, BLOCK_N]`` block ``act[row0 : row0 + rows] @ w2[local, n_block BLOCK_N :
    +BLOCK_N]^T`` (rows past ``rows`` are 0; columns past H are junk, which the caller drops).
    ``BLOCK_N = 2 B``: two products of B columns, one per weight scale block, each with its own
    running-scale accumulator, whose units are then per row only (a multiply an element a k
    step, not two). ``B_TMA``: the w2 blocks come by TMA."""
    KB: tl.constexpr = I // FP8_BLOCK
    WIDE: tl.constexpr = BLOCK_N == 2 * FP8_BLOCK
    r = tl.arange(0, BLOCK_M)
    live = r < rows
    rows64 = (row0 + r).to(tl.int64)
    kk = tl.arange(0, FP8_BLOCK)
    a_ptrs = act_ptr + rows64[:, None] * I + kk[None, :]
    a_scales = act_scale_ptr + rows64 * KB
    n_lo = n_block * BLOCK_N  # the first column; the second product's is n_lo + B
    n = n_lo + kk
    w2 = w2_ptr + tl.cast(local, tl.int64) * (H * I)
    b_ptrs = w2 + n.to(tl.int64)[None, :] * I + kk[:, None]  # [B(k), B(n)]: w2^T
    w_scales = w2_scale_ptr + (tl.cast(local, tl.int64) * (H // FP8_BLOCK) + n_lo // FP8_BLOCK) * KB
    n0 = tl.cast(local, tl.int32) * H + n_lo  # (B_TMA)
    out, hi = _scaled_products(
        a_ptrs, a_scales, live, b_ptrs, FP8_BLOCK * I, H - n_lo, w_scales, KB, w2_desc, n0,
        FP8_BLOCK, KB, BLOCK_M, B_TMA, WIDE, PROMOTE_K,
    )  # fmt: skip
    if WIDE:  # [out | hi]: joined as [BM, B, 2], then the pair axis moved ahead of the columns
        out = tl.reshape(tl.permute(tl.join(out, hi), (0, 2, 1)), [BLOCK_M, BLOCK_N])
    return out


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
        act, act_scale, w2, w2_scale, local, row0, rows - row0, n_block, H, I, BLOCK_M, FP8_BLOCK
    )
    r = row0 + tl.arange(0, BLOCK_M)
    c = n_block * FP8_BLOCK + tl.arange(0, FP8_BLOCK)
    tl.store(out + r.to(tl.int64)[:, None] * H + c[None, :], acc, mask=(r < rows)[:, None])


@triton.jit
def fp8_quantize_kernel(
    x, q, q_scale, rows, H: tl.constexpr, BLOCK_M: tl.constexpr, STEP: tl.constexpr = FP8_BLOCK
):
    """``quantize_copy_rows`` of ``x [rows, H]`` over row tiles: e4m3 ``q`` and ``q_scale``."""
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    live = r < rows
    quantize_copy_rows(x + r * H, q + r * H, q_scale + r * (H // FP8_BLOCK), live, H, BLOCK_M, STEP)
