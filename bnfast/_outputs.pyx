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
# memory goes when they die differs, and where they sit in their page (away
# from the arrays the kernels read while writing them: see _away_from).  At
# most `limit` bytes are kept (the oldest blocks are freed first), and the
# limit can be set to 0.

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
    void bnf_set_offset(size_t offset)

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


cdef size_t _away_from(tuple near):
    """A page offset for an output that the kernels write while they read
    the arrays `near`: in the middle of the widest gap between their
    offsets into a 4 KiB page, on a 64-byte line (where the kernels'
    streaming stores write whole lines straight from the registers).  A
    store and a later load whose addresses agree in their low 12 bits are
    taken for a dependency by x86 cores ("4K aliasing"), so an output
    written near its input's page offset stalls the loads that follow each
    store: placed 48 bytes past x's offset (where this cache used to put
    the output of a NumPy array, which starts 16 bytes into its page),
    one-thread eval forwards of 256 x 1024 float64 ran 2x slower than 2 KiB
    away."""
    cdef size_t offsets[8]
    cdef size_t k, m = 0, i, j, gap, best_gap = 0, best = 0, o
    for item in near:
        if m < 8 and isinstance(item, cnp.ndarray):
            offsets[m] = <size_t>cnp.PyArray_DATA(<cnp.ndarray>item) & 4095
            m += 1
    if m == 0:
        return 0
    for i in range(m):      # (a few values: sorted in place)
        for j in range(i + 1, m):
            if offsets[j] < offsets[i]:
                offsets[i], offsets[j] = offsets[j], offsets[i]
    for k in range(m):
        o = offsets[k]
        gap = (offsets[k + 1] - o) if k + 1 < m else (offsets[0] + 4096 - o)
        if gap > best_gap:
            best_gap, best = gap, o + gap // 2
    return best & ~(<size_t>63) & 4095


def empty(shape, cnp.dtype dtype not None, near=None):
    """A new uninitialized array of a shape tuple; one of MIN_BYTES or more
    takes its memory from the output cache (and returns it there when it
    dies), placed away from `near` (an array, or a tuple of arrays) in its
    page (see _away_from).  Made here, in C, because for the small outputs
    of a small call np.empty's own argument parsing costs more than the
    allocation."""
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
    if near is not None:
        bnf_set_offset(_away_from(near if type(near) is tuple else (near,)))
    previous = PyDataMem_SetHandler(_handler)
    try:
        return _np_empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(previous)
        bnf_set_offset(0)


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
