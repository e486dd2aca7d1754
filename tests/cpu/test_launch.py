"""The launcher's command line and environment (nothing is started)."""

import sys

import pytest

from symm_mem import launch


def test_torchrun_command():
    cmd = launch.torchrun_command(2, ["-m", "symm_mem.check"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd
    assert cmd[-2:] == ["-m", "symm_mem.check"]


def test_launch_env_keeps_multicast_off(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    env = launch.launch_env("4G")
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_SYMMETRIC_SIZE"] == "4G"


def test_launch_without_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    with pytest.raises(SystemExit, match="no GPU is visible"):
        launch.main(["script.py"])


def test_launch_needs_a_target():
    with pytest.raises(SystemExit):
        launch.main([])


def test_launch_passes_module_and_args(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "run", lambda n, target, size: calls.append((n, target, size)) or 0)
    assert launch.main(["--nproc", "3", "-m", "perf.bench", "--preset", "dsv3"]) == 0
    assert calls == [(3, ["-m", "perf.bench", "--preset", "dsv3"], None)]


def test_launch_script_target(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "run", lambda n, target, size: calls.append((n, target, size)) or 0)
    assert launch.main(["--symmetric-size=2G", "worker.py", "--nproc", "7"]) == 0
    assert calls == [(None, ["worker.py", "--nproc", "7"], "2G")]
