"""The reference's result dtypes, found by running the NumPy twin on stand-ins.

bnfast promises the dtypes the reference class's arithmetic gives under the
installed NumPy's promotion rules (NEP 50 on NumPy 2, value-based casting on
NumPy 1).  Rather than restating those rules, each resolver runs the twin once
on a 2 x 1 batch whose operands promote exactly like the caller's: arrays are
replaced by one-element arrays of the same dtype, scalars are kept as they are.
Results are memoized on the operands' types and dtypes.
"""
from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

from ._checks import result_float
from .reference import BatchNormalization as _Twin

# NumPy 1 promotes by value for scalars and 0-d arrays, so their value is part
# of the memo key there; NumPy 2 promotes by type alone.
_BY_VALUE = int(np.__version__.split(".")[0]) < 2

#: Batch counts from which the reference's training backward comes out
#: float64 for float32 (and narrower) input: it divides by the count, a
#: Python int, which NumPy 1 promotes by value (65536 and up is a uint32,
#: and float32 with uint32 gives float64).  NumPy 2 never widens.
WIDENING_COUNT = 65536 if _BY_VALUE else sys.maxsize


class TrainDtypes(NamedTuple):
    stat: np.dtype           # mean / xc / xn / std
    out: np.dtype            # forward output
    running_mean: np.dtype   # updated running statistics
    running_var: np.dtype


class EvalDtypes(NamedTuple):
    out: np.dtype


class GradDtypes(NamedTuple):
    dx: np.dtype
    dgamma: np.dtype
    dbeta: np.dtype


def _stand_in(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        return np.ones(1, value.dtype)
    return value


def _key(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.ndim >= 1:
            return (1, value.dtype)
        return (0, value.dtype, value.item() if _BY_VALUE else None)
    kind = type(value)
    if kind in (float, int, bool) or value is None:
        return (kind,)
    if isinstance(value, np.generic):
        return (kind, value.item() if _BY_VALUE else None)
    raise TypeError(f"unexpected operand type {kind.__name__}")


_memo: dict[Any, Any] = {}


def _count_key(count: int) -> Any:
    """What of the batch count decides promotion: on NumPy 1, the smallest
    unsigned type holding it; on NumPy 2, nothing."""
    return np.min_scalar_type(count) if _BY_VALUE else None


def _run_twin(train: bool, x_dtype: np.dtype, gamma: Any, beta: Any, momentum: Any,
              running_mean: Any, running_var: Any, dout_dtype: np.dtype | None,
              count: int = 2) -> Any:
    twin = _Twin(_stand_in(gamma), _stand_in(beta), momentum,
                 _stand_in(running_mean), _stand_in(running_var))
    x = np.array([[1.0], [2.0]]).astype(x_dtype)
    with np.errstate(all="ignore"):
        try:
            out = twin.forward(x, train)
            if dout_dtype is not None:
                # the count the backward divides by, as the caller's batch has
                # it (its value only matters for NumPy 1's promotion)
                twin._count = count
                dx = twin.backward(np.ones((2, 1), dout_dtype))
                return GradDtypes(result_float(dx.dtype, "dx"),
                                  result_float(twin.dgamma.dtype, "dgamma"),
                                  np.asarray(twin.dbeta).dtype)
        except TypeError as exc:  # NumPy cannot combine these dtypes at all
            raise TypeError(f"these operands cannot be combined: {exc}") from None
    out_dt = result_float(out.dtype, "the output")
    if not train:
        return EvalDtypes(out_dt)
    return TrainDtypes(twin.xn.dtype, out_dt,
                       result_float(np.asarray(twin.running_mean).dtype, "running_mean"),
                       result_float(np.asarray(twin.running_var).dtype, "running_var"))


def _resolve(train: bool, x_dtype: np.dtype, gamma: Any, beta: Any, momentum: Any,
             running_mean: Any, running_var: Any, dout_dtype: np.dtype | None,
             count: int = 2) -> Any:
    key = (train, x_dtype, _key(gamma), _key(beta), _key(momentum),
           _key(running_mean), _key(running_var), dout_dtype, _count_key(count))
    found = _memo.get(key)
    if found is None:
        found = _run_twin(train, x_dtype, gamma, beta, momentum, running_mean, running_var,
                          dout_dtype, count)
        if len(_memo) > 4096:  # bounded: keys are types, so this is never hit in practice
            _memo.clear()
        _memo[key] = found
    return found


def train(x_dtype: np.dtype, gamma: Any, beta: Any, momentum: Any = 0.9,
          running_mean: Any = None, running_var: Any = None) -> TrainDtypes:
    """dtypes of a training forward (statistics, output, new running stats)."""
    found: TrainDtypes = _resolve(True, x_dtype, gamma, beta, momentum, running_mean,
                                  running_var, None)
    return found


def evaluate(x_dtype: np.dtype, gamma: Any, beta: Any, running_mean: Any,
             running_var: Any) -> EvalDtypes:
    """dtype of an eval-mode forward."""
    found: EvalDtypes = _resolve(False, x_dtype, gamma, beta, 0.9, running_mean, running_var, None)
    return found


def grads(train: bool, x_dtype: np.dtype, gamma: Any, dout_dtype: np.dtype,
          running_mean: Any = None, running_var: Any = None, *, count: int) -> GradDtypes:
    """dtypes of dx, dgamma and dbeta after a training or eval-mode forward;
    count: the values per feature (per channel) of the batch."""
    found: GradDtypes = _resolve(train, x_dtype, gamma, 0.0, 0.9, running_mean, running_var,
                                 dout_dtype, count if train else 2)
    return found
