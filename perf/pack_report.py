"""Plots and selector score of the packing sweep: ``python -m perf.pack_report [--gpu SLUG]``.

Reads perf/results/pack_sweep_H*_<gpu>.json (written by ``perf.sweep_pack``; no GPU needed here)
and writes, next to them:
  - pack_time_vs_T_<gpu>.png: time against T per strategy, pack alone and pack + GEMM
    (E = 128, K = 8, uniform; one column per H);
  - pack_best_map_<gpu>.png: over (E, skew), the strategy fastest most often across T and K, for
    pack + GEMM and for the pack alone among the strategies that move rows;
and prints how far ``choose_strategy``'s pick is from the best at every point (bar: 5%).
"""

from __future__ import annotations

import argparse
import collections
import json

from perf.record import RESULTS
from perf.studies.pack import STRATEGIES, choose_strategy

MOVING = ("sort", "atomic", "scan")  # the strategies that materialise packed rows


def load(gpu: str) -> list[dict]:
    files = sorted(RESULTS.glob(f"pack_sweep_H*_{gpu}.json"))
    if not files:
        raise SystemExit(f"no perf/results/pack_sweep_H*_{gpu}.json: run perf.sweep_pack first")
    return [p for f in files for p in json.loads(f.read_text())["points"]]


def score(points: list[dict]) -> dict:
    """Worst ratio of the selector's pick to the best, for pack + GEMM and for packed rows."""
    out = {}
    for name, keys, field, materialize in (
        ("pack + GEMM", STRATEGIES, "total", False),
        ("packed rows (pack alone)", MOVING, "pack", True),
    ):
        ratios = []
        for p in points:
            best = min(p[f"{s}_{field}_us"] for s in keys)
            pick = choose_strategy(p["T"], p["K"], p["E"], materialize=materialize)
            ratios.append((p[f"{pick}_{field}_us"] / best, p))
        worst, where = max(ratios, key=lambda r: r[0])
        over = sum(r > 1.05 for r, _ in ratios)
        out[name] = {"worst": worst, "where": where, "over_5pct": over, "points": len(ratios)}
    return out


def plot(points: list[dict], gpu: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden = sorted({p["H"] for p in points})
    fig, axes = plt.subplots(2, len(hidden), figsize=(5 * len(hidden), 8), squeeze=False)
    for col, H in enumerate(hidden):
        sel = [p for p in points if p["H"] == H and p["E"] == 128 and p["K"] == 8]
        sel = sorted((p for p in sel if p["skew"] == 0.0), key=lambda p: p["T"])
        for row, field in enumerate(("pack", "total")):
            ax = axes[row][col]
            for s in STRATEGIES:
                ax.plot([p["T"] for p in sel], [p[f"{s}_{field}_us"] for p in sel], "o-", label=s)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            what = "pack alone" if field == "pack" else "pack + GEMM1"
            ax.set_title(f"{what}, H={H}, E=128, K=8, uniform")
            ax.set_xlabel("tokens T")
            ax.set_ylabel("us")
            ax.legend()
    fig.tight_layout()
    names = [f"pack_time_vs_T_{gpu}.png"]
    fig.savefig(RESULTS / names[0], dpi=110)

    experts = sorted({p["E"] for p in points})
    skews = sorted({p["skew"] for p in points})
    colors = {s: i for i, s in enumerate(STRATEGIES)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (title, keys, field) in zip(
        axes,
        (
            ("pack + GEMM1: fastest", STRATEGIES, "total"),
            ("pack alone, rows moved", MOVING, "pack"),
        ),
        strict=True,
    ):
        grid = [[0] * len(experts) for _ in skews]
        for i, skew in enumerate(skews):
            for j, E in enumerate(experts):
                cell = [p for p in points if p["E"] == E and p["skew"] == skew]
                wins = collections.Counter(
                    min(keys, key=lambda s, p=p: p[f"{s}_{field}_us"]) for p in cell
                )
                best, count = wins.most_common(1)[0]
                grid[i][j] = colors[best]
                ax.text(j, i, f"{best}\n{count}/{len(cell)}", ha="center", va="center", fontsize=8)
        ax.imshow(grid, cmap="Pastel1", vmin=0, vmax=8, aspect="auto", origin="lower")
        ax.set_xticks(range(len(experts)), [str(e) for e in experts])
        ax.set_yticks(range(len(skews)), ["uniform" if s == 0 else f"zipf {s}" for s in skews])
        ax.set_xlabel("experts E")
        ax.set_title(f"{title} (most wins over T, K, H)")
    fig.tight_layout()
    names.append(f"pack_best_map_{gpu}.png")
    fig.savefig(RESULTS / names[1], dpi=110)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", default="nvidia_h100_80gb_hbm3")
    args = parser.parse_args()
    points = load(args.gpu)
    names = plot(points, args.gpu)
    print(f"{len(points)} points; wrote {', '.join(names)}")
    for field, keys in (("total", STRATEGIES), ("pack", MOVING)):
        wins = collections.Counter(min(keys, key=lambda s: p[f"{s}_{field}_us"]) for p in points)
        print(
            f"fastest {'pack + GEMM' if field == 'total' else 'pack alone (rows moved)'}: "
            f"{dict(wins)}"
        )
    for name, s in score(points).items():
        w = s["where"]
        print(
            f"selector, {name}: worst {s['worst']:.3f}x the best (E={w['E']} T={w['T']} "
            f"K={w['K']} H={w['H']} skew={w['skew']}); {s['over_5pct']} of {s['points']} "
            f"points over 5%"
        )


if __name__ == "__main__":
    main()
