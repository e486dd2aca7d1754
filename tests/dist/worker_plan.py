"""torchrun worker: the plan (counts exchange included) in the NVSHMEM world vs plan_ref.

Every rank builds the same global-view routing from one seed, plans its own share, and checks
its plan against the reference computed from all ranks' routing. Prints `[rank r] PASS <case>`.
"""

import sys

import torch

import symm_mem
from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PlanConfig, PlanWorkspace


def main() -> int:
    world = symm_mem.init_world()
    rank, R = world.rank, world.world_size
    ok = True
    # mixtral's 8 experts; on 8 ranks one expert each (L = 1 < K = 2 makes to_one_rank invalid,
    # so that case is skipped there)
    for preset, (E, K, T) in {"dsv3": (256, 8, 4096), "mixtral": (8, 2, 4096)}.items():
        placement = Placement.contiguous(E, R)
        cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=2 * T * K)
        ws = PlanWorkspace(world, cfg, placement)
        ws.warmup()
        world.barrier()
        wrong = []
        cases = [c for c in routing.EDGE_CASES if c != "replicated"]  # placement is fixed
        if E // R < K:
            cases.remove("to_one_rank")
        for call, case in enumerate(cases * 2):
            rt, _ = routing.edge_case(case, R, T, E, K, seed=1000 + call)
            ws.run({rank: rt.topk_ids[rank].to(world.device)})  # no barrier between calls
            world.check_errors()
            off = ws.mismatches(rt.topk_ids)
            if off:
                wrong.append((case, off))
        print(f"[rank {rank}] {'PASS' if not wrong else 'FAIL'} plan_{preset} "
              f"{2 * len(cases)} calls, E={E} K={K} T={T} {wrong}", flush=True)
        ok &= not wrong
        ws.close()
    world.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
