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
