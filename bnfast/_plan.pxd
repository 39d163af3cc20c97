# What the planner (_kernels.pyx, compiled once, for the baseline) hands the
# loops (_loops.pyx, compiled once per instruction set): the tuning table,
# the work partitions (a Grid over rows, a Planes over NCHW planes) and the
# Call that describes one operation.  Declarations only: both modules are
# compiled from this one file, and _kernels checks at import that the loops
# it runs were built with the same layouts (see _loops.LAYOUT).

from libc.string cimport memset

# The tuning table: every constant that trades speed for something, with
# what it trades.  The knobs among them (run-time settable, for measuring
# them: bench/tuning.py) are the planner's; see _kernels._set_tuning.
cdef enum:
    # Features per task in row blocks (tall batches): accumulators and
    # per-feature coefficients (a few x COL_BLOCK doubles) stay in L1/L2.
    COL_BLOCK = 1024
    # A full-height strip of input this big stays in L2 (1 MiB per core on
    # current x86, more elsewhere) while a task reads it a second time...
    STRIP_BYTES = 524288
    # ... and is at most this wide (short batches give wide strips: long
    # unit-stride runs per row, few per-feature set-ups per element).
    MAX_STRIP_COLS = 8192
    # Strips of big batches are at most 1/MIN_STRIP_TASKS of the features, so
    # that several threads share the work.
    MIN_STRIP_TASKS = 8
    # Strips at least this wide do statistics and output in one task (x read
    # from memory once); batches whose strips would be narrower (tall
    # batches) get row blocks: short row segments stream poorly.  (Doing
    # such strips' statistics in two phases instead was slower than row
    # blocks at every size measured: 256 x 1024 to 256 x 65536, 1568 x 256,
    # 512 x 512; training forward 3-40 %, eval 10-20 %.)  Compiled in: half
    # won 6 % on one cell on Zen 3 AVX2, double 12 % on one on the baseline
    # kernels, each losing elsewhere, so tuning it did not pay on both.
    FUSED_MIN_COLS = 1024
    # Narrower strips than this make row segments too short to stream well;
    # such batches are cut into row blocks instead.  (Compiled in: the sweep
    # of half, double, 1 and x64 found the default best on Zen 3 AVX2, and
    # one cell of 21 % for x64 on the baseline kernels, so tuning it at run
    # time did not pay on both.)
    MIN_STRIP = 32
    # Row-block tiles (tall batches) of this many bytes are read twice from L2.
    TILE_BYTES = 131072
    # Aim for at least this many tasks so that up to ~16 threads stay busy.
    TARGET_TASKS = 64
    # Below this many bytes of input one thread beats waking a team.
    PARALLEL_MIN_BYTES = 262144
    # Outputs this big are written with streaming stores: they cannot stay
    # in the cache for the caller anyway.  Where the last-level cache's size
    # is known, outputs whose training forward (x, the cached copy and y)
    # fits in it are not streamed (see _default_stream_min_bytes).
    STREAM_MIN_BYTES = 8388608
    # The training forward's copy of x is read only by the backward, after
    # the rest of the network's forward: it is streamed from this size up,
    # so that it neither pays the read-for-ownership of each line nor
    # evicts x and y from the cache (measured, training forward: 32 x 65536
    # float32 8 % and 8 x 150528 float32 6 % faster streamed; 256 x 1024,
    # 1-2 MiB, 20 % slower, so small copies are written normally).
    CACHE_STREAM_MIN_BYTES = 4194304
    # Element passes over rows this short also stream a large output (one
    # that g.stream streams): their tasks write long runs of whole rows, and
    # skipping the read-for-ownership pays where rows are short (measured,
    # 2 threads, 25 MiB and more: 64 to 256 features per row 15-65 % faster
    # in every op).  Since whole-line rows stream straight from the
    # registers, 320-512 features gain too (8-64 MiB outputs, every op: up
    # to 47 % on the AVX2 kernels, 37 % on the baseline kernels, no cell
    # slower beyond its noise); 1024 features gain on the AVX2 kernels
    # (1-27 %) but lose up to 22 % on the baseline kernels, which stream
    # through a staging row.
    STREAM_PAGES_MAX_COLS = 512
    # Element passes give each task about this much output, written in
    # address order: a fresh output's pages (2 MiB when transparent huge
    # pages are on) are then zeroed by the OS and filled by one thread while
    # they are still in cache, instead of being zeroed, evicted and written.
    PAGE_BYTES = 2097152
    # ... but at least this many rows per element-pass task.
    ELEM_MIN_ROWS = 16
    # ... and small enough that each thread gets this many row tasks.
    # (Compiled in: off, half and double won at most 6-7 % on one cell per
    # kernel and lost up to 73 % elsewhere.)
    ELEM_TASKS_PER_THREAD = 4
    # Whole rows shorter than this (channels-last batches with few channels,
    # narrow flat batches) are taken m at a time as one row of m * d lanes,
    # the per-feature values repeated m times (see _fold_rows): loops over
    # 3 or 16 features run as loops over >= FOLD_LANES lanes.
    FOLD_MAX_COLS = 64
    FOLD_LANES = 128
    # Folded rows are at most this long (stack arrays of doubles).
    FOLD_MAX_LANES = 256
    # Scratch doubles that the driver keeps on the stack (16 KiB).
    LOCAL_SCRATCH = 2048
    # Features per piece where a per-feature set-up converts its operands to
    # float64 (a broadcast gamma, mixed dtypes: _set_up_converted), in 8
    # stack rows of this many doubles (4 KiB).  Not a speed trade on the
    # layer's operands, which never take that route.
    SETUP_PIECE = 64

    # Per-channel (NCHW planes) kernels, _planes.pxi:
    # Partial sums per channel and task (bnfast_*_sums work in 16 lanes).
    LANES = 16
    HALF_LANES = 8
    # A reduction task covers about this much of one channel...
    PLANE_TASK_BYTES = 262144
    # ... and a block of channels whose planes of one sample make a
    # contiguous run of up to this many bytes: read one channel at a time,
    # the planes are runs far apart (a few hundred bytes to a few KiB), too
    # short for the hardware prefetchers to reach full speed.  Measured, 2
    # threads: 8 x 256 x 14 x 14 (runs of 16 KiB against single planes)
    # training and backward 1.15x faster; 32 x 64 x 56 x 56 float32 (runs of
    # 100 KiB against single 12 KiB planes) the backward's sums 1.6x, the
    # training forward 1.13-1.2x and the backward 1.1-1.4x faster ...
    CHANNEL_RUN_BYTES = 262144
    # ... but at most this many channels, and blocks narrow enough that the
    # reductions still have MIN_REDUCTION_TASKS tasks where there are channels.
    MAX_CHANNEL_BLOCK = 64
    MIN_REDUCTION_TASKS = 16
    # Whole blocks: batches too big for the last-level cache run a block of
    # channels (NCHW, 16 channels or more, x of stream_min_bytes or more) or
    # of columns (row blocks, x of twice that) through its statistics and
    # its element pass in one task, the pass reading the block from the
    # cache instead of memory, where each thread's block of x (and of dy) is
    # at most 1 / (FUSED_BLOCK_PARTS * threads) of that cache: x and dy of
    # the blocks in flight then fill at most half of it.  Measured in one
    # process against the phases, 2 threads, 32 MiB L3: 32 x 64 x 56 x 56
    # NCHW float32 backward 1.25-1.34x, training 1.04-1.11x; 64 x 256 x 28 x
    # 28 float32 (blocks of 3.2 MB) 1.18-1.23x, 1.10-1.12x; 256 x 65536
    # float32 and float64 1.18-1.40x, 1.04-1.37x (baseline kernels 1.04-1.27x);
    # blocks of 6.4 MB (float64, 128 x 64 x 56 x 56 float32) gained nothing,
    # and lost up to 16 % beyond.
    FUSED_BLOCK_PARTS = 4


cdef struct Grid:
    # The partition of a batch's (n, d) rows into tasks (_kernels._make_grid).
    Py_ssize_t n_rows
    Py_ssize_t n_cols
    Py_ssize_t col_block
    Py_ssize_t n_col_blocks
    Py_ssize_t block_rows
    Py_ssize_t chunk_rows
    Py_ssize_t n_chunks
    Py_ssize_t n_tasks
    Py_ssize_t page_rows     # element-pass tasks: rows of each ...
    Py_ssize_t page_cols     # ... and columns (a multiple of col_block)
    Py_ssize_t n_col_splits
    Py_ssize_t n_page_tasks
    Py_ssize_t fold          # rows per folded row in passes over whole rows (1: none)
    int n_threads
    bint fused           # strips wide enough to do a whole operation per task
    bint stream          # write strip outputs with streaming stores
    bint stream_cache    # copy x to the cache with streaming stores
    bint stream_pages    # write row-major (page-ordered) outputs with streaming stores
    bint whole_blocks    # row blocks: a task takes a column block through every phase


cdef struct Vec:
    # A per-feature float32/float64 vector; stride 0 broadcasts one value.
    const void* data
    Py_ssize_t stride
    bint is_f64


cdef struct OutVec:
    # A per-feature float32/float64 result, contiguous; NULL data: not wanted.
    void* data
    bint is_f64


cdef struct TrainArgs:
    # Everything a training forward reads and writes besides x, cache and y.
    const Vec* gamma
    const Vec* beta
    double eps
    double* mean
    double* var
    double* invstd                 # may be NULL
    const Vec* rm_old
    const Vec* rv_old
    OutVec rm_new                  # data NULL: no running update
    OutVec rv_new
    double momentum
    double one_minus_momentum
    double var_correction          # running var gets var * this: 1, or n / (n - 1) (unbiased)


cdef struct GradArgs:
    # What a training backward reads and writes besides x, dy and dx.
    const double* mean
    const double* invstd
    const Vec* gamma
    OutVec* dgamma
    OutVec* dbeta


cdef struct EvalArgs:
    # What an eval backward reads besides x and dy.
    const Vec* gamma
    const Vec* rm
    const Vec* rv
    double eps


cdef struct Planes:
    # The partition of an (n, c, s) NCHW batch into tasks (_kernels._make_planes).
    Py_ssize_t n, c, s
    Py_ssize_t chunk_n         # samples per reduction task
    Py_ssize_t n_chunks
    Py_ssize_t channel_block   # channels per reduction task
    Py_ssize_t n_channel_blocks
    Py_ssize_t n_tasks         # n_chunks * n_channel_blocks reduction tasks
    Py_ssize_t per_task        # planes per element-pass task
    Py_ssize_t n_elem_tasks
    int n_threads
    bint stream_cache          # copy x to the cache with streaming stores
    bint whole_blocks          # a task takes a channel block through sums and pass


cdef enum Op:
    OP_TRAIN_FORWARD
    OP_EVAL_FORWARD
    OP_TRAIN_BACKWARD
    OP_EVAL_BACKWARD
    OP_MOMENTS
    OP_AFFINE
    OP_GRAD_SUMS
    OP_GRAD_INPUT


cdef struct Call:
    # One operation as an entry point hands it to the loops (_dispatch).
    Op op
    const Grid* grid            # the rows partition (zeroed when planes is set)
    const Planes* planes        # the NCHW partition of a batch given as planes, or NULL
    const void* x               # the batch, in the input dtype
    const void* dy              # backward: dout, in the input dtype
    void* cache                 # a copy of x to write (input dtype), or NULL
    void* y                     # the output (y or dx), in the output dtype
    const void* args            # TrainArgs, GradArgs or EvalArgs, by operation
    const Vec* vec[4]           # eval forward: gamma, beta, running mean, running var
    double eps
    OutVec* dgamma              # eval backward
    OutVec* dbeta
    double* sums[2]             # moments: mean, M2; grad_sums: sum(dy), sum(dy * xc)
    const double* coef[4]       # affine: center, scale, shift; grad_sums: center;
                                # grad_input: center, mean(dy), k_xc, k


# The loops' one entry (_loops._dispatch): run c on float64 (in64) or float32
# input, writing float64 (out64) or float32 output.  Non-zero: no memory for
# the work space.
ctypedef int (*dispatch_t)(const Call* c, bint in64, bint out64) noexcept nogil


cdef inline const char* _dispatch_name() noexcept:
    """The name of the capsule that carries a loops module's _dispatch."""
    return b"bnfast._loops.dispatch"


cdef inline tuple _struct_sizes():
    """The sizes of the structures above as this module was compiled: the
    planner runs only loops compiled with the same (_kernels._use_loops)."""
    return (sizeof(Call), sizeof(Grid), sizeof(Planes), sizeof(TrainArgs), sizeof(GradArgs),
            sizeof(EvalArgs), sizeof(Vec), sizeof(OutVec))


cdef inline Call _call(Op op, const Grid* grid, const Planes* planes, const void* x,
                       const void* dy, void* cache, void* y) noexcept nogil:
    cdef Call c
    memset(&c, 0, sizeof(c))
    c.op = op
    c.grid = grid
    c.planes = planes
    c.x = x
    c.dy = dy
    c.cache = cache
    c.y = y
    return c


cdef inline Py_ssize_t _ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b
