/* Sums over per-channel planes into 16 lane partials, over the vectors
 * of simd.h for the ISA the file is compiled for (bnfast/_planes.pxi).
 */
#ifndef BNFAST_PLANES_H
#define BNFAST_PLANES_H

#include <Python.h>

/* The two sums of the per-channel reductions over `planes` planes of n
   values, `stride` values apart (one channel's planes of several samples,
   or one plane): with b = x - k, a1 += a and a2 += a * b into 16 lane
   partials (lane = index mod 16) for each plane's first n - n % 16 values,
   and t1, t2 += the same for the rest, value by value, plane by plane,
   where a = b (grad 0: the statistics' shifted sums) or a = g, dy (grad 1:
   the backward's sums).  The partials stay in registers from plane to
   plane: loaded and stored once per call, not once per plane (256 x 16 x 4
   x 4 NCHW, planes of 16 values, spent more on those loads and stores than
   on the sums).  Inlined at every call (BNF_INLINE), with grad a constant.
   Written with GCC/Clang vector types: left to itself GCC vectorized the
   lane loop's *outer* loop and reduced each lane with scalar adds.  The
   vectors are as wide as the instruction set's (8 doubles with AVX-512,
   else 4: GCC spills wider ones to the stack, making AVX2 code 3x slower
   than it should be); the 16 lanes and their arithmetic are the same at
   every width.  Other compilers get the same per-lane arithmetic as plain
   loops. */
#include <stddef.h>
#include <string.h>
#include "platform.h"
#include "simd.h"
/* The tail of a plane, value by value (as the lanes: b = x - k, a). */
#define BNFAST_TAIL(T)                                                                \
    for (; i < n; i++) {                                                              \
        double b = (double)xp[i] - k, a = grad ? (double)gp[i] : b;                  \
        u1 += a;                                                                      \
        u2 += a * b;                                                                  \
    }
#if defined(__GNUC__) || defined(__clang__)
/* loads by the suffix of the data's type; a vector of k in every lane */
#define bnfast_load_d bnf_ldd
#define bnfast_load_f bnf_ld
#ifdef BNF_OPS
#define bnfast_splat bnf_set1
#else
#define bnfast_splat(k) ((bnf_vd){0} + (k))
#endif
#define BNFAST_NV (16 / BNF_VL)
#define BNFAST_LANE_SUMS(SUFFIX, T)                                                   \
BNF_INLINE void bnfast_lane_sums_##SUFFIX(int grad, const T* x, const T* g, ptrdiff_t n,  \
                                          ptrdiff_t planes, ptrdiff_t stride, double k,   \
                                          double* a1, double* a2, double* t1,           \
                                          double* t2) {                                 \
    bnf_vd s1[BNFAST_NV], s2[BNFAST_NV], kk = bnfast_splat(k);                        \
    double u1 = *t1, u2 = *t2;                                                        \
    ptrdiff_t q, i;                                                                   \
    int v;                                                                            \
    for (v = 0; v < BNFAST_NV; v++) {                                                 \
        s1[v] = bnfast_load_d(a1 + v * BNF_VL);                                       \
        s2[v] = bnfast_load_d(a2 + v * BNF_VL);                                       \
    }                                                                                 \
    for (q = 0; q < planes; q++) {                                                    \
        const T* xp = x + q * stride;                                                 \
        const T* gp = grad ? g + q * stride : xp;                                     \
        for (i = 0; i + 16 <= n; i += 16)                                             \
            for (v = 0; v < BNFAST_NV; v++) {                                         \
                bnf_vd b = bnfast_load_##SUFFIX(xp + i + v * BNF_VL) - kk;            \
                bnf_vd a = grad ? bnfast_load_##SUFFIX(gp + i + v * BNF_VL) : b;      \
                s1[v] += a;                                                           \
                s2[v] += a * b;                                                       \
            }                                                                         \
        BNFAST_TAIL(T)                                                                \
    }                                                                                 \
    for (v = 0; v < BNFAST_NV; v++) {                                                 \
        memcpy(a1 + v * BNF_VL, &s1[v], sizeof s1[v]);                                \
        memcpy(a2 + v * BNF_VL, &s2[v], sizeof s2[v]);                                \
    }                                                                                 \
    *t1 = u1;                                                                         \
    *t2 = u2;                                                                         \
}
#else
#define BNFAST_LANE_SUMS(SUFFIX, T)                                                   \
BNF_INLINE void bnfast_lane_sums_##SUFFIX(int grad, const T* x, const T* g, ptrdiff_t n,  \
                                          ptrdiff_t planes, ptrdiff_t stride, double k,   \
                                          double* a1, double* a2, double* t1,           \
                                          double* t2) {                                 \
    double u1 = *t1, u2 = *t2;                                                        \
    ptrdiff_t q, i; int l;                                                            \
    for (q = 0; q < planes; q++) {                                                    \
        const T* xp = x + q * stride;                                                 \
        const T* gp = grad ? g + q * stride : xp;                                     \
        for (i = 0; i + 16 <= n; i += 16)                                             \
            for (l = 0; l < 16; l++) {                                                \
                double b = (double)xp[i + l] - k, a = grad ? (double)gp[i + l] : b;   \
                a1[l] += a; a2[l] += a * b; }                                         \
        BNFAST_TAIL(T)                                                                \
    }                                                                                 \
    *t1 = u1;                                                                         \
    *t2 = u2;                                                                         \
}
#endif
BNFAST_LANE_SUMS(d, double)
BNFAST_LANE_SUMS(f, float)

#endif /* BNFAST_PLANES_H */
