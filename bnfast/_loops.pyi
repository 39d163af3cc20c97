"""Type stub of the compiled hot loops (bnfast/_loops.pyx).

Nothing here is called from Python but by bnfast._kernels: ``dispatch`` is
a capsule of the loops' one entry, ``LAYOUT`` the sizes of the structures
they were built with.  _loops_avx2 and _loops_avx512 are the same code
compiled with other flags (their stubs re-export this one).
"""
from typing import Any

dispatch: Any
LAYOUT: tuple[int, ...]

def openmp_enabled() -> bool: ...
def build_flags() -> str: ...
