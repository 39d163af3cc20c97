/* The output cache's NumPy memory handler: freed blocks of large outputs
 * kept for the next output of the same size (bnfast/_outputs.pyx).
 */
#ifndef BNFAST_OUTPUTS_H
#define BNFAST_OUTPUTS_H

#include <Python.h>
#include <numpy/arrayobject.h>

#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include "pythread.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Every block: malloc(capacity + BNF_HEAD), its data at a chosen offset
   into a 4 KiB page (bnf_set_offset), the raw pointer and capacity stored
   just below the data. */
#define BNF_PAGE 4096
#define BNF_HEAD (2 * BNF_PAGE + 2 * sizeof(size_t))
#define BNF_SLOTS 32
#define BNF_HUGE_BYTES (4u << 20)

static PyThread_type_lock bnf_lock = NULL;
static void* bnf_held[BNF_SLOTS];      /* oldest first */
static size_t bnf_n_held = 0;
static size_t bnf_held_bytes = 0;
static size_t bnf_limit = 0;
static size_t bnf_min_bytes = 1;
static uint64_t bnf_hits = 0, bnf_misses = 0;
/* The page offset of the next block: a placement hint, set under the GIL
   just before an allocation (see _outputs.empty), 0 otherwise. */
static size_t bnf_offset = 0;
static void bnf_set_offset(size_t offset) { bnf_offset = offset & (BNF_PAGE - 1); }

static size_t bnf_capacity(const void* data) { return ((const size_t*)data)[-1]; }
static void* bnf_raw(const void* data) { return ((void* const*)data)[-2]; }

static void* bnf_new_block(size_t capacity, size_t offset) {
    if (capacity > SIZE_MAX - BNF_HEAD) return NULL;
    char* raw = (char*)malloc(capacity + BNF_HEAD);
    if (raw == NULL) return NULL;
    uintptr_t at = (((uintptr_t)raw + 2 * sizeof(size_t) + BNF_PAGE - 1)
                    & ~(uintptr_t)(BNF_PAGE - 1)) + offset;
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

static void* bnf_take(size_t capacity, size_t offset) {
    void* found = NULL;
    PyThread_acquire_lock(bnf_lock, WAIT_LOCK);
    for (size_t i = bnf_n_held; i-- > 0;) {      /* newest first */
        if (bnf_capacity(bnf_held[i]) == capacity
                && ((uintptr_t)bnf_held[i] & (BNF_PAGE - 1)) == offset) {
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
    size_t capacity = bnf_round(size), offset = bnf_offset;
    void* data = capacity >= bnf_min_bytes ? bnf_take(capacity, offset) : NULL;
    return data ? data : bnf_new_block(capacity, offset);
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

#endif /* BNFAST_OUTPUTS_H */
