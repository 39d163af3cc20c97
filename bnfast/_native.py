"""Which build of the kernels runs here.

setup.py compiles bnfast/_kernels.pyx once for the x86-64 baseline and, on
x86-64 with GCC or Clang, again for AVX2 and for AVX-512.  At import the widest
variant this CPU runs is loaded; ``BNFAST_ISA=baseline|avx2|avx512`` forces
one (an error if the CPU or the build lacks it).  All other modules reach the
kernels through ``kernels`` here.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from . import _kernels as _baseline

# name, the cpu_level() it needs, module
_VARIANTS = (("avx512", 2, "bnfast._kernels_avx512"), ("avx2", 1, "bnfast._kernels_avx2"))


def _built(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def available() -> list[str]:
    """Variants built into this installation, widest first ('baseline' always)."""
    names = [name for name, _, module in _VARIANTS
             if importlib.util.find_spec(module) is not None]
    return names + ["baseline"]


def _select() -> tuple[ModuleType, str]:
    level = _baseline.cpu_level()
    forced = os.environ.get("BNFAST_ISA", "").strip().lower()
    if forced in ("", "auto"):
        for name, needs, module in _VARIANTS:
            if level >= needs:
                found = _built(module)
                if found is not None:
                    return found, name
        return _baseline, "baseline"
    if forced == "baseline":
        return _baseline, "baseline"
    for name, needs, module in _VARIANTS:
        if forced == name:
            if level < needs:
                raise RuntimeError(f"BNFAST_ISA={forced}: this CPU does not run {name} code")
            found = _built(module)
            if found is None:
                raise RuntimeError(f"BNFAST_ISA={forced}: this installation has no {name} "
                                   f"kernels (built: {', '.join(available())})")
            return found, name
    raise RuntimeError(f"BNFAST_ISA={forced!r} is not one of auto, baseline, avx2, avx512")


kernels, isa = _select()


def build_info() -> dict[str, object]:
    """How the running kernels were built and what they use."""
    return {
        "isa": isa,
        "isa_built": available(),
        "cpu_level": _baseline.cpu_level(),
        "openmp": kernels.openmp_enabled(),
        "threads": kernels.get_num_threads(),
        "build_flags": kernels.build_flags(),
    }
