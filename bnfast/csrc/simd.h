/* The kernels' one vector abstraction: float64 vectors (bnf_vd) of BNF_VL
 * lanes, and the operations the hot loops use, for the instruction set
 * the including file is compiled for.  rows.h and planes.h are written
 * once over these names and name no intrinsic themselves (stream.h's
 * streaming byte copies are the one other user of intrinsics).
 *
 *   BNF_OPS   defined where the whole set below exists: AVX-512, AVX2 with
 *             FMA, and NEON (aarch64).  Loops that need it have a portable
 *             C body besides (the baseline x86-64 build, other CPUs).
 *   BNF_VL    lanes per vector: 8, 4, 2; 4 for GCC/Clang's generic vectors
 *             (no BNF_OPS: only loads and C operators, for the plane sums).
 *
 * Operations (as the x86 intrinsics of the same names):
 *   bnf_ld(p)        BNF_VL floats at p, converted to float64
 *   bnf_st(p, v)     v converted to float32, stored at p
 *   bnf_ldd, bnf_std BNF_VL doubles, unaligned
 *   bnf_set1(s)      every lane s
 *   bnf_add, bnf_sub, bnf_mul, bnf_div, bnf_sqrt
 *   bnf_fmadd(a, b, c)   a * b + c, fused (one rounding)
 *   bnf_fnmadd(a, b, c)  c - a * b, fused
 *   bnf_stf_nt2(p, lo, hi)  2 * BNF_VL floats at p from two vectors, with a
 *                    streaming store where the CPU has one (p on a 64-byte
 *                    line; NEON: a plain store)
 *   bnf_std_nt(p, v) the same for doubles
 *   bnf_all_ge(a, b) every lane a >= b (ordered: false for NaN)
 *   bnf_finite_or_zero(v)  v where v is finite, else +0
 *
 * The fused forms matter for exactness: the loops' scalar tails compute
 * the same expressions in C, which GCC and Clang contract to the same
 * fused operations where the ISA has them, so a value's rounding does not
 * depend on whether a vector or the tail computed it.
 */
#ifndef BNFAST_SIMD_H
#define BNFAST_SIMD_H

#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define BNF_OPS 1
#define BNF_VL 8
typedef __m512d bnf_vd;
#define bnf_ld(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define bnf_st(p, v) _mm256_storeu_ps((p), _mm512_cvtpd_ps(v))
#define bnf_ldd _mm512_loadu_pd
#define bnf_std _mm512_storeu_pd
#define bnf_set1 _mm512_set1_pd
#define bnf_add _mm512_add_pd
#define bnf_sub _mm512_sub_pd
#define bnf_mul _mm512_mul_pd
#define bnf_div _mm512_div_pd
#define bnf_sqrt _mm512_sqrt_pd
#define bnf_fmadd _mm512_fmadd_pd
#define bnf_fnmadd _mm512_fnmadd_pd
#define bnf_stf_nt2(p, lo, hi) _mm512_stream_ps((p), _mm512_insertf32x8(              \
    _mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1))
#define bnf_std_nt _mm512_stream_pd
#define bnf_all_ge(a, b) (_mm512_cmp_pd_mask((a), (b), _CMP_GE_OQ) == 0xFF)
#define bnf_finite_or_zero(v) \
    _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(_mm512_sub_pd(v, v), _mm512_setzero_pd(), \
                                           _CMP_EQ_OQ), v)

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BNF_OPS 1
#define BNF_VL 4
typedef __m256d bnf_vd;
#define bnf_ld(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define bnf_st(p, v) _mm_storeu_ps((p), _mm256_cvtpd_ps(v))
#define bnf_ldd _mm256_loadu_pd
#define bnf_std _mm256_storeu_pd
#define bnf_set1 _mm256_set1_pd
#define bnf_add _mm256_add_pd
#define bnf_sub _mm256_sub_pd
#define bnf_mul _mm256_mul_pd
#define bnf_div _mm256_div_pd
#define bnf_sqrt _mm256_sqrt_pd
#define bnf_fmadd _mm256_fmadd_pd
#define bnf_fnmadd _mm256_fnmadd_pd
#define bnf_stf_nt2(p, lo, hi) _mm256_stream_ps((p), _mm256_insertf128_ps(            \
    _mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1))
#define bnf_std_nt _mm256_stream_pd
#define bnf_all_ge(a, b) (_mm256_movemask_pd(_mm256_cmp_pd((a), (b), _CMP_GE_OQ)) == 0xF)
#define bnf_finite_or_zero(v) \
    _mm256_and_pd(_mm256_cmp_pd(_mm256_sub_pd(v, v), _mm256_setzero_pd(), _CMP_EQ_OQ), v)

#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define BNF_OPS 1
#define BNF_VL 2
typedef float64x2_t bnf_vd;
#define bnf_ld(p) vcvt_f64_f32(vld1_f32(p))
#define bnf_st(p, v) vst1_f32((p), vcvt_f32_f64(v))
#define bnf_ldd vld1q_f64
#define bnf_std vst1q_f64
#define bnf_set1 vdupq_n_f64
#define bnf_add vaddq_f64
#define bnf_sub vsubq_f64
#define bnf_mul vmulq_f64
#define bnf_div vdivq_f64
#define bnf_sqrt vsqrtq_f64
#define bnf_fmadd(a, b, c) vfmaq_f64((c), (a), (b))
#define bnf_fnmadd(a, b, c) vfmsq_f64((c), (a), (b))
/* (AArch64's non-temporal stores, STNP, have no intrinsic: plain stores) */
#define bnf_stf_nt2(p, lo, hi) vst1q_f32((p), vcombine_f32(vcvt_f32_f64(lo), vcvt_f32_f64(hi)))
#define bnf_std_nt vst1q_f64
#define bnf_all_ge(a, b) \
    (vminvq_u32(vreinterpretq_u32_u64(vcgeq_f64((a), (b)))) == 0xFFFFFFFFu)
#define bnf_finite_or_zero(v) \
    vreinterpretq_f64_u64(vandq_u64(vceqq_f64(vsubq_f64((v), (v)), vdupq_n_f64(0.0)), \
                                    vreinterpretq_u64_f64(v)))

#elif defined(__GNUC__) || defined(__clang__)
/* No vector set the loops are written for: GCC/Clang's generic vectors,
   which they lower to what the target has (SSE2 on baseline x86-64). */
#define BNF_VL 4
typedef double bnf_vd __attribute__((vector_size(32)));
typedef float bnf_vf __attribute__((vector_size(16)));
static inline bnf_vd bnf_ld(const float* p) {
    bnf_vf v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, bnf_vd); }
static inline bnf_vd bnf_ldd(const double* p) {
    bnf_vd v; memcpy(&v, p, sizeof v); return v; }
#endif

/* 1 where the loops' hand-written vector bodies exist (BNF_OPS): the
   Cython kernels test it to choose them (a constant the compiler folds). */
#ifdef BNF_OPS
#define BNF_VECTOR_LOOPS 1
#else
#define BNF_VECTOR_LOOPS 0
#endif

#endif /* BNFAST_SIMD_H */
