"""bnfast._native: which kernel variant loads, and imports on any CPU.

Each check runs in a child interpreter: a module that executes an
instruction the CPU lacks kills its process (SIGILL), which must fail the
test, not the test run.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bnfast import _native
from bnfast._kernels import cpu_level

from conftest import REPO


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


@pytest.mark.skipif(cpu_level() >= max(level for _, level, _ in _native._VARIANTS),
                    reason="this CPU runs every kernel variant")
def test_a_variant_the_cpu_cannot_run_raises_import_error_naming_the_instructions():
    name, _, module = next(v for v in _native._VARIANTS if v[1] > cpu_level())
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
