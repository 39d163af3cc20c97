"""Robustness: bad input gets a clear exception and changes nothing; odd but
valid input gives the reference's results; nothing crashes the process.

Layer calls are checked for state: a rejected call must leave every attribute
exactly as it was, and the next valid call must give the twin's results.
Functional calls are checked for caller arrays: a rejected call writes to
none of them (out= included), a valid call writes only to out=.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import pytest

import bnfast
from bnfast._native import kernels
from bnfast.reference import BatchNormalization as Twin
from conftest import REPO, assert_close, dx_scale, layouts, make_params, pair, tolerance

D = 5
SHAPE = (4, D)

# dtypes bnfast refuses for data (x, dout): (id, array maker, dtype text in the message)
BAD_DTYPES = [
    ("complex", lambda shape: np.ones(shape, np.complex128), "complex128"),
    ("object", lambda shape: np.ones(shape, object), "object"),
    ("str", lambda shape: np.full(shape, "1.5"), "<U3"),
    ("bytes", lambda shape: np.full(shape, b"1.5"), "|S3"),
    ("datetime", lambda shape: np.zeros(shape, "M8[s]"), "datetime64[s]"),
    ("timedelta", lambda shape: np.zeros(shape, "m8[s]"), "timedelta64[s]"),
]
BAD_EPS = [(-1.0, r"eps must be finite and >= 0, got -1\.0"),
           (float("nan"), r"eps must be finite and >= 0, got nan"),
           (float("inf"), r"eps must be finite and >= 0, got inf")]
# One wording wherever running statistics come as a pair.
RUNNING_PAIR = (r"running_mean and running_var must both be given or both be None; got "
                r"running_mean=array of shape \(5,\) and dtype float64 and running_var=None")
BAD_MOMENTUM = [("str", "0.9", r"momentum must be a real number, got str"),
                ("none", None, r"momentum must be a real number, got None"),
                ("complex", 0.9 + 0j, r"momentum must be a real number, got complex"),
                ("bool", True, r"momentum must be a real number, got bool"),
                ("array", np.array([0.9]), r"momentum must be a real number, got array of shape")]


# ---------------------------------------------------------------------------
# The layer: rejected calls change no state.

STATE = ("input_shape", "batch_size", "xc", "xn", "std", "dgamma", "dbeta",
         "running_mean", "running_var")


def snapshot(layer) -> dict[str, Any]:
    """Copies of every stateful attribute, plus the running statistics' identity."""
    copies = {name: (value.copy() if isinstance(value, np.ndarray) else value)
              for name in STATE for value in [getattr(layer, name)]}
    return {"ids": (id(layer.running_mean), id(layer.running_var)), "values": copies}


def assert_state_is(layer, before: dict[str, Any]) -> None:
    assert (id(layer.running_mean), id(layer.running_var)) == before["ids"], \
        "running statistics were rebound"
    for name, old in before["values"].items():
        new = getattr(layer, name)
        if isinstance(old, np.ndarray):
            assert isinstance(new, np.ndarray) and new.dtype == old.dtype, name
            assert np.array_equal(new, old, equal_nan=True), f"{name} changed"
        else:
            assert new == old, f"{name}: {new!r} != {old!r}"


def assert_follows_twin(layer, twin, rng, primed: bool) -> None:
    """The layer still works, and exactly like the twin, after a rejection."""
    if primed:   # the cache of the last good forward is intact
        dout = rng.standard_normal(SHAPE)
        assert_close(layer.backward(dout), twin.backward(dout), scale=dx_scale(twin, dout),
                     what="backward on the old cache")
        assert_close(layer.dgamma, twin.dgamma, what="dgamma")
    x = rng.standard_normal(SHAPE) * 2 + 1
    dout = rng.standard_normal(SHAPE)
    assert_close(layer.forward(x), twin.forward(x), what="train forward")
    assert_close(layer.backward(dout), twin.backward(dout), scale=dx_scale(twin, dout), what="dx")
    for name in ("running_mean", "running_var", "dgamma", "dbeta", "xn"):
        assert_close(getattr(layer, name), getattr(twin, name), what=name)
    assert_close(layer.forward(x, False), twin.forward(x, False), what="eval forward")


class LayerCase(NamedTuple):
    id: str
    call: Callable[[Any], Any]
    error: type
    match: str
    # Sets a bad attribute before the call; returns the undo.  The snapshot is
    # taken after it, so the rejected call must not even drop the bad value.
    spoil: Optional[Callable[[Any], Callable[[], None]]] = None
    primed_only: bool = False     # needs a forward first (backward checks)
    fresh_only: bool = False


def rebind(name: str, value: Any) -> Callable[[Any], Callable[[], None]]:
    def spoil(layer):
        old = getattr(layer, name)
        setattr(layer, name, value)
        return lambda: setattr(layer, name, old)
    return spoil


def layer_cases() -> list[LayerCase]:
    forward = lambda shape_or_x, train=True: (  # noqa: E731
        lambda layer: layer.forward(shape_or_x if isinstance(shape_or_x, np.ndarray)
                                    else np.ones(shape_or_x), train))
    backward = lambda dout: lambda layer: layer.backward(dout)  # noqa: E731
    cases = [
        LayerCase("x_ndim0", forward(np.array(1.0)), ValueError, r"ndim >= 2.*shape \(\)"),
        LayerCase("x_ndim1", forward((D,)), ValueError,
                  r"ndim >= 2.*shape \(5,\); for one sample of D features pass x\[None\] or "
                  r"x\.reshape\(1, -1\)"),
        LayerCase("x_ndim1_eval", forward((D,), False), ValueError, r"ndim >= 2.*shape \(5,\)"),
        LayerCase("empty_batch", forward((0, D)), ValueError, r"empty batch.*\(0, 5\)"),
        LayerCase("no_features", forward((4, 0)), ValueError, r"no features.*\(4, 0\)"),
        LayerCase("no_features_4d", forward((4, 5, 0, 2), False), ValueError,
                  r"no features.*\(4, 5, 0, 2\)"),
        LayerCase("features_differ_from_gamma", forward((4, D + 1)), ValueError,
                  r"gamma has shape \(5,\).*6 features.*\(4, 6\)"),
        LayerCase("gamma_per_channel_for_a_per_feature_layer", forward((4, D, 2, 2)), ValueError,
                  r"gamma has shape \(5,\), which is not a per-feature shape for the 20 features"
                  r".*one value per channel of x \(5 = shape\[1\]\).*pass per_channel=True"),
        LayerCase("only_running_mean", forward(SHAPE), ValueError, RUNNING_PAIR,
                  spoil=rebind("running_var", None)),
        LayerCase("features_differ_from_running_stats", forward((4, D + 1), False), ValueError,
                  r"running_mean has shape \(5,\).*6 features",
                  spoil=_scalar_params),
        LayerCase("gamma_2d", forward(SHAPE), ValueError, r"gamma has shape \(2, 5\)",
                  spoil=rebind("gamma", np.ones((2, D)))),
        LayerCase("gamma_too_long", forward(SHAPE, False), ValueError, r"gamma has shape \(6,\)",
                  spoil=rebind("gamma", np.ones(D + 1))),
        LayerCase("beta_2d", forward(SHAPE), ValueError, r"beta has shape \(2, 5\)",
                  spoil=rebind("beta", np.zeros((2, D)))),
        LayerCase("beta_too_long", forward(SHAPE), ValueError, r"beta has shape \(6,\)",
                  spoil=rebind("beta", np.zeros(D + 1))),
        LayerCase("running_mean_2d", forward(SHAPE), ValueError, r"running_mean has shape \(2, 5\)",
                  spoil=rebind("running_mean", np.zeros((2, D)))),
        LayerCase("running_var_too_long", forward(SHAPE, False), ValueError,
                  r"running_var has shape \(6,\)", spoil=rebind("running_var", np.ones(D + 1))),
        LayerCase("gamma_too_long_at_backward", backward(np.ones(SHAPE)), ValueError,
                  r"gamma has shape \(6,\)", spoil=rebind("gamma", np.ones(D + 1)),
                  primed_only=True),
        LayerCase("dout_wrong_features", backward(np.ones((4, D + 1))), ValueError,
                  r"dout has shape \(4, 6\).*\(4, 5\)", primed_only=True),
        LayerCase("dout_wrong_batch", backward(np.ones((3, D))), ValueError,
                  r"dout has shape \(3, 5\).*\(4, 5\)", primed_only=True),
        LayerCase("dout_1d", backward(np.ones(4 * D)), ValueError, r"dout has shape \(20,\)",
                  primed_only=True),
        LayerCase("backward_before_forward", backward(np.ones(SHAPE)), RuntimeError,
                  r"backward\(\) called before any forward\(\)", fresh_only=True),
    ]
    for name, make, text in BAD_DTYPES:
        cases.append(LayerCase(f"x_{name}", forward(make(SHAPE)), TypeError,
                               rf"x has dtype {re.escape(text)}"))
        cases.append(LayerCase(f"dout_{name}", backward(make(SHAPE)), TypeError,
                               rf"dout has dtype {re.escape(text)}", primed_only=True))
    cases.append(LayerCase("x_ragged_list", lambda layer: layer.forward([[1.0, 2.0], [3.0]]),
                           TypeError, r"x cannot be converted to a NumPy array"))
    cases.append(LayerCase("gamma_complex", forward(SHAPE), TypeError,
                           r"gamma has dtype complex128",
                           spoil=rebind("gamma", np.ones(D, complex))))
    return cases


def _scalar_params(layer) -> Callable[[], None]:
    """gamma and beta as scalars, so the running statistics set the feature count."""
    old = layer.gamma, layer.beta
    layer.gamma, layer.beta = 1.0, 0.0

    def undo():
        layer.gamma, layer.beta = old
    return undo


def _layer_pair(rng, primed: bool):
    gamma, beta = make_params(rng, D)
    if primed:
        layer, twin = pair(gamma, beta, momentum=0.8)
        x, dout = rng.standard_normal(SHAPE) * 3 - 1, rng.standard_normal(SHAPE)
        layer.forward(x), twin.forward(x)
        layer.backward(dout), twin.backward(dout)
    else:
        layer, twin = pair(gamma, beta, momentum=0.8, running_mean=rng.standard_normal(D),
                           running_var=rng.random(D) + 0.5)
    return layer, twin


def _layer_params():
    for case in layer_cases():
        for primed in (False, True):
            if not (case.primed_only and not primed) and not (case.fresh_only and primed):
                yield pytest.param(case, primed,
                                   id=f"{case.id}-{'primed' if primed else 'fresh'}")


@pytest.mark.parametrize("case,primed", list(_layer_params()))
def test_layer_rejects_bad_input_and_keeps_its_state(rng, case, primed):
    layer, twin = _layer_pair(rng, primed)
    undo = case.spoil(layer) if case.spoil else (lambda: None)
    before = snapshot(layer)
    with pytest.raises(case.error, match=case.match):
        case.call(layer)
    assert_state_is(layer, before)
    undo()
    assert_follows_twin(layer, twin, rng, primed)


SETTINGS = ([pytest.param("eps", eps, ValueError, match, id=f"eps_{eps}") for eps, match in BAD_EPS]
            + [pytest.param("eps", "1e-6", TypeError, r"eps must be a real number, got str",
                            id="eps_str")]
            + [pytest.param("momentum", value, TypeError, match, id=f"momentum_{name}")
               for name, value, match in BAD_MOMENTUM])


@pytest.mark.parametrize("primed", [False, True], ids=["fresh", "primed"])
@pytest.mark.parametrize("name,value,error,match", SETTINGS)
def test_a_bad_eps_or_momentum_is_refused_when_set_and_changes_nothing(rng, primed, name,
                                                                      value, error, match):
    """eps and momentum are checked where they are set, so the mistake is
    reported at the line that makes it; the layer keeps the old value."""
    layer, twin = _layer_pair(rng, primed)
    before = snapshot(layer)
    old = getattr(layer, name)
    with pytest.raises(error, match=match):
        setattr(layer, name, value)
    assert getattr(layer, name) is old
    assert_state_is(layer, before)
    assert_follows_twin(layer, twin, rng, primed)


CONSTRUCTOR_CASES = (
    [pytest.param({"eps": eps}, ValueError, match, id=f"eps_{eps}") for eps, match in BAD_EPS]
    + [pytest.param({"eps": None}, TypeError, r"eps must be a real number, got None",
                    id="eps_none")]
    + [pytest.param({"momentum": value}, TypeError, match, id=f"momentum_{name}")
       for name, value, match in BAD_MOMENTUM])


@pytest.mark.parametrize("kwargs,error,match", CONSTRUCTOR_CASES)
def test_constructor_rejects_bad_eps_and_momentum(kwargs, error, match):
    with pytest.raises(error, match=match):
        bnfast.BatchNormalization(1.0, 0.0, **kwargs)


@pytest.mark.parametrize("train", [True, False])
def test_flattened_dout_of_a_4d_input_is_accepted_like_the_reference(rng, train):
    shape = (3, 2, 2, 3)
    gamma, beta = make_params(rng, 12)
    layer, twin = pair(gamma, beta)
    x = np.asfortranarray(rng.standard_normal(shape))
    layer.forward(x), twin.forward(x)
    layer.forward(x, train), twin.forward(x, train)
    dout = rng.standard_normal((3, 12))
    dx = layer.backward(dout)
    assert dx.shape == shape
    assert_close(dx, twin.backward(dout), scale=dx_scale(twin, dout))
    assert_close(layer.dgamma, twin.dgamma)
    assert_close(layer.dbeta, twin.dbeta)


# ---------------------------------------------------------------------------
# The functional API: the same rejections, and no caller array is written.

def valid_args(rng, func: str, dtype=np.float64) -> dict[str, Any]:
    """Arguments of a good call of `func` on a (4, 5) batch."""
    x = (rng.standard_normal(SHAPE) * 2 + 1).astype(dtype)
    gamma, beta = make_params(rng, D, dtype)
    rm, rv = rng.standard_normal(D).astype(dtype), (rng.random(D) + 0.5).astype(dtype)
    dout = rng.standard_normal(SHAPE).astype(dtype)
    if func in ("forward_train", "forward_eval"):
        return dict(x=x, gamma=gamma, beta=beta, running_mean=rm, running_var=rv)
    if func == "backward_train":
        return dict(dout=dout, x=x, mean=x.mean(0).astype(np.float64),
                    var=x.var(0).astype(np.float64), gamma=gamma)
    return dict(dout=dout, x=x, gamma=gamma, running_mean=rm, running_var=rv)


FUNCS = ("forward_train", "forward_eval", "backward_train", "backward_eval")
BACKWARDS = ("backward_train", "backward_eval")
WITH_RUNNING = ("forward_train", "forward_eval", "backward_eval")


class FuncCase(NamedTuple):
    id: str
    func: str
    change: Callable[[dict[str, Any]], None]   # spoils the valid arguments in place
    error: type
    match: str


def setter(**values) -> Callable[[dict[str, Any]], None]:
    return lambda args: args.update(values)


def _unaligned(arr: np.ndarray) -> np.ndarray:
    raw = np.empty(arr.nbytes + 1, np.uint8)[1:].view(arr.dtype).reshape(arr.shape)
    raw[...] = arr
    return raw


def readonly(shape, dtype=np.float64) -> np.ndarray:
    arr = np.zeros(shape, dtype)
    arr.flags.writeable = False
    return arr


def as_3d(args: dict[str, Any]) -> None:
    """x (and dout) as (4, 1, 5), with out= in the flattened (4, 5) shape."""
    args["x"] = args["x"].reshape(4, 1, D)
    if "dout" in args:
        args["dout"] = args["dout"].reshape(4, 1, D)
    args["out"] = np.zeros(SHAPE)


def running_stats_of_other_features(args: dict[str, Any]) -> None:
    """Scalar gamma (and beta): the running statistics alone disagree with x."""
    args["gamma"] = 1.0
    if "beta" in args:
        args["beta"] = 0.0
    args["running_mean"], args["running_var"] = np.zeros(D + 1), np.ones(D + 1)


def momentum_without_running_stats(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(args):
        args["momentum"] = value
        del args["running_mean"], args["running_var"]
    return change


def overlapping(name: str, index=None) -> Callable[[dict[str, Any]], None]:
    """out= is (a buffer holding) the argument `name`: out must not overlap inputs."""
    def change(args):
        if index is None:
            args["out"] = args[name]
        else:
            buffer = np.zeros(SHAPE, np.float64)
            buffer[index] = args[name]
            args[name] = buffer[index]
            args["out"] = buffer
    return change


def func_cases() -> list[FuncCase]:
    cases = []
    for func in FUNCS:
        add = lambda id_, change, error, match, func=func: cases.append(  # noqa: E731
            FuncCase(f"{func}-{id_}", func, change, error, match))
        add("x_ndim0", setter(x=np.array(1.0)), ValueError, r"ndim >= 2.*shape \(\)")
        add("x_ndim1", setter(x=np.ones(D)), ValueError, r"ndim >= 2.*shape \(5,\)")
        add("empty_batch", setter(x=np.ones((0, D))), ValueError, r"empty batch.*\(0, 5\)")
        add("no_features", setter(x=np.ones((4, 0))), ValueError, r"no features.*\(4, 0\)")
        add("gamma_2d", setter(gamma=np.ones((2, D))), ValueError, r"gamma has shape \(2, 5\)")
        add("gamma_too_long", setter(gamma=np.ones(D + 1)), ValueError,
            r"gamma has shape \(6,\).*5 features")
        for eps, match in BAD_EPS:
            add(f"eps_{eps}", setter(eps=eps), ValueError, match)
        for name, make, text in BAD_DTYPES:
            add(f"x_{name}", setter(x=make(SHAPE)), TypeError, rf"x has dtype {re.escape(text)}")
        add("out_wrong_shape", setter(out=np.zeros((3, D))), ValueError,
            r"out has shape \(3, 5\); expected \(4, 5\)")
        add("out_flattened_shape_of_3d", as_3d, ValueError,
            r"out has shape \(4, 5\); expected \(4, 1, 5\)")
        add("out_wrong_dtype", setter(out=np.zeros(SHAPE, np.float32)), TypeError,
            r"out has dtype float32; expected float64")
        add("out_not_contiguous", setter(out=np.zeros((8, D))[::2]), ValueError,
            r"out is not C-contiguous \(strides \(80, 8\)\)")
        add("out_fortran", setter(out=np.zeros((D, 4)).T), ValueError,
            r"out is not C-contiguous \(strides \(8, 32\)\)")
        add("out_readonly", setter(out=readonly(SHAPE)), ValueError,
            r"out is read-only; out= must be a writeable array")
        add("out_unaligned", setter(out=_unaligned(np.zeros(SHAPE))), ValueError,
            r"out is not aligned for dtype float64")
        add("out_list", setter(out=np.zeros(SHAPE).tolist()), TypeError,
            r"out must be a NumPy array, got list")
        add("out_is_x", overlapping("x"), ValueError, r"out overlaps an input array")
        add("out_holds_gamma", overlapping("gamma", 1), ValueError,
            r"out overlaps an input array \(shape \(5,\)\)")
    for func in ("forward_train", "forward_eval"):
        cases += [
            FuncCase(f"{func}-beta_2d", func, setter(beta=np.zeros((2, D))), ValueError,
                     r"beta has shape \(2, 5\)"),
            FuncCase(f"{func}-beta_too_long", func, setter(beta=np.zeros(D + 1)), ValueError,
                     r"beta has shape \(6,\)")]
    for func in WITH_RUNNING:
        cases += [
            FuncCase(f"{func}-running_stats_other_features", func,
                     running_stats_of_other_features, ValueError,
                     r"running_mean has shape \(6,\).*5 features"),
            FuncCase(f"{func}-running_var_2d", func, setter(running_var=np.ones((2, D))),
                     ValueError, r"running_var has shape \(2, 5\)"),
            FuncCase(f"{func}-out_holds_running_mean", func, overlapping("running_mean", 2),
                     ValueError, r"out overlaps an input array"),
            FuncCase(f"{func}-out_holds_running_var", func, overlapping("running_var", 3),
                     ValueError, r"out overlaps an input array"),
        ]
    cases.append(FuncCase("forward_train-only_running_mean", "forward_train",
                          lambda a: a.pop("running_var"), ValueError, RUNNING_PAIR))
    for name, value, match in BAD_MOMENTUM:
        cases.append(FuncCase(f"forward_train-momentum_{name}", "forward_train",
                              setter(momentum=value), TypeError, match))
        cases.append(FuncCase(f"forward_train-momentum_{name}_no_running_stats", "forward_train",
                              momentum_without_running_stats(value), TypeError, match))
    for func in BACKWARDS:
        cases += [
            FuncCase(f"{func}-dout_wrong_features", func, setter(dout=np.ones((4, D + 1))),
                     ValueError, r"dout has shape \(4, 6\); the forward input had shape \(4, 5\)"),
            FuncCase(f"{func}-dout_wrong_batch", func, setter(dout=np.ones((3, D))), ValueError,
                     r"dout has shape \(3, 5\)"),
            FuncCase(f"{func}-out_is_dout", func, overlapping("dout"), ValueError,
                     r"out overlaps an input array"),
        ]
        for name, make, text in BAD_DTYPES:
            cases.append(FuncCase(f"{func}-dout_{name}", func, setter(dout=make(SHAPE)),
                                  TypeError, rf"dout has dtype {re.escape(text)}"))
    for stat in ("mean", "var"):
        cases += [
            FuncCase(f"backward_train-{stat}_too_long", "backward_train",
                     setter(**{stat: np.ones(D + 1)}), ValueError,
                     rf"{stat} has shape \(6,\); expected \(5,\)"),
            FuncCase(f"backward_train-{stat}_scalar", "backward_train",
                     setter(**{stat: 1.0}), ValueError, rf"{stat} has shape \(\); expected \(5,\)"),
            FuncCase(f"backward_train-{stat}_complex", "backward_train",
                     setter(**{stat: np.ones(D, complex)}), TypeError,
                     rf"{stat} has dtype complex128"),
            FuncCase(f"backward_train-out_holds_{stat}", "backward_train",
                     overlapping(stat, 0), ValueError, r"out overlaps an input array"),
        ]
    return cases


def _func_params():
    for case in func_cases():
        yield pytest.param(case, id=case.id)


def _copies(args: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in args.items() if isinstance(value, np.ndarray)}


def _unchanged(now: np.ndarray, before: np.ndarray) -> bool:
    return np.array_equal(now, before, equal_nan=before.dtype.kind in "fc")


@pytest.mark.parametrize("case", list(_func_params()))
def test_functional_rejects_bad_input_and_writes_nothing(rng, case):
    args = valid_args(rng, case.func)
    case.change(args)
    before = _copies(args)
    with pytest.raises(case.error, match=case.match):
        getattr(bnfast, case.func)(**args)
    for name, old in before.items():
        assert _unchanged(args[name], old), f"{name} was written"


@pytest.mark.parametrize("func", FUNCS)
def test_functional_accepts_a_correct_out_buffer_and_writes_only_it(rng, func):
    args = valid_args(rng, func)
    plain = getattr(bnfast, func)(**args)
    before = _copies(args)
    out = np.full(SHAPE, np.nan)
    result = getattr(bnfast, func)(**args, out=out)
    if func == "forward_eval":            # the others return a tuple, out first
        result, plain = (result,), (plain,)
    assert result[0] is out
    assert np.array_equal(out, plain[0])
    for name, old in before.items():
        assert np.array_equal(args[name], old), f"{name} was written"


@pytest.mark.parametrize("func", BACKWARDS)
def test_functional_accepts_flattened_dout_of_a_4d_input(rng, func):
    args = valid_args(rng, func)
    x4 = args["x"].reshape(4, 1, D, 1)
    flat = getattr(bnfast, func)(**args)
    args["x"] = x4
    dx, dgamma, dbeta = getattr(bnfast, func)(**args)   # dout stays (N, D)
    assert dx.shape == x4.shape
    assert np.array_equal(dx.reshape(SHAPE), flat[0])
    assert np.array_equal(dgamma, flat[1]) and np.array_equal(dbeta, flat[2])


# ---------------------------------------------------------------------------
# Input the reference accepts gives the reference's results.

def dgamma_scale(normalized, dout) -> float:
    """Magnitude of the terms dgamma sums: max over features of sum |xn * dout|
    (dgamma itself may cancel to ~0, e.g. when dout is constant in a feature)."""
    dout = np.asarray(dout, np.float64).reshape(len(normalized), -1)
    return float(np.abs(np.asarray(normalized, np.float64) * dout).sum(0).max())


def _functional_vs_twin(x, dout, gamma, beta, rm, rv, rtol=None, what=""):
    """All four functional operations against the twin on the same data."""
    twin = Twin(gamma, beta, momentum=0.75, running_mean=rm, running_var=rv)
    fit = bnfast.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.75)
    assert_close(fit.out, twin.forward(x), rtol=rtol, what=f"{what} train out")
    assert_close(fit.running_mean, twin.running_mean, rtol=rtol, what=f"{what} running_mean")
    assert_close(fit.running_var, twin.running_var, rtol=rtol, what=f"{what} running_var")
    dx, dgamma, dbeta = bnfast.backward_train(dout, x, fit.mean, fit.var, gamma)
    assert_close(dx, twin.backward(dout), rtol=rtol, scale=dx_scale(twin, dout), what=f"{what} dx")
    assert_close(dgamma, twin.dgamma, rtol=rtol, scale=dgamma_scale(twin.xn, dout),
                 what=f"{what} dgamma")
    assert_close(dbeta, twin.dbeta, rtol=rtol, what=f"{what} dbeta")
    eval_twin = Twin(gamma, beta, running_mean=rm, running_var=rv)
    assert_close(bnfast.forward_eval(x, gamma, beta, rm, rv), eval_twin.forward(x, False),
                 rtol=rtol, what=f"{what} eval out")
    dx, dgamma, dbeta = bnfast.backward_eval(dout, x, gamma, rm, rv)
    assert_close(dx, eval_twin.backward(dout), rtol=rtol, what=f"{what} eval dx")
    assert_close(dgamma, eval_twin.dgamma, rtol=rtol,
                 scale=dgamma_scale(eval_twin._eval_xn, dout), what=f"{what} eval dgamma")
    assert_close(dbeta, eval_twin.dbeta, rtol=rtol, what=f"{what} eval dbeta")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_functional_every_memory_layout_gives_the_twins_result(rng, dtype):
    base = (rng.standard_normal((6, 2, 3)) * 3 + 2).astype(dtype)
    dout_base = rng.standard_normal((6, 2, 3)).astype(dtype)
    gamma, beta = make_params(rng, 6, dtype)
    rm, rv = rng.standard_normal(6).astype(dtype), (rng.random(6) + 0.5).astype(dtype)
    for name, x in layouts(base):
        for dname, dout in layouts(dout_base):
            _functional_vs_twin(x, dout, gamma, beta, rm, rv, rtol=tolerance(dtype),
                                what=f"{name}/{dname}")
    for name, vec in layouts(np.stack([gamma, beta, rm, rv])):   # per-feature operands
        g, b, m, v = vec          # rows: strided, unaligned, byte-swapped, ...
        _functional_vs_twin(base, dout_base, g, b, m, v, rtol=tolerance(dtype), what=name)


@pytest.mark.parametrize("kind", ["zero_stride_rows", "zero_stride_features", "int64", "uint8",
                                  "bool", "nested_list", "float16"])
def test_functional_accepts_what_the_reference_accepts(rng, kind):
    gamma, beta = make_params(rng, D)
    rm, rv = rng.standard_normal(D), rng.random(D) + 0.5
    dout = rng.standard_normal(SHAPE)
    rtol = None
    if kind == "zero_stride_rows":           # every feature constant
        x = np.broadcast_to(rng.standard_normal(D), SHAPE)
        dout = np.broadcast_to(rng.standard_normal(D), SHAPE)
    elif kind == "zero_stride_features":     # every sample constant across features
        x = np.broadcast_to(rng.standard_normal((4, 1)), SHAPE)
    elif kind in ("int64", "uint8"):
        x = rng.integers(0, 50, SHAPE).astype(kind)
    elif kind == "bool":
        x = rng.random(SHAPE) > 0.5
    elif kind == "nested_list":
        x, dout = rng.standard_normal(SHAPE).tolist(), rng.standard_normal(SHAPE).tolist()
    else:   # float16 data is computed in float32 by bnfast, in float16 by the twin
        x = (rng.standard_normal(SHAPE) * 2).astype(np.float16)
        dout = rng.standard_normal(SHAPE).astype(np.float16)
        gamma, beta, rm, rv = (v.astype(np.float16) for v in (gamma, beta, rm, rv))
        rtol = 5e-3
    _functional_vs_twin(x, dout, gamma, beta, rm, rv, rtol=rtol, what=kind)


@pytest.mark.parametrize("layout", ["zero_stride_features", "zero_stride_dout", "fortran_4d"])
def test_layer_accepts_more_layouts_like_the_reference(rng, layout):
    shape = (5, 2, 3) if layout != "fortran_4d" else (5, 2, 3, 1)
    d = 6
    gamma, beta = make_params(rng, d)
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    if layout == "zero_stride_features":
        x = np.broadcast_to(rng.standard_normal((5, 1, 1)), shape)
    elif layout == "zero_stride_dout":
        dout = np.broadcast_to(rng.standard_normal(shape[1:]), shape)
    else:
        x, dout = np.asfortranarray(x), np.asfortranarray(dout)
    for train in (True, False):
        layer, twin = pair(gamma, beta)
        layer.forward(x), twin.forward(x)
        assert_close(layer.forward(x, train), twin.forward(x, train), what=f"{layout} out")
        assert_close(layer.backward(dout), twin.backward(dout), scale=dx_scale(twin, dout),
                     what=f"{layout} dx")
        normalized = twin.xn if train else twin._eval_xn
        assert_close(layer.dgamma, twin.dgamma, scale=dgamma_scale(normalized, dout),
                     what="dgamma")


def _nonfinite_batch(rng, dtype, kind):
    """Feature 2 holds NaN and/or inf; the others are ordinary numbers."""
    x = (rng.standard_normal((7, D)) * 2).astype(dtype)
    if kind in ("nan", "inf", "-inf"):
        x[3, 2] = float(kind)
    elif kind == "inf_and_-inf":
        x[1, 2], x[4, 2] = np.inf, -np.inf
    else:   # nan_and_inf
        x[1, 2], x[4, 2] = np.nan, np.inf
    return x


def _assert_same_specials(mine, theirs, what):
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    assert np.array_equal(np.isnan(mine), np.isnan(theirs)), f"{what}: NaN positions differ"
    assert np.array_equal(np.isposinf(mine), np.isposinf(theirs)), f"{what}: +inf differs"
    assert np.array_equal(np.isneginf(mine), np.isneginf(theirs)), f"{what}: -inf differs"


NONFINITE = ["nan", "inf", "-inf", "inf_and_-inf", "nan_and_inf"]


@pytest.mark.parametrize("kind", NONFINITE)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_nan_and_inf_stay_in_their_feature_like_the_twin(rng, dtype, kind):
    x = _nonfinite_batch(rng, dtype, kind)
    dout = rng.standard_normal((7, D)).astype(dtype)
    gamma, beta = make_params(rng, D, dtype)
    layer, twin = pair(gamma, beta)
    others = [0, 1, 3, 4]
    with np.errstate(all="ignore"):
        results = {"out": (layer.forward(x), twin.forward(x)),
                   "dx": (layer.backward(dout), twin.backward(dout))}
        for name in ("dgamma", "dbeta", "xn", "std", "running_var", "running_mean", "xc"):
            results[name] = (getattr(layer, name), getattr(twin, name))
        results["eval out"] = (layer.forward(x, False), twin.forward(x, False))
        results["eval dx"] = (layer.backward(dout), twin.backward(dout))
    rtol = 5e-3 if dtype == np.float16 else tolerance(dtype)
    for what, (mine, theirs) in results.items():
        _assert_same_specials(mine, theirs, what)
        mine, theirs = np.asarray(mine), np.asarray(theirs)
        if mine.ndim == 2:        # the other features are untouched and finite
            assert np.all(np.isfinite(mine[:, others])), what
            assert_close(mine[:, others], theirs[:, others], rtol=rtol, what=what,
                         scale=float(np.abs(theirs[:, others]).max()))


# ---------------------------------------------------------------------------
# The same across work partitions (folded short rows, one strip, row blocks)
# and per-channel layouts: a feature (channel) holding inf or NaN comes out as the
# reference's does (NaN throughout; running mean inf or NaN, as its batch
# mean), and the other features are untouched by it.

def _spoil(x, cols):
    """inf in a shift row, +inf and -inf together, NaN late, in features `cols`."""
    n = x.shape[0]
    a, b, c = cols
    x[0, a] = np.inf
    x[1, b], x[n - 1, b] = np.inf, -np.inf
    x[n - 1, c] = np.nan
    return x


def _assert_same_with_nan(got, want, what):
    """Same NaN/inf positions; the finite values equal within float64 rounding."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    _assert_same_specials(got, want, what)
    finite = np.isfinite(want)
    scale = float(np.max(np.abs(want[finite]), initial=0.0)) + 1.0
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-9 * scale, err_msg=what)


@pytest.mark.parametrize("shape", [(4099, 3), (8, 3000), (5000, 40), (300, 70), (2000, 1500),
                                   (5, 4)])
def test_nan_and_inf_match_the_twin_in_every_work_partition(shape):
    rng = np.random.default_rng(7)
    n, d = shape
    x = _spoil(rng.standard_normal(shape) * 2 + 1, (d - 1, 1, 0) if d > 3 else (2, 1, 0))
    dout = rng.standard_normal(shape)
    gamma, beta = rng.random(d) + 0.5, rng.standard_normal(d)
    layer = bnfast.BatchNormalization(gamma, beta)
    twin = Twin(gamma.copy(), beta.copy())
    with np.errstate(all="ignore"):
        pairs = [("train", layer.forward(x), twin.forward(x)),
                 ("dx", layer.backward(dout), twin.backward(dout))]
        pairs += [("dgamma", layer.dgamma, twin.dgamma), ("dbeta", layer.dbeta, twin.dbeta),
                  ("running_mean", layer.running_mean, twin.running_mean),
                  ("running_var", layer.running_var, twin.running_var)]
        pairs += [("eval", layer.forward(x, False), twin.forward(x, False)),
                  ("eval dx", layer.backward(dout), twin.backward(dout))]
    for what, got, want in pairs:
        _assert_same_with_nan(got, want, f"{shape} {what}")


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_nan_and_inf_match_the_per_channel_twin(layout):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 5, 4, 3)) * 2 + 1
    x[0, 1, 0, 0] = np.inf
    x[2, 2, 1, 1], x[5, 2, 3, 2] = np.inf, -np.inf
    x[5, 4, 3, 2] = np.nan
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dout = rng.standard_normal(x.shape)
    layer = bnfast.BatchNormalization(np.ones(5), np.zeros(5), per_channel=True)
    twin = Twin(np.ones(5), np.zeros(5), per_channel=True)
    with np.errstate(all="ignore"):
        _assert_same_with_nan(layer.forward(x), twin.forward(x), "train")
        _assert_same_with_nan(layer.backward(dout), twin.backward(dout), "dx")
        _assert_same_with_nan(layer.running_var, twin.running_var, "running_var")
        _assert_same_with_nan(layer.forward(x, False), twin.forward(x, False), "eval")


# ---------------------------------------------------------------------------
# Caller arrays are never written (except out=), and later changes don't leak.

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_never_writes_caller_arrays(rng, dtype):
    gamma, beta = make_params(rng, D, dtype)
    rm, rv = rng.standard_normal(D).astype(dtype), (rng.random(D) + 0.5).astype(dtype)
    x = rng.standard_normal(SHAPE).astype(dtype)
    dout = rng.standard_normal(SHAPE).astype(dtype)
    arrays = {"gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv,
              "x": x, "dout": dout}
    before = _copies(arrays)
    layer = bnfast.BatchNormalization(gamma, beta, running_mean=rm, running_var=rv)
    for train in (True, False, True):
        out = layer.forward(x, train)
        dx = layer.backward(dout)
        assert not any(np.may_share_memory(result, arr) for result in (out, dx, layer.dgamma)
                       for arr in arrays.values())
    for name, old in before.items():
        assert np.array_equal(arrays[name], old), f"{name} was written"


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_functional_never_writes_caller_arrays(rng, func, dtype):
    args = valid_args(rng, func, dtype)
    before = _copies(args)
    results = getattr(bnfast, func)(**args)
    for name, old in before.items():
        assert np.array_equal(args[name], old), f"{name} was written"
    for result in results:
        if isinstance(result, np.ndarray):
            assert not any(np.may_share_memory(result, arr) for arr in args.values()
                           if isinstance(arr, np.ndarray))


def test_eval_mode_backward_reads_the_eval_input_by_reference(rng):
    """Documented (README, the contract, point 9): the eval-mode gradient is
    bnfast's own extension, and for it the layer keeps a reference to the
    eval-mode input instead of copying it, so eval forwards cost one pass.
    Changing that input in place before backward changes dgamma accordingly;
    dx (which does not depend on x) does not change."""
    d = 4
    gamma, beta = make_params(rng, d)
    running_mean, running_var = rng.standard_normal(d), rng.random(d) + 0.5
    layer = bnfast.BatchNormalization(gamma, beta, running_mean=running_mean,
                                      running_var=running_var)
    x = rng.standard_normal((6, d))
    layer.forward(x, False)
    x[:] = 3.0
    dout = rng.standard_normal((6, d))
    dx = layer.backward(dout)
    std = np.sqrt(running_var + 1e-6)
    np.testing.assert_allclose(dx, dout * gamma / std, rtol=1e-13)
    np.testing.assert_allclose(layer.dgamma, np.sum(dout * (3.0 - running_mean) / std, 0),
                               rtol=1e-12)


# ---------------------------------------------------------------------------
# The kernel entry points: a wrong call raises; it never reads or writes out of
# bounds.  These run in-process on purpose: a crash kills pytest, and that is
# the failure signal.  Calls that once crashed run in a child process.

N_K, D_K = 3, 4


def kernel_args(func: str, dtype=np.float64) -> dict[str, Any]:
    """A valid call of the private kernel entry point `func`, by keyword."""
    x = np.arange(N_K * D_K, dtype=dtype).reshape(N_K, D_K)
    vec = lambda value: np.full(D_K, value, np.float64)  # noqa: E731
    if func == "train_forward":
        return dict(x=x, cache=np.zeros_like(x), y=np.zeros((N_K, D_K)), n=N_K, d=D_K,
                    gamma=vec(1.0), beta=vec(0.0), eps=1e-6, mean=vec(0), var=vec(0),
                    invstd=vec(0), rm_old=vec(0.0), rm_new=vec(0), rv_old=vec(1.0),
                    rv_new=vec(0), momentum=0.9, one_minus_momentum=0.1)
    if func == "eval_forward":
        return dict(x=x, y=np.zeros((N_K, D_K)), n=N_K, d=D_K, gamma=vec(1.0), beta=vec(0.0),
                    rm=vec(0.0), rv=vec(1.0), eps=1e-6)
    if func == "train_backward":
        return dict(x=x, dy=np.ones_like(x), dx=np.zeros((N_K, D_K)), n=N_K, d=D_K,
                    mean=vec(4.0), invstd=vec(0.3), gamma=vec(1.0), dgamma=vec(0),
                    dbeta=vec(0))
    return dict(x=x, dy=np.ones_like(x), dx=np.zeros((N_K, D_K)), n=N_K, d=D_K,
                gamma=vec(1.0), rm=vec(0.0), rv=vec(1.0), eps=1e-6, dgamma=vec(0), dbeta=vec(0))


KERNELS = ("train_forward", "eval_forward", "train_backward", "eval_backward")
KERNEL_OUTPUTS = {"train_forward": {"cache", "y", "mean", "var", "invstd", "rm_new", "rv_new"},
                  "eval_forward": {"y"}, "train_backward": {"dx", "dgamma", "dbeta"},
                  "eval_backward": {"dx", "dgamma", "dbeta"}}


def _bad_arrays(arr: np.ndarray, output: bool):
    """Every way one array argument can be wrong for the kernels."""
    yield "one_short", arr.reshape(-1)[:-1].copy()
    yield "one_long", np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]])
    yield "empty", arr.reshape(-1)[:0].copy()
    for dtype in (np.int64, np.float16, np.complex128, np.longdouble):
        yield f"dtype_{np.dtype(dtype).name}", arr.astype(dtype)
    doubled = np.repeat(arr.reshape(-1), 2)
    yield "strided", doubled[::2]
    yield "negative_strides", arr.reshape(-1)[::-1]
    yield "byteswapped", arr.astype(arr.dtype.newbyteorder(">"))
    yield "unaligned", _unaligned(arr)
    yield "list", arr.tolist()
    if arr.ndim == 2:
        yield "fortran", np.asfortranarray(arr)
    if output:
        frozen = arr.copy()
        frozen.flags.writeable = False
        yield "readonly", frozen


def kernel_bad_calls():
    for func in KERNELS:
        for name, value in kernel_args(func).items():
            if isinstance(value, np.ndarray):
                for bad, arr in _bad_arrays(value, name in KERNEL_OUTPUTS[func]):
                    yield pytest.param(func, {name: arr}, id=f"{func}-{name}-{bad}")
        for n, d in ((0, D_K), (N_K, 0), (-1, D_K), (N_K, -4), (-N_K, -D_K), (D_K, N_K),
                     (N_K * D_K, 1), (1, N_K * D_K), (N_K + 1, D_K)):
            yield pytest.param(func, {"n": n, "d": d}, id=f"{func}-n{n}-d{d}")
        # NCHW planes (s > 0) whose (n, d, s) does not describe x and the vectors
        for n, d, s in ((N_K, D_K, -1), (N_K, D_K, 2), (N_K, 2, 2), (1, D_K, N_K + 1),
                        (N_K, D_K, 2**62 + 1)):
            yield pytest.param(func, {"n": n, "d": d, "s": s}, id=f"{func}-n{n}-d{d}-s{s}")
    # x and its companions disagree in dtype
    yield pytest.param("train_forward", {"cache": np.empty((N_K, D_K), np.float32)},
                       id="train_forward-cache_dtype_differs")
    for func in ("train_backward", "eval_backward"):
        yield pytest.param(func, {"dy": np.ones((N_K, D_K), np.float32)},
                           id=f"{func}-dout_dtype_differs")


@pytest.mark.parametrize("func", KERNELS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("s", [0, 1], ids=["rows", "planes"])
def test_kernel_baseline_calls_are_valid(func, dtype, s):
    """The calls the bad variants below start from do run (so each bad
    variant differs from a valid call in exactly one argument), as rows and
    as NCHW planes of one position."""
    getattr(kernels, func)(**kernel_args(func, dtype), s=s)


@pytest.mark.parametrize("func,change", list(kernel_bad_calls()))
def test_kernel_entry_points_raise_on_bad_calls(func, change):
    args = kernel_args(func)
    args.update(change)
    with pytest.raises((TypeError, ValueError)):
        getattr(kernels, func)(**args)


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_kernel_entry_points_reject_none_for_required_arrays():
    """In a child process: reading None as an array may crash."""
    required = {"train_forward": ["x", "y", "gamma", "beta", "mean", "var", "rm_old", "rv_old"],
                "eval_forward": ["x", "y", "gamma", "beta", "rm", "rv"],
                "train_backward": ["x", "dy", "dx", "mean", "invstd", "gamma"],
                "eval_backward": ["x", "dy", "dx", "gamma", "rm", "rv"]}
    child = _run_child(f"""
        import json, sys
        sys.path.insert(0, "tests")
        from test_errors import kernel_args
        from bnfast._native import kernels
        for func, names in {required!r}.items():
            for name in names:
                args = kernel_args(func)
                args[name] = None
                print(json.dumps([func, name]), end=" ", flush=True)
                try:
                    getattr(kernels, func)(**args)
                    print("accepted", flush=True)
                except Exception as exc:
                    print(type(exc).__name__, flush=True)
    """)
    assert child.returncode == 0, f"child died ({child.returncode}) after:\n{child.stdout}"
    outcomes = [line.rsplit(" ", 1) for line in child.stdout.splitlines()]
    wrong = [(json.loads(call), outcome) for call, outcome in outcomes
             if outcome not in ("TypeError", "ValueError")]
    assert not wrong, f"None not rejected with TypeError/ValueError: {wrong}"


def test_kernel_size_check_does_not_overflow():
    """In a child process: an overflowing size check would read out of bounds."""
    child = _run_child("""
        import numpy as np
        from bnfast._native import kernels
        n, d = 2**62 + 1, 4          # n * d == 4 modulo 2**64
        try:
            kernels.eval_forward(np.ones(4), np.empty(4), n, d, np.ones(1), np.zeros(1),
                                 np.zeros(1), np.ones(1), 1e-6)
            print("accepted")
        except (TypeError, ValueError, OverflowError) as exc:
            print("rejected", type(exc).__name__)
    """)
    assert child.returncode == 0, f"child died with status {child.returncode}"
    assert child.stdout.startswith("rejected"), child.stdout
