/* The parts of the statistics algorithm that every route shares.
 *
 * Each route (row blocks, strips, per-channel planes)
 * computes a feature's or channel's mean and M2 (sum of squared deviations)
 * the same way:
 *   1. shift: k = the mean of its first (up to 8) values, 0 where not finite;
 *   2. shifted sums over a block of values: s1 = sum(x - k), s2 = sum((x - k)^2),
 *      and the block's mean mb = s1 / n and M2 = s2 - s1 * mb;
 *   3. the conditioning test below: where M2 lost too many digits to
 *      cancellation (or a sum is not finite), the block is redone by
 *   4. the exact corrected two-pass below;
 *   5. blocks, then chunks, are merged in a fixed order by Chan's formula.
 * Steps 1, 2 and 5 are loops over each route's memory layout, in
 * bnfast/_loops.pyx, _planes.pxi and rows.h; steps 3 and 4 are here.
 */
#ifndef BNFAST_STATS_H
#define BNFAST_STATS_H

#include <stddef.h>

/* A block's shifted sums are trusted where M2 >= s2 / BNFAST_COND_RATIO:
 * M2 = s2 - s1 * mb then lost at most log2(8) = 3 bits to cancellation.
 * A trusted M2 is never negative.  Written so that NaN fails the test. */
#define BNFAST_COND_RATIO 8.0

static inline int bnfast_well_conditioned(double m2, double s2) {
    return m2 * BNFAST_COND_RATIO >= s2;
}

/* The corrected two-pass over one feature's or channel's values: `runs`
 * runs of `len` contiguous values, `stride` values apart (a column of a
 * row-major batch: len 1, stride = the row length; a channel of an NCHW
 * batch: len = the plane size, stride = channels * plane size).  The mean is
 * relative to the shift k.  Exact up to rounding for any offset; where the
 * first pass's mean is not finite, mean and M2 are the sums as they are. */
#define BNFAST_TWO_PASS(NAME, T)                                                   \
    static void NAME(const T* x, ptrdiff_t stride, ptrdiff_t runs, ptrdiff_t len,  \
                     double k, double* mean, double* m2) {                         \
        double count = (double)(runs * len), s = 0.0, m0, e, sd = 0.0, sd2 = 0.0, q; \
        ptrdiff_t i, j;                                                            \
        for (i = 0; i < runs; i++)                                                 \
            for (j = 0; j < len; j++) s += x[i * stride + j] - k;                  \
        s = s / count;                                                             \
        m0 = k + s;                                                                \
        for (i = 0; i < runs; i++)                                                 \
            for (j = 0; j < len; j++) {                                            \
                e = x[i * stride + j] - m0;                                        \
                sd += e;                                                           \
                sd2 += e * e;                                                      \
            }                                                                      \
        if (s - s == 0.0) {                                                        \
            q = sd / count;                                                        \
            *mean = (m0 - k) + q;                                                  \
            *m2 = sd2 - sd * q;                                                    \
        } else {                                                                   \
            *mean = s;                                                             \
            *m2 = sd2;                                                             \
        }                                                                          \
    }
BNFAST_TWO_PASS(bnfast_two_pass_f, float)
BNFAST_TWO_PASS(bnfast_two_pass_d, double)

#endif /* BNFAST_STATS_H */
