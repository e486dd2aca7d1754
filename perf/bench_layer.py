"""The whole MoE layer: ``python -m perf.bench_layer [--presets dsv3 qwen3_235b] [--tokens 4096]``.

Relaunches itself under torchrun on every visible GPU (NVSHMEM world); ``--emulate R`` runs R
ranks in one process on one GPU instead (the baseline then needs R = 1: no NCCL there).

Per preset, after checking ours and the baseline against ``moe_ref``, on the same inputs
(CUDA events around graph-replayed calls for ours, eager calls for the baseline; median and
p20/p80 over repeats, max over ranks; each row timed on its own, one after another):
  layer      ``FusedEPMoE``: plan + dispatch + GEMM1 + GEMM2 + combine + top-k reduce, one kernel
  split      the same as two kernels (dispatch + GEMM1, then GEMM2 + combine + reduce)
  comm       the layer without the GEMM math (plan, dispatch, combine puts, flags, reduce)
  compute    both GEMMs alone, rerun on the received rows, outputs kept local;
             TFLOP/s = 6 S H I / t (S rows received)
  overlap    max(comm, compute) / layer
  pack       with ``--pack gather scan``: the layer again for each ``KernelConfig.pack`` mode,
             timed in alternation with the default layer (``perf.timing.time_many``), whose
             figure of that pairing goes beside it; ``--vary KNOB=V1,V2`` the same for other knobs
             (knobs that go together joined by ``+``: ``block_m=64+num_warps=4`` is one variant)
  torch      ``torch._grouped_mm`` GEMM1 + SwiGLU + GEMM2 on the same received rows
  experts    with ``--experts swigluoai+bias ...``: the layer with other experts (``MoEShape``'s
             ``activation``, ``bias``; the same weights, biases from the seed), checked against
             ``moe_ref`` first, timed in alternation with the default (SwiGLU, no biases)
  fp8        with ``--fp8``: the FP8 layer (``MoEShape.fp8``) on the same experts quantised to
             e4m3 with 128 x 128 block scales, checked against ``moe_fp8_ref`` first, timed in
             alternation with the layer above (whose figure of that pairing goes beside it);
             ``--fp8-vary KNOB=V1,V2`` adds FP8 layers with other knobs to the same alternation
  baseline   permute + NCCL all-to-all + grouped_mm + SwiGLU + grouped_mm + all-to-all back +
             weighted sum (perf/baseline.py), host-side split sizes
Table on rank 0, JSON under perf/results/ (perf.record).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megakernel import FusedEPMoE, routing
from megakernel.config import PACK_MODES, KernelConfig
from megakernel.fp8 import quantize_experts
from megakernel.placement import Placement
from megakernel.shapes import preset
from megakernel.testing import check_layer_output, local_biases, local_w2, local_w13, make_tokens
from megakernel.traffic import operand_bytes, rows_per_expert
from perf.baseline import baseline_moe
from perf.record import knob_sets, write_result
from perf.timing import graphed, time_many, time_us
from symm_mem import World
from symm_mem.launch import run_in_world


def time_layer(ws, inputs: tuple) -> dict[str, dict[str, float]]:
    """CUDA-graph timings of a layer call (``layer_us``) and of its timing probes alone:
    ``comm_us`` (no GEMM math) and ``compute_us`` (both GEMMs on the last real call's rows).
    ``inputs``: (x, topk_ids, topk_weights, w13, w2), each keyed by rank."""

    def call(stage: str):
        return lambda: ws.run(*inputs, mode="layer", stage=stage, validate=False)

    timed = {"layer_us": time_us(graphed(call("all"))), "comm_us": time_us(graphed(call("comm")))}
    ws.run(*inputs, mode="layer")  # the compute probe reruns the last real call's rows
    timed["compute_us"] = time_us(graphed(call("compute")))
    return timed


def check_outputs(layer, case: dict, shape, seed: int, label: str) -> list[str]:
    """One call of ``layer`` on ``case`` (x, ids, weights, xs by rank), checked against
    ``moe_ref``; the problems found, each labelled."""
    out = layer(case["x"], case["ids"], case["weights"])
    layer.check_errors()
    found = []
    for r in layer.world.local_ranks:
        ids, weights = case["ids"][r], case["weights"][r]
        found += check_layer_output(out[r], case["xs"][r], ids, weights, shape, seed, r)
    return [f"{label}: {p}" for p in found]


def time_torch_gemms(ws, inputs: tuple, shape) -> dict[str, float]:
    """``torch._grouped_mm`` GEMM1 + SwiGLU + GEMM2 on the rows the layer received."""
    handles = ws.run(*inputs, mode="layer")
    w13, w2 = inputs[3], inputs[4]
    gmm = {r: (h.resolved(), torch.cumsum(h.plan.expert_rows, 0).int()) for r, h in handles.items()}

    def torch_gemms():
        for r, (rows, offs) in gmm.items():
            h = torch._grouped_mm(rows, w13[r].transpose(1, 2), offs=offs)
            act = F.silu(h[:, : shape.ffn]) * h[:, shape.ffn :]
            torch._grouped_mm(act, w2[r].transpose(1, 2), offs=offs)

    return time_us(torch_gemms)


def time_variants(world, ws, case: dict, inputs: tuple, shape, name: str, args) -> dict:
    """The layer with other knobs (``--pack``, ``--vary``), same inputs, each checked first, then
    timed in alternation with the default."""
    row = {"pack_us": {}, "vary_us": {}, "paired_default_us": {}}
    variants = [("pack_us", m, {"pack": m}) for m in args.pack]
    variants += [("vary_us", key, knobs) for key, knobs in knob_sets(args.vary)]
    if not variants:
        return row
    default = graphed(lambda: ws.run(*inputs, mode="layer", validate=False))
    for column, key, knobs in variants:
        torch.cuda.empty_cache()
        cfg = KernelConfig(**({"num_ctas": args.ctas} | knobs))
        other = FusedEPMoE(world, shape, inputs[3], inputs[4], placement=ws.placement, config=cfg)
        found = check_outputs(other, case, shape, args.seed, key)
        if found:
            raise SystemExit(f"{name}: wrong results: {found[:4]}")
        call = graphed(lambda ws=other.workspace: ws.run(*inputs, mode="layer", validate=False))
        timed = time_many({"variant": call, "default": default})  # the same clocks
        row[column][key] = timed["variant"]
        row["paired_default_us"][key] = timed["default"]
        other.check_errors()
        other.close()
    return row


EXPERT_KINDS = ("swigluoai", "bias", "swigluoai+bias")  # --experts: MoEShape activation / bias


def time_experts(world, ws, case: dict, inputs: tuple, shape, name: str, args) -> dict:
    """The layer with other experts (``--experts``): gpt-oss's clamped activation, biases, or
    both, on the same weights (biases from the seed), each checked against ``moe_ref`` first,
    then its graph replay timed in alternation with the default layer's."""
    row = {"experts_us": {}, "experts_paired_default_us": {}}
    default = graphed(lambda: ws.run(*inputs, mode="layer", validate=False))
    for kind in args.experts:
        parts = kind.split("+")
        other_shape = replace(
            shape, activation="swigluoai" if "swigluoai" in parts else "silu", bias="bias" in parts
        )
        biases = {r: local_biases(other_shape, ws.placement, r, args.seed, world.device)
                  for r in world.local_ranks}  # fmt: skip
        torch.cuda.empty_cache()
        other = FusedEPMoE(
            world, other_shape, inputs[3], inputs[4], placement=ws.placement,
            config=KernelConfig(num_ctas=args.ctas),
            **{n: {r: b[n] for r, b in biases.items()} for n in ("b13", "b2") if other_shape.bias},
        )  # fmt: skip
        found = check_outputs(other, case, other_shape, args.seed, kind)
        if found:
            raise SystemExit(f"{name} {kind}: wrong results: {found[:4]}")
        run, experts = other.workspace.run, other._experts_by_rank()
        call = graphed(
            lambda run=run, experts=experts: run(
                *inputs[:3], mode="layer", validate=False, **experts
            )
        )
        timed = time_many({"variant": call, "default": default})
        row["experts_us"][kind] = timed["variant"]
        row["experts_paired_default_us"][kind] = timed["default"]
        other.check_errors()
        other.close()
    return row


def time_fp8(world, ws, case: dict, inputs: tuple, shape, name: str, args) -> dict:
    """The FP8 layer on the same experts, quantised here one expert at a time (and one more per
    ``--fp8-vary`` knob value), each checked against ``moe_fp8_ref`` and ``moe_ref``
    (``check_layer_output``: the default must pass, a variant that does not is reported), then
    their graph replays timed in alternation with the bf16 layer's."""
    fp8_shape, ranks = replace(shape, fp8=True), world.local_ranks
    q13 = {r: quantize_experts(inputs[3][r]) for r in ranks}
    q2 = {r: quantize_experts(inputs[4][r]) for r in ranks}
    calls, layers = {}, []
    for key, knobs in [(None, {}), *knob_sets(args.fp8_vary)]:
        label = "fp8" if key is None else f"fp8 {key}"
        layer = FusedEPMoE(
            world, fp8_shape, {r: q[0] for r, q in q13.items()}, {r: q[0] for r, q in q2.items()},
            w13_scale={r: q[1] for r, q in q13.items()}, w2_scale={r: q[1] for r, q in q2.items()},
            placement=ws.placement, config=KernelConfig(**({"num_ctas": args.ctas} | knobs)),
        )  # fmt: skip
        out = layer(case["x"], case["ids"], case["weights"])
        layer.check_errors()
        found = []
        for r in ranks:
            ids, w = case["ids"][r], case["weights"][r]
            found += check_layer_output(out[r], case["xs"][r], ids, w, fp8_shape, args.seed, r)
        if found and key is None:
            raise SystemExit(f"{name} {label}: wrong results: {found[:4]}")
        if found:  # a variant is still timed (fp8_promote_k=0 exists to be compared), marked
            print(f"{name} {label}: outside the FP8 bounds (timed all the same): {found[:2]}")
        run, experts = layer.workspace.run, layer._experts_by_rank()
        calls[label] = graphed(
            lambda run=run, experts=experts: run(
                *inputs[:3], mode="layer", validate=False, **experts
            )
        )
        layers.append(layer)
    calls["bf16"] = graphed(lambda: ws.run(*inputs, mode="layer", validate=False))
    timed = time_many(calls)
    fp8_loads = busiest_rank_loads(case["all_ids"], layers[0].workspace)
    bf16_loads = busiest_rank_loads(case["all_ids"], ws)
    for layer in layers:
        layer.check_errors()
        layer.close()
    variants = {k[4:]: v for k, v in timed.items() if k.startswith("fp8 ")}
    return {
        "fp8_us": timed["fp8"], "bf16_paired_us": timed["bf16"], "fp8_vary_us": variants,
        "fp8_loads_bytes": fp8_loads, "bf16_loads_bytes": bf16_loads,
    }  # fmt: skip


def busiest_rank_loads(topk_ids: list[torch.Tensor], ws) -> int:
    """The GEMM operand loads (``megakernel.traffic.operand_bytes``) of the rank that loads the
    most, for every rank's ``topk_ids`` routed to workspace ``ws``'s experts (slot = expert)."""
    R = ws.world.world_size
    if ws.placement != Placement.contiguous(ws.shape.num_experts, R):
        raise ValueError("busiest_rank_loads counts rows by expert: contiguous placements only")
    rows = rows_per_expert(torch.cat([i.flatten().cpu() for i in topk_ids]), ws.shape.num_experts)
    L = ws.placement.slots_per_rank
    return max(
        operand_bytes(rows[r * L : (r + 1) * L], ws.shape, ws.config).streamed for r in range(R)
    )


def bench_preset(world: World, name: str, args) -> dict:
    shape = preset(name).with_tokens(args.tokens)
    R, E, K, T = world.world_size, shape.num_experts, shape.topk, args.tokens
    ranks, dev = world.local_ranks, world.device
    placement = Placement.contiguous(E, R)
    rt, _ = routing.edge_case(args.routing, R, T, E, K, seed=args.seed)
    rt = rt.to(dev)
    xs = make_tokens(shape, [T] * R, args.seed, dev)
    w13 = {r: local_w13(shape, placement, r, args.seed, dev) for r in ranks}
    w2 = {r: local_w2(shape, placement, r, args.seed, dev) for r in ranks}
    config = KernelConfig(num_ctas=args.ctas)
    layer = FusedEPMoE(world, shape, w13, w2, placement=placement, config=config)
    ws = layer.workspace
    case = dict(xs=xs, x={r: xs[r] for r in ranks}, ids={r: rt.topk_ids[r] for r in ranks})
    case["weights"] = {r: rt.topk_weights[r] for r in ranks}
    case["all_ids"] = rt.topk_ids  # every rank's (contiguous placement: expert e is a slot)
    problems = []
    for split in (False, True):
        layer.split = split
        problems += check_outputs(layer, case, shape, args.seed, f"ours split={split}")
    can_baseline = dist.is_initialized() or R == 1
    r0 = ranks[0]
    base_args = (xs[r0], case["ids"][r0], case["weights"][r0], w13[r0], w2[r0], shape, R)
    if can_baseline:
        base = baseline_moe(*base_args)
        found = check_layer_output(base, *base_args[:3], shape, args.seed, r0)
        problems += [f"baseline: {p}" for p in found]
    if problems:
        raise SystemExit(f"{name}: wrong results: {problems[:4]}")

    inputs = (case["x"], case["ids"], case["weights"], w13, w2)
    handles = ws.run(*inputs, mode="layer")
    n_recv = {r: handles[r].num_recv() for r in ranks}
    row = {"preset": name, "num_recv": n_recv, **time_layer(ws, inputs)}
    split = lambda: ws.run(*inputs, mode="layer", split=True, validate=False)  # noqa: E731
    row["split_us"] = time_us(graphed(split))
    ws.check_errors()
    row["torch_gemms_us"] = time_torch_gemms(ws, inputs, shape)
    row["baseline_us"] = time_us(lambda: baseline_moe(*base_args)) if can_baseline else None
    row["pack"] = "gather" if config.gather_a() else "scan"  # what pack="auto" means
    row.update(time_variants(world, ws, case, inputs, shape, name, args))
    if args.experts:
        row.update(time_experts(world, ws, case, inputs, shape, name, args))
    if args.fp8:
        row.update(time_fp8(world, ws, case, inputs, shape, name, args))
    ws.check_errors()
    layer.close()
    return summarize(row, shape, can_baseline)


def summarize(row: dict, shape, can_baseline: bool) -> dict:
    """``row`` with its rates and ratios: TFLOP/s = 6 S H I / t (S: most rows a rank received)."""
    flops = 6 * max(row["num_recv"].values()) * shape.hidden * shape.ffn
    t = {k: row[f"{k}_us"]["median"] for k in ("layer", "split", "comm", "compute")}
    row.update(
        compute_TFLOPs=flops / t["compute"] / 1e6,
        torch_TFLOPs=flops / row["torch_gemms_us"]["median"] / 1e6,
        overlap=max(t["comm"], t["compute"]) / t["layer"],
        overlap_split=max(t["comm"], t["compute"]) / t["split"],
        vs_baseline=row["baseline_us"]["median"] / t["layer"] if can_baseline else None,
        split_vs_baseline=row["baseline_us"]["median"] / t["split"] if can_baseline else None,
    )
    return row


def report(result: dict, args) -> None:
    R = result["ranks"]
    name, meta = write_result(f"layer_T{args.tokens}_R{R}_{result['world']}", result)
    print(
        f"\nMoE layer, T={args.tokens}, {R} ranks ({result['world']}), {args.routing} routing, "
        f"{meta['gpu']}, git {meta['git']}"
    )
    print(
        f"{'preset':<11} {'layer us':>9} {'split us':>9} {'comm us':>8} {'compute us':>10} "
        f"{'TFLOP/s':>7} {'torch TF/s':>10} {'overlap':>7} {'baseline us':>11} {'vs base':>7} "
        f"{'split vs':>8}"
    )
    for v in result["presets"]:
        base = v["baseline_us"]
        fmt = lambda q: f"{q:.2f}x" if q else "-"  # noqa: E731
        print(
            f"{v['preset']:<11} {v['layer_us']['median']:9.1f} {v['split_us']['median']:9.1f} "
            f"{v['comm_us']['median']:8.1f} {v['compute_us']['median']:10.1f} "
            f"{v['compute_TFLOPs']:7.1f} {v['torch_TFLOPs']:10.1f} {v['overlap']:7.2f} "
            f"{base['median'] if base else float('nan'):11.1f} {fmt(v['vs_baseline']):>7} "
            f"{fmt(v['split_vs_baseline']):>8}"
        )
    for v in result["presets"]:
        if "fp8_us" in v:
            fp8, bf16 = v["fp8_us"]["median"], v["bf16_paired_us"]["median"]
            loads = v["fp8_loads_bytes"], v["bf16_loads_bytes"]
            print(
                f"{v['preset']}: FP8 layer {fp8:.1f} us, bf16 {bf16:.1f} us: {bf16 / fp8:.2f}x; "
                f"GEMM operand loads {loads[0] / 1e9:.1f} / {loads[1] / 1e9:.1f} GB, "
                f"{loads[0] / fp8 / 1e6:.2f} / {loads[1] / bf16 / 1e6:.2f} TB/s"
            )
            for key, t in v["fp8_vary_us"].items():
                print(f"{v['preset']}: FP8 layer with {key}: {t['median']:.1f} us")
        if v["pack_us"]:
            times = _paired(v["pack_us"], v)
            print(f"{v['preset']}: layer by KernelConfig.pack (auto = {v['pack']}): {times}")
        if v.get("vary_us"):
            times = _paired(v["vary_us"], v)
            print(f"{v['preset']}: layer with other KernelConfig knobs: {times}")
        for kind, t in v.get("experts_us", {}).items():
            paired = v["experts_paired_default_us"][kind]["median"]
            print(
                f"{v['preset']}: layer with {kind} experts {t['median']:.1f} us (default "
                f"{paired:.1f}): {t['median'] / paired:.3f}x"
            )
    print(f"wrote {name}")


def _paired(timed: dict, row: dict) -> str:
    """Per variant "knob=v 3075.7 us (default 3063.3)": beside it, the default timed with it."""
    paired = row["paired_default_us"]
    return ", ".join(
        f"{key} {t['median']:.1f} us (default {paired[key]['median']:.1f})"
        for key, t in timed.items()
    )


def bench(world: World, args) -> dict:
    rows = []
    for name in args.presets:
        rows.append(bench_preset(world, name, args))
        torch.cuda.empty_cache()
    return {
        "tokens_per_rank": args.tokens,
        "ranks": world.world_size,
        "world": type(world).__name__,
        "routing": args.routing,
        "presets": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["dsv3", "qwen3_235b"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--routing", default="uniform", choices=routing.EDGE_CASES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--emulate", type=int, default=0, help="R ranks on one GPU instead")
    parser.add_argument("--ctas", type=int, default=0, help="programs per rank (0: SM share)")
    parser.add_argument("--symmetric-size", default="8G")
    parser.add_argument("--fp8", action="store_true", help="also time the FP8 layer (see above)")
    parser.add_argument(
        "--experts", nargs="*", default=[], choices=EXPERT_KINDS,
        help="also time the layer with these experts (gpt-oss's activation, biases, both)",
    )  # fmt: skip
    parser.add_argument(
        "--fp8-vary", nargs="*", default=[], metavar="KNOB=V1,V2",
        help="with --fp8: also time FP8 layers with these KernelConfig knobs (A=1+B=2: together)",
    )  # fmt: skip
    parser.add_argument(
        "--pack", nargs="*", default=[], choices=PACK_MODES, help="also time these pack modes"
    )
    parser.add_argument(
        "--vary",
        nargs="*",
        default=[],
        metavar="KNOB=V1,V2",
        help="also time the layer with these KernelConfig knobs (e.g. reduce_lag=1000000; "
        "knobs joined by + make one variant)",
    )
    args = parser.parse_args()

    def job(world: World) -> None:
        result = bench(world, args)
        if world.rank == 0:
            report(result, args)

    sys.exit(
        run_in_world(
            "perf.bench_layer", job, emulate=args.emulate, symmetric_size=args.symmetric_size
        )
    )


if __name__ == "__main__":
    main()
