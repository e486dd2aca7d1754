"""The main job (``make run``): ``python -m megakernel [--preset dsv3] [--tokens 4096]``.

On GPUs with nvshmem4py: ``FusedEPMoE`` on every visible GPU (one rank each, through the
launcher) for a preset, checked against ``moe_ref`` and timed against the unfused baseline
(``perf.bench_layer``). On a CPU-only machine: a small layer on 2 and 4 emulated ranks under the
Triton interpreter, phase by phase, checked against ``moe_ref`` (no timing: the interpreter runs
one program after another; ``--preset`` and ``--tokens`` apply to the GPU run only).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time


def run_cpu() -> int:
    from symm_mem.launch import rerun_interpreted

    rerun_interpreted("megakernel")
    import torch

    from megakernel import FusedEPMoE, KernelConfig, routing
    from megakernel.shapes import MoEShape
    from megakernel.testing import check_layer_output, make_tokens, make_w2, make_w13
    from symm_mem import EmulatedWorld

    shape = MoEShape(
        hidden=64, ffn=32, num_experts=16, topk=4, max_tokens_per_rank=64, dtype=torch.float32
    )
    config = KernelConfig.interpreter()
    print("No GPU: FusedEPMoE on emulated ranks under the Triton interpreter, phase by phase")
    print(
        f"shape: H {shape.hidden}, I {shape.ffn}, E {shape.num_experts}, K {shape.topk}, "
        f"T 40 per rank, fp32"
    )
    failed = 0
    for R in (2, 4):
        rt = routing.drop(routing.zipf(R, 40, shape.num_experts, shape.topk, 1.0, seed=R), 0.1, R)
        xs = make_tokens(shape, [40] * R, seed=R, device="cpu")
        w13, w2 = make_w13(shape, R, "cpu"), make_w2(shape, R, "cpu")
        with EmulatedWorld(R) as world:
            layer = FusedEPMoE.from_dense(world, shape, w13, w2, config=config)
            start = time.monotonic()
            out = layer(
                dict(enumerate(xs)), dict(enumerate(rt.topk_ids)), dict(enumerate(rt.topk_weights))
            )
            layer.check_errors()
            took = time.monotonic() - start
            problems = [
                p
                for r in range(R)
                for p in check_layer_output(
                    out[r], xs[r], rt.topk_ids[r], rt.topk_weights[r], shape, R, r
                )
            ]
            layer.close()
        status = "PASS" if not problems else f"FAIL {problems[:2]}"
        print(f"R = {R}: layer output against moe_ref: {status} ({took:.1f} s interpreted)")
        failed += bool(problems)
    return 1 if failed else 0


def main() -> int:
    from megakernel.shapes import PRESETS

    presets = "\n".join(
        f"  {name:<11} H {s.hidden}, I {s.ffn}, E {s.num_experts}, K {s.topk}"
        for name, s in PRESETS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m megakernel",
        description="FusedEPMoE checked against moe_ref, then timed against the unfused baseline.",
        epilog=(
            "On GPUs (with nvshmem4py): the preset on every visible GPU, one rank each, checked "
            "and timed (perf.bench_layer).\nOn a CPU: a small fp32 layer on 2 and 4 emulated "
            "ranks under the Triton interpreter, checked, not timed.\n\npresets:\n" + presets
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="dsv3", choices=list(PRESETS), help="GPU run")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (GPU run)")
    parser.add_argument("--cpu", action="store_true", help="the emulated CPU run even on a GPU")
    args = parser.parse_args()
    if args.tokens < 1:
        parser.error(f"--tokens must be at least 1, got {args.tokens}")
    import torch

    if args.cpu or not torch.cuda.is_available():
        return run_cpu()
    if importlib.util.find_spec("nvshmem") is None:
        print("GPUs but no nvshmem4py: pip install --no-deps nvshmem4py-cu13==0.4.1", flush=True)
        return 1
    cmd = [
        sys.executable,
        "-m",
        "perf.bench_layer",
        "--presets",
        args.preset,
        "--tokens",
        str(args.tokens),
    ]
    os.execv(sys.executable, cmd)  # relaunches itself on every visible GPU
    return 0


if __name__ == "__main__":
    sys.exit(main())
