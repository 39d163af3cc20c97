"""Planning: every decision about a call, made once, before its one kernel call.

A call is validated (a TypeError or ValueError that names the argument, its
shape and its dtype), its result dtypes are resolved (_dtypes) and its memory
layout is chosen (_channels), into a plan: what the call decided and what it
leaves for a backward (see "Plans" below), with the freshly allocated
results.  Making a plan changes no state and writes to no caller array, so
a rejected call leaves everything as it was.  plan_forward and plan_backward
then make the one kernel call (and, for float16 results, the NumPy steps the
kernels cannot do) and return the results and the plan, which the layer
commits:

    layer --x--> plan_forward --> kernel --> (results, plan) --> layer commits

The fast path is a trivial plan: x, gamma and beta kernel-ready arrays of one
float dtype, running statistics kernel-ready of that dtype or float64 (or
unset), dtypes from a memo; nothing is converted.  Every other call is
validated, converted and resolved in full; both end in the same code.

Kernel-ready means an aligned, native-byte-order, C-contiguous float32 or
float64 ndarray: what the kernels' entry points accept as they are.  The
kernels define it and this module asks them (ready_rows, ready_vector,
ready_operands), so the definition has one home.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Final, Optional

import numpy as np

from . import _channels, _dtypes, _outputs
from ._channels import FLAT, PLANES, ROWS, Batch
from ._dtypes import F16, F32, F64, KERNEL_FLOATS, kernel_dtype
from ._native import kernels as _kernels

__all__ = ["F16", "F32", "F64", "Plan", "plan_forward", "plan_backward", "train_plan_of",
           "eval_plan_of"]

_REAL_KINDS = "biuf"
_INF = math.inf

# The kernels' readiness queries: D = prod(shape[1:]) if x is a kernel-ready
# ndarray of ndim >= 2 with N, D >= 1, else 0; whether v is a kernel-ready
# 1-D ndarray of d elements with like's dtype; the dtype of a trivial
# forward's (backward's) running statistics, or None if its operands are
# not trivial.
_ready_rows = _kernels.ready_rows
_ready_vector = _kernels.ready_vector
_ready_operands = _kernels.ready_operands
_ready_grads = _kernels.ready_grads
_new_output = _outputs.empty     # batch-sized results: large ones reuse freed memory
# The memos of the trivial plans' dtypes, and the batch count from which
# NumPy 1 widens a float32 backward.
_UNIFORM, _UNIFORM_GRADS = _dtypes.UNIFORM, _dtypes.UNIFORM_GRADS
_WIDENING = _dtypes.WIDENING_COUNT
# The kernel entry points a plan may call.  Each takes a batch as its rows
# of c values, (rows, c, 0), or as NCHW planes, (n, c, s).
_train_forward, _eval_forward = _kernels.train_forward, _kernels.eval_forward
_train_backward, _eval_backward = _kernels.train_backward, _kernels.eval_backward


# --------------------------------------------------------------------------
# Argument checks


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
    if type(eps) is float and 0.0 <= eps < _INF:
        return eps
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, _REAL_SCALARS):
        raise TypeError(f"eps must be a real number, got {describe(eps)}")
    value = float(eps)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"eps must be finite and >= 0, got {value!r}")
    return value


def check_momentum(momentum: Any) -> float:
    if type(momentum) is float:
        return momentum
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, _REAL_SCALARS):
        raise TypeError(f"momentum must be a real number, got {describe(momentum)}")
    return float(momentum)


def check_flag(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be True or False, got {describe(value)}")
    return bool(value)


def var_correction(unbiased: Any, values: int, what: str) -> float:
    """The factor running_var's update applies to the batch variance."""
    if not check_flag(unbiased, "running_var_unbiased"):
        return 1.0
    if values < 2:
        raise ValueError(f"running_var_unbiased needs at least 2 values per {what}; this "
                         f"batch has {values}")
    return values / (values - 1)


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


def check_dout(dout: Any, b: Batch) -> np.ndarray:
    """dout must have the forward input's shape (per feature, also its (N, D) view)."""
    arr = as_array(dout, "dout")
    check_real_dtype(arr.dtype, "dout")
    if arr.shape != b.shape and (b.layout is not FLAT or arr.shape != (b.n, b.c)):
        allowed = ("that shape" if b.layout is not FLAT
                   else f"that shape or its flattened shape {(b.n, b.c)}")
        raise ValueError(f"dout has shape {arr.shape}; the forward input had shape {b.shape} "
                         f"(dout must have {allowed})")
    return arr


# --------------------------------------------------------------------------
# Layout: x and the per-feature operands as the kernels read them


def kernel_vector(value: Any) -> np.ndarray:
    """A checked per-feature operand as the kernels read it: as it is if
    kernel-ready, else a copy: float32 for float32 values (the kernels then
    read the same numbers as from a ready array), float64 for all else (a
    1-element array for a number)."""
    if type(value) is np.ndarray:
        if value.ndim == 1 and _ready_vector(value, value.shape[0], value):
            return value
        if value.dtype.kind == "f" and value.dtype.itemsize == 4:
            return np.array(value, dtype=F32, order="C", copy=True).reshape(-1)
    return np.array(value, dtype=F64, order="C", copy=True).reshape(-1)


def _ready_batch(x: Any, per_channel: bool) -> Optional[tuple[Any, ...]]:
    """(x as the kernels read it, layout, shape, N, C, S) if x is kernel-ready
    as it is (per channel: NCHW or channels-last), else None (for any input
    at all, even a bad one)."""
    d = _ready_rows(x)
    if not d:
        if not per_channel or type(x) is not np.ndarray or x.ndim < 3:
            return None
        last = _channels.channels_to_last(x)
        if not _ready_rows(last):
            return None
        shape = x.shape
        n, c = shape[0], shape[1]
        return last, ROWS, shape, n, c, x.size // (n * c)
    shape = x.shape
    if not per_channel:
        return x, FLAT, shape, shape[0], d, 1
    c = shape[1]
    if d == c:     # one value per plane: NCHW memory is (N, C) rows too, better read as rows
        return _channels.channels_to_last(x), ROWS, shape, shape[0], c, 1
    return x, PLANES, shape, shape[0], c, d // c


def layout(x: Any, per_channel: bool) -> tuple[np.ndarray, Batch]:
    """x checked (ndim >= 2, real dtype, not empty) and laid out for the
    kernels, copied to its kernel dtype (C-contiguous; per channel NCHW, or
    (N, C) rows for one value per plane) only when it is not ready as it is."""
    arr, n, d = batch(x)
    ready = _ready_batch(arr, per_channel)
    if ready is not None:
        return arr, Batch(*ready)
    copy = np.array(arr, dtype=kernel_dtype(arr.dtype), order="C", copy=True)
    if not per_channel:
        return arr, Batch(copy, FLAT, arr.shape, n, d, 1)
    c = arr.shape[1]
    if c == d:
        return arr, Batch(_channels.channels_to_last(copy), ROWS, arr.shape, n, c, 1)
    return arr, Batch(copy, PLANES, arr.shape, n, c, d // c)


def _like(layout: _channels.Layout, dt: np.dtype, arr: np.ndarray) -> np.ndarray:
    """arr (of x's shape, or per feature its (N, D) view) in a layout and a
    kernel dtype: what the kernels read beside x (dout)."""
    view = _channels.kernel_view(layout, arr)
    if _ready_rows(view) and view.dtype == dt:
        return view
    return np.array(view, dtype=dt, order="C", copy=True)


def results(layout: _channels.Layout, shape: tuple[int, ...], rows_shape: tuple[int, ...],
            dt: np.dtype, out: Any, inputs: tuple[Any, ...], near: Any = None
            ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(result of x's shape in the layout, the kernels' target, the result's
    kernel view when the target is a float32 stand-in for a float16 result).
    rows_shape: the kernels' (N, *spatial, C) shape in the rows layout.
    near: what the kernels read while they write it (placement: _outputs.empty)."""
    if out is None:
        if layout is ROWS:
            view = _new_output(rows_shape, dt, near)
            result = _channels.channels_to_second(view)
        else:
            result = view = _new_output(shape, dt, near)
    else:
        given = _channels.kernel_view(layout, out) if (isinstance(out, np.ndarray)
                                                       and out.shape == shape) else None
        result = check_out(out, shape, dt, "out", inputs, view=given,
                           layout=_channels.describe(layout))
        view = _channels.kernel_view(layout, result)
    if dt is F16:
        return result, _channels.output(layout, shape, rows_shape, F32)[1], view
    return result, view, None


# --------------------------------------------------------------------------
# Plans
#
# A plan is what a forward call decided and what it leaves for a backward
# (and for the layer's xc, xn, std): a plain tuple, because one is made on
# every call and a named tuple costs ~0.2 us more to make -- a tenth of a
# small call.  Its fields, in order (the first six describe x as the kernels
# read it, as a _channels.Batch does):
#
#   array        x as the kernels read it; after a training forward, its copy
#   layout       _channels.Layout
#   shape        the caller's x shape
#   n, c, s      samples, features (channels), values per feature in a sample
#   train        a training forward's plan (else eval mode's)
#   x_dtype      the caller's x dtype
#   stats        training: the float64 batch mean, variance and invstd (C,) (rows
#                of one (3, C) block)
#   stat_dtype   training: the reference's xc / xn / std dtype
#   eps
#   running_mean, running_var
#                training: the new ones (None if not updated); eval: those used
#   fresh        eval: the running statistics were unset and are new zeros
#   copied       training: array is a copy the kernel made in the caller's buffer

Plan = tuple[np.ndarray, _channels.Layout, tuple[int, ...], int, int, int, bool, np.dtype,
             Optional[tuple[np.ndarray, ...]], np.dtype, float, Any, Any, bool, bool]
ARRAY: Final = 0
LAYOUT: Final = 1
SHAPE: Final = 2
N: Final = 3
C: Final = 4
S: Final = 5
TRAIN: Final = 6
X_DTYPE: Final = 7
STATS: Final = 8
STAT_DTYPE: Final = 9
EPS: Final = 10
RUNNING_MEAN: Final = 11
RUNNING_VAR: Final = 12
FRESH: Final = 13
COPIED: Final = 14


def batch_of(plan: Plan) -> Batch:
    """The plan's x as a Batch (for the layout helpers of _channels)."""
    return Batch(*plan[:6])


#: A forward planned but not run (run=False), for callers that carry it
#: out in split phases: the plan; the result; NumPy steps to run after the
#: kernels (float16 results and running statistics) or None; x as the
#: kernels read it (the plan's array is its copy, if any); the kernels'
#: target for the result; gamma and beta as the kernels read them.
ForwardCall = tuple[Plan, np.ndarray, Optional[Callable[[], None]], np.ndarray, np.ndarray,
                    np.ndarray, np.ndarray]


def plan_forward(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                 eps: float, momentum: Any, rate: float, train: Any, per_channel: bool = False,
                 unbiased: Any = False, keep: bool = False, buffer: Optional[np.ndarray] = None,
                 stats: Optional[tuple[np.ndarray, ...]] = None, out: Any = None,
                 running: str = "zeros", run: bool = True) -> Any:
    """Plan a forward call (training if `train`, else eval mode) and carry it
    out with one kernel call: returns (result, plan, stats buffer).  With
    run=False, returns the ForwardCall instead, for callers that carry the
    plan out in split phases.

    eps, momentum: checked by the caller (check_eps, check_momentum: the
    layer when they are set, the functional forms per call); rate: momentum
    as a float (check_momentum's value).  keep: a training forward keeps a
    copy of x for backward, made by the
    kernel in `buffer` if that fits, else in new memory.  stats: a training
    forward's statistics (mean, var, invstd) to overwrite if they fit (the
    layer's last: they go with the plan this one replaces).  running:
    what unset running statistics mean: "zeros" (the layer: new float64
    zeros, as in the book), "optional" (functional training: no update) or
    "required" (functional eval: an error)."""
    train = True if train else False
    # Inputs.  The trivial plan: everything kernel-ready in one float dtype
    # (NumPy's own float32 or float64 instance, which indexes the memo of
    # dtypes; that memo assumes a Python float momentum).  It converts
    # nothing, so the running statistics it uses are the caller's, and the
    # kernels read them as they are.
    r: Optional[np.dtype] = None
    laid: Any = None
    if out is None and (not train or type(momentum) is float):
        if not per_channel:
            r = _ready_operands(x, 0, gamma, beta, running_mean, running_var)
        else:
            laid = _ready_batch(x, True)
            if laid is not None:
                r = _ready_operands(x, laid[4], gamma, beta, running_mean, running_var)
        if running_mean is None and running == "required":
            r = None
    if r is not None:
        x_dtype = x.dtype
        if per_channel:
            source, lay, shape, n, c, s = laid
        else:
            source = x
            lay = FLAT
            shape = x.shape
            n = shape[0]
            c = len(gamma)     # (gamma: a vector of x's features)
            s = 1
        dts = (_UNIFORM[train][x_dtype is F64][r is F64]
               or _dtypes.uniform(train, x_dtype, r))
        # running statistics: as checked (None: unset), and as the kernels read them
        rm_used = rm_k = running_mean
        rv_used = rv_k = running_var
        given = None     # 1-D running statistics: the new ones are 1-D too
        private = False
        # (the commonest results inline: a call costs as much as the allocation)
        after = None
        if lay is not ROWS:
            result = target = _new_output(shape, dts.out, source)
        else:
            result, target, _ = results(lay, shape, source.shape, dts.out, None, (), source)
    else:
        # The general plan: validate, convert, resolve.
        arr, b = layout(x, per_channel)
        source, lay, shape, n, c, s = b
        x_dtype = arr.dtype
        gamma = operand(gamma, "gamma", c, shape, per_channel)
        beta = operand(beta, "beta", c, shape, per_channel)
        checked = running_pair(running_mean, running_var, c, shape, per_channel)
        if checked is None:
            if running == "required":
                operand(running_mean, "running_mean", c, shape, per_channel)     # raises
            # (unset running statistics: the twin makes float64 zeros, as the layer does)
            rm_used = rv_used = rm_k = rv_k = None
        else:
            rm_used, rv_used = checked
            rm_k, rv_k = kernel_vector(rm_used), kernel_vector(rv_used)
        if train:
            dts = _dtypes.train(x_dtype, gamma, beta, momentum, rm_used, rv_used)
        else:
            dts = _dtypes.evaluate(x_dtype, gamma, beta, rm_used, rv_used)
        given = (running_mean, running_var)
        private = source is not arr and not np.may_share_memory(source, arr)
        result, target, f16_view = results(lay, shape, source.shape, dts.out, out,
                                           (arr, gamma, beta) + (checked or ()), source)
        after = None if f16_view is None else _copier(f16_view, target)
        gamma, beta = kernel_vector(gamma), kernel_vector(beta)
    plan: Plan
    kn, ks = (n, s) if lay is PLANES else (n * s, 0)      # the kernels' view of x
    if not train:
        # Eval mode keeps x by reference, not a copy (documented).
        fresh = rm_used is None
        if fresh:     # unset, not required: new float64 zeros, used and kept (book)
            rm_used = rm_k = np.zeros(c)
            rv_used = rv_k = np.zeros(c)
        plan = (source, lay, shape, n, c, s, False, x_dtype, None, dts.out, eps, rm_used,
                rv_used, fresh, False)
        if run:
            _eval_forward(source, target, kn, c, gamma, beta, rm_k, rv_k, eps, ks)
    else:
        # (the common False skips the call; any other value is checked there)
        correction = 1.0 if unbiased is False else var_correction(
            unbiased, n * s, "channel" if per_channel else "feature")
        if stats is None or stats[0].shape[0] != c:
            block = np.empty((3, c))
            stats = (block[0], block[1], block[2])
        # The copy of x a backward reads, made by the kernel in the statistics pass.
        cache = None
        kept = source
        if keep and not private:
            cache = buffer
            if cache is None or cache.shape != source.shape or cache.dtype is not source.dtype:
                cache = _new_output(source.shape, source.dtype, source)
            kept = cache
        if rm_used is None and running == "zeros":     # unset: the book's new float64 zeros
            rm_used = rm_k = np.zeros(c)
            rv_used = rv_k = np.zeros(c)
        rm_old = rv_old = new_mean = new_var = rm_new = rv_new = None
        if rm_used is not None:
            if given is None:
                new_mean = _new_output((c,), dts.running_mean)
                new_var = _new_output((c,), dts.running_var)
            else:
                x_ndim = len(shape)
                new_mean = np.empty(unit_shape(given[0], c, x_ndim, per_channel),
                                    dts.running_mean)
                new_var = np.empty(unit_shape(given[1], c, x_ndim, per_channel),
                                   dts.running_var)
            if dts.running_mean in KERNEL_FLOATS and dts.running_var in KERNEL_FLOATS:
                rm_old, rv_old = rm_k, rv_k
                rm_new, rv_new = new_mean, new_var
            else:     # float16 running statistics: the reference's NumPy update, after
                after = _numpy_update_after(after, new_mean, new_var, momentum,
                                            (rm_used, rv_used), stats, correction, dts.stat)
        plan = (kept, lay, shape, n, c, s, True, x_dtype, stats, dts.stat, eps, new_mean,
                new_var, False, cache is not None)
        if run:
            _train_forward(source, cache, target, kn, c, gamma, beta, eps, stats[0], stats[1],
                           stats[2], rm_old, rm_new, rv_old, rv_new, rate, 1 - rate,
                           correction, ks)
    if not run:
        return plan, result, after, source, target, gamma, beta
    if after is not None:
        after()
    return result, plan, stats


def _copier(dst: np.ndarray, src: np.ndarray) -> Callable[[], None]:
    """dst[...] = src, after the kernel: a float16 result from its float32 stand-in."""
    return lambda: np.copyto(dst, src, casting="unsafe")


def _numpy_update_after(first: Optional[Callable[[], None]], new_mean: np.ndarray,
                        new_var: np.ndarray, momentum: Any, checked: tuple[Any, Any],
                        stats: tuple[np.ndarray, ...], correction: float,
                        stat: np.dtype) -> Callable[[], None]:
    def after() -> None:
        if first is not None:
            first()
        update_running(new_mean, new_var, momentum, checked, stats[0], stats[1] * correction,
                       stat)
    return after


def update_running(new_mean: np.ndarray, new_var: np.ndarray, momentum: Any,
                   old: tuple[Any, Any], mean: np.ndarray, var: np.ndarray,
                   stat: np.dtype) -> None:
    """The reference's running-statistics update, in NumPy, into new_mean and
    new_var (for dtypes the kernels do not write, and the split-phase layer)."""
    keep = 1 - momentum
    new_mean.reshape(-1)[...] = momentum * old[0] + keep * mean.astype(stat)
    new_var.reshape(-1)[...] = momentum * old[1] + keep * var.astype(stat)


# The plans the functional backward forms start from (the layer's come from
# its forwards).


def train_plan_of(x: Any, mean: Any, var: Any, eps: Any, per_channel: bool) -> Plan:
    """A training forward's plan, from x and its batch statistics (any real
    dtype, used in float64)."""
    arr, b = layout(x, per_channel)
    eps = check_eps(eps)
    unit = "channel" if per_channel else "feature"
    block = np.empty((3, b.c))
    for row, (value, what) in enumerate(((mean, "mean"), (var, "var"))):
        vector = as_array(value, what)
        check_real_dtype(vector.dtype, what)
        if vector.shape != (b.c,):
            raise ValueError(f"{what} has shape {vector.shape}; expected ({b.c},), one value "
                             f"per {unit} of x (shape {arr.shape})")
        block[row] = vector
    block[2] = 1.0 / np.sqrt(block[1] + eps)
    return (*b, True, arr.dtype, (block[0], block[1], block[2]), F64, eps, None, None, False,
            False)


def eval_plan_of(x: Any, running_mean: Any, running_var: Any, eps: Any,
                 per_channel: bool) -> Plan:
    """An eval-mode forward's plan, from x and the running statistics."""
    arr, b = layout(x, per_channel)
    eps = check_eps(eps)
    checked = running_pair(running_mean, running_var, b.c, arr.shape, per_channel)
    if checked is None:
        operand(running_mean, "running_mean", b.c, arr.shape, per_channel)     # raises
    assert checked is not None
    return (*b, False, arr.dtype, None, F64, eps, checked[0], checked[1], False, False)


# --------------------------------------------------------------------------
# Backward

#: A backward planned but not run (run=False), for callers that carry it
#: out in split phases: dx; NumPy steps to run after the kernels or None;
#: dgamma and dbeta; x and dout as the kernels read them (in the plan's
#: layout, one dtype); the kernels' target for dx; gamma as the kernels read it.
BackwardCall = tuple[np.ndarray, Optional[Callable[[], None]], np.ndarray, np.ndarray,
                     np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def plan_backward(plan: Plan, dout: Any, gamma: Any, beta: Any = None, out: Any = None,
                  laid_out: bool = False, inputs: tuple[Any, ...] = (),
                  count: Optional[int] = None, run: bool = True) -> Any:
    """Plan the backward of the forward that made `plan` and carry it out
    with one kernel call: returns (dx, dgamma, dbeta).  With run=False,
    returns the BackwardCall instead (for the split phases).

    laid_out: dgamma and dbeta in the layout of gamma and beta (the layer,
    per channel); else (C,) vectors.  inputs: what out= must not overlap.
    count: the values per feature the statistics came from (default: this
    batch's; the split-phase layer's are the whole batch's)."""
    (xk, lay, shape, n, c, s, train, x_dtype, stats, _, eps, running_mean, running_var,
     _, _) = plan
    if count is None:
        count = n * s
    # The trivial plan: x float32/float64 as the caller gave it, dout and
    # gamma (and after an eval-mode forward, the running statistics) ready
    # in x's dtype and layout, the dtypes from the memo.
    r = None
    if out is None:
        if lay is FLAT:
            dk = dout
        else:
            dk = (_channels.kernel_view(lay, dout) if type(dout) is np.ndarray
                  and dout.shape == shape else None)
        r = _ready_grads(xk, x_dtype, dk, lay is FLAT, c, gamma,
                         None if train else running_mean, None if train else running_var)
        if r is F32 and train and count >= _WIDENING:
            r = None
    if r is not None:
        # (the memo holds the dtypes of batches that NumPy 1 does not widen:
        # the trivial plan's)
        dts = (_UNIFORM_GRADS[train][x_dtype is F64][r is F64]
               or _dtypes.uniform_grads(train, x_dtype, r))
        given_gamma = gk = gamma
        after = None
        # (the commonest results inline: a call costs as much as an allocation)
        if lay is not ROWS:
            result = target = _new_output(shape, dts.dx, (xk, dk))
        else:
            result, target, _ = results(lay, shape, xk.shape, dts.dx, None, inputs, (xk, dk))
    else:
        # The general plan.
        arr = check_dout(dout, batch_of(plan))
        given_gamma = gamma
        gamma = operand(gamma, "gamma", c, shape, lay is not FLAT)
        if train:
            dts = _dtypes.grads(True, x_dtype, gamma, arr.dtype, count=count)
        else:
            dts = _dtypes.grads(False, x_dtype, gamma, arr.dtype, running_mean, running_var,
                                count=count)
        xk, dk = _laid_out_pair(xk, lay, arr)
        gk = kernel_vector(gamma)
        result, target, f16_view = results(lay, shape, xk.shape, dts.dx, out,
                                           inputs + (arr, gamma), (xk, dk))
        after = None if f16_view is None else _copier(f16_view, target)
    assert dk is not None
    if laid_out and lay is not FLAT:
        dgamma = np.empty(unit_shape(given_gamma, c, len(shape), True), dts.dgamma)
        dbeta = np.empty(unit_shape(beta, c, len(shape), True), dts.dbeta)
    else:
        dgamma = _new_output((c,), dts.dgamma)
        dbeta = _new_output((c,), dts.dbeta)
    # The kernels write dgamma and dbeta in one float dtype (as the trivial
    # plan's are); others are copied from float64 after.
    kg, kb = dgamma, dbeta
    if r is None and not (dts.dgamma is dts.dbeta and dts.dgamma in KERNEL_FLOATS):
        kg, kb = np.empty(c), np.empty(c)
        after = _grads_after(after, kg, kb, dgamma, dbeta)
    if not run:
        return result, after, dgamma, dbeta, xk, dk, target, gk
    kn, ks = (n, s) if lay is PLANES else (n * s, 0)      # the kernels' view
    if train:
        assert stats is not None
        _train_backward(xk, dk, target, kn, c, stats[0], stats[2], gk, kg, kb, ks)
    else:
        # (the trivial plan's are kernel-ready)
        rm, rv = ((running_mean, running_var) if r is not None
                  else (kernel_vector(running_mean), kernel_vector(running_var)))
        _eval_backward(xk, dk, target, kn, c, gk, rm, rv, eps, kg, kb, ks)
    if after is not None:
        after()
    return result, dgamma, dbeta


def with_dout(plan: Plan, dout: Any) -> tuple[np.ndarray, np.ndarray]:
    """dout checked against the forward's plan, and x and dout as the kernels
    read them: in the plan's layout and one dtype (float64 if theirs differ)."""
    return _laid_out_pair(plan[ARRAY], plan[LAYOUT], check_dout(dout, batch_of(plan)))


def _laid_out_pair(xk: np.ndarray, lay: _channels.Layout,
                   dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kernel_dtype(dout.dtype) != xk.dtype and xk.dtype != F64:
        xk = np.array(xk, dtype=F64, order="C", copy=True)
    return xk, _like(lay, xk.dtype, dout)


def _grads_after(first: Optional[Callable[[], None]], kg: np.ndarray, kb: np.ndarray,
                 dgamma: np.ndarray, dbeta: np.ndarray) -> Callable[[], None]:
    def after() -> None:
        if first is not None:
            first()
        np.copyto(dgamma.reshape(-1), kg, casting="unsafe")
        np.copyto(dbeta.reshape(-1), kb, casting="unsafe")
    return after
