"""bnfast.BatchNormalization against the NumPy twin and against math."""
from __future__ import annotations

import copy
import importlib.util
import pickle

import numpy as np
import pytest

import bnfast
from bnfast.reference import BatchNormalization as Twin
from conftest import (assert_close, dx_scale, layouts, make_params, pair, seed_reference_path,
                      tolerance)

SHAPES = [(1, 5), (7, 1), (2, 3), (13, 17), (64, 33), (3, 4, 5), (2, 3, 4, 5), (2, 3, 2, 2, 2)]
ATTRS = ("input_shape", "batch_size", "xc", "xn", "std", "dgamma", "dbeta",
         "running_mean", "running_var", "momentum")


def features(shape):
    return int(np.prod(shape[1:]))


def assert_same_state(layer, twin, what="", rtol=None):
    """Every attribute the reference has, equal in value, shape and dtype.

    rtol: the input dtype's tolerance (float32 input makes the reference's
    statistics float32-accurate even where they end up in float64 arrays)."""
    for name in ATTRS:
        mine, theirs = getattr(layer, name), getattr(twin, name)
        if theirs is None or isinstance(theirs, (int, float, tuple)):
            assert mine == theirs, f"{what}{name}: {mine!r} != {theirs!r}"
        else:
            assert_close(mine, theirs, rtol=rtol, what=f"{what}{name}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_backward_match_twin(rng, shape, dtype):
    d = features(shape)
    gamma, beta = make_params(rng, d, dtype)
    layer, twin = pair(gamma, beta)
    for step in range(3):
        x = (rng.standard_normal(shape) * 3 + step).astype(dtype)
        dout = rng.standard_normal(shape).astype(dtype)
        assert_close(layer.forward(x), twin.forward(x), what="train out")
        assert_close(layer.backward(dout), twin.backward(dout), what="dx",
                     scale=dx_scale(twin, dout))
        assert_same_state(layer, twin, f"step {step}: ", tolerance(dtype))
        assert_close(layer.forward(x, False), twin.forward(x, False), what="eval out",
                     rtol=tolerance(dtype))
        assert_same_state(layer, twin, f"step {step} eval: ", tolerance(dtype))


@pytest.mark.parametrize("train", [True, False])
def test_outputs_keep_input_shape(rng, train):
    layer = bnfast.BatchNormalization(1.0, 0.0)
    for shape in [(4, 3), (4, 3, 2), (4, 1, 2, 3), (4, 2, 1, 1, 3)]:
        layer = bnfast.BatchNormalization(1.0, 0.0)
        x = rng.standard_normal(shape)
        out = layer.forward(x, train)
        assert out.shape == shape and layer.input_shape == shape
        assert layer.backward(np.ones(shape)).shape == shape


def test_eps_default_is_the_books():
    assert bnfast.BatchNormalization(1.0, 0.0).eps == 10e-7 == 1e-6


def test_running_statistics_are_created_as_float64_zeros(rng):
    layer = bnfast.BatchNormalization(1.0, 0.0)
    assert layer.running_mean is None and layer.running_var is None
    x = rng.standard_normal((6, 4)).astype(np.float32)
    layer.forward(x, train_flg=False)        # eval first: zeros are created, as in the reference
    assert layer.running_mean.dtype == np.float64 and not layer.running_mean.any()
    assert layer.running_var.shape == (4,) and not layer.running_var.any()


def test_running_statistics_follow_momentum_across_steps(rng):
    d = 9
    gamma, beta = make_params(rng, d)
    layer, twin = pair(gamma, beta, momentum=0.8)
    for step, momentum in enumerate([0.8, 0.5, 0.99, 0.0, 1.0]):
        layer.momentum = twin.momentum = momentum
        x = rng.standard_normal((11, d)) * (step + 1) + step
        layer.forward(x)
        twin.forward(x)
        assert_close(layer.running_mean, twin.running_mean, what="running_mean")
        assert_close(layer.running_var, twin.running_var, what="running_var")
    # and the rule itself, independently of the twin
    before_mean, before_var = layer.running_mean, layer.running_var
    x = rng.standard_normal((11, d))
    layer.momentum = 0.7
    layer.forward(x)
    np.testing.assert_allclose(layer.running_mean, 0.7 * before_mean + 0.3 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.7 * before_var + 0.3 * x.var(0), rtol=1e-12)


def test_running_statistics_are_rebound_never_mutated(rng):
    d = 5
    given_mean, given_var = rng.standard_normal(d), rng.random(d) + 0.5
    keep_mean, keep_var = given_mean.copy(), given_var.copy()
    layer = bnfast.BatchNormalization(np.ones(d), np.zeros(d), 0.9, given_mean, given_var)
    layer.forward(rng.standard_normal((4, d)))
    assert layer.running_mean is not given_mean and layer.running_var is not given_var
    np.testing.assert_array_equal(given_mean, keep_mean)
    np.testing.assert_array_equal(given_var, keep_var)
    seen_mean = layer.running_mean
    seen_copy = seen_mean.copy()
    layer.forward(rng.standard_normal((4, d)))
    assert layer.running_mean is not seen_mean
    np.testing.assert_array_equal(seen_mean, seen_copy)


def test_gamma_beta_are_held_by_reference(rng):
    d = 6
    gamma, beta = np.ones(d), np.zeros(d)
    layer = bnfast.BatchNormalization(gamma, beta)
    assert layer.gamma is gamma and layer.beta is beta
    x = rng.standard_normal((8, d))
    first = layer.forward(x)
    gamma *= 2.0          # an optimizer updating in place
    beta += 1.0
    second = layer.forward(x)
    np.testing.assert_allclose(second, 2.0 * first + 1.0, rtol=1e-12, atol=1e-12)
    gamma[3] += 1e-3      # numerical-gradient code perturbing one element
    third = layer.forward(x)
    assert np.array_equal(third[:, :3], second[:, :3])
    assert not np.allclose(third[:, 3], second[:, 3])
    layer.gamma = np.full(d, 5.0)   # rebinding
    np.testing.assert_allclose(layer.forward(x), 5.0 * first + 1.0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma,beta", [(2.0, 0.5), (3, 1), (np.float64(1.5), np.float64(-1)),
                                        (np.array([2.0]), np.array(0.25)), ([1.0, 2.0, 3.0], 0)])
def test_scalar_and_broadcast_parameters(rng, gamma, beta):
    x = rng.standard_normal((5, 3))
    layer, twin = pair(gamma, beta)
    assert_close(layer.forward(x), twin.forward(x))
    dout = rng.standard_normal((5, 3))
    assert_close(layer.backward(dout), twin.backward(dout))
    assert_close(layer.dgamma, twin.dgamma)
    assert_close(layer.dbeta, twin.dbeta)


DTYPE_CASES = [
    # x dtype, gamma, beta, running stats dtype or None
    (np.float64, "f8", "f8", None),
    (np.float32, "f4", "f4", None),
    (np.float32, "f8", "f8", None),
    (np.float32, "f4", "f4", "f4"),
    (np.float32, 1.0, 0.0, None),
    (np.float32, "f4", 0.0, "f8"),
    (np.float64, "f4", "f4", "f4"),
    (np.float16, "f2", "f2", "f2"),
    (np.float16, 1.0, 0.0, None),
    (np.int64, "f8", "f8", None),
    (np.int32, 1.0, 0.0, None),
    (np.uint8, "f4", "f4", "f4"),
    (np.bool_, 1.0, 0.0, None),
    (np.float32, np.float64(1.0), 0.0, None),
    (np.float32, np.array(2.0, np.float64), 0.0, None),
    (np.float32, "i8", "f4", None),
]


def _param(spec, d, rng):
    if isinstance(spec, str):
        return (rng.random(d) + 0.5).astype(spec)
    return spec


@pytest.mark.parametrize("x_dtype,gspec,bspec,rdtype", DTYPE_CASES)
def test_dtypes_and_values_follow_reference_promotion(rng, x_dtype, gspec, bspec, rdtype):
    d = 7
    x = (rng.standard_normal((9, d)) * 4).astype(x_dtype) if x_dtype is not np.bool_ \
        else rng.random((9, d)) > 0.5
    gamma, beta = _param(gspec, d, rng), _param(bspec, d, rng)
    kwargs = {}
    if rdtype is not None:
        kwargs = dict(running_mean=rng.standard_normal(d).astype(rdtype),
                      running_var=(rng.random(d) + 0.5).astype(rdtype))
    layer, twin = pair(gamma, beta, **kwargs)
    dout = rng.standard_normal((9, d)).astype(x_dtype if x_dtype in (np.float16, np.float32)
                                              else np.float64)
    # The reference computes in the narrowest float among its operands.
    operands = [np.asarray(v) for v in (x, gamma, beta, *kwargs.values())]
    loose = max(tolerance(a.dtype) if a.dtype.kind == "f" and a.ndim else 1e-10
                for a in operands)
    loose = 5e-3 if x_dtype is np.float16 else loose
    assert_close(layer.forward(x), twin.forward(x), rtol=loose, what="train")
    assert_close(layer.backward(dout), twin.backward(dout), rtol=loose, what="dx")
    for name in ("dgamma", "dbeta", "running_mean", "running_var", "xc", "xn", "std"):
        assert_close(getattr(layer, name), getattr(twin, name), rtol=loose, what=name)
    assert_close(layer.forward(x, False), twin.forward(x, False), rtol=loose, what="eval")
    assert_close(layer.backward(dout), twin.backward(dout), rtol=loose, what="eval dx")


@pytest.mark.parametrize("count", [65535, 65536])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per feature", "per channel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_backward_dtype_follows_the_reference_at_every_batch_count(rng, count, per_channel,
                                                                   dtype):
    """The reference's backward divides by the batch count, a Python int:
    NumPy 1 promotes it by value, so from 65536 values per feature (a
    uint32) a float32 backward comes out float64 there, and a float16 one
    float32 from 256 (uint16); NumPy 2 keeps the input's dtype.  bnfast must
    follow whichever NumPy is installed, on its fast paths too."""
    shape = (1, 2, count) if per_channel else (count, 2)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    layer, twin = pair(np.ones(2, dtype), np.zeros(2, dtype), per_channel=per_channel)
    with np.errstate(over="ignore"):
        layer.forward(x)
        twin.forward(x)
        dx, expected = layer.backward(dout), twin.backward(dout)
    assert dx.dtype == expected.dtype
    assert_close(dx, expected, rtol=5e-3 if dtype == np.float16 else 1e-4, what="dx")
    for name in ("dgamma", "dbeta"):
        assert getattr(layer, name).dtype == getattr(twin, name).dtype, name


def test_integer_dout_gives_integer_dbeta_like_the_reference(rng):
    layer, twin = pair(np.ones(3), np.zeros(3))
    x = rng.standard_normal((4, 3))
    layer.forward(x)
    twin.forward(x)
    dout = np.arange(12).reshape(4, 3)
    assert_close(layer.backward(dout), twin.backward(dout))
    assert layer.dbeta.dtype == twin.dbeta.dtype and np.array_equal(layer.dbeta, twin.dbeta)


def test_each_call_returns_new_arrays(rng):
    layer = bnfast.BatchNormalization(np.ones(4), np.zeros(4))
    x1, x2 = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    out1 = layer.forward(x1)
    keep = out1.copy()
    dx1 = layer.backward(np.ones((5, 4)))
    dx_keep, dg_keep = dx1.copy(), layer.dgamma.copy()
    dg1 = layer.dgamma
    xn1 = layer.xn
    xn_keep = xn1.copy()
    out2 = layer.forward(x2)
    layer.backward(rng.standard_normal((5, 4)))
    assert out2 is not out1 and np.array_equal(out1, keep)
    assert np.array_equal(dx1, dx_keep) and np.array_equal(dg1, dg_keep)
    assert np.array_equal(xn1, xn_keep)
    assert layer.forward(x1, False) is not layer.forward(x1, False)


def test_input_is_never_modified_and_later_changes_do_not_leak(rng):
    x = rng.standard_normal((6, 4))
    keep = x.copy()
    layer, twin = pair(np.ones(4), np.zeros(4))
    layer.forward(x)
    twin.forward(x)
    assert np.array_equal(x, keep)
    x[:] = 1e6            # the caller reuses its buffer before backward
    dout = rng.standard_normal((6, 4))
    assert_close(layer.backward(dout), twin.backward(dout))
    assert_close(layer.xn, twin.xn)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_memory_layout_gives_the_twins_result(rng, dtype):
    base = (rng.standard_normal((6, 3, 4)) * 2 + 1).astype(dtype)
    dout = rng.standard_normal((6, 3, 4)).astype(dtype)
    gamma, beta = make_params(rng, 12, dtype)
    for name, x in layouts(base):
        for dname, g in layouts(dout):
            layer, twin = pair(gamma, beta)
            keep, gkeep = x.copy(), g.copy()
            assert_close(layer.forward(x), twin.forward(x), what=f"{name} train")
            assert_close(layer.backward(g), twin.backward(g), what=f"{name}/{dname} dx")
            # float32 input: the reference's running statistics are float32-accurate
            assert_close(layer.forward(x, False), twin.forward(x, False), what=f"{name} eval",
                         rtol=tolerance(dtype))
            assert_close(layer.backward(g), twin.backward(g), what=f"{name}/{dname} eval dx",
                         rtol=tolerance(dtype))
            assert np.array_equal(x, keep) and np.array_equal(g, gkeep), "input modified"


def test_zero_strided_and_nested_list_input(rng):
    row = rng.standard_normal(5)
    x = np.broadcast_to(row, (4, 5))
    layer, twin = pair(np.ones(5), np.zeros(5))
    assert_close(layer.forward(x), twin.forward(x))   # every feature constant
    nested = rng.standard_normal((3, 2)).tolist()
    layer, twin = pair(1.0, 0.0)
    assert_close(layer.forward(nested), twin.forward(nested))


def test_eval_mode_backward_is_the_gradient_of_the_eval_function(rng):
    d = 5
    gamma, beta = make_params(rng, d)
    running_mean, running_var = rng.standard_normal(d), rng.random(d) + 0.1
    layer = bnfast.BatchNormalization(gamma, beta, running_mean=running_mean.copy(),
                                      running_var=running_var.copy())
    x = rng.standard_normal((7, d))
    out = layer.forward(x, train_flg=False)
    std = np.sqrt(running_var + 1e-6)
    np.testing.assert_allclose(out, gamma * (x - running_mean) / std + beta, rtol=1e-13)
    dout = rng.standard_normal((7, d))
    dx = layer.backward(dout)
    np.testing.assert_allclose(dx, dout * gamma / std, rtol=1e-13)
    np.testing.assert_allclose(layer.dgamma, np.sum(dout * (x - running_mean) / std, 0), rtol=1e-12)
    np.testing.assert_allclose(layer.dbeta, dout.sum(0), rtol=1e-12)
    # the last training batch's cache is left alone by eval calls
    layer.forward(x * 2)
    xn_train = layer.xn.copy()
    layer.forward(x, False)
    layer.backward(dout)
    assert np.array_equal(layer.xn, xn_train)


def numerical_gradients(layer_factory, x, dout, train, h=1e-6):
    """Central differences of sum(forward(x) * dout) w.r.t. x, gamma and beta."""
    def loss(xv, g, b):
        layer = layer_factory(g, b)
        if not train:
            layer.forward(x)           # give it running statistics
        return float(np.sum(layer.forward(xv, train) * dout))

    base = layer_factory(None, None)
    gamma, beta = base.gamma.copy(), base.beta.copy()
    grads = []
    for target in ("x", "gamma", "beta"):
        arr = {"x": x, "gamma": gamma, "beta": beta}[target]
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            plus = loss(x, gamma, beta)
            arr[idx] = old - h
            minus = loss(x, gamma, beta)
            arr[idx] = old
            grad[idx] = (plus - minus) / (2 * h)
        grads.append(grad)
    return grads


def assert_backward_matches_central_differences(layer_factory, x, dout, train):
    """backward's dx, dgamma and dbeta of a layer from layer_factory(None,
    None) equal the central differences of sum(forward(x) * dout)."""
    num_dx, num_dgamma, num_dbeta = numerical_gradients(layer_factory, x, dout, train)
    layer = layer_factory(None, None)
    if not train:
        layer.forward(x)
    layer.forward(x, train)
    dx = layer.backward(dout)
    scale = max(1.0, float(np.abs(num_dx).max()))
    np.testing.assert_allclose(dx, num_dx, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(layer.dgamma, num_dgamma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.dbeta, num_dbeta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (5, 4), (3, 2, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_backward_matches_central_differences(rng, shape, train):
    d = features(shape)
    gamma0, beta0 = make_params(rng, d)
    x = rng.standard_normal(shape) * 2 + 0.5
    dout = rng.standard_normal(shape)

    def factory(g, b):
        return bnfast.BatchNormalization(gamma0.copy() if g is None else g,
                                         beta0.copy() if b is None else b, momentum=1.0,
                                         running_mean=np.full(d, 0.3), running_var=np.full(d, 2.0))

    assert_backward_matches_central_differences(factory, x, dout, train)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradient_invariants(rng, dtype):
    """Per feature: sum_i dx = 0 and sum_i dx * xhat = 0 (the mean and the scale
    of a normalized batch do not depend on x's shift and scale).  The second is
    exact only for eps = 0 (with eps it is off by a factor eps / (var + eps))."""
    d = 40
    layer = bnfast.BatchNormalization(np.ones(d, dtype), np.zeros(d, dtype), eps=0.0)
    x = (rng.standard_normal((50, d)) * 5 + 3).astype(dtype)
    layer.forward(x)
    dx = layer.backward(rng.standard_normal((50, d)).astype(dtype)).astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    scale = np.abs(dx).sum(0)
    assert np.all(np.abs(dx.sum(0)) <= tol * scale)
    assert np.all(np.abs((dx * layer.xn).sum(0)) <= tol * scale * np.abs(layer.xn).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_constant_feature_gives_exactly_beta(rng, dtype):
    d = 6
    x = rng.standard_normal((33, d)).astype(dtype)
    x[:, 2] = dtype(0.1)
    x[:, 4] = dtype(-123456.789)
    gamma, beta = make_params(rng, d, dtype)
    layer = bnfast.BatchNormalization(gamma, beta)
    out = layer.forward(x)
    assert np.array_equal(out[:, 2], np.full(33, beta[2])) and np.array_equal(out[:, 4],
                                                                              np.full(33, beta[4]))
    assert np.all(layer.xn[:, [2, 4]] == 0)
    dx = layer.backward(rng.standard_normal((33, d)).astype(dtype))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(layer.dgamma))


@pytest.mark.parametrize("clone_of", [lambda layer: pickle.loads(pickle.dumps(layer)),
                                      copy.deepcopy], ids=["pickle", "deepcopy"])
@pytest.mark.parametrize("last_train", [True, False])
def test_pickle_and_deepcopy_round_trip(rng, clone_of, last_train):
    d = 8
    gamma, beta = make_params(rng, d)
    layer = bnfast.BatchNormalization(gamma, beta, momentum=0.7)
    x = rng.standard_normal((10, d))
    layer.forward(x)
    layer.backward(rng.standard_normal((10, d)))
    layer.forward(x * 2, last_train)
    for clone in (clone_of(layer),):
        for name in ATTRS + ("gamma", "beta", "eps"):
            a, b = getattr(clone, name), getattr(layer, name)
            assert (a == b) if not isinstance(b, np.ndarray) else np.array_equal(a, b), name
        dout = rng.standard_normal((10, d))
        assert np.array_equal(clone.backward(dout), layer.backward(dout))
        x2 = rng.standard_normal((10, d))
        assert np.array_equal(clone.forward(x2), layer.forward(x2))
        assert np.array_equal(clone.running_var, layer.running_var)
        # the clone's buffers, reused by that forward, are its own and consistent
        assert np.array_equal(clone.xn, layer.xn) and np.array_equal(clone.std, layer.std)
        assert np.array_equal(clone.backward(dout), layer.backward(dout))
        assert np.array_equal(clone.dgamma, layer.dgamma)
        assert clone.gamma is not layer.gamma


def test_comparison_with_the_books_class(rng):
    """Randomized agreement with the verbatim seed class (../shared/reference)."""
    path = seed_reference_path()
    if path is None:
        pytest.skip("the seed reference (../shared/reference/reference_bn.py) is not beside this "
                    "checkout; set BNFAST_SEED_REFERENCE to its path")
    spec = importlib.util.spec_from_file_location("seed_reference_bn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    worst = 0.0
    for trial in range(40):
        shape = [(int(rng.integers(1, 70)), int(rng.integers(1, 90)))][0] if trial % 2 else \
            (int(rng.integers(1, 9)), int(rng.integers(1, 4)), int(rng.integers(1, 5)),
             int(rng.integers(1, 5)))
        d = features(shape)
        gamma, beta = make_params(rng, d)
        mine = bnfast.BatchNormalization(gamma.copy(), beta.copy(), momentum=0.85)
        book = module.BatchNormalization(gamma.copy(), beta.copy(), momentum=0.85)
        for step in range(3):
            x = rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
            dout = rng.standard_normal(shape)
            pairs = [(mine.forward(x), book.forward(x)), (mine.backward(dout), book.backward(dout)),
                     (mine.dgamma, book.dgamma), (mine.dbeta, book.dbeta),
                     (mine.running_mean, book.running_mean), (mine.running_var, book.running_var),
                     (mine.xn, book.xn), (mine.xc, book.xc), (mine.std, book.std),
                     (mine.forward(x, False), book.forward(x, False))]
            for a, b in pairs:
                assert a.dtype == b.dtype and a.shape == b.shape
                rel = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)
                worst = max(worst, float(rel))
    print(f"worst relative difference against the book's class: {worst:.3e}")
    assert worst < 1e-10


def train_mlp(layer_class, steps=60, seed=7):
    """A from-scratch two-layer MLP (affine, batch norm, ReLU, affine, softmax
    cross-entropy) trained with in-place SGD, as in the book; returns the
    training losses and, every 10 steps, the eval-mode loss on all the data."""
    rng = np.random.default_rng(seed)
    x_all = rng.standard_normal((400, 20)) * 3 + 1
    labels = (x_all[:, :3].sum(1) > 3).astype(int) + (x_all[:, 3] > 1)
    w1 = rng.standard_normal((20, 32)) * 0.2
    b1 = np.zeros(32)
    w2 = rng.standard_normal((32, 3)) * 0.2
    b2 = np.zeros(3)
    gamma, beta = np.ones(32), np.zeros(32)
    bn = layer_class(gamma, beta)
    lr = 0.1

    def loss_and_grads(x, t, train):
        a1 = x @ w1 + b1
        h = bn.forward(a1, train)
        r = np.maximum(h, 0)
        logits = r @ w2 + b2
        logits = logits - logits.max(1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(len(t)), t] + 1e-12))
        if not train:
            return loss, None
        dlogits = p.copy()
        dlogits[np.arange(len(t)), t] -= 1
        dlogits /= len(t)
        dr = dlogits @ w2.T
        da1 = bn.backward(dr * (h > 0))
        return loss, (x.T @ da1, da1.sum(0), r.T @ dlogits, dlogits.sum(0))

    losses, eval_losses = [], []
    for step in range(steps):
        idx = rng.choice(len(x_all), 50, replace=False)
        loss, (dw1, db1, dw2, db2) = loss_and_grads(x_all[idx], labels[idx], True)
        losses.append(loss)
        for param, grad in ((w1, dw1), (b1, db1), (w2, dw2), (b2, db2),
                            (gamma, bn.dgamma), (beta, bn.dbeta)):
            param -= lr * grad            # in place: the layer sees gamma and beta change
        if step % 10 == 9:
            eval_losses.append(loss_and_grads(x_all, labels, False)[0])
    return np.array(losses), np.array(eval_losses)


def test_mlp_training_curve_matches_the_twin():
    """The book's use: an MLP trained with in-place SGD follows the same loss
    curve with bnfast's layer as with the twin's, to 1e-8 relative."""
    mine, mine_eval = train_mlp(bnfast.BatchNormalization)
    theirs, theirs_eval = train_mlp(Twin)
    assert mine[-1] < 0.6 * mine[0]          # it does learn
    np.testing.assert_allclose(mine, theirs, rtol=1e-8, atol=0)
    np.testing.assert_allclose(mine_eval, theirs_eval, rtol=1e-8, atol=0)


# ---------------------------------------------------------------------------
# Parameter shapes: every shape the book's arithmetic (gamma * xn + beta,
# momentum * running_mean + ...) broadcasts per feature, with its result shapes.

def _shaped(values: np.ndarray, shape: str) -> np.ndarray:
    """values (D,) as shape '(D,)', '(1, D)', or (for the first value only)
    '(1,)', '(1, 1)', '()'."""
    d = values.shape[0]
    return {"(D,)": values, "(1, D)": values.reshape(1, d), "(1,)": values[:1],
            "(1, 1)": values[:1].reshape(1, 1), "()": values[0]}[shape]


@pytest.mark.parametrize("param_shape", ["(D,)", "(1, D)", "(1,)", "(1, 1)", "()"])
@pytest.mark.parametrize("running_shape", [None, "(D,)", "(1, D)", "(1, 1)"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_parameter_shape_the_books_arithmetic_accepts_gives_the_twins_results(
        rng, param_shape, running_shape, dtype):
    """dgamma and dbeta are (D,) whatever gamma's shape (the book's
    sum(axis=0)); new running statistics keep a (1, D) shape."""
    d, shape = 6, (5, 2, 3)
    gamma, beta = make_params(rng, d, dtype)
    kwargs = {}
    if running_shape is not None:
        kwargs = dict(running_mean=_shaped(rng.standard_normal(d).astype(dtype), running_shape),
                      running_var=_shaped((rng.random(d) + 0.5).astype(dtype), running_shape))
    layer, twin = pair(_shaped(gamma, param_shape), _shaped(beta, param_shape), **kwargs)
    for step in range(2):
        x = (rng.standard_normal(shape) * 2 + step).astype(dtype)
        dout = rng.standard_normal(shape).astype(dtype)
        assert_close(layer.forward(x), twin.forward(x), what="train out")
        assert_close(layer.backward(dout), twin.backward(dout), scale=dx_scale(twin, dout),
                     what="dx")
        assert layer.dgamma.shape == layer.dbeta.shape == (d,)
        assert_same_state(layer, twin, f"step {step}: ", tolerance(dtype))
        assert_close(layer.forward(x, False), twin.forward(x, False), rtol=tolerance(dtype),
                     what="eval out")
        assert_close(layer.backward(dout), twin.backward(dout), rtol=tolerance(dtype),
                     what="eval dx")
        assert_same_state(layer, twin, f"step {step} eval: ", tolerance(dtype))
    if running_shape in ("(1, D)", "(1, 1)"):
        assert layer.running_mean.shape == layer.running_var.shape == (1, d)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_row_vector_parameters_train_with_in_place_sgd_like_the_twin(rng, dtype):
    """The book's networks keep gamma and beta as (1, D) arrays and update them
    in place (gamma -= lr * dgamma): each step sees the last update."""
    d, lr = 7, 0.5
    gamma, beta = make_params(rng, d, dtype)
    layer, twin = pair(gamma.reshape(1, d), beta.reshape(1, d))
    mine, theirs = layer.gamma, twin.gamma
    for step in range(4):
        x = (rng.standard_normal((9, d)) * 3 + 1).astype(dtype)
        dout = rng.standard_normal((9, d)).astype(dtype)
        assert_close(layer.forward(x), twin.forward(x), what=f"step {step} out")
        assert_close(layer.backward(dout), twin.backward(dout), scale=dx_scale(twin, dout),
                     what=f"step {step} dx")
        for model in (layer, twin):
            model.gamma -= lr * model.dgamma
            model.beta -= lr * model.dbeta
        assert_close(layer.gamma, twin.gamma, what=f"step {step} gamma")
        assert_close(layer.beta, twin.beta, what=f"step {step} beta")
    assert layer.gamma is mine and twin.gamma is theirs and mine.shape == (1, d)
    assert not np.allclose(mine, gamma)          # the updates did happen
    assert_close(layer.forward(x, False), twin.forward(x, False), rtol=tolerance(dtype))


def test_row_vector_parameters_give_the_books_shapes(rng):
    """What the verbatim book class gives for (1, D) parameters and running
    statistics, which the twin must reproduce."""
    path = seed_reference_path()
    if path is None:
        pytest.skip("the seed reference is not beside this checkout")
    spec = importlib.util.spec_from_file_location("seed_reference_bn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = 4
    x, dout = rng.standard_normal((6, d)), rng.standard_normal((6, d))
    for running in (None, (1, d)):
        kwargs = {} if running is None else dict(running_mean=np.zeros(running),
                                                 running_var=np.ones(running))
        book = module.BatchNormalization(np.ones((1, d)), np.zeros((1, d)), **kwargs)
        layer = bnfast.BatchNormalization(np.ones((1, d)), np.zeros((1, d)), **kwargs)
        for name, a, b in [("out", layer.forward(x), book.forward(x)),
                           ("dx", layer.backward(dout), book.backward(dout)),
                           ("dgamma", layer.dgamma, book.dgamma),
                           ("dbeta", layer.dbeta, book.dbeta),
                           ("running_mean", layer.running_mean, book.running_mean),
                           ("running_var", layer.running_var, book.running_var),
                           ("eval out", layer.forward(x, False), book.forward(x, False))]:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)


def test_repr_shows_features_mode_eps_momentum_and_dtypes():
    d = 10
    layer = bnfast.BatchNormalization(np.ones(d, np.float32), np.zeros(d, np.float32),
                                      momentum=0.8, eps=1e-5)
    assert repr(layer) == ("BatchNormalization(features=10, mode='per feature', eps=1e-05, "
                           "momentum=0.8, dtypes: gamma float32, beta float32, "
                           "running_mean None, running_var None)")
    layer.forward(np.ones((3, 2, 5), np.float32))
    assert repr(layer).endswith("dtypes: x float32, gamma float32, beta float32, "
                                "running_mean float64, running_var float64)")
    channels = bnfast.BatchNormalization(1.0, 0, per_channel=True, running_var_unbiased=True)
    assert repr(channels) == ("BatchNormalization(channels=None, mode='per channel, unbiased "
                              "running_var', eps=1e-06, momentum=0.9, dtypes: gamma float, "
                              "beta int, running_mean None, running_var None)")
    channels.forward(np.ones((2, 3, 4)))
    assert repr(channels).startswith("BatchNormalization(channels=3, ")


def test_forward_and_backward_document_their_parameters():
    forward, backward = bnfast.BatchNormalization.forward, bnfast.BatchNormalization.backward
    assert "Parameters\n" in forward.__doc__ and "train_flg : bool" in forward.__doc__
    assert "running_mean and running_var" in forward.__doc__.split("train_flg : bool")[1]
    assert "Parameters\n" in backward.__doc__ and "dout : array_like" in backward.__doc__
