"""Placement policies against contiguous placement: ``python -m perf.bench_placement [--preset
dsv3] [--ranks 8] [--tokens 4096] [--spare 1] [--time]``.

Synthetic routings, each named by its parameters:
  zipf-S       expert popularity ~ 1 / rank^S over a random ranking (S = 0.5, 1.0, 1.5)
  hot-F        uniform, except a fraction F of the tokens always include expert 0 (F = 5, 10, 20 %)
  correlated   tokens in classes of 2K experts (a random split of the experts); a token picks its K
               experts within its class with probability 0.9, else uniformly

Each policy is fitted on statistics of one routing (``RoutingStats``, co-selected pairs sampled
from every 4th token) and scored on another drawn the same way (another seed), as a placement
chosen from past calls serves the next ones:
  contiguous   rank r holds experts [r L, (r + 1) L)
  balanced     ``balanced_replication``, ``--spare`` extra slots per rank for replicas
  grouping     ``coactivation_grouping``, E / R slots per rank
  both         ``grouped_replication``, ``--spare`` extra slots per rank

Per (routing, policy), from the traffic model: rows sent to other ranks with token saving (and
their bytes), the rows the busiest rank receives and max / mean over ranks. ``--time`` also times
the layer with R ranks emulated on one GPU (CUDA-graph replays, outputs checked against
``moe_ref`` first), where a rank that receives more rows is the straggler. Table on stdout, JSON
under perf/results/, and a PNG of remote bytes and max rank load per policy.
"""

from __future__ import annotations

import argparse

from megakernel import routing
from megakernel.placement import Placement
from megakernel.placement.policies import (
    balanced_replication,
    coactivation_grouping,
    evaluate,
    grouped_replication,
)
from megakernel.placement.stats import RoutingStats
from megakernel.shapes import preset
from megakernel.traffic import row_bytes
from perf.record import RESULTS, write_result

POLICIES = ("contiguous", "balanced", "grouping", "both")


def routings(R: int, T: int, E: int, K: int, seed: int) -> dict[str, routing.Routing]:
    """Every synthetic routing of the study, its tokens drawn with ``seed``; the structure
    (zipf's ranking, the correlated classes, the hot expert) is the same for every seed."""
    out = {f"zipf-{s}": routing.zipf(R, T, E, K, s, seed, layout_seed=0) for s in (0.5, 1.0, 1.5)}
    for f in (5, 10, 20):
        out[f"hot-{f}%"] = routing.hot_expert(R, T, E, K, f / 100, seed)
    out["correlated"] = routing.correlated(R, T, E, K, 2 * K, 0.9, seed, layout_seed=0)
    return out


def placements(stats: RoutingStats, R: int, spare: int) -> dict[str, Placement]:
    E = stats.num_experts
    return {
        "contiguous": Placement.contiguous(E, R),
        "balanced": balanced_replication(stats, R, E // R + spare),
        "grouping": coactivation_grouping(stats, R),
        "both": grouped_replication(stats, R, E // R + spare),
    }


def layer_us(shape, placement: Placement, rt: routing.Routing) -> float:
    """The layer's time with R ranks emulated on one GPU (graph replays), output checked."""
    from megakernel import FusedEPMoE
    from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
    from perf.timing import graphed, time_us
    from symm_mem import EmulatedWorld

    R = placement.world_size
    rt = rt.to("cuda")
    xs = make_tokens(shape, [ids.shape[0] for ids in rt.topk_ids], 1, "cuda")
    w13, w2 = make_w13(shape, 1, "cuda"), make_w2(shape, 1, "cuda")
    with EmulatedWorld(R, "cuda") as world:
        layer = FusedEPMoE.from_dense(world, shape, w13, w2, placement=placement, graphs=False)
        args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
        out = layer(*args)
        layer.check_errors()
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            wrong = check_layer_output(out[r], xs[r], ids, w, shape, 1, r)
            if wrong:
                raise SystemExit(f"wrong output with this placement: {wrong[:2]}")
        us = time_us(graphed(lambda: layer(*args)))["median"]
        layer.check_errors()
        layer.close()
    return us


def plot(rows: list[dict], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["routing"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        mine = [next(r for r in rows if r["routing"] == n and r["policy"] == policy) for n in names]
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [r["remote_bytes"] / 1e6 for r in mine], width, label=policy)
        axes[1].bar(xs, [r["max_over_mean"] for r in mine], width, label=policy)
    for ax, label in zip(axes, ("remote MB per call (token saving)", "max / mean rows per rank"),
                         strict=True):  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30)
        ax.set_ylabel(label)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = str(RESULTS / "placement_policies.png")
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="per rank")
    parser.add_argument("--spare", type=int, default=1, help="replica slots per rank")
    parser.add_argument("--time", action="store_true", help="also time the layer (one GPU)")
    args = parser.parse_args()
    shape = preset(args.preset).with_tokens(args.tokens)
    R, T, E, K = args.ranks, args.tokens, shape.num_experts, shape.topk
    row_size = row_bytes(shape.hidden, shape.dtype, shape.fp8)
    fit, score = routings(R, T, E, K, seed=1), routings(R, T, E, K, seed=2)
    rows = []
    head = f"{'routing':<11} {'policy':<10} {'remote rows':>11} {'vs contig':>9} {'max rows':>8}"
    head += f" {'max/mean':>8}" + (f" {'layer us':>9}" if args.time else "")
    title = f"{args.preset} (E {E}, K {K}), {R} ranks, {T} tokens per rank, {args.spare} spare"
    print(f"{title}\n{head}")
    for name, rt in score.items():
        stats = RoutingStats.count(fit[name].topk_ids, E, sample_every=4)
        base = None
        for policy, pl in placements(stats, R, args.spare).items():
            row = dict(routing=name, policy=policy, **evaluate(pl, rt.topk_ids))
            row["remote_bytes"] = row["remote_rows"] * row_size
            base = base or row["remote_rows"]
            line = f"{name:<11} {policy:<10} {row['remote_rows']:11.0f} "
            line += f"{row['remote_rows'] / base:9.2f} {row['max_rows']:8.0f} "
            line += f"{row['max_over_mean']:8.3f}"
            if args.time:
                row["layer_us"] = layer_us(shape, pl, rt)
                line += f" {row['layer_us']:9.1f}"
            print(line, flush=True)
            rows.append(row)
    path, _ = write_result(f"placement_{args.preset}_R{R}", {"rows": rows, "title": title})
    print(f"wrote {path} and {plot(rows, title)}")


if __name__ == "__main__":
    main()
