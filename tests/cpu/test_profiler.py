"""The profiler: decoding trace buffers, the Chrome-trace export, the PNG, the summary maths
(hand-made records), and the records of a traced interpreter run of the layer."""

import json
import re
import subprocess
import sys

import pytest
import torch

from megakernel import KernelConfig, Megakernel, profiler, routing
from megakernel.placement import Placement
from megakernel.profiler import TaskRecord
from megakernel.shapes import PRESETS
from megakernel.testing import make_tokens, make_w2, make_w13
from symm_mem import EmulatedWorld

SHAPE = PRESETS["small"]


def hand_made() -> list[TaskRecord]:
    # rank 0: program 0 on SM 4 dispatches 0-10 us, then a GEMM 10-40 (waiting 5);
    #         program 1 on SM 7 runs a GEMM 20-40 and a reduce 60-70 (waiting 15)
    # rank 1 (clock 1000 ns ahead): program 0 on SM 2 dispatches 1000-6000 ns
    us = 1000
    return [
        TaskRecord(0, 0, 4, "dispatch", 0, 0, 10 * us, 0),
        TaskRecord(0, 0, 4, "gemm1", 5, 10 * us, 40 * us, 5 * us),
        TaskRecord(0, 1, 7, "gemm1", 6, 20 * us, 40 * us, 0),
        TaskRecord(0, 1, 7, "topk_reduce", 9, 60 * us, 70 * us, 15 * us),
        TaskRecord(1, 0, 2, "dispatch", 0, 1 * us, 6 * us, 0),
    ]


def test_decode_reads_headers_and_counts_overflow():
    cap = 2
    buf = torch.zeros(3, cap + 1, 4, dtype=torch.int64)
    buf[0, 0] = torch.tensor([11, 1, 3, 0])  # SM 11, 3 events but room for 2
    buf[0, 1] = torch.tensor([(1 << 32) | 17, 100, 250, 30])
    buf[0, 2] = torch.tensor([(4 << 32) | 18, 300, 310, 0])
    buf[1, 0] = torch.tensor([12, 1, 1, 0])
    buf[1, 1] = torch.tensor([(3 << 32) | 40, 120, 220, 5])
    records, dropped = profiler.decode(buf, rank=1)  # program 2 ran nothing
    assert dropped == 1
    assert [(r.program, r.sm, r.kind, r.task, r.dur_ns, r.wait_ns) for r in records] == [
        (0, 11, "gemm1", 17, 150, 30),
        (0, 11, "topk_reduce", 18, 10, 0),
        (1, 12, "down_combine", 40, 100, 5),
    ]


def test_chrome_trace_format_and_png(tmp_path):
    records = profiler.align(hand_made(), {0: 0, 1: 1000})
    path = profiler.write_chrome_trace(records, tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == 5
    for e in slices:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys()
        assert e["dur"] >= 0 and e["ts"] >= 0
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[(0, 1)] == "SM 7 (program 1)"
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == {
        "rank 0",
        "rank 1",
    }
    # rank 1's dispatch (1-6 us on its clock, 1 us ahead) lines up with rank 0's at 0-5 us
    rank1 = next(e for e in slices if e["pid"] == 1)
    assert (rank1["ts"], rank1["dur"]) == (0.0, 5.0)
    png = profiler.draw_timeline(records, tmp_path / "timeline.png", "hand made")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_maths():
    s = profiler.summarize(hand_made())
    assert s.kinds["gemm1"].count == 2
    assert s.kinds["gemm1"].total_us == pytest.approx(50.0)
    assert s.kinds["gemm1"].mean_us == pytest.approx(25.0)
    assert s.kinds["gemm1"].wait_us == pytest.approx(5.0)
    assert s.kinds["topk_reduce"].wait_us == pytest.approx(15.0)
    assert s.span_us == {0: pytest.approx(70.0), 1: pytest.approx(5.0)}
    assert s.busy[(0, 0)] == pytest.approx(40 / 70)
    assert s.busy[(0, 1)] == pytest.approx(30 / 70)
    assert s.critical_rank == 0
    assert s.critical_path == [
        ("dispatch", pytest.approx(10.0)),
        ("gemm1", pytest.approx(30.0)),
        ("topk_reduce", pytest.approx(30.0)),
    ]
    assert "critical path (rank 0, 70.0 us)" in s.text()


def test_records_of_a_traced_interpreter_run(tmp_path):
    R, T = 2, 21
    cfg = KernelConfig(
        block_m=16, block_n=16, block_k=16, down_block_n=32, down_block_k=16,
        combine_block=8, reduce_h=32, block_h=32, chunk=4, trace=True, trace_events=64,
    )  # fmt: skip
    rt = routing.uniform(R, T, SHAPE.num_experts, SHAPE.topk, seed=3)
    pl = Placement.contiguous(SHAPE.num_experts, R)
    xs = make_tokens(SHAPE, [T] * R, 3, "cpu")
    w13, w2 = make_w13(SHAPE, 3, "cpu"), make_w2(SHAPE, 3, "cpu")
    with EmulatedWorld(R) as world:
        ws = Megakernel(world, SHAPE, config=cfg)
        handles = ws.run(
            dict(enumerate(xs)),
            dict(enumerate(rt.topk_ids)),
            dict(enumerate(rt.topk_weights)),
            {r: pl.local_weights(w13, r) for r in range(R)},
            {r: pl.local_weights(w2, r) for r in range(R)},
            mode="layer",
        )
        ws.check_errors()
        meta = ws.meta("layer")
        records = []
        for r in range(R):
            got, dropped = profiler.decode(handles[r].trace, r)
            assert dropped == 0
            stats = handles[r].stats.tolist()  # num_units, num_recv, num_tiles, num_dispatch_tasks
            count = lambda kind: sum(1 for e in got if e.kind == kind)  # noqa: E731
            assert count("dispatch") == stats[3]
            assert count("gemm1") == stats[2] * meta.GEMM1_BLOCKS
            assert count("down_combine") == stats[2] * meta.DOWN_BLOCKS
            assert count("topk_reduce") == -(-T // cfg.combine_block) * meta.GROUPS
            assert all(e.end_ns >= e.start_ns and e.rank == r for e in got)
            records += got
    s = profiler.summarize(profiler.align(records, {}))
    assert list(s.kinds) == ["dispatch", "gemm1", "down_combine", "topk_reduce"]
    profiler.write_chrome_trace(records, tmp_path / "t.json")


def test_profile_set_parses_int_knobs():
    from megakernel.profile import parse_knob

    assert parse_knob("dispatch_ctas=32") == ("dispatch_ctas", 32)
    for bad in ("dispatch_ctas", "dispatch_ctas=", "chunk=eight", "chunk=-1"):
        with pytest.raises(SystemExit, match="--set wants KNOB=V"):
            parse_knob(bad)


def test_profile_cli_traces_the_fp8_layer(tmp_path):
    """``python -m megakernel.profile --fp8`` on the CPU: a checked FP8 call (the run exits
    non-zero on a wrong output), traced, with every kind of task in its summary."""
    run = subprocess.run(
        [sys.executable, "-m", "megakernel.profile", "--fp8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "trace_cpu_R2_EmulatedWorld_fp8"
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("small layer FP8, T=19, 2 ranks")
    for kind in ("dispatch", "gemm1", "down_combine", "topk_reduce"):
        assert re.search(rf"^{kind}\s+[1-9]", summary, re.M), summary
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
