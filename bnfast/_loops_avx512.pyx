# The hot loops of _loops.pyx, compiled for avx512 CPUs (flags in setup.py).
# bnfast/_native.py loads this module only where the CPU runs it.
include "_loops.pyx"
