"""The GEMM1 study's kernels (``perf.studies.gemm1_gluon``) on a Hopper GPU: the megakernel's
FP8 GEMM1 task and its Gluon counterpart against a dequantised fp32 reference and each other,
on fresh random operands, NaN-poisoned outputs and partly filled tiles."""

import pytest
import torch

from megakernel.fp8 import dequantize_token_groups
from perf.studies import gemm1_gluon as study


@pytest.fixture(autouse=True)
def hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel uses Hopper's wgmma")


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("L,H,I,rows,tiles", [(2, 512, 256, 128, 3), (3, 1024, 384, 77, 4)])
def test_gluon_task_matches_the_megakernels(stages, L, H, I, rows, tiles):
    case = study.random_case(L, H, I, rows, tiles, seed=rows + stages)
    C = tiles * study.BLOCK
    got = {}
    for kernel in study.KERNELS:
        act = torch.full((C, I), float("nan"), device="cuda").to(torch.float8_e4m3fn)
        act_scale = torch.full((C, I // study.BLOCK), float("nan"), device="cuda")
        study.gemm1(kernel, *case, act, act_scale, rows, stages)
        got[kernel] = dequantize_token_groups(act, act_scale)
    want = study.gemm1_ref(*case, rows)
    live = torch.cat([torch.arange(t * study.BLOCK, t * study.BLOCK + rows) for t in range(tiles)])
    for kernel, out in got.items():
        out = out[live]
        assert not out.isnan().any(), f"{kernel}: a live row was not written"
        error = ((out - want[live]).norm() / want[live].norm()).item()
        assert error < 3e-2, f"{kernel}: {error:.2e} from the fp32 reference"  # e4m3 act
    apart = (got["specialised"][live] - got["triton"][live]).norm() / got["triton"][live].norm()
    assert apart < 1e-2, f"the two tasks differ by {apart:.2e}"
