"""The reference's result dtypes, found by running the NumPy twin on stand-ins.

bnfast promises the dtypes the reference class's arithmetic gives under the
installed NumPy's promotion rules (NEP 50 on NumPy 2, value-based casting on
NumPy 1).  Rather than restating those rules, each resolver runs the twin once
on a 2 x 1 batch whose operands promote exactly like the caller's: arrays are
replaced by one-element arrays of the same dtype, scalars are kept as they are.
Results are memoized on the operands' types and dtypes; `uniform` answers
the commonest case (gamma and beta arrays of x's float dtype) from a memo
keyed on two dtypes, for the planner's fast path.
"""
from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional

import numpy as np

from .reference import BatchNormalization as _Twin

F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
#: The dtypes the kernels read and write.
KERNEL_FLOATS = (F32, F64)

# NumPy 1 promotes by value for scalars and 0-d arrays, so their value is part
# of the memo key there; NumPy 2 promotes by type alone.
_BY_VALUE = int(np.__version__.split(".")[0]) < 2

#: Batch counts from which the reference's training backward comes out
#: float64 for float32 (and narrower) input: it divides by the count, a
#: Python int, which NumPy 1 promotes by value (65536 and up is a uint32,
#: and float32 with uint32 gives float64).  NumPy 2 never widens.
WIDENING_COUNT = 65536 if _BY_VALUE else sys.maxsize


def result_float(dt: np.dtype, what: str) -> np.dtype:
    """dt if it is float16/32/64 (as NumPy's own instance of it, so that the
    planner may compare it with F16 etc. by identity), else a TypeError."""
    if dt.kind != "f" or dt.itemsize > 8:
        raise TypeError(f"{what} would have dtype {dt}; bnfast computes float16, float32 "
                        "and float64 results only (check the dtypes of the parameters)")
    return np.dtype(dt.char)


def kernel_dtype(dt: np.dtype) -> np.dtype:
    """Kernels read and write float32 (for float16/32 data) or float64 (all else)."""
    return F32 if dt.kind == "f" and dt.itemsize <= 4 else F64


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
                                  np.dtype(np.asarray(twin.dbeta).dtype.char))
        except TypeError as exc:  # NumPy cannot combine these dtypes at all
            raise TypeError(f"these operands cannot be combined: {exc}") from None
    out_dt = result_float(out.dtype, "the output")
    if not train:
        return EvalDtypes(out_dt)
    return TrainDtypes(np.dtype(twin.xn.dtype.char), out_dt,
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


def uniform(training: bool, x_dtype: np.dtype, running_dtype: np.dtype) -> Any:
    """train(...) or evaluate(...) for float32/float64 x with gamma and beta
    arrays of x's dtype and running statistics arrays of running_dtype
    (float32/float64): the planner's fast path.  Memoized in UNIFORM, which
    the planner reads directly: UNIFORM[training][x is F64][running is F64]."""
    row = UNIFORM[bool(training)][x_dtype is F64]
    found = row[running_dtype is F64]
    if found is None:
        params, running = np.ones(1, x_dtype), np.ones(1, running_dtype)
        found = (train(x_dtype, params, params, 0.9, running, running) if training
                 else evaluate(x_dtype, params, params, running, running))
        row[running_dtype is F64] = found
    return found


def uniform_grads(training: bool, x_dtype: np.dtype, running_dtype: np.dtype) -> GradDtypes:
    """grads(...) for x, dout and a gamma array all of x's dtype
    (float32/float64) and, after an eval-mode forward, running statistics
    arrays of running_dtype, for a batch count NumPy 1 does not widen (below
    WIDENING_COUNT, or float64); memoized in UNIFORM_GRADS, read as
    UNIFORM_GRADS[training][x is F64][running is F64]."""
    row = UNIFORM_GRADS[bool(training)][x_dtype is F64]
    found: Optional[GradDtypes] = row[running_dtype is F64]
    if found is None:
        params, running = np.ones(1, x_dtype), np.ones(1, running_dtype)
        found = (grads(True, x_dtype, params, x_dtype, count=2) if training
                 else grads(False, x_dtype, params, x_dtype, running, running, count=2))
        row[running_dtype is F64] = found
    return found


# The memos of uniform() and uniform_grads(): nested lists indexed by bools
# (hashing a dtype for a dict key costs more than the rest of a lookup).
UNIFORM: list[list[list[Any]]] = [[[None, None], [None, None]] for _ in range(2)]
UNIFORM_GRADS: list[list[list[Optional[GradDtypes]]]] = [
    [[None, None], [None, None]] for _ in range(2)]
