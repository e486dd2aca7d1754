"""What a call in rounds costs: ``python -m perf.bench_rounds [--preset qwen3_30b] [--ranks 4]
[--tokens 1024 4096]``.

R ranks emulated on one GPU route every token to the experts of one rank (``routing
.all_to_one_rank``). The same call runs on two layers: one with the default capacity (twice the
uniform average, so the call takes R / 2 rounds) and one whose capacity holds the whole call (one
round). Each output is checked against moe_ref first; the times are CUDA-graph replays of the
whole call, the two layers alternated. Prints a table and writes JSON to ``perf/results/``.
"""

from __future__ import annotations

import argparse

import torch

from megakernel import FusedEPMoE, routing
from megakernel.shapes import preset
from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
from perf.record import write_result
from perf.timing import graphed, time_many
from symm_mem import EmulatedWorld


def bench_point(world, shape, T: int, seed: int = 1) -> dict:
    """Rounds and graph-replay time of one all-to-one call on both layers."""
    R = world.world_size
    rt = routing.all_to_one_rank(R, T, shape.num_experts, shape.topk, dst=0, seed=seed).to("cuda")
    xs = make_tokens(shape, [T] * R, seed, "cuda")
    w13, w2 = make_w13(shape, seed, "cuda"), make_w2(shape, seed, "cuda")
    args = dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
    whole = R * shape.max_tokens_per_rank * shape.topk  # every row of the worst call
    layers = {
        "rounds": FusedEPMoE.from_dense(world, shape, w13, w2, graphs=False),
        "one_round": FusedEPMoE.from_dense(world, shape, w13, w2, capacity=whole, graphs=False),
    }
    capacity = layers["rounds"].workspace.capacity
    calls, rounds = {}, {}
    for name, layer in layers.items():
        out = layer(*args)
        layer.check_errors()
        for r in range(R):
            ids, w = rt.topk_ids[r], rt.topk_weights[r]
            wrong = check_layer_output(out[r], xs[r], ids, w, shape, seed, r)
            if wrong:
                raise SystemExit(f"{name}: wrong output: {wrong[:2]}")
        rounds[name] = layer.stats()["rounds_of_those_calls"] or 1
        calls[name] = graphed(lambda layer=layer: layer(*args))
    times = time_many(calls)
    for layer in layers.values():
        layer.check_errors()
        layer.close()
    us = {name: t["median"] for name, t in times.items()}
    return dict(
        T=T,
        rounds=rounds["rounds"],
        capacity=capacity,
        rounds_us=us["rounds"],
        one_round_us=us["one_round"],
        ratio=us["rounds"] / us["one_round"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3_30b")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    args = parser.parse_args()
    shape = preset(args.preset)
    gpu = torch.cuda.get_device_name()
    print(f"{args.preset}, all-to-one routing, {args.ranks} ranks emulated on one {gpu}")
    print(f"{'T/rank':>7} {'rounds':>6} {'rounds us':>10} {'1 round us':>10} {'ratio':>6}")
    rows = []
    with EmulatedWorld(args.ranks, "cuda") as world:
        for T in args.tokens:
            row = bench_point(world, shape, T)
            rows.append(row)
            print(
                f"{T:7d} {row['rounds']:6d} {row['rounds_us']:10.1f} {row['one_round_us']:10.1f} "
                f"{row['ratio']:6.2f}",
                flush=True,
            )
    meta = {"preset": args.preset, "ranks": args.ranks, "gpu": gpu, "rows": rows}
    path, _ = write_result(f"rounds_{args.preset}_r{args.ranks}", meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
