"""Where benchmark results go: one JSON per run, with the run's metadata, under ``RESULTS``:
perf/results/ of a source checkout, else ./perf_results (an installed package writes nothing into
site-packages); ``MEGAKERNEL_RESULTS`` names another folder."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path

import torch
import triton

_CHECKOUT = (Path(__file__).resolve().parents[1] / "pyproject.toml").exists()
_DEFAULT = Path(__file__).resolve().parent / "results" if _CHECKOUT else Path("perf_results")
RESULTS = Path(os.environ.get("MEGAKERNEL_RESULTS") or _DEFAULT)


def run_meta() -> dict[str, str]:
    """GPU, versions, git commit (``GIT_SHA`` where the checkout has no .git) and UTC date."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git": os.environ.get("GIT_SHA") or git.stdout.strip() or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(stem: str, payload: dict) -> tuple[str, dict[str, str]]:
    """Write ``{"meta": run_meta(), **payload}`` to ``RESULTS/<stem>_<gpu>.json``; returns the
    file's path and the metadata."""
    meta = run_meta()
    gpu = re.sub(r"[^a-z0-9]+", "_", meta["gpu"].lower()).strip("_")
    name = f"{stem}_{gpu}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps({"meta": meta, **payload}, indent=1))
    return str(RESULTS / name), meta


def knob_values(specs: list[str]) -> list[tuple[str, int | str]]:
    """``["dispatch_ctas=32,64", "pack=scan"]`` -> ``[("dispatch_ctas", 32), ("dispatch_ctas",
    64), ("pack", "scan")]``: the ``KernelConfig`` knobs a benchmark's ``--vary`` also times
    (True / False are bools; any other value that is not an int stays a string, which
    ``KernelConfig`` checks). Results are keyed by
    ``KNOB=value``, so a value given twice is refused rather than timed twice and reported once."""
    out = []
    for spec in specs:
        knob, sep, values = spec.partition("=")
        if not sep or not values:
            raise SystemExit(f"--vary wants KNOB=V1,V2,..., got {spec!r}")
        for v in values.split(","):
            value = int(v) if v.lstrip("-").isdigit() else {"True": True, "False": False}.get(v, v)
            pair = (knob, value)
            if pair in out:
                raise SystemExit(
                    f"--vary gives {knob}={pair[1]} twice; each variant is timed once, paired "
                    "with the default (run the command again for a second figure)"
                )
            out.append(pair)
    return out


def knob_sets(specs: list[str]) -> list[tuple[str, dict[str, int | str]]]:
    """``knob_values``, with knobs that only make sense together joined by ``+``:
    ``["half_tiles=True", "block_m=64+num_warps=4"]`` -> ``[("half_tiles=True", {"half_tiles":
    True}), ("block_m=64+num_warps=4", {"block_m": 64, "num_warps": 4})]``, each (label, knobs)
    one variant. A joined spec takes one value per knob."""
    out: list[tuple[str, dict[str, int | str]]] = []
    for spec in specs:
        if "+" not in spec:
            out += [(f"{k}={v}", {k: v}) for k, v in knob_values([spec])]
            continue
        parts = spec.split("+")
        pairs = knob_values(parts)
        if len(pairs) != len(parts) or len({k for k, _ in pairs}) != len(pairs):
            raise SystemExit(f"a joined variant takes one value per knob, once: {spec!r}")
        out.append((spec, dict(pairs)))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"a variant is given twice in {specs}: each is timed once")
    return out
