"""bnfast.functional: the stateless operations against the twin and the layer."""
from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import functional as F
from conftest import assert_close, dx_scale, make_params, pair, tolerance


@pytest.mark.parametrize("shape", [(1, 4), (9, 7), (5, 2, 3), (64, 300)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_forward_and_backward_match_the_twin(rng, shape, dtype):
    d = int(np.prod(shape[1:]))
    gamma, beta = make_params(rng, d, dtype)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    _, twin = pair(gamma, beta)
    expected = twin.forward(x)
    result = F.forward_train(x, gamma, beta)
    assert_close(result.out, expected)
    assert result.mean.dtype == np.float64 and result.var.dtype == np.float64
    np.testing.assert_allclose(result.mean, x.reshape(shape[0], -1).astype(np.float64).mean(0),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.var, x.reshape(shape[0], -1).astype(np.float64).var(0),
                               rtol=1e-10, atol=1e-12)
    assert result.running_mean is None and result.running_var is None
    dx, dgamma, dbeta = F.backward_train(dout, x, result.mean, result.var, gamma)
    assert_close(dx, twin.backward(dout), scale=dx_scale(twin, dout))
    assert_close(dgamma, twin.dgamma)
    assert_close(dbeta, twin.dbeta)


def test_running_statistics_update_returns_new_arrays(rng):
    d = 6
    gamma, beta = make_params(rng, d)
    running_mean, running_var = rng.standard_normal(d), rng.random(d) + 1
    keep_mean, keep_var = running_mean.copy(), running_var.copy()
    x = rng.standard_normal((10, d))
    result = F.forward_train(x, gamma, beta, running_mean=running_mean, running_var=running_var,
                             momentum=0.8)
    np.testing.assert_array_equal(running_mean, keep_mean)
    np.testing.assert_array_equal(running_var, keep_var)
    np.testing.assert_allclose(result.running_mean, 0.8 * keep_mean + 0.2 * x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(result.running_var, 0.8 * keep_var + 0.2 * x.var(0), rtol=1e-13)


def test_eval_forward_and_backward_are_the_eval_function_and_its_gradient(rng):
    d = 5
    gamma, beta = make_params(rng, d)
    running_mean, running_var = rng.standard_normal(d), rng.random(d) + 0.1
    x = rng.standard_normal((8, d))
    std = np.sqrt(running_var + 1e-6)
    out = F.forward_eval(x, gamma, beta, running_mean, running_var)
    np.testing.assert_allclose(out, gamma * (x - running_mean) / std + beta, rtol=1e-13)
    dout = rng.standard_normal((8, d))
    dx, dgamma, dbeta = F.backward_eval(dout, x, gamma, running_mean, running_var)
    np.testing.assert_allclose(dx, dout * gamma / std, rtol=1e-13)
    np.testing.assert_allclose(dgamma, np.sum(dout * (x - running_mean) / std, 0), rtol=1e-12)
    np.testing.assert_allclose(dbeta, dout.sum(0), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_out_buffers_are_filled_and_returned_without_allocating_results(rng, dtype):
    d = 12
    gamma, beta = make_params(rng, d, dtype)
    x = rng.standard_normal((16, 3, 4)).astype(dtype)
    dout = rng.standard_normal((16, 3, 4)).astype(dtype)
    out = np.full(x.shape, np.nan, dtype)
    result = F.forward_train(x, gamma, beta, out=out)
    assert result.out is out
    assert_close(out, F.forward_train(x, gamma, beta).out, rtol=0)
    dx_buffer = np.full(x.shape, np.nan, dtype)
    dx, dgamma, dbeta = F.backward_train(dout, x, result.mean, result.var, gamma, out=dx_buffer)
    assert dx is dx_buffer
    assert np.array_equal(dx, F.backward_train(dout, x, result.mean, result.var, gamma)[0])
    eval_out = np.empty(x.shape, np.float64 if dtype == np.float32 else dtype)
    running = np.zeros(d), np.ones(d)
    assert F.forward_eval(x, gamma, beta, *running, out=eval_out) is eval_out
    assert np.array_equal(eval_out, F.forward_eval(x, gamma, beta, *running))


def test_layer_and_functional_agree_bitwise(rng):
    d = 33
    gamma, beta = make_params(rng, d)
    layer = bnfast.BatchNormalization(gamma, beta)
    x = rng.standard_normal((40, d)) * 3 + 2
    dout = rng.standard_normal((40, d))
    result = F.forward_train(x, gamma, beta, running_mean=np.zeros(d), running_var=np.zeros(d))
    assert np.array_equal(layer.forward(x), result.out)
    assert np.array_equal(layer.running_mean, result.running_mean)
    assert np.array_equal(layer.running_var, result.running_var)
    dx, dgamma, dbeta = F.backward_train(dout, x, result.mean, result.var, gamma)
    assert np.array_equal(layer.backward(dout), dx)
    assert np.array_equal(layer.dgamma, dgamma) and np.array_equal(layer.dbeta, dbeta)
    out = F.forward_eval(x, gamma, beta, layer.running_mean, layer.running_var)
    assert np.array_equal(layer.forward(x, False), out)
    assert np.array_equal(layer.backward(dout),
                          F.backward_eval(dout, x, gamma, layer.running_mean, layer.running_var)[0])


def test_dtype_promotion_matches_the_twin(rng):
    d = 4
    x = rng.standard_normal((6, d)).astype(np.float32)
    gamma64, beta64 = make_params(rng, d)
    _, twin = pair(gamma64, beta64)
    expected = twin.forward(x)
    got = F.forward_train(x, gamma64, beta64).out
    assert got.dtype == expected.dtype == np.float64
    assert_close(got, expected, rtol=tolerance(np.float32))
    half = F.forward_train(x.astype(np.float16), 1.0, 0.0).out
    assert half.dtype == np.float16


# --------------------------------------------------------------------------
# Split phases: a batch cut into shards, each phase run per shard, the
# partials merged in order, gives the one-shot layer's results.

def run_split(x, dout, gamma, beta, cuts, eps=1e-6):
    """forward and backward over the shards x[cuts[i]:cuts[i+1]] by the split phases."""
    shards = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    moments = F.merge_moments([F.batch_moments(x[s]) for s in shards])
    out = np.concatenate([F.normalize(x[s], moments, gamma, beta, eps=eps) for s in shards])
    sums = F.merge_grad_sums([F.grad_sums(dout[s], x[s], moments, eps=eps) for s in shards])
    grads = [F.grad_input(dout[s], x[s], moments, gamma, sums, eps=eps) for s in shards]
    dx = np.concatenate([g[0] for g in grads])
    return moments, out, dx, grads


SPLITS = {
    "one shard": [0, 29],
    "even": [0, 10, 20, 29],
    "uneven with single rows": [0, 1, 2, 17, 28, 29],
    "every row its own shard": list(range(30)),
}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_split_phases_over_shards_equal_the_one_shot_layer(rng, split, dtype):
    shape = (29, 3, 5)
    gamma, beta = make_params(rng, 15, dtype)
    x = (rng.standard_normal(shape) * 3 + 7).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    layer = bnfast.BatchNormalization(gamma, beta)
    expected_out = layer.forward(x)
    expected_dx = layer.backward(dout)
    moments, out, dx, grads = run_split(x, dout, gamma, beta, SPLITS[split])
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    assert moments.count == 29
    wide = x.reshape(29, -1).astype(np.float64)
    np.testing.assert_allclose(moments.mean, wide.mean(0), rtol=1e-13)
    np.testing.assert_allclose(moments.var, wide.var(0), rtol=1e-12)
    assert_close(out, expected_out, rtol=rtol)
    assert_close(dx, expected_dx, rtol=rtol, scale=dx_scale(layer, dout))
    for _, dgamma, dbeta in grads:   # the whole batch's, on every shard
        assert_close(dgamma, layer.dgamma, rtol=rtol)
        assert_close(dbeta, layer.dbeta, rtol=rtol)
        assert np.array_equal(dgamma, grads[0][1]) and np.array_equal(dbeta, grads[0][2])


def test_one_shard_gives_the_layers_statistics_bitwise(rng):
    gamma, beta = make_params(rng, 40)
    x = rng.standard_normal((300, 40)) * 5 + 100
    result = F.forward_train(x, gamma, beta)
    moments = F.batch_moments(x)
    assert np.array_equal(moments.mean, result.mean)
    assert np.array_equal(moments.var, result.var)


def test_merging_is_independent_of_the_split_to_rounding_and_ordered(rng):
    x = rng.standard_normal((64, 9)) * 1e3 + 1e6   # a large common offset
    whole = F.batch_moments(x)
    for cuts in ([0, 32, 64], [0, 1, 63, 64], [0, 5, 6, 40, 64]):
        merged = F.merge_moments([F.batch_moments(x[a:b]) for a, b in zip(cuts, cuts[1:])])
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-15)
        np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12)
    parts = [F.batch_moments(x[a:b]) for a, b in ((0, 7), (7, 30), (30, 64))]
    again = F.merge_moments(parts)
    assert np.array_equal(again.mean, F.merge_moments(parts).mean)   # deterministic


def test_merge_follows_the_reference_for_non_finite_features(rng):
    x = rng.standard_normal((6, 3))
    x[4, 0] = np.inf
    x[1, 1] = np.nan
    merged = F.merge_moments([F.batch_moments(x[:3]), F.batch_moments(x[3:])])
    with np.errstate(invalid="ignore"):
        expected = x.mean(0)
    assert merged.mean[0] == np.inf and np.isnan(merged.mean[1])
    np.testing.assert_allclose(merged.mean[2], expected[2], rtol=1e-15)


def test_split_phase_functions_reject_bad_partials(rng):
    x = rng.standard_normal((4, 3))
    moments = F.batch_moments(x)
    with pytest.raises(ValueError, match="at least one"):
        F.merge_moments([])
    with pytest.raises(ValueError, match=r"parts\[1\].mean has shape \(2,\); expected \(3,\)"):
        F.merge_moments([moments, F.Moments(2, np.zeros(2), np.zeros(2))])
    with pytest.raises(ValueError, match="count must be >= 1"):
        F.merge_moments([F.Moments(0, np.zeros(3), np.zeros(3))])
    with pytest.raises(TypeError, match="must be a bnfast.functional.Moments"):
        F.normalize(x, (4, np.zeros(3), np.zeros(3)), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"moments.mean has shape \(2,\); expected \(3,\)"):
        F.normalize(x, F.Moments(4, np.zeros(2), np.zeros(2)), 1.0, 0.0)
    sums = F.grad_sums(x, x, moments)
    with pytest.raises(ValueError, match="sums.count is 4 but moments.count is 8"):
        F.grad_input(x, x, F.merge_moments([moments, moments]), 1.0, sums)
    with pytest.raises(ValueError, match="dout has shape"):
        F.grad_sums(np.zeros((5, 3)), x, moments)


def test_split_phase_out_buffers_and_dtypes(rng):
    gamma, beta = make_params(rng, 6, np.float32)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    moments = F.batch_moments(x)
    out = np.empty_like(x)
    assert F.normalize(x, moments, gamma, beta, out=out) is out
    assert np.array_equal(out, F.forward_train(x, gamma, beta).out)
    sums = F.grad_sums(x, x, moments)
    dx = np.empty_like(x)
    got, dgamma, dbeta = F.grad_input(x, x, moments, gamma, sums, out=dx)
    assert got is dx and dx.dtype == dgamma.dtype == dbeta.dtype == np.float32


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_per_channel_split_phases_equal_the_per_channel_layer(rng, layout):
    x = rng.standard_normal((11, 4, 3, 5)) * 2 + 5
    dout = rng.standard_normal(x.shape)
    if layout == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    gamma, beta = make_params(rng, 4)
    layer = bnfast.BatchNormalization(gamma, beta, per_channel=True)
    expected_out = layer.forward(x)
    expected_dx = layer.backward(dout)
    shards = [slice(0, 1), slice(1, 6), slice(6, 11)]
    moments = F.merge_moments([F.batch_moments(x[s], per_channel=True) for s in shards])
    assert moments.count == 11 * 15 and moments.mean.shape == (4,)
    out = np.concatenate([F.normalize(x[s], moments, gamma, beta, per_channel=True)
                          for s in shards])
    sums = F.merge_grad_sums([F.grad_sums(dout[s], x[s], moments, per_channel=True)
                              for s in shards])
    grads = [F.grad_input(dout[s], x[s], moments, gamma, sums, per_channel=True)
             for s in shards]
    assert_close(out, expected_out, rtol=1e-12)
    assert_close(np.concatenate([g[0] for g in grads]), expected_dx, rtol=1e-12,
                 scale=float(np.max(np.abs(dout)) * np.max(np.abs(gamma)) / np.min(layer.std)))
    assert_close(grads[1][1], layer.dgamma, rtol=1e-12)
    assert_close(grads[2][2], layer.dbeta, rtol=1e-12)
