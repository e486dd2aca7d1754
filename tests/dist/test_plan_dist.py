"""The plan with its counts exchange in the NVSHMEM world (2 GPUs), against plan_ref."""

import pytest
from _workers import need_gpus, run_workers

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("nproc", [2])
def test_plan_nvshmem(nproc):
    need_gpus(nproc)
    out = run_workers(nproc, "worker_plan.py")
    for rank in range(nproc):
        for preset in ("dsv3", "mixtral"):
            assert f"[rank {rank}] PASS plan_{preset}" in out
