"""GEMM tile sweep: ``python -m perf.sweep_gemm [--preset dsv3] [--ranks 2]``.

One GPU, ``EmulatedWorld(1, "cuda")`` holding the experts one rank of an R-rank world would
hold (``E / R``) and about the rows it would receive under uniform routing (T K rows: T tokens
routed top-K over those experts), so the grouped GEMM has the real per-expert row counts. For
each tile configuration: one call checked against ``expert_act_ref``, then the tile tasks alone
(CUDA graph replays), against ``torch._grouped_mm`` + SwiGLU on the same rows. Prints a table; the
best row is the preset ``KernelConfig`` default cites.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from megakernel import routing
from megakernel.kernel import KernelConfig, Megakernel
from megakernel.placement import Placement
from megakernel.shapes import preset
from megakernel.verify import check_call, local_w13, make_tokens, run_poisoned
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, default=2, help="R of the world being modelled")
    args = parser.parse_args()
    full = preset(args.preset)
    R, T = args.ranks, args.tokens
    # one rank's share: E / R experts receiving T K rows (what R ranks send it on average)
    shape = dataclasses.replace(full, num_experts=full.num_experts // R, max_tokens_per_rank=T)
    rt = routing.uniform(1, T, shape.num_experts, shape.topk, seed=1).to("cuda")
    placement = Placement.contiguous(shape.num_experts, 1)
    xs = make_tokens(shape, [T], 1, "cuda")
    w = local_w13(shape, placement, 0, 1, "cuda")
    rows = []
    with EmulatedWorld(1, "cuda") as world:
        for bm, bn, bk, warps, stages in CONFIGS:
            cfg = KernelConfig(
                block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages
            )
            ws = Megakernel(world, shape, config=cfg, capacity=T * shape.topk)
            h = run_poisoned(ws, xs, rt.topk_ids, {0: w})[0]
            problems = check_call(h, xs, rt.topk_ids, w, placement, "gemm")
            n = h.num_recv()
            flops = 2 * n * shape.hidden * 2 * shape.ffn
            tiles = time_us(
                graphed(
                    lambda ws=ws: ws.run(
                        {0: xs[0]}, {0: rt.topk_ids[0]}, None, {0: w}, validate=False, stage="tiles"
                    )
                ),
            )["median"]
            rows.append((bm, bn, bk, warps, stages, tiles, flops / tiles / 1e6, problems))
            ws.close()
        recv = h.resolved()
        offs = torch.cumsum(h.plan.expert_rows, 0).int()

        def gmm():
            hh = torch._grouped_mm(recv, w.transpose(1, 2), offs=offs)
            torch.nn.functional.silu(hh[:, : shape.ffn]) * hh[:, shape.ffn :]

        ref = time_us(gmm)["median"]
    print(
        f"\nGEMM1 sweep, {args.preset} as one of {R} ranks: {shape.num_experts} experts, "
        f"{n} rows ({n / shape.num_experts:.0f} per expert), {torch.cuda.get_device_name()}"
    )
    print(f"torch._grouped_mm + SwiGLU: {ref:.1f} us, {flops / ref / 1e6:.1f} TFLOP/s")
    print(f"{'BM':>4} {'BN':>4} {'BK':>4} {'warps':>5} {'stages':>6} {'us':>8} {'TFLOP/s':>8} ok")
    for bm, bn, bk, warps, stages, us, tf, problems in rows:
        print(
            f"{bm:4d} {bn:4d} {bk:4d} {warps:5d} {stages:6d} {us:8.1f} {tf:8.1f} "
            f"{'yes' if not problems else problems[0]}"
        )


if __name__ == "__main__":
    main()
