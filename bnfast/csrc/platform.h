/* OpenMP where the build has it, the build's flags, the restrict
 * qualifier of the kernels' accumulators (bnfast/_loops.pyx), and the
 * always-inline qualifier of the C loops that take their kind as an
 * argument.
 */
#ifndef BNFAST_PLATFORM_H
#define BNFAST_PLATFORM_H

#include <Python.h>

#ifdef _OPENMP
#include <omp.h>
#define BNFAST_OPENMP 1
#else
#define BNFAST_OPENMP 0
static int omp_get_max_threads(void) { return 1; }
#endif
/* A barrier for the threads of the enclosing team.  Cython emits a prange
   inside a parallel block as "omp for nowait": whether a barrier separates
   two such loops is the compiler's choice (GCC adds one because the loop
   variable is both firstprivate and lastprivate), so the driver asks for
   one between phases itself. */
static inline void bnfast_barrier(void) {
#ifdef _OPENMP
#pragma omp barrier
#endif
}
#ifndef BNFAST_BUILD_FLAGS
#define BNFAST_BUILD_FLAGS ""
#endif
/* Accumulators never alias the data they sum, nor outputs the inputs and
   coefficients of a row loop (no kernel runs in place: the planner
   refuses an out= that overlaps an input):
   saying so lets compilers vectorize those loops without one run-time
   overlap check per pair of pointers. */
#if defined(_MSC_VER)
#define BNF_RESTRICT __restrict
#else
#define BNF_RESTRICT __restrict__
#endif
typedef double* BNF_RESTRICT bnfast_acc_t;
/* Inlined at every call: the loops that take their kind as a constant
   argument (bnfast_row_sums_f and bnfast_lane_sums_*: which sums; the
   element-pass row loops of rows.h: per feature or per plane) are then
   compiled once per kind, with no test inside them. */
#if defined(__GNUC__) || defined(__clang__)
#define BNF_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BNF_INLINE static __forceinline
#else
#define BNF_INLINE static inline
#endif

#endif /* BNFAST_PLATFORM_H */
