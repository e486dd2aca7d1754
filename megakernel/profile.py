"""Trace one call of the megakernel: ``python -m megakernel.profile [--preset dsv3] [--tokens
4096] [--emulate R] [--out DIR]``.

On GPUs it relaunches itself on every visible GPU (NVSHMEM world, one rank each); ``--emulate R``
runs R ranks on one GPU; without a GPU it runs a small layer on 2 emulated ranks under the Triton
interpreter (host-clock times). It makes one untraced warm-up call, then a traced one (each
checked against ``moe_ref``), aligns the ranks' clocks, and writes to ``--out`` (default
``out/profile``): ``trace.json`` (open in https://ui.perfetto.dev or chrome://tracing),
``timeline.png`` and ``summary.txt``. ``--overhead`` also times the call with and without tracing
(CUDA graphs).
``--set KNOB=V ...`` traces with other int ``KernelConfig`` knobs (the output folder names
them); ``--fp8`` traces the FP8 layer (``MoEShape.fp8``) on the same experts quantised to e4m3
with 128 x 128 block scales, checked against ``moe_fp8_ref``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

DEFAULT_OUT = Path("out") / "profile"  # under the working directory (git-ignored in a checkout)


def _setup(world, args):
    """(shape, config, T, routing, xs, inputs by rank, keyword inputs by rank) of the traced
    call: the keyword inputs are the FP8 weights' block scales with ``--fp8``, else none."""
    import torch

    from megakernel import KernelConfig, routing
    from megakernel.placement import Placement
    from megakernel.shapes import MoEShape, preset
    from megakernel.testing import layer_inputs

    if world.device.type == "cpu" and args.fp8:  # H and I a whole number of scale blocks
        shape, config, T = MoEShape(256, 128, 8, 2, 24), KernelConfig.interpreter(), 19
    elif world.device.type == "cpu":
        shape, config, T = (
            MoEShape(64, 32, 16, 4, 64, torch.float32),
            KernelConfig.interpreter(),
            40,
        )
    else:
        shape = preset(args.preset).with_tokens(args.tokens)
        config, T = KernelConfig(), args.tokens
    try:
        config = replace(config, **args.set)
    except TypeError as e:
        raise SystemExit(f"--set: {e}") from None
    R, ranks, dev = world.world_size, world.local_ranks, world.device
    placement = Placement.contiguous(shape.num_experts, R)
    rt, _ = routing.edge_case(args.routing, R, T, shape.num_experts, shape.topk, seed=1)
    rt = rt.to(dev)
    xs, inputs = layer_inputs(shape, placement, rt, ranks, 1, dev)
    scales = {}
    if args.fp8:
        from megakernel.fp8 import quantize_experts

        shape = replace(shape, fp8=True)
        q13 = {r: quantize_experts(w) for r, w in inputs[3].items()}
        q2 = {r: quantize_experts(w) for r, w in inputs[4].items()}
        inputs = (*inputs[:3], {r: q[0] for r, q in q13.items()}, {r: q[0] for r, q in q2.items()})
        scales = dict(
            w13_scale={r: q[1] for r, q in q13.items()}, w2_scale={r: q[1] for r, q in q2.items()}
        )
    return shape, config, T, rt, xs, inputs, scales


def _traced_call(world, args, shape, config, inputs, scales, check, trace: bool):
    """One checked call of a fresh workspace after a warm-up call; returns (records, events
    dropped, the graph-replay time in us with ``--overhead`` on a GPU, else None)."""
    from megakernel import Megakernel, profiler

    ws = Megakernel(world, shape, config=replace(config, trace=trace, trace_events=args.events))
    for _ in range(2):  # a warm-up call, then the one that is kept
        handles = ws.run(*inputs, mode="layer", split=args.split, **scales)
    ws.check_errors()
    if args.stage != "all":  # a timing probe (its outputs are junk): trace it instead
        handles = ws.run(*inputs, mode="layer", stage=args.stage, **scales)
        ws.check_errors()
    else:
        check(handles)
    records, dropped = [], 0
    for r in world.local_ranks if trace else ():
        got, lost = profiler.decode(handles[r].trace, r)
        records += got
        dropped += lost
    us = None
    if args.overhead and world.device.type == "cuda":
        from perf.timing import graphed, time_us

        def call():
            return ws.run(*inputs, mode="layer", split=args.split, validate=False, **scales)

        us = time_us(graphed(call))["median"]
    ws.close()
    return records, dropped, us


def profile(world, args) -> None:
    from megakernel import profiler
    from megakernel.testing import check_layer_output

    shape, config, T, rt, xs, inputs, scales = _setup(world, args)
    cpu = world.device.type == "cpu"

    def check(handles) -> None:
        for r, h in handles.items():
            wrong = check_layer_output(
                h.out, xs[r], rt.topk_ids[r], rt.topk_weights[r], shape, 1, r
            )
            if wrong:
                raise SystemExit(f"wrong layer output: {wrong}")

    timings = {}
    for trace in (False, True) if args.overhead or not cpu else (True,):
        records, dropped, timings[trace] = _traced_call(
            world, args, shape, config, inputs, scales, check, trace
        )
    records = profiler.gather_records(world, records)
    offsets = profiler.clock_offsets(world)
    if world.rank == 0:
        _write(world, args, T, profiler.align(records, offsets), dropped, offsets, timings)


def _write(world, args, T: int, records, dropped: int, offsets, timings) -> None:
    """trace.json, timeline.png and summary.txt under ``--out``, and the summary printed."""
    from megakernel import profiler

    cpu, R, world_name = world.device.type == "cpu", world.world_size, type(world).__name__
    suffix = ("_fp8" if args.fp8 else "") + ("" if args.stage == "all" else f"_{args.stage}")
    suffix += "".join(f"_{knob}{value}" for knob, value in args.set.items())
    out = Path(args.out) / f"trace_{'cpu' if cpu else args.preset}_R{R}_{world_name}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{'small layer' if cpu else args.preset}{' FP8' if args.fp8 else ''}, T={T}, "
        f"{R} ranks ({world_name}), "
        f"{'two kernels' if args.split else 'one kernel'}"
        + ("" if args.stage == "all" else f", probe {args.stage!r}")
        + "".join(f", {knob}={value}" for knob, value in args.set.items())
    )
    summary = profiler.summarize(records, dropped)
    text = [title, f"clock offsets against rank 0 (ns): {offsets}", summary.text()]
    if timings.get(False) and timings.get(True):
        over = timings[True] / timings[False] - 1
        text.append(
            f"layer call: {timings[False]:.1f} us untraced, {timings[True]:.1f} us traced "
            f"({100 * over:+.1f}%)"
        )
    (out / "summary.txt").write_text("\n".join(text) + "\n")
    profiler.write_chrome_trace(records, out / "trace.json")
    written = ["trace.json", "summary.txt"]
    try:
        profiler.draw_timeline(records, out / "timeline.png", title)
        written.append("timeline.png")
    except ImportError:
        text.append("timeline.png not drawn: pip install matplotlib")
    print("\n".join(text))
    print(f"wrote {', '.join(written)} to {out}")


def parse_knob(spec: str) -> tuple[str, int]:
    knob, _, value = spec.partition("=")
    if not value.isdigit():
        raise SystemExit(f"--set wants KNOB=V with an int V, got {spec!r}")
    return knob, int(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsv3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--routing", default="uniform")
    parser.add_argument("--emulate", type=int, default=0, help="R ranks on one GPU")
    parser.add_argument("--split", action="store_true", help="the two-kernel mode")
    parser.add_argument("--fp8", action="store_true", help="the FP8 layer (MoEShape.fp8)")
    parser.add_argument("--events", type=int, default=1024, help="trace events per program")
    parser.add_argument("--overhead", action="store_true", help="also time untraced vs traced")
    parser.add_argument(
        "--stage", default="all", choices=["all", "comm", "compute"], help="trace a timing probe"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KNOB=V", help="int KernelConfig knobs"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--symmetric-size", default="8G")
    args = parser.parse_args()
    args.set = dict(parse_knob(spec) for spec in args.set)
    import torch

    from symm_mem.launch import rerun_interpreted, run_in_world

    if not torch.cuda.is_available():
        rerun_interpreted("megakernel.profile")
        from symm_mem import EmulatedWorld

        with EmulatedWorld(2) as world:
            profile(world, args)
        return 0
    job = lambda world: profile(world, args)  # noqa: E731
    return run_in_world(
        "megakernel.profile", job, emulate=args.emulate, symmetric_size=args.symmetric_size
    )


if __name__ == "__main__":
    sys.exit(main())
