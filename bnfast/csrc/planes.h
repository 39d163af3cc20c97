/* Sums over per-channel planes into 16 lane partials, for the ISA the
 * file is compiled for (bnfast/_planes.pxi).
 */
#ifndef BNFAST_PLANES_H
#define BNFAST_PLANES_H

#include <Python.h>

/* Sums over a plane into 16 lane partials (lane = index mod 16), the
   hot loops of the per-channel reductions.  Written with GCC/Clang
   vector types: left to itself GCC vectorized the lane loop's *outer*
   loop and reduced each lane with scalar adds.  The vectors are as wide
   as the instruction set's (8 doubles with AVX-512, else 4: GCC spills
   wider ones to the stack, making AVX2 code 3x slower than it should
   be); the 16 lanes and their arithmetic are the same at every width.
   Other compilers get the same per-lane arithmetic as plain loops.
   Each processes the first n - n % 16 values and returns how many. */
#include <stddef.h>
#include <string.h>
#if defined(__GNUC__) || defined(__clang__)
#if defined(__AVX512F__)
#include <immintrin.h>
#define BNFAST_VL 8
typedef double bnfast_vd __attribute__((vector_size(64)));
/* one conversion from memory (GCC's own for __builtin_convertvector
   takes five instructions: halves converted, then re-joined) */
static inline bnfast_vd bnfast_ld_f(const float* p) {
    return (bnfast_vd)_mm512_cvtps_pd(_mm256_loadu_ps(p)); }
#elif defined(__AVX__)
#include <immintrin.h>
#define BNFAST_VL 4
typedef double bnfast_vd __attribute__((vector_size(32)));
static inline bnfast_vd bnfast_ld_f(const float* p) {
    return (bnfast_vd)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
#else
#define BNFAST_VL 4
typedef double bnfast_vd __attribute__((vector_size(32)));
typedef float bnfast_vf __attribute__((vector_size(16)));
static inline bnfast_vd bnfast_ld_f(const float* p) {
    bnfast_vf v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, bnfast_vd); }
#endif
#define BNFAST_NV (16 / BNFAST_VL)
/* inlined at every call (GCC stops inlining them at two call sites),
   so that a task's lane sums stay in registers from plane to plane:
   a call per plane made 256 x 16 x 4 x 4 training 20-30 % slower */
#define BNFAST_INLINE static inline __attribute__((always_inline))
static inline bnfast_vd bnfast_ld_d(const double* p) {
    bnfast_vd v; memcpy(&v, p, sizeof v); return v; }
#define BNFAST_LANE_SUMS(SUFFIX, T)                                                   \
BNFAST_INLINE ptrdiff_t bnfast_sq_sums_##SUFFIX(const T* x, ptrdiff_t n, double k,    \
                                                double* a1, double* a2) {             \
    bnfast_vd s1[BNFAST_NV], s2[BNFAST_NV], kk = (bnfast_vd){0} + k;                  \
    ptrdiff_t i = 0;                                                                  \
    int v;                                                                            \
    for (v = 0; v < BNFAST_NV; v++) {                                                 \
        s1[v] = bnfast_ld_d(a1 + v * BNFAST_VL);                                      \
        s2[v] = bnfast_ld_d(a2 + v * BNFAST_VL);                                      \
    }                                                                                 \
    for (; i + 16 <= n; i += 16)                                                      \
        for (v = 0; v < BNFAST_NV; v++) {                                             \
            bnfast_vd e = bnfast_ld_##SUFFIX(x + i + v * BNFAST_VL) - kk;             \
            s1[v] += e;                                                               \
            s2[v] += e * e;                                                           \
        }                                                                             \
    for (v = 0; v < BNFAST_NV; v++) {                                                 \
        memcpy(a1 + v * BNFAST_VL, &s1[v], sizeof s1[v]);                             \
        memcpy(a2 + v * BNFAST_VL, &s2[v], sizeof s2[v]);                             \
    }                                                                                 \
    return i;                                                                         \
}                                                                                     \
BNFAST_INLINE ptrdiff_t bnfast_dot_sums_##SUFFIX(const T* x, const T* g, ptrdiff_t n, \
                                                 double m, double* a1, double* a2) {  \
    bnfast_vd s1[BNFAST_NV], s2[BNFAST_NV], mm = (bnfast_vd){0} + m;                  \
    ptrdiff_t i = 0;                                                                  \
    int v;                                                                            \
    for (v = 0; v < BNFAST_NV; v++) {                                                 \
        s1[v] = bnfast_ld_d(a1 + v * BNFAST_VL);                                      \
        s2[v] = bnfast_ld_d(a2 + v * BNFAST_VL);                                      \
    }                                                                                 \
    for (; i + 16 <= n; i += 16)                                                      \
        for (v = 0; v < BNFAST_NV; v++) {                                             \
            bnfast_vd gv = bnfast_ld_##SUFFIX(g + i + v * BNFAST_VL);                 \
            s1[v] += gv;                                                              \
            s2[v] += gv * (bnfast_ld_##SUFFIX(x + i + v * BNFAST_VL) - mm);           \
        }                                                                             \
    for (v = 0; v < BNFAST_NV; v++) {                                                 \
        memcpy(a1 + v * BNFAST_VL, &s1[v], sizeof s1[v]);                             \
        memcpy(a2 + v * BNFAST_VL, &s2[v], sizeof s2[v]);                             \
    }                                                                                 \
    return i;                                                                         \
}
#else
#define BNFAST_LANE_SUMS(SUFFIX, T)                                                   \
static ptrdiff_t bnfast_sq_sums_##SUFFIX(const T* x, ptrdiff_t n, double k,           \
                                         double* a1, double* a2) {                    \
    ptrdiff_t i = 0; int l;                                                           \
    for (; i + 16 <= n; i += 16)                                                      \
        for (l = 0; l < 16; l++) {                                                    \
            double e = (double)x[i + l] - k; a1[l] += e; a2[l] += e * e; }            \
    return i;                                                                         \
}                                                                                     \
static ptrdiff_t bnfast_dot_sums_##SUFFIX(const T* x, const T* g, ptrdiff_t n,        \
                                          double m, double* a1, double* a2) {         \
    ptrdiff_t i = 0; int l;                                                           \
    for (; i + 16 <= n; i += 16)                                                      \
        for (l = 0; l < 16; l++) {                                                    \
            double gv = (double)g[i + l];                                             \
            a1[l] += gv; a2[l] += gv * ((double)x[i + l] - m); }                      \
    return i;                                                                         \
}
#endif
BNFAST_LANE_SUMS(d, double)
BNFAST_LANE_SUMS(f, float)

#endif /* BNFAST_PLANES_H */
