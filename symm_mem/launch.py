"""``python -m symm_mem.launch [--nproc N] script.py [args]`` (or ``-m module [args]``).

Runs ``torchrun --standalone --nproc-per-node N`` with the NVSHMEM / NCCL environment set
(NVLink multicast off, symmetric heap size). N defaults to the visible GPUs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

from symm_mem.buffer import World
from symm_mem.runtime import nvshmem_env


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_command(nproc: int, target: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *target,
    ]


def launch_env(symmetric_size: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nvshmem_env(symmetric_size))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(nproc: int | None, target: list[str], symmetric_size: str | None = None) -> int:
    """Run ``target`` under torchrun on ``nproc`` ranks; returns torchrun's exit code."""
    if nproc is None:
        nproc = visible_gpus()
    if nproc < 1:
        raise SystemExit("symm_mem.launch: no GPU is visible; pass --nproc or use EmulatedWorld")
    return subprocess.call(torchrun_command(nproc, target), env=launch_env(symmetric_size))


def run_in_world(
    module: str,
    job: Callable[[World], None],
    *,
    emulate: int = 0,
    symmetric_size: str | None = None,
) -> int:
    """Run ``job(world)`` on the GPUs, for a ``python -m module`` entry point: ``emulate`` > 0
    runs that many ranks on one GPU (``EmulatedWorld``); otherwise a plain process relaunches
    ``python -m module`` with its own arguments under torchrun on every visible GPU, and each
    rank runs ``job`` in the NVSHMEM world. Returns an exit code."""
    if emulate:
        from symm_mem.emulated import EmulatedWorld

        with EmulatedWorld(emulate, "cuda") as world:
            job(world)
        return 0
    if "RANK" not in os.environ:
        return run(None, ["-m", module, *sys.argv[1:]], symmetric_size)
    from symm_mem.runtime import init_world

    world = init_world()
    try:
        job(world)
    finally:
        world.close()
    return 0


def rerun_interpreted(module: str) -> None:
    """Restart ``python -m module`` (same arguments) under the Triton interpreter, unless this
    process already runs under it. NOTE: kernels are set up for a GPU driver when their module is
    imported, so the variable must be set before the process starts."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def _split_target(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher options come first; the target starts at ``-m`` or at the first bare word."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" or not arg.startswith("-"):
            return argv[:i], argv[i:]
        i += 1 if "=" in arg or arg in ("-h", "--help") else 2
    return argv, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m symm_mem.launch",
        usage="%(prog)s [--nproc N] [--symmetric-size SIZE] (script.py | -m module) [args ...]",
        description="torchrun --standalone with the NVSHMEM/NCCL environment (multicast off).",
    )
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: visible GPUs)")
    parser.add_argument(
        "--symmetric-size", default=None, help="NVSHMEM_SYMMETRIC_SIZE, e.g. 4G (default 1G)"
    )
    options, target = _split_target(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(options)
    if not target or target == ["-m"]:
        parser.error("give a script (or -m module) to run")
    return run(args.nproc, target, args.symmetric_size)


if __name__ == "__main__":
    sys.exit(main())
