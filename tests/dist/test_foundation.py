"""The NVSHMEM world on real GPUs: init/close, exchange, ping-pong, NVSHMEM put+signal, bandwidth."""

import pytest
from _workers import need_gpus, run_workers

pytestmark = pytest.mark.dist

CASES = ("init", "exchange", "pingpong", "nvshmem_put_signal", "timeout", "bandwidth", "close")


@pytest.mark.parametrize("nproc", [2])
def test_foundation(nproc):
    need_gpus(nproc)
    out = run_workers(nproc, "worker_foundation.py")
    for case in CASES:
        for rank in range(nproc):
            assert f"[rank {rank}] PASS {case}" in out, f"rank {rank} did not pass {case}"
    assert "not freed" not in out and "leak" not in out.lower(), "NVSHMEM reported a leak"
