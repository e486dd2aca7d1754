"""Plan time: ``python -m perf.bench_plan [--preset dsv3] [--tokens 4096] [--ranks 8]``.

One GPU, ``EmulatedWorld(R, "cuda")``: R ranks plan concurrently, each on its slice of the SMs.
The plan (count kernel + layout kernel, with the counts exchange between them) is captured in a
CUDA graph and replayed; each replay bumps the device epoch, so every layout kernel really waits
for the peers' fresh counts. Reported: time per call (all R ranks concurrently, which is each
rank's plan time) from the graph replays, and the same call launched eagerly from Python (host
launch overhead included), median and p20/p80 over repeats. Correctness is checked first against
``plan_ref``. JSON goes to perf/results/.
"""

from __future__ import annotations

import argparse

import torch

from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PlanConfig, PlanWorkspace
from megakernel.shapes import preset
from perf.record import write_result
from perf.timing import time_us
from symm_mem import EmulatedWorld


def bench(shape_name: str, T: int, R: int, case: str, token_saving: bool) -> dict:
    shape = preset(shape_name)
    E, K = shape.num_experts, shape.topk
    placement = Placement.contiguous(E, R)
    # capacity for the worst case (every row to one rank): skewed routings must not overflow
    cfg = PlanConfig(R, E // R, K, max_tokens=T, capacity=R * T * K, token_saving=token_saving)
    rt, _ = routing.edge_case(case, R, T, E, K, seed=1)
    with EmulatedWorld(R, "cuda") as world:
        ws = PlanWorkspace(world, cfg, placement)
        ws.warmup()
        ids = {r: rt.topk_ids[r].cuda() for r in range(R)}
        ws.run(ids)
        world.check_errors()
        wrong = ws.mismatches(rt.topk_ids)
        if wrong:
            raise SystemExit(f"plan differs from plan_ref on ranks {wrong}")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ws.run(ids, validate=False)
        graphed = time_us(graph.replay, repeats=20, inner=50)
        eager = time_us(lambda: ws.run(ids, validate=False), repeats=10, inner=20)
        world.check_errors()
        stats = ws.plan(0).stats.tolist()
    return {
        "preset": shape_name,
        "tokens_per_rank": T,
        "ranks": R,
        "routing": case,
        "token_saving": token_saving,
        "sms_per_rank": world.sms_per_rank,
        "plan_us_graph": graphed,
        "plan_us_eager": eager,
        "rank0_stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for case in ("uniform", "zipf"):
        for saving in (True, False):
            rows.append(bench(args.preset, args.tokens, args.ranks, case, saving))
    name, meta = write_result(f"plan_{args.preset}_T{args.tokens}_R{args.ranks}", {"cases": rows})
    print(
        f"\nplan time per call, {args.preset}, T={args.tokens}, R={args.ranks} emulated on one "
        f"{meta['gpu']} ({rows[0]['sms_per_rank']} SMs per rank); bound: 30 us"
    )
    print(f"{'routing':<9} {'saving':<7} {'graph us (p20-p80)':<22} {'eager us':<9} stats")
    for r in rows:
        g, e = r["plan_us_graph"], r["plan_us_eager"]
        print(
            f"{r['routing']:<9} {str(r['token_saving']):<7} "
            f"{g['median']:6.1f} ({g['p20']:.1f}-{g['p80']:.1f})      {e['median']:7.1f}  "
            f"{r['rank0_stats']}"
        )
    print(f"wrote perf/results/{name}")


if __name__ == "__main__":
    main()
