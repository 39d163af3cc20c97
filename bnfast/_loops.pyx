# The hot loops of batch normalization over the C-contiguous (N, D) view of
# a batch (and, in _planes.pxi, over NCHW planes): the statistics, the
# element passes, the tasks and the one parallel driver that runs them.
# This is the only code compiled once per instruction set (setup.py: this
# module, _loops_avx2 and _loops_avx512).  It holds no Python-facing entry
# point: bnfast/_kernels.pyx (compiled once, for the baseline) validates a
# call, plans its work (_plan.pxd: Grid, Planes, Call) and calls _dispatch
# here through the function pointer that bnfast/_native.py chose.
#
# Directives (boundscheck, wraparound, cdivision, ...) are set once in setup.py.
#
# Layout of the work.  Every loop walks rows with one float64 accumulator per
# feature, so memory is read in address order and never column by column.
# The statistics (one pass over shifted data, an exact two-pass fallback per
# feature; see "Statistics" below) are cut into a grid that depends only on
# (N, D, itemsize), never on the thread count, in one of two ways:
#
#   strips  when a full-height strip of >= MIN_STRIP features fits in L2
#           (STRIP_BYTES): a task owns whole columns.  Wide strips (short
#           batches) do a whole operation per task: the statistics read the
#           strip from memory once and the output, or the backward's second
#           pass, comes from L2.  Batches whose strips would be too
#           narrow for that get row blocks (FUSED_MIN_COLS), and
#           so do batches of one strip that are big enough for a thread
#           team (one strip is one task).
#   blocks  otherwise (tall batches): a task is (row chunk, column block);
#           row blocks small enough for L2 (TILE_BYTES) are merged in order
#           (Chan's formula) inside a chunk, and the chunks in chunk order.
#
# Threads take tasks in any order, but each task's arithmetic is fixed and
# partial results are merged in a fixed order, so results are bitwise
# identical for any number of threads.  Whole rows of fewer than
# FOLD_MAX_COLS features are folded, m rows to a vector-length row (see
# "Folding short rows").  Element passes (no reductions) write
# their output in address order, about a huge page per task.  Streaming
# (non-temporal) stores skip the read-for-ownership of each destination line
# and keep the data out of the cache; they write the cached copy of x from
# CACHE_STREAM_MIN_BYTES up, and outputs too large to stay cached (see
# _default_stream_min_bytes) from wide strips and from element passes over
# short rows (STREAM_PAGES_MAX_COLS).


from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt, NAN
from libc.stdint cimport uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from cpython.pycapsule cimport PyCapsule_New

from bnfast._plan cimport *

cdef extern from "platform.h":
    const int BNFAST_OPENMP
    const char* BNFAST_BUILD_FLAGS
    ctypedef double* acc_t "bnfast_acc_t"
    void bnfast_barrier() noexcept nogil

cdef extern from "stream.h":
    void bnfast_stream(void* dst, const void* src, size_t nbytes) noexcept nogil
    void bnfast_stream_piece(void* dst, const void* src, size_t total, size_t start,
                             size_t end) noexcept nogil
    void bnfast_fence() noexcept nogil

# Steps of the statistics that every route shares (see that header).
cdef extern from "stats.h":
    bint bnfast_well_conditioned(double m2, double s2) noexcept nogil
    void bnfast_two_pass_f(const float* x, Py_ssize_t stride, Py_ssize_t runs,
                           Py_ssize_t length, double k, double* mean, double* m2) noexcept nogil
    void bnfast_two_pass_d(const double* x, Py_ssize_t stride, Py_ssize_t runs,
                           Py_ssize_t length, double k, double* mean, double* m2) noexcept nogil

cdef extern from "rows.h":
    const int BNF_VECTOR_LOOPS    # (simd.h)
    # one: coefficients c[0], k[0], ... for every value (a plane), a constant
    void bnfast_affine_ff(bint one, const float* x, float* o, Py_ssize_t d, int rows,
                          Py_ssize_t w, const double* c, const double* k,
                          const double* b) noexcept nogil
    void bnfast_affine_dd(bint one, const double* x, double* o, Py_ssize_t d, int rows,
                          Py_ssize_t w, const double* c, const double* k,
                          const double* b) noexcept nogil
    void bnfast_grad_input_ff(bint one, const float* x, const float* dy, float* o, Py_ssize_t d,
                              int rows, Py_ssize_t w, const double* c, const double* m,
                              const double* q, const double* k) noexcept nogil
    void bnfast_grad_input_dd(bint one, const double* x, const double* dy, double* o,
                              Py_ssize_t d, int rows, Py_ssize_t w, const double* c,
                              const double* m, const double* q, const double* k) noexcept nogil
    void bnfast_row_sums_f(bint grad, const float* x, const float* dy, Py_ssize_t d, int rows,
                           Py_ssize_t w, const double* k, double* s1, double* s2) noexcept nogil
    bint bnfast_lines_fit(const void* o, Py_ssize_t stride_bytes,
                          Py_ssize_t w_bytes) noexcept nogil
    void bnfast_affine_stream_ff(const float* x, float* o, Py_ssize_t d, Py_ssize_t rows,
                                 Py_ssize_t w, const double* c, const double* k,
                                 const double* b) noexcept nogil
    void bnfast_affine_stream_dd(const double* x, double* o, Py_ssize_t d, Py_ssize_t rows,
                                 Py_ssize_t w, const double* c, const double* k,
                                 const double* b) noexcept nogil


ctypedef fused in_t:
    float
    double

ctypedef fused out_t:
    float
    double


# What a reduction sums, as a type (sums_t), so that each kind's loops are
# compiled without a test inside them: with b = x - k per feature (or
# channel), the sums of a and a * b, where a = b for StatSums (the
# statistics' shifted sums, s1 = sum(x - k) and s2 = sum((x - k)^2)) and
# a = dy for GradSums (the backward's sum(dy) and sum(dy * (x - k))).
cdef struct StatSums:
    char unused

cdef struct GradSums:
    char unused

ctypedef fused sums_t:
    StatSums
    GradSums


# Means divide per-feature sums by a row count, and a vector division costs
# as much as ten multiplications: the per-feature set-up of short batches is
# bound by its divisions and square roots.  Where 1 / n is exact (n a power
# of two, as batch sizes usually are), s * (1 / n) rounds the same exact
# value as s / n, so multiplying there gives bitwise the results of
# dividing.  (The loops come in both versions: compilers compute both and
# blend when the choice is inside one loop.)

cdef inline double _exact_inverse(Py_ssize_t n) noexcept nogil:
    """1 / n where that is exact (n a power of two), else 0."""
    return 1.0 / <double>n if n > 0 and (n & (n - 1)) == 0 else 0.0


cdef void _divide_by_count(double* v, Py_ssize_t w, Py_ssize_t n) noexcept nogil:
    """v[j] /= n for j < w (multiplying where that is exact)."""
    cdef double inv = _exact_inverse(n), nd = <double>n
    cdef Py_ssize_t j
    if inv != 0.0:
        for j in range(w):
            v[j] = v[j] * inv
    else:
        for j in range(w):
            v[j] = v[j] / nd



cdef struct Task:
    Py_ssize_t k        # row chunk
    Py_ssize_t r0, r1   # rows
    Py_ssize_t c0, w    # columns c0 .. c0 + w


cdef inline Task _task(const Grid* g, Py_ssize_t t) noexcept nogil:
    # Returned by value: inside prange, assigning the result makes it
    # thread-private (Cython does not privatize variables written through
    # pointers).
    cdef Task task
    task.k = t // g.n_col_blocks
    task.c0 = (t - task.k * g.n_col_blocks) * g.col_block
    task.r0 = task.k * g.chunk_rows
    task.r1 = task.r0 + g.chunk_rows
    if task.r1 > g.n_rows:
        task.r1 = g.n_rows
    task.w = g.col_block
    if task.c0 + task.w > g.n_cols:
        task.w = g.n_cols - task.c0
    return task


# ---------------------------------------------------------------------------
# Per-feature set-up: each operation's per-feature formulas, written once
# (_train_setup: mean, var, invstd, the affine coefficients and the running
# statistics from the sums; _eval_setup: the eval coefficients;
# _backward_setup: dgamma, dbeta and dx's coefficients), reached through one
# dtype dispatch (_set_up).  Short batches spend as long here as on their
# elements, so the loops read and write the caller's vectors where they lie,
# each value loaded and stored once, wherever the parameters (gamma, beta,
# dgamma, dbeta) share one dtype, the running statistics share one dtype and
# no vector broadcasts one value (the layer's cases).  Other operands go
# through the same loops in float64, converted SETUP_PIECE features at a
# time on the stack (_set_up_converted).

cdef enum SetUpKind:
    SETUP_TRAIN
    SETUP_EVAL
    SETUP_BACKWARD


cdef struct SetUp:
    # One set-up of w features: its float64 rows (by kind: see its loop),
    # each at the set-up's first feature, and its operands, read from
    # feature c0 on: inputs gamma, beta, running mean, running variance and
    # outputs new running mean, new running variance, dgamma, dbeta (NULL,
    # or an OutVec without data: not used).
    SetUpKind kind
    Py_ssize_t n                # rows the sums ran over
    Py_ssize_t c0, w
    double eps
    const TrainArgs* train      # SETUP_TRAIN: momentum, var_correction
    double* row[6]
    const Vec* vin[4]
    const OutVec* vout[4]


cdef inline SetUp _new_set_up(SetUpKind kind, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t w,
                              double eps) noexcept nogil:
    cdef SetUp s
    memset(&s, 0, sizeof(s))
    s.kind = kind
    s.n = n
    s.c0 = c0
    s.w = w
    s.eps = eps
    return s


ctypedef fused param_t:
    float
    double

ctypedef fused stat_t:
    float
    double


cdef void _train_setup(const SetUp* s, const param_t* gamma, const param_t* beta,
                       const stat_t* rm_old, const stat_t* rv_old, stat_t* rm_new,
                       stat_t* rv_new) noexcept nogil:
    """rows: mean (relative to the shift, in; the mean, out), var (M2 in),
    invstd, the shift k, scale, shift (may alias k).  rm_new NULL: no
    running update."""
    cdef Py_ssize_t j
    cdef const TrainArgs* a = s.train
    cdef double* mean = s.row[0]
    cdef double* var = s.row[1]
    cdef double* invstd = s.row[2]
    cdef const double* k = s.row[3]
    cdef double* scale = s.row[4]
    cdef double* shift = s.row[5]
    cdef double m, v, r, eps = s.eps, mom = a.momentum, rest = a.one_minus_momentum
    cdef double corr = a.var_correction
    _divide_by_count(var, s.w, s.n)      # M2 -> var
    if rm_new == NULL:
        for j in range(s.w):
            r = 1.0 / sqrt(var[j] + eps)
            mean[j] = k[j] + mean[j]
            invstd[j] = r
            scale[j] = r * gamma[j]
            shift[j] = beta[j]
        return
    for j in range(s.w):
        m = k[j] + mean[j]
        v = var[j]
        r = 1.0 / sqrt(v + eps)
        mean[j] = m
        invstd[j] = r
        scale[j] = r * gamma[j]
        shift[j] = beta[j]
        rm_new[j] = <stat_t>(mom * rm_old[j] + rest * m)
        rv_new[j] = <stat_t>(mom * rv_old[j] + rest * (v * corr))


cdef void _eval_setup(const SetUp* s, const param_t* gamma, const param_t* beta,
                      const stat_t* rm, const stat_t* rv) noexcept nogil:
    """rows: center = rm, scale = gamma / sqrt(rv + eps), shift = beta."""
    cdef Py_ssize_t j
    cdef double* center = s.row[0]
    cdef double* scale = s.row[1]
    cdef double* shift = s.row[2]
    for j in range(s.w):
        center[j] = rm[j]
        scale[j] = <double>gamma[j] / sqrt(<double>rv[j] + s.eps)
        shift[j] = beta[j]


cdef void _backward_setup(const SetUp* s, const param_t* gamma, param_t* dgamma,
                          param_t* dbeta) noexcept nogil:
    """rows: invstd (in), sum(dy) (in; mean(dy) out), sum(dy * (x - mean))
    (in; its mean out), k_xc, k: dbeta, dgamma and k in one loop, then the
    means and k_xc."""
    cdef Py_ssize_t j
    cdef const double* invstd = s.row[0]
    cdef double* sum_dy = s.row[1]
    cdef double* sum_dy_xc = s.row[2]
    cdef double* k_xc = s.row[3]
    cdef double* k = s.row[4]
    cdef double r
    for j in range(s.w):
        r = invstd[j]
        dbeta[j] = <param_t>sum_dy[j]
        dgamma[j] = <param_t>(sum_dy_xc[j] * r)
        k[j] = gamma[j] * r
    _divide_by_count(sum_dy, s.w, s.n)
    _divide_by_count(sum_dy_xc, s.w, s.n)
    for j in range(s.w):
        k_xc[j] = invstd[j] * invstd[j] * sum_dy_xc[j]


cdef void _set_up_typed(const SetUp* s, void** p, const param_t* param_type,
                        const stat_t* stat_type) noexcept nogil:
    """s's loop, its operands at p (in the order of vin, then vout) of types
    param_t and stat_t (param_type and stat_type only name them: NULL)."""
    if s.kind == SETUP_TRAIN:
        _train_setup(s, <const param_t*>p[0], <const param_t*>p[1], <const stat_t*>p[2],
                     <const stat_t*>p[3], <stat_t*>p[4], <stat_t*>p[5])
    elif s.kind == SETUP_EVAL:
        _eval_setup(s, <const param_t*>p[0], <const param_t*>p[1], <const stat_t*>p[2],
                    <const stat_t*>p[3])
    else:
        _backward_setup(s, <const param_t*>p[0], <param_t*>p[6], <param_t*>p[7])


cdef inline void* _operand(const void* data, bint f64, Py_ssize_t c0, int* dtype,
                           bint* direct) noexcept nogil:
    """data from feature c0 on; direct cleared where its group's dtype (the
    first operand's, else -1) differs."""
    if dtype[0] < 0:
        dtype[0] = f64
    elif dtype[0] != f64:
        direct[0] = False
    return <char*>data + c0 * (8 if f64 else 4)


cdef void _set_up(const SetUp* s) noexcept nogil:
    """Run s (see above): on the operands where they lie, or converted."""
    cdef void* p[8]
    cdef int dtype[2]       # the parameters' and the statistics' is_f64; -1: none yet
    cdef int i
    cdef bint direct = True
    dtype[0] = dtype[1] = -1
    for i in range(4):
        p[i] = p[4 + i] = NULL
        if s.vin[i] != NULL:        # gamma, beta (parameters); rm, rv (statistics)
            direct = direct and s.vin[i].stride != 0
            p[i] = _operand(s.vin[i].data, s.vin[i].is_f64, s.c0, &dtype[i // 2], &direct)
        if s.vout[i] != NULL and s.vout[i].data != NULL:    # rm, rv; dgamma, dbeta
            p[4 + i] = _operand(s.vout[i].data, s.vout[i].is_f64, s.c0, &dtype[1 - i // 2],
                                &direct)
    if not direct:
        _set_up_converted(s)
    elif dtype[0] != 0:
        if dtype[1] != 0:
            _set_up_typed[double, double](s, p, NULL, NULL)
        else:
            _set_up_typed[double, float](s, p, NULL, NULL)
    elif dtype[1] != 0:
        _set_up_typed[float, double](s, p, NULL, NULL)
    else:
        _set_up_typed[float, float](s, p, NULL, NULL)


cdef void _set_up_converted(const SetUp* s) noexcept nogil:
    """s through the float64 loop, SETUP_PIECE features at a time: its
    operands converted to float64 rows on the stack, its results back."""
    cdef double buf[8 * SETUP_PIECE]
    cdef void* p[8]
    cdef SetUp piece = s[0]
    cdef Py_ssize_t p0 = 0, i
    while p0 < s.w:
        piece.c0 = s.c0 + p0
        piece.w = s.w - p0 if s.w - p0 < SETUP_PIECE else SETUP_PIECE
        for i in range(6):
            piece.row[i] = s.row[i] + p0 if s.row[i] != NULL else NULL
        for i in range(4):
            p[i] = p[4 + i] = NULL
            if s.vin[i] != NULL:
                p[i] = buf + i * SETUP_PIECE
                _expand(s.vin[i], piece.c0, piece.w, <double*>p[i])
            if s.vout[i] != NULL and s.vout[i].data != NULL:
                p[4 + i] = buf + (4 + i) * SETUP_PIECE
        _set_up_typed[double, double](&piece, p, NULL, NULL)
        for i in range(4):
            if p[4 + i] != NULL:
                _store(s.vout[i], piece.c0, piece.w, <double*>p[4 + i])
        p0 += SETUP_PIECE


cdef void _expand(const Vec* v, Py_ssize_t c0, Py_ssize_t w, double* dst) noexcept nogil:
    """dst[j] = v[c0 + j] as float64, with the dtype/broadcast branch hoisted."""
    cdef Py_ssize_t j
    cdef double value
    cdef const double* pd
    cdef const float* pf
    if v.stride == 0:
        value = (<const double*>v.data)[0] if v.is_f64 else (<const float*>v.data)[0]
        for j in range(w):
            dst[j] = value
    elif v.is_f64:
        pd = <const double*>v.data + c0
        for j in range(w):
            dst[j] = pd[j]
    else:
        pf = <const float*>v.data + c0
        for j in range(w):
            dst[j] = pf[j]


cdef void _store(const OutVec* v, Py_ssize_t c0, Py_ssize_t w, const double* src) noexcept nogil:
    cdef Py_ssize_t j
    cdef double* pd
    cdef float* pf
    if v.is_f64:
        pd = <double*>v.data + c0
        for j in range(w):
            pd[j] = src[j]
    else:
        pf = <float*>v.data + c0
        for j in range(w):
            pf[j] = <float>src[j]


cdef void _finish_stats(const TrainArgs* a, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t w,
                        const double* k, double* scale, double* shift,
                        double* tmp) noexcept nogil:
    """From the mean relative to the shift k (in a.mean) and M2 (in a.var) of
    columns c0..c0+w: mean, var, invstd (in tmp where a.invstd is NULL),
    the affine coefficients (scale, shift) and the running statistics.
    shift may alias k."""
    cdef SetUp s = _new_set_up(SETUP_TRAIN, n, c0, w, a.eps)
    s.train = a
    s.row[0], s.row[1] = a.mean + c0, a.var + c0
    s.row[2] = a.invstd + c0 if a.invstd != NULL else tmp
    s.row[3], s.row[4], s.row[5] = <double*>k, scale, shift
    s.vin[0], s.vin[1] = a.gamma, a.beta
    if a.rm_new.data != NULL:
        s.vin[2], s.vin[3], s.vout[0], s.vout[1] = a.rm_old, a.rv_old, &a.rm_new, &a.rv_new
    _set_up(&s)


cdef void _eval_coefficients(const Vec* gamma, const Vec* beta, const Vec* rm, const Vec* rv,
                             double eps, Py_ssize_t c0, Py_ssize_t w, double* center,
                             double* scale, double* shift) noexcept nogil:
    """Eval-mode coefficients of columns c0..c0+w, as float64: center = rm,
    scale = gamma / sqrt(rv + eps), shift = beta."""
    cdef SetUp s = _new_set_up(SETUP_EVAL, 0, c0, w, eps)
    s.row[0], s.row[1], s.row[2] = center, scale, shift
    s.vin[0], s.vin[1], s.vin[2], s.vin[3] = gamma, beta, rm, rv
    _set_up(&s)


cdef void _backward_coefficients(Py_ssize_t n, Py_ssize_t c0, Py_ssize_t w, const double* invstd,
                                 const Vec* gamma, double* sum_dy, double* sum_dy_xc,
                                 double* k_xc, double* k, const OutVec* dgamma,
                                 const OutVec* dbeta) noexcept nogil:
    """dgamma, dbeta and the pass-2 coefficients of columns c0..c0+w; turns
    sum_dy into mean(dy) (and sum_dy_xc, scratch, into its mean).  invstd
    points at column c0."""
    cdef SetUp s = _new_set_up(SETUP_BACKWARD, n, c0, w, 0.0)
    s.row[0], s.row[1], s.row[2], s.row[3], s.row[4] = <double*>invstd, sum_dy, sum_dy_xc, k_xc, k
    s.vin[0], s.vout[2], s.vout[3] = gamma, dgamma, dbeta
    _set_up(&s)


cdef void _eval_grad_coefficients(const EvalArgs* a, Py_ssize_t w, double* center,
                                  double* invstd, double* dx_scale) noexcept nogil:
    """The eval backward's constants of w features (or channels): center =
    rm, invstd = 1 / sqrt(rv + eps) and dx's scale, gamma * invstd."""
    cdef Py_ssize_t j
    _expand(a.rm, 0, w, center)
    _expand(a.rv, 0, w, invstd)
    _expand(a.gamma, 0, w, dx_scale)
    for j in range(w):
        invstd[j] = 1.0 / sqrt(invstd[j] + a.eps)
        dx_scale[j] = dx_scale[j] * invstd[j]


cdef void _eval_grad_results(const Call* c, Py_ssize_t w, const double* invstd,
                             const double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """The eval backward's dbeta = sum(dy) and dgamma = sum(dy * (x - rm)) *
    invstd, from its sums (sum_dy_xc becomes dgamma)."""
    cdef Py_ssize_t j
    _store(c.dbeta, 0, w, sum_dy)
    for j in range(w):
        sum_dy_xc[j] = sum_dy_xc[j] * invstd[j]
    _store(c.dgamma, 0, w, sum_dy_xc)


# ---------------------------------------------------------------------------
# Statistics: shifted sums in one pass, with an exact two-pass fallback per
# feature, inside each block; Chan's merge across blocks.  Everything is
# relative to a per-feature shift K (the mean of the first rows, see _shift_of).
#
# With the shift, sum(x - K) and sum((x - K)^2) give M2 = s2 - s1^2 / n with a
# relative error of about 2 eps * s2 / M2.  Where s2 > 8 M2 (K far from the
# mean in units of the spread: an outlier first row, heavy tails) or the sums
# are not finite, that feature's block is redone by the corrected two-pass
# (m = m0 + sum(x - m0) / n, M2 = sum((x - m0)^2) - n (m - m0)^2), which is
# exact to rounding whatever the offset.  Keeping block means relative to K
# means merging them loses nothing to a large common offset; a constant
# feature sums exact zeros, so its mean is K exactly and its M2 is 0 exactly.
# A non-finite sum (inf or NaN in the feature) gives the plain mean, as the
# reference's column sums do.

cdef inline bint _finite(double v) noexcept nogil:
    return v - v == 0.0


# ---------------------------------------------------------------------------
# Folding short rows.  A loop over a row of 3 or 16 features is mostly loop
# overhead; m consecutive whole rows (contiguous, since they are whole) are
# one folded row of m * d lanes whose feature is lane % d, so the loops run
# over the folded row with each per-feature value repeated m times, and the
# lane sums are added back per feature in lane order.  m depends only on d
# (Grid.fold, set by the planner: _kernels._fold_rows); a pass folds where
# its columns are whole rows.

cdef void _repeat(const double* v, Py_ssize_t d, Py_ssize_t m, double* lanes) noexcept nogil:
    """lanes = v repeated m times (a folded row's per-lane values)."""
    cdef Py_ssize_t r
    for r in range(m):
        memcpy(lanes + r * d, v, d * sizeof(double))


cdef void _add_lanes(const double* lanes, Py_ssize_t d, Py_ssize_t m, double* acc) noexcept nogil:
    """acc[f] += the sum of a folded row's lanes of feature f, in lane order."""
    cdef Py_ssize_t f, r
    cdef double t
    for f in range(d):
        t = lanes[f]
        for r in range(1, m):
            t += lanes[r * d + f]
        acc[f] += t


cdef void _shift_of(const in_t* x, Py_ssize_t d, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t w,
                    double* shift) noexcept nogil:
    """Per-feature shift of columns c0..c0+w: the mean of the batch's first
    rows (up to 8, summed pairwise so that 8 equal values give exactly that
    value), or 0 where that is not finite.  Close to the batch mean for
    most data, which keeps the one-pass sums well conditioned."""
    cdef Py_ssize_t i, j, rows = n if n < 8 else 8
    cdef const in_t* a = x + c0
    cdef double v
    if rows == 8:
        for j in range(w):
            v = ((((<double>a[j] + a[d + j]) + (<double>a[2 * d + j] + a[3 * d + j]))
                  + ((<double>a[4 * d + j] + a[5 * d + j]) + (<double>a[6 * d + j] + a[7 * d + j])))
                 * 0.125)
            shift[j] = v if v - v == 0.0 else 0.0
    else:
        for j in range(w):
            shift[j] = a[j]
        for i in range(1, rows):
            for j in range(w):
                shift[j] += a[i * d + j]
        for j in range(w):
            v = shift[j] / rows
            shift[j] = v if v - v == 0.0 else 0.0


cdef inline void _two_pass(const in_t* x, Py_ssize_t stride, Py_ssize_t runs,
                           Py_ssize_t length, double k, double* mean, double* m2) noexcept nogil:
    """The exact fallback for ill-conditioned and non-finite sums: runs of
    length contiguous values, stride apart; mean relative to k (stats.h)."""
    if in_t is float:
        bnfast_two_pass_f(x, stride, runs, length, k, mean, m2)
    else:
        bnfast_two_pass_d(x, stride, runs, length, k, mean, m2)


cdef inline void _sums_step(const in_t* a, const in_t* g, Py_ssize_t d, int rows, Py_ssize_t w,
                            const double* k, acc_t s1, acc_t s2,
                            const sums_t* kind) noexcept nogil:
    """s1, s2 += the sums (sums_t; kind: NULL, naming it) of `rows` rows (4
    or 1) at a, and at g (dy's rows: GradSums), row stride d, w columns.
    Four rows a step: each accumulator is loaded and stored once per four
    rows; the fixed pairing shortens rounding chains."""
    cdef Py_ssize_t j
    cdef double b0, b1, b2, b3, a0, a1, a2, a3
    if in_t is float:
        bnfast_row_sums_f(sums_t is GradSums, a, g, d, rows, w, k, s1, s2)
    elif rows == 4:
        for j in range(w):
            b0 = a[j] - k[j]
            b1 = a[d + j] - k[j]
            b2 = a[2 * d + j] - k[j]
            b3 = a[3 * d + j] - k[j]
            if sums_t is GradSums:
                a0, a1, a2, a3 = g[j], g[d + j], g[2 * d + j], g[3 * d + j]
            else:
                a0, a1, a2, a3 = b0, b1, b2, b3
            s1[j] += (a0 + a1) + (a2 + a3)
            s2[j] += (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3)
    else:
        for j in range(w):
            b0 = a[j] - k[j]
            a0 = g[j] if sums_t is GradSums else b0
            s1[j] += a0
            s2[j] += a0 * b0


cdef void _row_sums(const in_t* x, const in_t* dy, in_t* copy_to, Py_ssize_t d, Py_ssize_t fold,
                    Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w, const double* k,
                    acc_t s1, acc_t s2, const sums_t* kind) noexcept nogil:
    """s1, s2 += the sums (sums_t) of rows r0..r1 of columns c0..c0+w,
    relative to k (w values), whole rows folded `fold` at a time; the rows
    copied to copy_to unless it is NULL."""
    cdef Py_ssize_t i = r0, j, r
    cdef const in_t* a
    cdef const in_t* g = NULL
    cdef in_t* c
    if fold > 1 and w == d:
        i = _row_sums_folded(x, dy, copy_to, d, fold, r0, r1, k, s1, s2, kind)
    while i + 4 <= r1:
        a = x + i * d + c0
        if sums_t is GradSums:
            g = dy + i * d + c0
        if copy_to != NULL:
            # one row per loop: a single (read, write) pair to check for
            # overlap, so the copy vectorizes; no memcpy call per segment
            for r in range(4):
                c = copy_to + (i + r) * d + c0
                for j in range(w):
                    c[j] = a[r * d + j]
        _sums_step(a, g, d, 4, w, k, s1, s2, kind)
        i += 4
    while i < r1:
        a = x + i * d + c0
        if sums_t is GradSums:
            g = dy + i * d + c0
        if copy_to != NULL:
            memcpy(copy_to + i * d + c0, a, w * sizeof(in_t))
        _sums_step(a, g, d, 1, w, k, s1, s2, kind)
        i += 1


cdef Py_ssize_t _row_sums_folded(const in_t* x, const in_t* dy, in_t* copy_to, Py_ssize_t d,
                                 Py_ssize_t m, Py_ssize_t r0, Py_ssize_t r1, const double* k,
                                 double* s1, double* s2, const sums_t* kind) noexcept nogil:
    """_row_sums over the whole groups of m rows in r0..r1 as folded rows;
    returns the first row left."""
    cdef Py_ssize_t lanes = m * d, groups = (r1 - r0) // m, off = r0 * d, j
    cdef double k_lanes[FOLD_MAX_LANES]
    cdef double l1[FOLD_MAX_LANES]
    cdef double l2[FOLD_MAX_LANES]
    if groups == 0:
        return r0
    _repeat(k, d, m, k_lanes)
    for j in range(lanes):
        l1[j] = 0.0
        l2[j] = 0.0
    _row_sums(x + off, dy + off if dy != NULL else NULL,
              copy_to + off if copy_to != NULL else NULL, lanes, 1, 0, groups, 0, lanes, k_lanes,
              l1, l2, kind)
    _add_lanes(l1, d, m, s1)
    _add_lanes(l2, d, m, s2)
    return r0 + groups * m


cdef inline bint _block_moments(double s1, double s2, double mb, double* mean,
                                double* m2) noexcept nogil:
    """From one feature's block sums (s1, s2) and block mean mb: mean = mb
    and m2 = M2, or NaN where the sums are ill-conditioned or not finite
    (then returns True)."""
    cdef double m2b = s2 - s1 * mb
    cdef bint bad = not bnfast_well_conditioned(m2b, s2)
    mean[0] = mb
    m2[0] = NAN if bad else m2b
    return bad


cdef void _stats_rows(const in_t* x, in_t* copy_to, bint stream, Py_ssize_t n_rows,
                      Py_ssize_t d, Py_ssize_t fold, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                      Py_ssize_t w, Py_ssize_t block_rows, const double* shift, acc_t mean_acc,
                      acc_t m2_acc, acc_t s1, acc_t s2) noexcept nogil:
    """mean (relative to shift) and M2 of rows r0..r1 of columns c0..c0+w,
    copying those rows to copy_to unless it is NULL.  s1, s2: w doubles of
    scratch each."""
    cdef Py_ssize_t b0 = r0, b1, j
    cdef double na = 0.0
    cdef in_t* copy_here = copy_to if not stream else NULL
    while b0 < r1:
        b1 = b0 + block_rows
        if b1 > r1:
            b1 = r1
        for j in range(w):
            s1[j] = 0.0
            s2[j] = 0.0
        _row_sums(x, <const in_t*>NULL, copy_here, d, fold, b0, b1, c0, w, shift, s1, s2,
                  <const StatSums*>NULL)
        if copy_to != NULL and stream:
            _stream_rows(x, copy_to, n_rows, d, b0, b1, c0, w)
        _merge_block(x, d, b0, b1, c0, w, shift, na, mean_acc, m2_acc, s1, s2)
        na += <double>(b1 - b0)
        b0 = b1


cdef void _stream_rows(const in_t* x, in_t* copy_to, Py_ssize_t n_rows, Py_ssize_t d,
                       Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t c0, Py_ssize_t w) noexcept nogil:
    """copy_to = x in rows b0..b1 of columns c0..c0+w, with streaming stores."""
    cdef Py_ssize_t i
    cdef size_t total = n_rows * d * sizeof(in_t)
    if w == d:      # whole rows: one contiguous run (no per-row call for narrow rows)
        bnfast_stream_piece(copy_to, x, total, b0 * d * sizeof(in_t), b1 * d * sizeof(in_t))
    else:
        for i in range(b0, b1):
            bnfast_stream_piece(copy_to, x, total, (i * d + c0) * sizeof(in_t),
                                (i * d + c0 + w) * sizeof(in_t))


cdef void _merge_block(const in_t* x, Py_ssize_t d, Py_ssize_t b0, Py_ssize_t b1,
                       Py_ssize_t c0, Py_ssize_t w, const double* shift, double na,
                       acc_t mean_acc, acc_t m2_acc, acc_t s1, acc_t s2) noexcept nogil:
    """From the shifted sums (s1, s2) of rows b0..b1: the block's mean and M2
    per feature, merged into (mean_acc, m2_acc), which hold the na rows
    before it (set, when na is 0)."""
    cdef Py_ssize_t j, n_bad = 0
    cdef double nb = <double>(b1 - b0), n, wa, wb
    cdef double inv_nb = _exact_inverse(b1 - b0)
    # The first block's moments go straight to the accumulators (no copy
    # pass); later ones replace their sums, for the merge.  (Each loop has
    # one output pair, so it vectorizes without overlap checks.)
    cdef double* block_mean = mean_acc if na == 0.0 else s1
    cdef double* block_m2 = m2_acc if na == 0.0 else s2
    # Per feature: the block's mean and M2 (vectorized), marking with NaN
    # the features whose sums are ill-conditioned or not finite; then the
    # exact two-pass for those (a scan: they are rare); then the merge.
    if na == 0.0 and inv_nb != 0.0:
        for j in range(w):
            n_bad += _block_moments(s1[j], s2[j], s1[j] * inv_nb, &mean_acc[j], &m2_acc[j])
    elif na == 0.0:
        for j in range(w):
            n_bad += _block_moments(s1[j], s2[j], s1[j] / nb, &mean_acc[j], &m2_acc[j])
    elif inv_nb != 0.0:
        for j in range(w):
            n_bad += _block_moments(s1[j], s2[j], s1[j] * inv_nb, &s1[j], &s2[j])
    else:
        for j in range(w):
            n_bad += _block_moments(s1[j], s2[j], s1[j] / nb, &s1[j], &s2[j])
    # A well-conditioned block's M2 is >= s2 / 8 >= 0; only the two-pass's
    # can round below 0, so only those are clamped.
    if n_bad:
        for j in range(w):
            if block_m2[j] != block_m2[j]:
                _two_pass(x + b0 * d + c0 + j, d, b1 - b0, 1, shift[j], &block_mean[j],
                          &block_m2[j])
                if block_m2[j] < 0.0:
                    block_m2[j] = 0.0
    if na == 0.0:
        return
    n = na + nb
    wa = nb / n
    wb = na * nb / n
    for j in range(w):
        _chan_merge(&mean_acc[j], &m2_acc[j], s1[j], s2[j], wa, wb)


cdef inline void _chan_merge(double* mean, double* m2, double mb, double m2b, double wa,
                             double wb) noexcept nogil:
    """Chan's formula: the mean and M2 of na values merged with those (mb,
    m2b) of nb more; wa = nb / n, wb = na nb / n, n = na + nb.  Where a mean
    is not finite the two add, as the reference's column sums do."""
    cdef double delta = mb - mean[0]
    if _finite(mb) and _finite(mean[0]):
        mean[0] += delta * wa
        m2[0] += m2b + delta * delta * wb
    else:
        mean[0] += mb
        m2[0] += m2b


cdef void _merge_chunk_columns(const Grid* g, const double* part_mean, const double* part_m2,
                               double* mean, double* m2, Py_ssize_t c0,
                               Py_ssize_t c1) noexcept nogil:
    """Chan's merge of the per-chunk (mean, M2) of columns c0..c1, always in
    chunk order (column ranges merge independently)."""
    cdef Py_ssize_t k, j, d = g.n_cols
    cdef double na, nb, n, wa, wb
    for j in range(c0, c1):
        mean[j] = part_mean[j]
        m2[j] = part_m2[j]
    na = <double>g.chunk_rows
    for k in range(1, g.n_chunks):
        nb = <double>(g.n_rows - k * g.chunk_rows)
        if nb > g.chunk_rows:
            nb = <double>g.chunk_rows
        n = na + nb
        wa = nb / n
        wb = na * nb / n
        for j in range(c0, c1):
            _chan_merge(&mean[j], &m2[j], part_mean[k * d + j], part_m2[k * d + j], wa, wb)
        na = n


# ---------------------------------------------------------------------------
# Element passes.

# What an element pass writes, as a type (pass_t, as sums_t above), from
# per-feature coefficients k[0..3], in float64.  Subtracting first keeps full
# accuracy for large offsets and makes a constant feature (x == k[0]) give
# exactly k[2]; in the backward, what cancels mathematically cancels
# exactly (a batch of one gives dx == 0, as in the reference).
cdef struct AffinePass:         # y = (x - k[0]) * k[1] + k[2]
    char unused

cdef struct GradInputPass:      # dx = k[3] * ((dy - k[1]) - k[2] * (x - k[0]))
    char unused

cdef struct ScalePass:          # dx = dy * k[0] (the per-channel eval backward's)
    char unused

ctypedef fused pass_t:
    AffinePass
    GradInputPass
    ScalePass

# How a pass's coefficients vary along its run of w values, as a type
# (coefs_t): one per feature, k[i][j] at column j (rows), or one value
# k[i][0] for the whole run (a per-channel plane).
cdef struct PerFeature:
    char unused

cdef struct PerPlane:
    char unused

ctypedef fused coefs_t:
    PerFeature
    PerPlane


cdef inline void _pass_step(const in_t* a, const in_t* g, out_t* o, Py_ssize_t d, int rows,
                            Py_ssize_t w, const double* const* k, const pass_t* kind,
                            const coefs_t* coefs) noexcept nogil:
    """The pass (pass_t; kind: NULL, naming it) over `rows` rows (4 or 1) at
    a (and g, dy's rows: GradInputPass, ScalePass), written to o; row stride
    d, w columns, coefficients as coefs_t says (coefs: NULL, naming it).
    Four rows share each load of the coefficients."""
    cdef Py_ssize_t j, r, per = 1 if coefs_t is PerFeature else 0    # coefficient stride
    cdef bint one = coefs_t is PerPlane
    cdef const double* k0 = k[0]
    cdef const double* k1 = k[1]
    cdef const double* k2 = k[2]
    cdef const double* k3 = k[3]
    cdef double c, s, b, q
    if coefs_t is PerPlane:
        rows = 1        # (a constant for the C loops: a plane is one run)
    if pass_t is AffinePass:
        if in_t is float and out_t is float:
            bnfast_affine_ff(one, a, o, d, rows, w, k0, k1, k2)
        elif in_t is double and out_t is double and BNF_VECTOR_LOOPS:
            bnfast_affine_dd(one, a, o, d, rows, w, k0, k1, k2)
        elif rows == 4:
            for j in range(w):
                c = k0[j * per]
                s = k1[j * per]
                b = k2[j * per]
                o[j] = <out_t>((a[j] - c) * s + b)
                o[d + j] = <out_t>((a[d + j] - c) * s + b)
                o[2 * d + j] = <out_t>((a[2 * d + j] - c) * s + b)
                o[3 * d + j] = <out_t>((a[3 * d + j] - c) * s + b)
        else:
            for j in range(w):
                o[j] = <out_t>((a[j] - k0[j * per]) * k1[j * per] + k2[j * per])
    elif pass_t is GradInputPass:
        if in_t is float and out_t is float:
            bnfast_grad_input_ff(one, a, g, o, d, rows, w, k0, k1, k2, k3)
        elif in_t is double and out_t is double and BNF_VECTOR_LOOPS:
            bnfast_grad_input_dd(one, a, g, o, d, rows, w, k0, k1, k2, k3)
        elif rows == 4:
            for j in range(w):
                c = k0[j * per]
                b = k1[j * per]
                q = k2[j * per]
                s = k3[j * per]
                o[j] = <out_t>(s * ((g[j] - b) - q * (a[j] - c)))
                o[d + j] = <out_t>(s * ((g[d + j] - b) - q * (a[d + j] - c)))
                o[2 * d + j] = <out_t>(s * ((g[2 * d + j] - b) - q * (a[2 * d + j] - c)))
                o[3 * d + j] = <out_t>(s * ((g[3 * d + j] - b) - q * (a[3 * d + j] - c)))
        else:
            for j in range(w):
                o[j] = <out_t>(k3[j * per] * ((g[j] - k1[j * per])
                                              - k2[j * per] * (a[j] - k0[j * per])))
    else:
        for r in range(rows):
            for j in range(w):
                o[r * d + j] = <out_t>(g[r * d + j] * k0[j * per])


cdef void _pass_rows(const in_t* x, const in_t* dy, out_t* y, bint stream, Py_ssize_t d,
                     Py_ssize_t fold, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w,
                     const double* const* k, out_t* staging, const pass_t* kind) noexcept nogil:
    """The pass (pass_t) over rows r0..r1 of columns c0..c0+w (k: its
    coefficients from column c0), whole rows folded `fold` at a time.
    stream: y is written with streaming stores, straight from the registers
    where its rows are whole 64-byte lines (bnfast_lines_fit), else through
    staging (w values), one more store and load per value."""
    cdef Py_ssize_t i = r0
    cdef const in_t* g = NULL
    if fold > 1 and w == d:
        i = _pass_folded(x, dy, y, stream, d, fold, r0, r1, k, kind)
    elif (pass_t is AffinePass and stream
            and bnfast_lines_fit(y + i * d + c0, d * sizeof(out_t), w * sizeof(out_t))):
        if in_t is float and out_t is float:
            bnfast_affine_stream_ff(x + i * d + c0, y + i * d + c0, d, r1 - i, w, k[0], k[1], k[2])
            return
        elif in_t is double and out_t is double:
            bnfast_affine_stream_dd(x + i * d + c0, y + i * d + c0, d, r1 - i, w, k[0], k[1], k[2])
            return
    if not stream:
        while i + 4 <= r1:
            if pass_t is not AffinePass:
                g = dy + i * d + c0
            _pass_step(x + i * d + c0, g, y + i * d + c0, d, 4, w, k, kind,
                       <const PerFeature*>NULL)
            i += 4
    while i < r1:
        if pass_t is not AffinePass:
            g = dy + i * d + c0
        _pass_step(x + i * d + c0, g, staging if stream else y + i * d + c0, d, 1, w, k, kind,
                   <const PerFeature*>NULL)
        if stream:
            bnfast_stream(y + i * d + c0, staging, w * sizeof(out_t))
        i += 1


cdef Py_ssize_t _pass_folded(const in_t* x, const in_t* dy, out_t* y, bint stream, Py_ssize_t d,
                             Py_ssize_t m, Py_ssize_t r0, Py_ssize_t r1, const double* const* k,
                             const pass_t* kind) noexcept nogil:
    """_pass_rows over the whole groups of m rows in r0..r1 as folded rows;
    returns the first row left."""
    cdef Py_ssize_t lanes = m * d, groups = (r1 - r0) // m, off = r0 * d
    cdef double lanes_k[4 * FOLD_MAX_LANES]
    cdef double staging[FOLD_MAX_LANES]
    cdef const double* kl[4]
    cdef int i
    if groups == 0:
        return r0
    for i in range(4):
        kl[i] = NULL
        if k[i] != NULL:
            kl[i] = lanes_k + i * FOLD_MAX_LANES
            _repeat(k[i], d, m, lanes_k + i * FOLD_MAX_LANES)
    _pass_rows(x + off, dy + off if dy != NULL else NULL, y + off, stream, lanes, 1, 0, groups, 0,
               lanes, kl, <out_t*>staging, kind)
    return r0 + groups * m


cdef inline void _page_bounds(const Grid* g, Py_ssize_t t, Py_ssize_t* r0, Py_ssize_t* r1,
                              Py_ssize_t* c0, Py_ssize_t* c1) noexcept nogil:
    """Rows and columns of element-pass task t."""
    cdef Py_ssize_t k = t // g.n_col_splits
    r0[0] = k * g.page_rows
    r1[0] = r0[0] + g.page_rows if r0[0] + g.page_rows < g.n_rows else g.n_rows
    c0[0] = (t - k * g.n_col_splits) * g.page_cols
    c1[0] = c0[0] + g.page_cols if c0[0] + g.page_cols < g.n_cols else g.n_cols


cdef void _pass_pages(const Grid* g, Py_ssize_t t, const in_t* x, const in_t* dy, out_t* y,
                      const double* const* k, out_t* staging, const pass_t* kind) noexcept nogil:
    """Element-pass task t: its rows, column block by column block (each
    block's coefficients stay in L1 for all the rows)."""
    cdef Py_ssize_t r0, r1, c0, c1, w, i
    cdef const double* kc[4]
    _page_bounds(g, t, &r0, &r1, &c0, &c1)
    while c0 < c1:
        w = g.col_block if c0 + g.col_block <= c1 else c1 - c0
        for i in range(4):
            kc[i] = k[i] + c0 if k[i] != NULL else NULL
        _pass_rows(x, dy, y, g.stream_pages, g.n_cols, g.fold, r0, r1, c0, w, kc, staging, kind)
        c0 += g.col_block


cdef void _grad_sums_rows(const in_t* x, const in_t* dy, Py_ssize_t d, Py_ssize_t fold,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w,
                          const double* center, acc_t sum_dy,
                          acc_t sum_dy_xc) noexcept nogil:
    """Per feature: sum(dy) and sum(dy * (x - center)) over rows r0..r1."""
    cdef Py_ssize_t j
    for j in range(w):
        sum_dy[j] = 0.0
        sum_dy_xc[j] = 0.0
    _row_sums(x, dy, <in_t*>NULL, d, fold, r0, r1, c0, w, center, sum_dy, sum_dy_xc,
              <const GradSums*>NULL)


cdef void _eval_grad_rows(const in_t* x, const in_t* dy, out_t* dx, bint stream, Py_ssize_t d,
                          Py_ssize_t fold, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                          Py_ssize_t w, const double* center, const double* dx_scale,
                          acc_t sum_dy, acc_t sum_dy_xc, out_t* staging) noexcept nogil:
    """dx = dy * dx_scale, with the sums of dy and dy * (x - center), one pass."""
    cdef Py_ssize_t i, j, m = fold if w == d else 1
    cdef const in_t* xr
    cdef const in_t* gr
    cdef out_t* dr
    cdef double g0
    for j in range(w):
        sum_dy[j] = 0.0
        sum_dy_xc[j] = 0.0
    if m > 1:
        r0 = _eval_grad_folded(x, dy, dx, stream, d, m, r0, r1, center, dx_scale, sum_dy,
                               sum_dy_xc)
    for i in range(r0, r1):
        xr = x + i * d + c0
        gr = dy + i * d + c0
        dr = staging if stream else dx + i * d + c0
        for j in range(w):
            g0 = gr[j]
            sum_dy[j] += g0
            sum_dy_xc[j] += g0 * (xr[j] - center[j])
            dr[j] = <out_t>(g0 * dx_scale[j])
        if stream:
            bnfast_stream(dx + i * d + c0, staging, w * sizeof(out_t))


cdef Py_ssize_t _eval_grad_folded(const in_t* x, const in_t* dy, out_t* dx, bint stream,
                                  Py_ssize_t d, Py_ssize_t m, Py_ssize_t r0, Py_ssize_t r1,
                                  const double* center, const double* dx_scale, double* sum_dy,
                                  double* sum_dy_xc) noexcept nogil:
    """_eval_grad_rows over the whole groups of m rows in r0..r1 as folded
    rows (sums added to sum_dy, sum_dy_xc); returns the first row left."""
    cdef Py_ssize_t lanes = m * d, groups = (r1 - r0) // m, off = r0 * d
    cdef double lanes_center[FOLD_MAX_LANES]
    cdef double lanes_dx_scale[FOLD_MAX_LANES]
    cdef double l1[FOLD_MAX_LANES]
    cdef double l2[FOLD_MAX_LANES]
    cdef double staging[FOLD_MAX_LANES]
    if groups == 0:
        return r0
    _repeat(center, d, m, lanes_center)
    _repeat(dx_scale, d, m, lanes_dx_scale)
    _eval_grad_rows(x + off, dy + off, dx + off, stream, lanes, 1, 0, groups, 0, lanes,
                    lanes_center, lanes_dx_scale, l1, l2, <out_t*>staging)
    _add_lanes(l1, d, m, sum_dy)
    _add_lanes(l2, d, m, sum_dy_xc)
    return r0 + groups * m




# ---------------------------------------------------------------------------
# The parallel driver, written once.
#
# An operation runs as one to three phases.  A phase applies one step (a
# task function, named by a Step) to tasks 0..n-1 of the operation's grid: a
# Grid's tasks, column blocks or element-pass pages, or a Planes' reduction
# or element tasks.  A phase starts when every thread has finished the one
# before (an explicit barrier: Cython's prange in a parallel block promises
# none).  A task writes only its own part of the output and its own slot of
# the partials, and partials are merged in a fixed order (by a later phase,
# or after the driver returns), never as threads finish: results are
# bitwise the same for any number of threads.  _drive runs the phases
# inline when the grid says one thread (no thread-team set-up for small
# calls), else on one thread team for all of them (waking a team costs
# microseconds, a real share of a mid-size call), and gives every thread
# `rows` rows of col_block doubles of scratch; an element pass that streams
# its output stages rows in the last of them.
# _step is the one place that maps a step to its task function: a new
# operation adds its steps there and describes its phases in a Work.

cdef enum Step:
    STEP_TRAIN_STRIP        # statistics, coefficients and output of whole columns
    STEP_STATS_BLOCK        # per-chunk mean and M2 of a (row chunk, column block), cache = x
    STEP_TRAIN_COEF         # a column block's merge, statistics, scale and shift
    STEP_AFFINE_PAGES       # y = (x - coef[0]) * coef[1] + coef[2], by pages
    STEP_TRAIN_WHOLE_BLOCK  # a column block's statistics, merge and output
    STEP_EVAL               # the eval forward's coefficients and output, by pages
    STEP_BACKWARD_STRIP     # a training backward's sums, coefficients and dx of whole columns
    STEP_GRAD_SUMS_BLOCK    # per-chunk sum(dy) and sum(dy * (x - coef[0])) of a block
    STEP_BACKWARD_COEF      # a column block's sums added, dgamma, dbeta, dx coefficients
    STEP_BACKWARD_WHOLE_BLOCK  # a column block's sums, merge and dx
    STEP_GRAD_INPUT_PAGES   # dx = coef[3] * ((dy - coef[1]) - coef[2] * (x - coef[0])), by pages
    STEP_EVAL_BACKWARD      # the eval backward's dx and per-chunk sums of a block
    STEP_PLANE_MOMENTS      # per-chunk sums of x - coef[0] and its square, of channels
    STEP_PLANE_GRAD_SUMS    # per-chunk sum(dy) and sum(dy * (x - coef[0])) of channels
    STEP_PLANE_COPY         # cache = x over a task's planes
    STEP_PLANE_AFFINE       # as STEP_AFFINE_PAGES (and cache = x) over a task's planes
    STEP_PLANE_GRAD_INPUT   # as STEP_GRAD_INPUT_PAGES over a task's planes
    STEP_PLANE_SCALE        # dx = dy * coef[0] over a task's planes
    STEP_PLANE_TRAIN_BLOCK  # a channel block's statistics, y and cache = x
    STEP_PLANE_BACKWARD_BLOCK  # a channel block's sums, coefficients and dx





cdef struct Phase:
    Step step
    Py_ssize_t n_tasks
    bint dynamic            # reductions (tasks of uneven cost): dynamic schedule


cdef struct Work:
    # An operation's phases and what its tasks share besides its Call.
    Phase phase[3]
    int n_phases
    int n_threads
    Py_ssize_t rows         # scratch rows per thread, of col_block doubles
    Py_ssize_t col_block
    double* part            # per-chunk partials (_new_part)
    void* raw               # part's allocation
    double* shifts          # the statistics' per-feature shifts
    double* totals          # per-feature sums, merged
    const double* coef[4]   # an element pass's per-feature coefficients


cdef inline Work _work(int n_threads, Py_ssize_t col_block, Py_ssize_t rows) noexcept nogil:
    cdef Work w
    memset(&w, 0, sizeof(w))
    w.n_threads = n_threads
    w.col_block = col_block
    w.rows = rows
    return w


cdef inline bint _new_part(Work* w, Py_ssize_t n_doubles) noexcept nogil:
    """w.part: n_doubles for the partials and the coefficient rows, from a
    64-byte line (as the scratch's, see _drive); freed with w.raw.  True
    where there is no memory."""
    w.raw = malloc((n_doubles + 8) * sizeof(double))
    w.part = <double*>((<uintptr_t>w.raw + 63) & ~(<uintptr_t>63))
    return w.raw == NULL


cdef inline void _phase(Work* w, Step step, Py_ssize_t n_tasks, bint dynamic) noexcept nogil:
    w.phase[w.n_phases].step = step
    w.phase[w.n_phases].n_tasks = n_tasks
    w.phase[w.n_phases].dynamic = dynamic
    w.n_phases += 1


cdef inline void _row_block_phases(Work* w, const Grid* g, Step whole, Step reduce, Step merge,
                                   Step pass_) noexcept nogil:
    """A row-block operation's phases: `reduce` per (row chunk, column
    block), `merge` per column block, `pass_` by pages; or, where the grid
    says whole blocks, `whole`, which runs all three for a column block."""
    if g.whole_blocks:
        _phase(w, whole, g.n_col_blocks, True)
    else:
        _phase(w, reduce, g.n_tasks, True)
        _phase(w, merge, g.n_col_blocks, False)
        _phase(w, pass_, g.n_page_tasks, False)


cdef void _step(const Call* c, const Work* w, Step step, Py_ssize_t t, double* mine,
                const in_t* in_type, out_t* out_type) noexcept nogil:
    """Task t of a phase (in_type, out_type: NULL, naming the dtypes)."""
    cdef const Grid* g = c.grid
    cdef const Planes* p = c.planes
    cdef const in_t* x = <const in_t*>c.x
    cdef const in_t* dy = <const in_t*>c.dy
    cdef in_t* cache = <in_t*>c.cache
    cdef out_t* y = <out_t*>c.y
    cdef out_t* staging = NULL
    if w.rows > 0:
        staging = <out_t*>(mine + (w.rows - 1) * w.col_block)
    if step == STEP_TRAIN_STRIP:
        _train_strip(g, t, x, cache, y, <const TrainArgs*>c.args, mine)
    elif step == STEP_STATS_BLOCK:
        _train_block_stats(g, t, x, cache, w.shifts, w.part, mine)
    elif step == STEP_TRAIN_COEF:
        _train_coefficients(g, t, w.shifts, <const TrainArgs*>c.args, w.part, mine)
    elif step == STEP_AFFINE_PAGES:
        _pass_pages(g, t, x, dy, y, w.coef, staging, <const AffinePass*>NULL)
    elif step == STEP_TRAIN_WHOLE_BLOCK:
        _train_whole_block(g, t, x, cache, y, w, <const TrainArgs*>c.args, staging, mine)
    elif step == STEP_EVAL:
        _eval_task(g, t, x, y, c.vec[0], c.vec[1], c.vec[2], c.vec[3], c.eps, mine)
    elif step == STEP_BACKWARD_STRIP:
        _backward_strip(g, t, x, dy, y, <const GradArgs*>c.args, mine)
    elif step == STEP_GRAD_SUMS_BLOCK:
        _backward_block_sums(g, t, x, dy, w.coef[0], w.part)
    elif step == STEP_BACKWARD_COEF:
        _backward_block_coefficients(g, t, <const GradArgs*>c.args, w.part, w.totals)
    elif step == STEP_BACKWARD_WHOLE_BLOCK:
        _backward_whole_block(g, t, x, dy, y, w, <const GradArgs*>c.args, staging)
    elif step == STEP_GRAD_INPUT_PAGES:
        _pass_pages(g, t, x, dy, y, w.coef, staging, <const GradInputPass*>NULL)
    elif step == STEP_EVAL_BACKWARD:
        _eval_backward_task(g, t, x, dy, y, w, staging)
    elif step == STEP_PLANE_MOMENTS:
        _plane_sums_task(p, t, x, dy, w.coef[0], w.part, <const StatSums*>NULL)
    elif step == STEP_PLANE_GRAD_SUMS:
        _plane_sums_task(p, t, x, dy, w.coef[0], w.part, <const GradSums*>NULL)
    elif step == STEP_PLANE_COPY:
        _plane_copy_task(p, t, x, cache)
    elif step == STEP_PLANE_AFFINE:
        _plane_pass_task(p, t, x, dy, cache, y, w.coef, <const AffinePass*>NULL)
    elif step == STEP_PLANE_GRAD_INPUT:
        _plane_pass_task(p, t, x, dy, NULL, y, w.coef, <const GradInputPass*>NULL)
    elif step == STEP_PLANE_SCALE:
        _plane_pass_task(p, t, x, dy, NULL, y, w.coef, <const ScalePass*>NULL)
    elif step == STEP_PLANE_TRAIN_BLOCK:
        _plane_train_block(p, t, x, cache, y, <const TrainArgs*>c.args, w.part, w.totals)
    elif step == STEP_PLANE_BACKWARD_BLOCK:
        _plane_backward_block(p, t, x, dy, y, <const GradArgs*>c.args, w.part, w.totals)


cdef int _drive(const Call* c, const Work* w, const in_t* in_type,
                out_t* out_type) noexcept nogil:
    """Run w's phases (see above).  Non-zero: no memory for the scratch."""
    cdef Py_ssize_t t, per_thread = w.rows * w.col_block
    cdef int k = 0
    cdef double local[LOCAL_SCRATCH + 8]
    cdef void* raw = <void*>local
    cdef double* scratch = NULL
    cdef double* mine = NULL
    if per_thread > 0:
        # small calls' scratch on the stack (malloc and free cost a small
        # call 50 ns); any of it on a 64-byte line, so that vector loads of
        # a row of coefficients never straddle two (where malloc's 16-byte
        # alignment put it mid-line, 256 x 1024 float32 element passes ran
        # 5-15 % slower)
        if w.n_threads * per_thread > LOCAL_SCRATCH:
            raw = malloc((w.n_threads * per_thread + 8) * sizeof(double))
            if raw == NULL:
                return -1
        scratch = <double*>((<uintptr_t>raw + 63) & ~(<uintptr_t>63))
    if w.n_threads == 1:
        for k in range(w.n_phases):
            for t in range(w.phase[k].n_tasks):
                _step(c, w, w.phase[k].step, t, scratch, in_type, out_type)
    else:
        with parallel(num_threads=w.n_threads):
            if scratch != NULL:
                mine = scratch + threadid() * per_thread
            for k in range(w.n_phases):
                if k > 0:
                    bnfast_barrier()     # phase k reads what phase k - 1 wrote
                if w.phase[k].dynamic:
                    for t in prange(w.phase[k].n_tasks, schedule="dynamic"):
                        _step(c, w, w.phase[k].step, t, mine, in_type, out_type)
                else:
                    for t in prange(w.phase[k].n_tasks, schedule="static"):
                        _step(c, w, w.phase[k].step, t, mine, in_type, out_type)
            bnfast_fence()
    if raw != <void*>local:
        free(raw)
    return 0


# ---------------------------------------------------------------------------
# Whole operations: each is its tasks (below) and a description of its
# phases, which the parallel driver (_drive, after the per-channel kernels)
# runs; buffers shared by the tasks, and steps before and after, are the
# operation's own.


cdef void _train_strip(const Grid* g, Py_ssize_t t, const in_t* x, in_t* cache, out_t* y,
                       const TrainArgs* a, double* mine) noexcept nogil:
    """Strip task: statistics, coefficients and output of whole columns.
    mine: 4 rows (shift, then sums; then beta, scale, temp, staging)."""
    cdef Task task = _task(g, t)
    cdef Py_ssize_t cb = g.col_block
    cdef const double* k[4]
    _shift_of(x, g.n_cols, g.n_rows, task.c0, task.w, mine)
    _stats_rows(x, cache, g.stream_cache, g.n_rows, g.n_cols, g.fold, task.r0, task.r1, task.c0,
                task.w, g.block_rows, mine, a.mean + task.c0, a.var + task.c0, mine + cb,
                mine + 2 * cb)
    _finish_stats(a, g.n_rows, task.c0, task.w, mine, mine + cb, mine, mine + 2 * cb)
    k[0], k[1], k[2], k[3] = a.mean + task.c0, mine + cb, mine, NULL
    _pass_rows(x, <const in_t*>NULL, y, g.stream, g.n_cols, g.fold, task.r0, task.r1, task.c0,
               task.w, k, <out_t*>(mine + 3 * cb), <const AffinePass*>NULL)


cdef void _block_shifts(const Grid* g, const in_t* x, double* shifts) noexcept nogil:
    """Every feature's shift (see _shift_of), computed once before the
    row-block statistics tasks where several row chunks share each column
    block: each task computing it again read 8 more rows (perf: 13 % of a
    cached 256 x 1024 float32 statistics pass).  With one chunk, each column
    block's only task computes its own, in parallel."""
    if g.n_chunks > 1:
        _shift_of(x, g.n_cols, g.n_rows, 0, g.n_cols, shifts)


cdef void _train_block_stats(const Grid* g, Py_ssize_t t, const in_t* x, in_t* cache,
                             double* shifts, double* part, double* mine) noexcept nogil:
    """Block task: per-chunk mean (relative to the shift) and M2 of a column
    block (and cache = x).  mine: 2 rows."""
    cdef Task task = _task(g, t)
    cdef Py_ssize_t cb = g.col_block, d = g.n_cols
    if g.n_chunks == 1:
        _shift_of(x, d, g.n_rows, task.c0, task.w, shifts + task.c0)
    _stats_rows(x, cache, g.stream_cache, g.n_rows, d, g.fold, task.r0, task.r1, task.c0, task.w,
                g.block_rows, shifts + task.c0, part + task.k * d + task.c0,
                part + (g.n_chunks + task.k) * d + task.c0, mine, mine + cb)


cdef void _train_coefficients(const Grid* g, Py_ssize_t t, const double* shifts,
                              const TrainArgs* a, double* part, double* mine) noexcept nogil:
    """Column block t: its per-chunk statistics merged, then mean, var,
    invstd, running statistics, and scale and shift into part's rows 0 and 1
    (whose partials of these columns the merge has consumed).  mine: 1 row."""
    cdef Py_ssize_t c0 = t * g.col_block, d = g.n_cols
    cdef Py_ssize_t w = g.col_block if c0 + g.col_block <= d else d - c0
    _merge_chunk_columns(g, part, part + g.n_chunks * d, a.mean, a.var, c0, c0 + w)
    _finish_stats(a, g.n_rows, c0, w, shifts + c0, part + c0, part + d + c0, mine)


cdef void _pass_block(const Grid* g, Py_ssize_t b, const in_t* x, const in_t* dy, out_t* y,
                      const double* const* k, out_t* staging, const pass_t* kind) noexcept nogil:
    """The pass (pass_t) over every row of column block b (k: its
    coefficients from column 0): y streamed as the strips' is, dx as the
    pages' (through the staging row, wide rows' dx lost 16 %)."""
    cdef Task task = _task(g, b)      # task b: row chunk 0, column block b
    cdef const double* kc[4]
    cdef int i
    for i in range(4):
        kc[i] = k[i] + task.c0 if k[i] != NULL else NULL
    _pass_rows(x, dy, y, g.stream if pass_t is AffinePass else g.stream_pages, g.n_cols, g.fold,
               0, g.n_rows, task.c0, task.w, kc, staging, kind)


cdef void _train_whole_block(const Grid* g, Py_ssize_t b, const in_t* x, in_t* cache, out_t* y,
                             const Work* w, const TrainArgs* a, out_t* staging,
                             double* mine) noexcept nogil:
    """Column block b of the row-block training forward in one task
    (Grid.whole_blocks): its chunks' statistics, their merge, then its
    output, which reads the block again from the cache."""
    cdef Py_ssize_t k
    for k in range(g.n_chunks):
        _train_block_stats(g, k * g.n_col_blocks + b, x, cache, w.shifts, w.part, mine)
    _train_coefficients(g, b, w.shifts, a, w.part, mine)
    _pass_block(g, b, x, <const in_t*>NULL, y, w.coef, staging, <const AffinePass*>NULL)


cdef int _train_forward(const Call* c, const in_t* x, out_t* y) noexcept nogil:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's own
    statistics; also mean, var, invstd, running statistics, cache = x."""
    cdef const Grid* g = c.grid
    cdef Py_ssize_t d = g.n_cols
    cdef Work w
    cdef int status
    if g.fused:
        w = _work(g.n_threads, g.col_block, 4)
        _phase(&w, STEP_TRAIN_STRIP, g.n_tasks, True)
        return _drive(c, &w, x, y)
    # Row blocks: statistics; the merge and coefficients per column block;
    # output.  part rows: per-chunk means and M2s; after the coefficients,
    # its first two hold scale and shift; its last row holds the shifts.
    w = _work(g.n_threads, g.col_block, 3)
    if _new_part(&w, (2 * (g.n_chunks + 1) + 1) * d):
        return -1
    w.shifts = w.part + 2 * (g.n_chunks + 1) * d
    _block_shifts(g, x, w.shifts)
    w.coef[0], w.coef[1], w.coef[2] = (<const TrainArgs*>c.args).mean, w.part, w.part + d
    _row_block_phases(&w, g, STEP_TRAIN_WHOLE_BLOCK, STEP_STATS_BLOCK, STEP_TRAIN_COEF,
                      STEP_AFFINE_PAGES)
    status = _drive(c, &w, x, y)
    free(w.raw)
    return status


cdef void _eval_task(const Grid* g, Py_ssize_t t, const in_t* x, out_t* y, const Vec* gamma,
                     const Vec* beta, const Vec* rm, const Vec* rv, double eps,
                     double* mine) noexcept nogil:
    """Element-pass task t of the eval forward: per column block, the
    coefficients center, scale = gamma / sqrt(rv + eps) and shift (computed
    into L1 scratch, used for all the task's rows), then the rows.
    mine: 4 rows."""
    cdef Py_ssize_t r0, r1, c0, c1, w, cb = g.col_block
    cdef const double* k[4]
    k[0], k[1], k[2], k[3] = mine, mine + cb, mine + 2 * cb, NULL
    _page_bounds(g, t, &r0, &r1, &c0, &c1)
    while c0 < c1:
        w = cb if c0 + cb <= c1 else c1 - c0
        _eval_coefficients(gamma, beta, rm, rv, eps, c0, w, mine, mine + cb, mine + 2 * cb)
        _pass_rows(x, <const in_t*>NULL, y, g.stream_pages, g.n_cols, g.fold, r0, r1, c0, w, k,
                   <out_t*>(mine + 3 * cb), <const AffinePass*>NULL)
        c0 += cb


cdef int _eval_forward(const Call* c, const in_t* x, out_t* y) noexcept nogil:
    """y = gamma * (x - rm) / sqrt(rv + eps) + beta, one pass."""
    cdef Work w = _work(c.grid.n_threads, c.grid.col_block, 4)
    _phase(&w, STEP_EVAL, c.grid.n_page_tasks, False)
    return _drive(c, &w, x, y)


cdef void _backward_strip(const Grid* g, Py_ssize_t t, const in_t* x, const in_t* dy,
                          out_t* dx, const GradArgs* a, double* mine) noexcept nogil:
    """Strip task: sums, coefficients and dx of whole columns (pass 2 from L2)."""
    cdef Task task = _task(g, t)
    cdef Py_ssize_t cb = g.col_block
    cdef const double* k[4]
    _grad_sums_rows(x, dy, g.n_cols, g.fold, task.r0, task.r1, task.c0, task.w, a.mean + task.c0,
                    mine, mine + cb)
    _backward_coefficients(g.n_rows, task.c0, task.w, a.invstd + task.c0, a.gamma, mine,
                           mine + cb, mine + 2 * cb, mine + 3 * cb, a.dgamma, a.dbeta)
    k[0], k[1], k[2], k[3] = a.mean + task.c0, mine, mine + 2 * cb, mine + 3 * cb
    _pass_rows(x, dy, dx, g.stream, g.n_cols, g.fold, task.r0, task.r1, task.c0, task.w, k,
               <out_t*>(mine + 4 * cb), <const GradInputPass*>NULL)


cdef void _backward_block_sums(const Grid* g, Py_ssize_t t, const in_t* x, const in_t* dy,
                               const double* mean, double* part) noexcept nogil:
    """Block task: per-chunk sum(dy) and sum(dy * (x - mean)) of a column block."""
    cdef Task task = _task(g, t)
    cdef Py_ssize_t d = g.n_cols
    _grad_sums_rows(x, dy, d, g.fold, task.r0, task.r1, task.c0, task.w, mean + task.c0,
                    part + task.k * d + task.c0, part + (g.n_chunks + task.k) * d + task.c0)


cdef void _sum_chunk_columns(Py_ssize_t n_chunks, Py_ssize_t d, const double* part, double* s1,
                             double* s2, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """s1, s2 (at column 0): the two per-chunk sums of part (rows 0..K-1 and
    K..2K-1 of d columns, K = n_chunks) of columns c0..c1, in chunk order."""
    cdef Py_ssize_t k, j
    for j in range(c0, c1):
        s1[j] = part[j]
        s2[j] = part[n_chunks * d + j]
    for k in range(1, n_chunks):
        for j in range(c0, c1):
            s1[j] += part[k * d + j]
            s2[j] += part[(n_chunks + k) * d + j]


cdef void _backward_block_coefficients(const Grid* g, Py_ssize_t t, const GradArgs* a,
                                       double* part, double* totals) noexcept nogil:
    """Column block t of the row-block backward: its per-chunk sums added,
    then dgamma, dbeta and the coefficients (k_xc, k into part's rows 0 and
    1, whose partials of these columns are consumed by then)."""
    cdef Py_ssize_t d = g.n_cols, c0 = t * g.col_block
    cdef Py_ssize_t w = g.col_block if c0 + g.col_block <= d else d - c0
    _sum_chunk_columns(g.n_chunks, d, part, totals, totals + d, c0, c0 + w)
    _backward_coefficients(g.n_rows, c0, w, a.invstd + c0, a.gamma, totals + c0,
                           totals + d + c0, part + c0, part + d + c0, a.dgamma, a.dbeta)


cdef void _backward_whole_block(const Grid* g, Py_ssize_t b, const in_t* x, const in_t* dy,
                                out_t* dx, const Work* w, const GradArgs* a,
                                out_t* staging) noexcept nogil:
    """Column block b of the row-block training backward in one task
    (Grid.whole_blocks): its chunks' sums, added, then its dx."""
    cdef Py_ssize_t k
    for k in range(g.n_chunks):
        _backward_block_sums(g, k * g.n_col_blocks + b, x, dy, a.mean, w.part)
    _backward_block_coefficients(g, b, a, w.part, w.totals)
    _pass_block(g, b, x, dy, dx, w.coef, staging, <const GradInputPass*>NULL)


cdef int _train_backward(const Call* c, const in_t* x, out_t* dx) noexcept nogil:
    """dx = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)); two passes."""
    cdef const Grid* g = c.grid
    cdef const GradArgs* a = <const GradArgs*>c.args
    cdef Py_ssize_t d = g.n_cols
    cdef Work w
    cdef int status
    if g.fused:
        w = _work(g.n_threads, g.col_block, 5)
        _phase(&w, STEP_BACKWARD_STRIP, g.n_tasks, True)
        return _drive(c, &w, x, dx)
    # Row blocks: per-chunk sums, merged in chunk order, then dx.  part rows:
    # 0..K-1 sum_dy per chunk, K..2K-1 sum_dy_xc per chunk, 2K and 2K+1 the
    # totals; once merged, rows 0 and 1 hold the coefficients k_xc and k.
    w = _work(g.n_threads, g.col_block, 1)
    if _new_part(&w, 2 * (g.n_chunks + 1) * d):
        return -1
    w.totals = w.part + 2 * g.n_chunks * d
    w.coef[0], w.coef[1], w.coef[2], w.coef[3] = a.mean, w.totals, w.part, w.part + d
    _row_block_phases(&w, g, STEP_BACKWARD_WHOLE_BLOCK, STEP_GRAD_SUMS_BLOCK, STEP_BACKWARD_COEF,
                      STEP_GRAD_INPUT_PAGES)
    status = _drive(c, &w, x, dx)
    free(w.raw)
    return status




cdef void _eval_backward_task(const Grid* g, Py_ssize_t t, const in_t* x, const in_t* dy,
                              out_t* dx, const Work* w, out_t* staging) noexcept nogil:
    """dx of a (row chunk, column block) and its per-chunk sums (w.coef: rm
    and dx's scale, per feature)."""
    cdef Task task = _task(g, t)
    cdef Py_ssize_t d = g.n_cols
    _eval_grad_rows(x, dy, dx, g.stream, d, g.fold, task.r0, task.r1, task.c0, task.w,
                    w.coef[0] + task.c0, w.coef[1] + task.c0, w.part + task.k * d + task.c0,
                    w.part + (g.n_chunks + task.k) * d + task.c0, staging)


cdef int _eval_backward(const Call* c, const in_t* x, out_t* dx) noexcept nogil:
    """Gradient of the eval-mode function: statistics are constants. One pass."""
    cdef const Grid* g = c.grid
    cdef Py_ssize_t d = g.n_cols
    cdef double* rows
    cdef int status
    cdef Work w = _work(g.n_threads, g.col_block, 1)
    # part rows: 0..K-1 sum_dy per chunk, K..2K-1 sum_dy_xc per chunk, then
    # the set-up's rm, invstd and dx_scale and the two sums' totals
    if _new_part(&w, (2 * g.n_chunks + 5) * d):
        return -1
    rows = w.part + 2 * g.n_chunks * d
    _eval_grad_coefficients(<const EvalArgs*>c.args, d, rows, rows + d, rows + 2 * d)
    w.coef[0], w.coef[1] = rows, rows + 2 * d
    _phase(&w, STEP_EVAL_BACKWARD, g.n_tasks, False)
    status = _drive(c, &w, x, dx)
    if status == 0:
        _sum_chunk_columns(g.n_chunks, d, w.part, rows + 3 * d, rows + 4 * d, 0, d)
        _eval_grad_results(c, d, rows + d, rows + 3 * d, rows + 4 * d)
    free(w.raw)
    return status


include "_planes.pxi"


# ---------------------------------------------------------------------------
# Split phases: the training passes with the cross-process reductions cut
# out (bnfast.functional's split-phase functions, SyncBatchNormalization).
# Each reuses the layer's tasks on the same grid, so one shard's statistics
# are the ones the layer computes for that batch; with a Planes (p not NULL)
# they run per channel on an NCHW batch instead.

cdef int _moments(const Call* c, const in_t* x, double* mean, double* m2) noexcept nogil:
    """Per-feature (per-channel) mean and M2 (sum of squared deviations);
    cache = x unless NULL."""
    cdef const Grid* g = c.grid
    cdef Py_ssize_t d = g.n_cols, t, j
    cdef double* shifts
    cdef Work w
    if c.planes != NULL:
        shifts = <double*>malloc(c.planes.c * sizeof(double))
        if shifts == NULL or _planes_moments(c, x, shifts, mean, m2) != 0:
            free(shifts)
            return -1
        for t in range(c.planes.c):
            mean[t] = shifts[t] + mean[t]
        free(shifts)
        if c.cache != NULL:
            _planes_pass(c, STEP_PLANE_COPY, x, <double*>NULL, NULL, NULL, NULL, NULL)
        return 0
    # part rows: per-chunk means and M2s, then the shifts
    w = _work(g.n_threads, g.col_block, 2)
    if _new_part(&w, (2 * g.n_chunks + 1) * d):
        return -1
    w.shifts = w.part + 2 * g.n_chunks * d
    _block_shifts(g, x, w.shifts)
    _phase(&w, STEP_STATS_BLOCK, g.n_tasks, True)
    if _drive(c, &w, x, <double*>NULL) != 0:
        free(w.raw)
        return -1
    _merge_chunk_columns(g, w.part, w.part + g.n_chunks * d, mean, m2, 0, d)
    for j in range(d):      # the mean relative to the shift -> the mean
        mean[j] = w.shifts[j] + mean[j]
    free(w.raw)
    return 0


cdef int _affine(const Call* c, const in_t* x, out_t* y) noexcept nogil:
    """y = (x - coef[0]) * coef[1] + coef[2] per feature or channel (float64
    coefficients)."""
    cdef Work w
    if c.planes != NULL:
        return _planes_pass(c, STEP_PLANE_AFFINE, x, y, c.coef[0], c.coef[1], c.coef[2], NULL)
    w = _work(c.grid.n_threads, c.grid.col_block, 1)
    w.coef[0], w.coef[1], w.coef[2] = c.coef[0], c.coef[1], c.coef[2]
    _phase(&w, STEP_AFFINE_PAGES, c.grid.n_page_tasks, False)
    return _drive(c, &w, x, y)


cdef int _grad_sums(const Call* c, const in_t* x, double* sum_dy,
                    double* sum_dy_xc) noexcept nogil:
    """Per-feature (per-channel) sum(dy) and sum(dy * (x - coef[0])), chunks
    added in order."""
    cdef const Grid* g = c.grid
    cdef Py_ssize_t d = g.n_cols
    cdef Work w
    if c.planes != NULL:
        return _planes_sums(c, x, <const in_t*>c.dy, c.coef[0], sum_dy, sum_dy_xc)
    w = _work(g.n_threads, g.col_block, 0)
    if _new_part(&w, 2 * g.n_chunks * d):
        return -1
    w.coef[0] = c.coef[0]
    _phase(&w, STEP_GRAD_SUMS_BLOCK, g.n_tasks, True)
    _drive(c, &w, x, <double*>NULL)
    _sum_chunk_columns(g.n_chunks, d, w.part, sum_dy, sum_dy_xc, 0, d)
    free(w.raw)
    return 0


cdef int _grad_input(const Call* c, const in_t* x, out_t* dx) noexcept nogil:
    """dx = k * ((dy - mean_dy) - k_xc * (x - center)) per feature or channel,
    coef[0..3] = center, mean_dy, k_xc, k."""
    cdef Work w
    if c.planes != NULL:
        return _planes_pass(c, STEP_PLANE_GRAD_INPUT, x, dx, c.coef[0], c.coef[1], c.coef[2],
                            c.coef[3])
    w = _work(c.grid.n_threads, c.grid.col_block, 1)
    w.coef[0], w.coef[1], w.coef[2], w.coef[3] = c.coef[0], c.coef[1], c.coef[2], c.coef[3]
    _phase(&w, STEP_GRAD_INPUT_PAGES, c.grid.n_page_tasks, False)
    return _drive(c, &w, x, dx)


# ---------------------------------------------------------------------------
# The dtype dispatch, written once.  An entry point describes its operation
# in a Call (untyped data pointers and the operation's arguments);
# _dispatch picks the fused instantiation for the (input, output) dtype pair
# in the one place that does, and _run casts the pointers and calls the
# operation's driver: its rows version, or its planes version when the Call
# carries a Planes (an NCHW batch).  A new operation adds an Op, its Call
# fields if it needs new ones, and one case in _run.

cdef int _run(const Call* c, const in_t* in_type, out_t* out_type) noexcept nogil:
    """c's operation on input in_t and output out_t (in_type and out_type
    only name the pair: NULL)."""
    cdef const in_t* x = <const in_t*>c.x
    cdef out_t* y = <out_t*>c.y
    if c.op == OP_TRAIN_FORWARD:
        if c.planes != NULL:
            return _planes_train_forward(c, x, y)
        return _train_forward(c, x, y)
    if c.op == OP_EVAL_FORWARD:
        if c.planes != NULL:
            return _planes_eval_forward(c, x, y)
        return _eval_forward(c, x, y)
    if c.op == OP_TRAIN_BACKWARD:
        if c.planes != NULL:
            return _planes_train_backward(c, x, y)
        return _train_backward(c, x, y)
    if c.op == OP_EVAL_BACKWARD:
        if c.planes != NULL:
            return _planes_eval_backward(c, x, y)
        return _eval_backward(c, x, y)
    if c.op == OP_MOMENTS:
        return _moments(c, x, c.sums[0], c.sums[1])
    if c.op == OP_AFFINE:
        return _affine(c, x, y)
    if c.op == OP_GRAD_SUMS:
        return _grad_sums(c, x, c.sums[0], c.sums[1])
    if c.op == OP_GRAD_INPUT:
        return _grad_input(c, x, y)
    return -1


cdef int _dispatch(const Call* c, bint in64, bint out64) noexcept nogil:
    """Run c on float64 (in64) or float32 input, writing float64 (out64) or
    float32 output.  Non-zero: the driver could not allocate work space."""
    if in64:
        if out64:
            return _run[double, double](c, NULL, NULL)
        return _run[double, float](c, NULL, NULL)
    if out64:
        return _run[float, double](c, NULL, NULL)
    return _run[float, float](c, NULL, NULL)



# ---------------------------------------------------------------------------
# What the planner takes from this module (bnfast/_kernels.pyx, _use_loops):
# _dispatch, and the layouts it was built with, which must match the
# planner's own (both come from _plan.pxd; a stale build would not).

dispatch = PyCapsule_New(<void*>_dispatch, _dispatch_name(), NULL)
LAYOUT = _struct_sizes()


def openmp_enabled():
    """Whether these loops were built with OpenMP."""
    return bool(BNFAST_OPENMP)


def build_flags():
    """Compiler and linker flags these loops were built with."""
    return BNFAST_BUILD_FLAGS.decode()
