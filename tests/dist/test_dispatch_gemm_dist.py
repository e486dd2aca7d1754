"""Dispatch + GEMM1 in the NVSHMEM world (2 GPUs): presets, 100 calls without sync, overflow."""

import pytest
from _workers import need_gpus, run_workers

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("nproc", [2])
def test_dispatch_gemm_nvshmem(nproc):
    need_gpus(nproc)
    # dsv3 at R = 2: recv_x is 2 x 65536 x 7168 bf16 = 1.9 GB per rank
    out = run_workers(nproc, "worker_dispatch_gemm.py", symmetric_size="4G", timeout=900)
    for rank in range(nproc):
        for case in ("dsv3", "qwen3_235b", "mixtral", "back_to_back", "overflow"):
            assert f"[rank {rank}] PASS {case}" in out
