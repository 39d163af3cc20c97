# Typed loops for batch normalization over the C-contiguous (N, D) view of a
# batch, plus thin typed entry points.  Validation, dtype resolution and
# layout decisions live in Python (bnfast/_checks.py); the entry points here
# only re-check what memory safety needs (sizes, dtypes, contiguity) so that
# a wrong call raises instead of reading out of bounds.
#
# Directives (boundscheck, wraparound, cdivision, ...) are set once in setup.py.
#
# Layout of the work.  Every loop walks rows and keeps one float64 accumulator
# per feature, so memory is read in address order and never column-strided.
# The (N, D) array is cut into a grid that depends only on (N, D, itemsize),
# never on the thread count:
#   - column blocks of at most COL_BLOCK features,
#   - row blocks of `block_rows` rows, small enough that a tile of
#     block_rows x column_block stays in L2 (statistics read it twice there),
#   - row chunks: consecutive row blocks merged in order inside one task.
# A task is (row chunk, column block).  Threads take tasks in any order, but
# each task's arithmetic is fixed and partial results are merged in chunk
# order, so results are bitwise identical for any number of threads.

from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
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
    /* Widest instruction set this CPU (and OS) runs: 2 = AVX-512 (F, BW, CD,
       DQ, VL), 1 = AVX2 + FMA + BMI1/2, 0 = the x86-64 baseline or another
       architecture.  Matches the flags setup.py gives each kernel variant. */
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    static int bnfast_cpu_level(void) {
        __builtin_cpu_init();
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                   && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
        int avx512 = avx2 && __builtin_cpu_supports("avx512f")
                     && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd")
                     && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
        return avx512 ? 2 : (avx2 ? 1 : 0);
    }
    #else
    static int bnfast_cpu_level(void) { return 0; }
    #endif
    """
    const int BNFAST_OPENMP
    const char* BNFAST_BUILD_FLAGS
    int omp_get_max_threads() noexcept nogil
    int bnfast_cpu_level() noexcept nogil

ctypedef fused in_t:
    float
    double

ctypedef fused out_t:
    float
    double

cdef enum:
    # Features per column block: wide enough for long unit-stride runs, narrow
    # enough that the per-task accumulators (3 x COL_BLOCK doubles) stay in L1.
    COL_BLOCK = 1024
    # Bytes of input per tile: the statistics read a tile twice, the second
    # time from L2 (1 MiB per core on current x86; more elsewhere).
    TILE_BYTES = 131072
    # Aim for at least this many tasks so that up to ~16 threads stay busy.
    TARGET_TASKS = 64
    # Below this many bytes of input one thread is faster than waking a team.
    PARALLEL_MIN_BYTES = 262144

cdef int _num_threads = 1


cdef struct Grid:
    Py_ssize_t n_rows
    Py_ssize_t n_cols
    Py_ssize_t col_block
    Py_ssize_t n_col_blocks
    Py_ssize_t block_rows
    Py_ssize_t chunk_rows
    Py_ssize_t n_chunks
    Py_ssize_t n_tasks
    int n_threads


cdef struct Vec:
    # A per-feature vector of float32 or float64 values; stride 0 broadcasts
    # one value to every feature.  Read only in O(D) set-up loops, so the
    # branch on the dtype costs nothing measurable.
    const void* data
    Py_ssize_t stride
    bint is_f64


cdef inline double _at(const Vec* v, Py_ssize_t j) noexcept nogil:
    if v.is_f64:
        return (<const double*>v.data)[j * v.stride]
    return (<const float*>v.data)[j * v.stride]


cdef inline void _put(void* data, bint is_f64, Py_ssize_t j, double value) noexcept nogil:
    if is_f64:
        (<double*>data)[j] = value
    else:
        (<float*>data)[j] = <float>value


cdef inline Py_ssize_t _ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef Grid _make_grid(Py_ssize_t n, Py_ssize_t d, Py_ssize_t itemsize) noexcept nogil:
    cdef Grid g
    cdef Py_ssize_t n_row_blocks, wanted_chunks
    g.n_rows = n
    g.n_cols = d
    g.col_block = d if d < COL_BLOCK else COL_BLOCK
    g.n_col_blocks = _ceil_div(d, g.col_block)
    g.block_rows = TILE_BYTES // (g.col_block * itemsize)
    if g.block_rows < 1:
        g.block_rows = 1
    n_row_blocks = _ceil_div(n, g.block_rows)
    wanted_chunks = _ceil_div(TARGET_TASKS, g.n_col_blocks)
    if wanted_chunks > n_row_blocks:
        wanted_chunks = n_row_blocks
    g.chunk_rows = _ceil_div(n_row_blocks, wanted_chunks) * g.block_rows
    g.n_chunks = _ceil_div(n, g.chunk_rows)
    g.n_tasks = g.n_chunks * g.n_col_blocks
    g.n_threads = 1
    if n * d * itemsize >= PARALLEL_MIN_BYTES and _num_threads > 1:
        g.n_threads = _num_threads if _num_threads < g.n_tasks else <int>g.n_tasks
    return g


# ---------------------------------------------------------------------------
# Statistics: corrected two-pass inside each tile, Chan's merge across tiles.
# A constant feature gives its value as the mean exactly and M2 == 0 exactly:
# the correction term sum(x - m0) / n recovers the rounding of m0.

cdef void _stats_task(const in_t* x, in_t* copy_to, Py_ssize_t d,
                      Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w,
                      Py_ssize_t block_rows, double* mean_acc, double* m2_acc,
                      double* s, double* sd, double* sd2) noexcept nogil:
    # Rows are taken four at a time so each accumulator is loaded and stored
    # once per four rows; the (fixed) pairing also shortens rounding chains.
    cdef Py_ssize_t b0 = r0, b1, i, j
    cdef double nb, na = 0.0, n, wa, wb, e0, e1, e2, e3, mb, m2b, delta
    cdef const in_t* a
    while b0 < r1:
        b1 = b0 + block_rows
        if b1 > r1:
            b1 = r1
        nb = <double>(b1 - b0)
        for j in range(w):
            s[j] = 0.0
        i = b0
        while i + 4 <= b1:
            a = x + i * d + c0
            for j in range(w):
                s[j] += (<double>a[j] + a[d + j]) + (<double>a[2 * d + j] + a[3 * d + j])
            i += 4
        while i < b1:
            a = x + i * d + c0
            for j in range(w):
                s[j] += a[j]
            i += 1
        if copy_to != NULL:
            for i in range(b0, b1):
                memcpy(copy_to + i * d + c0, x + i * d + c0, w * sizeof(in_t))
        for j in range(w):
            s[j] = s[j] / nb
            sd[j] = 0.0
            sd2[j] = 0.0
        i = b0
        while i + 4 <= b1:
            a = x + i * d + c0
            for j in range(w):
                e0 = a[j] - s[j]
                e1 = a[d + j] - s[j]
                e2 = a[2 * d + j] - s[j]
                e3 = a[3 * d + j] - s[j]
                sd[j] += (e0 + e1) + (e2 + e3)
                sd2[j] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
            i += 4
        while i < b1:
            a = x + i * d + c0
            for j in range(w):
                e0 = a[j] - s[j]
                sd[j] += e0
                sd2[j] += e0 * e0
            i += 1
        if na == 0.0:
            for j in range(w):
                mean_acc[j] = s[j] + sd[j] / nb
                m2b = sd2[j] - sd[j] * sd[j] / nb
                m2_acc[j] = 0.0 if m2b < 0.0 else m2b
        else:
            n = na + nb
            wa = nb / n
            wb = na * nb / n
            for j in range(w):
                mb = s[j] + sd[j] / nb
                m2b = sd2[j] - sd[j] * sd[j] / nb
                if m2b < 0.0:
                    m2b = 0.0
                delta = mb - mean_acc[j]
                mean_acc[j] += delta * wa
                m2_acc[j] += m2b + delta * delta * wb
        na += nb
        b0 = b1


cdef void _merge_chunks(const Grid* g, const double* part_mean, const double* part_m2,
                        double* mean, double* m2) noexcept nogil:
    """Chan's merge of the per-chunk (mean, M2), always in chunk order."""
    cdef Py_ssize_t k, j, d = g.n_cols
    cdef double na, nb, n, wa, wb, delta
    for j in range(d):
        mean[j] = part_mean[j]
        m2[j] = part_m2[j]
    na = <double>(g.chunk_rows if g.chunk_rows < g.n_rows else g.n_rows)
    for k in range(1, g.n_chunks):
        nb = <double>(g.n_rows - k * g.chunk_rows)
        if nb > g.chunk_rows:
            nb = <double>g.chunk_rows
        n = na + nb
        wa = nb / n
        wb = na * nb / n
        for j in range(d):
            delta = part_mean[k * d + j] - mean[j]
            mean[j] += delta * wa
            m2[j] += part_m2[k * d + j] + delta * delta * wb
        na = n


cdef inline void _task_bounds(const Grid* g, Py_ssize_t t, Py_ssize_t* r0, Py_ssize_t* r1,
                              Py_ssize_t* c0, Py_ssize_t* w) noexcept nogil:
    cdef Py_ssize_t k = t // g.n_col_blocks
    cdef Py_ssize_t c = t - k * g.n_col_blocks
    r0[0] = k * g.chunk_rows
    r1[0] = r0[0] + g.chunk_rows
    if r1[0] > g.n_rows:
        r1[0] = g.n_rows
    c0[0] = c * g.col_block
    w[0] = g.col_block
    if c0[0] + w[0] > g.n_cols:
        w[0] = g.n_cols - c0[0]


cdef int _batch_stats(const Grid* g, const in_t* x, in_t* copy_to,
                      double* mean, double* m2) noexcept nogil:
    """Per-feature mean and M2 of x (optionally copying x to copy_to)."""
    cdef Py_ssize_t d = g.n_cols, t, r0, r1, c0, w, k
    cdef double* part_mean
    cdef double* part_m2
    cdef double* scratch
    cdef double* mine = NULL
    cdef Py_ssize_t per_thread = 3 * g.col_block
    scratch = <double*>malloc(g.n_threads * per_thread * sizeof(double))
    if scratch == NULL:
        return -1
    if g.n_chunks == 1:
        part_mean = mean
        part_m2 = m2
    else:
        part_mean = <double*>malloc(2 * g.n_chunks * d * sizeof(double))
        if part_mean == NULL:
            free(scratch)
            return -1
        part_m2 = part_mean + g.n_chunks * d
    if g.n_threads == 1:
        for t in range(g.n_tasks):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            k = t // g.n_col_blocks
            _stats_task(x, copy_to, d, r0, r1, c0, w, g.block_rows,
                        part_mean + k * d + c0, part_m2 + k * d + c0,
                        scratch, scratch + g.col_block, scratch + 2 * g.col_block)
    else:
        with parallel(num_threads=g.n_threads):
            mine = scratch + threadid() * per_thread
            for t in prange(g.n_tasks, schedule="dynamic"):
                _task_bounds(g, t, &r0, &r1, &c0, &w)
                k = t // g.n_col_blocks
                _stats_task(x, copy_to, d, r0, r1, c0, w, g.block_rows,
                            part_mean + k * d + c0, part_m2 + k * d + c0,
                            mine, mine + g.col_block, mine + 2 * g.col_block)
    free(scratch)
    if g.n_chunks > 1:
        _merge_chunks(g, part_mean, part_m2, mean, m2)
        free(part_mean)
    return 0


# ---------------------------------------------------------------------------
# Element passes: y = (x - center) * scale + shift, all per feature, in float64.

cdef void _affine_rows(const in_t* x, out_t* y, Py_ssize_t d,
                       Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w,
                       const double* center, const double* scale,
                       const double* shift) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const in_t* xr
    cdef out_t* yr
    for i in range(r0, r1):
        xr = x + i * d + c0
        yr = y + i * d + c0
        for j in range(w):
            yr[j] = <out_t>((xr[j] - center[j]) * scale[j] + shift[j])


cdef void _affine(const Grid* g, const in_t* x, out_t* y, const double* center,
                  const double* scale, const double* shift) noexcept nogil:
    cdef Py_ssize_t t, r0, r1, c0, w
    if g.n_threads == 1:
        for t in range(g.n_tasks):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            _affine_rows(x, y, g.n_cols, r0, r1, c0, w, center + c0, scale + c0, shift + c0)
    else:
        for t in prange(g.n_tasks, schedule="static", num_threads=g.n_threads):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            _affine_rows(x, y, g.n_cols, r0, r1, c0, w, center + c0, scale + c0, shift + c0)


# ---------------------------------------------------------------------------
# Backward reductions: per-feature sum(dy) and sum(dy * (x - center)), in
# float64, per task; chunks are added in chunk order.  With `dx` given, the
# same pass also writes dx = dy * dx_scale (the eval-mode gradient).

cdef void _grad_sums_task(const in_t* x, const in_t* dy, out_t* dx, Py_ssize_t d,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w,
                          const double* center, const double* dx_scale,
                          double* sum_dy, double* sum_dy_xc) noexcept nogil:
    cdef Py_ssize_t i = r0, j
    cdef const in_t* a
    cdef const in_t* g
    cdef out_t* dr
    cdef double g0, g1, g2, g3
    for j in range(w):
        sum_dy[j] = 0.0
        sum_dy_xc[j] = 0.0
    if dx == NULL:
        # Four rows at a time, as in _stats_task.
        while i + 4 <= r1:
            a = x + i * d + c0
            g = dy + i * d + c0
            for j in range(w):
                g0 = g[j]
                g1 = g[d + j]
                g2 = g[2 * d + j]
                g3 = g[3 * d + j]
                sum_dy[j] += (g0 + g1) + (g2 + g3)
                sum_dy_xc[j] += ((g0 * (a[j] - center[j]) + g1 * (a[d + j] - center[j]))
                                 + (g2 * (a[2 * d + j] - center[j])
                                    + g3 * (a[3 * d + j] - center[j])))
            i += 4
    while i < r1:
        a = x + i * d + c0
        g = dy + i * d + c0
        if dx == NULL:
            for j in range(w):
                g0 = g[j]
                sum_dy[j] += g0
                sum_dy_xc[j] += g0 * (a[j] - center[j])
        else:
            dr = dx + i * d + c0
            for j in range(w):
                g0 = g[j]
                sum_dy[j] += g0
                sum_dy_xc[j] += g0 * (a[j] - center[j])
                dr[j] = <out_t>(g0 * dx_scale[j])
        i += 1


cdef int _grad_sums(const Grid* g, const in_t* x, const in_t* dy, out_t* dx,
                    const double* center, const double* dx_scale,
                    double* sum_dy, double* sum_dy_xc) noexcept nogil:
    cdef Py_ssize_t d = g.n_cols, t, r0, r1, c0, w, k, j
    cdef double* part
    if g.n_chunks == 1:
        part = NULL
    else:
        part = <double*>malloc(2 * g.n_chunks * d * sizeof(double))
        if part == NULL:
            return -1
    if g.n_threads == 1:
        for t in range(g.n_tasks):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            k = t // g.n_col_blocks
            if part == NULL:
                _grad_sums_task(x, dy, dx, d, r0, r1, c0, w, center + c0, dx_scale + c0,
                                sum_dy + c0, sum_dy_xc + c0)
            else:
                _grad_sums_task(x, dy, dx, d, r0, r1, c0, w, center + c0, dx_scale + c0,
                                part + k * d + c0, part + (g.n_chunks + k) * d + c0)
    else:
        for t in prange(g.n_tasks, schedule="dynamic", num_threads=g.n_threads):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            k = t // g.n_col_blocks
            if part == NULL:
                _grad_sums_task(x, dy, dx, d, r0, r1, c0, w, center + c0, dx_scale + c0,
                                sum_dy + c0, sum_dy_xc + c0)
            else:
                _grad_sums_task(x, dy, dx, d, r0, r1, c0, w, center + c0, dx_scale + c0,
                                part + k * d + c0, part + (g.n_chunks + k) * d + c0)
    if part != NULL:
        for j in range(d):
            sum_dy[j] = part[j]
            sum_dy_xc[j] = part[g.n_chunks * d + j]
        for k in range(1, g.n_chunks):
            for j in range(d):
                sum_dy[j] += part[k * d + j]
                sum_dy_xc[j] += part[(g.n_chunks + k) * d + j]
        free(part)
    return 0


cdef void _grad_input_rows(const in_t* x, const in_t* dy, out_t* dx, Py_ssize_t d,
                           Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w,
                           const double* center, const double* mean_dy,
                           const double* k_xc, const double* k) noexcept nogil:
    """dx = k * ((dy - mean_dy) - k_xc * (x - center)), per feature.

    The differences come first so that what cancels mathematically cancels
    exactly (a batch of one gives dx == 0, as in the reference)."""
    cdef Py_ssize_t i, j
    cdef const in_t* xr
    cdef const in_t* gr
    cdef out_t* dr
    for i in range(r0, r1):
        xr = x + i * d + c0
        gr = dy + i * d + c0
        dr = dx + i * d + c0
        for j in range(w):
            dr[j] = <out_t>(k[j] * ((gr[j] - mean_dy[j]) - k_xc[j] * (xr[j] - center[j])))


cdef void _grad_input(const Grid* g, const in_t* x, const in_t* dy, out_t* dx,
                      const double* center, const double* mean_dy, const double* k_xc,
                      const double* k) noexcept nogil:
    cdef Py_ssize_t t, r0, r1, c0, w
    if g.n_threads == 1:
        for t in range(g.n_tasks):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            _grad_input_rows(x, dy, dx, g.n_cols, r0, r1, c0, w,
                             center + c0, mean_dy + c0, k_xc + c0, k + c0)
    else:
        for t in prange(g.n_tasks, schedule="static", num_threads=g.n_threads):
            _task_bounds(g, t, &r0, &r1, &c0, &w)
            _grad_input_rows(x, dy, dx, g.n_cols, r0, r1, c0, w,
                             center + c0, mean_dy + c0, k_xc + c0, k + c0)


# ---------------------------------------------------------------------------
# Whole operations.  Per-feature inputs (gamma, beta, running statistics) are
# Vecs; per-feature results (dgamma, dbeta) are float32/float64 blocks.

cdef int _train_forward(const in_t* x, in_t* cache, out_t* y, Py_ssize_t n, Py_ssize_t d,
                        const Vec* gamma, const Vec* beta, double eps,
                        double* mean, double* var, double* invstd,
                        const Vec* rm_old, double* rm_new, const Vec* rv_old, double* rv_new,
                        double momentum, double one_minus_momentum) noexcept nogil:
    """Writes y, the batch mean / biased var / invstd, and cache = x if given."""
    cdef Grid g = _make_grid(n, d, sizeof(in_t))
    cdef double* scale
    cdef double inv
    cdef Py_ssize_t j
    if _batch_stats(&g, x, cache, mean, var) != 0:
        return -1
    scale = <double*>malloc(2 * d * sizeof(double))
    if scale == NULL:
        return -1
    for j in range(d):
        var[j] = var[j] / <double>n
        inv = 1.0 / sqrt(var[j] + eps)
        if invstd != NULL:
            invstd[j] = inv
        scale[j] = _at(gamma, j) * inv
        scale[d + j] = _at(beta, j)
    if rm_new != NULL:
        for j in range(d):
            rm_new[j] = momentum * _at(rm_old, j) + one_minus_momentum * mean[j]
            rv_new[j] = momentum * _at(rv_old, j) + one_minus_momentum * var[j]
    _affine(&g, <const in_t*>cache if cache != NULL else x, y, mean, scale, scale + d)
    free(scale)
    return 0


cdef int _eval_forward(const in_t* x, out_t* y, Py_ssize_t n, Py_ssize_t d,
                       const Vec* gamma, const Vec* beta, const Vec* rm, const Vec* rv,
                       double eps) noexcept nogil:
    cdef Grid g = _make_grid(n, d, sizeof(in_t))
    cdef double* center = <double*>malloc(3 * d * sizeof(double))
    cdef Py_ssize_t j
    if center == NULL:
        return -1
    for j in range(d):
        center[j] = _at(rm, j)
        center[d + j] = _at(gamma, j) / sqrt(_at(rv, j) + eps)
        center[2 * d + j] = _at(beta, j)
    _affine(&g, x, y, center, center + d, center + 2 * d)
    free(center)
    return 0


cdef int _train_backward(const in_t* x, const in_t* dy, out_t* dx, Py_ssize_t n, Py_ssize_t d,
                         const double* mean, const double* invstd, const Vec* gamma,
                         void* dgamma, void* dbeta, bint grads_f64) noexcept nogil:
    """dx = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)); two passes."""
    cdef Grid g = _make_grid(n, d, sizeof(in_t))
    cdef double* work = <double*>malloc(4 * d * sizeof(double))
    cdef double* sum_dy
    cdef double* sum_dy_xc
    cdef double* k_xc
    cdef double* k
    cdef double nd = <double>n
    cdef Py_ssize_t j
    if work == NULL:
        return -1
    sum_dy = work           # becomes mean(dy)
    sum_dy_xc = work + d
    k_xc = work + 2 * d
    k = work + 3 * d
    if _grad_sums(&g, x, dy, <out_t*>NULL, mean, <const double*>NULL, sum_dy, sum_dy_xc) != 0:
        free(work)
        return -1
    for j in range(d):
        _put(dbeta, grads_f64, j, sum_dy[j])
        _put(dgamma, grads_f64, j, sum_dy_xc[j] * invstd[j])
        k[j] = _at(gamma, j) * invstd[j]
        k_xc[j] = invstd[j] * invstd[j] * (sum_dy_xc[j] / nd)
        sum_dy[j] = sum_dy[j] / nd
    _grad_input(&g, x, dy, dx, mean, sum_dy, k_xc, k)
    free(work)
    return 0


cdef int _eval_backward(const in_t* x, const in_t* dy, out_t* dx, Py_ssize_t n, Py_ssize_t d,
                        const Vec* gamma, const Vec* rm, const Vec* rv, double eps,
                        void* dgamma, void* dbeta, bint grads_f64) noexcept nogil:
    """Gradient of the eval-mode function: statistics are constants. One pass."""
    cdef Grid g = _make_grid(n, d, sizeof(in_t))
    cdef double* work = <double*>malloc(5 * d * sizeof(double))
    cdef Py_ssize_t j
    if work == NULL:
        return -1
    # work rows: center, invstd, dx_scale, sum_dy, sum_dy_xc
    for j in range(d):
        work[j] = _at(rm, j)
        work[d + j] = 1.0 / sqrt(_at(rv, j) + eps)
        work[2 * d + j] = _at(gamma, j) * work[d + j]
    if _grad_sums(&g, x, dy, dx, work, work + 2 * d, work + 3 * d, work + 4 * d) != 0:
        free(work)
        return -1
    for j in range(d):
        _put(dbeta, grads_f64, j, work[3 * d + j])
        _put(dgamma, grads_f64, j, work[4 * d + j] * work[d + j])
    free(work)
    return 0


# ---------------------------------------------------------------------------
# Thin typed entry points.  Arrays arrive validated and laid out by Python;
# these checks only guard memory safety and cost a few nanoseconds each.

cdef inline bint _is_f64(cnp.ndarray a) noexcept:
    return cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE


cdef int _require(cnp.ndarray a, Py_ssize_t size, str name, bint writeable) except -1:
    """a: an aligned, native, C-contiguous float32/float64 block of `size`."""
    cdef int t = cnp.PyArray_TYPE(a)
    if t != cnp.NPY_DOUBLE and t != cnp.NPY_FLOAT:
        raise TypeError(f"{name}: kernel needs float32 or float64, got {a.dtype}")
    if not cnp.PyArray_ISCARRAY_RO(a) or not cnp.PyArray_ISNOTSWAPPED(a):
        raise ValueError(f"{name}: kernel needs an aligned, native, C-contiguous array")
    if cnp.PyArray_SIZE(a) != size:
        raise ValueError(f"{name}: kernel needs {size} elements, got {cnp.PyArray_SIZE(a)}")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: kernel output must be writeable")
    return 0


cdef Vec _vec(cnp.ndarray a, Py_ssize_t d, str name) except *:
    """A per-feature input: d elements, or 1 element broadcast to all d."""
    cdef Vec v
    cdef Py_ssize_t size = cnp.PyArray_SIZE(a)
    if size != d and size != 1:
        raise ValueError(f"{name}: kernel needs {d} or 1 elements, got {size}")
    _require(a, size, name, False)
    v.data = cnp.PyArray_DATA(a)
    v.stride = 1 if size == d else 0
    v.is_f64 = _is_f64(a)
    return v


cdef int _require_stat(cnp.ndarray a, Py_ssize_t d, str name, bint writeable) except -1:
    _require(a, d, name, writeable)
    if not _is_f64(a):
        raise TypeError(f"{name}: kernel needs float64 statistics, got {a.dtype}")
    return 0


cdef int _check_nd(Py_ssize_t n, Py_ssize_t d) except -1:
    if n < 1 or d < 1:
        raise ValueError(f"kernel needs n >= 1 and d >= 1, got n={n}, d={d}")
    return 0


def train_forward(cnp.ndarray x, cnp.ndarray cache, cnp.ndarray y, Py_ssize_t n, Py_ssize_t d,
                  cnp.ndarray gamma, cnp.ndarray beta, double eps,
                  cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd,
                  cnp.ndarray rm_old, cnp.ndarray rm_new, cnp.ndarray rv_old, cnp.ndarray rv_new,
                  double momentum, double one_minus_momentum):
    """Training forward on the (n, d) view of x.

    Writes y (n*d elements); the float64 batch mean, biased var and (unless
    None) invstd, d elements each; cache (a copy of x, x's dtype) unless None;
    and the float64 running statistics rm_new / rv_new from rm_old / rv_old
    unless rm_new is None.  gamma, beta, rm_old, rv_old: float32/float64 with
    d or 1 elements.
    """
    cdef Vec g, b, rmo, rvo
    cdef bint in64, out64
    cdef int status
    cdef void* pcache = NULL
    cdef double* prm_new = NULL
    cdef double* prv_new = NULL
    rmo.data = NULL
    rmo.stride = 0
    rmo.is_f64 = True
    rvo = rmo
    _check_nd(n, d)
    _require(x, n * d, "x", False)
    _require(y, n * d, "y", True)
    in64 = _is_f64(x)
    out64 = _is_f64(y)
    g = _vec(gamma, d, "gamma")
    b = _vec(beta, d, "beta")
    _require_stat(mean, d, "mean", True)
    _require_stat(var, d, "var", True)
    cdef double* pinv = NULL
    if invstd is not None:
        _require_stat(invstd, d, "invstd", True)
        pinv = <double*>cnp.PyArray_DATA(invstd)
    if cache is not None:
        _require(cache, n * d, "cache", True)
        if _is_f64(cache) != in64:
            raise TypeError("cache dtype must match x")
        pcache = cnp.PyArray_DATA(cache)
    if rm_new is not None:
        _require(rm_new, d, "rm_new", True)
        _require(rv_new, d, "rv_new", True)
        if not (_is_f64(rm_new) and _is_f64(rv_new)):
            raise TypeError("running statistics updated here must be float64")
        rmo = _vec(rm_old, d, "rm_old")
        rvo = _vec(rv_old, d, "rv_old")
        prm_new = <double*>cnp.PyArray_DATA(rm_new)
        prv_new = <double*>cnp.PyArray_DATA(rv_new)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef double* pm = <double*>cnp.PyArray_DATA(mean)
    cdef double* pv = <double*>cnp.PyArray_DATA(var)
    with nogil:
        if in64 and out64:
            status = _train_forward[double, double](
                <const double*>px, <double*>pcache, <double*>py, n, d, &g, &b, eps, pm, pv, pinv,
                &rmo, prm_new, &rvo, prv_new, momentum, one_minus_momentum)
        elif out64:
            status = _train_forward[float, double](
                <const float*>px, <float*>pcache, <double*>py, n, d, &g, &b, eps, pm, pv, pinv,
                &rmo, prm_new, &rvo, prv_new, momentum, one_minus_momentum)
        elif in64:
            status = _train_forward[double, float](
                <const double*>px, <double*>pcache, <float*>py, n, d, &g, &b, eps, pm, pv, pinv,
                &rmo, prm_new, &rvo, prv_new, momentum, one_minus_momentum)
        else:
            status = _train_forward[float, float](
                <const float*>px, <float*>pcache, <float*>py, n, d, &g, &b, eps, pm, pv, pinv,
                &rmo, prm_new, &rvo, prv_new, momentum, one_minus_momentum)
    if status != 0:
        raise MemoryError("bnfast: could not allocate kernel work space")


def eval_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t n, Py_ssize_t d,
                 cnp.ndarray gamma, cnp.ndarray beta, cnp.ndarray rm, cnp.ndarray rv,
                 double eps):
    """y = gamma * (x - rm) / sqrt(rv + eps) + beta on the (n, d) view of x.

    gamma, beta, rm, rv: float32/float64 with d or 1 elements each.
    """
    cdef Vec g, b, m, v
    cdef bint in64, out64
    cdef int status
    _check_nd(n, d)
    _require(x, n * d, "x", False)
    _require(y, n * d, "y", True)
    in64 = _is_f64(x)
    out64 = _is_f64(y)
    g = _vec(gamma, d, "gamma")
    b = _vec(beta, d, "beta")
    m = _vec(rm, d, "running_mean")
    v = _vec(rv, d, "running_var")
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    with nogil:
        if in64 and out64:
            status = _eval_forward[double, double](<const double*>px, <double*>py, n, d,
                                                   &g, &b, &m, &v, eps)
        elif out64:
            status = _eval_forward[float, double](<const float*>px, <double*>py, n, d,
                                                  &g, &b, &m, &v, eps)
        elif in64:
            status = _eval_forward[double, float](<const double*>px, <float*>py, n, d,
                                                  &g, &b, &m, &v, eps)
        else:
            status = _eval_forward[float, float](<const float*>px, <float*>py, n, d,
                                                 &g, &b, &m, &v, eps)
    if status != 0:
        raise MemoryError("bnfast: could not allocate kernel work space")


cdef int _check_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray dx, Py_ssize_t n,
                         Py_ssize_t d, cnp.ndarray dgamma, cnp.ndarray dbeta) except -1:
    _check_nd(n, d)
    _require(x, n * d, "x", False)
    _require(dy, n * d, "dout", False)
    _require(dx, n * d, "dx", True)
    _require(dgamma, d, "dgamma", True)
    _require(dbeta, d, "dbeta", True)
    if _is_f64(x) != _is_f64(dy):
        raise TypeError("x and dout must have the same dtype in the kernel")
    if _is_f64(dgamma) != _is_f64(dbeta):
        raise TypeError("dgamma and dbeta must have the same dtype in the kernel")
    return 0


def train_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray dx, Py_ssize_t n, Py_ssize_t d,
                   cnp.ndarray mean, cnp.ndarray invstd, cnp.ndarray gamma,
                   cnp.ndarray dgamma, cnp.ndarray dbeta):
    """Backward of the training forward on the (n, d) views, given its
    float64 batch mean and invstd (d elements each)."""
    cdef Vec g
    cdef bint in64, out64, grads64
    cdef int status
    _check_backward(x, dy, dx, n, d, dgamma, dbeta)
    _require_stat(mean, d, "mean", False)
    _require_stat(invstd, d, "invstd", False)
    in64 = _is_f64(x)
    out64 = _is_f64(dx)
    grads64 = _is_f64(dgamma)
    g = _vec(gamma, d, "gamma")
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef const double* pm = <const double*>cnp.PyArray_DATA(mean)
    cdef const double* pi = <const double*>cnp.PyArray_DATA(invstd)
    cdef void* pdg = cnp.PyArray_DATA(dgamma)
    cdef void* pdb = cnp.PyArray_DATA(dbeta)
    with nogil:
        if in64 and out64:
            status = _train_backward[double, double](
                <const double*>px, <const double*>pdy, <double*>pdx, n, d, pm, pi, &g,
                pdg, pdb, grads64)
        elif out64:
            status = _train_backward[float, double](
                <const float*>px, <const float*>pdy, <double*>pdx, n, d, pm, pi, &g,
                pdg, pdb, grads64)
        elif in64:
            status = _train_backward[double, float](
                <const double*>px, <const double*>pdy, <float*>pdx, n, d, pm, pi, &g,
                pdg, pdb, grads64)
        else:
            status = _train_backward[float, float](
                <const float*>px, <const float*>pdy, <float*>pdx, n, d, pm, pi, &g,
                pdg, pdb, grads64)
    if status != 0:
        raise MemoryError("bnfast: could not allocate kernel work space")


def eval_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray dx, Py_ssize_t n, Py_ssize_t d,
                  cnp.ndarray gamma, cnp.ndarray rm, cnp.ndarray rv, double eps,
                  cnp.ndarray dgamma, cnp.ndarray dbeta):
    """Backward of the eval-mode forward (running statistics held constant)."""
    cdef Vec g, m, v
    cdef bint in64, out64, grads64
    cdef int status
    _check_backward(x, dy, dx, n, d, dgamma, dbeta)
    in64 = _is_f64(x)
    out64 = _is_f64(dx)
    grads64 = _is_f64(dgamma)
    g = _vec(gamma, d, "gamma")
    m = _vec(rm, d, "running_mean")
    v = _vec(rv, d, "running_var")
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef void* pdg = cnp.PyArray_DATA(dgamma)
    cdef void* pdb = cnp.PyArray_DATA(dbeta)
    with nogil:
        if in64 and out64:
            status = _eval_backward[double, double](
                <const double*>px, <const double*>pdy, <double*>pdx, n, d, &g, &m, &v, eps,
                pdg, pdb, grads64)
        elif out64:
            status = _eval_backward[float, double](
                <const float*>px, <const float*>pdy, <double*>pdx, n, d, &g, &m, &v, eps,
                pdg, pdb, grads64)
        elif in64:
            status = _eval_backward[double, float](
                <const double*>px, <const double*>pdy, <float*>pdx, n, d, &g, &m, &v, eps,
                pdg, pdb, grads64)
        else:
            status = _eval_backward[float, float](
                <const float*>px, <const float*>pdy, <float*>pdx, n, d, &g, &m, &v, eps,
                pdg, pdb, grads64)
    if status != 0:
        raise MemoryError("bnfast: could not allocate kernel work space")


# ---------------------------------------------------------------------------
# Threads and build facts.

def set_num_threads(int n):
    """Threads the kernels use from now on (1 .. any; OpenMP builds only above 1)."""
    global _num_threads
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    if n > 1 and not BNFAST_OPENMP:
        raise RuntimeError(f"bnfast was built without OpenMP; cannot use {n} threads")
    _num_threads = n


def get_num_threads():
    """Threads the kernels use (1 in a build without OpenMP)."""
    return _num_threads


def openmp_enabled():
    """Whether this build of the kernels has OpenMP."""
    return bool(BNFAST_OPENMP)


def build_flags():
    """Compiler and linker flags the kernels were built with."""
    return BNFAST_BUILD_FLAGS.decode()


def cpu_level():
    """2: the CPU runs AVX-512 kernels, 1: AVX2 kernels, 0: baseline only."""
    return bnfast_cpu_level()


_num_threads = max(1, omp_get_max_threads()) if BNFAST_OPENMP else 1
