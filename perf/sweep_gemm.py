"""GEMM tile sweep: ``python -m perf.sweep_gemm [--preset dsv3] [--ranks 2]``.

One GPU, ``EmulatedWorld(1, "cuda")`` holding the experts one rank of an R-rank world would
hold (``E / R``) and about the rows it would receive under uniform routing (T K rows: T tokens
routed top-K over those experts), so the grouped GEMM has the real per-expert row counts. For
each tile configuration: one call checked against ``expert_act_ref``, then the tile tasks alone
(CUDA graph replays), against ``torch._grouped_mm`` + SwiGLU on the same rows. Prints a table; the
best row is the preset ``KernelConfig`` default cites. ``--vary KNOB=V1,V2`` times every
configuration again with each other value of a ``KernelConfig`` knob (``gemm1_tma=0``,
``down_tma=1``), for either GEMM.

``--gemm down`` sweeps the down projection's tile (``down_block_n``, ``down_block_k``) instead,
GEMM1 at its default: each configuration makes one layer call (checked against ``moe_ref``),
then times both GEMMs alone (``stage="compute"``); the down GEMM's share is that minus GEMM1
alone (``stage="tiles"`` of mode "gemm"), against ``torch._grouped_mm`` on the same activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from megakernel import KernelConfig, Megakernel, routing
from megakernel.placement import Placement
from megakernel.shapes import preset
from megakernel.testing import (
    check_call,
    check_layer_output,
    local_w2,
    local_w13,
    make_tokens,
    run_poisoned,
)
from perf.record import knob_values
from perf.timing import graphed, time_us
from symm_mem import EmulatedWorld

CONFIGS = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 4, 5),
    (128, 128, 32, 8, 5),
]


DOWN_CONFIGS = [(128, 64), (256, 64), (128, 128), (256, 32), (64, 64)]  # (block_n, block_k)


def sweep_down(shape, rt, xs, w13, placement, knobs: list[dict], configs: list) -> None:
    w2 = local_w2(shape, placement, 0, 1, "cuda")
    T, K = shape.max_tokens_per_rank, shape.topk
    x, ids, weights = {0: xs[0]}, {0: rt.topk_ids[0]}, {0: rt.topk_weights[0]}
    rows = []
    with EmulatedWorld(1, "cuda") as world:
        for (bn, bk), knob in itertools.product(configs, knobs):
            cfg = KernelConfig(down_block_n=bn, down_block_k=bk, **knob)
            ws = Megakernel(world, shape, config=cfg, capacity=T * K)
            h = ws.run(x, ids, weights, {0: w13}, {0: w2}, mode="layer")[0]
            ws.check_errors()
            problems = check_layer_output(h.out, xs[0], ids[0], weights[0], shape, 1, 0)
            n = h.num_recv()

            def stage(mode, name, ws=ws):
                return lambda: ws.run(
                    x, ids, weights, {0: w13}, {0: w2}, mode=mode, stage=name, validate=False
                )

            both = time_us(graphed(stage("layer", "compute")))["median"]
            ws.run(x, ids, weights, {0: w13}, mode="gemm")
            up = time_us(graphed(stage("gemm", "tiles")))["median"]
            act, offs = h.act[:n].clone(), torch.cumsum(h.plan.expert_rows, 0).int()
            rows.append((bn, bk, knob, both, up, both - up, problems))
            ws.close()
    flops = 2 * n * shape.hidden * shape.ffn
    ref = time_us(lambda: torch._grouped_mm(act, w2.transpose(1, 2), offs=offs))["median"]
    print(
        f"\ndown GEMM sweep: {shape.num_experts} experts, {n} rows, {torch.cuda.get_device_name()}"
    )
    print(f"torch._grouped_mm: {ref:.1f} us, {flops / ref / 1e6:.1f} TFLOP/s")
    print(
        f"{'BN':>4} {'BK':>4} {'knob':>12} {'both us':>8} {'gemm1 us':>8} {'down us':>8} "
        f"{'TFLOP/s':>8} ok"
    )
    for bn, bk, knob, both, up, down, problems in rows:
        print(
            f"{bn:4d} {bk:4d} {knob_name(knob):>12} {both:8.1f} {up:8.1f} {down:8.1f} "
            f"{flops / down / 1e6:8.1f} {'yes' if not problems else problems[0]}"
        )


def knob_name(knob: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in knob.items()) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, default=2, help="R of the world being modelled")
    parser.add_argument("--gemm", default="up", choices=["up", "down"])
    parser.add_argument(
        "--vary", nargs="*", default=[], metavar="KNOB=V1,V2", help="also time these knobs"
    )
    parser.add_argument(
        "--configs",
        nargs="*",
        type=int,
        metavar="N",
        help="only these rows of the sweep (GEMM1: 0 is the default; down: 1 is)",
    )
    args = parser.parse_args()
    table = DOWN_CONFIGS if args.gemm == "down" else CONFIGS
    configs = table if args.configs is None else [table[i] for i in args.configs]
    full = preset(args.preset)
    R, T = args.ranks, args.tokens
    # one rank's share: E / R experts receiving T K rows (what R ranks send it on average)
    shape = dataclasses.replace(full, num_experts=full.num_experts // R, max_tokens_per_rank=T)
    rt = routing.uniform(1, T, shape.num_experts, shape.topk, seed=1).to("cuda")
    placement = Placement.contiguous(shape.num_experts, 1)
    xs = make_tokens(shape, [T], 1, "cuda")
    w = local_w13(shape, placement, 0, 1, "cuda")
    knobs = [{}] + [{knob: value} for knob, value in knob_values(args.vary)]
    if args.gemm == "down":
        sweep_down(shape, rt, xs, w, placement, knobs, configs)
    else:
        sweep_up(shape, rt, xs, w, placement, knobs, configs, f"{args.preset} as one of {R} ranks")


def sweep_up(shape, rt, xs, w, placement, knobs, configs, what: str) -> None:
    """GEMM1 + SwiGLU tasks alone (stage "tiles") for each tile config and knob, checked first,
    against ``torch._grouped_mm`` + SwiGLU on the same received rows."""
    T = shape.max_tokens_per_rank
    rows = []
    with EmulatedWorld(1, "cuda") as world:
        for (bm, bn, bk, warps, stages), knob in itertools.product(configs, knobs):
            cfg = KernelConfig(
                block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, **knob
            )
            ws = Megakernel(world, shape, config=cfg, capacity=T * shape.topk)
            h = run_poisoned(ws, xs, rt.topk_ids, {0: w})[0]
            problems = check_call(h, xs, rt.topk_ids, w, placement, "gemm")
            n = h.num_recv()
            flops = 2 * n * shape.hidden * 2 * shape.ffn
            tiles = time_us(
                graphed(
                    lambda ws=ws: ws.run(
                        {0: xs[0]},
                        {0: rt.topk_ids[0]},
                        None,
                        {0: w},
                        validate=False,
                        stage="tiles",
                    )
                ),
            )["median"]
            rows.append((bm, bn, bk, warps, stages, knob, tiles, flops / tiles / 1e6, problems))
            ws.close()
        recv = h.resolved()
        offs = torch.cumsum(h.plan.expert_rows, 0).int()

        def gmm():
            hh = torch._grouped_mm(recv, w.transpose(1, 2), offs=offs)
            torch.nn.functional.silu(hh[:, : shape.ffn]) * hh[:, shape.ffn :]

        ref = time_us(gmm)["median"]
    print(
        f"\nGEMM1 sweep, {what}: {shape.num_experts} experts, "
        f"{n} rows ({n / shape.num_experts:.0f} per expert), {torch.cuda.get_device_name()}"
    )
    print(f"torch._grouped_mm + SwiGLU: {ref:.1f} us, {flops / ref / 1e6:.1f} TFLOP/s")
    print(
        f"{'BM':>4} {'BN':>4} {'BK':>4} {'warps':>5} {'stages':>6} {'knob':>12} {'us':>8} "
        f"{'TFLOP/s':>8} ok"
    )
    for bm, bn, bk, warps, stages, knob, us, tf, problems in rows:
        print(
            f"{bm:4d} {bn:4d} {bk:4d} {warps:5d} {stages:6d} {knob_name(knob):>12} {us:8.1f} "
            f"{tf:8.1f} {'yes' if not problems else problems[0]}"
        )


if __name__ == "__main__":
    main()
