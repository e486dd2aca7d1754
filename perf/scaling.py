"""The layer against the GPU count: ``python -m perf.scaling [--presets dsv3 qwen3_235b]
[--tokens 4096]``, then ``python -m perf.scaling --plot``.

A run relaunches itself on every visible GPU (NVSHMEM world, one rank each; ``--emulate R`` puts
R ranks on one GPU instead). Per preset, T tokens per rank, uniform routing, after one call checked
against ``moe_ref`` on every rank:
  layer      the whole layer, CUDA-graph replays (median; the slowest rank)
  comm       the layer without the GEMM math; compute: both GEMMs alone (``Megakernel.run``'s
             timing probes)
  shares     one traced call (``KernelConfig(trace=True)``): the busy time of each task kind,
             summed over ranks and programs, as a fraction of all of it: dispatch, GEMM1, down
             projection + combine put, top-k reduce; and the critical path by phase
JSON: perf/results/scaling_T<T>_R<R>_<world>_<gpu>.json.

``--plot`` reads every such JSON of the NVSHMEM world (real GPUs; emulated runs share one GPU and
are left out) and draws, per preset, the layer time against R (with comm and compute alone) and
the shares at every R: perf/results/scaling_T<T>.png.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from perf.record import RESULTS

KINDS = ("dispatch", "gemm1", "down_combine", "topk_reduce")
LABELS = {
    "dispatch": "dispatch",
    "gemm1": "GEMM1 + SwiGLU",
    "down_combine": "GEMM2 + combine put",
    "topk_reduce": "top-k reduce",
}


def measure(world, name: str, args) -> dict | None:
    """One preset on this world; the row on rank 0, None elsewhere."""
    from megakernel import KernelConfig, Megakernel, profiler, routing
    from megakernel.placement import Placement
    from megakernel.shapes import preset
    from megakernel.testing import check_layer_output, layer_inputs
    from perf.bench_layer import time_layer

    shape = preset(name).with_tokens(args.tokens)
    R, E, K, T = world.world_size, shape.num_experts, shape.topk, args.tokens
    ranks, dev = world.local_ranks, world.device
    placement = Placement.contiguous(E, R)
    rt = routing.uniform(R, T, E, K, seed=1).to(dev)
    xs, inputs = layer_inputs(shape, placement, rt, ranks, 1, dev)
    row: dict = {"preset": name}
    records: list = []
    for trace in (False, True):
        ws = Megakernel(world, shape, placement=placement, config=KernelConfig(trace=trace))
        for _ in range(2):  # the first call compiles; the second is the one kept
            handles = ws.run(*inputs, mode="layer")
        ws.check_errors()
        for r in ranks:
            ids, weights = rt.topk_ids[r], rt.topk_weights[r]
            problems = check_layer_output(handles[r].out, xs[r], ids, weights, shape, 1, r)
            if problems:
                raise SystemExit(f"{name}, rank {r}: wrong layer output: {problems[:4]}")
        if trace:
            records = [rec for r in ranks for rec in profiler.decode(handles[r].trace, r)[0]]
        else:
            row.update({key: t["median"] for key, t in time_layer(ws, inputs).items()})
            ws.check_errors()
        ws.close()
    records = profiler.gather_records(world, records)
    offsets = profiler.clock_offsets(world)
    if world.rank != 0:
        return None
    summary = profiler.summarize(profiler.align(records, offsets))
    busy = {kind: s.total_us for kind, s in summary.kinds.items()}
    total = sum(busy.values())
    row["busy_us"] = busy
    row["shares"] = {kind: us / total for kind, us in busy.items()}
    row["critical_path_us"] = dict(summary.critical_path)
    row["traced_span_us"] = max(summary.span_us.values())
    return row


def run(world, args) -> None:
    from perf.record import write_result

    rows = [measure(world, name, args) for name in args.presets]
    if world.rank != 0:
        return
    R, kind = world.world_size, type(world).__name__
    result = {"tokens_per_rank": args.tokens, "ranks": R, "world": kind, "presets": rows}
    name, meta = write_result(f"scaling_T{args.tokens}_R{R}_{kind}", result)
    print(f"\nscaling, T={args.tokens}, {R} ranks ({kind}), {meta['gpu']}, git {meta['git']}")
    print(
        f"{'preset':<11} {'layer us':>9} {'comm us':>8} {'compute us':>10} "
        + " ".join(f"{k:>12}" for k in KINDS)
    )
    for v in rows:
        shares = " ".join(f"{100 * v['shares'].get(k, 0):11.1f}%" for k in KINDS)
        print(
            f"{v['preset']:<11} {v['layer_us']:9.1f} {v['comm_us']:8.1f} "
            f"{v['compute_us']:10.1f} {shares}"
        )
    print(f"wrote {name}")


def load(tokens: int) -> dict[str, dict[int, dict]]:
    """preset -> R -> row, from the NVSHMEM-world scaling JSONs of ``tokens`` per rank. Where
    two GPU models have a point at the same R, the one of the largest world's GPU is kept: the
    plot is about that node, and other GPUs only fill the counts it has not run."""
    paths = sorted(RESULTS.glob(f"scaling_T{tokens}_R*_NvshmemWorld_*.json"))
    results = [json.loads(path.read_text()) for path in paths]
    node_gpu = max(results, key=lambda r: r["ranks"])["meta"]["gpu"] if results else None
    found: dict[str, dict[int, dict]] = {}
    for result in sorted(results, key=lambda r: r["meta"]["gpu"] == node_gpu):  # node's last
        for row in result["presets"]:
            row = {**row, "gpu": result["meta"]["gpu"]}
            found.setdefault(row["preset"], {})[result["ranks"]] = row
    return found


def plot(tokens: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = load(tokens)
    if not found:
        raise SystemExit(f"no perf/results/scaling_T{tokens}_R*_NvshmemWorld_*.json: run first")
    fig, axes = plt.subplots(len(found), 2, figsize=(11, 3.6 * len(found)), squeeze=False)
    for (name, by_r), (left, right) in zip(sorted(found.items()), axes, strict=True):
        ranks = sorted(by_r)
        for key, style in (("layer", "o-"), ("comm", "s--"), ("compute", "^--")):
            ms = [by_r[r][f"{key}_us"] / 1e3 for r in ranks]
            left.plot(ranks, ms, style, label=f"{key}" + ("" if key == "layer" else " alone"))
        # the GPU of each point under its count: a point may come from another GPU model
        ticks = [
            f"{r}\n{by_r[r]['gpu'].split()[1] if ' ' in by_r[r]['gpu'] else ''}" for r in ranks
        ]
        left.set_xscale("log", base=2)
        left.set_xticks(ranks, ticks)
        left.set_xlabel("GPUs (ranks)")
        left.set_ylabel("ms per call")
        left.set_ylim(bottom=0)
        left.set_title(f"{name}, T = {tokens} per rank")
        left.legend(fontsize=8)
        bottom = [0.0] * len(ranks)
        for kind in KINDS:
            share = [100 * by_r[r]["shares"].get(kind, 0) for r in ranks]
            right.bar(ticks, share, bottom=bottom, label=LABELS[kind])
            bottom = [b + s for b, s in zip(bottom, share, strict=True)]
        right.set_xlabel("GPUs (ranks)")
        right.set_ylabel("% of busy time (traced call)")
        right.set_title(f"{name}: where the programs' time goes")
        right.legend(fontsize=8, loc="lower right")
    gpus = sorted({row["gpu"] for by_r in found.values() for row in by_r.values()})
    fig.suptitle(f"MoE layer scaling ({', '.join(gpus)})")
    fig.tight_layout()
    path = RESULTS / f"scaling_T{tokens}.png"
    fig.savefig(path, dpi=110)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["dsv3", "qwen3_235b"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--emulate", type=int, default=0, help="R ranks on one GPU instead")
    parser.add_argument("--symmetric-size", default="8G")
    parser.add_argument("--plot", action="store_true", help="draw the JSONs found, run nothing")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.tokens)}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("perf.scaling measures GPUs; --plot draws what earlier runs wrote")
    from symm_mem.launch import run_in_world

    job = lambda world: run(world, args)  # noqa: E731
    return run_in_world(
        "perf.scaling", job, emulate=args.emulate, symmetric_size=args.symmetric_size
    )


if __name__ == "__main__":
    sys.exit(main())
