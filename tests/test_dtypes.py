"""Result dtypes, against a table written from NumPy's promotion rules.

bnfast resolves its result dtypes by running the twin on stand-ins
(bnfast/_dtypes.py), so a test that compares bnfast's dtypes with the twin's
cannot catch a twin that promotes wrongly.  The table below is worked out by
hand from the book's arithmetic and NumPy's promotion rules, one operation at
a time, and both the twin and bnfast are checked against it.

The book's arithmetic, with X, G, B, R, D the dtypes of x, gamma, beta, the
running statistics and dout (Python numbers are "weak": they never widen an
array), and M the dtype of the batch mean (X for float X; x.mean() of an
integer or bool batch is float64):

  training forward   xc, xn, std: M; out = G * xn + B: G|M|B;
                     new running stats = momentum * R + (1 - momentum) * mean:
                     R|M (R = float64 zeros when none are given)
  training backward  dgamma = sum(xn * dout): M|D; dbeta = sum(dout): D;
                     dx, from gamma * dout and xn's arithmetic: G|D|M
  eval forward       out = G * ((x - R) / sqrt(R + eps)) + B: G|(X|R)|B
  eval backward      dgamma = sum(xn * dout): (X|R)|D; dbeta: D;
                     dx = gamma * dout / sqrt(R + eps): G|D|R

where | is NumPy's promotion: float16|float32 = float32, float32|float64 =
float64, uint8|float32 = float32 (uint8 fits float32 exactly), but
int32|float32 = int64|float32 = float64.  These hold under NumPy 1's
value-based rules as well as NumPy 2's (NEP 50): only Python numbers and
0-d arrays are promoted by value there, and here every operand that is not a
Python number is an array.  Batches are small: NumPy 1 promotes the batch
count by value (tests/test_layer.py covers the counts where that matters).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import pytest

import bnfast
from bnfast.reference import BatchNormalization as Twin

f16, f32, f64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


class Case(NamedTuple):
    id: str
    x: Any                   # dtype of x
    gamma: Any               # dtype of gamma's array, or a Python number
    beta: Any
    running: Optional[Any]   # dtype of both running statistics; None: not given
    dout: Any
    # expected: training forward
    stat: np.dtype           # xc, xn, std
    out: np.dtype
    new_running: np.dtype
    # training backward
    dx: np.dtype
    dgamma: np.dtype
    dbeta: np.dtype
    # eval forward, then its backward (a fresh layer with the running statistics given)
    eval_out: np.dtype
    eval_dx: np.dtype
    eval_dgamma: np.dtype
    eval_dbeta: np.dtype


TABLE = [
    #    id                     x     gamma beta  R     dout | stat out   new_R | dx   dgam dbeta | eval eval_dx eval_dg eval_db
    Case("float32",             f32,  f32,  f32,  None, f32,  f32, f32,  f64,   f32, f32, f32,   f64, f64,    f64,    f32),
    Case("float32_running_f32", f32,  f32,  f32,  f32,  f32,  f32, f32,  f32,   f32, f32, f32,   f32, f32,    f32,    f32),
    Case("float32_scalar_beta", f32,  f32,  0.0,  f64,  f32,  f32, f32,  f64,   f32, f32, f32,   f64, f64,    f64,    f32),
    Case("float16",             f16,  f16,  f16,  f16,  f16,  f16, f16,  f16,   f16, f16, f16,   f16, f16,    f16,    f16),
    Case("float16_scalars",     f16,  1.0,  0.0,  None, f16,  f16, f16,  f64,   f16, f16, f16,   f64, f64,    f64,    f16),
    Case("float16_f32_params",  f16,  f32,  f32,  f16,  f16,  f16, f32,  f16,   f32, f16, f16,   f32, f32,    f16,    f16),
    Case("float32_f64_params",  f32,  f64,  f64,  None, f32,  f32, f64,  f64,   f64, f32, f32,   f64, f64,    f64,    f32),
    Case("float64_f32_params",  f64,  f32,  f32,  f32,  f64,  f64, f64,  f64,   f64, f64, f64,   f64, f64,    f64,    f64),
    Case("float32_int64_gamma", f32,  "i8", f32,  None, f32,  f32, f64,  f64,   f64, f32, f32,   f64, f64,    f64,    f32),
    Case("int64",               "i8", f32,  f32,  None, f64,  f64, f64,  f64,   f64, f64, f64,   f64, f64,    f64,    f64),
    Case("int32_f32_running",   "i4", f32,  f32,  f32,  f32,  f64, f64,  f64,   f64, f64, f32,   f64, f32,    f64,    f32),
    Case("uint8_f32_running",   "u1", f32,  f32,  f32,  f32,  f64, f64,  f64,   f64, f64, f32,   f32, f32,    f32,    f32),
    Case("bool_scalars",        "?",  1.0,  0.0,  None, f64,  f64, f64,  f64,   f64, f64, f64,   f64, f64,    f64,    f64),
]  # fmt: skip


def _array(rng, dtype, shape, positive=False):
    values = rng.random(shape) + 0.5 if positive else rng.standard_normal(shape) * 3
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return values > 0
    if dtype.kind in "iu":
        return np.abs(values * 5).astype(dtype)
    return values.astype(dtype)


def _operand(rng, spec, c):
    return spec if isinstance(spec, float) else _array(rng, spec, c, positive=True)


@pytest.mark.parametrize("case", TABLE, ids=[case.id for case in TABLE])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per feature", "per channel"])
@pytest.mark.parametrize("make", [bnfast.BatchNormalization, Twin], ids=["bnfast", "twin"])
def test_result_dtypes_follow_numpys_promotion_rules(rng, case, per_channel, make):
    shape = (5, 3, 2)
    c = 3 if per_channel else 6
    x, dout = _array(rng, case.x, shape), _array(rng, case.dout, shape)
    gamma, beta = _operand(rng, case.gamma, c), _operand(rng, case.beta, c)
    running = {}
    if case.running is not None:
        running = dict(running_mean=_array(rng, case.running, c),
                       running_var=_array(rng, case.running, c, positive=True))
    with np.errstate(all="ignore"):
        layer = make(gamma, beta, per_channel=per_channel, **running)
        got = {"out": layer.forward(x).dtype, "dx": layer.backward(dout).dtype}
        got.update({name: np.asarray(getattr(layer, name)).dtype
                    for name in ("xc", "xn", "std", "dgamma", "dbeta")})
        got["new_running"] = {layer.running_mean.dtype, layer.running_var.dtype}
        fresh = make(gamma, beta, per_channel=per_channel, **running)
        got["eval_out"] = fresh.forward(x, False).dtype
        got["eval_dx"] = fresh.backward(dout).dtype
        got["eval_dgamma"], got["eval_dbeta"] = fresh.dgamma.dtype, fresh.dbeta.dtype
    expected = {"out": case.out, "dx": case.dx, "xc": case.stat, "xn": case.stat,
                "std": case.stat, "dgamma": case.dgamma, "dbeta": case.dbeta,
                "new_running": {case.new_running}, "eval_out": case.eval_out,
                "eval_dx": case.eval_dx, "eval_dgamma": case.eval_dgamma,
                "eval_dbeta": case.eval_dbeta}
    wrong = {name: (got[name], want) for name, want in expected.items() if got[name] != want}
    assert not wrong, f"(got, expected) dtypes: {wrong}"


@pytest.mark.parametrize("case", TABLE, ids=[case.id for case in TABLE])
def test_functional_result_dtypes_follow_the_same_table(rng, case):
    """forward_train / backward_train / forward_eval / backward_eval give the
    layer's dtypes (the batch statistics they return are float64 always)."""
    shape, c = (5, 6), 6
    x, dout = _array(rng, case.x, shape), _array(rng, case.dout, shape)
    gamma, beta = _operand(rng, case.gamma, c), _operand(rng, case.beta, c)
    rm = _array(rng, case.running or f64, c)
    rv = _array(rng, case.running or f64, c, positive=True)
    with np.errstate(all="ignore"):
        fit = bnfast.forward_train(x, gamma, beta, running_mean=rm, running_var=rv)
        dx, dgamma, dbeta = bnfast.backward_train(dout, x, fit.mean, fit.var, gamma)
        eval_out = bnfast.forward_eval(x, gamma, beta, rm, rv)
        eval_dx, eval_dgamma, eval_dbeta = bnfast.backward_eval(dout, x, gamma, rm, rv)
    assert (fit.out.dtype, fit.mean.dtype, fit.var.dtype) == (case.out, f64, f64)
    assert fit.running_mean.dtype == fit.running_var.dtype == case.new_running
    assert (dx.dtype, dgamma.dtype, dbeta.dtype) == (case.dx, case.dgamma, case.dbeta)
    assert (eval_out.dtype, eval_dx.dtype, eval_dgamma.dtype, eval_dbeta.dtype) == \
        (case.eval_out, case.eval_dx, case.eval_dgamma, case.eval_dbeta)
