# The entry points of the kernels, compiled once, for the baseline: each
# checks what memory safety needs (sizes, dtypes, contiguity) so that a
# wrong call raises instead of reading out of bounds, plans the work (a
# Grid over rows or a Planes over NCHW planes, _plan.pxd) and hands a Call
# to the hot loops (bnfast/_loops.pyx, compiled once per instruction set)
# through _dispatch, the pointer to the loops bnfast/_native.py chose
# (_use_loops).  Validation, dtype resolution and layout decisions live in
# Python (bnfast/_checks.py); the thread count and the tuning knobs live
# here, since only planning reads them.
#
# Directives (boundscheck, wraparound, cdivision, ...) are set once in setup.py.

from libc.string cimport memset
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.pyport cimport PY_SSIZE_T_MAX

cimport numpy as cnp

from bnfast._plan cimport *

cnp.import_array()

# NumPy's float dtypes (the instances np.dtype returns), for ready_operands.
cdef object _F64 = cnp.PyArray_DescrFromType(cnp.NPY_DOUBLE)
cdef object _F32 = cnp.PyArray_DescrFromType(cnp.NPY_FLOAT)

# CPU detection (bnfast/csrc/cpu.h), shared with the variants' entry points.
cdef extern from "cpu.h":
    int bnfast_cpu_level() noexcept nogil

cdef extern from "platform.h":
    const int BNFAST_OPENMP
    int omp_get_max_threads() noexcept nogil

cdef extern from "stream.h":
    void bnfast_stream(void* dst, const void* src, size_t nbytes) noexcept nogil
    void bnfast_fence() noexcept nogil

# The loops in use (_use_loops): the baseline's until bnfast/_native.py
# picks a variant.
cdef dispatch_t _dispatch = NULL
_LAYOUT = _struct_sizes()


def _use_loops(loops):
    """Run every kernel with `loops`' hot loops from now on: bnfast._loops
    or a variant module that this CPU runs (bnfast/_native.py chooses)."""
    global _dispatch
    if getattr(loops, "LAYOUT", None) != _LAYOUT:
        raise ImportError(f"{loops.__name__} was built from other sources than "
                          f"bnfast._kernels (layouts {getattr(loops, 'LAYOUT', None)} "
                          f"and {_LAYOUT}): rebuild bnfast")
    _dispatch = <dispatch_t>PyCapsule_GetPointer(loops.dispatch, _dispatch_name())


cdef int _num_threads = 1
# Tunables (see _set_tuning); start at the compile-time defaults.
cdef Py_ssize_t _strip_bytes = STRIP_BYTES
cdef Py_ssize_t _stream_min_bytes = STREAM_MIN_BYTES   # set at import, below
cdef Py_ssize_t _llc_bytes = 3 * STREAM_MIN_BYTES        # set at import, below
cdef Py_ssize_t _cache_stream_min_bytes = CACHE_STREAM_MIN_BYTES
cdef Py_ssize_t _col_block = COL_BLOCK
cdef Py_ssize_t _max_strip_cols = MAX_STRIP_COLS
cdef Py_ssize_t _stream_pages_max_cols = STREAM_PAGES_MAX_COLS
cdef Py_ssize_t _page_bytes = PAGE_BYTES
cdef Py_ssize_t _fold_max_cols = FOLD_MAX_COLS


# ---------------------------------------------------------------------------
# Work planning: the partition of a call into tasks (see "Layout of the
# work" in _loops.pyx), from the shape, the dtypes, the knobs and the
# thread count.  The reductions' partition never depends on the thread
# count, so results do not either.

cdef Grid _make_grid(Py_ssize_t n, Py_ssize_t d, Py_ssize_t itemsize,
                     Py_ssize_t out_bytes) noexcept nogil:
    cdef Grid g
    cdef Py_ssize_t strip, n_row_blocks, chunks, rows_tasks
    cdef bint use_strips
    # Every field is set below; zeroing first makes a field that a later
    # change forgets read as 0/False instead of stack garbage.
    memset(&g, 0, sizeof(g))
    g.n_rows = n
    g.n_cols = d
    strip = _strip_bytes // (n * itemsize)
    use_strips = strip >= MIN_STRIP or strip >= d
    if use_strips:
        # strips: whole columns per task
        g.col_block = d if d < _max_strip_cols else _max_strip_cols
        if n * d * itemsize >= PARALLEL_MIN_BYTES and strip * MIN_STRIP_TASKS > d:
            strip = _ceil_div(d, MIN_STRIP_TASKS)
            strip = strip if strip > 128 else 128
        if strip < g.col_block:
            g.col_block = strip - strip % 16 if strip >= 32 else strip
        g.block_rows = n
        g.chunk_rows = n
        g.n_chunks = 1
        g.n_col_blocks = _ceil_div(d, g.col_block)
        # Narrow full-height strips of a large batch run row by row at a
        # large stride: worse for the caches than row blocks.
        use_strips = g.col_block >= FUSED_MIN_COLS or g.n_col_blocks == 1
        # One strip is one task, so one thread: a batch big enough for a
        # team gets row blocks (measured, 2 threads, 256-512 KiB batches of
        # 8-100 features: 35-45 % faster in every op; one thread: even).
        if g.n_col_blocks == 1 and n * d * itemsize >= PARALLEL_MIN_BYTES:
            use_strips = False
    g.fused = use_strips
    if not use_strips:
        # blocks: row chunks x column blocks
        g.col_block = d if d < _col_block else _col_block
        g.n_col_blocks = _ceil_div(d, g.col_block)
        g.block_rows = TILE_BYTES // (g.col_block * itemsize)
        if g.block_rows < 1:
            g.block_rows = 1
        n_row_blocks = _ceil_div(n, g.block_rows)
        chunks = _ceil_div(TARGET_TASKS, g.n_col_blocks)
        if chunks > n_row_blocks:
            chunks = n_row_blocks
        g.chunk_rows = _ceil_div(n_row_blocks, chunks) * g.block_rows
        g.n_chunks = _ceil_div(n, g.chunk_rows)
    g.n_tasks = g.n_chunks * g.n_col_blocks
    g.stream = out_bytes >= _stream_min_bytes
    g.stream_cache = n * d * itemsize >= _cache_stream_min_bytes
    g.stream_pages = g.stream and d <= _stream_pages_max_cols
    g.n_threads = 1
    if n * d * itemsize >= PARALLEL_MIN_BYTES and _num_threads > 1:
        g.n_threads = _num_threads if _num_threads < g.n_tasks else <int>g.n_tasks
    # Row blocks of a batch far too big for the last-level cache: a task
    # takes a whole column block through the statistics (or sums), their
    # merge and the pass, which reads the block from the cache, where the
    # blocks fit as the NCHW ones do (FUSED_BLOCK_PARTS) and give every
    # thread two.  (Below two thirds of the cache, the three phases' second
    # read still finds x there, behind the streamed outputs: measured, 2
    # threads, 1024 x 4096 and 512 x 8192 float32 trained 11-22 % slower
    # whole.)
    g.whole_blocks = (not use_strips and n * d * itemsize >= 2 * _stream_min_bytes
                      and g.n_col_blocks >= 2 * g.n_threads
                      and n * g.col_block * itemsize * FUSED_BLOCK_PARTS * g.n_threads
                      <= _llc_bytes)
    # Element passes: tasks of about PAGE_BYTES of output in address order,
    # but at least ELEM_MIN_ROWS rows, so that each column block's per-feature
    # coefficients, read once per task, serve many rows; columns are split
    # when that leaves too few tasks.  (These tasks only write, so their
    # split may follow the thread count.)
    g.page_rows = _page_bytes // (d * (out_bytes // (n * d)))
    if g.n_threads > 1:
        # several row tasks a thread balance better than column splits
        rows_tasks = _ceil_div(n, ELEM_TASKS_PER_THREAD * g.n_threads)
        if g.page_rows > rows_tasks:
            g.page_rows = rows_tasks
    if g.page_rows < ELEM_MIN_ROWS:
        g.page_rows = ELEM_MIN_ROWS
    if g.page_rows > n:
        g.page_rows = n
    rows_tasks = _ceil_div(n, g.page_rows)
    g.n_col_splits = 1
    if rows_tasks < 2 * g.n_threads:
        g.n_col_splits = _ceil_div(2 * g.n_threads, rows_tasks)
        if g.n_col_splits > g.n_col_blocks:
            g.n_col_splits = g.n_col_blocks
    g.page_cols = _ceil_div(g.n_col_blocks, g.n_col_splits) * g.col_block
    g.n_col_splits = _ceil_div(d, g.page_cols)
    g.n_page_tasks = rows_tasks * g.n_col_splits
    g.fold = _fold_rows(d)
    return g


cdef Py_ssize_t _fold_rows(Py_ssize_t d) noexcept nogil:
    """Rows per folded row for passes over whole rows of d features (see
    "Folding short rows" in _loops.pyx): 1 (no folding) unless the rows are
    short; else the fewest rows making >= FOLD_LANES lanes, a multiple of 16
    lanes (whole vectors) where that stays within FOLD_MAX_LANES."""
    cdef Py_ssize_t a = d, b = 16, r, m0
    if d >= _fold_max_cols or d >= FOLD_LANES:
        return 1
    while b != 0:           # a = gcd(d, 16)
        r = a % b
        a = b
        b = r
    m0 = 16 // a
    if m0 * d <= FOLD_MAX_LANES:
        return m0 * _ceil_div(FOLD_LANES, m0 * d)
    return _ceil_div(FOLD_LANES, d)


cdef Planes _make_planes(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s,
                         Py_ssize_t itemsize) noexcept nogil:
    cdef Planes p
    cdef Py_ssize_t planes = n * c, wanted
    memset(&p, 0, sizeof(p))
    p.n, p.c, p.s = n, c, s
    p.chunk_n = PLANE_TASK_BYTES // (s * itemsize)
    if p.chunk_n < 1:
        p.chunk_n = 1
    if p.chunk_n > n:
        p.chunk_n = n
    p.n_chunks = _ceil_div(n, p.chunk_n)
    # Channel blocks change which task sums a channel, never the order in
    # which its values are summed: results do not depend on them.
    p.channel_block = CHANNEL_RUN_BYTES // (s * itemsize)
    wanted = _ceil_div(c * p.n_chunks, MIN_REDUCTION_TASKS)
    if p.channel_block > wanted:
        p.channel_block = wanted
    if p.channel_block > MAX_CHANNEL_BLOCK:
        p.channel_block = MAX_CHANNEL_BLOCK
    if p.channel_block < 1:
        p.channel_block = 1
    p.n_channel_blocks = _ceil_div(c, p.channel_block)
    p.n_tasks = p.n_chunks * p.n_channel_blocks
    p.n_threads = 1
    if planes * s * itemsize >= PARALLEL_MIN_BYTES and _num_threads > 1:
        p.n_threads = _num_threads if _num_threads < p.n_tasks else <int>p.n_tasks
    # Batches that overflow the last-level cache run each channel block's
    # reductions and element pass as one task (p.whole_blocks), so that the pass
    # reads the block again from the cache: blocks that leave
    # MIN_REDUCTION_TASKS tasks and fit FUSED_BLOCK_PARTS times over in
    # every thread's share of it.  (Results are the same bits either way.)
    wanted = _llc_bytes // (FUSED_BLOCK_PARTS * p.n_threads * n * s * itemsize)
    if wanted > c // MIN_REDUCTION_TASKS:
        wanted = c // MIN_REDUCTION_TASKS
    if planes * s * itemsize >= _stream_min_bytes and c >= MIN_REDUCTION_TASKS and wanted >= 1:
        p.whole_blocks = True
        if p.channel_block > wanted:
            p.channel_block = wanted
        p.n_channel_blocks = _ceil_div(c, p.channel_block)
        p.n_tasks = p.n_chunks * p.n_channel_blocks
    p.stream_cache = planes * s * itemsize >= _cache_stream_min_bytes
    # Element passes (no reductions, so their split may follow the thread
    # count): about PAGE_BYTES of planes per task, at least two tasks a thread.
    p.per_task = _page_bytes // (s * itemsize)
    if p.per_task < 1:
        p.per_task = 1
    wanted = _ceil_div(planes, 2 * p.n_threads)
    if p.per_task > wanted:
        p.per_task = wanted
    p.n_elem_tasks = _ceil_div(planes, p.per_task)
    return p


# ---------------------------------------------------------------------------
# Thin typed entry points.  Arrays arrive validated and laid out by Python;
# these checks only guard memory safety and cost a few nanoseconds each.

cdef inline bint _is_f64(cnp.ndarray a) noexcept:
    return cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE


cdef inline bint _ready(cnp.ndarray a) noexcept:
    """Kernel-ready: an aligned, native-byte-order, C-contiguous float32 or
    float64 array.  The one definition: the entry points require it and the
    planner asks for it (ready_rows, ready_vector, ready_operands)."""
    cdef int t = cnp.PyArray_TYPE(a)
    return ((t == cnp.NPY_DOUBLE or t == cnp.NPY_FLOAT) and cnp.PyArray_ISCARRAY_RO(a)
            and cnp.PyArray_ISNOTSWAPPED(a))


cdef int _require(cnp.ndarray a, Py_ssize_t size, str name, bint writeable) except -1:
    """a: kernel-ready (see _ready), of `size` elements, writeable if asked."""
    cdef int t
    if not _ready(a):
        t = cnp.PyArray_TYPE(a)
        if t != cnp.NPY_DOUBLE and t != cnp.NPY_FLOAT:
            raise TypeError(f"{name}: kernel needs float32 or float64, got {a.dtype}")
        if not cnp.PyArray_ISNOTSWAPPED(a):
            raise ValueError(f"{name}: kernel needs native byte order, got {a.dtype}")
        if not cnp.PyArray_ISALIGNED(a):
            raise ValueError(f"{name}: kernel needs an aligned array")
        raise ValueError(f"{name}: kernel needs a C-contiguous array, got strides "
                         f"{(<object>a).strides} for shape {(<object>a).shape}")
    if cnp.PyArray_SIZE(a) != size:
        raise ValueError(f"{name}: kernel needs {size} elements, got {cnp.PyArray_SIZE(a)}")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: kernel output must be writeable")
    return 0


cdef int _require_f64(cnp.ndarray a, Py_ssize_t size, str name, bint writeable) except -1:
    _require(a, size, name, writeable)
    if not _is_f64(a):
        raise TypeError(f"{name}: kernel needs float64, got {a.dtype}")
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


cdef OutVec _outvec(object a, Py_ssize_t d, str name) except *:
    """A per-feature result of d elements, or 'not wanted' for None."""
    cdef OutVec v
    v.data = NULL
    v.is_f64 = True
    if a is not None:
        _require(<cnp.ndarray?>a, d, name, True)
        v.data = cnp.PyArray_DATA(<cnp.ndarray?>a)
        v.is_f64 = _is_f64(<cnp.ndarray?>a)
    return v


cdef Py_ssize_t _size(Py_ssize_t n, Py_ssize_t d, Py_ssize_t s) except -1:
    """Elements of a batch the kernels take as its (n, d) rows (s == 0) or as
    (n, d, s) NCHW planes (s > 0: d channels of s positions each)."""
    if n < 1 or d < 1:
        raise ValueError(f"kernel needs n >= 1 and d >= 1, got n={n}, d={d}")
    if s < 0:
        raise ValueError(f"kernel needs s >= 0, got s={s}")
    if n > PY_SSIZE_T_MAX // d or (s > 0 and n * d > PY_SSIZE_T_MAX // s):
        raise ValueError(f"kernel sizes overflow: n={n} * d={d}" + (f" * s={s}" if s else ""))
    return n * d * s if s > 0 else n * d


cdef const Planes* _layout(Grid* grid, Planes* planes, Py_ssize_t n, Py_ssize_t d,
                           Py_ssize_t s, cnp.ndarray x, cnp.ndarray out) noexcept:
    """The work partition of a call (sizes checked by _size): the rows grid
    for (n, d) if s == 0 (returns NULL), else planes for (n, d, s)
    (returned; grid zeroed)."""
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(x)
    if s == 0:
        grid[0] = _make_grid(n, d, itemsize, n * d * cnp.PyArray_ITEMSIZE(out))
        return NULL
    memset(grid, 0, sizeof(Grid))
    planes[0] = _make_planes(n, d, s, itemsize)
    return planes


cdef inline void* _data(object a) noexcept:
    """The data of a checked array, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef int _call_loops(Call* call, cnp.ndarray x, cnp.ndarray out) except -1:
    """Hands call to the loops, the GIL released; out: the array whose dtype
    is the output's (x for the reductions)."""
    cdef int status
    cdef bint in64 = _is_f64(x), out64 = _is_f64(out)
    with nogil:
        status = _dispatch(call, in64, out64)
    if status != 0:
        raise MemoryError("bnfast: could not allocate kernel work space")
    return 0


cdef void* _cache_ptr(object cache, Py_ssize_t size, cnp.ndarray x) except? NULL:
    """The data of an optional copy-of-x buffer (NULL for None)."""
    if cache is None:
        return NULL
    _require(<cnp.ndarray?>cache, size, "cache", True)
    if _is_f64(<cnp.ndarray?>cache) != _is_f64(x):
        raise TypeError("cache dtype must match x")
    return cnp.PyArray_DATA(<cnp.ndarray?>cache)


cdef int _train_args(TrainArgs* a, Vec* vecs, Py_ssize_t d, cnp.ndarray gamma, cnp.ndarray beta,
                     double eps, cnp.ndarray mean, cnp.ndarray var, object invstd,
                     object rm_old, object rm_new, object rv_old, object rv_new,
                     double momentum, double one_minus_momentum,
                     double var_correction) except -1:
    """Checks the training forward's per-feature operands (d features) and
    fills a; vecs: 4 Vec that a points into (gamma, beta, old running stats)."""
    if gamma is None or beta is None or mean is None or var is None:
        raise TypeError("gamma, beta, mean and var are required")
    vecs[0] = _vec(gamma, d, "gamma")
    vecs[1] = _vec(beta, d, "beta")
    _require_f64(mean, d, "mean", True)
    _require_f64(var, d, "var", True)
    a.invstd = NULL
    if invstd is not None:
        _require_f64(<cnp.ndarray?>invstd, d, "invstd", True)
        a.invstd = <double*>cnp.PyArray_DATA(<cnp.ndarray?>invstd)
    a.rm_new = _outvec(rm_new, d, "rm_new")
    a.rv_new = _outvec(rv_new, d, "rv_new")
    if (a.rm_new.data == NULL) != (a.rv_new.data == NULL):
        raise ValueError("give both rm_new and rv_new, or neither")
    vecs[2] = vecs[3] = vecs[0]
    if rm_new is not None:
        if rm_old is None or rv_old is None:
            raise TypeError("rm_old and rv_old are required with rm_new")
        vecs[2] = _vec(<cnp.ndarray?>rm_old, d, "rm_old")
        vecs[3] = _vec(<cnp.ndarray?>rv_old, d, "rv_old")
    a.gamma = &vecs[0]
    a.beta = &vecs[1]
    a.eps = eps
    a.mean = <double*>cnp.PyArray_DATA(mean)
    a.var = <double*>cnp.PyArray_DATA(var)
    a.rm_old = &vecs[2]
    a.rv_old = &vecs[3]
    a.momentum = momentum
    a.one_minus_momentum = one_minus_momentum
    a.var_correction = var_correction
    return 0


# Every entry point takes the batch as its (n, d) rows, or with s > 0 as
# (n, d, s) NCHW planes (per-channel statistics over d channels).

def train_forward(cnp.ndarray x not None, cnp.ndarray cache, cnp.ndarray y not None,
                  Py_ssize_t n, Py_ssize_t d, cnp.ndarray gamma not None,
                  cnp.ndarray beta not None, double eps,
                  cnp.ndarray mean not None, cnp.ndarray var not None, cnp.ndarray invstd,
                  cnp.ndarray rm_old, cnp.ndarray rm_new, cnp.ndarray rv_old, cnp.ndarray rv_new,
                  double momentum, double one_minus_momentum, double var_correction=1.0,
                  Py_ssize_t s=0):
    """Training forward on the (n, d) view of x (s > 0: per channel of the
    (n, d, s) view).

    Writes y (as many elements as x); the float64 batch mean, biased var
    and (unless None) invstd, d elements each; cache (a copy of x, x's
    dtype) unless None; and the running statistics rm_new / rv_new
    (float32/float64, d elements) from rm_old / rv_old unless rm_new is None
    (the variance enters them times var_correction).  gamma, beta, rm_old,
    rv_old: float32/float64 with d or 1 elements.
    """
    cdef TrainArgs a
    cdef Vec vecs[4]
    cdef Grid grid
    cdef Planes planes
    cdef Py_ssize_t size = _size(n, d, s)
    _require(x, size, "x", False)
    _require(y, size, "y", True)
    cdef void* pcache = _cache_ptr(cache, size, x)
    _train_args(&a, vecs, d, gamma, beta, eps, mean, var, invstd, rm_old, rm_new, rv_old,
                rv_new, momentum, one_minus_momentum, var_correction)
    cdef Call call = _call(OP_TRAIN_FORWARD, &grid, _layout(&grid, &planes, n, d, s, x, y),
                           _data(x), NULL, pcache, _data(y))
    call.args = &a
    _call_loops(&call, x, y)


def eval_forward(cnp.ndarray x not None, cnp.ndarray y not None, Py_ssize_t n, Py_ssize_t d,
                 cnp.ndarray gamma not None, cnp.ndarray beta not None,
                 cnp.ndarray rm not None, cnp.ndarray rv not None, double eps, Py_ssize_t s=0):
    """y = gamma * (x - rm) / sqrt(rv + eps) + beta on the (n, d) view of x
    (s > 0: per channel of the (n, d, s) view).

    gamma, beta, rm, rv: float32/float64 with d or 1 elements each.
    """
    cdef Grid grid
    cdef Planes planes
    cdef Py_ssize_t size = _size(n, d, s)
    _require(x, size, "x", False)
    _require(y, size, "y", True)
    cdef Vec g = _vec(gamma, d, "gamma"), b = _vec(beta, d, "beta")
    cdef Vec m = _vec(rm, d, "running_mean"), v = _vec(rv, d, "running_var")
    cdef Call call = _call(OP_EVAL_FORWARD, &grid, _layout(&grid, &planes, n, d, s, x, y),
                           _data(x), NULL, NULL, _data(y))
    call.vec[0], call.vec[1], call.vec[2], call.vec[3] = &g, &b, &m, &v
    call.eps = eps
    _call_loops(&call, x, y)


cdef int _check_backward(cnp.ndarray x, cnp.ndarray dy, object dx, Py_ssize_t n,
                         Py_ssize_t d, Py_ssize_t s) except -1:
    """Sizes and dtypes of a backward's batches (dx None: not written)."""
    cdef Py_ssize_t size = _size(n, d, s)
    _require(x, size, "x", False)
    _require(dy, size, "dout", False)
    if dx is not None:
        _require(<cnp.ndarray?>dx, size, "dx", True)
    if _is_f64(x) != _is_f64(dy):
        raise TypeError("x and dout must have the same dtype in the kernel")
    return 0


cdef int _grad_outputs(OutVec* dg, OutVec* db, object dgamma, object dbeta,
                       Py_ssize_t d) except -1:
    dg[0] = _outvec(dgamma, d, "dgamma")
    db[0] = _outvec(dbeta, d, "dbeta")
    if dg.data == NULL or db.data == NULL:
        raise TypeError("dgamma and dbeta are required")
    return 0


def train_backward(cnp.ndarray x not None, cnp.ndarray dy not None, cnp.ndarray dx not None,
                   Py_ssize_t n, Py_ssize_t d, cnp.ndarray mean not None,
                   cnp.ndarray invstd not None, cnp.ndarray gamma not None,
                   cnp.ndarray dgamma not None, cnp.ndarray dbeta not None, Py_ssize_t s=0):
    """Backward of the training forward on the (n, d) views (s > 0: per
    channel of the (n, d, s) views), given its float64 batch mean and invstd
    (d elements each); dgamma and dbeta are float32/float64 arrays of d
    elements."""
    cdef OutVec dg, db
    cdef GradArgs a
    cdef Grid grid
    cdef Planes planes
    _check_backward(x, dy, dx, n, d, s)
    _require_f64(mean, d, "mean", False)
    _require_f64(invstd, d, "invstd", False)
    _grad_outputs(&dg, &db, dgamma, dbeta, d)
    cdef Vec g = _vec(gamma, d, "gamma")
    a.mean = <const double*>cnp.PyArray_DATA(mean)
    a.invstd = <const double*>cnp.PyArray_DATA(invstd)
    a.gamma = &g
    a.dgamma = &dg
    a.dbeta = &db
    cdef Call call = _call(OP_TRAIN_BACKWARD, &grid, _layout(&grid, &planes, n, d, s, x, dx),
                           _data(x), _data(dy), NULL, _data(dx))
    call.args = &a
    _call_loops(&call, x, dx)


def eval_backward(cnp.ndarray x not None, cnp.ndarray dy not None, cnp.ndarray dx not None,
                  Py_ssize_t n, Py_ssize_t d, cnp.ndarray gamma not None,
                  cnp.ndarray rm not None, cnp.ndarray rv not None, double eps,
                  cnp.ndarray dgamma not None, cnp.ndarray dbeta not None, Py_ssize_t s=0):
    """Backward of the eval-mode forward (running statistics held constant)."""
    cdef OutVec dg, db
    cdef EvalArgs a
    cdef Grid grid
    cdef Planes planes
    _check_backward(x, dy, dx, n, d, s)
    _grad_outputs(&dg, &db, dgamma, dbeta, d)
    cdef Vec g = _vec(gamma, d, "gamma")
    cdef Vec m = _vec(rm, d, "running_mean"), v = _vec(rv, d, "running_var")
    a.gamma = &g
    a.rm = &m
    a.rv = &v
    a.eps = eps
    cdef Call call = _call(OP_EVAL_BACKWARD, &grid, _layout(&grid, &planes, n, d, s, x, dx),
                           _data(x), _data(dy), NULL, _data(dx))
    call.args = &a
    call.dgamma, call.dbeta = &dg, &db
    _call_loops(&call, x, dx)


# ---------------------------------------------------------------------------
# Split-phase entry points.  Per-feature vectors are float64, d elements.

cdef inline const double* _f64_in(cnp.ndarray a, Py_ssize_t d, str name) except NULL:
    _require_f64(a, d, name, False)
    return <const double*>cnp.PyArray_DATA(a)


cdef inline double* _f64_out(cnp.ndarray a, Py_ssize_t d, str name) except NULL:
    _require_f64(a, d, name, True)
    return <double*>cnp.PyArray_DATA(a)


def moments(cnp.ndarray x not None, cnp.ndarray cache, Py_ssize_t n, Py_ssize_t d,
            cnp.ndarray mean not None, cnp.ndarray m2 not None, Py_ssize_t s=0):
    """Per-feature float64 mean and M2 of the (n, d) view of x, as the
    training forward computes them (s > 0: per channel of the (n, d, s)
    NCHW view); cache (x's dtype) = x unless None."""
    cdef Grid grid
    cdef Planes planes
    cdef Py_ssize_t size = _size(n, d, s)
    _require(x, size, "x", False)
    cdef double* pmean = _f64_out(mean, d, "mean")
    cdef double* pm2 = _f64_out(m2, d, "m2")
    cdef void* pcache = _cache_ptr(cache, size, x)
    cdef Call call = _call(OP_MOMENTS, &grid, _layout(&grid, &planes, n, d, s, x, x), _data(x),
                           NULL, pcache, NULL)
    call.sums[0], call.sums[1] = pmean, pm2
    _call_loops(&call, x, x)


def affine(cnp.ndarray x not None, cnp.ndarray y not None, Py_ssize_t n, Py_ssize_t d,
           cnp.ndarray center not None, cnp.ndarray scale not None, cnp.ndarray shift not None,
           Py_ssize_t s=0):
    """y = (x - center) * scale + shift on the (n, d) views (s > 0: per
    channel of the (n, d, s) views)."""
    cdef Grid grid
    cdef Planes planes
    cdef Py_ssize_t size = _size(n, d, s)
    _require(x, size, "x", False)
    _require(y, size, "y", True)
    cdef const double* pc = _f64_in(center, d, "center")
    cdef const double* ps = _f64_in(scale, d, "scale")
    cdef const double* pb = _f64_in(shift, d, "shift")
    cdef Call call = _call(OP_AFFINE, &grid, _layout(&grid, &planes, n, d, s, x, y), _data(x),
                           NULL, NULL, _data(y))
    call.coef[0], call.coef[1], call.coef[2] = pc, ps, pb
    _call_loops(&call, x, y)


def grad_sums(cnp.ndarray x not None, cnp.ndarray dy not None, Py_ssize_t n, Py_ssize_t d,
              cnp.ndarray center not None, cnp.ndarray sum_dy not None,
              cnp.ndarray sum_dy_xc not None, Py_ssize_t s=0):
    """Per-feature sum(dy) and sum(dy * (x - center)) over the (n, d) views
    (s > 0: per channel of the (n, d, s) views)."""
    cdef Grid grid
    cdef Planes planes
    _check_backward(x, dy, None, n, d, s)
    cdef const double* pc = _f64_in(center, d, "center")
    cdef double* ps = _f64_out(sum_dy, d, "sum_dy")
    cdef double* psx = _f64_out(sum_dy_xc, d, "sum_dy_xc")
    cdef Call call = _call(OP_GRAD_SUMS, &grid, _layout(&grid, &planes, n, d, s, x, x),
                           _data(x), _data(dy), NULL, NULL)
    call.coef[0] = pc
    call.sums[0], call.sums[1] = ps, psx
    _call_loops(&call, x, x)


def grad_input(cnp.ndarray x not None, cnp.ndarray dy not None, cnp.ndarray dx not None,
               Py_ssize_t n, Py_ssize_t d, cnp.ndarray center not None,
               cnp.ndarray mean_dy not None, cnp.ndarray k_xc not None, cnp.ndarray k not None,
               Py_ssize_t s=0):
    """dx = k * ((dy - mean_dy) - k_xc * (x - center)) on the (n, d) views
    (s > 0: per channel of the (n, d, s) views)."""
    cdef Grid grid
    cdef Planes planes
    _check_backward(x, dy, dx, n, d, s)
    cdef const double* pc = _f64_in(center, d, "center")
    cdef const double* pm = _f64_in(mean_dy, d, "mean_dy")
    cdef const double* pq = _f64_in(k_xc, d, "k_xc")
    cdef const double* pk = _f64_in(k, d, "k")
    cdef Call call = _call(OP_GRAD_INPUT, &grid, _layout(&grid, &planes, n, d, s, x, dx),
                           _data(x), _data(dy), NULL, _data(dx))
    call.coef[0], call.coef[1], call.coef[2], call.coef[3] = pc, pm, pq, pk
    _call_loops(&call, x, dx)


# ---------------------------------------------------------------------------
# Readiness queries for the planner's trivial plan (no validation: False or
# 0 only sends the caller to the general, validating plan).

cdef Py_ssize_t _ready_rows(object x) noexcept:
    cdef cnp.ndarray a
    cdef Py_ssize_t n
    if type(x) is not cnp.ndarray:
        return 0
    a = <cnp.ndarray>x
    if cnp.PyArray_NDIM(a) < 2 or not _ready(a):
        return 0
    n = cnp.PyArray_DIMS(a)[0]
    if n < 1 or cnp.PyArray_SIZE(a) < n:
        return 0
    return cnp.PyArray_SIZE(a) // n


def ready_rows(object x):
    """D = prod(x.shape[1:]) if x is a kernel-ready ndarray of ndim >= 2 with
    N, D >= 1; otherwise 0."""
    return _ready_rows(x)


cdef inline bint _ready_vector(object v, Py_ssize_t d, int typenum) noexcept:
    cdef cnp.ndarray a
    if type(v) is not cnp.ndarray:
        return False
    a = <cnp.ndarray>v
    return (cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIMS(a)[0] == d and _ready(a)
            and cnp.PyArray_TYPE(a) == typenum)


def ready_vector(object v, Py_ssize_t d, cnp.ndarray like not None):
    """Whether v is a kernel-ready 1-D ndarray of d elements with like's dtype."""
    return _ready_vector(v, d, cnp.PyArray_TYPE(like))


cdef inline object _float_dtype(int t):
    """NumPy's own float64 or float32 dtype instance for typenum t."""
    return _F64 if t == cnp.NPY_DOUBLE else _F32


cdef object _running_ready(Py_ssize_t d, int t, object rm, object rv):
    """The dtype of running statistics rm, rv if both are None (float64: new
    zeros) or both kernel-ready vectors of d elements in dtype t or float64;
    otherwise None."""
    if rm is None and rv is None:
        return _F64
    if _ready_vector(rm, d, t) and _ready_vector(rv, d, t):
        return _float_dtype(t)
    if _ready_vector(rm, d, cnp.NPY_DOUBLE) and _ready_vector(rv, d, cnp.NPY_DOUBLE):
        return _F64
    return None


cdef inline bint _own_float(cnp.ndarray a, int t) noexcept:
    """a's dtype is NumPy's own instance of float32/float64 t (the planner's
    memo of dtypes keys on those instances)."""
    return <object>cnp.PyArray_DESCR(a) is _float_dtype(t)


def ready_operands(object x, Py_ssize_t d, object gamma, object beta, object rm, object rv):
    """A forward's operands, in one query: the running statistics' dtype
    (x's or float64; float64 where both are None: new zeros) if x is an
    ndarray of NumPy's own float32 or float64 dtype instance, gamma and beta
    are kernel-ready vectors of d elements in x's dtype, and rm, rv are both
    None or both such vectors of one of those dtypes; otherwise None.
    d = 0: x must also be a kernel-ready batch (see ready_rows), and d is
    its features.  (Otherwise x's layout is the caller's to check: a
    per-channel batch may be channels-last.)"""
    cdef int t
    if d == 0:
        d = _ready_rows(x)
        if d == 0:
            return None
    elif type(x) is not cnp.ndarray:
        return None
    t = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if not _own_float(<cnp.ndarray>x, t):
        return None
    if not (_ready_vector(gamma, d, t) and _ready_vector(beta, d, t)):
        return None
    return _running_ready(d, t, rm, rv)


def ready_grads(cnp.ndarray x not None, object x_dtype, object dy, bint flat, Py_ssize_t d,
                object gamma, object rm, object rv):
    """A backward's operands, in one query, beside x as the kernels read it
    (its rows of d values): the running statistics' dtype as ready_operands
    gives it (x's where rm and rv are None: after a training forward) if x
    is of x_dtype, NumPy's own float32/float64 instance; dy a kernel-ready
    ndarray of that dtype and x's shape (or, flat, the (N, d) view of it);
    and gamma a kernel-ready vector of d in that dtype.  Otherwise None."""
    cdef int t = cnp.PyArray_TYPE(x)
    cdef cnp.ndarray a
    cdef int k, nd
    if type(dy) is not cnp.ndarray or <object>cnp.PyArray_DESCR(x) is not x_dtype:
        return None
    a = <cnp.ndarray>dy
    if not (_ready(x) and _own_float(x, t) and _ready(a) and cnp.PyArray_TYPE(a) == t
            and _own_float(a, t) and _ready_vector(gamma, d, t)):
        return None
    nd = cnp.PyArray_NDIM(a)
    if cnp.PyArray_SIZE(a) != cnp.PyArray_SIZE(x) or nd < 2:
        return None
    if nd == cnp.PyArray_NDIM(x):
        for k in range(nd):
            if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(x)[k]:
                return None
    elif not (flat and nd == 2 and cnp.PyArray_DIMS(a)[0] == cnp.PyArray_DIMS(x)[0]):
        return None
    if rm is None and rv is None:
        return x_dtype
    return _running_ready(d, t, rm, rv)


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


def _last_level_cache_bytes(path="/sys/devices/system/cpu/cpu0/cache/index3/size"):
    """The L3 cache's size as Linux reports it ("32768K"), or 0 where unknown.
    (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) can be ten times too large in a VM.)"""
    try:
        with open(path) as handle:
            text = handle.read().strip().upper()
    except OSError:
        return 0
    digits, scale = text, 1
    for unit, size in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(unit):
            digits, scale = text[:len(text) - 1], size
    return int(digits) * scale if digits.isdigit() else 0


def _default_stream_min_bytes(l3_bytes):
    """Stream outputs whose training forward's three arrays (x, the cached
    copy, y) overflow the last-level cache: smaller ones, written normally,
    stay cached for the caller (measured with a 32 MiB L3: 32 x 65536
    float32, 8 MiB, trains 15 % faster unstreamed; 16 MiB arrays 15-40 %
    slower)."""
    return STREAM_MIN_BYTES if l3_bytes <= 0 else max(STREAM_MIN_BYTES, l3_bytes // 3 + 1)


_l3_read = _last_level_cache_bytes()
DEFAULT_STREAM_MIN_BYTES = _default_stream_min_bytes(_l3_read)
_stream_min_bytes = DEFAULT_STREAM_MIN_BYTES
# The last-level cache, as large as STREAM_MIN_BYTES assumes where unknown.
LLC_BYTES = _l3_read or 3 * STREAM_MIN_BYTES
_llc_bytes = LLC_BYTES
del _l3_read


def _set_tuning(strip_bytes=STRIP_BYTES, stream_min_bytes=DEFAULT_STREAM_MIN_BYTES,
                col_block=COL_BLOCK, page_bytes=PAGE_BYTES, max_strip_cols=MAX_STRIP_COLS,
                cache_stream_min_bytes=CACHE_STREAM_MIN_BYTES,
                stream_pages_max_cols=STREAM_PAGES_MAX_COLS, fold_max_cols=FOLD_MAX_COLS):
    """Work-partition knobs, for measuring the kernels (not a public API).
    Every call sets all of them (the defaults where not given); a rejected
    call changes none."""
    global _strip_bytes, _stream_min_bytes, _col_block, _page_bytes
    global _max_strip_cols, _cache_stream_min_bytes
    global _stream_pages_max_cols, _fold_max_cols
    if not 0 <= fold_max_cols <= FOLD_LANES:
        raise ValueError(f"fold_max_cols must be in 0..{FOLD_LANES}")
    if not 16 <= max_strip_cols <= MAX_STRIP_COLS:
        raise ValueError(f"max_strip_cols must be in 16..{MAX_STRIP_COLS}")
    if not 16 <= col_block <= COL_BLOCK:
        raise ValueError(f"col_block must be in 16..{COL_BLOCK}")
    _fold_max_cols = fold_max_cols
    _stream_pages_max_cols = stream_pages_max_cols
    _cache_stream_min_bytes = cache_stream_min_bytes
    _max_strip_cols = max_strip_cols
    _strip_bytes, _stream_min_bytes, _col_block = strip_bytes, stream_min_bytes, col_block
    _page_bytes = max(1, page_bytes)


def _stream_copy(cnp.ndarray dst not None, cnp.ndarray src not None):
    """dst = src, byte for byte, written with the kernels' streaming stores on
    the calling thread, the GIL released: the benchmark floor's way to write
    memory as bnfast does (no read-for-ownership, nothing left in the cache).
    Not a public API."""
    if not (cnp.PyArray_IS_C_CONTIGUOUS(dst) and cnp.PyArray_IS_C_CONTIGUOUS(src)):
        raise ValueError("_stream_copy needs C-contiguous arrays")
    if not cnp.PyArray_ISWRITEABLE(dst):
        raise ValueError("_stream_copy: dst is read-only")
    if cnp.PyArray_NBYTES(dst) != cnp.PyArray_NBYTES(src):
        raise ValueError(f"_stream_copy: dst has {cnp.PyArray_NBYTES(dst)} bytes, "
                         f"src {cnp.PyArray_NBYTES(src)}")
    cdef void* d = cnp.PyArray_DATA(dst)
    cdef const void* s = cnp.PyArray_DATA(src)
    cdef size_t nbytes = <size_t>cnp.PyArray_NBYTES(dst)
    with nogil:
        bnfast_stream(d, s, nbytes)
        bnfast_fence()


def _grid_info(Py_ssize_t n, Py_ssize_t d, Py_ssize_t itemsize, Py_ssize_t out_itemsize):
    """The work grid the kernels use for an (n, d) batch, as a dict (for tests)."""
    _size(n, d, 0)
    return _make_grid(n, d, itemsize, n * d * out_itemsize)


def _planes_info(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, Py_ssize_t itemsize):
    """The partition the kernels use for an (n, c, s) NCHW batch, as a dict (for tests)."""
    _size(n, c, s)
    return _make_planes(n, c, s, itemsize)


def get_num_threads():
    """Threads the kernels use (1 in a build without OpenMP)."""
    return _num_threads


def openmp_enabled():
    """Whether this build of the kernels has OpenMP."""
    return bool(BNFAST_OPENMP)


def cpu_level():
    """2: the CPU runs AVX-512 kernels, 1: AVX2 kernels, 0: baseline only."""
    return bnfast_cpu_level()


_num_threads = max(1, omp_get_max_threads()) if BNFAST_OPENMP else 1


from bnfast import _loops
_use_loops(_loops)
