"""The FP8 layer's GEMM1 task in Gluon, against the megakernel's own (``tile_gemm1_fp8``): one
[128 rows, 128 columns of I] block of ``silu(x @ gate^T) * (x @ up^T)``, its A rows gathered from
the receive buffer through ``src``, gate and up weight blocks by TMA, block scales, the result
quantised again per row (e4m3 ``act`` and one scale per row). A study beside
``perf.studies.gemm_gluon``, whose plain k loops it takes into the task's shape.

Both run over a grid of (row tile, column block) programs; tile t holds the rows of expert
``t % L`` (``--rows-per-expert`` of them), so each tile streams its expert's weights, as the
layer's tiles do when every expert has about one tile of rows (dsv3 at T = 4096).

- ``triton``: a kernel around ``megakernel.ops.fp8.tile_gemm1_fp8`` itself, weights by TMA
  (``gemm1_tma``), 8 warps, 3 stages: the megakernel's GEMM1 task code.
- ``specialised``: Gluon: a loader partition (4 warps) gathers the A rows with ``cp.async``
  (their completion arrives on the slot's barrier) and brings gate and up by TMA into a ring
  of slots; two consumer warpgroups of 64 rows take gate's product, scale it in, then up's,
  and hand the slot back. Registers bound the consumers: gate's and up's accumulators and one
  product (192 a thread of 232) leave no room for a second product in flight, so the adds are
  not in a product's shadow; the two warpgroups, meeting only at barriers, overlap each
  other's adds and MMAs instead. The epilogue is the task's: SwiGLU, then each row's 128
  values quantised.

``python -m perf.studies.gemm1_gluon`` checks both against a dequantised fp32 reference and
each other, then times them alternated over rounds (one Hopper GPU).
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

from megakernel.fp8 import (
    dequantize_token_groups,
    dequantize_weight_blocks,
    quantize_experts,
    quantize_token_groups,
)
from megakernel.ops.fp8 import tile_gemm1_fp8
from perf.studies.gemm_gluon import CONSUMER_REGS, LOADER_REGS, WS_MAXNREG, time_variants

BLOCK = 128  # scale block = k step = the task's columns = the tile's rows
B = gl.constexpr(BLOCK)
E4M3_MAX = gl.constexpr(torch.finfo(torch.float8_e4m3fn).max)
LOADER_WARPS = gl.constexpr(4)
KERNELS = ("triton", "specialised")


@triton.jit
def gemm1_triton(x, x_scale, src, w13, w13_scale, w13_desc, act, act_scale, rows_per_expert,
                 L, H: tl.constexpr, I: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    tile_gemm1_fp8(
        x, x_scale, src, w13, w13_scale, act, act_scale, tile % L, tile * 128,
        rows_per_expert, tl.program_id(1), H, I, 128, w13_desc, B_TMA=True,
    )  # fmt: skip


@gluon.jit
def _loader(x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act, act_scale,
            row0, rows, local, n_block, H: gl.constexpr, I: gl.constexpr):  # fmt: skip
    """Each k block's A rows gathered by ``cp.async`` and its gate and up blocks by TMA into the
    next free slot; the slot's ready barrier completes when the TMA bytes have landed and every
    loader thread's copies have (``ready`` counts the one expect and one arrive a thread)."""
    stages: gl.constexpr = a_s.type.shape[0]
    nbytes: gl.constexpr = 2 * w_desc.block_type.nbytes
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [gl.num_warps(), 1], [1, 0])
    r = gl.arange(0, B, layout=gl.SliceLayout(1, rows_layout))
    c = gl.arange(0, B, layout=gl.SliceLayout(0, rows_layout))
    live = r < rows
    at = gl.load(src + row0 + r, mask=live, other=0).to(gl.int64) * H
    ptrs = x + at[:, None] + c[None, :]
    gate_row = local * (2 * I) + n_block * B
    for kb in range(H // B):
        s = kb % stages
        mbarrier.wait(empty.index(s), ((kb // stages) & 1) ^ 1)  # new: phase 1 done
        mbarrier.expect(ready.index(s), nbytes)
        tma.async_copy_global_to_shared(w_desc, [gate_row, kb * B], ready.index(s), g_s.index(s))
        tma.async_copy_global_to_shared(
            w_desc, [gate_row + I, kb * B], ready.index(s), u_s.index(s)
        )
        async_copy.async_copy_global_to_shared(a_s.index(s), ptrs + kb * B, mask=live[:, None])
        async_copy.mbarrier_arrive(ready.index(s), increment_count=False)


@gluon.jit
def _consumer(x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act, act_scale,
              row0, rows, local, n_block, H: gl.constexpr, I: gl.constexpr,
              HALF: gl.constexpr):  # fmt: skip
    """Rows ``[64 HALF, 64 HALF + 64)`` of the tile: gate's and up's products a k block, each
    waited for and scaled in, then SwiGLU and the rows quantised."""
    stages: gl.constexpr = a_s.type.shape[0]
    KB: gl.constexpr = H // B
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, B, 32]
    )
    r = HALF * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
    live = r < rows
    x_scales = x_scale + gl.load(src + row0 + r, mask=live, other=0).to(gl.int64) * KB
    w_scales = w13_scale + local * (2 * I // B) * KB + n_block * KB  # gate's; up's I / B rows on
    gate = gl.zeros([64, B], gl.float32, layout=mma)
    up = gl.zeros_like(gate)
    p = gl.zeros_like(gate)  # each product's registers, the last one's as its (unread) input
    for kb in range(KB):
        s = kb % stages
        mbarrier.wait(ready.index(s), (kb // stages) & 1)
        fence_async_shared()  # the cp.async rows (generic proxy) before the MMAs read them
        a = a_s.index(s).slice(HALF * 64, 64)
        sa = gl.load(x_scales + kb, mask=live, other=1.0)
        p = warpgroup_mma(a, g_s.index(s).permute((1, 0)), p, use_acc=False, is_async=True)
        p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
        gate += p * (sa * gl.load(w_scales + kb))[:, None]
        p = warpgroup_mma(a, u_s.index(s).permute((1, 0)), p, use_acc=False, is_async=True)
        p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
        mbarrier.arrive(empty.index(s), count=1)
        up += p * (sa * gl.load(w_scales + (I // B) * KB + kb))[:, None]
    h = gate * (1.0 / (1.0 + gl.exp(-gate))) * up
    amax = gl.max(gl.abs(h), axis=1)
    scale = gl.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = (h / scale[:, None]).to(gl.float8e4nv)
    out = (row0 + r).to(gl.int64)
    c = n_block * B + gl.arange(0, B, layout=gl.SliceLayout(0, mma))
    gl.store(act + out[:, None] * I + c[None, :], q, mask=live[:, None])
    gl.store(act_scale + out * (I // B) + n_block, scale, mask=live)


@gluon.jit
def _consumer_low(x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act,
                  act_scale, row0, rows, local, n_block, H: gl.constexpr,
                  I: gl.constexpr):  # fmt: skip
    _consumer(x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act, act_scale,
              row0, rows, local, n_block, H, I, 0)  # fmt: skip


@gluon.jit
def _consumer_high(x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act,
                   act_scale, row0, rows, local, n_block, H: gl.constexpr,
                   I: gl.constexpr):  # fmt: skip
    _consumer(x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act, act_scale,
              row0, rows, local, n_block, H, I, 1)  # fmt: skip


@gluon.jit
def gemm1_specialised(x, x_scale, src, w_desc, w13_scale, act, act_scale, rows_per_expert, L,
                      H: gl.constexpr, I: gl.constexpr, STAGES: gl.constexpr,
                      num_warps: gl.constexpr):  # fmt: skip
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    tile = gl.program_id(0)
    n_block = gl.program_id(1)
    row0 = tile * B
    rows = rows_per_expert
    local = tile % L
    a_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, B, B], w_desc.layout)
    g_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, B, B], w_desc.layout)
    u_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, B, B], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1 + LOADER_WARPS * 32)
        mbarrier.init(empty.index(i), count=2)
    args = (x, src, w_desc, a_s, g_s, u_s, ready, empty, w13_scale, x_scale, act, act_scale,
            row0, rows, local, n_block, H, I)  # fmt: skip
    gl.warp_specialize(
        [(_consumer_low, args), (_consumer_high, args), (_loader, args)],
        [4, LOADER_WARPS],
        [CONSUMER_REGS, LOADER_REGS],
    )


# --- host side


def gemm1(kernel: str, x, x_scale, src, w13, w13_scale, act, act_scale, rows_per_expert: int,
          stages: int = 4):  # fmt: skip
    """The SwiGLU block of every (tile, column block): tile t is rows ``[128 t, 128 t +
    rows_per_expert)`` of ``src`` (A row r is ``x[src[r]]``), expert ``t % L``; e4m3 into
    ``act [C, I]``, one scale a row a column block into ``act_scale [C, I / 128]``."""
    L, two_i, H = w13.shape
    I = two_i // 2
    tiles = src.shape[0] // BLOCK
    if H % BLOCK or I % BLOCK or src.shape[0] % BLOCK or not 0 < rows_per_expert <= BLOCK:
        raise ValueError(f"H, I and C multiples of {BLOCK}, 1-{BLOCK} rows an expert")
    grid = (tiles, I // BLOCK)
    flat = w13.view(L * two_i, H)
    if kernel == "triton":
        desc = TensorDescriptor(flat, [L * two_i, H], [H, 1], [BLOCK, BLOCK])
        gemm1_triton[grid](
            x, x_scale, src, w13, w13_scale, desc, act, act_scale, rows_per_expert, L, H, I,
            num_warps=8, num_stages=3,
        )  # fmt: skip
    elif kernel == "specialised":
        layout = gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], gl.float8e4nv)
        desc = GluonDescriptor.from_tensor(flat, [BLOCK, BLOCK], layout)
        gemm1_specialised[grid](
            x, x_scale, src, desc, w13_scale, act, act_scale, rows_per_expert, L, H, I, stages,
            num_warps=4, maxnreg=WS_MAXNREG,
        )  # fmt: skip
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return act, act_scale


def gemm1_ref(x, x_scale, src, w13, w13_scale, rows_per_expert: int) -> torch.Tensor:
    """fp32 SwiGLU rows of every tile (zeros past each tile's rows), from dequantised operands."""
    L, two_i, H = w13.shape
    I = two_i // 2
    xd = dequantize_token_groups(x, x_scale)
    wd = dequantize_weight_blocks(w13, w13_scale)
    out = torch.zeros(src.shape[0], I, device=x.device)
    for t in range(src.shape[0] // BLOCK):
        rows = slice(t * BLOCK, t * BLOCK + rows_per_expert)
        a = xd[src[rows].long()]
        g, u = (a @ wd[t % L].T).split(I, dim=1)
        out[rows] = torch.nn.functional.silu(g) * u
    return out


def random_case(L: int, H: int, I: int, rows_per_expert: int, tiles: int, seed: int = 0):
    """Receive rows quantised per 128 columns, a shuffled ``src`` into them, e4m3 experts with
    128 x 128 block scales (``megakernel.fp8``'s quantisers)."""
    g = torch.Generator("cuda").manual_seed(seed)
    C = tiles * BLOCK
    x, x_scale = quantize_token_groups(torch.randn(C, H, device="cuda", generator=g))
    src = torch.randperm(C, device="cuda", generator=g).to(torch.int32)
    w = torch.randn(L, 2 * I, H, device="cuda", generator=g) / H**0.5
    w13, w13_scale = quantize_experts(w)
    return x, x_scale, src, w13, w13_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--rows-per-expert", type=int, default=128)
    parser.add_argument("--stages", nargs="+", type=int, default=[3, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    L, H, I, rows = args.experts, args.hidden, args.ffn, args.rows_per_expert
    case = random_case(L, H, I, rows, tiles=L)
    want = gemm1_ref(*case, rows)
    C = L * BLOCK
    variants = [("triton", 3)] + [("specialised", s) for s in args.stages]
    live = torch.cat([torch.arange(t * BLOCK, t * BLOCK + rows) for t in range(L)])
    outs = {}
    for kernel, stages in variants:
        act = torch.full((C, I), float("nan"), device="cuda").to(torch.float8_e4m3fn)
        act_scale = torch.full((C, I // BLOCK), float("nan"), device="cuda")
        gemm1(kernel, *case, act, act_scale, rows, stages)
        got = dequantize_token_groups(act, act_scale)
        error = ((got[live] - want[live]).norm() / want[live].norm()).item()
        if not error < 3e-2:  # e4m3's rounding of act: about 2e-2
            raise SystemExit(f"{kernel} (stages {stages}): relative error {error:.2e}")
        print(f"{kernel} stages {stages}: act within {error:.2e} of the fp32 reference")
        outs[kernel, stages] = (act, act_scale)
    print(f"{torch.cuda.get_device_name()}: {L} experts x {rows} rows, H {H}, I {I}")
    time_variants(
        variants,
        lambda v: functools.partial(gemm1, v[0], *case, *outs[v], rows, v[1]),
        2 * L * rows * 2 * I * H,
        args.rounds,
    )


if __name__ == "__main__":
    main()
