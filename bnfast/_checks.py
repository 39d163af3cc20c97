"""Validation and layout for the kernels.

Everything a caller can get wrong is caught here, before any state changes,
with a message that names the argument, its shape and its dtype.  Arrays are
handed to the kernels as they are when they already are aligned, native,
C-contiguous float32/float64 blocks, and copied only when they are not.  The
kernels read and write float32 (float16 data is computed in float32) or
float64; result dtypes come from _dtypes.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
_REAL_KINDS = "biuf"


def describe(value: Any) -> str:
    """'array of shape (2, 3) and dtype float32', 'float 0.5', ... for messages."""
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}" if np.isscalar(value) else type(value).__name__


def as_array(value: Any, what: str) -> np.ndarray:
    """np.asarray with a clear error for things NumPy cannot make an array of."""
    if type(value) is np.ndarray:
        return value
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} cannot be converted to a NumPy array: {exc}") from None
    return arr


def check_real_dtype(dtype: np.dtype, what: str) -> None:
    """bool, integer and float16/32/64 are accepted; nothing else is."""
    if dtype.kind not in _REAL_KINDS:
        raise TypeError(f"{what} has dtype {dtype}; bnfast supports bool, integer, "
                        "float16, float32 and float64 data")
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise TypeError(f"{what} has dtype {dtype}; extended precision is not supported "
                        "(convert to float64)")


def batch(x: Any, what: str = "x") -> tuple[np.ndarray, int, int]:
    """x as an array of ndim >= 2 with a real dtype; returns (x, N, D)."""
    arr = as_array(x, what)
    if arr.ndim < 2:
        raise ValueError(f"{what} must have ndim >= 2 (batch, features, ...); "
                         f"got shape {arr.shape}")
    check_real_dtype(arr.dtype, what)
    n = arr.shape[0]
    d = math.prod(arr.shape[1:])
    if n == 0:
        raise ValueError(f"{what} is an empty batch: shape {arr.shape}")
    if d == 0:
        raise ValueError(f"{what} has no features: shape {arr.shape}")
    return arr, n, d


_REAL_SCALARS = (float, int, np.floating, np.integer)


def check_eps(eps: Any) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, _REAL_SCALARS):
        raise TypeError(f"eps must be a real number, got {describe(eps)}")
    value = float(eps)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"eps must be finite and >= 0, got {value!r}")
    return value


def check_momentum(momentum: Any) -> None:
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, _REAL_SCALARS):
        raise TypeError(f"momentum must be a real number, got {describe(momentum)}")


def operand(value: Any, what: str, d: int, x_shape: tuple[int, ...],
            per_channel: bool = False) -> Any:
    """A per-feature (or, per_channel, per-channel) operand as NumPy arithmetic sees it.

    Python scalars stay Python scalars (NumPy treats them as weak in dtype
    promotion); everything else becomes an array that must broadcast to (D,).
    """
    unit, rule = ("channels", "shape[1]") if per_channel else ("features", "prod(shape[1:])")
    if type(value) in (float, int, bool):
        return value
    if value is None:
        raise TypeError(f"{what} is None; it must be a number or an array of {d} {unit}")
    arr = as_array(value, what)
    check_real_dtype(arr.dtype, what)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, d)):
        raise ValueError(f"{what} has shape {arr.shape}, which does not broadcast to the "
                         f"{d} {unit} of x (x has shape {x_shape}, {unit} = {rule})")
    return arr


def result_float(dt: np.dtype, what: str) -> np.dtype:
    """dt if it is float16/32/64, else a TypeError naming it."""
    if dt.kind != "f" or dt.itemsize > 8:
        raise TypeError(f"{what} would have dtype {dt}; bnfast computes float16, float32 "
                        "and float64 results only (check the dtypes of the parameters)")
    return dt


def kernel_dtype(dt: np.dtype) -> np.dtype:
    """Kernels read and write float32 (for float16/32 data) or float64 (all else)."""
    return F32 if dt.kind == "f" and dt.itemsize <= 4 else F64


def for_kernel(arr: np.ndarray, dt: np.dtype) -> np.ndarray:
    """arr as an aligned, native, C-contiguous array of dt; a copy only if needed."""
    flags = arr.flags
    if arr.dtype == dt and flags.c_contiguous and flags.aligned:
        return arr
    return np.array(arr, dtype=dt, order="C", copy=True)


def kernel_vector(value: Any) -> np.ndarray:
    """A checked per-feature operand as the kernels read it: a native,
    aligned, contiguous float32/float64 array (converted to float64 if not)."""
    if isinstance(value, np.ndarray) and (value.dtype == F64 or value.dtype == F32):
        flags = value.flags
        if flags.c_contiguous and flags.aligned:
            return value
    return np.array(value, dtype=F64, order="C", copy=True).reshape(-1)


def check_out(out: Any, shape: tuple[int, ...], dt: np.dtype, what: str,
              inputs: tuple[Any, ...] = ()) -> np.ndarray:
    """An out= buffer must match exactly and must not overlap any input."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{what} must be a NumPy array, got {describe(out)}")
    if out.shape != tuple(shape):
        raise ValueError(f"{what} has shape {out.shape}; expected {tuple(shape)}")
    if out.dtype != dt:
        raise TypeError(f"{what} has dtype {out.dtype}; expected {dt} (the result dtype)")
    if not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable):
        raise ValueError(f"{what} must be a writeable, aligned, C-contiguous array")
    for value in inputs:
        if isinstance(value, np.ndarray) and np.may_share_memory(out, value):
            raise ValueError(f"{what} overlaps an input array (shape {value.shape}); "
                             "pass a separate buffer")
    return out
