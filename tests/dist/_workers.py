"""tests/dist helpers: pytest starts torchrun workers through symm_mem.launch and checks their output."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def need_gpus(n: int):
    if gpus() < n:
        pytest.skip(f"needs {n} GPUs, {gpus()} visible")
    if importlib.util.find_spec("nvshmem") is None:
        pytest.skip("needs nvshmem4py (pip install --no-deps nvshmem4py-cu13==0.4.1)")


def run_workers(
    nproc: int, worker: str, *args: str, timeout: float = 600, symmetric_size: str | None = None
) -> str:
    """Run tests/dist/<worker> on ``nproc`` ranks; return its output, failing on a non-zero exit."""
    size = ["--symmetric-size", symmetric_size] if symmetric_size else []
    cmd = [sys.executable, "-m", "symm_mem.launch", "--nproc", str(nproc), *size,
           str(REPO / "tests" / "dist" / worker), *args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, f"{worker} on {nproc} ranks exited {proc.returncode}"
    return out
