/* CPU detection: the widest kernel variant this CPU (and OS) runs.
 *
 * The levels match the flags setup.py gives each variant (ISA_VARIANTS):
 *   BNFAST_ISA_AVX512  AVX-512 F, BW, CD, DQ, VL (and everything below)
 *   BNFAST_ISA_AVX2    AVX2, FMA, BMI1, BMI2
 *   BNFAST_ISA_BASE    the x86-64 baseline, or another architecture
 * GCC's and Clang's __builtin_cpu_supports also check that the OS saves the
 * wide registers (XCR0), so a level is only reported where it can run.
 *
 * This header is compiled into the baseline module and into the baseline
 * entry point of every variant (isa_entry.c); it must never be compiled with
 * a variant's flags where its answer decides whether that variant loads.
 */
#ifndef BNFAST_CPU_H
#define BNFAST_CPU_H

enum { BNFAST_ISA_BASE = 0, BNFAST_ISA_AVX2 = 1, BNFAST_ISA_AVX512 = 2 };

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
static inline int bnfast_cpu_level(void) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
               && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f")
                 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd")
                 && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return avx512 ? BNFAST_ISA_AVX512 : (avx2 ? BNFAST_ISA_AVX2 : BNFAST_ISA_BASE);
}
#else
static inline int bnfast_cpu_level(void) { return BNFAST_ISA_BASE; }
#endif

/* The features a level needs, in words, for error messages. */
static inline const char* bnfast_isa_features(int level) {
    switch (level) {
    case BNFAST_ISA_AVX512: return "AVX-512 (F, BW, CD, DQ, VL), AVX2, FMA, BMI1 and BMI2";
    case BNFAST_ISA_AVX2: return "AVX2, FMA, BMI1 and BMI2";
    default: return "the x86-64 baseline";
    }
}

#endif /* BNFAST_CPU_H */
