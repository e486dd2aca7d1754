"""Where the plan time goes: ``python -m perf.diag.plan_stages [--programs-per-sm N]``.

dsv3, T = 4096, R = 8 emulated on one GPU, uniform routing, CUDA-graph replays (median us):
  all ranks    every rank's count kernel, then every rank's layout kernel (as perf.bench_plan)
  all count    every rank's count kernel only
  rank 0 alone with the whole GPU (as on a real node, one rank per GPU): its count kernel, and its
               layout kernel replayed on counts already published (no wait), each alone
"""

from __future__ import annotations

import argparse

import torch

from megakernel import plan as plan_mod
from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PlanConfig, PlanWorkspace
from perf.timing import graphed, time_us
from symm_mem import EmulatedWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs-per-sm", type=int, default=plan_mod.PROGRAMS_PER_SM)
    args = parser.parse_args()
    R, E, K, T = 8, 256, 8, 4096
    rt, _ = routing.edge_case("uniform", R, T, E, K, seed=7)
    cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=R * T * K)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with EmulatedWorld(R, "cuda") as world:
        ws = PlanWorkspace(world, cfg, Placement.contiguous(E, R))
        ws.max_programs = args.programs_per_sm * world.sms_per_rank
        ws.warmup()
        ids = {r: rt.topk_ids[r].cuda().int() for r in range(R)}
        ws.run(ids)
        world.check_errors()
        assert ws.mismatches(rt.topk_ids) == {}
        rows = {
            "all ranks": graphed(lambda: ws.run(ids, validate=False)),
            "all count": graphed(
                lambda: world.run_ranks(lambda r: ws.launch(r, ids[r], 0, validate=False))
            ),
        }
        rows = {name: time_us(fn, 20, 50)["median"] for name, fn in rows.items()}
        ws.run(ids)
        world.check_errors()
        ws.max_programs = args.programs_per_sm * sms  # rank 0 alone owns the GPU
        # layout first: its replays keep the epoch, so the published counts satisfy its waits;
        # the count replays after it bump rank 0's epoch alone (nothing waits on them)
        layout = graphed(lambda: ws.launch(0, ids[0], 1, validate=False))
        rows["rank 0 layout, whole GPU"] = time_us(layout, 20, 50)["median"]
        count = graphed(lambda: ws.launch(0, ids[0], 0, validate=False))
        rows["rank 0 count, whole GPU"] = time_us(count, 20, 50)["median"]
        world.check_errors()
    print(
        f"\nplan stages, dsv3 T={T} R={R} emulated, {torch.cuda.get_device_name()}, "
        f"{args.programs_per_sm} programs per SM"
    )
    for name, us in rows.items():
        print(f"  {name:<26} {us:7.1f} us")


if __name__ == "__main__":
    main()
