"""Ours against a peer on one GPU: ``python -m perf.bench_peers [--presets ...] [--tokens ...]``.

One rank holds every expert (``EmulatedWorld(1, "cuda")``), uniform routing, the same inputs for
every implementation, each output checked against ``moe_ref`` (fp32) first:

  eager   ``FusedEPMoE`` called as a user calls it (default checks; a T seen before is replayed
          from the layer's own graph)
  graph   one layer call captured in a CUDA graph by the caller, replayed
  liger   Liger-Kernel's fused MoE (``LigerFusedMoEFunction``, pure Triton, its own autotuning:
          100-190 s on the first call of a shape); skipped where liger_kernel is not installed
  torch   the unfused baseline (perf/baseline.py: permute, ``torch._grouped_mm``, SwiGLU, back)

Each round times every implementation once (``--calls`` calls, synchronised at the end), in an
order that rotates from round to round, so the power cap's drift falls on all of them alike; the
figure is the median over rounds.

The weight-read bound of a point: the bytes of the experts its routing touches (w13 and w2 of
each, ``3 H I`` elements) over the read bandwidth a large read-only reduction measures on the
same GPU. Table on stdout, JSON under perf/results/ (perf.record).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from megakernel import FusedEPMoE, routing
from megakernel.placement import Placement
from megakernel.shapes import preset
from megakernel.testing import compare_layer_output, layer_inputs, layer_ref
from perf.baseline import baseline_moe
from perf.record import write_result
from perf.timing import wall_us
from symm_mem import EmulatedWorld

IMPLS = ("eager", "graph", "liger", "torch")
READ_BYTES = 4 << 30  # the bandwidth probe reads this much


def rotations(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: ``names`` rotated by the round's index."""
    return [names[i % len(names) :] + names[: i % len(names)] for i in range(rounds)]


def weight_bytes(topk_ids: torch.Tensor, hidden: int, ffn: int, itemsize: int) -> int:
    """Bytes of expert weights a call must read at least: w13 and w2 of every expert the routing
    names (ids < 0 are dropped slots)."""
    touched = topk_ids[topk_ids >= 0].unique().numel()
    return touched * 3 * hidden * ffn * itemsize


def read_bandwidth() -> float:
    """Bytes per second a large read-only reduction reaches on this GPU (median of 10)."""
    data = torch.ones(READ_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    times = []
    for _ in range(11):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        data.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return READ_BYTES / statistics.median(times[1:])


def liger_call():
    """Liger-Kernel's fused MoE as ``(x, w13, w2, ids, weights) -> out``, or None."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except ImportError:
        return None
    return lambda x, w13, w2, ids, w: LigerFusedMoEFunction.apply(x, w13, w2, ids, w)


def point_calls(world, name: str, T: int, liger) -> tuple[dict, dict]:
    """(the implementations' calls, the point's facts), every output checked first."""
    shape = preset(name).with_tokens(T)
    E, K = shape.num_experts, shape.topk
    placement = Placement.contiguous(E, 1)
    rt = routing.uniform(1, T, E, K, seed=T).to("cuda")
    xs, (x, ids, w, w13, w2) = layer_inputs(shape, placement, rt, [0], 1, "cuda")
    layer = FusedEPMoE(world, shape, w13, w2, placement=placement)
    calls = {
        "eager": lambda: layer(x[0], ids[0], w[0]),
        "torch": lambda: baseline_moe(x[0], ids[0], w[0], w13[0], w2[0], shape, 1),
    }
    if liger is not None:
        calls["liger"] = lambda: liger(x[0], w13[0], w2[0], ids[0], w[0])
    want = layer_ref(x[0], ids[0], w[0], shape, 1)
    for impl, call in calls.items():
        wrong = compare_layer_output(call(), want, shape.dtype, 0)
        if wrong:
            raise SystemExit(f"{name} T={T} {impl}: {wrong[0]}")
    layer.check_errors()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = layer.workspace.run(x, ids, w, w13, w2, mode="layer", validate=False)[0].out
    graph.replay()
    wrong = compare_layer_output(captured, want, shape.dtype, 0)
    if wrong:
        raise SystemExit(f"{name} T={T} graph: {wrong[0]}")
    calls["graph"] = graph.replay
    for call in calls.values():  # warm: eager's second call of a T captures its own graph
        call()
        call()
    facts = dict(weight_bytes=weight_bytes(ids[0], shape.hidden, shape.ffn, 2), layer=layer)
    return calls, facts


def bench_point(world, name: str, T: int, liger, bandwidth: float, args) -> dict:
    calls, facts = point_calls(world, name, T, liger)
    names = [impl for impl in IMPLS if impl in calls]
    times: dict[str, list[float]] = {impl: [] for impl in names}
    for order in rotations(names, args.rounds):
        for impl in order:
            times[impl].append(wall_us(calls[impl], args.calls))
    facts.pop("layer").close()
    row = {"preset": name, "T": T, **{f"{i}_us": statistics.median(times[i]) for i in names}}
    row["bound_us"] = facts["weight_bytes"] / bandwidth * 1e6
    row["graph_over_bound"] = row["graph_us"] / row["bound_us"]
    row["eager_over_graph"] = row["eager_us"] / row["graph_us"]
    return row


def table_row(r: dict) -> str:
    """One point's line: each implementation's time, then eager / graph, Liger over ours (eager
    and graph), the weight-read bound and graph over it."""
    cells = " ".join(f"{r.get(i + '_us', float('nan')):9.1f}" for i in IMPLS)
    liger = r.get("liger_us", float("nan"))
    ratios = (r["eager_over_graph"], liger / r["eager_us"], liger / r["graph_us"])
    return (
        f"{r['preset']:<12} {r['T']:5d} {cells} {ratios[0]:5.2f} {ratios[1]:7.2f} "
        f"{ratios[2]:7.2f} {r['bound_us']:8.1f} {r['graph_over_bound']:7.2f}"
    )


def report(rows: list[dict], bandwidth: float) -> None:
    gpu = torch.cuda.get_device_name()
    path, _ = write_result("peers_one_rank", {"rows": rows, "read_Bps": bandwidth})
    head = f"{'preset':<12} {'T':>5} " + " ".join(f"{i + ' us':>9}" for i in IMPLS)
    head += f" {'e/g':>5} {'liger/e':>7} {'liger/g':>7} {'bound us':>8} {'g/bound':>7}"
    title = f"one rank holding every expert, {gpu}, read bandwidth {bandwidth / 1e9:.0f} GB/s"
    print("\n".join(["", title, head, *map(table_row, rows), f"wrote {path}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--presets", nargs="+", default=["qwen3_30b", "qwen3_235b", "dsv3", "mixtral", "gpt_oss"]
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 128, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    liger = liger_call()
    if liger is None:
        print("liger_kernel is not installed: its column stays empty (pip install liger-kernel)")
    bandwidth = read_bandwidth()
    with EmulatedWorld(1, "cuda") as world:
        rows = [
            bench_point(world, p, T, liger, bandwidth, args)
            for p in args.presets
            for T in args.tokens
        ]
    report(rows, bandwidth)


if __name__ == "__main__":
    main()
