"""Stateless batch normalization over flattened features, with out= buffers.

For callers who keep their own state.  Every function takes a batch ``x`` of
ndim >= 2 and treats each sample as a flat vector of D = prod(x.shape[1:])
features; per-feature operands (gamma, beta, running statistics) are numbers
or arrays that broadcast to (D,).  Result dtypes follow the reference class's
NumPy arithmetic (see README, "The contract").  ``out=`` takes a C-contiguous
array of x's shape and exactly the result dtype, not overlapping any input;
the per-feature results (D values) are always fresh arrays.

``BatchNormalization`` (bnfast.layer) is built on the same internals.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from . import _checks, _dtypes
from ._native import kernels as _kernels
from ._checks import F16, F32, F64

__all__ = ["TrainResult", "forward_train", "forward_eval", "backward_train", "backward_eval"]


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
        result = np.empty(shape, dt)
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
                  out: Optional[np.ndarray] = None) -> TrainResult:
    """Normalize x with its own batch statistics, then scale and shift.

    Returns the output, the float64 batch mean and biased variance, and, if
    running statistics are given, their update
    ``momentum * running + (1 - momentum) * batch`` as new arrays.
    """
    x, n, d = _checks.batch(x)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    beta = _checks.operand(beta, "beta", d, x.shape)
    _checks.check_momentum(momentum)
    updating = running_mean is not None or running_var is not None
    if updating:
        if running_mean is None or running_var is None:
            raise ValueError("give both running_mean and running_var, or neither")
        running_mean = _checks.operand(running_mean, "running_mean", d, x.shape)
        running_var = _checks.operand(running_var, "running_var", d, x.shape)
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
                           float(momentum), float(1 - momentum))
    if updating and not in_kernel:
        rm_new, rv_new = running_update(momentum, running_mean, running_var, mean, var, dts.stat)
    return TrainResult(finish(result, target), mean, var, rm_new, rv_new)


def forward_eval(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any, *,
                 eps: float = 1e-6, out: Optional[np.ndarray] = None) -> np.ndarray:
    """gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
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


def backward_train(dout: Any, x: Any, mean: Any, var: Any, gamma: Any, *, eps: float = 1e-6,
                   out: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dx, dgamma, dbeta) of the training forward.

    ``mean`` and ``var`` are the batch statistics that forward_train returned
    for this x (any real dtype; used in float64), ``dout`` the gradient of
    its output.
    """
    x, n, d = _checks.batch(x)
    dout = check_dout(dout, x.shape, n, d)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    stats = []
    for value, what in ((mean, "mean"), (var, "var")):
        arr = _checks.as_array(value, what)
        _checks.check_real_dtype(arr.dtype, what)
        if arr.shape != (d,):
            raise ValueError(f"{what} has shape {arr.shape}; expected ({d},), one value per "
                             f"feature of x (shape {x.shape})")
        stats.append(arr)
    dts = _dtypes.grads(True, x.dtype, gamma, dout.dtype)
    result, target = result_buffers(x.shape, dts.dx, out, "out", (x, dout, gamma, *stats))
    mean = np.ascontiguousarray(stats[0], dtype=F64)
    invstd = 1.0 / np.sqrt(np.asarray(stats[1], dtype=F64) + eps)
    xk, dk = same_kernel_dtype(x, dout)
    dgamma, dbeta = grad_buffers(d, dts)
    _kernels.train_backward(xk, dk, target, n, d, mean, invstd,
                            _checks.kernel_vector(gamma), dgamma, dbeta)
    return (finish(result, target), *grads_as(dgamma, dbeta, dts))


def backward_eval(dout: Any, x: Any, gamma: Any, running_mean: Any, running_var: Any, *,
                  eps: float = 1e-6,
                  out: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dx, dgamma, dbeta) of forward_eval, statistics held constant:
    dx = dout * gamma / sqrt(running_var + eps), dgamma = sum(dout * xn),
    dbeta = sum(dout)."""
    x, n, d = _checks.batch(x)
    dout = check_dout(dout, x.shape, n, d)
    eps = _checks.check_eps(eps)
    gamma = _checks.operand(gamma, "gamma", d, x.shape)
    running_mean = _checks.operand(running_mean, "running_mean", d, x.shape)
    running_var = _checks.operand(running_var, "running_var", d, x.shape)
    dts = _dtypes.grads(False, x.dtype, gamma, dout.dtype, running_mean, running_var)
    result, target = result_buffers(x.shape, dts.dx, out, "out",
                                    (x, dout, gamma, running_mean, running_var))
    xk, dk = same_kernel_dtype(x, dout)
    dgamma, dbeta = grad_buffers(d, dts)
    _kernels.eval_backward(xk, dk, target, n, d, _checks.kernel_vector(gamma),
                           _checks.kernel_vector(running_mean), _checks.kernel_vector(running_var),
                           eps, dgamma, dbeta)
    return (finish(result, target), *grads_as(dgamma, dbeta, dts))
