"""bnfast._native: which kernel variant loads, imports on any CPU, fork safety.

Each check runs in a child interpreter: a module that executes an
instruction the CPU lacks kills its process (SIGILL), and a fork with a
broken OpenMP pool hangs; either must fail the test, not the test run.
"""
from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bnfast
from bnfast import _native
from bnfast._kernels import cpu_level

from conftest import REPO

OPENMP = bnfast.build_info()["openmp"]


def run_python(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO.parent)


def test_every_module_imports_or_raises_import_error_for_a_variant_the_cpu_lacks():
    result = run_python("""
        import importlib, pkgutil, sys
        import bnfast
        refused = []
        for info in pkgutil.walk_packages(bnfast.__path__, "bnfast."):
            print(info.name, flush=True)          # the last name printed is the culprit
            try:
                importlib.import_module(info.name)
            except ImportError as exc:
                refused.append(info.name)
                print("  ImportError:", exc, flush=True)
        print("REFUSED", sorted(refused))
    """)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr)
    needs = {module: level for _, level, module in _native._VARIANTS}
    expected = sorted(module for module in needs
                      if needs[module] > cpu_level() and module in result.stdout)
    assert f"REFUSED {expected}" in result.stdout, result.stdout


# Variants built here (none on aarch64 or with BNFAST_VARIANTS=0) that this CPU cannot run.
UNRUNNABLE = [v for v in _native._VARIANTS
              if v[1] > cpu_level() and importlib.util.find_spec(v[2]) is not None]


@pytest.mark.skipif(not UNRUNNABLE, reason="no variant built here that this CPU cannot run")
def test_a_variant_the_cpu_cannot_run_raises_import_error_naming_the_instructions():
    name, _, module = UNRUNNABLE[0]
    result = run_python(f"""
        try:
            import {module}
        except ImportError as exc:
            print("ImportError:", exc)
        else:
            print("imported")
    """)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert f"bnfast's {name} kernels need a CPU with" in result.stdout, result.stdout
    assert "AVX" in result.stdout, result.stdout


FORK_CHILDREN = """
    import multiprocessing, numpy as np, bnfast
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1024, 4096))       # large enough for every thread
    ones, zeros = np.ones(4096), np.zeros(4096)
    bnfast.set_num_threads(2 if bnfast.build_info()["openmp"] else 1)
    expected = bnfast.BatchNormalization(ones, zeros).forward(x, True)   # OpenMP pool starts

    def child(seed):
        refused = None
        try:
            bnfast.set_num_threads(2)
        except RuntimeError as exc:
            refused = str(exc)
        out = bnfast.BatchNormalization(ones, zeros).forward(x, True)
        return bnfast.get_num_threads(), bool((out == expected).all()), refused

    if __name__ == "__main__":
        with multiprocessing.get_context("fork").Pool(2) as pool:
            for threads, equal, refused in pool.map(child, range(4)):
                print("child", threads, equal, refused)
        print("parent", bnfast.get_num_threads())
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_forked_children_run_on_one_thread_with_the_parents_results_and_never_hang(tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(textwrap.dedent(FORK_CHILDREN))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, cwd=REPO.parent)
    assert result.returncode == 0, (result.stdout, result.stderr)
    children = [line.split(" ", 3) for line in result.stdout.splitlines()
                if line.startswith("child")]
    assert len(children) == 4, result.stdout
    for _, threads, equal, refused in children:
        assert threads == "1" and equal == "True", result.stdout
        if OPENMP:
            assert "fork" in refused and "spawn" in refused, refused
    assert f"parent {2 if OPENMP else 1}" in result.stdout, result.stdout


def test_set_num_threads_outside_a_fork_is_not_limited():
    before = bnfast.get_num_threads()
    try:
        bnfast.set_num_threads(1)
        assert bnfast.get_num_threads() == 1
        if OPENMP:
            bnfast.set_num_threads(3)
            assert bnfast.get_num_threads() == 3
    finally:
        bnfast.set_num_threads(before)


def test_only_the_hot_loops_are_compiled_per_instruction_set():
    """The entry points, validation and planning are one baseline module;
    a variant holds the loops and what the planner needs to trust them."""
    for _, _, module in _native._VARIANTS:
        assert importlib.util.find_spec(module.replace("_loops", "_kernels")) is None, module
    loops_api = {"dispatch", "LAYOUT", "openmp_enabled", "build_flags"}
    public = {name for name in vars(_native.loops) if not name.startswith("_")}
    assert public == loops_api, public
    assert _native.kernels.__name__ == "bnfast._kernels"


def test_build_info_reports_the_loops_in_use():
    info = bnfast.build_info()
    assert info["build_flags"] == _native.loops.build_flags()
    wanted = {"baseline": None, "avx2": "-mavx2", "avx512": "-mavx512f"}[info["isa"]]
    if wanted is None:
        assert "-mavx" not in info["build_flags"], info
    else:
        assert wanted in info["build_flags"], info


CAPSULE_NAME = b"not bnfast's loops"     # alive as long as the capsule below


def other_capsule() -> object:
    """A capsule that is not the loops' dispatch (its pointer is never called)."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(1, CAPSULE_NAME, None)


@pytest.mark.parametrize("layout, dispatch", [
    ((1, 2, 3), None),                # built from other sources
    (None, None),                     # not a loops module at all
    ("same", "other"),                # the right layout, another capsule
    ("same", None),                   # the right layout, no capsule
])
def test_loops_the_entry_points_cannot_trust_are_refused_and_the_loops_in_use_stay(
        layout, dispatch, rng):
    from types import SimpleNamespace
    fake = SimpleNamespace(__name__="fake_loops",
                           LAYOUT=_native.loops.LAYOUT if layout == "same" else layout,
                           dispatch=other_capsule() if dispatch == "other" else dispatch)
    x = rng.standard_normal((64, 10))
    layer = bnfast.BatchNormalization(np.ones(10), np.zeros(10))
    before = layer.forward(x, True).copy()
    with pytest.raises((ImportError, ValueError), match="rebuild|PyCapsule"):
        _native.kernels._use_loops(fake)
    assert np.array_equal(bnfast.BatchNormalization(np.ones(10), np.zeros(10)).forward(x, True),
                          before)
