"""Per-channel mode (per_channel=True): the layer and the functional forms
against the twin's per-channel mode, PyTorch (where importable) and math, in
NCHW and channels-last layouts."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import bnfast
from bnfast import functional as F
from bnfast.reference import BatchNormalization as Twin
from conftest import assert_close, layouts, tolerance
from bnfast._native import kernels
from test_kernels import THREADS, threads, tuning
from test_layer import assert_backward_matches_central_differences

SHAPES = [(6, 3), (5, 4, 7), (4, 3, 5, 6), (3, 2, 3, 4, 2)]


def channels_last(x):
    """The same values, memory ordered (N, *spatial, C)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


def params(rng, c, dtype=np.float64):
    return ((1 + 0.4 * rng.standard_normal(c)).astype(dtype),
            rng.standard_normal(c).astype(dtype))


def full_round(layer, x, dout):
    """Everything a train / backward / eval / backward round produces."""
    out = {"out": layer.forward(x), "dx": layer.backward(dout)}
    out.update(dgamma=layer.dgamma, dbeta=layer.dbeta, xc=layer.xc, xn=layer.xn, std=layer.std,
               running_mean=layer.running_mean, running_var=layer.running_var)
    out["eval_out"] = layer.forward(x, False)
    out["eval_dx"] = layer.backward(dout)
    out["eval_dgamma"], out["eval_dbeta"] = layer.dgamma, layer.dbeta
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("unbiased", [False, True])
def test_layer_matches_the_per_channel_twin(rng, shape, layout, dtype, unbiased):
    c = shape[1]
    gamma, beta = params(rng, c, dtype)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    if layout == "channels_last":
        x, dout = channels_last(x), channels_last(dout)
    kwargs = dict(running_mean=np.zeros(c, dtype), running_var=np.ones(c, dtype),
                  per_channel=True, running_var_unbiased=unbiased)
    before = x.copy()
    got = full_round(bnfast.BatchNormalization(gamma.copy(), beta.copy(), **kwargs), x, dout)
    want = full_round(Twin(gamma.copy(), beta.copy(), **kwargs), x, dout)
    assert np.array_equal(x, before)
    for key, value in want.items():
        scale = float(np.max(np.abs(dout)) * np.max(np.abs(gamma)) / np.min(want["std"])) \
            if "dx" in key else None
        assert_close(got[key], value, scale=scale, what=key)
    for key in ("out", "dx", "eval_out", "eval_dx"):     # outputs keep x's layout
        assert got[key].shape == shape
        if layout == "channels_last" and len(shape) > 2:
            assert np.moveaxis(got[key], 1, -1).flags.c_contiguous, key
        else:
            assert got[key].flags.c_contiguous, key


@pytest.mark.parametrize("name, x_of", list(layouts(np.zeros((4, 3, 2, 5)))))
def test_any_layout_gives_the_nchw_result(rng, name, x_of):
    shape = (4, 3, 2, 5)
    x = rng.standard_normal(shape) * 2 + 1
    dout = rng.standard_normal(shape)
    gamma, beta = params(rng, 3)
    expected = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x, dout)
    odd = dict(layouts(x))[name]
    got = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), odd, dout)
    for key, value in expected.items():
        assert_close(np.asarray(got[key], dtype=np.float64),
                     np.asarray(value, dtype=np.float64), rtol=1e-12, what=key)


@pytest.mark.parametrize("shape", [(2, 2, 3), (3, 2, 2, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_backward_matches_central_differences(rng, shape, train):
    c = shape[1]
    gamma0, beta0 = params(rng, c)
    x = rng.standard_normal(shape) * 2 + 0.5
    dout = rng.standard_normal(shape)

    def factory(g, b):
        return bnfast.BatchNormalization(gamma0.copy() if g is None else g,
                                         beta0.copy() if b is None else b, momentum=1.0,
                                         running_mean=np.full(c, 0.3),
                                         running_var=np.full(c, 2.0), per_channel=True)
    assert_backward_matches_central_differences(factory, x, dout, train)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradient_invariants_per_channel(rng, layout):
    x = rng.standard_normal((8, 4, 6, 5)) * 5 + 3
    dout = rng.standard_normal(x.shape)
    if layout == "channels_last":
        x, dout = channels_last(x), channels_last(dout)
    layer = bnfast.BatchNormalization(np.ones(4), np.zeros(4), eps=0.0, per_channel=True)
    layer.forward(x)
    dx = layer.backward(dout)
    axes = (0, 2, 3)
    np.testing.assert_allclose(dx.sum(axis=axes), 0, atol=1e-12 * np.abs(dx).sum() / 4)
    np.testing.assert_allclose((dx * layer.xn).sum(axis=axes), 0,
                               atol=1e-12 * np.abs(dx).sum() / 4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_constant_channel_gives_exactly_beta_and_offsets_cost_nothing(rng, layout, dtype):
    x = (rng.standard_normal((16, 3, 8, 8)) + 1e4).astype(dtype)
    x[:, 1] = dtype(7.25)
    if layout == "channels_last":
        x = channels_last(x)
    beta = np.array([0.5, -1.5, 2.0], dtype)
    layer = bnfast.BatchNormalization(np.ones(3, dtype), beta, per_channel=True)
    out = layer.forward(x)
    assert np.all(out[:, 1] == beta[1])
    exact = x.astype(np.float64)
    exact_var = exact.var(axis=(0, 2, 3))
    exact_mean = exact.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.running_mean, 0.1 * exact_mean, rtol=1e-14)
    np.testing.assert_allclose(layer.running_var, 0.1 * exact_var, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("shape", [(32, 8, 24, 24), (6, 40, 5, 7)])
def test_results_are_bitwise_identical_for_any_thread_count(rng, shape):
    if not bnfast.build_info()["openmp"]:
        pytest.skip("serial build (no OpenMP): one thread only")
    gamma, beta = params(rng, shape[1])
    base = rng.standard_normal(shape) * 2 + 1
    for x in (base, channels_last(base)):
        dout = rng.standard_normal(x.shape)
        with threads(1):
            expected = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x,
                                  dout)
        for n in (2, 3, 5):
            with threads(n):
                got = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x,
                                 dout)
            for key in expected:
                assert np.array_equal(got[key], expected[key]), (n, key)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(6, 40, 5, 7), (3, 200, 3, 3), (300, 24, 2, 2),
                                   (2100, 40, 4, 4)])
def test_a_channels_numbers_do_not_depend_on_the_other_channels(rng, shape, dtype):
    """NCHW reductions read small planes in blocks of channels (2 to 13
    channels here; the last shape in two sample chunks too, in float64); a
    channel's results are those of a batch of that channel alone (one
    channel per task), bit for bit."""
    c = shape[1]
    gamma, beta = params(rng, c, dtype)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    whole = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x, dout)
    for ch in (0, c // 2, c - 1):
        alone = full_round(bnfast.BatchNormalization(gamma[ch:ch + 1], beta[ch:ch + 1],
                                                     per_channel=True),
                           np.ascontiguousarray(x[:, ch:ch + 1]),
                           np.ascontiguousarray(dout[:, ch:ch + 1]))
        for key, value in alone.items():
            assert np.array_equal(whole[key][:, ch:ch + 1] if value.ndim > 1
                                  else whole[key][ch:ch + 1], value), (ch, key)


def test_streaming_the_cached_copy_changes_no_result(rng):
    """Large per-channel batches copy x to the cache with streaming stores
    (in both the planes and the channels-last kernels); forcing them for a
    small batch gives the same bits as plain copies."""
    gamma, beta = params(rng, 8)
    base = rng.standard_normal((32, 8, 24, 24)) * 2 + 1
    for x in (base, channels_last(base)):
        dout = rng.standard_normal(x.shape)
        with tuning(cache_stream_min_bytes=1 << 40):
            expected = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x,
                                  dout)
        with tuning(cache_stream_min_bytes=0):
            got = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x, dout)
        for key in expected:
            assert np.array_equal(got[key], expected[key]), key


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the inf's channel
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_whole_channel_blocks_give_the_two_phase_bits(rng, dtype):
    """NCHW batches that overflow the cache run each block of channels'
    statistics and pass in one task; forced on a small batch (two sample
    chunks, a last block narrower than the others, a channel offset
    far from zero that needs the exact two-pass, one that is not finite),
    every result is bitwise the two-phase one, on any thread count."""
    c, s = 37, 256
    n = 262144 // (s * np.dtype(dtype).itemsize) + 2     # two sample chunks
    gamma, beta = params(rng, c, dtype)
    x = rng.standard_normal((n, c, 16, 16)) * 2 + 1
    x[:, 5] += 1e9
    x = x.astype(dtype)
    x[3, 9, 2, 2] = np.inf
    dout = rng.standard_normal(x.shape).astype(dtype)
    with tuning(stream_min_bytes=1 << 40):
        assert not kernels._planes_info(n, c, s, x.itemsize)["whole_blocks"]
        expected = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x, dout)
    for n_threads in THREADS:
        with threads(n_threads), tuning(stream_min_bytes=0):
            p = kernels._planes_info(n, c, s, x.itemsize)
            assert p["whole_blocks"] and p["n_chunks"] > 1
            assert p["channel_block"] == 1 or c % p["channel_block"]    # a narrower last block
            got = full_round(bnfast.BatchNormalization(gamma, beta, per_channel=True), x, dout)
        for key in expected:
            assert np.array_equal(got[key], expected[key], equal_nan=True), (n_threads, key)


def test_errors_name_channels_and_change_nothing(rng):
    layer = bnfast.BatchNormalization(np.ones(3), np.zeros(3), per_channel=True)
    with pytest.raises(ValueError, match=r"gamma has shape \(3,\), which is not a per-channel "
                                         r"shape for the 4 channels of x \(x has shape "
                                         r"\(2, 4, 5\), channels = shape\[1\]\); gamma must be "
                                         r"a number or have shape \(4,\) or \(1, 4, 1\)$"):
        layer.forward(np.zeros((2, 4, 5)))
    assert layer.running_mean is None and layer.input_shape is None
    with pytest.raises(ValueError, match=r"gamma has shape \(3,\).*one value per feature of x "
                                         r"\(3 = prod\(shape\[1:\]\)\): for statistics per "
                                         r"feature, leave per_channel=False"):
        layer.forward(np.zeros((2, 3, 1)).reshape(2, 1, 3))
    assert layer.running_mean is None and layer.input_shape is None
    with pytest.raises(ValueError, match="ndim >= 2"):
        layer.forward(np.zeros(5))
    x = rng.standard_normal((2, 3, 4))
    layer.forward(x)
    with pytest.raises(ValueError, match=r"dout has shape \(2, 12\); the forward input had "
                                         r"shape \(2, 3, 4\)"):
        layer.backward(np.zeros((2, 12)))
    with pytest.raises(TypeError, match="per_channel must be True or False"):
        bnfast.BatchNormalization(1.0, 0.0, per_channel="yes")
    single = bnfast.BatchNormalization(1.0, 0.0, running_var_unbiased=True)
    with pytest.raises(ValueError, match="at least 2 values per feature; this batch has 1"):
        single.forward(np.ones((1, 3)))
    assert single.running_mean is None
    per_channel = bnfast.BatchNormalization(1.0, 0.0, per_channel=True,
                                            running_var_unbiased=True)
    per_channel.forward(np.ones((1, 2, 3)))     # 3 values per channel: fine
    with pytest.raises(ValueError, match="at least 2 values per channel; this batch has 1"):
        per_channel.forward(np.ones((1, 2, 1)))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_functional_per_channel_forms_with_out(rng, layout):
    x = rng.standard_normal((4, 3, 5, 2)) * 2 + 1
    dout = rng.standard_normal(x.shape)
    if layout == "channels_last":
        x, dout = channels_last(x), channels_last(dout)
    gamma, beta = params(rng, 3)
    twin = Twin(gamma, beta, per_channel=True)
    expected = twin.forward(x)
    out = np.empty_like(x)            # empty_like keeps the layout
    result = F.forward_train(x, gamma, beta, out=out, per_channel=True)
    assert result.out is out and result.mean.shape == (3,)
    assert_close(out, expected)
    dx_buffer = np.empty_like(x)
    dx, dgamma, dbeta = F.backward_train(dout, x, result.mean, result.var, gamma, out=dx_buffer,
                                         per_channel=True)
    assert dx is dx_buffer
    assert_close(dx, twin.backward(dout), scale=10.0)
    assert_close(dgamma, twin.dgamma)
    if layout == "channels_last":
        with pytest.raises(ValueError, match=r"out is not laid out like x: channels-last "
                                             r"\(memory ordered \(N, \*spatial, C\)\)"):
            F.forward_train(x, gamma, beta, out=np.empty(x.shape), per_channel=True)
    rm, rv = np.zeros(3), np.ones(3)
    eval_out = F.forward_eval(x, gamma, beta, rm, rv, per_channel=True)
    assert_close(eval_out, gamma.reshape(1, 3, 1, 1) * x / np.sqrt(1 + 1e-6)
                 + beta.reshape(1, 3, 1, 1))
    dxe, _, dbe = F.backward_eval(dout, x, gamma, rm, rv, per_channel=True)
    assert_close(dbe, dout.sum(axis=(0, 2, 3)))


def test_pickle_round_trip_per_channel(rng):
    layer = bnfast.BatchNormalization(np.ones(2), np.zeros(2), per_channel=True,
                                      running_var_unbiased=True)
    x = rng.standard_normal((3, 2, 4))
    layer.forward(x)
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.per_channel and clone.running_var_unbiased
    dout = rng.standard_normal(x.shape)
    assert np.array_equal(clone.backward(dout), layer.backward(dout))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 2, 3, 4, 2)])
def test_matches_torch_batch_norm(rng, layout, shape):
    torch = pytest.importorskip("torch")
    c = shape[1]
    gamma, beta = params(rng, c)
    x = rng.standard_normal(shape) * 2 + 1
    dout = rng.standard_normal(shape)
    if layout == "channels_last":
        x, dout = channels_last(x), channels_last(dout)
    momentum = 0.8
    layer = bnfast.BatchNormalization(gamma.copy(), beta.copy(), momentum,
                                      running_mean=np.zeros(c), running_var=np.ones(c),
                                      per_channel=True, running_var_unbiased=True)
    out = layer.forward(x)
    dx = layer.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    weight = torch.tensor(gamma, requires_grad=True)
    bias = torch.tensor(beta, requires_grad=True)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    yt = torch.nn.functional.batch_norm(xt, rm, rv, weight, bias, training=True,
                                        momentum=1 - momentum, eps=1e-6)
    yt.backward(torch.tensor(dout))
    assert_close(out, yt.detach().numpy())
    assert_close(dx, xt.grad.numpy(), scale=10.0)
    assert_close(layer.dgamma, weight.grad.numpy())
    assert_close(layer.dbeta, bias.grad.numpy())
    assert_close(layer.running_mean, rm.numpy())
    assert_close(layer.running_var, rv.numpy())
    eval_out = layer.forward(x, False)
    et = torch.nn.functional.batch_norm(torch.tensor(x), rm, rv, torch.tensor(gamma),
                                        torch.tensor(beta), training=False, eps=1e-6)
    assert_close(eval_out, et.numpy())



@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("param_shape", [(1, 3, 1, 1), (3, 1, 1)])
@pytest.mark.parametrize("running", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_laid_out_parameters_train_with_in_place_sgd_like_the_twin(rng, layout, param_shape,
                                                                  running, dtype):
    """A CNN written for NCHW arithmetic keeps gamma and beta as (1, C, 1, 1)
    arrays and updates them in place: dgamma and dbeta come in that layout,
    and so do the running statistics when they are given in it."""
    c, lr = 3, 0.3
    gamma, beta = params(rng, c, dtype)
    kwargs = dict(per_channel=True)
    if running:
        kwargs.update(running_mean=np.zeros(param_shape, dtype),
                      running_var=np.ones(param_shape, dtype))
    layer, twin = (cls(gamma.reshape(param_shape).copy(), beta.reshape(param_shape).copy(),
                       **{k: v.copy() if isinstance(v, np.ndarray) else v
                          for k, v in kwargs.items()})
                   for cls in (bnfast.BatchNormalization, Twin))
    for step in range(3):
        x = (rng.standard_normal((4, c, 5, 2)) * 2 + step).astype(dtype)
        dout = rng.standard_normal(x.shape).astype(dtype)
        if layout == "channels_last":
            x, dout = channels_last(x), channels_last(dout)
        got, want = full_round(layer, x, dout), full_round(twin, x, dout)
        for key, value in want.items():
            scale = float(np.max(np.abs(dout)) * np.max(np.abs(gamma)) / np.min(want["std"])) \
                if "dx" in key else None
            # (float32 x: float64 running statistics are float32-accurate)
            assert_close(got[key], value, rtol=tolerance(dtype), scale=scale,
                         what=f"step {step} {key}")
        assert got["dgamma"].shape == got["dbeta"].shape == param_shape
        assert got["running_mean"].shape == (param_shape if running else (c,))
        for model in (layer, twin):
            model.gamma -= lr * model.dgamma
            model.beta -= lr * model.dbeta
        assert_close(layer.gamma, twin.gamma, what=f"step {step} gamma")
    assert layer.gamma.shape == param_shape and not np.allclose(layer.gamma.ravel(), gamma)


def test_functional_per_channel_forms_take_laid_out_parameters(rng):
    """The functional forms accept (1, C, 1, 1) operands too: results equal
    those of (C,) operands, new running statistics keep the given layout and
    dgamma, dbeta are (C,) vectors."""
    x = rng.standard_normal((4, 3, 2, 5)) * 2 + 1
    dout = rng.standard_normal(x.shape)
    gamma, beta = params(rng, 3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    lay = lambda v: v.reshape(1, 3, 1, 1)  # noqa: E731
    flat = F.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, per_channel=True)
    laid = F.forward_train(x, lay(gamma), lay(beta), running_mean=lay(rm), running_var=lay(rv),
                           per_channel=True)
    assert np.array_equal(laid.out, flat.out)
    assert laid.running_mean.shape == laid.running_var.shape == (1, 3, 1, 1)
    assert np.array_equal(laid.running_var.ravel(), flat.running_var)
    for func, args in ((F.backward_train, (flat.mean, flat.var)), (F.backward_eval, (rm, rv))):
        want = func(dout, x, *args[:0], gamma, *args, per_channel=True) \
            if func is F.backward_eval else func(dout, x, *args, gamma, per_channel=True)
        got = func(dout, x, *args[:0], lay(gamma), *map(lay, args), per_channel=True) \
            if func is F.backward_eval else func(dout, x, *args, lay(gamma), per_channel=True)
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.array_equal(a, b)
