"""Smoke test of bench/tuning.py, the tuning-knob sweep: a tiny sweep runs,
its report has the documented structure, and the kernels' defaults come back
afterwards, errors included.  No timing is checked (the ratios of a tiny
sweep on a shared machine mean nothing); run the script itself to measure.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import bnfast
from bnfast._native import kernels

SCRIPT = Path(__file__).with_name("tuning.py")
#: The tiniest sweep that times something: one shape, one repeat, short turns.
TINY = ["--quick", "--repeats", "1", "--target-ms", "0.2", "--threads", "1"]
TABLE_HEADER = "| shape | dtype | op | default | default time | alternative | ratio | noise |"
#: Shapes whose grids show whether the knobs are back at their defaults.
PROBES = ((128, 8192, 4), (1024, 4096, 4), (256, 1024, 8), (16384, 256, 4), (8, 16384, 4))


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bnfast_bench_tuning", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tuning() -> ModuleType:
    return _load()


def _grids() -> list[dict[str, Any]]:
    return [dict(kernels._grid_info(n, d, s, s)) for n, d, s in PROBES]


@pytest.fixture
def defaults_restored() -> Any:
    """The test leaves the kernels' knobs and threads as it found them."""
    kernels._set_tuning()
    threads = bnfast.get_num_threads()
    before = _grids()
    yield
    assert _grids() == before
    assert bnfast.get_num_threads() == threads


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _sections(text: str) -> dict[str, list[str]]:
    """Lines of each "### `knob`" section."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^### `(\w+)`$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif line.startswith("## "):
            current = None
        elif current is not None:
            sections[current].append(line)
    return sections


def test_every_knob_has_a_sweep(tuning: ModuleType) -> None:
    """A new run-time knob needs its measurement (issue 19, item 4)."""
    swept = {sweep.knob for sweep in tuning.SWEEPS}
    assert set(tuning.knob_defaults()) <= swept


def test_constants_table_is_read(tuning: ModuleType) -> None:
    constants = {c.name: c for c in tuning.compiled_constants()}
    for name in ("TILE_BYTES", "TARGET_TASKS", "PARALLEL_MIN_BYTES", "STRIP_BYTES"):
        assert name in constants
        assert constants[name].value > 0
        assert constants[name].comment


def test_tiny_sweep_report(tuning: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           defaults_restored: None) -> None:
    out = tmp_path / "docs" / "tuning.md"
    knobs = ["stream_pages_max_cols", "fold_max_cols"]    # in SWEEPS order
    assert tuning.main(TINY + ["--knobs", ",".join(knobs), "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out.strip() == text.strip()     # printed and written

    # header: the machine and the kernels that ran
    info = bnfast.build_info()
    assert text.startswith("# bnfast tuning sweep")
    assert f"| kernels | {info['isa']} " in text
    assert "| threads | 1 |" in text
    assert f"| numpy | {np.__version__} |" in text
    assert re.search(r"^\| CPU \| .+ \|$", text, re.M)
    assert re.search(r"^\| date \| \d{4}-\d\d-\d\d \d\d:\d\d UTC \|$", text, re.M)
    assert "## Method" in text

    # the summary: one row per knob swept, each with a verdict
    summary = text.split("## Run-time knobs", 1)[1].split("### ", 1)[0]
    rows = [_cells(line) for line in summary.splitlines() if line.startswith("| `")]
    assert [row[0] for row in rows] == [f"`{k}`" for k in knobs]
    assert all(len(row) == 3 and row[2] for row in rows)

    # one section per knob: a verdict, then a table of 8 columns
    sections = _sections(text)
    assert list(sections) == knobs
    for knob, lines in sections.items():
        assert sum(line.startswith("**Verdict:** ") for line in lines) == 1, knob
        assert TABLE_HEADER in lines, knob
        table = [_cells(line) for line in lines[lines.index(TABLE_HEADER) + 2:]
                 if line.startswith("|")]
        assert table, knob
        for shape, dtype, ops, default, time, alternative, ratio, noise in table:
            assert re.fullmatch(r"\d+(x\d+)+( nchw| cl)?", shape)
            assert dtype in ("float32", "float64")
            assert set(ops.split(", ")) <= {"train", "eval", "backward"}
            assert default and re.fullmatch(r"\w+ = .+", alternative)
            if re.fullmatch(r"\d+\.\d{3}", ratio):         # timed
                assert float(ratio) > 0 and float(noise) > 0
                assert time.endswith(" µs") and "," not in ops
            else:
                assert ratio == "same grid — not timed" and not noise and not time

    # fold_max_cols is timed (rows of 48 features are folded only with it)
    timed = [_cells(line) for line in sections["fold_max_cols"]
             if line.startswith("| 4096x48 | float32 |")]
    assert any(row[5] == "off = 0" and re.fullmatch(r"\d+\.\d{3}", row[6])
               for row in timed)

    # the compile-time constants, listed, not swept
    fixed = text.split("## Compile-time constants", 1)[1]
    for name in ("TILE_BYTES", "TARGET_TASKS", "PARALLEL_MIN_BYTES", "ELEM_MIN_ROWS",
                 "PLANE_TASK_BYTES", "CHANNEL_RUN_BYTES", "MAX_CHANNEL_BLOCK"):
        row = next(_cells(line) for line in fixed.splitlines() if line.startswith(f"| `{name}`"))
        assert row[3] == "compile-time; not swept" and row[4]
    assert "| `STRIP_BYTES`" not in fixed        # a run-time knob's constant is swept


def test_plan_covers_every_knob(tuning: ModuleType, capsys: pytest.CaptureFixture[str],
                                defaults_restored: None) -> None:
    """--plan works out every knob's grids on every shape and times nothing."""
    assert tuning.main(["--plan"]) == 0
    text = capsys.readouterr().out
    assert list(_sections(text)) == [sweep.knob for sweep in tuning.SWEEPS]
    assert " µs |" not in text


def test_error_in_a_cell_restores_defaults(tuning: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           defaults_restored: None) -> None:
    """An error while an alternative's tuning is set: the cell reports it,
    the sweep goes on, and the defaults come back; an interrupt propagates,
    with the defaults back too.  (strip_bytes: its alternatives show in the
    grids that defaults_restored compares.)"""
    def failing(exc: BaseException) -> Any:
        calls = []

        def loop(call: Any, iterations: int) -> float:
            calls.append(call)
            if len(calls) == 2:     # the first alternative's turn: its tuning is set
                raise exc
            return 1e-3
        return loop

    monkeypatch.setattr(tuning, "_loop", failing(RuntimeError("injected")))
    assert tuning.main(TINY + ["--knobs", "strip_bytes"]) == 1      # reported, not raised
    assert "error: RuntimeError: injected" in capsys.readouterr().out
    assert _grids() == [dict(kernels._grid_info(n, d, s, s)) for n, d, s in PROBES]

    monkeypatch.setattr(tuning, "_loop", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        tuning.main(TINY + ["--knobs", "strip_bytes"])


def test_script_runs_standalone_on_the_baseline_kernels(tmp_path: Path) -> None:
    env = {**os.environ, "BNFAST_ISA": "baseline"}
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--knobs", "fold_max_cols"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| kernels | baseline (BNFAST_ISA=baseline);" in done.stdout
    assert "loops `bnfast._loops` |" in done.stdout
