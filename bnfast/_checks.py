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
from typing import Any, Optional

import numpy as np

F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
_REAL_KINDS = "biuf"


def describe(value: Any) -> str:
    """'array of shape (2, 3) and dtype float32', 'float 0.5', ... for messages."""
    if value is None:
        return "None"
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
        hint = (f"; for one sample of D features pass {what}[None] or {what}.reshape(1, -1)"
                if arr.ndim == 1 else "")
        raise ValueError(f"{what} must have ndim >= 2 (batch, features, ...); "
                         f"got shape {arr.shape}{hint}")
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
    """A per-feature (or, per_channel, per-channel) operand as the arithmetic uses it.

    Python scalars stay Python scalars (NumPy treats them as weak in dtype
    promotion) and 0-d arrays stay 0-d (NumPy 1 promotes them by value);
    other arrays must hold 1 or d values in a shape the reference's NumPy
    arithmetic broadcasts per feature (per channel) -- see `unit_axis` --
    and are returned as their 1-D view, never a copy.
    """
    if type(value) in (float, int, bool):
        return value
    if value is None:
        unit = "channels" if per_channel else "features"
        raise TypeError(f"{what} is None; it must be a number or an array of {d} {unit}")
    arr = as_array(value, what)
    check_real_dtype(arr.dtype, what)
    if arr.ndim == 0:
        return arr
    if arr.ndim == 1:
        if arr.shape[0] in (1, d):
            return arr
    elif arr.size in (1, d):
        axis = unit_axis(arr.ndim, len(x_shape), per_channel)
        if axis is not None and all(n == 1 for i, n in enumerate(arr.shape) if i != axis):
            return arr.reshape(-1)
    raise ValueError(_shape_message(arr, what, d, x_shape, per_channel))


def unit_axis(ndim: int, x_ndim: int, per_channel: bool) -> Optional[int]:
    """The axis of an operand of ndim >= 2 that lines up with x's feature
    (channel) axis when NumPy broadcasts it from the right against x's rows:
    (N, D) per feature, x itself (N, C, *spatial) per channel.  -1 if the
    operand is too short to reach that axis (then all its axes must be 1);
    None if it has more axes than the rows (it cannot broadcast at all)."""
    rows_ndim = x_ndim if per_channel else 2
    if ndim > rows_ndim:
        return None
    return max(ndim - rows_ndim + 1, -1)


def unit_shape(value: Any, d: int, x_ndim: int, per_channel: bool) -> tuple[int, ...]:
    """The shape NumPy arithmetic gives a per-feature (per-channel) result
    computed from the operand `value` (as ``momentum * running_mean + ...``
    does): (d,) for numbers and 1-D operands; for a laid-out operand, its own
    shape with d on the feature (channel) axis ((1, D); (1, C, 1, 1))."""
    if not isinstance(value, np.ndarray) or value.ndim < 2:
        return (d,)
    axis = unit_axis(value.ndim, x_ndim, per_channel)
    assert axis is not None, "checked by operand()"
    if axis < 0:      # all ones, short of the channel axis: broadcasts to (1, C, 1, ...)
        return (1, d) + (1,) * (x_ndim - 2)
    shape: tuple[int, ...] = value.shape
    return shape[:axis] + (d,) + shape[axis + 1:]


def _shape_message(arr: np.ndarray, what: str, d: int, x_shape: tuple[int, ...],
                   per_channel: bool) -> str:
    """Why a per-feature (per-channel) operand's shape is refused, and what would do."""
    if per_channel:
        laid_out = (1, d) + (1,) * (len(x_shape) - 2)
        message = (f"{what} has shape {arr.shape}, which is not a per-channel shape for the "
                   f"{d} channels of x (x has shape {x_shape}, channels = shape[1]); {what} "
                   f"must be a number or have shape ({d},) or {laid_out}")
        features = math.prod(x_shape[1:])
        if arr.size == features != d:
            message += (f". It has one value per feature of x ({features} = prod(shape[1:])): "
                        f"for statistics per feature, leave per_channel=False")
        return message
    message = (f"{what} has shape {arr.shape}, which is not a per-feature shape for the {d} "
               f"features of x (x has shape {x_shape}, features = prod(shape[1:])); {what} "
               f"must be a number or have shape ({d},) or (1, {d})")
    if len(x_shape) > 2 and arr.size == x_shape[1] != d:
        message += (f". It has one value per channel of x ({x_shape[1]} = shape[1]): for "
                    f"statistics per channel (batch norm after a convolution) pass "
                    f"per_channel=True")
    return message


def running_pair(running_mean: Any, running_var: Any, d: int, x_shape: tuple[int, ...],
                 per_channel: bool = False) -> Optional[tuple[Any, Any]]:
    """Checked running statistics, or None if both are None."""
    if running_mean is None and running_var is None:
        return None
    if running_mean is None or running_var is None:
        raise ValueError(f"running_mean and running_var must both be given or both be None; "
                         f"got running_mean={describe(running_mean)} and "
                         f"running_var={describe(running_var)}")
    return (operand(running_mean, "running_mean", d, x_shape, per_channel),
            operand(running_var, "running_var", d, x_shape, per_channel))


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
              inputs: tuple[Any, ...] = (), view: Any = None,
              layout: str = "C-contiguous") -> np.ndarray:
    """An out= buffer must match exactly and must not overlap any input; the
    message names the first condition that fails.  view, layout: the view of
    out the kernels write, which must be C-contiguous, and what that means
    for out (per channel: laid out like x)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{what} must be a NumPy array, got {describe(out)}")
    if out.shape != tuple(shape):
        raise ValueError(f"{what} has shape {out.shape}; expected {tuple(shape)}")
    if out.dtype != dt:
        raise TypeError(f"{what} has dtype {out.dtype}; expected {dt} (the result dtype)")
    flags = out.flags
    if not flags.writeable:
        raise ValueError(f"{what} is read-only; out= must be a writeable array")
    fresh = (f"np.empty({tuple(shape)}, {dt.name!r})" if view is None
             else f"np.empty_like(x, dtype={dt.name!r})")
    if not flags.aligned:
        raise ValueError(f"{what} is not aligned for dtype {dt}; pass a buffer NumPy "
                         f"allocated, such as {fresh}")
    if not (out if view is None else view).flags.c_contiguous:
        raise ValueError(f"{what} is not {layout} (strides {out.strides}); pass such a "
                         f"buffer, for instance {fresh}")
    for value in inputs:
        if isinstance(value, np.ndarray) and np.may_share_memory(out, value):
            raise ValueError(f"{what} overlaps an input array (shape {value.shape}); "
                             "pass a separate buffer")
    return out
