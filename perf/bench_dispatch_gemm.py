"""Dispatch + GEMM1: ``python -m perf.bench_dispatch_gemm [--preset dsv3] [--tokens 4096]``.

Relaunches itself under torchrun on every visible GPU (NVSHMEM world); ``--emulate R`` runs R
ranks in one process on one GPU instead (the baseline then needs R = 1: no NCCL there).

Per switch variant (token saving, sorted dispatch, per-tile flags; ``--vary KNOB=V1,V2`` adds
"ours" with other ``KernelConfig`` knobs): correctness against the
references first, then, on the same inputs, CUDA events around graph-replayed calls (median and
p20/p80 over repeats, max over ranks):
  dispatch   plan + dispatch tasks; wire GB/s = rows sent to other ranks x H x 2 B / t,
             logical GB/s (DeepEP's) = (token, rank) rows received, own included, x H x 2 B / t
  sends      the dispatch tasks alone, plan done (the last call's puts again): wire GB/s of the
             data movement, as DeepEP times its dispatch apart from its layout step
  gemm       the tile tasks alone, on that call's received rows; TFLOP/s = 2 S H (2I) / t
  fused      plan + dispatch + GEMM1 in one launch; overlap = max(dispatch, gemm) / fused
the dispatch-only op (mode "dispatch": no GEMM in the kernel, so several programs fit on an SM)
with each ``--dispatch-programs`` count per rank (0, the default: its own default), checked bit
for bit against ``dispatch_ref``, its dispatch and sends timed the same way;
and once: ``torch._grouped_mm`` + SwiGLU on the same received rows, and the baseline (permute,
NCCL ``all_to_all_single`` with its host-side split sizes, permute to expert-major,
``torch._grouped_mm``, SwiGLU), timed eagerly. Table on rank 0, JSON under
perf/results/ (perf.record).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megakernel import KernelConfig, Megakernel, routing
from megakernel.placement import Placement
from megakernel.reference import resolve_all_ref
from megakernel.shapes import preset
from megakernel.testing import check_calls, local_w13, make_tokens, run_poisoned
from megakernel.traffic import row_bytes, traffic_model
from perf.baseline import baseline_moe
from perf.record import knob_values, write_result
from perf.timing import graphed, time_us
from symm_mem import World
from symm_mem.launch import run_in_world

VARIANTS = {  # name -> KernelConfig switches
    "ours": {},
    "no_token_saving": {"token_saving": False},
    "unsorted": {"sorted_dispatch": False},
    "per_expert_flags": {"per_tile_flags": False},
}


def run_variant(world, shape, placement, rt, xs, w_local, name, switches, tiles_cfg):
    cfg = dataclasses.replace(tiles_cfg, **switches)
    ws = Megakernel(world, shape, placement=placement, config=cfg)
    ranks = world.local_ranks
    ids = {r: rt.topk_ids[r] for r in ranks}
    x = {r: xs[r] for r in ranks}
    w = {r: w_local[r] for r in ranks}
    handles = run_poisoned(ws, xs, rt.topk_ids, w_local, "gemm")
    problems = check_calls(handles, xs, rt.topk_ids, w_local, placement, "gemm")
    if problems:
        raise SystemExit(f"{name}: wrong results: {problems[:4]}")
    n_recv = {r: handles[r].num_recv() for r in ranks}
    # torch._grouped_mm gets the same received rows (the layout is already expert-major)
    gmm = {
        r: (
            handles[r].resolved(),
            w[r].transpose(1, 2),
            torch.cumsum(handles[r].plan.expert_rows, 0).int(),
        )
        for r in ranks
    }
    row = {"variant": name, "config": dataclasses.asdict(cfg), "num_recv": n_recv}
    call = lambda stage: lambda: ws.run(x, ids, None, w, validate=False, stage=stage)  # noqa: E731
    row["dispatch_us"] = time_us(graphed(call("dispatch")))
    ws.run(x, ids, None, w)  # the sends and tiles stages rerun the last full call's tasks
    row["sends_us"] = time_us(graphed(call("sends")))
    row["gemm_us"] = time_us(graphed(call("tiles")))
    row["fused_us"] = time_us(graphed(call("all")))
    ws.check_errors()

    def grouped_mm():
        for r in ranks:
            h = torch._grouped_mm(*gmm[r][:2], offs=gmm[r][2])
            F.silu(h[:, : shape.ffn]) * h[:, shape.ffn :]

    row["grouped_mm_us"] = time_us(grouped_mm)
    ws.close()
    return row


def run_dispatch_only(world, shape, placement, rt, xs, w_local, programs: int) -> dict:
    """The dispatch-only op (mode "dispatch", default switches) with ``programs`` per rank:
    checked bit for bit against ``dispatch_ref``, then its dispatch and sends timed."""
    ws = Megakernel(world, shape, placement=placement, config=KernelConfig(num_ctas=programs))
    handles = run_poisoned(ws, xs, rt.topk_ids, w_local, "dispatch")
    problems = check_calls(handles, xs, rt.topk_ids, w_local, placement, "dispatch")
    if problems:
        raise SystemExit(f"dispatch-only, {programs} programs: wrong results: {problems[:4]}")
    ranks = world.local_ranks
    x, ids = {r: xs[r] for r in ranks}, {r: rt.topk_ids[r] for r in ranks}

    def call(stage: str):
        return lambda: ws.run(x, ids, None, w_local, mode="dispatch", stage=stage, validate=False)

    row = {
        "variant": f"dispatch mode, {ws.programs('dispatch')} programs",
        "config": dataclasses.asdict(ws.config),
    }
    row["dispatch_us"] = time_us(graphed(call("dispatch")))
    row["sends_us"] = time_us(graphed(call("sends")))
    ws.check_errors()
    ws.close()
    return row


def bench(world: World, args) -> dict:
    shape = preset(args.preset).with_tokens(args.tokens)
    R, E, K, T = world.world_size, shape.num_experts, shape.topk, args.tokens
    placement = Placement.contiguous(E, R)
    rt, _ = routing.edge_case(args.routing, R, T, E, K, seed=args.seed)
    rt = rt.to(world.device)
    xs = make_tokens(shape, [T] * R, args.seed, world.device)
    w_local = {
        r: local_w13(shape, placement, r, args.seed, world.device) for r in world.local_ranks
    }
    tiles_cfg = KernelConfig(num_ctas=args.ctas)
    variants = {name: sw for name, sw in VARIANTS.items() if name in args.variants}
    variants |= {f"{knob}={value}": {knob: value} for knob, value in knob_values(args.vary)}
    rows = [
        run_variant(world, shape, placement, rt, xs, w_local, name, sw, tiles_cfg)
        for name, sw in variants.items()
    ]
    only = [
        run_dispatch_only(world, shape, placement, rt, xs, w_local, p)
        for p in args.dispatch_programs
    ]
    phys = resolve_all_ref([ids.cpu() for ids in rt.topk_ids], placement)
    traffic = traffic_model(phys, placement.slots_per_rank)
    can_baseline = dist.is_initialized() or R == 1
    base = None
    if can_baseline:
        r = world.local_ranks[0]
        base_args = (xs[r], rt.topk_ids[r], None, w_local[r], None, shape, R)
        base = time_us(lambda: baseline_moe(*base_args, layer=False))
    row_size = row_bytes(shape.hidden, shape.dtype, shape.fp8)
    # DeepEP's convention: every (token, destination rank) row received, local ones included
    logical = max(traffic.rows_saved[s] + traffic.tokens[s] for s in range(R)) * row_size
    for row in rows + only:
        wire = max(traffic.bytes(row_size, row["config"]["token_saving"]))  # the busiest sender
        d = row["dispatch_us"]["median"]
        row.update(
            wire_GBps=wire / d / 1e3,
            sends_wire_GBps=wire / row["sends_us"]["median"] / 1e3,
            logical_GBps=logical / d / 1e3,
        )
    for row in rows:
        n = max(row["num_recv"].values())
        flops = 2 * n * shape.hidden * 2 * shape.ffn
        d, g, f = (row[k]["median"] for k in ("dispatch_us", "gemm_us", "fused_us"))
        row.update(
            gemm_TFLOPs=flops / g / 1e6,
            grouped_mm_TFLOPs=flops / row["grouped_mm_us"]["median"] / 1e6,
            overlap=max(d, g) / f,
            vs_baseline=base["median"] / f if base else None,
        )
    return {
        "preset": args.preset,
        "tokens_per_rank": T,
        "ranks": R,
        "world": type(world).__name__,
        "routing": args.routing,
        "remote_ranks_per_token": traffic.remote_ranks,
        "baseline_us": base,
        "variants": rows,
        "dispatch_only": only,
    }


def report(result: dict, args) -> None:
    R = result["ranks"]
    name, meta = write_result(
        f"dispatch_gemm_{args.preset}_T{args.tokens}_R{R}_{result['world']}", result
    )
    base = result["baseline_us"]
    print(
        f"\ndispatch + GEMM1, {args.preset}, T={args.tokens}, {R} ranks ({result['world']}), "
        f"{args.routing} routing, {meta['gpu']}; baseline "
        + (f"{base['median']:.0f} us" if base else "not run (needs NCCL or one rank)")
    )
    head = (
        f"{'variant':<17} {'dispatch us':>11} {'wire GB/s':>9} {'logic GB/s':>10} "
        f"{'sends us':>8} {'wire GB/s':>9} {'gemm us':>8} "
        f"{'TFLOP/s':>7} {'gmm TF/s':>8} {'fused us':>8} {'overlap':>7} {'vs base':>7}"
    )
    print(head)
    for v in result["variants"]:
        vs = f"{v['vs_baseline']:.2f}x" if v["vs_baseline"] else "-"
        print(
            f"{v['variant']:<17} {v['dispatch_us']['median']:11.1f} {v['wire_GBps']:9.1f} "
            f"{v['logical_GBps']:10.1f} {v['sends_us']['median']:8.1f} {v['sends_wire_GBps']:9.1f} "
            f"{v['gemm_us']['median']:8.1f} {v['gemm_TFLOPs']:7.1f} "
            f"{v['grouped_mm_TFLOPs']:8.1f} {v['fused_us']['median']:8.1f} {v['overlap']:7.2f} "
            f"{vs:>7}"
        )
    for v in result["dispatch_only"]:
        print(
            f"{v['variant']}: dispatch {v['dispatch_us']['median']:.1f} us "
            f"({v['wire_GBps']:.1f} GB/s wire, {v['logical_GBps']:.1f} logical), sends "
            f"{v['sends_us']['median']:.1f} us ({v['sends_wire_GBps']:.1f} GB/s wire)"
        )
    print(f"wrote {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--routing", default="uniform", choices=routing.EDGE_CASES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--emulate", type=int, default=0, help="R ranks on one GPU instead")
    parser.add_argument("--ctas", type=int, default=0, help="programs per rank (0: SM share)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--vary",
        nargs="*",
        default=[],
        metavar="KNOB=V1,V2",
        help="also run 'ours' with these KernelConfig knobs (e.g. dispatch_ctas=48,96)",
    )
    parser.add_argument(
        "--dispatch-programs",
        type=int,
        nargs="*",
        default=[0],
        metavar="P",
        help="programs per rank of the dispatch-only op (mode dispatch; 0: its default)",
    )
    parser.add_argument("--symmetric-size", default="4G")
    args = parser.parse_args()

    def job(world: World) -> None:
        result = bench(world, args)
        if world.rank == 0:
            report(result, args)

    sys.exit(
        run_in_world(
            "perf.bench_dispatch_gemm",
            job,
            emulate=args.emulate,
            symmetric_size=args.symmetric_size,
        )
    )


if __name__ == "__main__":
    main()
