/* OpenMP where the build has it, the build's flags, and the restrict
 * qualifier of the kernels' accumulators (bnfast/_kernels.pyx).
 */
#ifndef BNFAST_PLATFORM_H
#define BNFAST_PLATFORM_H

#include <Python.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#define BNFAST_OPENMP 1
#else
#define BNFAST_OPENMP 0
static int omp_get_max_threads(void) { return 1; }
#endif
#ifndef BNFAST_BUILD_FLAGS
#define BNFAST_BUILD_FLAGS ""
#endif
/* Accumulators never alias the data they sum: saying so lets compilers
   vectorize loops that read four rows and update two accumulators
   without one run-time overlap check per pair of pointers. */
#if defined(_MSC_VER)
typedef double* __restrict bnfast_acc_t;
#else
typedef double* __restrict__ bnfast_acc_t;
#endif

/* The kernels' scratch (per-feature coefficients, partial sums) starts on
   a 64-byte line, so that the vector loads of a row of coefficients never
   straddle two lines: where malloc's 16-byte alignment put it mid-line,
   element passes over 256 x 1024 batches ran 5-15 % slower. */
static inline double* bnfast_scratch_alloc(size_t n_doubles) {
#if defined(_MSC_VER)
    return (double*)_aligned_malloc(n_doubles * sizeof(double), 64);
#else
    void* p = NULL;
    return posix_memalign(&p, 64, n_doubles * sizeof(double)) == 0 ? (double*)p : NULL;
#endif
}
static inline void bnfast_scratch_free(void* p) {
#if defined(_MSC_VER)
    _aligned_free(p);
#else
    free(p);
#endif
}

#endif /* BNFAST_PLATFORM_H */
