"""Packing strategies swept: ``python -m perf.sweep_pack [--hidden 2048 7168] [--tokens ...]``.

One GPU. For every point (E experts, T tokens, top-K, hidden H, routing uniform or Zipf s) and
every strategy of ``perf.studies.pack``: the pack alone, and the pack + the grouped GEMM1 (+ SwiGLU,
I = 768 for H = 2048 and 2048 for H = 7168, the qwen3_30b and dsv3 widths), each a CUDA graph
replayed (median us). Every strategy's layout is checked on the device against the ``sort``
strategy at every point (the atomic one up to the order within an expert), and against the
sequential ``pack_ref`` at T = 1024; the GEMM against ``gemm1_ref`` at T = 1024, K = 8, uniform.
Writes perf/results/pack_sweep_<gpu>[_H<h>].json; ``python -m perf.pack_report`` draws the plots
and scores the selector from those files (no GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from megakernel import routing
from perf.record import write_result
from perf.studies.pack import (
    STRATEGIES,
    Packed,
    gemm1_ref,
    grouped_gemm1,
    pack,
    pack_ref,
    same_layout,
)
from perf.timing import graphed, time_us

EXPERTS = (8, 32, 64, 128, 256)
TOKENS = (1024, 4096, 16384, 32768)
TOPK = (1, 2, 8)
HIDDEN = (2048, 7168)
FFN = {2048: 768, 7168: 2048}
SKEWS = (0.0, 0.5, 1.0, 1.5)  # 0: uniform, else Zipf exponent
REF_TOKENS = 1024  # points up to this many tokens are also checked against pack_ref (slow)


def make_ids(T: int, E: int, K: int, skew: float, seed: int) -> torch.Tensor:
    if skew == 0.0:
        return routing.uniform(1, T, E, K, seed=seed).topk_ids[0]
    return routing.zipf(1, T, E, K, skew, seed=seed).topk_ids[0]


def check_on_device(got: Packed, want: Packed, x: torch.Tensor, exact: bool) -> None:
    """``want`` is the sort strategy's layout; ``exact=False`` allows any order within an
    expert (rows of one expert compared as (expert, token) keys, sorted)."""
    if not torch.equal(got.expert_start, want.expert_start):
        raise SystemExit("expert_start differs")
    n = int(want.expert_start[-1])
    if exact:
        if not (torch.equal(got.pos, want.pos) and torch.equal(got.src[:n], want.src[:n])):
            raise SystemExit("pos / src differ from the sort strategy")
    else:
        seg = torch.bucketize(torch.arange(n, device=x.device), want.expert_start[1:], right=True)
        key = seg * x.shape[0] + got.src[:n]
        if not torch.equal(torch.sort(key).values, seg * x.shape[0] + want.src[:n]):
            raise SystemExit("atomic strategy: rows differ from the sort strategy's as sets")
    if got.rows is not None:
        live = got.pos >= 0
        token = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(got.pos)
        if not torch.equal(got.rows[got.pos[live].long()], x[token[live]]):
            raise SystemExit("packed rows differ from their tokens")


def sweep(hidden, tokens, experts, topk, skews, log) -> list[dict]:
    points = []
    dev = "cuda"
    for H in hidden:
        I = FFN[H]  # noqa: E741
        x_all = torch.randn(max(tokens), H, dtype=torch.bfloat16, device=dev)
        for E in experts:
            w13 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device=dev) / H**0.5
            for K in topk:
                if K > E:
                    continue
                out = torch.empty(max(tokens) * K, I, dtype=torch.bfloat16, device=dev)
                for T in tokens:
                    x = x_all[:T]
                    for skew in skews:
                        points.append(one_point(x, w13, out, E, T, K, H, skew, log))
            del w13
            torch.cuda.empty_cache()
    return points


def one_point(x, w13, out, E, T, K, H, skew, log) -> dict:
    ids = make_ids(T, E, K, skew, seed=T + E + K).to(x.device)
    want = pack(x, ids, E, "sort")
    ref = pack_ref(x.cpu(), ids.cpu(), E) if T <= REF_TOKENS else None
    identity = torch.arange(T * K, dtype=torch.int32, device=x.device)
    row = {"E": E, "T": T, "K": K, "H": H, "I": w13.shape[1] // 2, "skew": skew}
    for s in STRATEGIES:
        got = pack(x, ids, E, s, validate=False)
        check_on_device(got, want, x, exact=s != "atomic")
        if ref is not None:
            wrong = same_layout(got, ref, exact_order=s != "atomic")
            if wrong:
                raise SystemExit(f"{s} differs from pack_ref in {wrong}")
        if T <= REF_TOKENS and K == 8 and skew == 0.0:
            grouped_gemm1(x, got, w13, out, identity=identity)
            live = got.pos >= 0
            expect = gemm1_ref(x, ids, w13)[live]
            torch.testing.assert_close(
                out[got.pos[live].long()].float(), expect, atol=3e-2, rtol=2e-2
            )

        def pack_only(s=s):
            pack(x, ids, E, s, validate=False)

        def pack_gemm(s=s):
            grouped_gemm1(x, pack(x, ids, E, s, validate=False), w13, out, identity=identity)

        inner = max(1, min(20, int(2e5 // (T * K * H / 2048))))
        row[f"{s}_pack_us"] = time_us(graphed(pack_only), repeats=5, inner=20)["median"]
        row[f"{s}_total_us"] = time_us(graphed(pack_gemm), repeats=5, inner=inner)["median"]
    best = min(STRATEGIES, key=lambda s: row[f"{s}_total_us"])
    row["best_total"] = best
    row["best_pack"] = min(STRATEGIES, key=lambda s: row[f"{s}_pack_us"])
    log(
        f"E={E:<3} T={T:<5} K={K} H={H} skew={skew}: "
        + " ".join(f"{s} {row[f'{s}_pack_us']:.0f}/{row[f'{s}_total_us']:.0f}" for s in STRATEGIES)
        + f"  best {best}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--topk", type=int, nargs="+", default=list(TOPK))
    parser.add_argument("--skews", type=float, nargs="+", default=list(SKEWS))
    args = parser.parse_args()
    start = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {line}", flush=True)

    points = sweep(args.hidden, args.tokens, args.experts, args.topk, args.skews, log)
    suffix = "" if args.hidden == list(HIDDEN) else "_H" + "_".join(map(str, args.hidden))
    name, _ = write_result(f"pack_sweep{suffix}", {"points": points, "strategies": STRATEGIES})
    wins = {s: sum(p["best_total"] == s for p in points) for s in STRATEGIES}
    print(f"\n{len(points)} points; best pack + GEMM per strategy: {wins}; wrote {name}")


if __name__ == "__main__":
    main()
