"""The FP8 path's formats and reference (megakernel.fp8), on the CPU: block scales as DeepSeek-V3
stores them, round trips within e4m3's precision, and how far moe_fp8_ref is from the bf16
layer's reference on random data.

NOTE: e4m3 keeps 3 mantissa bits: a Gaussian tensor round-trips with a relative error of about
2.6% (norm), whatever the scaling. GEMM1 with both operands quantised is then about 3.7% off, and
the whole layer (four quantised operands, SwiGLU between) about 6% (H 1024, I 512): the 3e-2 the
FP8 issue asks of the layer against the bf16 reference is below what e4m3 itself allows on such
data; the tests here bound what the reference reaches."""

import pytest
import torch

from megakernel import routing
from megakernel.fp8 import (
    BLOCK,
    E4M3,
    dequantize_token_groups,
    dequantize_weight_blocks,
    moe_dequantized_ref,
    moe_fp8_ref,
    quantize_token_groups,
    quantize_weight_blocks,
)
from megakernel.reference import moe_ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_weight_blocks_have_the_checkpoint_layout_and_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 256, 384, generator=g)
    w[1, :128, :128] = 0.0  # an all-zero block: scale 1, exact
    w[2, 128:, 256:] *= 1000.0  # a block of another magnitude keeps its own scale
    q, s = quantize_weight_blocks(w)
    assert (
        q.dtype == E4M3 and q.shape == w.shape and s.shape == (3, 2, 3) and s.dtype == torch.float32
    )
    assert s[1, 0, 0] == 1 and q[1, :128, :128].float().eq(0).all()
    back = dequantize_weight_blocks(q, s)
    assert back.abs().amax() <= w.abs().amax() * 1.0001
    assert rel(back, w) < 0.04  # e4m3: 3 mantissa bits, relative step 1/16 at worst
    block = back[2, 128:, 256:]
    assert rel(block, w[2, 128:, 256:]) < 0.04, "a large block is not crushed by a shared scale"
    assert q.float().abs().amax() <= 448


def test_token_groups_round_trip_and_refuse_partial_blocks():
    x = torch.randn(5, 2 * BLOCK, generator=torch.Generator().manual_seed(1))
    q, s = quantize_token_groups(x)
    assert s.shape == (5, 2)
    assert rel(dequantize_token_groups(q, s), x) < 0.04
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_token_groups(torch.randn(2, 100))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_fp8_ref_against_the_bf16_reference(dtype):
    T, H, I, E, K = 64, 256, 256, 8, 2
    g = torch.Generator().manual_seed(2)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    rt = routing.drop(routing.uniform(1, T, E, K, seed=3), 0.1, seed=4)
    ids, weights = rt.topk_ids[0], rt.topk_weights[0]
    q13, q2 = quantize_weight_blocks(w13), quantize_weight_blocks(w2)
    want = moe_ref(x.float(), ids, weights, w13.float(), w2.float())
    got = moe_fp8_ref(x, ids, weights, q13, q2)
    assert got.dtype == torch.float32 and got.shape == (T, H)
    assert 0.02 < rel(got, want) < 0.08, rel(got, want)  # e4m3's floor (module note)
    # the weights alone account for part of it; quantising the activations adds the rest
    weights_only = moe_dequantized_ref(x.float(), ids, weights, q13, q2)
    assert 0.01 < rel(weights_only, want) < rel(got, want)
    dropped = ids < 0
    assert not dropped.all(), "some slots dropped, some not"


@pytest.mark.parametrize("preset", ["dsv3", "qwen3_235b"])
def test_an_fp8_dispatch_row_is_about_half_a_bf16_one_scales_included(preset):
    """The traffic model's row: H e4m3 bytes plus an fp32 scale per 128 columns, against 2 H
    (dsv3: 7392 of 14336 bytes, 0.516)."""
    from megakernel.shapes import PRESETS
    from megakernel.traffic import row_bytes

    H = PRESETS[preset].hidden
    fp8, bf16 = row_bytes(H, torch.bfloat16, fp8=True), row_bytes(H, torch.bfloat16)
    assert fp8 == H + 4 * H // 128 and bf16 == 2 * H
    assert fp8 / bf16 <= 0.52
