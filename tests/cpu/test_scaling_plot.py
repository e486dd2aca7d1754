"""perf.scaling's plot on hand-made results: real-GPU runs are drawn, emulated ones left out."""

import json

import pytest

from perf import scaling

pytest.importorskip("matplotlib")


def write(folder, ranks: int, world: str, layer_us: float, gpu: str = "H200") -> None:
    row = {
        "preset": "dsv3",
        "layer_us": layer_us,
        "comm_us": layer_us / 4,
        "compute_us": layer_us * 0.9,
        "shares": {"dispatch": 0.01, "gemm1": 0.6, "down_combine": 0.37, "topk_reduce": 0.02},
    }
    result = {"meta": {"gpu": gpu}, "ranks": ranks, "world": world, "presets": [row]}
    path = folder / f"scaling_T4096_R{ranks}_{world}_{gpu.lower()}.json"
    path.write_text(json.dumps(result))


def test_plot_uses_the_nvshmem_runs_only(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match="run first"):
        scaling.plot(4096)
    write(tmp_path, 1, "NvshmemWorld", 10000.0)
    write(tmp_path, 2, "NvshmemWorld", 6000.0)
    write(tmp_path, 8, "EmulatedWorld", 1.0)
    found = scaling.load(4096)
    assert sorted(found["dsv3"]) == [1, 2]
    assert found["dsv3"][2]["layer_us"] == 6000.0
    png = tmp_path / "scaling_T4096.png"
    assert scaling.plot(4096) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_point_of_the_largest_worlds_gpu_wins_over_another_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "RESULTS", tmp_path)
    write(tmp_path, 1, "NvshmemWorld", 11000.0, gpu="H100")  # sorts before the H200 files...
    write(tmp_path, 1, "NvshmemWorld", 10000.0, gpu="H200")
    write(tmp_path, 2, "NvshmemWorld", 6000.0, gpu="H200")
    write(tmp_path, 4, "NvshmemWorld", 4000.0, gpu="H100")  # ...and this one is the only R = 4
    found = scaling.load(4096)["dsv3"]
    assert {r: row["gpu"] for r, row in found.items()} == {1: "H100", 2: "H200", 4: "H100"}
    assert found[1]["layer_us"] == 11000.0  # the largest world (R = 4) ran on the H100
    write(tmp_path, 8, "NvshmemWorld", 3000.0, gpu="H200")
    found = scaling.load(4096)["dsv3"]
    assert found[1]["layer_us"] == 10000.0 and found[4]["gpu"] == "H100"
