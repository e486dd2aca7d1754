"""The Gluon FP8 k loops of ``perf.studies.gemm_gluon`` compile for sm_90 with no GPU, and
ptxas keeps what they were written for: every k block's four MMAs in one uninterrupted wgmma
group (a serialised loop waits after each), a wait that leaves one product in flight, no
spills, and, for the specialised kernel, warp specialisation itself (register reallocation)."""

import os
import re

import pytest
import torch
from _aot import compile_sm90, mma_loop_spills, mma_loops, sass_ops, signature_of, wgmma_groups

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from perf.studies import gemm_gluon as study  # noqa: E402

M, N, K = 4096, 4096, 7168  # dsv3's H as the reduction


def example_args():
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    layout = gl.NVMMASharedLayout.get_default_for([study.BLOCK, study.BLOCK], gl.float8e4nv)
    a = meta(M, K, dtype=torch.float8_e4m3fn)
    b = meta(N, K, dtype=torch.float8_e4m3fn)
    return {
        "a_desc": TensorDescriptor(a, [M, K], [K, 1], [study.BLOCK, study.BLOCK], layout),
        "b_desc": TensorDescriptor(b, [N, K], [K, 1], [study.BLOCK, study.BLOCK], layout),
        "a_scale": meta(M, K // study.BLOCK),
        "b_scale": meta(N // study.BLOCK, K // study.BLOCK),
        "out": meta(M, N),
        "N": N,
        "K": K,
    }


@pytest.fixture(scope="module", params=["pipelined", "specialised"])
def compiled(request):
    specialised = request.param == "specialised"
    fn = study.gemm_specialised if specialised else study.fp8_gemm_pipelined
    warps = 4 if specialised else 8
    options = {"maxnreg": study.WS_MAXNREG} if specialised else {}
    kernel = compile_sm90(
        fn, signature_of(example_args()), {"STAGES": 4, "num_warps": warps},
        divisible=("N", "K"), num_warps=warps, **options,
    )  # fmt: skip
    return request.param, kernel, sass_ops(kernel)


def test_every_k_block_is_one_unbroken_wgmma_group(compiled):
    name, _, ops = compiled
    loops = mma_loops(ops)
    # the pipelined kernel has one k loop, the specialised one a loop per consumer warpgroup
    assert len(loops) == (2 if name == "specialised" else 1), f"{name}: {len(loops)} MMA loops"
    for body in loops:
        groups = wgmma_groups(body)
        assert len(groups) == 2, f"{name}: {len(groups)} wgmma groups a loop, want two k blocks"
        for shape, group in groups:
            mmas = [o for o in group if "QGMMA" in o]
            # a serialised loop (ptxas C7514) commits and waits after every MMA: groups of one
            assert shape == "64x128" and len(mmas) == 4, f"{name}: group {shape} x{len(mmas)}"
            assert not any("DEPBAR" in o for o in group), f"{name}: a wait inside a group"


def test_each_product_runs_while_the_one_before_is_scaled(compiled):
    name, _, ops = compiled
    for body in mma_loops(ops):
        waits = [o for o in body if "WARPGROUP.DEPBAR" in o]
        assert sum(o.endswith("0x1") for o in waits) == 2, f"{name}: {waits}"
        adds = [i for i, o in enumerate(body) if re.match(r"FFMA\b", o)]
        assert len(adds) == 2 * 64, f"{name}: {len(adds)} FFMAs"  # 64 a thread a block


def test_no_spills_and_warp_specialisation_took_effect(compiled):
    name, kernel, ops = compiled
    assert mma_loop_spills(ops) == [], f"{name}: spills in the k loops"
    reallocates = [o for o in ops if o.startswith("USETMAXREG") or "SETMAXNREG" in o]
    if name == "specialised":
        assert reallocates, "no register reallocation: the kernel was not warp-specialised"
        assert kernel.metadata.shared <= 228 * 1024
    else:
        assert not reallocates


def test_bf16_specialised_keeps_a_product_in_flight():
    """The bf16 kernel's two consumer loops chain one accumulator, each k step's four MMAs one
    group, and wait only for the product before it (one left in flight)."""
    BM, BN, BK = study.BF16_TILE

    def desc(rows, box):
        t = torch.empty(rows, K, dtype=torch.bfloat16, device="meta")
        layout = gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16)
        return TensorDescriptor(t, [rows, K], [K, 1], box, layout)

    args = {
        "a_desc": desc(M, [BM, BK]),
        "b_desc": desc(N, [BN, BK]),
        "out": torch.empty(M, N, device="meta"),
        "N": N,
        "K": K,
    }
    kernel = compile_sm90(
        study.gemm_specialised, signature_of(args),
        {"a_scale": None, "b_scale": None, "STAGES": 4, "num_warps": 4},
        divisible=("N", "K"), num_warps=4, maxnreg=study.WS_MAXNREG,
    )  # fmt: skip
    ops = sass_ops(kernel)
    loops = mma_loops(ops)
    assert len(loops) == 2, f"{len(loops)} MMA loops, want one a consumer"
    for body in loops:
        groups = wgmma_groups(body)
        assert [(shape, sum("HGMMA" in o for o in g)) for shape, g in groups] == [("64x256", 4)]
        assert [o for o in body if "WARPGROUP.DEPBAR" in o] == ["WARPGROUP.DEPBAR.LE gsb0, 0x1"]
    assert mma_loop_spills(ops) == []
    assert any(o.startswith("USETMAXREG") for o in ops)
