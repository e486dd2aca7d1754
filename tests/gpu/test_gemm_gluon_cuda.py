"""The GEMM study's kernels (``perf.studies.gemm_gluon``) on a Hopper GPU: every kernel, at
every ring depth timed, against the fp32 product (FP8: of the dequantised operands), on fresh
random operands and NaN-poisoned outputs."""

import pytest
import torch

from perf.studies import gemm_gluon as study


@pytest.fixture(autouse=True)
def hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels use Hopper's wgmma")


@pytest.mark.parametrize("kernel", study.KERNELS)
@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("M,N,K,seed", [(256, 384, 1024, 1), (384, 256, 7168, 2)])
def test_kernel_matches_the_dequantised_product(kernel, stages, M, N, K, seed):
    ops = study.random_operands(M, N, K, seed=seed)
    out = torch.full((M, N), float("nan"), device="cuda")
    study.fp8_gemm(kernel, *ops, out, stages)
    want = study.fp8_gemm_ref(*ops)
    assert not out.isnan().any(), "a tile was not written"
    error = ((out - want).norm() / want.norm()).item()
    # each 128-k product is summed inside the tensor cores with fewer bits than fp32 (perf/NOTES.md,
    # "Hopper's MMA accumulation drifts"): 1.1e-4 for every kernel, Triton's too, at K = 7168
    assert error < 1e-3, f"{kernel} stages={stages}: relative error {error:.2e}"


def test_refuses_shapes_it_cannot_tile():
    a, b, sa, sb = study.random_operands(256, 256, 512)
    out = torch.empty(256, 256, device="cuda")
    with pytest.raises(ValueError, match="multiples"):
        study.fp8_gemm("specialised", a[:, :384], b[:, :384], sa[:, :3], sb[:, :3], out)
    with pytest.raises(ValueError, match="kernel must be one of"):
        study.fp8_gemm("cutlass", a, b, sa, sb, out)


@pytest.mark.parametrize("kernel", study.BF16_KERNELS)
@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("M,N,K,seed", [(256, 512, 1024, 3), (384, 256, 4096, 4)])
def test_bf16_kernel_matches_the_fp32_product(kernel, stages, M, N, K, seed):
    g = torch.Generator("cuda").manual_seed(seed)
    a = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(N, K, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.full((M, N), float("nan"), device="cuda")
    study.bf16_gemm(kernel, a, b, out, stages)
    want = a.float() @ b.float().T
    error = ((out - want).norm() / want.norm()).item()
    assert error < 1e-5, f"{kernel} stages={stages}: relative error {error:.2e}"
