"""Which build of the hot loops runs here.

The kernels' entry points (bnfast/_kernels.pyx) are compiled once, for the
baseline.  The hot loops behind them (bnfast/_loops.pyx) are compiled for
the x86-64 baseline and, on x86-64 with GCC or Clang, again for AVX2 and for
AVX-512.  At import the widest variant this CPU runs is loaded and handed to
the entry points; ``BNFAST_ISA=baseline|avx2|avx512`` forces one (an error if
the CPU or the build lacks it).  All other modules reach the kernels through
``kernels`` here.

Importing a variant the CPU cannot run raises ImportError: each variant has a
baseline-compiled entry point that checks the CPU first
(bnfast/csrc/isa_entry.c).

Threads and fork: OpenMP's thread pool does not survive ``fork``; a child
that entered a parallel region would wait forever for the parent's threads.
In a child created by ``fork`` the kernels therefore run on one thread (they
then never enter a parallel region), and ``set_num_threads(n > 1)`` raises
there.  Processes started with "spawn" or "forkserver" are not affected.
"""
from __future__ import annotations

import importlib
import importlib.util
import operator
import os
from types import ModuleType

from . import _kernels
from . import _loops as _baseline

#: The entry points, one build for every CPU; every other module calls these.
kernels = _kernels

# name, the cpu_level() it needs, module
_VARIANTS = (("avx512", 2, "bnfast._loops_avx512"), ("avx2", 1, "bnfast._loops_avx2"))


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
    level = kernels.cpu_level()
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


loops, isa = _select()
kernels._use_loops(loops)

#: True in a process created by fork() from one that had imported bnfast.
_forked_child = False


def _one_thread_after_fork() -> None:
    global _forked_child
    _forked_child = True
    kernels.set_num_threads(1)


if hasattr(os, "register_at_fork"):      # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def _as_count(n: object) -> int:
    try:
        return operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        return 1            # not a count: the kernels' own check says so below


def set_num_threads(n: int) -> None:
    """Threads the kernels use from now on (1 .. any; OpenMP builds only above 1).

    In a process created by ``fork`` the kernels run on one thread and more
    are refused: OpenMP's thread pool does not survive a fork.
    """
    if _forked_child and _as_count(n) > 1:
        raise RuntimeError(
            f"cannot use {n} threads in a process created by fork(): OpenMP's thread pool "
            "does not survive a fork, so bnfast runs on one thread here; start workers "
            "with the 'spawn' or 'forkserver' method to use threads in them")
    kernels.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the kernels use (1 in a build without OpenMP or in a forked child)."""
    return int(kernels.get_num_threads())


def build_info() -> dict[str, object]:
    """How the running kernels were built and what they use."""
    return {
        "isa": isa,
        "isa_built": available(),
        "cpu_level": kernels.cpu_level(),
        "openmp": kernels.openmp_enabled(),
        "threads": get_num_threads(),
        "build_flags": loops.build_flags(),
    }
