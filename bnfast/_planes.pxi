# Per-channel (spatial) batch normalization of NCHW-contiguous batches,
# included by _loops.pyx.  The batch is (N, C, S): N samples, C channels,
# S = prod(spatial) contiguous elements per (sample, channel) "plane".  Each
# channel's statistics run over its N planes.  (A channels-last batch is the
# flat (N*S, C) case and runs on the flat kernels.)
#
# Reductions are cut into tasks (sample chunk, block of channels) by a
# partition that depends only on (N, C, S, itemsize); a task reads its
# samples' planes of the block in address order and, per channel, sums x - K
# (K: a per-channel shift, the mean of the channel's first elements) and its
# square into LANES independent partial sums, so the loop vectorizes and the
# rounding does not depend on how the vector unit is used, nor on the block;
# chunks are added in chunk order.  As
# in the flat statistics, a channel whose sums are ill-conditioned or not
# finite is redone by the exact two-pass.  Element passes walk planes in
# address order.

cdef extern from "planes.h":
    void bnfast_lane_sums_d(bint grad, const double* x, const double* g, Py_ssize_t n,
                            Py_ssize_t planes, Py_ssize_t stride, double k, double* a1,
                            double* a2, double* t1, double* t2) noexcept nogil
    void bnfast_lane_sums_f(bint grad, const float* x, const float* g, Py_ssize_t n,
                            Py_ssize_t planes, Py_ssize_t stride, double k, double* a1,
                            double* a2, double* t1, double* t2) noexcept nogil


cdef void _channel_shift(const Planes* p, const in_t* x, Py_ssize_t c0, Py_ssize_t c1,
                         double* shift) noexcept nogil:
    """Per channel c0..c1: the shift of the rows (_shift_of) over its first
    plane's values, one to a row: the mean of its first (up to 8) elements,
    summed pairwise, 0 if not finite."""
    cdef Py_ssize_t ch
    for ch in range(c0, c1):
        _shift_of(x + ch * p.s, 1, p.s, 0, 1, &shift[ch])


cdef inline void _lanes_total(const double* lanes, double tail, double* total) noexcept nogil:
    """total = tail + the LANES partial sums, added in a fixed pairwise order."""
    cdef double half[HALF_LANES]
    cdef Py_ssize_t j, width = HALF_LANES
    for j in range(width):
        half[j] = lanes[j] + lanes[j + width]
    while width > 1:
        width //= 2
        for j in range(width):
            half[j] = half[j] + half[j + width]
    total[0] = half[0] + tail


cdef inline void _reduction_task(const Planes* p, Py_ssize_t t, Py_ssize_t* n0, Py_ssize_t* n1,
                                 Py_ssize_t* c0, Py_ssize_t* c1) noexcept nogil:
    """Samples and channels of reduction task t = (chunk, channel block)."""
    cdef Py_ssize_t k = t // p.n_channel_blocks
    n0[0] = k * p.chunk_n
    n1[0] = n0[0] + p.chunk_n if n0[0] + p.chunk_n < p.n else p.n
    c0[0] = (t - k * p.n_channel_blocks) * p.channel_block
    c1[0] = c0[0] + p.channel_block if c0[0] + p.channel_block < p.c else p.c


cdef inline void _plane_sums(const in_t* x, const in_t* dy, Py_ssize_t s, Py_ssize_t planes,
                             Py_ssize_t stride, double k, double* a1, double* a2, double* t1,
                             double* t2, const sums_t* kind) noexcept nogil:
    """The sums (sums_t; kind: NULL, naming it) of `planes` planes, stride
    values apart, added to the lane sums a1, a2 and, past each plane's last
    whole 16 values, to t1, t2 (planes.h)."""
    if in_t is double:
        bnfast_lane_sums_d(sums_t is GradSums, x, dy, s, planes, stride, k, a1, a2, t1, t2)
    else:
        bnfast_lane_sums_f(sums_t is GradSums, x, dy, s, planes, stride, k, a1, a2, t1, t2)


cdef void _plane_sums_task(const Planes* p, Py_ssize_t t, const in_t* x, const in_t* dy,
                           const double* center, double* part,
                           const sums_t* kind) noexcept nogil:
    """Task t = (chunk k, channels c0..c1): per channel, _plane_sums over the
    chunk's planes, samples in order, into part's rows k and n_chunks + k.
    A block of channels is read sample by sample, each sample's planes of
    the block one run; a single channel's planes go to one call, which keeps
    its lane sums in registers."""
    cdef Py_ssize_t n0, n1, c0, c1, i, l, b, off, nb, k = t // p.n_channel_blocks
    cdef double a1[MAX_CHANNEL_BLOCK * LANES]
    cdef double a2[MAX_CHANNEL_BLOCK * LANES]
    cdef double t1[MAX_CHANNEL_BLOCK]
    cdef double t2[MAX_CHANNEL_BLOCK]
    _reduction_task(p, t, &n0, &n1, &c0, &c1)
    nb = c1 - c0
    for l in range(nb * LANES):
        a1[l] = 0.0
        a2[l] = 0.0
    for b in range(nb):
        t1[b] = 0.0
        t2[b] = 0.0
    if nb == 1:
        off = (n0 * p.c + c0) * p.s
        _plane_sums(x + off, dy + off if dy != NULL else NULL, p.s, n1 - n0, p.c * p.s,
                    center[c0], a1, a2, t1, t2, kind)
    else:
        for i in range(n0, n1):
            for b in range(nb):
                off = (i * p.c + c0 + b) * p.s
                _plane_sums(x + off, dy + off if dy != NULL else NULL, p.s, 1, 0, center[c0 + b],
                            &a1[b * LANES], &a2[b * LANES], &t1[b], &t2[b], kind)
    for b in range(nb):
        _lanes_total(&a1[b * LANES], t1[b], &part[k * p.c + c0 + b])
        _lanes_total(&a2[b * LANES], t2[b], &part[(p.n_chunks + k) * p.c + c0 + b])


cdef int _planes_sums(const Call* c, const in_t* x, const in_t* dy, const double* center,
                      double* s1, double* s2) noexcept nogil:
    """Per channel, the two sums of _plane_sums over the whole batch, the
    chunks added in order."""
    cdef const Planes* p = c.planes
    cdef Work w = _work(p.n_threads, 0, 0)
    if _new_part(&w, 2 * p.n_chunks * p.c):
        return -1
    w.coef[0] = center
    _phase(&w, STEP_PLANE_MOMENTS if dy == NULL else STEP_PLANE_GRAD_SUMS, p.n_tasks, True)
    _drive(c, &w, x, <double*>NULL)
    _sum_chunk_columns(p.n_chunks, p.c, w.part, s1, s2, 0, p.c)
    free(w.raw)
    return 0


cdef void _channel_moments(const Planes* p, const in_t* x, const double* shift,
                           Py_ssize_t c0, Py_ssize_t c1, double* mean, double* m2) noexcept nogil:
    """Channels c0..c1: their sums (in mean, m2) -> mean relative to the
    shift and M2, as a rows block's; ill-conditioned ones by the two-pass."""
    cdef Py_ssize_t ch
    for ch in range(c0, c1):
        if _block_moments(mean[ch], m2[ch], mean[ch] / <double>(p.n * p.s), &mean[ch],
                          &m2[ch]):
            _two_pass(x + ch * p.s, p.c * p.s, p.n, p.s, shift[ch], &mean[ch], &m2[ch])
            if m2[ch] < 0.0:
                m2[ch] = 0.0


cdef int _planes_moments(const Call* c, const in_t* x, double* shift, double* mean,
                         double* m2) noexcept nogil:
    """Per channel: shift, mean relative to it and M2."""
    cdef const Planes* p = c.planes
    _channel_shift(p, x, 0, p.c, shift)
    if _planes_sums(c, x, <const in_t*>NULL, shift, mean, m2) != 0:
        return -1
    _channel_moments(p, x, shift, 0, p.c, mean, m2)
    return 0


cdef inline void _copy_run(const Planes* p, in_t* cache, const in_t* x, Py_ssize_t start,
                           Py_ssize_t end) noexcept nogil:
    """cache = x over elements start..end: streamed (whole lines, see
    bnfast_stream_piece) where the cache copy is large."""
    if p.stream_cache:
        bnfast_stream_piece(cache, x, p.n * p.c * p.s * sizeof(in_t), start * sizeof(in_t),
                            end * sizeof(in_t))
    else:
        memcpy(cache + start, x + start, (end - start) * sizeof(in_t))


cdef void _plane_run(const Planes* p, Py_ssize_t q0, Py_ssize_t q1, const in_t* x,
                     const in_t* dy, in_t* cache, out_t* y, const double* const* k,
                     const pass_t* kind) noexcept nogil:
    """The pass (pass_t) over planes q0..q1, in address order, each with its
    channel's coefficients k[i][channel]; and cache = x unless NULL: here,
    not in the statistics tasks, whose planes interleave across threads and
    would share cache lines at their ends."""
    cdef Py_ssize_t q, i, off
    cdef Py_ssize_t ch = q0 % p.c       # plane q's channel (no division per plane)
    # the kind's coefficients: k[0..2] (affine), k[0..3] (dx), k[0] (scale)
    cdef int n_coef = 3 if pass_t is AffinePass else (4 if pass_t is GradInputPass else 1)
    # The plane's coefficients, in locals that the output cannot alias: the
    # loops keep them in registers instead of loading them at every store.
    cdef double kv[4]
    cdef const double* kq[4]
    for i in range(4):
        kq[i] = &kv[i]
        kv[i] = 0.0
    for q in range(q0, q1):
        for i in range(n_coef):
            kv[i] = k[i][ch]
        off = q * p.s
        if cache != NULL:
            _copy_run(p, cache, x, off, off + p.s)
        _pass_step(x + off, NULL if pass_t is AffinePass else dy + off, y + off, 0, 1, p.s, kq,
                   kind, <const PerPlane*>NULL)
        ch = ch + 1 if ch + 1 < p.c else 0


cdef void _plane_pass_task(const Planes* p, Py_ssize_t t, const in_t* x, const in_t* dy,
                           in_t* cache, out_t* y, const double* const* k,
                           const pass_t* kind) noexcept nogil:
    """Element-pass task t: _plane_run over its planes."""
    cdef Py_ssize_t q0 = t * p.per_task, q1 = t * p.per_task + p.per_task
    if q1 > p.n * p.c:
        q1 = p.n * p.c
    _plane_run(p, q0, q1, x, dy, cache, y, k, kind)


cdef void _plane_train_block(const Planes* p, Py_ssize_t b, const in_t* x, in_t* cache,
                             out_t* y, const TrainArgs* a, double* part,
                             double* work) noexcept nogil:
    """Channel block b of the training forward in one task: shifts, the sums
    of each chunk (added in chunk order), statistics, then y and cache = x,
    whose second read of the block comes from cache.  work rows: shift (then
    the affine shift), scale, temp (as _planes_train_forward's)."""
    cdef Py_ssize_t k, i, n0, n1, c0, c1, nc = p.c
    cdef const double* kk[4]
    _reduction_task(p, b, &n0, &n1, &c0, &c1)     # task b: chunk 0, channel block b
    _channel_shift(p, x, c0, c1, work)
    for k in range(p.n_chunks):
        _plane_sums_task(p, k * p.n_channel_blocks + b, x, <const in_t*>NULL, work, part,
                         <const StatSums*>NULL)
    _sum_chunk_columns(p.n_chunks, nc, part, a.mean, a.var, c0, c1)
    _channel_moments(p, x, work, c0, c1, a.mean, a.var)
    _finish_stats(a, p.n * p.s, c0, c1 - c0, work + c0, work + nc + c0, work + c0,
                  work + 2 * nc + c0)
    kk[0], kk[1], kk[2], kk[3] = a.mean, work + nc, work, NULL
    for i in range(p.n):
        _plane_run(p, i * nc + c0, i * nc + c1, x, <const in_t*>NULL, cache, y, kk,
                   <const AffinePass*>NULL)


cdef void _plane_backward_block(const Planes* p, Py_ssize_t b, const in_t* x, const in_t* dy,
                                out_t* dx, const GradArgs* a, double* part,
                                double* work) noexcept nogil:
    """Channel block b of the training backward in one task: the sums of
    each chunk (the reduction tasks' own, added in chunk order), the
    coefficients, then dx, whose second read of the block comes from cache.
    work rows: sum_dy, sum_dy_xc, k_xc, k (as _planes_train_backward's)."""
    cdef Py_ssize_t k, i, n0, n1, c0, c1, nc = p.c
    cdef const double* kk[4]
    _reduction_task(p, b, &n0, &n1, &c0, &c1)     # task b: chunk 0, channel block b
    for k in range(p.n_chunks):
        _plane_sums_task(p, k * p.n_channel_blocks + b, x, dy, a.mean, part,
                         <const GradSums*>NULL)
    _sum_chunk_columns(p.n_chunks, nc, part, work, work + nc, c0, c1)
    _backward_coefficients(p.n * p.s, c0, c1 - c0, a.invstd + c0, a.gamma, work + c0,
                           work + nc + c0, work + 2 * nc + c0, work + 3 * nc + c0, a.dgamma,
                           a.dbeta)
    kk[0], kk[1], kk[2], kk[3] = a.mean, work, work + 2 * nc, work + 3 * nc
    for i in range(p.n):
        _plane_run(p, i * nc + c0, i * nc + c1, x, dy, <in_t*>NULL, dx, kk,
                   <const GradInputPass*>NULL)


cdef void _plane_copy_task(const Planes* p, Py_ssize_t t, const in_t* x,
                           in_t* cache) noexcept nogil:
    """cache = x over task t's planes (a contiguous range)."""
    cdef Py_ssize_t planes = p.n * p.c, q0 = t * p.per_task
    cdef Py_ssize_t q1 = q0 + p.per_task if q0 + p.per_task < planes else planes
    _copy_run(p, cache, x, q0 * p.s, q1 * p.s)


cdef int _planes_pass(const Call* c, Step step, const in_t* x, out_t* y, const double* c0,
                      const double* c1, const double* c2, const double* c3) noexcept nogil:
    """An element pass over every plane: step's tasks with coefficients c0..c3."""
    cdef Work w = _work(c.planes.n_threads, 0, 0)
    w.coef[0], w.coef[1], w.coef[2], w.coef[3] = c0, c1, c2, c3
    _phase(&w, step, c.planes.n_elem_tasks, False)
    return _drive(c, &w, x, y)


cdef int _planes_whole_blocks(const Call* c, Step step, const in_t* x, out_t* y,
                              double* work) noexcept nogil:
    """step (a whole-block task) over every channel block, the tasks sharing
    the per-chunk partials and the operation's work rows."""
    cdef Work w = _work(c.planes.n_threads, 0, 0)
    cdef int status
    if _new_part(&w, 2 * c.planes.n_chunks * c.planes.c):
        return -1
    w.totals = work
    _phase(&w, step, c.planes.n_channel_blocks, True)
    status = _drive(c, &w, x, y)
    free(w.raw)
    return status


cdef int _planes_train_forward(const Call* c, const in_t* x, out_t* y) noexcept nogil:
    """Per-channel training forward: statistics, then y (and cache = x)."""
    cdef const TrainArgs* a = <const TrainArgs*>c.args
    cdef Py_ssize_t nc = c.planes.c
    cdef int status
    cdef double* work = <double*>malloc(4 * nc * sizeof(double))
    if work == NULL:
        return -1
    # work rows: shift (then the affine shift), scale, temp, spare
    if c.planes.whole_blocks:
        status = _planes_whole_blocks(c, STEP_PLANE_TRAIN_BLOCK, x, y, work)
        free(work)
        return status
    if _planes_moments(c, x, work, a.mean, a.var) != 0:
        free(work)
        return -1
    _finish_stats(a, c.planes.n * c.planes.s, 0, nc, work, work + nc, work, work + 2 * nc)
    _planes_pass(c, STEP_PLANE_AFFINE, x, y, a.mean, work + nc, work, NULL)
    free(work)
    return 0


cdef int _planes_eval_forward(const Call* c, const in_t* x, out_t* y) noexcept nogil:
    """y = gamma * (x - rm) / sqrt(rv + eps) + beta per channel, one pass."""
    cdef Py_ssize_t nc = c.planes.c
    cdef double* work = <double*>malloc(4 * nc * sizeof(double))
    if work == NULL:
        return -1
    _eval_coefficients(c.vec[0], c.vec[1], c.vec[2], c.vec[3], c.eps, 0, nc, work, work + nc,
                       work + 2 * nc)
    _planes_pass(c, STEP_PLANE_AFFINE, x, y, work, work + nc, work + 2 * nc, NULL)
    free(work)
    return 0


cdef int _planes_train_backward(const Call* c, const in_t* x, out_t* dx) noexcept nogil:
    """Backward of the per-channel training forward: sums, then dx."""
    cdef const GradArgs* a = <const GradArgs*>c.args
    cdef Py_ssize_t nc = c.planes.c
    cdef int status
    cdef double* work = <double*>malloc(4 * nc * sizeof(double))
    if work == NULL:
        return -1
    # work rows: sum_dy (then mean dy), sum_dy_xc, k_xc, k
    if c.planes.whole_blocks:
        status = _planes_whole_blocks(c, STEP_PLANE_BACKWARD_BLOCK, x, dx, work)
        free(work)
        return status
    if _planes_sums(c, x, <const in_t*>c.dy, a.mean, work, work + nc) != 0:
        free(work)
        return -1
    _backward_coefficients(c.planes.n * c.planes.s, 0, nc, a.invstd, a.gamma, work, work + nc,
                           work + 2 * nc, work + 3 * nc, a.dgamma, a.dbeta)
    _planes_pass(c, STEP_PLANE_GRAD_INPUT, x, dx, a.mean, work, work + 2 * nc, work + 3 * nc)
    free(work)
    return 0


cdef int _planes_eval_backward(const Call* c, const in_t* x, out_t* dx) noexcept nogil:
    """Gradient of the per-channel eval-mode function (statistics constant)."""
    cdef Py_ssize_t nc = c.planes.c
    cdef double* work = <double*>malloc(5 * nc * sizeof(double))
    if work == NULL:
        return -1
    # work rows: running mean, invstd, dx's scale, sum_dy, sum_dy_xc
    _eval_grad_coefficients(<const EvalArgs*>c.args, nc, work, work + nc, work + 2 * nc)
    if _planes_sums(c, x, <const in_t*>c.dy, work, work + 3 * nc, work + 4 * nc) != 0:
        free(work)
        return -1
    _eval_grad_results(c, nc, work + nc, work + 3 * nc, work + 4 * nc)
    _planes_pass(c, STEP_PLANE_SCALE, x, dx, work + 2 * nc, NULL, NULL, NULL)
    free(work)
    return 0
