"""Stateless batch normalization, with out= buffers.

For callers who keep their own state, and for those who split a batch across
processes: the split-phase functions at the end cut a training step where a
cross-process reduction fits (see "Split phases" below).  Every function
takes a batch ``x`` of ndim >= 2 and treats each sample as a flat vector of
D = prod(x.shape[1:]) features, or with per_channel=True normalizes each of
the C = x.shape[1] channels over the batch and all spatial positions;
per-feature (per-channel) operands are numbers or arrays of D (C) values
shaped (D,) or (1, D) ((C,), or laid out along x's channel axis such as
(1, C, 1, 1)).  Result dtypes follow the reference class's NumPy arithmetic
(see README, "The contract"); new running statistics keep the layout of the
given ones, and batch statistics, dgamma and dbeta are (D,) ((C,)) vectors.  ``out=`` takes an array of x's shape and
exactly the result dtype, C-contiguous (per channel: laid out like x), not
overlapping any input; the per-feature results are always fresh arrays.

``BatchNormalization`` (bnfast.layer) is built on the same internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _channels, _checks, _dtypes, _outputs
from ._native import kernels as _kernels
from ._checks import F16, F32, F64

__all__ = ["TrainResult", "forward_train", "forward_eval", "backward_train", "backward_eval",
           "Moments", "GradSums", "batch_moments", "merge_moments", "normalize", "grad_sums",
           "merge_grad_sums", "grad_input"]


class TrainResult(NamedTuple):
    """What a training forward gives."""
    out: np.ndarray                      #: normalized, scaled and shifted batch
    mean: np.ndarray                     #: per-feature batch mean, float64 (D,)
    var: np.ndarray                      #: per-feature biased batch variance, float64 (D,)
    running_mean: Optional[np.ndarray]   #: updated running mean (new array), if given
    running_var: Optional[np.ndarray]    #: updated running variance (new array), if given


def result_buffers(shape: tuple[int, ...], dt: np.dtype, out: Any, what: str,
                   inputs: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(result, kernel target).  float16 results are computed in a float32 buffer."""
    if out is None:
        result = _outputs.empty(shape, dt)
    else:
        result = _checks.check_out(out, shape, dt, what, inputs)
    return result, (np.empty(shape, F32) if dt == F16 else result)


def finish(result: np.ndarray, target: np.ndarray) -> np.ndarray:
    if target is not result:
        np.copyto(result, target, casting="unsafe")
    return result


def grad_buffers(d: int, dts: _dtypes.GradDtypes) -> tuple[np.ndarray, np.ndarray]:
    """dgamma, dbeta as the kernel writes them (one float dtype for both)."""
    if dts.dgamma == dts.dbeta and dts.dgamma in (F32, F64):
        return np.empty(d, dts.dgamma), np.empty(d, dts.dbeta)
    return np.empty(d, F64), np.empty(d, F64)


def grads_as(dgamma: np.ndarray, dbeta: np.ndarray,
             dts: _dtypes.GradDtypes) -> tuple[np.ndarray, np.ndarray]:
    return dgamma.astype(dts.dgamma, copy=False), dbeta.astype(dts.dbeta, copy=False)


def same_kernel_dtype(x: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and dout laid out for the backward kernels, which read both in one dtype."""
    kx = _checks.kernel_dtype(x.dtype)
    kd = _checks.kernel_dtype(dout.dtype)
    k = kx if kx == kd else F64
    return _checks.for_kernel(x, k), _checks.for_kernel(dout, k)


def running_update(momentum: Any, running_mean: Any, running_var: Any, mean: np.ndarray,
                   var: np.ndarray, stat: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The reference's update, in NumPy, for the running statistics whose
    result dtype the kernel does not write (float16)."""
    keep = 1 - momentum
    new_mean = momentum * running_mean + keep * mean.astype(stat)
    new_var = momentum * running_var + keep * var.astype(stat)
    return np.asarray(new_mean), np.asarray(new_var)


def check_dout(dout: Any, shape: tuple[int, ...], n: int, d: int) -> np.ndarray:
    """dout must have the forward input's shape (or its flattened (N, D) view)."""
    arr = _checks.as_array(dout, "dout")
    _checks.check_real_dtype(arr.dtype, "dout")
    if arr.shape != shape and arr.shape != (n, d):
        raise ValueError(f"dout has shape {arr.shape}; the forward input had shape {shape} "
                         f"(dout must have that shape or its flattened shape {(n, d)})")
    return arr


def forward_train(x: Any, gamma: Any, beta: Any, *, eps: float = 1e-6,
                  running_mean: Any = None, running_var: Any = None, momentum: float = 0.9,
                  out: Optional[np.ndarray] = None, per_channel: bool = False,
                  running_var_unbiased: bool = False) -> TrainResult:
    """Normalize x with its own batch statistics, then scale and shift.

    Returns the output, the float64 batch mean and biased variance, and, if
    running statistics are given, their update
    ``momentum * running + (1 - momentum) * batch`` as new arrays (with the
    unbiased batch variance in running_var if running_var_unbiased).
    per_channel: statistics per channel of (N, C, *spatial) input, over N and
    all spatial positions; mean and var then have shape (C,).
    """
    if per_channel:
        return _channel_forward_train(x, gamma, beta, eps, running_mean, running_var, momentum,
                                      out, running_var_unbiased)
    x, n, d = _checks.batch(x)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    beta = _checks.operand(beta, "beta", d, x.shape)
    _checks.check_momentum(momentum)
    given = running_mean, running_var
    running = _checks.running_pair(running_mean, running_var, d, x.shape)
    updating = running is not None
    if running is not None:
        running_mean, running_var = running
    correction = _channels.var_correction(running_var_unbiased, n, "feature")
    dts = _dtypes.train(x.dtype, gamma, beta, momentum, running_mean, running_var)
    result, target = result_buffers(x.shape, dts.out, out, "out",
                                    (x, gamma, beta, running_mean, running_var))
    xk = _checks.for_kernel(x, _checks.kernel_dtype(x.dtype))
    mean = np.empty(d)
    var = np.empty(d)
    in_kernel = updating and dts.running_mean in (F32, F64) and dts.running_var in (F32, F64)
    rm_old = _checks.kernel_vector(running_mean) if in_kernel else None
    rv_old = _checks.kernel_vector(running_var) if in_kernel else None
    rm_new = np.empty(d, dts.running_mean) if in_kernel else None
    rv_new = np.empty(d, dts.running_var) if in_kernel else None
    _kernels.train_forward(xk, None, target, n, d, _checks.kernel_vector(gamma),
                           _checks.kernel_vector(beta), eps, mean, var, None,
                           rm_old, rm_new, rv_old, rv_new,
                           float(momentum), float(1 - momentum), correction)
    if updating and not in_kernel:
        rm_new, rv_new = running_update(momentum, running_mean, running_var, mean,
                                        var * correction, dts.stat)
    rm_new, rv_new = _running_laid_out(rm_new, rv_new, given, d, x.ndim, False)
    return TrainResult(finish(result, target), mean, var, rm_new, rv_new)


def _running_laid_out(rm_new: Optional[np.ndarray], rv_new: Optional[np.ndarray],
                      given: tuple[Any, Any], d: int, x_ndim: int,
                      per_channel: bool) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """New running statistics in the layout of the given ones ((1, D) stays (1, D))."""
    if rm_new is None or rv_new is None:
        return rm_new, rv_new
    return (rm_new.reshape(_checks.unit_shape(given[0], d, x_ndim, per_channel)),
            rv_new.reshape(_checks.unit_shape(given[1], d, x_ndim, per_channel)))


def forward_eval(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any, *,
                 eps: float = 1e-6, out: Optional[np.ndarray] = None,
                 per_channel: bool = False) -> np.ndarray:
    """gamma * (x - running_mean) / sqrt(running_var + eps) + beta (per
    feature, or per channel of (N, C, *spatial) input)."""
    if per_channel:
        return _channel_forward_eval(x, gamma, beta, running_mean, running_var, eps, out)
    x, n, d = _checks.batch(x)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    beta = _checks.operand(beta, "beta", d, x.shape)
    running_mean = _checks.operand(running_mean, "running_mean", d, x.shape)
    running_var = _checks.operand(running_var, "running_var", d, x.shape)
    dts = _dtypes.evaluate(x.dtype, gamma, beta, running_mean, running_var)
    result, target = result_buffers(x.shape, dts.out, out, "out",
                                    (x, gamma, beta, running_mean, running_var))
    _kernels.eval_forward(_checks.for_kernel(x, _checks.kernel_dtype(x.dtype)), target, n, d,
                          _checks.kernel_vector(gamma), _checks.kernel_vector(beta),
                          _checks.kernel_vector(running_mean), _checks.kernel_vector(running_var),
                          eps)
    return finish(result, target)


def _batch_stats(mean: Any, var: Any, d: int, shape: tuple[int, ...],
                 unit: str) -> list[np.ndarray]:
    stats = []
    for value, what in ((mean, "mean"), (var, "var")):
        arr = _checks.as_array(value, what)
        _checks.check_real_dtype(arr.dtype, what)
        if arr.shape != (d,):
            raise ValueError(f"{what} has shape {arr.shape}; expected ({d},), one value per "
                             f"{unit} of x (shape {shape})")
        stats.append(arr)
    return stats


def backward_train(dout: Any, x: Any, mean: Any, var: Any, gamma: Any, *, eps: float = 1e-6,
                   out: Optional[np.ndarray] = None,
                   per_channel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dx, dgamma, dbeta) of the training forward.

    ``mean`` and ``var`` are the batch statistics that forward_train returned
    for this x (any real dtype; used in float64), ``dout`` the gradient of
    its output.
    """
    if per_channel:
        return _channel_backward_train(dout, x, mean, var, gamma, eps, out)
    x, n, d = _checks.batch(x)
    dout = check_dout(dout, x.shape, n, d)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    stats = _batch_stats(mean, var, d, x.shape, "feature")
    dts = _dtypes.grads(True, x.dtype, gamma, dout.dtype, count=n)
    result, target = result_buffers(x.shape, dts.dx, out, "out", (x, dout, gamma, *stats))
    mean = np.ascontiguousarray(stats[0], dtype=F64)
    invstd = 1.0 / np.sqrt(np.asarray(stats[1], dtype=F64) + eps)
    xk, dk = same_kernel_dtype(x, dout)
    dgamma, dbeta = grad_buffers(d, dts)
    _kernels.train_backward(xk, dk, target, n, d, mean, invstd,
                            _checks.kernel_vector(gamma), dgamma, dbeta)
    return (finish(result, target), *grads_as(dgamma, dbeta, dts))


def backward_eval(dout: Any, x: Any, gamma: Any, running_mean: Any, running_var: Any, *,
                  eps: float = 1e-6, out: Optional[np.ndarray] = None,
                  per_channel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dx, dgamma, dbeta) of forward_eval, statistics held constant:
    dx = dout * gamma / sqrt(running_var + eps), dgamma = sum(dout * xn),
    dbeta = sum(dout)."""
    if per_channel:
        return _channel_backward_eval(dout, x, gamma, running_mean, running_var, eps, out)
    x, n, d = _checks.batch(x)
    dout = check_dout(dout, x.shape, n, d)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    running_mean = _checks.operand(running_mean, "running_mean", d, x.shape)
    running_var = _checks.operand(running_var, "running_var", d, x.shape)
    dts = _dtypes.grads(False, x.dtype, gamma, dout.dtype, running_mean, running_var, count=n)
    result, target = result_buffers(x.shape, dts.dx, out, "out",
                                    (x, dout, gamma, running_mean, running_var))
    xk, dk = same_kernel_dtype(x, dout)
    dgamma, dbeta = grad_buffers(d, dts)
    _kernels.eval_backward(xk, dk, target, n, d, _checks.kernel_vector(gamma),
                           _checks.kernel_vector(running_mean), _checks.kernel_vector(running_var),
                           eps, dgamma, dbeta)
    return (finish(result, target), *grads_as(dgamma, dbeta, dts))


# --------------------------------------------------------------------------
# Per-channel forms (per_channel=True): x is (N, C, *spatial), statistics and
# parameters are per channel; NCHW and channels-last input run without a copy
# and results keep x's layout (see _channels).


def _channel_operands(gamma: Any, beta: Any, c: int,
                      shape: tuple[int, ...]) -> tuple[Any, Any]:
    return (_checks.operand(gamma, "gamma", c, shape, per_channel=True),
            _checks.operand(beta, "beta", c, shape, per_channel=True))


def _channel_forward_train(x: Any, gamma: Any, beta: Any, eps: float, running_mean: Any,
                           running_var: Any, momentum: float, out: Optional[np.ndarray],
                           unbiased: bool) -> TrainResult:
    x, n, c, s = _channels.batch(x)
    eps = _checks.check_eps(eps)
    gamma, beta = _channel_operands(gamma, beta, c, x.shape)
    _checks.check_momentum(momentum)
    given = running_mean, running_var
    running = _checks.running_pair(running_mean, running_var, c, x.shape, per_channel=True)
    updating = running is not None
    if running is not None:
        running_mean, running_var = running
    correction = _channels.var_correction(unbiased, n * s, "channel")
    dts = _dtypes.train(x.dtype, gamma, beta, momentum, running_mean, running_var)
    b = _channels.for_kernel(x, n, c, s)
    result, target = _channels.result_buffers(b, dts.out, out, "out",
                                              (x, gamma, beta, running_mean, running_var))
    stats = np.empty((3, c))
    in_kernel = updating and dts.running_mean in (F32, F64) and dts.running_var in (F32, F64)
    rm_new = np.empty(c, dts.running_mean) if in_kernel else None
    rv_new = np.empty(c, dts.running_var) if in_kernel else None
    _channels.train_forward(
        b, None, target, _checks.kernel_vector(gamma), _checks.kernel_vector(beta), eps, stats,
        _checks.kernel_vector(running_mean) if in_kernel else None, rm_new,
        _checks.kernel_vector(running_var) if in_kernel else None, rv_new, float(momentum),
        correction)
    if updating and not in_kernel:
        rm_new, rv_new = running_update(momentum, running_mean, running_var, stats[0],
                                        stats[1] * correction, dts.stat)
    rm_new, rv_new = _running_laid_out(rm_new, rv_new, given, c, x.ndim, True)
    return TrainResult(_channels.finish(b, result, target), stats[0], stats[1], rm_new, rv_new)


def _channel_forward_eval(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                          eps: float, out: Optional[np.ndarray]) -> np.ndarray:
    x, n, c, s = _channels.batch(x)
    eps = _checks.check_eps(eps)
    gamma, beta = _channel_operands(gamma, beta, c, x.shape)
    running_mean, running_var = _channel_operands(running_mean, running_var, c, x.shape)
    dts = _dtypes.evaluate(x.dtype, gamma, beta, running_mean, running_var)
    b = _channels.for_kernel(x, n, c, s)
    result, target = _channels.result_buffers(b, dts.out, out, "out",
                                              (x, gamma, beta, running_mean, running_var))
    _channels.eval_forward(b, target, _checks.kernel_vector(gamma), _checks.kernel_vector(beta),
                           _checks.kernel_vector(running_mean),
                           _checks.kernel_vector(running_var), eps)
    return _channels.finish(b, result, target)


def _channel_backward_train(dout: Any, x: Any, mean: Any, var: Any, gamma: Any, eps: float,
                            out: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    x, n, c, s = _channels.batch(x)
    dout = _channels.check_dout(dout, x.shape)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", c, x.shape, per_channel=True)
    stats = _batch_stats(mean, var, c, x.shape, "channel")
    dts = _dtypes.grads(True, x.dtype, gamma, dout.dtype, count=n * s)
    b, dk = _channels.same_dtype(_channels.for_kernel(x, n, c, s), dout)
    result, target = _channels.result_buffers(b, dts.dx, out, "out", (x, dout, gamma, *stats))
    mean = np.ascontiguousarray(stats[0], dtype=F64)
    invstd = 1.0 / np.sqrt(np.asarray(stats[1], dtype=F64) + eps)
    dgamma, dbeta = grad_buffers(c, dts)
    _channels.train_backward(b, dk, target, mean, invstd, _checks.kernel_vector(gamma),
                             dgamma, dbeta)
    return (_channels.finish(b, result, target), *grads_as(dgamma, dbeta, dts))


def _channel_backward_eval(dout: Any, x: Any, gamma: Any, running_mean: Any, running_var: Any,
                           eps: float, out: Optional[np.ndarray]) -> tuple[np.ndarray,
                                                                           np.ndarray,
                                                                           np.ndarray]:
    x, n, c, s = _channels.batch(x)
    dout = _channels.check_dout(dout, x.shape)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", c, x.shape, per_channel=True)
    running_mean, running_var = _channel_operands(running_mean, running_var, c, x.shape)
    dts = _dtypes.grads(False, x.dtype, gamma, dout.dtype, running_mean, running_var,
                        count=n * s)
    b, dk = _channels.same_dtype(_channels.for_kernel(x, n, c, s), dout)
    result, target = _channels.result_buffers(b, dts.dx, out, "out",
                                              (x, dout, gamma, running_mean, running_var))
    dgamma, dbeta = grad_buffers(c, dts)
    _channels.eval_backward(b, dk, target, _checks.kernel_vector(gamma),
                            _checks.kernel_vector(running_mean),
                            _checks.kernel_vector(running_var), eps, dgamma, dbeta)
    return (_channels.finish(b, result, target), *grads_as(dgamma, dbeta, dts))


# --------------------------------------------------------------------------
# Split phases.  A training step over a batch split into shards (one per
# process) runs as
#
#   forward:   batch_moments(shard) -> exchange -> merge_moments(all, in order)
#              -> normalize(shard, merged, gamma, beta)
#   backward:  grad_sums(dout, shard, merged) -> exchange
#              -> merge_grad_sums(all, in order) -> grad_input(dout, shard, ...)
#
# and gives what forward_train/backward_train give on the whole batch, to
# rounding.  Merging in a fixed order makes every process's result bitwise
# identical; bnfast.distributed.SyncBatchNormalization does this over MPI.


@dataclass(frozen=True)
class Moments:
    """Per-feature statistics of a batch (or shard), mergeable by merge_moments."""
    count: int           #: rows
    mean: np.ndarray     #: float64 (D,)
    m2: np.ndarray       #: float64 (D,): sum of squared deviations from the mean

    @property
    def var(self) -> np.ndarray:
        """The biased variance, m2 / count, as the reference computes it."""
        result: np.ndarray = self.m2 / self.count
        return result


@dataclass(frozen=True)
class GradSums:
    """Per-feature sums of a batch (or shard)'s backward, mergeable by merge_grad_sums."""
    count: int                   #: rows
    sum_dout: np.ndarray         #: float64 (D,): sum of dout (dbeta)
    sum_dout_xhat: np.ndarray    #: float64 (D,): sum of dout * xhat (dgamma)


def _check_count(count: Any, what: str) -> int:
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"{what}.count must be an integer, got {_checks.describe(count)}")
    if count < 1:
        raise ValueError(f"{what}.count must be >= 1, got {count}")
    return int(count)


def _check_vectors(what: str, count: Any, d: Optional[int],
                   named: tuple[tuple[str, Any], ...]) -> tuple[int, list[np.ndarray]]:
    """(count, the float64 vectors) of a Moments/GradSums, each of shape (d,)."""
    count = _check_count(count, what)
    arrays = []
    for name, value in named:
        arr = _checks.as_array(value, f"{what}.{name}")
        _checks.check_real_dtype(arr.dtype, f"{what}.{name}")
        if arr.ndim != 1 or (d is not None and arr.shape[0] != d):
            expected = "(D,)" if d is None else f"({d},)"
            raise ValueError(f"{what}.{name} has shape {arr.shape}; expected {expected}")
        d = arr.shape[0]
        arrays.append(np.ascontiguousarray(arr, dtype=F64))
    return count, arrays


def _moments_for(moments: Any, d: Optional[int], what: str = "moments") -> Moments:
    if not isinstance(moments, Moments):
        raise TypeError(f"{what} must be a bnfast.functional.Moments, got "
                        f"{_checks.describe(moments)}")
    count, (mean, m2) = _check_vectors(what, moments.count, d,
                                       (("mean", moments.mean), ("m2", moments.m2)))
    return Moments(count, mean, m2)


def _grad_sums_for(sums: Any, d: Optional[int], what: str = "sums") -> GradSums:
    if not isinstance(sums, GradSums):
        raise TypeError(f"{what} must be a bnfast.functional.GradSums, got "
                        f"{_checks.describe(sums)}")
    count, (sum_dout, sum_dout_xhat) = _check_vectors(
        what, sums.count, d, (("sum_dout", sums.sum_dout), ("sum_dout_xhat", sums.sum_dout_xhat)))
    return GradSums(count, sum_dout, sum_dout_xhat)


def _invstd(moments: Moments, eps: float) -> np.ndarray:
    """1 / sqrt(var + eps), computed as the training kernels compute it."""
    result: np.ndarray = 1.0 / np.sqrt(moments.m2 / moments.count + eps)
    return result


@dataclass(frozen=True)
class Shard:
    """A batch (or shard) as the split-phase kernels read it."""
    array: np.ndarray                  #: kernel-ready x
    n: int                             #: kernel dims: (n, d) rows if s == 0,
    d: int                             #: ... (n, d, s) NCHW planes if s > 0
    s: int
    count: int                         #: values per feature (channel)
    shape: tuple[int, ...]             #: the caller's x.shape
    channels: Optional[_channels.Batch]   #: per-channel layout, None per feature

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.n, self.d, self.s


def split_shard(x: Any, per_channel: bool) -> tuple[np.ndarray, Shard]:
    """x checked (ndim >= 2, real dtype, not empty) and laid out for the kernels."""
    if per_channel:
        x, n, c, s = _channels.batch(x)
        b = _channels.for_kernel(x, n, c, s)
        if b.layout == _channels.PLANES:
            return x, Shard(b.array, n, c, s, n * s, x.shape, b)
        return x, Shard(b.array, b.rows, c, 0, b.rows, x.shape, b)
    x, n, d = _checks.batch(x)
    return x, Shard(_checks.for_kernel(x, _checks.kernel_dtype(x.dtype)), n, d, 0, n, x.shape,
                    None)


def _shard_operand(value: Any, what: str, sh: Shard) -> Any:
    return _checks.operand(value, what, sh.d, sh.shape, per_channel=sh.channels is not None)


def shard_result(sh: Shard, dt: np.dtype, out: Any = None,
                 inputs: tuple[Any, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(result in the shard's layout, the kernels' target view)."""
    if sh.channels is None:
        return result_buffers(sh.shape, dt, out, "out", inputs)
    return _channels.result_buffers(sh.channels, dt, out, "out", inputs)


def shard_finish(sh: Shard, result: np.ndarray, target: np.ndarray) -> np.ndarray:
    if sh.channels is None:
        return finish(result, target)
    return _channels.finish(sh.channels, result, target)


def shard_dout(sh: Shard, dout: Any) -> tuple[Shard, np.ndarray]:
    """dout checked against the shard, and both in one kernel dtype and layout."""
    if sh.channels is None:
        dout = check_dout(dout, sh.shape, sh.n, sh.d)
        xk, dk = same_kernel_dtype(sh.array, dout)
        return Shard(xk, sh.n, sh.d, 0, sh.count, sh.shape, None), dk
    dout = _channels.check_dout(dout, sh.shape)
    b, dk = _channels.same_dtype(sh.channels, dout)
    return Shard(b.array, sh.n, sh.d, sh.s, sh.count, sh.shape, b), dk


def shard_moments(sh: Shard, cache: Optional[np.ndarray] = None) -> Moments:
    """batch_moments of a shard; cache = the shard's array unless None."""
    mean = np.empty(sh.d)
    m2 = np.empty(sh.d)
    _kernels.moments(sh.array, cache, sh.n, sh.d, mean, m2, sh.s)
    return Moments(sh.count, mean, m2)


def batch_moments(x: Any, *, per_channel: bool = False) -> Moments:
    """(count, mean, M2) per feature of x (ndim >= 2, flattened per sample), or
    per channel of (N, C, *spatial) x with per_channel; float64.

    Computed as the training forward computes its statistics (one pass of
    shifted sums with an exact fallback, float64 accumulation).
    """
    return shard_moments(split_shard(x, per_channel)[1])


def merge_moments(parts: Any) -> Moments:
    """Chan's merge of several Moments, in the order given.

    The result is the statistics of the concatenated batches to rounding, the
    same for any way of splitting the batch up to the last bits, and bitwise
    the same wherever it is computed from the same parts in the same order.
    A feature whose mean is not finite gets the count-weighted mean of the
    parts (inf or NaN), as the reference's column sums do.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_moments needs at least one Moments")
    first = _moments_for(parts[0], None, "parts[0]")
    d = first.mean.shape[0]
    count, mean, m2 = first.count, first.mean.copy(), first.m2.copy()
    for index, part in enumerate(parts[1:], 1):
        part = _moments_for(part, d, f"parts[{index}]")
        total = count + part.count
        delta = part.mean - mean
        with np.errstate(invalid="ignore", over="ignore"):
            merged_mean = mean + delta * (part.count / total)
            merged_m2 = m2 + part.m2 + delta * delta * (count * part.count / total)
            finite = np.isfinite(mean) & np.isfinite(part.mean)
            if not finite.all():
                weighted = (mean * count + part.mean * part.count) / total
                merged_mean = np.where(finite, merged_mean, weighted)
                merged_m2 = np.where(finite, merged_m2, m2 + part.m2)
        count, mean, m2 = total, merged_mean, merged_m2
    return Moments(count, mean, m2)


def normalize(x: Any, moments: Any, gamma: Any, beta: Any, *, eps: float = 1e-6,
              out: Optional[np.ndarray] = None, per_channel: bool = False) -> np.ndarray:
    """gamma * (x - mean) / sqrt(var + eps) + beta with the given (merged)
    statistics: the training forward's output for this shard.  dtype as
    forward_train's output."""
    x, sh = split_shard(x, per_channel)
    moments = _moments_for(moments, sh.d)
    eps = _checks.check_eps(eps)
    gamma = _shard_operand(gamma, "gamma", sh)
    beta = _shard_operand(beta, "beta", sh)
    dts = _dtypes.train(x.dtype, gamma, beta)
    result, target = shard_result(sh, dts.out, out, (x, gamma, beta, moments.mean, moments.m2))
    shard_normalize(sh, target, moments, gamma, beta, eps)
    return shard_finish(sh, result, target)


def shard_normalize(sh: Shard, target: np.ndarray, moments: Moments, gamma: Any, beta: Any,
                    eps: float) -> None:
    """normalize's output for a shard, into the kernels' target view."""
    scale = _invstd(moments, eps) * np.broadcast_to(np.asarray(gamma, dtype=F64), (sh.d,))
    shift = np.ascontiguousarray(np.broadcast_to(np.asarray(beta, dtype=F64), (sh.d,)))
    _kernels.affine(sh.array, target, sh.n, sh.d, moments.mean, scale, shift, sh.s)


def grad_sums(dout: Any, x: Any, moments: Any, *, eps: float = 1e-6,
              per_channel: bool = False) -> GradSums:
    """Per-feature (per-channel) sums of dout and dout * xhat over this shard,
    float64, where xhat = (x - mean) / sqrt(var + eps) with the given (merged)
    statistics."""
    x, sh = split_shard(x, per_channel)
    sh, dk = shard_dout(sh, dout)
    moments = _moments_for(moments, sh.d)
    eps = _checks.check_eps(eps)
    return shard_grad_sums(sh, dk, moments, eps)


def shard_grad_sums(sh: Shard, dk: np.ndarray, moments: Moments, eps: float) -> GradSums:
    """grad_sums of a shard and its kernel-ready dout."""
    sum_dout = np.empty(sh.d)
    sum_dout_xc = np.empty(sh.d)
    _kernels.grad_sums(sh.array, dk, sh.n, sh.d, moments.mean, sum_dout, sum_dout_xc, sh.s)
    return GradSums(sh.count, sum_dout, sum_dout_xc * _invstd(moments, eps))


def merge_grad_sums(parts: Any) -> GradSums:
    """The sums of several GradSums, added in the order given."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_grad_sums needs at least one GradSums")
    first = _grad_sums_for(parts[0], None, "parts[0]")
    d = first.sum_dout.shape[0]
    count, sum_dout, sum_dout_xhat = first.count, first.sum_dout.copy(), first.sum_dout_xhat.copy()
    for index, part in enumerate(parts[1:], 1):
        part = _grad_sums_for(part, d, f"parts[{index}]")
        count += part.count
        sum_dout += part.sum_dout
        sum_dout_xhat += part.sum_dout_xhat
    return GradSums(count, sum_dout, sum_dout_xhat)


def grad_input(dout: Any, x: Any, moments: Any, gamma: Any, sums: Any, *, eps: float = 1e-6,
               out: Optional[np.ndarray] = None,
               per_channel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dgamma, dbeta) of this shard from the merged statistics and sums.

    dx = gamma / std * (dout - sum_dout / N - xhat * sum_dout_xhat / N) with N
    the merged count; dgamma = sum_dout_xhat and dbeta = sum_dout (the whole
    batch's, the same on every shard).  dtypes as backward_train's.
    """
    x, sh = split_shard(x, per_channel)
    dout = _checks.as_array(dout, "dout")
    sh, dk = shard_dout(sh, dout)
    moments = _moments_for(moments, sh.d)
    sums = _grad_sums_for(sums, sh.d)
    if sums.count != moments.count:
        raise ValueError(f"sums.count is {sums.count} but moments.count is {moments.count}; "
                         f"both must count the whole (merged) batch")
    eps = _checks.check_eps(eps)
    gamma = _shard_operand(gamma, "gamma", sh)
    dts = _dtypes.grads(True, x.dtype, gamma, dout.dtype, count=moments.count)
    result, target = shard_result(sh, dts.dx, out, (x, dout, gamma, moments.mean, moments.m2))
    dgamma, dbeta = shard_grad_input(sh, dk, target, moments, gamma, sums, eps)
    return (shard_finish(sh, result, target), *grads_as(dgamma, dbeta, dts))


def shard_grad_input(sh: Shard, dk: np.ndarray, target: np.ndarray, moments: Moments,
                     gamma: Any, sums: GradSums, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """dx of a shard into target; (dgamma, dbeta) as float64."""
    invstd = _invstd(moments, eps)
    count = float(sums.count)
    k = np.broadcast_to(np.asarray(gamma, dtype=F64), (sh.d,)) * invstd
    k_xc = invstd * (sums.sum_dout_xhat / count)
    mean_dout = sums.sum_dout / count
    _kernels.grad_input(sh.array, dk, target, sh.n, sh.d, moments.mean, mean_dout, k_xc, k,
                        sh.s)
    return sums.sum_dout_xhat.copy(), sums.sum_dout.copy()
