"""Where the plan time goes: ``python -m perf.diag.plan_stages [--programs-per-sm N]
[--layout-maxnreg N]``.

dsv3, T = 4096, R = 8 emulated on one GPU, uniform routing, CUDA-graph replays (median us):
  all ranks         every rank's count + scan kernels, then every rank's layout (as perf.bench_plan)
  all count / scan  every rank's count kernel; every rank's count and scan kernels
  rank 0 alone with the whole GPU (as on a real node, one rank per GPU): its count, scan and
                    layout kernels, each alone; the layout replays on counts already published
"""

from __future__ import annotations

import argparse

import torch

from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import (
    PROGRAMS_PER_SM,
    PlanConfig,
    PlanWorkspace,
    plan_count_kernel,
    plan_scan_kernel,
)
from megakernel.plan import workspace as plan_workspace
from perf.timing import graphed, time_us
from symm_mem import EmulatedWorld


class _WithOptions:
    """A jitted kernel whose launches add compile options (``maxnreg``)."""

    def __init__(self, kernel, **options):
        self.kernel, self.options = kernel, options
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **meta: self.kernel[grid](*args, **meta, **self.options)

    def warmup(self, *args, **meta):
        return self.kernel.warmup(*args, **meta, **self.options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs-per-sm", type=int, default=PROGRAMS_PER_SM)
    parser.add_argument("--layout-maxnreg", type=int, default=None)
    args = parser.parse_args()
    if args.layout_maxnreg:
        plan_workspace.plan_layout_kernel = _WithOptions(
            plan_workspace.plan_layout_kernel, maxnreg=args.layout_maxnreg
        )
    R, E, K, T = 8, 256, 8, 4096
    rt, _ = routing.edge_case("uniform", R, T, E, K, seed=7)
    cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=R * T * K)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(
        f"plan stages, dsv3 T={T} R={R} emulated, {torch.cuda.get_device_name()}, "
        f"{args.programs_per_sm} programs per SM, layout maxnreg {args.layout_maxnreg}"
    )
    with EmulatedWorld(R, "cuda", timeout_s=2.0) as world:
        ws = PlanWorkspace(world, cfg, Placement.contiguous(E, R))
        ws.max_programs = args.programs_per_sm * world.sms_per_rank
        ws.warmup()
        ids = {r: rt.topk_ids[r].cuda().int() for r in range(R)}
        ws.run(ids)
        world.check_errors()
        assert ws.mismatches(rt.topk_ids) == {}

        def count(r: int) -> None:
            grid = (min(triton_cdiv(T, cfg.tokens_per_chunk), ws.max_programs),)
            plan_count_kernel[grid](**ws.count_args(r, ids[r]))

        def scan(r: int) -> None:
            grid = (min(2 * ws.meta.P_P // ws.meta.SCAN_COLS, ws.max_programs),)
            plan_scan_kernel[grid](**ws.scan_args(r, T))

        rows = {
            "all ranks": graphed(lambda: ws.run(ids, validate=False)),
            "all count": graphed(lambda: world.run_ranks(count)),
            "all count + scan": graphed(
                lambda: world.run_ranks(lambda r: ws.launch(r, ids[r], 0, validate=False))
            ),
        }
        rows = {name: _timed(name, fn) for name, fn in rows.items()}
        ws.run(ids)
        world.check_errors()
        ws.max_programs = args.programs_per_sm * sms  # rank 0 alone owns the GPU
        # layout first: its replays keep the epoch, so the published counts satisfy its waits;
        # the count / scan replays after it bump rank 0's epoch alone (nothing waits on them)
        layout = graphed(lambda: ws.launch(0, ids[0], 1, validate=False))
        rows["rank 0 layout, whole GPU"] = _timed("rank 0 layout, whole GPU", layout)
        alone = {  # built after the layout's replays: their warm-up calls bump the epoch
            "rank 0 count, whole GPU": lambda: count(0),
            "rank 0 scan, whole GPU": lambda: scan(0),
            "rank 0 count + scan, whole GPU": lambda: ws.launch(0, ids[0], 0, validate=False),
        }
        rows.update({name: _timed(name, graphed(fn)) for name, fn in alone.items()})
        world.check_errors()


def _timed(name: str, fn) -> float:
    us = time_us(fn, 20, 50)["median"]
    print(f"  {name:<32} {us:7.1f} us", flush=True)
    return us


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    main()
