"""Per-channel (spatial) batch normalization: layouts, validation and kernel calls.

x has shape (N, C, *spatial); each channel's statistics run over the batch and
every spatial position (what PyTorch's BatchNorm2d does).  Two memory layouts
run without copying, and results keep the layout of the input:

  planes  NCHW-contiguous: the planes_* kernels on the (N, C, S) view,
          S = prod(spatial)
  rows    channels-last (memory ordered (N, *spatial, C), as
          ``x.transpose(0, 3, 1, 2)`` of an NHWC array is): the flat kernels on
          the (N * S, C) view, where a channel is a column

With one value per plane (S = 1) the two coincide and the rows kernels run.
Any other layout, dtype or alignment is copied to NCHW first.  The stateless
per-channel forms of bnfast.functional and the layer's per_channel mode are
built on the functions here.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _checks, _outputs
from ._checks import F16, F32, F64
from ._native import kernels as _kernels

PLANES, ROWS = "planes", "rows"


class Batch(NamedTuple):
    """A per-channel batch as the kernels read it.  (A named tuple: made on
    every layer call, and a frozen dataclass costs a microsecond to make.)"""
    array: np.ndarray        # kernel-ready: (N, C, *spatial) C-contiguous, or (N, *spatial, C)
    layout: str              # PLANES or ROWS
    shape: tuple[int, ...]   # the caller's (N, C, *spatial)
    n: int
    c: int
    s: int

    @property
    def rows(self) -> int:
        """Values per channel."""
        return self.n * self.s


# Transpose axes by ndim, made once: building them costs as much as the transpose.
_TO_LAST = {ndim: (0, *range(2, ndim), 1) for ndim in range(2, 65)}
_TO_SECOND = {ndim: (0, ndim - 1, *range(1, ndim - 1)) for ndim in range(2, 65)}


def channels_to_last(a: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> the (N, *spatial, C) view (np.moveaxis, without its overhead)."""
    return a.transpose(_TO_LAST[a.ndim])


def channels_to_second(a: np.ndarray) -> np.ndarray:
    """(N, *spatial, C) -> the (N, C, *spatial) view."""
    return a.transpose(_TO_SECOND[a.ndim])


def batch(x: Any, what: str = "x") -> tuple[np.ndarray, int, int, int]:
    """x as an array of ndim >= 2 (N, C, *spatial) with a real dtype; (x, N, C, S)."""
    arr, n, _ = _checks.batch(x, what)
    return arr, n, arr.shape[1], math.prod(arr.shape[2:])


def _is_channels_last(arr: np.ndarray) -> bool:
    """Memory ordered (N, *spatial, C)."""
    return arr.ndim > 2 and channels_to_last(arr).flags.c_contiguous


def for_kernel(arr: np.ndarray, n: int, c: int, s: int) -> Batch:
    """arr (checked by `batch`) laid out for the kernels; a copy only if needed."""
    dt = _checks.kernel_dtype(arr.dtype)
    if arr.dtype == dt and arr.flags.aligned:
        if arr.flags.c_contiguous and s > 1:
            return Batch(arr, PLANES, arr.shape, n, c, s)
        if _is_channels_last(arr) or (arr.flags.c_contiguous and s == 1):
            # (with one value per plane, NCHW memory is (N, C) rows too)
            return Batch(channels_to_last(arr), ROWS, arr.shape, n, c, s)
    copy = np.array(arr, dtype=dt, order="C", copy=True)
    if s == 1:
        return Batch(channels_to_last(copy), ROWS, arr.shape, n, c, s)
    return Batch(copy, PLANES, arr.shape, n, c, s)


def like(b: Batch, arr: np.ndarray) -> np.ndarray:
    """arr (of b's shape) in b's layout and kernel dtype: what the kernels read
    beside b (dout beside x)."""
    dt = b.array.dtype
    view = kernel_view(b, arr)
    if view.dtype == dt and view.flags.c_contiguous and view.flags.aligned:
        return view
    return np.array(view, dtype=dt, order="C", copy=True)


def empty(b: Batch, dt: np.dtype) -> np.ndarray:
    """A new (N, C, *spatial) array of dt in b's layout."""
    return output(b, dt)[0]


def output(b: Batch, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """empty(b, dt) and its kernel_view."""
    if b.layout == PLANES:
        arr = _outputs.empty(b.shape, dt)
        return arr, arr
    rows = _outputs.empty(b.array.shape, dt)      # (N, *spatial, C)
    return channels_to_second(rows), rows


def kernel_view(b: Batch, arr: np.ndarray) -> np.ndarray:
    """The view of an (N, C, *spatial) array in b's layout that the kernels write."""
    return arr if b.layout == PLANES else channels_to_last(arr)


def check_out(b: Batch, out: Any, dt: np.dtype, what: str, inputs: tuple[Any, ...]) -> np.ndarray:
    """An out= buffer: x's shape, exactly dt, x's layout (as the kernels read
    it), writeable and overlapping no input."""
    view = kernel_view(b, out) if isinstance(out, np.ndarray) and out.shape == b.shape else None
    layout = ("laid out like x: NCHW (C-contiguous)" if b.layout == PLANES
              else "laid out like x: channels-last (memory ordered (N, *spatial, C))")
    return _checks.check_out(out, b.shape, dt, what, inputs, view=view, layout=layout)


def result_buffers(b: Batch, dt: np.dtype, out: Any, what: str,
                   inputs: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(result in b's layout, the kernel's target view); float16 results are
    computed in a float32 buffer."""
    result = empty(b, dt) if out is None else check_out(b, out, dt, what, inputs)
    target = empty(b, F32) if dt == F16 else result
    return result, kernel_view(b, target)


def finish(b: Batch, result: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Copy a float32 target into a float16 result (same layout).  (Otherwise
    target is a view of result: kernel_view makes a new view object each
    time, so compare dtypes, not identities.)"""
    if target.dtype != result.dtype:
        np.copyto(kernel_view(b, result), target, casting="unsafe")
    return result


def var_correction(unbiased: Any, values: int, what: str) -> float:
    """The factor running_var's update applies to the batch variance."""
    if not isinstance(unbiased, (bool, np.bool_)):
        raise TypeError(f"running_var_unbiased must be True or False, got "
                        f"{_checks.describe(unbiased)}")
    if not unbiased:
        return 1.0
    if values < 2:
        raise ValueError(f"running_var_unbiased needs at least 2 values per {what}; this "
                         f"batch has {values}")
    return values / (values - 1)


# --------------------------------------------------------------------------
# Kernel calls, by layout


def train_forward(b: Batch, cache: Optional[np.ndarray], target: np.ndarray, gamma: np.ndarray,
                  beta: np.ndarray, eps: float, stats: np.ndarray, rm_old: Any, rm_new: Any,
                  rv_old: Any, rv_new: Any, momentum: float, correction: float) -> None:
    """stats rows 0-2 get the float64 per-channel mean, var and invstd."""
    if b.layout == PLANES:
        _kernels.planes_train_forward(b.array, cache, target, b.n, b.c, b.s, gamma, beta, eps,
                                      stats[0], stats[1], stats[2], rm_old, rm_new, rv_old,
                                      rv_new, momentum, 1 - momentum, correction)
    else:
        _kernels.train_forward(b.array, cache, target, b.rows, b.c, gamma, beta, eps,
                               stats[0], stats[1], stats[2], rm_old, rm_new, rv_old, rv_new,
                               momentum, 1 - momentum, correction)


def eval_forward(b: Batch, target: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                 running_mean: np.ndarray, running_var: np.ndarray, eps: float) -> None:
    if b.layout == PLANES:
        _kernels.planes_eval_forward(b.array, target, b.n, b.c, b.s, gamma, beta, running_mean,
                                     running_var, eps)
    else:
        _kernels.eval_forward(b.array, target, b.rows, b.c, gamma, beta, running_mean,
                              running_var, eps)


def train_backward(b: Batch, dout: np.ndarray, target: np.ndarray, mean: np.ndarray,
                   invstd: np.ndarray, gamma: np.ndarray, dgamma: np.ndarray,
                   dbeta: np.ndarray) -> None:
    if b.layout == PLANES:
        _kernels.planes_train_backward(b.array, dout, target, b.n, b.c, b.s, mean, invstd, gamma,
                                       dgamma, dbeta)
    else:
        _kernels.train_backward(b.array, dout, target, b.rows, b.c, mean, invstd, gamma,
                                dgamma, dbeta)


def eval_backward(b: Batch, dout: np.ndarray, target: np.ndarray, gamma: np.ndarray,
                  running_mean: np.ndarray, running_var: np.ndarray, eps: float,
                  dgamma: np.ndarray, dbeta: np.ndarray) -> None:
    if b.layout == PLANES:
        _kernels.planes_eval_backward(b.array, dout, target, b.n, b.c, b.s, gamma, running_mean,
                                      running_var, eps, dgamma, dbeta)
    else:
        _kernels.eval_backward(b.array, dout, target, b.rows, b.c, gamma, running_mean,
                               running_var, eps, dgamma, dbeta)


def same_dtype(b: Batch, dout: np.ndarray) -> tuple[Batch, np.ndarray]:
    """x and dout in one kernel dtype and b's layout (float64 if they differ)."""
    kd = _checks.kernel_dtype(dout.dtype)
    if kd != b.array.dtype:
        wide = np.array(b.array, dtype=F64, order="C", copy=True)
        b = Batch(wide, b.layout, b.shape, b.n, b.c, b.s)
    return b, like(b, dout)


def check_dout(dout: Any, shape: tuple[int, ...]) -> np.ndarray:
    """dout must have the forward input's shape."""
    arr = _checks.as_array(dout, "dout")
    _checks.check_real_dtype(arr.dtype, "dout")
    if arr.shape != shape:
        raise ValueError(f"dout has shape {arr.shape}; the forward input had shape {shape} "
                         f"(per-channel mode: dout must have that shape)")
    return arr


def centered(b: Batch, mean: np.ndarray) -> np.ndarray:
    """x - mean (per channel) as a new float64 array of x's shape."""
    if b.layout == PLANES:
        rows: np.ndarray = b.array.reshape(b.n, b.c, b.s) - mean[:, None]
        return rows.reshape(b.shape)
    moved: np.ndarray = b.array - mean
    return channels_to_second(moved)


def scale_channels(a: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """a (N, C, *spatial) times a per-channel factor, in place."""
    a *= factor.reshape((1, -1) + (1,) * (a.ndim - 2))
    return a
