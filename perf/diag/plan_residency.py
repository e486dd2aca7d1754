"""Diagnose the dsv3 R-rank emulated plan timeout: which launch orders / settings complete."""

import os, sys, time
import torch
from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PlanConfig, PlanWorkspace
from symm_mem import EmulatedWorld

R = int(sys.argv[1])
mode = sys.argv[2]
E, K, T = 256, 8, 4096
rt, _ = routing.edge_case("uniform", R, T, E, K, seed=7)
cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=R * T * K // 2)
with EmulatedWorld(R, "cuda", timeout_s=2.0) as world:
    ws = PlanWorkspace(world, cfg, Placement.contiguous(E, R))
    ws.warmup()
    ids = {r: rt.topk_ids[r].cuda() for r in range(R)}
    t0 = time.time()
    try:
        if mode == "phased":
            for ph in (0, 1):
                world.run_ranks(lambda r: ws.launch(r, ids[r], ph, validate=False))
        else:
            ws.run(ids, validate=False)
        world.check_errors()
        res = "ok"
    except Exception as e:
        res = f"FAIL {str(e)[:90]}"
    print(
        f"R={R} mode={mode} conn={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', '-')} sms/rank={world.sms_per_rank} {time.time() - t0:.2f}s {res}",
        flush=True,
    )
