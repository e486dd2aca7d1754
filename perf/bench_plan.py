"""Plan time: ``python -m perf.bench_plan [--preset dsv3] [--tokens 4096] [--ranks 8]``.

One GPU, ``EmulatedWorld(R, "cuda")``. The plan (count, scan and layout kernels, with the counts
exchange between them) is captured in a CUDA graph and replayed; each replay bumps the device
epoch, so every layout kernel really waits for the peers' fresh counts. Reported, median and
p20/p80 over repeats, correctness checked first against ``plan_ref``:
  - ``all ranks``: the R ranks plan concurrently, each on 1/R of the SMs (8x the work a GPU of a
    real node does, on the same GPU);
  - ``one rank``: rank 0's whole plan with the whole GPU, as a rank of a real node runs it. Its
    peers' counts stay published (both parities, flags raised far ahead), so its layout finds
    them ready; rank 0 still publishes its own and checks its plan after the replays;
  - ``eager``: the all-ranks call launched from Python (host launch overhead included).
JSON goes to perf/results/ (perf.record).
"""

from __future__ import annotations

import argparse

import torch

from megakernel import routing
from megakernel.placement import Placement
from megakernel.plan import PROGRAMS_PER_SM, PlanConfig, PlanWorkspace
from megakernel.shapes import preset
from perf.record import write_result
from perf.timing import graphed, time_us
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
        all_ranks = time_us(graphed(lambda: ws.run(ids, validate=False)), repeats=20, inner=50)
        eager = time_us(lambda: ws.run(ids, validate=False), repeats=10, inner=20)
        world.check_errors()
        stats = ws.plan(0).stats.tolist()
        one_rank = time_us(_rank0_alone(ws, ids[0]), repeats=20, inner=50)
        world.check_errors()
        wrong = ws.mismatches(rt.topk_ids).get(0)
        if wrong:
            raise SystemExit(f"rank 0's plan alone differs from plan_ref in {wrong}")
    return {
        "preset": shape_name,
        "tokens_per_rank": T,
        "ranks": R,
        "routing": case,
        "token_saving": token_saving,
        "sms_per_rank": world.sms_per_rank,
        "plan_us_graph": all_ranks,
        "plan_us_one_rank": one_rank,
        "plan_us_eager": eager,
        "rank0_stats": stats,
    }


def _rank0_alone(ws: PlanWorkspace, ids: torch.Tensor):
    """A graph of rank 0's whole plan on the whole GPU, after the last call: every peer's counts
    copied into both parities of rank 0's table and their flags raised far ahead, so rank 0's
    layout never waits (the peers do not plan again)."""
    table, ready = ws.sym_counts.peer(0), ws.sym_ready.peer(0)
    parity = int(ws.epoch[0]) % 2
    table[1 - parity, 1:] = table[parity, 1:]
    ready[1:] = 2**62
    ws.max_programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count
    return graphed(lambda: ws.launch(0, ids, validate=False))


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
        f"{meta['gpu']}; bound: 30 us per rank\n"
        f"  all ranks: the {args.ranks} ranks at once, {rows[0]['sms_per_rank']} SMs each\n"
        f"  one rank: rank 0 alone with the whole GPU, as on a real node"
    )
    head = ("routing", 9), ("saving", 7), ("one rank us", 12), ("all ranks us", 13), ("eager us", 9)
    print(" ".join(f"{name:<{width}}" for name, width in head) + " stats")
    for r in rows:
        one, g, e = r["plan_us_one_rank"], r["plan_us_graph"], r["plan_us_eager"]
        print(
            f"{r['routing']:<9} {str(r['token_saving']):<7} {one['median']:<12.1f} "
            f"{g['median']:<13.1f} {e['median']:<9.1f} {r['rank0_stats']}"
        )
    print(f"wrote {name}")


if __name__ == "__main__":
    main()
