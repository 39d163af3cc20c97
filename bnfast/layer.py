"""``BatchNormalization``: the drop-in layer, with the reference class's contract.

State lives here; validation and layout come from _checks, result dtypes from
_dtypes, and the work from the kernels.  A call either raises before touching
any state or completes; it never leaves the layer half-updated.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _checks, _dtypes
from ._native import kernels as _kernels
from ._checks import F64
from .functional import (check_dout, finish, grad_buffers, grads_as, result_buffers,
                         running_update, same_kernel_dtype)

__all__ = ["BatchNormalization"]


class _TrainCache:
    """What a training forward leaves for backward and for the xc/xn/std views.

    ``x`` is the batch as the kernels read it, in bnfast's own memory (a copy
    made in the statistics pass, or the converted copy), so later changes to
    the caller's array do not change the gradient, as in the reference.
    """
    __slots__ = ("x", "x_dtype", "n", "d", "shape", "stats", "stat_dtype", "eps", "views")

    def __init__(self, x: np.ndarray, x_dtype: np.dtype, n: int, d: int,
                 shape: tuple[int, ...], stats: np.ndarray, stat_dtype: np.dtype,
                 eps: float) -> None:
        self.x = x
        self.x_dtype = x_dtype      # the caller's dtype (x may be a converted copy)
        self.n = n
        self.d = d
        self.shape = shape
        self.stats = stats          # float64 rows: mean, biased var, invstd
        self.stat_dtype = stat_dtype
        self.eps = eps
        self.views: dict[str, np.ndarray] = {}

    def view(self, name: str) -> np.ndarray:
        """xc, xn (N, D) and std (D,) in the reference's dtype, made once."""
        found = self.views.get(name)
        if found is None:
            mean, var, invstd = self.stats
            if name == "std":
                found = np.sqrt(var + self.eps).astype(self.stat_dtype)
            else:
                rows = self.x.reshape(self.n, self.d)
                centered = rows - mean
                if name == "xn":
                    centered *= invstd
                found = centered.astype(self.stat_dtype, copy=False)
            self.views[name] = found
        return found


class _EvalCache:
    """What an eval-mode forward leaves for an eval-mode backward."""
    __slots__ = ("x", "x_dtype", "n", "d", "shape", "running_mean", "running_var", "eps")

    def __init__(self, x: np.ndarray, x_dtype: np.dtype, n: int, d: int,
                 shape: tuple[int, ...], running_mean: Any, running_var: Any,
                 eps: float) -> None:
        self.x = x
        self.x_dtype = x_dtype
        self.n = n
        self.d = d
        self.shape = shape
        self.running_mean = running_mean
        self.running_var = running_var
        self.eps = eps


class BatchNormalization:
    """Batch normalization over flattened features, as in *Deep Learning from Scratch*.

    ``gamma`` and ``beta`` are held by reference and read at every call;
    running statistics are created as float64 zeros at the first forward if
    not given, and every training forward binds new arrays
    ``momentum * old + (1 - momentum) * batch`` (biased batch variance).
    Input of any ndim >= 2 is treated per sample as a flat feature vector.
    """

    def __init__(self, gamma: Any, beta: Any, momentum: float = 0.9,
                 running_mean: Any = None, running_var: Any = None, *,
                 eps: float = 1e-6) -> None:
        _checks.check_momentum(momentum)
        self.gamma = gamma
        self.beta = beta
        self.momentum = momentum
        self.eps = _checks.check_eps(eps)
        self.input_shape: Optional[tuple[int, ...]] = None
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size: Optional[int] = None
        self.dgamma: Optional[np.ndarray] = None
        self.dbeta: Optional[np.ndarray] = None
        self._train: Optional[_TrainCache] = None
        self._eval: Optional[_EvalCache] = None
        self._last_train: Optional[bool] = None
        self._buffer: Optional[np.ndarray] = None

    # The reference's cached intermediates, from the last training forward.
    @property
    def xc(self) -> Optional[np.ndarray]:
        """x - batch mean, shape (N, D), from the last training forward."""
        return None if self._train is None else self._train.view("xc")

    @property
    def xn(self) -> Optional[np.ndarray]:
        """Normalized batch, shape (N, D), from the last training forward."""
        return None if self._train is None else self._train.view("xn")

    @property
    def std(self) -> Optional[np.ndarray]:
        """sqrt(batch var + eps), shape (D,), from the last training forward."""
        return None if self._train is None else self._train.view("std")

    def _running(self, d: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """The running statistics to use: checked, or fresh zeros if unset."""
        if self.running_mean is None or self.running_var is None:
            if self.running_mean is not None or self.running_var is not None:
                raise ValueError("running_mean and running_var must both be set or both None")
            return np.zeros(d), np.zeros(d)
        return (_checks.operand(self.running_mean, "running_mean", d, shape),
                _checks.operand(self.running_var, "running_var", d, shape))

    def forward(self, x: Any, train_flg: bool = True) -> np.ndarray:
        """Normalize x (ndim >= 2); returns a new array of x's shape."""
        x, n, d = _checks.batch(x)
        eps = _checks.check_eps(self.eps)
        gamma = _checks.operand(self.gamma, "gamma", d, x.shape)
        beta = _checks.operand(self.beta, "beta", d, x.shape)
        running_mean, running_var = self._running(d, x.shape)
        if train_flg:
            return self._forward_train(x, n, d, eps, gamma, beta, running_mean, running_var)
        return self._forward_eval(x, n, d, eps, gamma, beta, running_mean, running_var)

    def _forward_train(self, x: np.ndarray, n: int, d: int, eps: float, gamma: Any, beta: Any,
                       running_mean: Any, running_var: Any) -> np.ndarray:
        momentum = self.momentum
        _checks.check_momentum(momentum)
        dts = _dtypes.train(x.dtype, gamma, beta, momentum, running_mean, running_var)
        kernel_dt = _checks.kernel_dtype(x.dtype)
        xk = _checks.for_kernel(x, kernel_dt)
        if xk is x:
            # The caller's array: copy it into our buffer during the statistics pass.
            cache = self._buffer
            if cache is None or cache.shape != (n, d) or cache.dtype != kernel_dt:
                cache = np.empty((n, d), kernel_dt)
        else:
            cache = None  # xk is already our own converted copy
        result, target = result_buffers(x.shape, dts.out, None, "out", ())
        stats = np.empty((3, d))
        in_kernel = dts.running_mean == F64 and dts.running_var == F64
        if in_kernel:
            rm_old = _checks.kernel_vector(running_mean)
            rv_old = _checks.kernel_vector(running_var)
            rm_new = np.empty(d)
            rv_new = np.empty(d)
        else:
            rm_old = rv_old = rm_new = rv_new = None
        _kernels.train_forward(xk, cache, target, n, d, _checks.kernel_vector(gamma),
                               _checks.kernel_vector(beta), eps, stats[0], stats[1], stats[2],
                               rm_old, rm_new, rv_old, rv_new,
                               float(momentum), float(1 - momentum))
        if not in_kernel:
            rm_new, rv_new = running_update(momentum, running_mean, running_var,
                                            stats[0], stats[1], dts.stat)
        if cache is not None:
            self._buffer = cache
        self._train = _TrainCache(cache if cache is not None else xk, x.dtype, n, d, x.shape,
                                  stats, dts.stat, eps)
        self._last_train = True
        self.input_shape = x.shape
        self.batch_size = n
        self.running_mean = rm_new
        self.running_var = rv_new
        return finish(result, target)

    def _forward_eval(self, x: np.ndarray, n: int, d: int, eps: float, gamma: Any, beta: Any,
                      running_mean: Any, running_var: Any) -> np.ndarray:
        dts = _dtypes.evaluate(x.dtype, gamma, beta, running_mean, running_var)
        xk = _checks.for_kernel(x, _checks.kernel_dtype(x.dtype))
        result, target = result_buffers(x.shape, dts.out, None, "out", ())
        rm = _checks.kernel_vector(running_mean)
        rv = _checks.kernel_vector(running_var)
        _kernels.eval_forward(xk, target, n, d, _checks.kernel_vector(gamma),
                              _checks.kernel_vector(beta), rm, rv, eps)
        self._eval = _EvalCache(xk, x.dtype, n, d, x.shape, running_mean, running_var, eps)
        self._last_train = False
        self.input_shape = x.shape
        if self.running_mean is None:
            self.running_mean = running_mean
            self.running_var = running_var
        return finish(result, target)

    def backward(self, dout: Any) -> np.ndarray:
        """Gradient with respect to the last forward's input; sets dgamma, dbeta."""
        if self._last_train is None:
            raise RuntimeError("backward() called before any forward(); call forward(x) first")
        cache = self._train if self._last_train else self._eval
        assert cache is not None
        dout = check_dout(dout, cache.shape, cache.n, cache.d)
        gamma = _checks.operand(self.gamma, "gamma", cache.d, cache.shape)
        if self._last_train:
            dts = _dtypes.grads(True, cache.x_dtype, gamma, dout.dtype)
        else:
            dts = _dtypes.grads(False, cache.x_dtype, gamma, dout.dtype,
                                cache.running_mean, cache.running_var)
        result, target = result_buffers(cache.shape, dts.dx, None, "dx", ())
        xk, dk = same_kernel_dtype(cache.x, dout)
        dgamma, dbeta = grad_buffers(cache.d, dts)
        gk = _checks.kernel_vector(gamma)
        if self._last_train:
            stats = self._train.stats
            _kernels.train_backward(xk, dk, target, cache.n, cache.d, stats[0], stats[2], gk,
                                    dgamma, dbeta)
        else:
            _kernels.eval_backward(xk, dk, target, cache.n, cache.d, gk,
                                   _checks.kernel_vector(cache.running_mean),
                                   _checks.kernel_vector(cache.running_var), cache.eps,
                                   dgamma, dbeta)
        self.dgamma, self.dbeta = grads_as(dgamma, dbeta, dts)
        return finish(result, target)
