/* OpenMP where the build has it, the build's flags, and the restrict
 * qualifier of the kernels' accumulators (bnfast/_kernels.pyx).
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

#endif /* BNFAST_PLATFORM_H */
