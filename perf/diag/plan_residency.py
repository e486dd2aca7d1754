"""Reproduce the emulated-world scheduling stall behind ``PlanWorkspace.run``'s phase order.

``python perf/diag/plan_residency.py R {interleaved|phased}`` on one GPU: dsv3, T = 4096,
uniform routing. ``interleaved`` launches count + layout per rank, rank after rank; ``phased``
launches every rank's count kernel before any layout kernel. On an H100 (2026-11-23): R = 4
interleaved ok; R = 8 interleaved timed out on rank 5's counts (also with
CUDA_DEVICE_MAX_CONNECTIONS=32); R = 8 phased ok.
"""

import os
import sys
import time

from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PlanConfig, PlanWorkspace
from symm_mem import EmulatedWorld


def main() -> None:
    R, mode = int(sys.argv[1]), sys.argv[2]
    E, K, T = 256, 8, 4096
    rt, _ = routing.edge_case("uniform", R, T, E, K, seed=7)
    cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=R * T * K)
    with EmulatedWorld(R, "cuda", timeout_s=2.0) as world:
        ws = PlanWorkspace(world, cfg, Placement.contiguous(E, R))
        ws.warmup()
        ids = {r: rt.topk_ids[r].cuda() for r in range(R)}
        phases = [None] if mode == "interleaved" else [0, 1]
        start = time.time()
        try:
            for phase in phases:
                world.run_ranks(lambda r, p=phase: ws.launch(r, ids[r], p, validate=False))
            world.check_errors()
            result = "ok"
        except RuntimeError as e:
            result = f"FAIL {str(e)[:90]}"
        conn = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "-")
        print(
            f"R={R} {mode} connections={conn} sms/rank={world.sms_per_rank} "
            f"{time.time() - start:.2f}s {result}"
        )


if __name__ == "__main__":
    main()
