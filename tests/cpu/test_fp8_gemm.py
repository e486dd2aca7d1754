"""The FP8 expert GEMM tiles and the dispatch's quantisation (``megakernel.ops.fp8``) under the
interpreter, against the block-scaled formats of ``megakernel.fp8`` dequantised and multiplied
in fp32.

GEMM1 gathers its rows through a shuffled ``src`` (as from token saving), covers a partial tile,
and quantises its SwiGLU output per row and 128 columns; the down tile reads that output."""

import pytest
import torch
import triton

from megakernel.fp8 import (
    E4M3_MAX,
    dequantize_token_groups,
    dequantize_weight_blocks,
    quantize_token_groups,
    quantize_weight_blocks,
)
from megakernel.ops.fp8 import fp8_down_kernel, fp8_gemm1_kernel, fp8_quantize_kernel

H, I, L, ROWS, BM = 256, 256, 2, 40, 16  # two scale blocks each way; a partial last tile


def fp8_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, H, generator=g) * torch.rand(ROWS, 1, generator=g) * 4
    x[3] = 0.0  # an all-zero row: scale 1
    xq, xs = quantize_token_groups(x)
    w13q, w13s = quantize_weight_blocks(torch.randn(L, 2 * I, H, generator=g) / H**0.5)
    w2q, w2s = quantize_weight_blocks(torch.randn(L, H, I, generator=g) / I**0.5)
    src = torch.randperm(ROWS, generator=g).to(torch.int32)
    return xq, xs, src, (w13q, w13s), (w2q, w2s)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_gemm1_and_down_tiles_match_the_dequantised_products(seed):
    xq, xs, src, (w13q, w13s), (w2q, w2s) = fp8_case(seed)
    local = 1
    act = torch.zeros(ROWS, I, dtype=torch.float8_e4m3fn)
    acts = torch.full((ROWS, I // 128), float("nan"))
    grid = (triton.cdiv(ROWS, BM), I // 128)
    fp8_gemm1_kernel[grid](xq, xs, src, w13q, w13s, act, acts, local, ROWS, H, I, BM)
    # the reference: dequantised operands, fp32 products, SwiGLU
    x = dequantize_token_groups(xq, xs)[src.long()]
    w13 = dequantize_weight_blocks(w13q[local], w13s[local])
    h = x @ w13.t()
    want = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    got = dequantize_token_groups(act, acts)
    assert not acts.isnan().any(), "every row's scales written"
    assert within_half_a_step(got, want, acts)
    amax = want.abs().reshape(ROWS, I // 128, 128).amax(-1)
    assert torch.allclose(acts, torch.where(amax > 0, amax / E4M3_MAX, 1.0), rtol=1e-5)
    # the down projection of the quantised activations
    out = torch.full((ROWS, H), float("nan"))
    grid = (triton.cdiv(ROWS, BM), H // 128)
    fp8_down_kernel[grid](act, acts, w2q, w2s, out, local, ROWS, H, I, BM)
    want_down = got @ dequantize_weight_blocks(w2q[local], w2s[local]).t()
    torch.testing.assert_close(out, want_down, rtol=1e-5, atol=1e-5)


def within_half_a_step(got: torch.Tensor, want: torch.Tensor, scales: torch.Tensor) -> bool:
    """e4m3 keeps 3 mantissa bits: each value is within half a step (1/16) of its rounding, and
    the smallest subnormal step of its group's scale bounds the error near zero."""
    group_scale = scales.repeat_interleave(128, dim=1)
    bound = want.abs() / 16 + group_scale * 2.0**-9 + 1e-6
    return bool(((got - want).abs() <= bound * 1.01).all())


@pytest.mark.parametrize(
    "dtype,width,step",
    [(torch.bfloat16, H, 128), (torch.float32, H, 128), (torch.bfloat16, 640, 256)],
)
def test_dispatch_quantisation_matches_the_token_group_format(dtype, width, step):
    """Rows quantised on their way out equal ``quantize_token_groups`` (scales bit for bit, values
    within e4m3's rounding), an all-zero row included; one scale group a step, or two with the
    last step half past the row (640 = 2.5 steps of 256)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(ROWS, width, generator=g) * torch.rand(ROWS, width // 128, generator=g)
         .repeat_interleave(128, dim=1) * 8).to(dtype)  # fmt: skip
    x[5] = 0.0
    q = torch.zeros(ROWS, width, dtype=torch.float8_e4m3fn)
    past = torch.full((ROWS * (width // 128) + 4,), float("nan"))  # 4 past the last row's
    scales = past[: ROWS * (width // 128)].view(ROWS, width // 128)
    fp8_quantize_kernel[(triton.cdiv(ROWS, BM),)](x, q, scales, ROWS, width, BM, step)
    assert past[scales.numel() :].isnan().all(), "a scale past the last row's groups was written"
    want_q, want_scales = quantize_token_groups(x.float())
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0)
    got = dequantize_token_groups(q, scales)
    assert within_half_a_step(got, x.float(), scales)
    assert (got[5] == 0).all()
