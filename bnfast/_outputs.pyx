# Memory for bnfast's large outputs: a NumPy memory handler that keeps the
# blocks of freed outputs and hands them to the next output of the same size.
#
# Why: a fresh array of tens of MB comes straight from the OS, which zeroes
# every page on first touch.  For a 32 MB float64 batch that costs more than
# the whole normalization (2.5 ms of page clearing against 1.5 ms of work
# on this project's machine), and it is paid again at every call because
# glibc returns blocks that large to the OS as soon as they are freed.  A
# training loop frees each step's outputs before the next step makes the
# same shapes again, so a block kept for reuse is already mapped.
#
# Outputs are ordinary owning arrays (base None, OWNDATA); only where their
# memory goes when they die differs.  At most `limit` bytes are kept (the
# oldest blocks are freed first), and the limit can be set to 0.

from cpython.pycapsule cimport PyCapsule_New
from cpython.ref cimport Py_INCREF
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport uint64_t

cimport numpy as cnp

cnp.import_array()

cdef extern from "outputs.h":
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler bnf_handler
    int bnf_init(size_t min_bytes)
    void bnf_set_limit(size_t limit)
    void bnf_counts(size_t* held, size_t* blocks, uint64_t* hits, uint64_t* misses)

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)
    # (steals a reference to descr)
    object PyArray_Empty(int nd, cnp.npy_intp* dims, cnp.dtype descr, int fortran)

#: Outputs smaller than this come from NumPy's own allocator: the C heap
#: keeps blocks this small mapped, so they have no page faults to save.
MIN_BYTES = 1 << 20
#: Bytes of freed outputs kept by default (BNFAST_OUTPUT_CACHE_MIB overrides).
DEFAULT_LIMIT = 256 << 20
#: Largest number of blocks kept, whatever their size.
MAX_BLOCKS = 32

if bnf_init(MIN_BYTES) != 0:
    raise MemoryError("bnfast: cannot allocate the output cache's lock")

import os

import numpy as np

cdef object _handler = PyCapsule_New(&bnf_handler, "mem_handler", NULL)
cdef Py_ssize_t _limit = 0
cdef object _np_empty = np.empty


def empty(shape, cnp.dtype dtype not None):
    """A new uninitialized array of a shape tuple; one of MIN_BYTES or more
    takes its memory from the output cache (and returns it there when it
    dies).  Made here, in C, because for the small outputs of a small call
    np.empty's own argument parsing costs more than the allocation."""
    cdef cnp.npy_intp dims[32]
    cdef Py_ssize_t nbytes = dtype.itemsize, extent
    cdef Py_ssize_t nd, k
    if type(shape) is not tuple or len(<tuple>shape) > 32:
        return _np_empty(shape, dtype)     # (not a planner's shape: NumPy decides)
    nd = len(<tuple>shape)
    for k in range(nd):
        item = (<tuple>shape)[k]
        if type(item) is not int:
            return _np_empty(shape, dtype)
        try:
            extent = item
        except OverflowError:
            return _np_empty(shape, dtype)    # NumPy's error for a bad shape
        if extent <= 0 or nbytes > PY_SSIZE_T_MAX // extent:
            return _np_empty(shape, dtype)    # empty, or NumPy's error for a bad shape
        nbytes *= extent
        dims[k] = extent
    if _limit == 0 or nbytes < MIN_BYTES:
        Py_INCREF(dtype)     # (PyArray_Empty steals a reference to it)
        return PyArray_Empty(<int>nd, dims, dtype, 0)
    previous = PyDataMem_SetHandler(_handler)
    try:
        return _np_empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(previous)


def set_limit(limit):
    """Keep at most `limit` bytes of freed outputs for reuse (0: keep none,
    and free what is kept now)."""
    global _limit
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"the output cache limit must be an int (bytes), got "
                        f"{type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"the output cache limit must be >= 0 bytes, got {limit}")
    _limit = min(limit, PY_SSIZE_T_MAX)
    bnf_set_limit(<size_t>_limit)


def get_limit():
    """The output cache's limit in bytes."""
    return _limit


def info():
    """The output cache now: limit, bytes and blocks held, and how many
    pooled allocations found a block (hits) or needed a new one (misses)."""
    cdef size_t held, blocks
    cdef uint64_t hits, misses
    bnf_counts(&held, &blocks, &hits, &misses)
    return {"limit": _limit, "held_bytes": held, "held_blocks": blocks,
            "hits": hits, "misses": misses}


def _limit_from_environment():
    value = os.environ.get("BNFAST_OUTPUT_CACHE_MIB", "").strip()
    if not value:
        return DEFAULT_LIMIT
    try:
        mib = int(value)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"BNFAST_OUTPUT_CACHE_MIB must be a whole number of MiB >= 0, "
                         f"got {value!r}")
    return mib << 20


set_limit(_limit_from_environment())
