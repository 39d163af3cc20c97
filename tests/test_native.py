"""bnfast._native: which kernel variant loads, imports on any CPU, fork safety.

Each check runs in a child interpreter: a module that executes an
instruction the CPU lacks kills its process (SIGILL), and a fork with a
broken OpenMP pool hangs; either must fail the test, not the test run.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

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
