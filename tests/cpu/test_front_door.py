"""The front door, as a new user meets it: the README's quickstart runs as written, the command
line lists its presets and refuses an unknown one, and a plain (non-editable) install carries
everything ``python -m megakernel`` needs."""

import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what a source copy to install from leaves out
SKIP = (".git", ".venv", ".old", ".whl", "build", "*.egg-info", "__pycache__", "results", "out")


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_readme_quickstart_runs_as_written():
    assert os.environ.get("TRITON_INTERPRET") == "1", "the CPU suite runs under the interpreter"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_block("## Quickstart"), "README quickstart", "exec"), {})
    errors = [
        float(e) for e in re.findall(r"relative error against moe_ref (\S+)", printed.getvalue())
    ]
    assert len(errors) == 2, printed.getvalue()
    assert all(e < 2e-2 for e in errors), errors  # bf16, as on a GPU
    assert "Megakernel workspace per rank" in printed.getvalue()


def megakernel_cli(*args: str, cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "megakernel", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_help_lists_the_presets_and_where_each_part_runs():
    from megakernel.shapes import PRESETS

    done = megakernel_cli("--help")
    assert done.returncode == 0, done.stderr
    for name in PRESETS:
        assert name in done.stdout
    assert "CPU" in done.stdout and "GPU" in done.stdout


def test_an_unknown_preset_is_an_error():
    done = megakernel_cli("--preset", "nope", "--tokens", "3")
    assert done.returncode == 2
    assert "nope" in done.stderr and "dsv3" in done.stderr


def test_a_plain_install_ships_the_command_line_tools(tmp_path):
    """``pip install .`` (not editable) carries megakernel, symm_mem and the benchmarks that
    ``python -m megakernel`` runs on GPUs, so it works away from the checkout."""
    # a copy of the sources: building in place would leave build/ in the checkout
    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*SKIP))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    if importlib.util.find_spec("setuptools"):  # else pip fetches it into an isolated build
        pip.append("--no-build-isolation")
    pip += ["--target", str(site), str(source)]
    done = subprocess.run(pip, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for package in ("megakernel", "symm_mem", "perf"):
        assert (site / package / "__init__.py").exists(), package
    env = {"PYTHONPATH": str(site)}
    done = megakernel_cli("--help", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    probe = "import perf.bench_layer, megakernel.profile; print(perf.bench_layer.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site))


@pytest.mark.parametrize("path", ["README.md", "docs/DESIGN.md", "perf/RESULTS.md"])
def test_docs_speak_of_hardware_not_of_machine_names(path):
    text = (ROOT / path).read_text()
    assert not re.search(r"nvidia-h\d00(-x\d)?", text), "name the GPUs, not the lending kinds"
