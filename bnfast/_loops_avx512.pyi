"""Type stub of bnfast._loops_avx512: the loops of _loops.pyx compiled for
avx512 CPUs (see _loops.pyi).  Built on x86-64 with GCC/Clang only."""
from ._loops import LAYOUT as LAYOUT
from ._loops import build_flags as build_flags
from ._loops import dispatch as dispatch
from ._loops import openmp_enabled as openmp_enabled
