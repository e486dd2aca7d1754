"""Ours against a peer on one GPU: ``python -m perf.bench_peers [--presets ...] [--tokens ...]``.

One rank holds every expert (``EmulatedWorld(1, "cuda")``), one layer per preset sized for the
sweep's largest T, uniform routing, the same inputs for every implementation, each output
checked against ``moe_ref`` (fp32) first:

  eager   ``FusedEPMoE`` called as a user calls it (default checks; a T seen before is replayed
          from the layer's own graph)
  graph   one layer call captured in a CUDA graph by the caller, replayed
  liger   Liger-Kernel's fused MoE (``LigerFusedMoEFunction``, pure Triton, its own autotuning,
          which runs on a shape's first call: made here at the sweep's largest T; 100-190 s a
          shape where Triton's cache is cold); skipped where liger_kernel is not installed
  torch   the unfused baseline (perf/baseline.py: permute, ``torch._grouped_mm``, SwiGLU, back)

With ``--fp8`` four more, on the same experts quantised to e4m3 with 128 x 128 block scales
(``MoEShape.fp8``), each checked against ``moe_fp8_ref`` (ours) or within ``FP8_DENSE_ERROR``
of ``moe_ref`` (torch's) first:

  fp8_eager / fp8_graph   the FP8 ``FusedEPMoE``, called and replayed as above
  torch_fp8               the weights dequantised every call, then the unfused baseline
                          (perf/baseline.py, ``DequantizedBaseline``)
  scaled_mm               FP8 GEMMs in PyTorch: per expert, ``torch._scaled_mm`` with the
                          same block scales (perf/baseline.py, ``ScaledMMBaseline``); left out,
                          with PyTorch's reason printed, where this build refuses the scaling

Each round times every implementation once (``--calls`` calls, synchronised at the end), in an
order that rotates from round to round, each run untimed for about 0.2 s (``--settle``) first
unless it was the one timed last (``perf.timing.time_many``), so that none is timed on the clock
the previous one's power draw left under the GPU's power cap. (Without the settling, FP8 graph
replays came out 7% slower than the same layer's eager calls, always timed just before them, on
an H100; that the clock was the cause is an inference, not measured.) The figure is the median
over rounds.

The weight-read bound of a point: the bytes of the experts its routing touches (w13 and w2 of
each, ``3 H I`` elements) over the read bandwidth a large read-only reduction measures on the
same GPU. Beside it, what the GEMM tasks load into the SMs (``megakernel.traffic.operand_bytes``:
each tile streams its expert's weight block again, each column block its rows again) and the
rate that makes at the graph time ("TB/s"): where it is well above the read bandwidth, the time
goes to taking in the tiles' reloads (from L2), not to HBM. Table on stdout, JSON under
perf/results/ (perf.record).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import replace

import torch

from megakernel import FusedEPMoE, routing
from megakernel.fp8 import FP8_DENSE_ERROR, quantize_experts
from megakernel.placement import Placement
from megakernel.shapes import preset
from megakernel.testing import (
    check_layer_output,
    compare_layer_output,
    layer_ref,
    local_w2,
    local_w13,
    make_tokens,
)
from megakernel.traffic import operand_bytes, rows_per_expert
from perf.baseline import (
    DequantizedBaseline,
    ScaledMMBaseline,
    baseline_moe,
    blockwise_grouped_mm_refusal,
)
from perf.record import write_result
from perf.timing import time_many, wall_us
from symm_mem import EmulatedWorld

IMPLS = ("eager", "graph", "liger", "torch")
FP8_IMPLS = ("fp8_eager", "fp8_graph", "torch_fp8", "scaled_mm")
FP8_LABELS = dict(fp8_eager="fp8_eag", fp8_graph="fp8_gra", torch_fp8="deq+mm", scaled_mm="scal_mm")
READ_BYTES = 4 << 30  # the bandwidth probe reads this much
SEED = 1


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


LIGER_TUNED = ("_fused_up_proj_swiglu_kernel", "_fused_down_proj_kernel",
               "_token_gather_weighted_sum_kernel")  # fmt: skip


def _liger_compile_share(job: tuple[int, int, int, int, int]) -> None:
    """One worker's share of Liger's autotuning configs, compiled into Triton's file cache by a
    call at a tiny shape (2 experts, 8 tokens). Every argument the kernels specialise on (H, I,
    the strides, the dtypes) is as at the real shape, so the benchmark's own autotuning later
    finds these configs compiled; it still benchmarks all of them itself."""
    from liger_kernel.ops import fused_moe_kernels as kernels

    hidden, ffn, topk, worker, workers = job
    for name in LIGER_TUNED:
        tuner = getattr(kernels, name)
        tuner.configs = tuner.configs[worker::workers] or tuner.configs[:1]
    call = liger_call()
    x = torch.randn(8, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(2, 2 * ffn, hidden, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(2, hidden, ffn, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 2, (8, topk), device="cuda", dtype=torch.int32)
    call(x, w13, w2, ids, torch.rand(8, topk, device="cuda"))
    torch.cuda.synchronize()


def warm_liger_cache(presets: list[str], workers: int) -> float:
    """Compile Liger's autotuning configs for ``presets`` in ``workers`` processes at once
    (Liger's autotuner compiles its 32 configs per GEMM one after another: 100-190 s a shape).
    Returns the seconds it took."""
    import multiprocessing

    start = time.perf_counter()
    shapes = {(preset(p).hidden, preset(p).ffn, preset(p).topk) for p in presets}
    jobs = [(*shape, w, workers) for shape in sorted(shapes) for w in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_liger_compile_share, jobs, chunksize=1)
    return time.perf_counter() - start


def liger_call():
    """Liger-Kernel's fused MoE as ``(x, w13, w2, ids, weights) -> out``, or None."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except ImportError:
        return None
    return lambda x, w13, w2, ids, w: LigerFusedMoEFunction.apply(x, w13, w2, ids, w)


class PresetCase:
    """One preset's experts and layer, built once for every T of the sweep (the layer's
    ``max_tokens_per_rank`` is the sweep's largest T, as a user sizes it)."""

    def __init__(self, world, name: str, max_tokens: int, liger, fp8: bool = False) -> None:
        self.name, self.liger = name, liger
        self.shape = preset(name).with_tokens(max_tokens)
        E = self.shape.num_experts
        self.placement = Placement.contiguous(E, 1)
        self.w13 = local_w13(self.shape, self.placement, 0, SEED, "cuda")
        self.w2 = local_w2(self.shape, self.placement, 0, SEED, "cuda")
        self.layer = FusedEPMoE(world, self.shape, {0: self.w13}, {0: self.w2},
                                placement=self.placement)  # fmt: skip
        self.fp8_layer = self.fp8_torch = self.fp8_mm = None
        if fp8:
            self.fp8_shape = replace(self.shape, fp8=True)
            q13, q2 = quantize_experts(self.w13), quantize_experts(self.w2)
            self.fp8_layer = FusedEPMoE(
                world, self.fp8_shape, {0: q13[0]}, {0: q2[0]}, w13_scale={0: q13[1]},
                w2_scale={0: q2[1]}, placement=self.placement,
            )  # fmt: skip
            self.fp8_torch = DequantizedBaseline(self.fp8_shape, q13, q2)
            try:
                self.fp8_mm = ScaledMMBaseline(self.fp8_shape, q13, q2)
            except ValueError as refusal:
                print(f"{name}: scaled_mm left out: {refusal}")
        if liger is not None:  # Liger tunes on a shape's first call: at the sweep's largest T
            x, ids, w = self.inputs(max_tokens)
            liger(x, self.w13, self.w2, ids, w)

    def inputs(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = self.shape
        rt = routing.uniform(1, T, shape.num_experts, shape.topk, seed=T)
        x = make_tokens(shape, [T], SEED + T, "cuda")[0]
        return x, rt.topk_ids[0].cuda(), rt.topk_weights[0].cuda()

    def calls(self, T: int) -> tuple[dict, int]:
        """(each implementation's call at ``T``, checked first; the weight bytes it touches)."""
        shape, layer, (x, ids, w) = self.shape, self.layer, self.inputs(T)
        calls = {
            "eager": lambda: layer(x, ids, w),
            "torch": lambda: baseline_moe(x, ids, w, self.w13, self.w2, shape, 1),
        }
        if self.liger is not None:
            calls["liger"] = lambda: self.liger(x, self.w13, self.w2, ids, w)
        want = layer_ref(x, ids, w, shape, SEED)
        for impl, call in calls.items():
            self.check(f"T={T} {impl}", compare_layer_output(call(), want, shape.dtype, 0))
        layer.check_errors()
        calls["graph"], out = captured_call(layer, x, ids, w)
        self.check(f"T={T} graph", compare_layer_output(out, want, shape.dtype, 0))
        if self.fp8_layer is not None:
            calls |= self.fp8_calls(T, x, ids, w, want)
        for call in calls.values():  # warm: eager's second call of a T captures its own graph
            call()
            call()
        return calls, rows_per_expert(ids, shape.num_experts)

    def fp8_calls(self, T: int, x, ids, w, want: torch.Tensor) -> dict:
        """The FP8 implementations at ``T``, checked first (``want``: ``moe_ref``)."""
        layer, shape = self.fp8_layer, self.fp8_shape
        calls = {"fp8_eager": lambda: layer(x, ids, w)}
        problems = check_layer_output(calls["fp8_eager"](), x, ids, w, shape, SEED, 0)
        self.check(f"T={T} fp8_eager", problems)
        layer.check_errors()
        calls["fp8_graph"], out = captured_call(layer, x, ids, w)
        self.check(f"T={T} fp8_graph", check_layer_output(out, x, ids, w, shape, SEED, 0))
        calls["torch_fp8"] = lambda: self.fp8_torch(x, ids, w)
        if self.fp8_mm is not None:
            calls["scaled_mm"] = lambda: self.fp8_mm(x, ids, w)
        for impl in [i for i in ("torch_fp8", "scaled_mm") if i in calls]:
            try:
                got = calls[impl]().float()
            except (RuntimeError, NotImplementedError, ValueError) as refusal:
                if impl != "scaled_mm":
                    raise
                print(f"scaled_mm left out: {type(refusal).__name__}: {str(refusal)[:200]}")
                del calls[impl]
                continue
            error = ((got - want).norm() / want.norm()).item()
            if not error <= FP8_DENSE_ERROR:
                self.check(f"T={T} {impl}", [f"{error:.3g} from moe_ref (norm-relative)"])
        return calls

    def check(self, what: str, problems: list[str]) -> None:
        if problems:
            raise SystemExit(f"{self.name} {what}: {problems[0]}")

    def close(self) -> None:
        self.layer.close()
        if self.fp8_layer is not None:
            self.fp8_layer.close()


def captured_call(layer: FusedEPMoE, x, ids, w):
    """(a CUDA graph's replay of one layer call at these inputs, the captured call's output
    after one replay)."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = layer.workspace.run(
            {0: x}, {0: ids}, {0: w}, mode="layer", validate=False, **layer._experts_by_rank()
        )[0].out
    graph.replay()
    return graph.replay, captured


def bench_point(case: PresetCase, T: int, bandwidth: float, args) -> dict:
    calls, rows = case.calls(T)
    names = [impl for impl in IMPLS + FP8_IMPLS if impl in calls]
    fns = {i: calls[i] for i in names}
    timed = time_many(fns, args.rounds, args.calls, settle_s=args.settle, timer=wall_us)
    case.layer.check_errors()
    row = {"preset": case.name, "T": T, **{f"{i}_us": timed[i]["median"] for i in names}}
    loads = operand_bytes(rows, case.shape, case.layer.workspace.config)
    row["bound_us"] = loads.weights / bandwidth * 1e6
    row["graph_over_bound"] = row["graph_us"] / row["bound_us"]
    row["eager_over_graph"] = row["eager_us"] / row["graph_us"]
    row["streamed_bytes"] = loads.streamed
    row["streamed_Bps"] = loads.over(row["graph_us"] * 1e-6)
    if "fp8_graph_us" in row:
        loads = operand_bytes(rows, case.fp8_shape, case.fp8_layer.workspace.config)
        row["fp8_bound_us"] = loads.weights / bandwidth * 1e6  # one byte a weight, not two
        row["graph_over_fp8_graph"] = row["graph_us"] / row["fp8_graph_us"]
        row["fp8_streamed_bytes"] = loads.streamed
        row["fp8_streamed_Bps"] = loads.over(row["fp8_graph_us"] * 1e-6)
    print(table_row(row), flush=True)
    return row


def table_row(r: dict) -> str:
    """One point's line: each implementation's time, then eager / graph, Liger over ours (eager
    and graph), the weight-read bound and graph over it."""
    cells = " ".join(f"{r.get(i + '_us', float('nan')):9.1f}" for i in IMPLS)
    liger = r.get("liger_us", float("nan"))
    ratios = (r["eager_over_graph"], liger / r["eager_us"], liger / r["graph_us"])
    line = (
        f"{r['preset']:<12} {r['T']:5d} {cells} {ratios[0]:5.2f} {ratios[1]:7.2f} "
        f"{ratios[2]:7.2f} {r['bound_us']:8.1f} {r['graph_over_bound']:7.2f} "
        f"{r['streamed_bytes'] / 1e9:6.1f} {r['streamed_Bps'] / 1e12:5.2f}"
    )
    if "fp8_graph_us" in r:
        line += " " + " ".join(f"{r.get(i + '_us', float('nan')):9.1f}" for i in FP8_IMPLS)
        fp8 = r["fp8_graph_us"]
        ratios = (r["graph_over_fp8_graph"], r["fp8_eager_us"] / fp8, fp8 / r["fp8_bound_us"])
        line += f" {ratios[0]:8.2f} {ratios[1]:5.2f} {ratios[2]:7.2f}"
        line += f" {r['fp8_streamed_bytes'] / 1e9:6.1f} {r['fp8_streamed_Bps'] / 1e12:5.2f}"
    return line


def header(bandwidth: float, fp8: bool) -> str:
    gpu = torch.cuda.get_device_name()
    head = f"{'preset':<12} {'T':>5} " + " ".join(f"{i + ' us':>9}" for i in IMPLS)
    head += f" {'e/g':>5} {'liger/e':>7} {'liger/g':>7} {'bound us':>8} {'g/bound':>7}"
    head += f" {'GB':>6} {'TB/s':>5}"  # the tasks' operand loads and their rate at the graph time
    if fp8:  # bf16 graph over FP8 graph, FP8 eager over graph, FP8 graph over its weight bound
        head += " " + " ".join(f"{FP8_LABELS[i] + ' us':>9}" for i in FP8_IMPLS)
        head += f" {'bf16/fp8':>8} {'e/g':>5} {'g/bound':>7} {'GB':>6} {'TB/s':>5}"
    title = f"one rank holding every expert, {gpu}, read bandwidth {bandwidth / 1e9:.0f} GB/s"
    return f"{title}\n{head}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--presets", nargs="+", default=["qwen3_30b", "qwen3_235b", "dsv3", "mixtral", "gpt_oss"]
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 128, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument(
        "--settle", type=float, default=0.2,
        help="seconds each implementation runs untimed before its timed calls (time_many)",
    )  # fmt: skip
    parser.add_argument("--fp8", action="store_true", help="add the FP8 rows (see above)")
    parser.add_argument("--no-liger", action="store_true", help="leave Liger's column empty")
    parser.add_argument(
        "--compile-workers", type=int, default=min(16, os.cpu_count() or 1),
        help="processes compiling Liger's autotuning configs ahead of its autotuning (1: off)",
    )  # fmt: skip
    args = parser.parse_args()
    liger = None if args.no_liger else liger_call()
    if liger is None and not args.no_liger:
        print("liger_kernel is not installed: its column stays empty (pip install liger-kernel)")
    elif liger is not None and args.compile_workers > 1:
        took = warm_liger_cache(args.presets, args.compile_workers)
        print(f"Liger's configs compiled in {args.compile_workers} processes: {took:.0f} s")
    if args.fp8:
        refusal = blockwise_grouped_mm_refusal()
        print(f"torch {torch.__version__} scaled_grouped_mm with 1x128 / 128x128 block scales: "
              + (refusal or "ran (torch_fp8 still dequantises)"))  # fmt: skip
    bandwidth = read_bandwidth()
    print(header(bandwidth, args.fp8), flush=True)
    rows = []
    with EmulatedWorld(1, "cuda") as world:
        for name in args.presets:
            case = PresetCase(world, name, max(args.tokens), liger, args.fp8)
            rows += [bench_point(case, T, bandwidth, args) for T in args.tokens]
            case.close()
            del case
            gc.collect()  # anything of the case left in reference cycles, before the next preset
            torch.cuda.empty_cache()
    # one file per run's points: a later run of other presets or T does not overwrite it
    stem = f"peers_one_rank_{'_'.join(args.presets)}_T{'_'.join(map(str, args.tokens))}"
    path, _ = write_result(
        stem + ("_fp8" if args.fp8 else ""), {"rows": rows, "read_Bps": bandwidth}
    )
    print("\n".join(["", header(bandwidth, args.fp8), *map(table_row, rows), f"wrote {path}"]))


if __name__ == "__main__":
    main()
