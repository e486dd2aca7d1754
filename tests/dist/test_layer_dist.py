"""The whole layer in the NVSHMEM world (2 GPUs): presets at T = 4096 and 32768, 1000 calls
without sync, a CUDA graph, bitwise repeatability and the fault path."""

import pytest
from _workers import need_gpus, run_workers

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("nproc", [2])
def test_layer_nvshmem(nproc):
    need_gpus(nproc)
    # dsv3 at T = 32768, R = 2: recv_x 2 x 524288 x 7168 bf16 (15 GB) + combine_y 3.8 GB per rank
    out = run_workers(nproc, "worker_layer.py", symmetric_size="24G", timeout=1500)
    cases = ("dsv3", "qwen3_235b", "mixtral", "back_to_back", "graph", "repeatable", "fault")
    for rank in range(nproc):
        for case in cases:
            assert f"[rank {rank}] PASS {case}" in out
