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
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport uint64_t

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #include <stdint.h>
    #include "pythread.h"
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif

    /* Every block: malloc(capacity + BNF_HEAD), data aligned to 64 bytes,
       the raw pointer and capacity stored just below the data. */
    #define BNF_ALIGN 64
    #define BNF_HEAD (BNF_ALIGN + 2 * sizeof(size_t))
    #define BNF_PAGE 4096
    #define BNF_SLOTS 32
    #define BNF_HUGE_BYTES (4u << 20)

    static PyThread_type_lock bnf_lock = NULL;
    static void* bnf_held[BNF_SLOTS];      /* oldest first */
    static size_t bnf_n_held = 0;
    static size_t bnf_held_bytes = 0;
    static size_t bnf_limit = 0;
    static size_t bnf_min_bytes = 1;
    static uint64_t bnf_hits = 0, bnf_misses = 0;

    static size_t bnf_capacity(const void* data) { return ((const size_t*)data)[-1]; }
    static void* bnf_raw(const void* data) { return ((void* const*)data)[-2]; }

    static void* bnf_new_block(size_t capacity) {
        if (capacity > SIZE_MAX - BNF_HEAD) return NULL;
        char* raw = (char*)malloc(capacity + BNF_HEAD);
        if (raw == NULL) return NULL;
        uintptr_t at = ((uintptr_t)raw + 2 * sizeof(size_t) + BNF_ALIGN - 1)
                       & ~(uintptr_t)(BNF_ALIGN - 1);
        char* data = (char*)at;
        ((size_t*)data)[-1] = capacity;
        ((void**)data)[-2] = raw;
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        /* as NumPy's own allocator does for large arrays */
        if (capacity >= BNF_HUGE_BYTES) {
            uintptr_t start = (at + BNF_PAGE - 1) & ~(uintptr_t)(BNF_PAGE - 1);
            uintptr_t end = (at + capacity) & ~(uintptr_t)(BNF_PAGE - 1);
            if (end > start) madvise((void*)start, end - start, MADV_HUGEPAGE);
        }
    #endif
        return data;
    }

    /* Capacity for a request: whole pages for pooled sizes (so that the
       same shape finds the same block), exact otherwise. */
    static size_t bnf_round(size_t size) {
        if (size < bnf_min_bytes || size > SIZE_MAX - BNF_PAGE) return size ? size : 1;
        return (size + BNF_PAGE - 1) & ~(size_t)(BNF_PAGE - 1);
    }

    static void* bnf_take(size_t capacity) {
        void* found = NULL;
        PyThread_acquire_lock(bnf_lock, WAIT_LOCK);
        for (size_t i = bnf_n_held; i-- > 0;) {      /* newest first */
            if (bnf_capacity(bnf_held[i]) == capacity) {
                found = bnf_held[i];
                memmove(bnf_held + i, bnf_held + i + 1, (bnf_n_held - i - 1) * sizeof(void*));
                bnf_n_held--;
                bnf_held_bytes -= capacity;
                break;
            }
        }
        if (found) bnf_hits++; else bnf_misses++;
        PyThread_release_lock(bnf_lock);
        return found;
    }

    static void* bnf_malloc(void* ctx, size_t size) {
        size_t capacity = bnf_round(size);
        void* data = capacity >= bnf_min_bytes ? bnf_take(capacity) : NULL;
        return data ? data : bnf_new_block(capacity);
    }

    static void* bnf_calloc(void* ctx, size_t nelem, size_t elsize) {
        if (elsize && nelem > SIZE_MAX / elsize) return NULL;
        void* data = bnf_malloc(ctx, nelem * elsize);
        if (data) memset(data, 0, nelem * elsize);
        return data;
    }

    /* Keep the block if it fits under the limit, freeing the oldest kept
       blocks to make room; blocks are freed outside the lock. */
    static void bnf_free(void* ctx, void* data, size_t size) {
        void* evicted[BNF_SLOTS + 1];
        size_t n_evicted = 0;
        if (data == NULL) return;
        size_t capacity = bnf_capacity(data);
        PyThread_acquire_lock(bnf_lock, WAIT_LOCK);
        if (capacity >= bnf_min_bytes && capacity <= bnf_limit) {
            while (bnf_n_held == BNF_SLOTS || bnf_held_bytes + capacity > bnf_limit) {
                evicted[n_evicted++] = bnf_held[0];
                bnf_held_bytes -= bnf_capacity(bnf_held[0]);
                memmove(bnf_held, bnf_held + 1, (bnf_n_held - 1) * sizeof(void*));
                bnf_n_held--;
            }
            bnf_held[bnf_n_held++] = data;
            bnf_held_bytes += capacity;
        } else {
            evicted[n_evicted++] = data;
        }
        PyThread_release_lock(bnf_lock);
        for (size_t i = 0; i < n_evicted; i++) free(bnf_raw(evicted[i]));
    }

    static void* bnf_realloc(void* ctx, void* data, size_t size) {
        if (data == NULL) return bnf_malloc(ctx, size);
        size_t capacity = bnf_capacity(data);
        if (size <= capacity && bnf_round(size) == capacity) return data;
        void* moved = bnf_malloc(ctx, size);
        if (moved == NULL) return NULL;
        memcpy(moved, data, size < capacity ? size : capacity);
        bnf_free(ctx, data, capacity);
        return moved;
    }

    static PyDataMem_Handler bnf_handler = {
        "bnfast_outputs", 1,
        {NULL, bnf_malloc, bnf_calloc, bnf_realloc, bnf_free}
    };

    static int bnf_init(size_t min_bytes) {
        bnf_min_bytes = min_bytes;
        bnf_lock = PyThread_allocate_lock();
        return bnf_lock ? 0 : -1;
    }

    static void bnf_set_limit(size_t limit) {
        bnf_limit = limit;
        /* an over-limit pool drains at the next free; empty it now */
        void* data = (void*)1;
        while (data) {
            data = NULL;
            PyThread_acquire_lock(bnf_lock, WAIT_LOCK);
            if (bnf_n_held && bnf_held_bytes > bnf_limit) {
                data = bnf_held[0];
                bnf_held_bytes -= bnf_capacity(data);
                memmove(bnf_held, bnf_held + 1, (bnf_n_held - 1) * sizeof(void*));
                bnf_n_held--;
            }
            PyThread_release_lock(bnf_lock);
            if (data) free(bnf_raw(data));
        }
    }

    static void bnf_counts(size_t* held, size_t* blocks, uint64_t* hits, uint64_t* misses) {
        PyThread_acquire_lock(bnf_lock, WAIT_LOCK);
        *held = bnf_held_bytes;
        *blocks = bnf_n_held;
        *hits = bnf_hits;
        *misses = bnf_misses;
        PyThread_release_lock(bnf_lock);
    }
    """
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler bnf_handler
    int bnf_init(size_t min_bytes)
    void bnf_set_limit(size_t limit)
    void bnf_counts(size_t* held, size_t* blocks, uint64_t* hits, uint64_t* misses)

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)

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


def empty(shape, dtype):
    """A new uninitialized array (dtype: a numpy.dtype); one of MIN_BYTES or
    more takes its memory from the output cache (and returns it there when
    it dies)."""
    cdef Py_ssize_t nbytes = (<cnp.dtype?>dtype).itemsize
    cdef Py_ssize_t extent
    if _limit == 0:
        return _np_empty(shape, dtype)
    for extent in ((shape,) if isinstance(shape, int) else shape):
        if extent <= 0 or nbytes > PY_SSIZE_T_MAX // extent:
            return _np_empty(shape, dtype)    # empty, or NumPy's error for a bad shape
        nbytes *= extent
    if nbytes < MIN_BYTES:
        return _np_empty(shape, dtype)
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
