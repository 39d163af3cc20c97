"""The kernels: every work partition gives the twin's numbers, results do not
depend on the thread count, and the entry points refuse what would be unsafe."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import bnfast
from bnfast._native import kernels
from conftest import assert_close, dx_scale, make_params, pair

# Shapes that land in each partition of the (N, D) grid with default tuning:
# one strip; several strips; row blocks merged across chunks; streaming stores.
SHAPES = {
    "one strip": (32, 128),
    "strips": (256, 1024),
    "row blocks": (5000, 40),
    "row blocks, wide": (2100, 1500),
    "streamed": (24, 50000),
    # rows this short are folded (several rows per vector loop), with leftover rows
    "folded short rows": (4099, 3),
    "folded, row blocks": (70001, 5),
}
OPENMP = bnfast.build_info()["openmp"]
# A serial build (BNFAST_OPENMP=0, the macOS wheels) runs one thread only.
THREADS = (1, 2, 3) if OPENMP else (1,)


@contextlib.contextmanager
def threads(n):
    before = bnfast.get_num_threads()
    bnfast.set_num_threads(n)
    try:
        yield
    finally:
        bnfast.set_num_threads(before)


@contextlib.contextmanager
def tuning(**knobs):
    kernels._set_tuning(**knobs)
    try:
        yield
    finally:
        kernels._set_tuning()


def run_all(x, dout, gamma, beta):
    """Every result a layer produces for one train/backward/eval/backward round."""
    layer = bnfast.BatchNormalization(gamma, beta, running_mean=np.zeros(x.shape[1]),
                                      running_var=np.ones(x.shape[1]))
    out = [layer.forward(x), layer.backward(dout), layer.dgamma, layer.dbeta,
           layer.running_mean, layer.running_var, layer.xn, layer.std]
    out += [layer.forward(x, False), layer.backward(dout), layer.dgamma, layer.dbeta]
    return out


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_each_partition_matches_the_twin(rng, name, dtype):
    shape = SHAPES[name]
    gamma, beta = make_params(rng, shape[1], dtype)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    layer, twin = pair(gamma, beta)
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    assert_close(layer.forward(x), twin.forward(x), rtol=rtol)
    assert_close(layer.backward(dout), twin.backward(dout), rtol=rtol, scale=dx_scale(twin, dout))
    assert_close(layer.dgamma, twin.dgamma, rtol=rtol)
    assert_close(layer.running_var, twin.running_var, rtol=rtol)
    assert_close(layer.forward(x, False), twin.forward(x, False), rtol=rtol)
    assert_close(layer.backward(dout), twin.backward(dout), rtol=rtol)


@pytest.mark.skipif(not OPENMP, reason="serial build (no OpenMP): one thread only")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(SHAPES))
def test_results_are_bitwise_identical_for_any_thread_count(rng, name, dtype):
    shape = SHAPES[name]
    gamma, beta = make_params(rng, shape[1], dtype)
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    with threads(1):
        expected = run_all(x, dout, gamma, beta)
    for n in (2, 3, 4, 7):
        with threads(n):
            got = run_all(x, dout, gamma, beta)
        for a, b in zip(got, expected):
            assert np.array_equal(a, b), f"{n} threads differ from 1 thread"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(13, 75), (9, 2003), (3001, 75), (8, 75), (5, 2003)])
def test_a_features_numbers_do_not_depend_on_its_column(rng, shape, dtype):
    """Reversing the features reverses every result bitwise: a feature that
    falls in a loop's vector body and one in its scalar tail (each width
    leaves 3 features over whole vectors) get the same operations in the
    same order, fused multiply-adds included."""
    n, d = shape
    gamma, beta = make_params(rng, d, dtype)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    rm = rng.standard_normal(d).astype(dtype)
    rv = (rng.random(d) + 0.5).astype(dtype)
    flip = np.arange(d)[::-1]

    def results(order):
        xs, dys = np.ascontiguousarray(x[:, order]), np.ascontiguousarray(dout[:, order])
        layer = bnfast.BatchNormalization(gamma[order], beta[order], running_mean=rm[order],
                                          running_var=rv[order])
        out = [layer.forward(xs), layer.backward(dys), layer.dgamma, layer.dbeta,
               layer.running_mean, layer.running_var, layer.std]
        out += [layer.forward(xs, False), layer.backward(dys), layer.dgamma, layer.dbeta]
        # the float64 sums behind them (float32 outputs would round a last-bit change away)
        mean, m2, sum_dy, sum_dy_xc = (np.empty(d) for _ in range(4))
        kernels.moments(xs, None, n, d, mean, m2)
        kernels.grad_sums(xs, dys, n, d, mean, sum_dy, sum_dy_xc)
        return out + [mean, m2, sum_dy, sum_dy_xc]

    for straight, flipped in zip(results(np.arange(d)), results(flip)):
        assert np.array_equal(straight[..., flip], flipped)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_a_positions_eval_output_does_not_depend_on_where_it_is(rng, dtype, layout):
    """The same for the positions of a per-channel plane (19 = 2 x 8 + 3):
    with the statistics fixed (eval mode), reversing them reverses y.  (For
    float32 this holds at output precision: the float64 arithmetic behind
    a float32 y is visible only through its rounding.)"""
    c = 5
    x = (rng.standard_normal((4, c, 19)) * 3 + 2).astype(dtype)
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    gamma, beta = make_params(rng, c, dtype)
    layer = bnfast.BatchNormalization(gamma, beta, per_channel=True,
                                      running_mean=rng.standard_normal(c).astype(dtype),
                                      running_var=(rng.random(c) + 0.5).astype(dtype))
    straight = layer.forward(x, False)
    flipped = layer.forward(x[:, :, ::-1], False)
    assert straight.dtype == dtype
    assert np.array_equal(straight[:, :, ::-1], flipped)


KNOBS = [
    dict(strip_bytes=1),                        # never strips: row blocks everywhere
    dict(strip_bytes=1 << 30),                  # always strips
    dict(col_block=16, page_bytes=64),          # many small tasks
    dict(stream_min_bytes=0),                   # streaming stores for every output
    dict(cache_stream_min_bytes=0),             # ... and for every cached copy of x
    dict(stream_min_bytes=0, stream_pages_max_cols=1 << 30, strip_bytes=1),  # streamed pages
    dict(max_strip_cols=16),                    # many narrow strips
    dict(page_bytes=1 << 30),                   # element tasks by thread count alone
    dict(fold_max_cols=0),                      # short rows never folded
    dict(fold_max_cols=0, stream_min_bytes=0, cache_stream_min_bytes=0),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("shape", [(7, 13), (300, 70), (33, 2000), (999, 6)])
def test_every_work_partition_gives_the_same_numbers(rng, knobs, shape):
    """Partitions change rounding only within a few ulps; the twin decides."""
    gamma, beta = make_params(rng, shape[1])
    x = rng.standard_normal(shape) * 4 + 3
    dout = rng.standard_normal(shape)
    with threads(1):
        baseline = run_all(x, dout, gamma, beta)
    with tuning(**knobs):
        for n in THREADS:
            with threads(n):
                got = run_all(x, dout, gamma, beta)
            if n == 1:
                first = got
            for a, b, c in zip(got, first, baseline):
                assert np.array_equal(a, b), "thread count changed the result"
                assert_close(a, c, rtol=1e-12, scale=float(np.max(np.abs(c))) + 1.0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the inf's feature
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_whole_column_blocks_give_the_three_phase_bits(rng, dtype):
    """Row blocks of batches far too big for the cache run each column block
    through statistics, merge and pass in one task; forced on a small batch
    (several row chunks, a last block narrower than the others, a feature far
    from zero that needs the exact two-pass, one that is not finite), every
    result is bitwise the three phases' one, on any thread count."""
    n, d = 3000, 100
    blocks = dict(strip_bytes=1, col_block=16)        # 7 column blocks, 2-3 row chunks
    gamma, beta = make_params(rng, d, dtype)
    x = rng.standard_normal((n, d)) * 2 + 1
    x[:, 5] += 1e9
    x = x.astype(dtype)
    x[7, 9] = np.inf
    dout = rng.standard_normal(x.shape).astype(dtype)
    with tuning(stream_min_bytes=1 << 40, **blocks):
        assert not kernels._grid_info(n, d, x.itemsize, x.itemsize)["whole_blocks"]
        expected = run_all(x, dout, gamma, beta)
    for n_threads in THREADS:
        with threads(n_threads), tuning(stream_min_bytes=0, **blocks):
            g = kernels._grid_info(n, d, x.itemsize, x.itemsize)
            assert g["whole_blocks"] and g["n_chunks"] > 1 and d % g["col_block"]
            got = run_all(x, dout, gamma, beta)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert np.array_equal(a, b, equal_nan=True), (n_threads, i)


def _train_outputs(x, gamma, beta, rm_old, rv_old, stat_dtype, shape=None):
    """Everything train_forward writes, for one set of per-feature operands."""
    n, d = x.shape
    y, mean, var, invstd = np.empty_like(x), np.empty(d), np.empty(d), np.empty(d)
    rm_new, rv_new = np.empty(d, stat_dtype), np.empty(d, stat_dtype)
    kernels.train_forward(x, None, y, n, d, gamma, beta, 1e-5, mean, var, invstd,
                          rm_old, rm_new, rv_old, rv_new, 0.9, 0.1, n / (n - 1) if n > 1 else 1.0)
    return y, mean, var, invstd, rm_new, rv_new


@pytest.mark.parametrize("shape", [(8, 3000), (300, 70), (2000, 1500)])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
def test_the_one_loop_set_up_equals_the_general_one_bitwise(rng, shape, param_dtype,
                                                           stat_dtype):
    """Contiguous parameters of one dtype take a one-loop per-feature set-up;
    the same values in other forms (a broadcast gamma, beta of another
    dtype) take the general one.  Both must give the same bits."""
    n, d = shape
    x = rng.standard_normal(shape) * 3 + 1
    g = np.float64(param_dtype(1.25))
    gamma = np.full(d, g, param_dtype)
    beta = rng.standard_normal(d).astype(param_dtype)
    rm_old = rng.standard_normal(d).astype(param_dtype)
    rv_old = rng.random(d).astype(param_dtype)
    fast = _train_outputs(x, gamma, beta, rm_old, rv_old, stat_dtype)
    other = np.float64 if param_dtype == np.float32 else np.float32
    for gamma2, beta2 in ((np.array([g], param_dtype), beta),      # broadcast gamma
                          (gamma.astype(np.float64), beta.astype(np.float64))
                          if other == np.float64 else (gamma, beta)):
        general = _train_outputs(x, gamma2, beta2, rm_old.astype(np.float64),
                                 rv_old.astype(np.float64), stat_dtype)
        for a, b in zip(fast, general):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(8, 3000, 0), (300, 70, 0), (2000, 1500, 0), (4, 70, 9)])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
def test_the_eval_and_backward_set_ups_give_the_same_bits_on_converted_operands(
        rng, shape, param_dtype, stat_dtype):
    """As the training set-up's test above, for the eval forward's and the
    training backward's set-ups, over rows and NCHW planes (s > 0), in
    widths that are not whole pieces of the converted route."""
    n, d, s = shape
    x = rng.standard_normal((n, d * max(s, 1))) * 3 + 1
    dy = rng.standard_normal(x.shape)
    g = 1.25
    gamma = np.full(d, g, param_dtype)
    # values that float32 holds exactly, so that every conversion is exact
    beta = rng.standard_normal(d).astype(np.float32).astype(param_dtype)
    rm = rng.standard_normal(d).astype(np.float32).astype(stat_dtype)
    rv = (rng.random(d) + 0.5).astype(np.float32).astype(stat_dtype)
    mean, invstd = rng.standard_normal(d), rng.random(d) + 0.5

    def outputs(gamma, beta, rm, rv, grad_dtype):
        y, dx = np.empty_like(x), np.empty_like(x)
        dgamma, dbeta = np.empty(d, grad_dtype), np.empty(d, grad_dtype)
        kernels.eval_forward(x, y, n, d, gamma, beta, rm, rv, 1e-5, s)
        kernels.train_backward(x, dy, dx, n, d, mean, invstd, gamma, dgamma, dbeta, s)
        return y, dx, dgamma, dbeta

    direct = outputs(gamma, beta, rm, rv, param_dtype)
    other = np.float64 if param_dtype == np.float32 else np.float32
    for converted in (
            outputs(np.array([g], param_dtype), beta, rm, rv, param_dtype),   # broadcast
            outputs(gamma, beta.astype(np.float64), rm, rv.astype(other), param_dtype),
            outputs(gamma.astype(np.float64), beta, rm, rv, np.float64)):    # mixed
        for a, b in zip(direct, converted):
            assert np.array_equal(a, b.astype(a.dtype))     # (float64 dgamma, rounded)


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
def test_short_batch_statistics_are_the_same_in_strips_and_row_blocks(rng, n, dtype,
                                                                      stat_dtype):
    """Batches of up to 9 rows, whose shift is the mean of (up to 8 of)
    their own rows: a strip and row blocks must give the same bits, in the
    vector body and the scalar tail (2003 features), for features that are
    constant, offset far from zero, or hold an infinity or a NaN (the exact
    fallback), with running statistics of either dtype."""
    d = 2003
    x = rng.standard_normal((n, d)) * 3 + 1
    x[:, 5] = 7.25                                  # constant
    x[:, 6] = 1e8 + rng.standard_normal(n)          # large offset
    x[0, 7] = np.inf
    x[n - 1, 8] = -np.inf
    x[n // 2, 2001] = np.nan
    if dtype == np.float64:
        x[:, 9] = 1.5e308       # finite, but the sums overflow: the fallback's own route
    x = x.astype(dtype)
    gamma, beta = make_params(rng, d, dtype)
    rm_old = rng.standard_normal(d).astype(stat_dtype)
    rv_old = rng.random(d).astype(stat_dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        with tuning(strip_bytes=1 << 30):
            strip = _train_outputs(x, gamma, beta, rm_old, rv_old, stat_dtype)
        with tuning(strip_bytes=1):
            blocks = _train_outputs(x, gamma, beta, rm_old, rv_old, stat_dtype)
    for a, c in zip(strip, blocks):
        assert np.array_equal(a, c, equal_nan=True)
    mean = strip[1]
    assert mean[5] == 7.25 and strip[2][5] == 0.0
    assert np.all(strip[0][:, 5] == beta[5])     # a constant feature gives exactly beta
    assert abs(mean[6] - np.mean(x[:, 6].astype(np.float64))) <= 1e-7 * 1e8
    assert np.isposinf(mean[7]) and np.isneginf(mean[8]) and np.isnan(mean[2001])


@pytest.mark.parametrize("shape", [(8, 3000), (2000, 1500)])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
def test_the_one_loop_eval_set_up_equals_the_general_one_bitwise(rng, shape, param_dtype,
                                                                stat_dtype):
    """As above, for the eval forward's coefficients (flat and per channel)."""
    n, d = shape
    x = rng.standard_normal(shape) * 3 + 1
    g = param_dtype(0.75)
    beta = rng.standard_normal(d).astype(param_dtype)
    rm = rng.standard_normal(d).astype(stat_dtype)
    rv = rng.random(d).astype(stat_dtype)
    fast, general = np.empty_like(x), np.empty_like(x)
    kernels.eval_forward(x, fast, n, d, np.full(d, g, param_dtype), beta, rm, rv, 1e-5)
    kernels.eval_forward(x, general, n, d, np.array([g]), beta, rm, rv, 1e-5)
    assert np.array_equal(fast, general)
    c = d // 3
    planes = x.reshape(n, c, 3)                          # NCHW planes of 3 positions
    stats = dict(running_mean=rm[:c], running_var=rv[:c])
    layer_fast = bnfast.BatchNormalization(np.full(c, g, param_dtype), beta[:c],
                                           per_channel=True, **stats)
    layer_general = bnfast.BatchNormalization(np.array([g]), beta[:c], per_channel=True,
                                              **stats)
    assert np.array_equal(layer_fast.forward(planes, False), layer_general.forward(planes, False))


@pytest.mark.parametrize("shape", [(8, 3000), (2000, 1500)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_one_loop_backward_set_up_equals_the_general_one_bitwise(rng, shape, dtype):
    """As above, for the backward's dgamma, dbeta and coefficients."""
    n, d = shape
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean, invstd = x.mean(axis=0, dtype=np.float64), 1 / x.std(axis=0, dtype=np.float64)
    g = dtype(1.5)
    results = []
    for gamma in (np.full(d, g, dtype), np.array([g])):
        dx, dgamma, dbeta = np.empty_like(x), np.empty(d, dtype), np.empty(d, dtype)
        kernels.train_backward(x, dy, dx, n, d, mean, invstd, gamma, dgamma, dbeta)
        results.append((dx, dgamma, dbeta))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("text, expected", [("32768K\n", 32 << 20), ("96M", 96 << 20),
                                            ("1G", 1 << 30), ("512", 512), ("", 0),
                                            ("lots", 0), ("K", 0)])
def test_the_last_level_cache_size_is_read_from_sysfs(tmp_path, text, expected):
    path = tmp_path / "size"
    path.write_text(text)
    assert kernels._last_level_cache_bytes(str(path)) == expected
    assert kernels._last_level_cache_bytes(str(tmp_path / "missing")) == 0


def test_outputs_are_streamed_only_when_a_training_forward_overflows_the_cache():
    assert kernels._default_stream_min_bytes(0) == 8 << 20          # unknown cache
    assert kernels._default_stream_min_bytes(4 << 20) == 8 << 20    # never below 8 MiB
    threshold = kernels._default_stream_min_bytes(32 << 20)
    assert 3 * (threshold - 1) <= 32 << 20 < 3 * threshold


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (100, 100), (32, 128), (256, 1024), (1024, 4096),
                                   (5000, 40), (32, 65536), (8, 150528), (256, 65536),
                                   (100352, 64), (4096, 16), (2048, 16), (512, 8192)])
def test_grid_follows_its_rules(shape, itemsize):
    """Every field of the work grid is set, by the documented rules (a field
    left unset once read stack garbage and picked a partition at random)."""
    n, d = shape
    grid = kernels._grid_info(n, d, itemsize, itemsize)
    assert grid == kernels._grid_info(n, d, itemsize, itemsize)
    nbytes = n * d * itemsize
    assert grid["stream"] == (nbytes >= kernels.DEFAULT_STREAM_MIN_BYTES)
    assert grid["stream_cache"] == (nbytes >= 4 << 20)
    assert grid["stream_pages"] == (grid["stream"] and d <= 256)
    assert grid["n_tasks"] == grid["n_chunks"] * grid["n_col_blocks"]
    blocks, width = grid["n_col_blocks"], grid["col_block"]
    assert blocks * width >= d > (blocks - 1) * width
    assert grid["n_chunks"] * grid["chunk_rows"] >= n
    if grid["fused"]:   # a fused task needs whole columns
        assert grid["n_chunks"] == 1 and grid["chunk_rows"] == n
        assert grid["col_block"] >= 1024 or grid["n_col_blocks"] == 1
        # one strip is one task: only for batches too small for a thread team
        assert grid["n_tasks"] > 1 or nbytes < 256 << 10
    else:                       # no two-phase strips: row blocks
        assert grid["col_block"] == min(d, 1024)
    if grid["whole_blocks"]:    # row blocks far too big for the cache, blocks that fit in it
        assert not grid["fused"] and nbytes >= 2 * kernels.DEFAULT_STREAM_MIN_BYTES
        assert grid["n_col_blocks"] >= 2 * grid["n_threads"]
        assert 4 * grid["n_threads"] * n * grid["col_block"] * itemsize <= kernels.LLC_BYTES
    assert 1 <= grid["n_threads"] <= max(1, bnfast.get_num_threads())


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 256, 196), (64, 3, 4096), (32, 64, 3136),
                                   (16, 64, 3136), (64, 256, 784), (128, 64, 3136),
                                   (2, 16, 1 << 20), (4096, 20, 256)])
def test_planes_follow_their_rules(shape, itemsize):
    """The NCHW partition: reduction tasks cover every (sample, channel) once,
    and channel blocks run whole (statistics, then their pass) exactly where
    the batch overflows the last-level cache and the blocks fit in it."""
    n, c, s = shape
    p = kernels._planes_info(n, c, s, itemsize)
    assert p == kernels._planes_info(n, c, s, itemsize)
    assert p["n_chunks"] * p["chunk_n"] >= n > (p["n_chunks"] - 1) * p["chunk_n"]
    blocks, width = p["n_channel_blocks"], p["channel_block"]
    assert blocks * width >= c > (blocks - 1) * width
    assert p["n_tasks"] == p["n_chunks"] * blocks
    assert p["n_elem_tasks"] * p["per_task"] >= n * c
    assert 1 <= p["n_threads"] <= max(1, bnfast.get_num_threads())
    nbytes = n * c * s * itemsize
    block_bytes = width * n * s * itemsize
    if p["whole_blocks"]:
        assert nbytes >= kernels.DEFAULT_STREAM_MIN_BYTES and blocks >= 16
        assert 4 * p["n_threads"] * block_bytes <= kernels.LLC_BYTES
    elif nbytes >= kernels.DEFAULT_STREAM_MIN_BYTES and c >= 16:
        # too big a channel to keep a block of it in every thread's share
        assert 4 * p["n_threads"] * n * s * itemsize > kernels.LLC_BYTES


def test_thread_settings():
    before = bnfast.get_num_threads()
    assert before >= 1
    if OPENMP:
        with threads(3):
            assert bnfast.get_num_threads() == 3
    else:
        assert before == 1
        with pytest.raises(RuntimeError, match="built without OpenMP"):
            bnfast.set_num_threads(3)
    assert bnfast.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1"):
        bnfast.set_num_threads(0)


def test_entry_points_refuse_unsafe_arguments():
    x = np.zeros((4, 3))
    y = np.empty((4, 3))
    v = np.ones(3)
    mean, var = np.empty(3), np.empty(3)
    with pytest.raises(ValueError, match="12 elements"):
        kernels.eval_forward(x, np.empty((4, 2)), 4, 3, v, v, v, v, 1e-6)
    with pytest.raises(ValueError, match="n >= 1"):
        kernels.eval_forward(x, y, 0, 3, v, v, v, v, 1e-6)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.eval_forward(np.zeros((3, 4)).T, y, 4, 3, v, v, v, v, 1e-6)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.eval_forward(x.astype(np.int64), y, 4, 3, v, v, v, v, 1e-6)
    with pytest.raises(ValueError, match="3 or 1 elements"):
        kernels.eval_forward(x, y, 4, 3, np.ones(2), v, v, v, 1e-6)
    readonly = np.empty((4, 3))
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        kernels.eval_forward(x, readonly, 4, 3, v, v, v, v, 1e-6)
    with pytest.raises(TypeError, match="float64"):
        kernels.train_forward(x, None, y, 4, 3, v, v, 1e-6, mean.astype(np.float32), var, None,
                              None, None, None, None, 0.9, 0.1)
    with pytest.raises(TypeError, match="same dtype"):
        kernels.train_backward(x, x.astype(np.float32), y, 4, 3, mean, var, v, v.copy(), v.copy())
    with pytest.raises(ValueError, match="native byte order"):
        kernels.eval_forward(x.astype(">f8"), y, 4, 3, v, v, v, v, 1e-6)
    misaligned = np.zeros(4 * 3 * 8 + 1, np.uint8)[1:].view(np.float64).reshape(4, 3)
    with pytest.raises(ValueError, match="aligned"):
        kernels.eval_forward(misaligned, y, 4, 3, v, v, v, v, 1e-6)


def test_readiness_queries_accept_exactly_what_the_entry_points_take_as_is():
    x = np.zeros((4, 3))
    v = np.ones(3)
    assert kernels.ready_rows(x) == 3
    assert kernels.ready_rows(np.zeros((4, 3, 2), np.float32)) == 6
    for not_ready in (x.T, x.astype(">f8"), x.astype(np.int64), np.zeros(3), [[0.0]],
                      np.zeros((0, 3))):
        assert kernels.ready_rows(not_ready) == 0
    assert kernels.ready_vector(v, 3, x) and not kernels.ready_vector(v, 3, x.astype(np.float32))
    assert not kernels.ready_vector(np.ones(6)[::2], 3, x)
    # the running statistics' dtype: x's, float64, or float64 for new zeros
    f32 = x.astype(np.float32)
    v32 = v.astype(np.float32)
    assert kernels.ready_operands(f32, 3, v32, v32, v32, v32) is np.dtype(np.float32)
    assert kernels.ready_operands(f32, 3, v32, v32, v, v) is np.dtype(np.float64)
    assert kernels.ready_operands(f32, 3, v32, v32, None, None) is np.dtype(np.float64)
    assert kernels.ready_operands(f32, 3, v32, v32, v32, v) is None      # mixed pair
    assert kernels.ready_operands(f32, 3, v, v32, None, None) is None    # gamma not x's dtype
    assert kernels.ready_operands(f32, 3, v32, v32, v32, None) is None
    assert kernels.ready_operands(f32, 0, v32, v32, None, None) is np.dtype(np.float64)
    assert kernels.ready_operands(f32.T, 0, v32, v32, None, None) is None     # not a ready batch
    assert kernels.ready_operands(f32.T, 3, v32, v32, None, None) is np.dtype(np.float64)
    assert kernels.ready_operands([[0.0]], 0, v, v, None, None) is None
    # a float64 dtype that is not NumPy's own instance (the planner's memo keys on those)
    tagged = x.view(np.dtype(np.float64, metadata={"tag": 1}))
    assert kernels.ready_operands(tagged, 3, v, v, None, None) is None
    f64 = np.dtype(np.float64)
    # dout: x's shape, or per feature its (N, D) view; nothing else of that size
    x4 = np.zeros((4, 3, 1, 1))
    assert kernels.ready_grads(x4, f64, np.ones((4, 3, 1, 1)), False, 3, v, None, None) is f64
    assert kernels.ready_grads(x4, f64, np.ones((4, 3)), True, 3, v, None, None) is f64
    assert kernels.ready_grads(x4, f64, np.ones((4, 3)), False, 3, v, None, None) is None
    assert kernels.ready_grads(x4, f64, np.ones((4, 1, 3, 1)), True, 3, v, None, None) is None
    assert kernels.ready_grads(x4, f64, np.ones((2, 6)), True, 3, v, None, None) is None
    assert kernels.ready_grads(x, f64, x.astype(np.float32), True, 3, v, None, None) is None
    assert kernels.ready_grads(x, np.dtype(np.float32), x, True, 3, v, None, None) is None
    assert kernels.ready_grads(x, f64, x, True, 3, v, v32, v32) is None      # not x's dtype
    assert kernels.ready_grads(f32, np.dtype(np.float32), f32, True, 3, v32, v, v) is f64


@pytest.mark.parametrize("s", [0, 7])
def test_split_moments_copy_the_batch_and_match_numpy(rng, s):
    """moments(..., cache) on rows (s = 0) and on NCHW planes (s > 0), large
    enough for several threads: the cache is an exact copy, the statistics
    are NumPy's to rounding."""
    shape = (64, 40, s) if s else (400, 300)
    x = rng.standard_normal(shape) * 2 + 3
    n, d = shape[0], shape[1]
    mean, m2, cache = np.empty(d), np.empty(d), np.empty_like(x)
    for count in THREADS:
        with threads(count):
            kernels.moments(x, cache, n, d, mean, m2, s)
        assert np.array_equal(cache, x)
        axes = (0, 2) if s else (0,)
        np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-13)
        np.testing.assert_allclose(m2, x.var(axis=axes) * (x.size // d), rtol=1e-12)


def _at_offset(shape, dtype, offset):
    """An uninitialized C-contiguous array whose data start `offset` bytes
    past a 64-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 128, np.uint8)
    start = (offset - raw.ctypes.data) % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _train_with_cache(x, cache, planes):
    """A training forward of x (flat, or NCHW planes of 7 positions) that
    copies x to cache."""
    n, d = x.shape
    c, s = (d // 7, 7) if planes else (d, 0)
    v = np.ones(c, x.dtype)
    stats = [np.empty(c), np.empty(c), None, None, None, None, None, 0.9, 0.1]
    kernels.train_forward(x, cache, np.empty_like(x), n, c, v, v, 1e-5, *stats, s=s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("knobs", [dict(strip_bytes=1), dict(strip_bytes=1 << 30),
                                   dict(col_block=16)], ids=["row blocks", "strips", "narrow"])
@pytest.mark.parametrize("shape", [(9, 4096), (13, 1024), (6, 4100), (40, 96)])
def test_streamed_outputs_equal_cached_ones_at_any_alignment(rng, dtype, knobs, shape):
    """Outputs too large for the cache are written with streaming stores:
    straight from the registers where every row starts on a cache line and
    fills whole lines, however short (here rows of 4096, 1024 and 96
    features, and blocks of 16 columns, at a line boundary), else through a
    staging row.  Wherever y sits, the bits are those of ordinary
    stores, for any thread count, and nothing around y is touched."""
    n, d = shape
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta = make_params(rng, d, dtype)
    def train(y, **more):
        with tuning(**knobs, **more):
            kernels.train_forward(x, None, y, n, d, gamma, beta, 1e-5, np.empty(d),
                                  np.empty(d), None, None, None, None, None, 0.9, 0.1)

    expected = np.empty_like(x)
    train(expected)
    for y_offset in range(0, 64, np.dtype(dtype).itemsize):
        guarded = _at_offset((n * d + 32,), dtype, (y_offset - 16 * x.itemsize) % 64)
        guarded[...] = -7.0
        y = guarded[16:16 + n * d].reshape(shape)
        for count in THREADS:
            with threads(count):
                train(y, stream_min_bytes=0)
            assert np.array_equal(y, expected), (y_offset, count)
            assert np.all(guarded[:16] == -7.0) and np.all(guarded[16 + n * d:] == -7.0)
            y[...] = 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("knobs", [dict(strip_bytes=1), dict(strip_bytes=1 << 30),
                                   dict(col_block=16), dict(page_bytes=64)],
                         ids=["row blocks", "strips", "narrow", "planes"])
@pytest.mark.parametrize("shape", [(37, 203), (9, 4102), (5, 4102), (300, 56)])
def test_the_streamed_copy_of_x_is_exact_at_any_alignment(rng, dtype, knobs, shape):
    """The training forward streams its copy of x in pieces (a row's columns
    or a range of planes per task), each piece writing the whole cache lines
    that start in it.  Wherever the copy and x sit relative to cache lines,
    and however the batch splits, every element is copied once and exactly,
    and nothing around the copy is touched."""
    n, d = shape
    itemsize = np.dtype(dtype).itemsize
    x = rng.standard_normal(shape).astype(dtype)
    planes = "page_bytes" in knobs
    for x_offset in (0, 16):
        xs = _at_offset(shape, dtype, x_offset)
        xs[...] = x
        for cache_offset in range(0, 64, itemsize):
            guarded = _at_offset((n * d + 32,), dtype, (cache_offset - 16 * itemsize) % 64)
            guarded[...] = -7.0
            cache = guarded[16:16 + n * d].reshape(shape)
            for count in THREADS:
                with tuning(cache_stream_min_bytes=0, **knobs), threads(count):
                    _train_with_cache(xs, cache, planes)
                assert np.array_equal(cache, x), (x_offset, cache_offset, count)
                assert np.all(guarded[:16] == -7.0) and np.all(guarded[16 + n * d:] == -7.0)
                cache[...] = 0
