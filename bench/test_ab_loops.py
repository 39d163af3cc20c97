"""Smoke test of bench/ab_loops.py, the in-process comparison of two builds of
the loops: a tiny comparison against a copy of this build runs and reports,
the dispatch comes back to this build's loops, and what it cannot compare is
refused with a clear error.  No timing is checked (a tiny run on a shared
machine means nothing); run the script itself to measure.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import bnfast
from bnfast import _native

SCRIPT = Path(__file__).with_name("ab_loops.py")
TINY = ["--repeats", "1", "--target-ms", "0.2", "--threads", "1"]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bnfast_bench_ab_loops", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ab() -> ModuleType:
    return _load()


@pytest.fixture
def copy_of_this_build(tmp_path: Path) -> Path:
    """A second file of the running loops module: another build to load."""
    (tmp_path / "bnfast").mkdir()
    loops_file = Path(_native.loops.__file__)
    shutil.copy(loops_file, tmp_path / "bnfast" / loops_file.name)
    return tmp_path


def _forward(x: np.ndarray) -> np.ndarray:
    layer = bnfast.BatchNormalization(np.ones(x.shape[1]), np.zeros(x.shape[1]))
    return np.asarray(layer.forward(x, True))


def test_a_tiny_comparison_reports_every_cell_and_restores_the_dispatch(
        ab, copy_of_this_build, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((64, 40))
    before = _forward(x)
    out = tmp_path / "rows.json"
    threads = bnfast.get_num_threads()
    try:
        assert ab.main([str(copy_of_this_build), "--cells",
                        "32x128:float32:eval,4x3x8x8:cl:float64:backward", "--json", str(out),
                        *TINY]) == 0
    finally:
        bnfast.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "32x128 float32 eval" in text and "4x3x8x8 cl float64 backward" in text
    assert "geomean speedup" in text and "slower beyond noise:" in text
    rows = json.loads(out.read_text())
    assert [r["cell"] for r in rows] == ["32x128 float32 eval", "4x3x8x8 cl float64 backward"]
    assert all(r["this_s"] > 0 and r["base_s"] > 0 for r in rows)
    # the entry points run this build's loops again, and compute the same bits
    assert np.array_equal(_forward(x), before)


def test_the_base_must_be_another_build_with_the_loops(ab, tmp_path):
    with pytest.raises(FileNotFoundError, match="no bnfast/_loops"):
        ab.load_base(str(tmp_path))
    this_checkout = Path(_native.loops.__file__).parent.parent
    with pytest.raises(ValueError, match="is this build"):
        ab.load_base(str(this_checkout))


@pytest.mark.parametrize("spec", ["32x128:float16:eval", "32x128:flat:float32:sideways",
                                  "32x128:nhwc:float32:train", "32x128:train"])
def test_a_malformed_cell_is_refused_by_name(ab, spec):
    with pytest.raises(Exception, match="expected SHAPE"):
        ab.parse_cells(spec)


def test_a_cell_is_slower_only_beyond_its_noise_and_three_percent(ab):
    assert ab.slower({"speedup": 0.90, "noise": 1.02})
    assert not ab.slower({"speedup": 0.98, "noise": 1.00})      # within 3 %
    assert not ab.slower({"speedup": 0.93, "noise": 0.92})      # within its noise
