"""The FP8 expert GEMM tiles (``megakernel.ops.fp8``) compile for sm_90 to e4m3 warpgroup MMAs
with fp32 accumulation (dsv3's H 7168, I 2048), and the dispatch's quantisation to e4m3
conversions."""

import os

import pytest
import torch
from _aot import compile_sm90, signature_of

from megakernel.ops.fp8 import fp8_down_kernel, fp8_gemm1_kernel, fp8_quantize_kernel

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

E4M3 = torch.float8_e4m3fn
F32, I32 = torch.float32, torch.int32
SHAPE = {"H": 7168, "I": 2048, "BLOCK_M": 128}


def one(dtype):
    return torch.empty(1, dtype=dtype)


@pytest.mark.parametrize("which", ["gemm1", "down"])
def test_fp8_tiles_compile_to_e4m3_wgmma(which):
    if which == "gemm1":
        kernel = fp8_gemm1_kernel
        args = dict(
            x=one(E4M3), x_scale=one(F32), src=one(I32), w13=one(E4M3), w13_scale=one(F32),
            act=one(E4M3), act_scale=one(F32), local=3, rows=1000,
        )  # fmt: skip
    else:
        kernel = fp8_down_kernel
        args = dict(
            act=one(E4M3), act_scale=one(F32), w2=one(E4M3), w2_scale=one(F32), out=one(F32),
            local=3, rows=1000,
        )  # fmt: skip
    compiled = compile_sm90(kernel, signature_of(args), SHAPE, num_warps=8, num_stages=3)
    ptx = compiled.asm["ptx"]
    mma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert mma, "the products run on Hopper's warpgroup MMA"
    assert all(".f32.e4m3.e4m3" in line for line in mma), "e4m3 operands, fp32 accumulators"
    if which == "gemm1":
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "the SwiGLU output is rounded to e4m3"
    assert compiled.metadata.shared <= 227 * 1024


def test_dispatch_quantisation_compiles_to_e4m3_conversions():
    args = dict(x=one(torch.bfloat16), q=one(E4M3), q_scale=one(F32), rows=1000)
    compiled = compile_sm90(
        fp8_quantize_kernel, signature_of(args), {"H": 7168, "BLOCK_M": 16, "STEP": 1024}
    )
    assert "cvt.rn.satfinite.e4m3x2.f32" in compiled.asm["ptx"]
