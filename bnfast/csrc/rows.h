/* Vector loops over rows of float32 and float64 (arithmetic in float64),
 * written once over the vector operations of simd.h
 * (AVX-512, AVX2, NEON), with portable C tails and fallbacks;
 * bnfast/_loops.pyx.
 */
#ifndef BNFAST_ROWS_H
#define BNFAST_ROWS_H

#include <Python.h>
#include "platform.h"
#include "stream.h"
#include "stats.h"
#include "simd.h"

/* Loops over float32 rows, arithmetic in float64: the affine and dx
   passes and the row sums.  Compilers vectorize them by loading 16
   floats and splitting them with cross-lane extract/insert
   instructions, the bottleneck of these loops once the data is cached
   (Zen 4: a plane's y = (x - c) * k + b 25 % slower than here); these
   convert BNF_VL floats (8 AVX-512, 4 AVX2, 2 NEON) straight from and to
   memory.
   The vector part and the scalar tail do the same operations in the
   same order, fused multiply-adds included (GCC and Clang contract the
   tail's expressions to the same ones; the variants that have these
   paths are built by them), so a value's rounding does not depend on
   where a loop splits (tests/test_kernels.py checks it). */
/* The row loops below are written once for float32 (T float, loads and
   stores converting) and float64 (T double): BNF_ROW_VECTORS(...) expands to
   its arguments only where the hand-written vector body exists. */
#ifdef BNF_OPS
#define BNF_ROW_VECTORS(...) __VA_ARGS__
#else
#define BNF_ROW_VECTORS(...)
#endif
/* The element passes' coefficients at feature j, as a vector (BNF_KV) and
   a value (BNF_K): one per feature, or, where the argument `one` is set,
   one value c[0] for every value of the run (a per-channel plane).  `one`
   is a constant at every call (BNF_INLINE), so each form is compiled
   without a test inside its loop. */
#define BNF_KV(c, j) (one ? bnf_set1((c)[0]) : bnf_ldd((c) + (j)))
#define BNF_K(c, j) ((c)[one ? 0 : (j)])
/* o = (x - c) * k + b over `rows` rows (row stride d) of w features.  The
   float64 one is for the vector sets (BNF_VECTOR_LOOPS): elsewhere the
   kernels' Cython loop, which compilers vectorize better than this tail,
   does the work. */
#define BNF_AFFINE_ROWS(NAME, T, LOAD, STORE)                                      \
    BNF_INLINE void NAME(int one, const T* x, T* BNF_RESTRICT o, ptrdiff_t d,       \
                         int rows, ptrdiff_t w, const double* c, const double* k,   \
                         const double* b) {                                         \
        ptrdiff_t j = 0;                                                            \
        int r;                                                                      \
        BNF_ROW_VECTORS(for (; j + BNF_VL <= w; j += BNF_VL) {                      \
            bnf_vd vc = BNF_KV(c, j), vk = BNF_KV(k, j), vb = BNF_KV(b, j);         \
            for (r = 0; r < rows; r++)                                              \
                STORE(o + r * d + j, bnf_fmadd(bnf_sub(LOAD(x + r * d + j), vc), vk, vb)); \
        })                                                                          \
        for (; j < w; j++)                                                          \
            for (r = 0; r < rows; r++)                                              \
                o[r * d + j] = (T)(((double)x[r * d + j] - BNF_K(c, j)) * BNF_K(k, j) \
                                   + BNF_K(b, j));                                  \
    }
BNF_AFFINE_ROWS(bnfast_affine_ff, float, bnf_ld, bnf_st)
BNF_AFFINE_ROWS(bnfast_affine_dd, double, bnf_ldd, bnf_std)
/* bnfast_affine_ff and its float64 twin written with streaming stores
   straight from the registers, for rows whose destination starts on a
   64-byte line, with line-sized row strides and w a whole number of
   lines (bnfast_lines_fit): outputs too large to stay cached otherwise
   went through a staging row, one more store and load per value. */
static inline int bnfast_lines_fit(const void* o, ptrdiff_t stride_bytes,
                                   ptrdiff_t w_bytes) {
#ifdef BNF_OPS
    return ((uintptr_t)o & 63) == 0 && (stride_bytes & 63) == 0 && (w_bytes & 63) == 0;
#else
    return 0;   /* no vector path: the staging row (bnfast_stream) instead */
#endif
}
/* Row by row, one whole line per streaming store: rows interleaved, or
   half lines, leave partial lines in the write-combining buffers
   (measured: 0.70-0.85x on 16 x 262144 and 32 x 131072). */
static inline void bnfast_affine_stream_ff(const float* x, float* o, ptrdiff_t d,
                                           ptrdiff_t rows, ptrdiff_t w, const double* c,
                                           const double* k, const double* b) {
#ifdef BNF_OPS
    ptrdiff_t j, r;
    for (r = 0; r < rows; r++, x += d, o += d)
        for (j = 0; j + 2 * BNF_VL <= w; j += 2 * BNF_VL) {
            bnf_vd lo = bnf_fmadd(bnf_sub(bnf_ld(x + j), bnf_ldd(c + j)), bnf_ldd(k + j),
                                  bnf_ldd(b + j));
            ptrdiff_t h = j + BNF_VL;
            bnf_vd hi = bnf_fmadd(bnf_sub(bnf_ld(x + h), bnf_ldd(c + h)), bnf_ldd(k + h),
                                  bnf_ldd(b + h));
            bnf_stf_nt2(o + j, lo, hi);
        }
#endif
}
static inline void bnfast_affine_stream_dd(const double* x, double* o, ptrdiff_t d,
                                           ptrdiff_t rows, ptrdiff_t w, const double* c,
                                           const double* k, const double* b) {
#ifdef BNF_OPS
    ptrdiff_t j, r;
    for (r = 0; r < rows; r++, x += d, o += d)
        for (j = 0; j + BNF_VL <= w; j += BNF_VL)
            bnf_std_nt(o + j, bnf_fmadd(bnf_sub(bnf_ldd(x + j), bnf_ldd(c + j)),
                                        bnf_ldd(k + j), bnf_ldd(b + j)));
#endif
}
/* dx = k * ((dy - m) - q * (x - c)) over `rows` rows of w features (the
   float64 one as bnfast_affine_dd). */
#define BNF_GRAD_INPUT_ROWS(NAME, T, LOAD, STORE)                                  \
    BNF_INLINE void NAME(int one, const T* x, const T* dy, T* BNF_RESTRICT o,       \
                         ptrdiff_t d, int rows, ptrdiff_t w, const double* c,       \
                         const double* m, const double* q, const double* k) {       \
        ptrdiff_t j = 0;                                                            \
        int r;                                                                      \
        BNF_ROW_VECTORS(for (; j + BNF_VL <= w; j += BNF_VL) {                      \
            bnf_vd vc = BNF_KV(c, j), vm = BNF_KV(m, j), vq = BNF_KV(q, j);         \
            bnf_vd vk = BNF_KV(k, j);                                               \
            for (r = 0; r < rows; r++)                                              \
                STORE(o + r * d + j,                                                \
                      bnf_mul(vk, bnf_fnmadd(vq, bnf_sub(LOAD(x + r * d + j), vc), \
                                             bnf_sub(LOAD(dy + r * d + j), vm)))); \
        })                                                                          \
        for (; j < w; j++)                                                          \
            for (r = 0; r < rows; r++)                                              \
                o[r * d + j] = (T)(BNF_K(k, j) * (((double)dy[r * d + j] - BNF_K(m, j)) \
                                   - BNF_K(q, j) * ((double)x[r * d + j] - BNF_K(c, j)))); \
    }
BNF_GRAD_INPUT_ROWS(bnfast_grad_input_ff, float, bnf_ld, bnf_st)
BNF_GRAD_INPUT_ROWS(bnfast_grad_input_dd, double, bnf_ldd, bnf_std)
/* The two sums of the reductions over float32 rows, for `rows` rows (1 or
   4) of w features: with b = x - k, s1 += the sum of a and s2 += that of
   a * b, where a = b (grad 0: the statistics' shifted sums) or a = dy
   (grad 1: the backward's sums), paired as the Cython loops of float64
   rows: (a0 + a1) + (a2 + a3) and (a0 b0 + a1 b1) + (a2 b2 + a3 b3).
   grad is a constant at every call (BNF_INLINE). */
BNF_INLINE void bnfast_row_sums_f(int grad, const float* x, const float* dy, ptrdiff_t d,
                                  int rows, ptrdiff_t w, const double* k, double* s1,
                                  double* s2) {
    ptrdiff_t j = 0;
#ifdef BNF_OPS
    for (; j + BNF_VL <= w; j += BNF_VL) {
        bnf_vd vk = bnf_ldd(k + j), t1 = bnf_ldd(s1 + j), t2 = bnf_ldd(s2 + j);
        bnf_vd b0 = bnf_sub(bnf_ld(x + j), vk);
        bnf_vd a0 = grad ? bnf_ld(dy + j) : b0;
        if (rows == 4) {
            bnf_vd b1 = bnf_sub(bnf_ld(x + d + j), vk);
            bnf_vd b2 = bnf_sub(bnf_ld(x + 2 * d + j), vk);
            bnf_vd b3 = bnf_sub(bnf_ld(x + 3 * d + j), vk);
            bnf_vd a1 = grad ? bnf_ld(dy + d + j) : b1;
            bnf_vd a2 = grad ? bnf_ld(dy + 2 * d + j) : b2;
            bnf_vd a3 = grad ? bnf_ld(dy + 3 * d + j) : b3;
            t1 = bnf_add(t1, bnf_add(bnf_add(a0, a1), bnf_add(a2, a3)));
            t2 = bnf_add(t2, bnf_add(bnf_fmadd(a0, b0, bnf_mul(a1, b1)),
                                     bnf_fmadd(a2, b2, bnf_mul(a3, b3))));
        } else {
            t1 = bnf_add(t1, a0);
            t2 = bnf_fmadd(a0, b0, t2);
        }
        bnf_std(s1 + j, t1);
        bnf_std(s2 + j, t2);
    }
#endif
    for (; j < w; j++) {
        double b0 = (double)x[j] - k[j], a0 = grad ? (double)dy[j] : b0;
        if (rows == 4) {
            double b1 = (double)x[d + j] - k[j], b2 = (double)x[2 * d + j] - k[j];
            double b3 = (double)x[3 * d + j] - k[j];
            double a1 = grad ? (double)dy[d + j] : b1, a2 = grad ? (double)dy[2 * d + j] : b2;
            double a3 = grad ? (double)dy[3 * d + j] : b3;
            s1[j] += (a0 + a1) + (a2 + a3);
            s2[j] += (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3);
        } else {
            s1[j] += a0;
            s2[j] += a0 * b0;
        }
    }
}
#endif /* BNFAST_ROWS_H */
