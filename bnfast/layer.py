"""``BatchNormalization``: the drop-in layer, with the reference class's contract.

State lives here; validation and layout come from _checks, result dtypes from
_dtypes, and the work from the kernels.  A call either raises before touching
any state or completes; it never leaves the layer half-updated.

Each method has a fast path for the common case (an aligned, contiguous
float32/float64 batch with parameters of its dtype), where the dtypes are
known without resolution and nothing needs converting, and the general path
that handles everything else.  Both call the same kernels.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _channels, _checks, _dtypes, _outputs
from ._checks import F32, F64
from ._native import kernels as _kernels
from .functional import (check_dout, finish, grad_buffers, grads_as, result_buffers,
                         running_update, same_kernel_dtype)

__all__ = ["BatchNormalization"]

# What the last training forward leaves: (x as the kernels read it -- a
# per-channel Batch in per_channel mode --, the caller's dtype, N, D (or C),
# input shape, float64 rows mean/var/invstd, the reference's statistics
# dtype, eps).
TrainCache = Tuple[Any, np.dtype, int, int, Tuple[int, ...], np.ndarray, np.dtype, float]
# What the last eval-mode forward leaves: (x as the kernels read it, the
# caller's dtype, N, D (or C), input shape, running mean, running var, eps).
EvalCache = Tuple[Any, np.dtype, int, int, Tuple[int, ...], Any, Any, float]

_plain_batch = _kernels.plain_batch
_plain_vector = _kernels.plain_vector
_plain_call = _kernels.plain_call
_plain_channels = _kernels.plain_channels
_empty = np.empty
_new_output = _outputs.empty     # batch-sized results: large ones reuse freed memory


def _dtype_name(value: Any) -> str:
    """'float32' for an array (or NumPy scalar), 'float' for a Python number, 'None'."""
    if value is None:
        return "None"
    dtype = getattr(value, "dtype", None)
    return dtype.name if isinstance(dtype, np.dtype) else type(value).__name__


class BatchNormalization:
    """Batch normalization over flattened features, as in *Deep Learning from Scratch*.

    ``gamma`` and ``beta`` are held by reference and read at every call;
    running statistics are created as float64 zeros at the first forward if
    not given, and every training forward binds new arrays
    ``momentum * old + (1 - momentum) * batch`` (biased batch variance).
    Input of any ndim >= 2 is treated per sample as a flat feature vector.
    ``backward`` after an eval-mode forward returns the gradient of the
    eval-mode function (the one documented difference from the book's class).

    gamma, beta and the running statistics may be numbers or arrays of D
    values shaped (D,) or (1, D) (the book's arithmetic broadcasts both):
    dgamma and dbeta are (D,), as the book's ``sum(axis=0)`` gives them, and
    running statistics keep their shape.  With float32 x, gamma and beta the
    training output is float32, but the eval-mode output is float64 unless
    the running statistics are float32 too: pass
    ``running_mean=np.zeros(D, np.float32), running_var=np.zeros(D, np.float32)``
    to keep a float32 network float32 throughout.

    ``per_channel=True``: x is (N, C, *spatial) and the statistics, gamma,
    beta and running statistics are per channel, over N and every spatial
    position (as PyTorch's BatchNorm2d); NCHW and channels-last input run
    without a copy and outputs keep x's layout.  Per-channel operands are
    numbers, (C,) vectors, or arrays laid out along x's channel axis such as
    (1, C, 1, 1); dgamma, dbeta and new running statistics come in the
    layout of gamma, beta and the old running statistics, so that
    ``gamma -= lr * dgamma`` works in place.  ``running_var_unbiased=True``
    updates running_var with the unbiased batch variance (as PyTorch does).
    """

    def __init__(self, gamma: Any, beta: Any, momentum: float = 0.9,
                 running_mean: Any = None, running_var: Any = None, *,
                 eps: float = 1e-6, per_channel: bool = False,
                 running_var_unbiased: bool = False) -> None:
        for flag, name in ((per_channel, "per_channel"),
                           (running_var_unbiased, "running_var_unbiased")):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {_checks.describe(flag)}")
        self.per_channel = bool(per_channel)
        self.running_var_unbiased = bool(running_var_unbiased)
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
        # The training cache's x lives in bnfast's memory (a copy made in the
        # statistics pass), so later changes to the caller's array do not
        # change the gradient, as in the reference.
        self._train: Optional[TrainCache] = None
        self._views: dict[str, np.ndarray] = {}
        self._eval: Optional[EvalCache] = None
        self._last_train: Optional[bool] = None
        self._buffer: Optional[np.ndarray] = None   # reused for the cached copy of x

    def __repr__(self) -> str:
        unit = "channels" if self.per_channel else "features"
        count = self._count()
        mode = "per channel" if self.per_channel else "per feature"
        if self.running_var_unbiased:
            mode += ", unbiased running_var"
        dtypes = ", ".join(f"{name} {_dtype_name(getattr(self, name, None))}"
                           for name in ("gamma", "beta", "running_mean", "running_var"))
        last = self._train if self._last_train else self._eval
        if last is not None:
            dtypes = f"x {np.dtype(last[1]).name}, " + dtypes
        return (f"{type(self).__name__}({unit}={count}, mode={mode!r}, eps={self.eps!r}, "
                f"momentum={self.momentum!r}, dtypes: {dtypes})")

    def _count(self) -> Optional[int]:
        """The layer's features (channels): from the last forward, else the
        operands that have more than one value; None while unknown."""
        last = self._train if self._last_train else self._eval
        if last is not None:
            return int(last[3])
        for value in (self.gamma, self.beta, self.running_mean, self.running_var):
            size = getattr(value, "size", 1)
            if isinstance(size, int) and size > 1:
                return size
        return None

    # -- the reference's cached intermediates, from the last training forward

    def _view(self, name: str) -> Optional[np.ndarray]:
        """xc, xn (N, D) and std (D,) in the reference's dtype, made once."""
        if self._train is None:
            return None
        found = self._views.get(name)
        if found is None:
            x, _, n, d, _, stats, stat_dtype, eps = self._train
            if name == "std":
                found = np.sqrt(stats[1] + eps).astype(stat_dtype)
            elif isinstance(x, _channels.Batch):
                centered = _channels.centered(x, stats[0])
                if name == "xn":
                    _channels.scale_channels(centered, stats[2])
                found = centered.astype(stat_dtype, copy=False)
            else:
                centered = x.reshape(n, d) - stats[0]
                if name == "xn":
                    centered *= stats[2]
                found = centered.astype(stat_dtype, copy=False)
            self._views[name] = found
        return found

    @property
    def xc(self) -> Optional[np.ndarray]:
        """x - batch mean, shape (N, D) (x's shape per channel), from the last training forward."""
        return self._view("xc")

    @property
    def xn(self) -> Optional[np.ndarray]:
        """Normalized batch, shape (N, D), from the last training forward."""
        return self._view("xn")

    @property
    def std(self) -> Optional[np.ndarray]:
        """sqrt(batch var + eps), shape (D,), from the last training forward."""
        return self._view("std")

    # -- forward

    def forward(self, x: Any, train_flg: bool = True) -> np.ndarray:
        """Normalize a batch; returns a new array of x's shape.

        Parameters
        ----------
        x : array_like, ndim >= 2
            The batch, (N, D) or (N, *features) flattened per sample to
            D = prod(x.shape[1:]) features; with ``per_channel=True``,
            (N, C, *spatial).  Any real dtype; x itself is never modified.
        train_flg : bool, default True
            True (training): normalize with this batch's mean and (biased)
            variance, update running_mean and running_var as
            ``momentum * old + (1 - momentum) * batch`` (new arrays), and
            keep what ``backward`` needs (``xc``, ``xn``, ``std``).
            False (inference): normalize with running_mean and running_var
            (float64 zeros if unset), changing no statistics.

        Returns
        -------
        numpy.ndarray
            ``gamma * (x - mean) / sqrt(var + eps) + beta`` in x's shape (and,
            per channel, x's memory layout), in the dtype the book's NumPy
            arithmetic gives.

        Raises
        ------
        ValueError, TypeError
            For input the book's arithmetic could not run, naming the
            argument and the shapes; the layer's state is then unchanged.
        """
        if self.per_channel:
            return self._forward_channels_plain(x, train_flg)
        gamma, beta = self.gamma, self.beta
        rm, rv, eps = self.running_mean, self.running_var, self.eps
        plain = not self.running_var_unbiased and _plain_call(x, gamma, beta, rm, rv)
        if plain and type(eps) is float and 0.0 <= eps < math.inf:
            d = plain >> 1
            wide = F64 if plain & 1 else F32
            if rm is None or rv is None:     # both None (plain_call checked)
                rm, rv = np.zeros(d), np.zeros(d)
            if not train_flg:
                return self._eval_plain(x, d, gamma, beta, rm, rv, eps, wide)
            if type(self.momentum) is float:
                return self._train_plain(x, d, gamma, beta, rm, rv, eps, wide)
        return self._forward_general(x, train_flg)

    def _train_plain(self, x: np.ndarray, d: int, gamma: np.ndarray, beta: np.ndarray,
                     rm: np.ndarray, rv: np.ndarray, eps: float, wide: np.dtype) -> np.ndarray:
        """Training forward, everything float32/float64 and laid out already.
        wide: the dtype of the new running statistics."""
        xdt = x.dtype
        n = x.shape[0]
        rm_new = _empty(d, wide)
        rv_new = _empty(d, wide)
        y = _new_output(x.shape, xdt)
        stats = _empty((3, d))
        buffer = self._buffer
        if buffer is None or buffer.shape != (n, d) or buffer.dtype != xdt:
            buffer = _empty((n, d), xdt)
        momentum = self.momentum
        _kernels.train_forward(x, buffer, y, n, d, gamma, beta, eps, stats[0], stats[1],
                               stats[2], rm, rm_new, rv, rv_new, momentum, 1 - momentum)
        self._buffer = buffer
        self._commit_train((buffer, xdt, n, d, x.shape, stats, xdt, eps), rm_new, rv_new)
        return y

    def _eval_plain(self, x: np.ndarray, d: int, gamma: np.ndarray, beta: np.ndarray,
                    rm: np.ndarray, rv: np.ndarray, eps: float, wide: np.dtype) -> np.ndarray:
        """Eval-mode forward, everything float32/float64 and laid out already.
        wide: the output dtype ((x - rm) / sqrt(rv + eps) is float32 only if
        x, rm and rv all are)."""
        y = _new_output(x.shape, wide)
        n = x.shape[0]
        _kernels.eval_forward(x, y, n, d, gamma, beta, rm, rv, eps)
        self._commit_eval((x, x.dtype, n, d, x.shape, rm, rv, eps), rm, rv)
        return y

    def _running(self, d: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """The running statistics to use: checked, or fresh zeros if unset."""
        pair = _checks.running_pair(self.running_mean, self.running_var, d, shape,
                                    self.per_channel)
        return pair if pair is not None else (np.zeros(d), np.zeros(d))

    def _laid_out(self, new: np.ndarray, old: Any, d: int, x_ndim: int) -> np.ndarray:
        """A new per-feature (per-channel) result in the layout of the operand
        `old` it replaces or belongs to, as the reference's arithmetic gives it."""
        return new.reshape(_checks.unit_shape(old, d, x_ndim, self.per_channel))

    def _grads_laid_out(self, dgamma: np.ndarray, dbeta: np.ndarray, gamma: Any, beta: Any,
                        d: int, x_ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """dgamma and dbeta as the reference gives them: (D,) per feature, as
        the book's sum(axis=0); per channel in the layout of gamma and beta, so
        that ``gamma -= lr * dgamma`` works for a (1, C, 1, 1) gamma."""
        if not self.per_channel:
            return dgamma, dbeta
        return self._laid_out(dgamma, gamma, d, x_ndim), self._laid_out(dbeta, beta, d, x_ndim)

    def _forward_general(self, x: Any, train_flg: bool) -> np.ndarray:
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
        correction = _channels.var_correction(self.running_var_unbiased, n, "feature")
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
        in_kernel = dts.running_mean in (F32, F64) and dts.running_var in (F32, F64)
        rm_old: Optional[np.ndarray] = None
        rv_old: Optional[np.ndarray] = None
        rm_new: Optional[np.ndarray] = None
        rv_new: Optional[np.ndarray] = None
        if in_kernel:
            rm_old = _checks.kernel_vector(running_mean)
            rv_old = _checks.kernel_vector(running_var)
            rm_new = np.empty(d, dts.running_mean)
            rv_new = np.empty(d, dts.running_var)
        _kernels.train_forward(xk, cache, target, n, d, _checks.kernel_vector(gamma),
                               _checks.kernel_vector(beta), eps, stats[0], stats[1], stats[2],
                               rm_old, rm_new, rv_old, rv_new,
                               float(momentum), float(1 - momentum), correction)
        if not in_kernel:
            rm_new, rv_new = running_update(momentum, running_mean, running_var,
                                            stats[0], stats[1] * correction, dts.stat)
        assert rm_new is not None and rv_new is not None
        rm_new = self._laid_out(rm_new, self.running_mean, d, x.ndim)
        rv_new = self._laid_out(rv_new, self.running_var, d, x.ndim)
        if cache is not None:
            self._buffer = cache
        self._commit_train((cache if cache is not None else xk, x.dtype, n, d, x.shape, stats,
                            dts.stat, eps), rm_new, rv_new)
        return finish(result, target)

    def _commit_train(self, cache: TrainCache, running_mean: Any, running_var: Any) -> None:
        """The state a completed training forward leaves (all of it, at once)."""
        self._train = cache
        self._views = {}
        self._last_train = True
        self.input_shape = cache[4]
        self.batch_size = cache[2]
        self.running_mean = running_mean
        self.running_var = running_var

    def _commit_eval(self, cache: EvalCache, running_mean: Any, running_var: Any) -> None:
        """The state a completed eval-mode forward leaves; running statistics
        that were unset become the ones it used (given as separate arrays)."""
        self._eval = cache
        self._last_train = False
        self.input_shape = cache[4]
        if self.running_mean is None:
            self.running_mean, self.running_var = running_mean, running_var

    def _forward_eval(self, x: np.ndarray, n: int, d: int, eps: float, gamma: Any, beta: Any,
                      running_mean: Any, running_var: Any) -> np.ndarray:
        dts = _dtypes.evaluate(x.dtype, gamma, beta, running_mean, running_var)
        xk = _checks.for_kernel(x, _checks.kernel_dtype(x.dtype))
        result, target = result_buffers(x.shape, dts.out, None, "out", ())
        _kernels.eval_forward(xk, target, n, d, _checks.kernel_vector(gamma),
                              _checks.kernel_vector(beta), _checks.kernel_vector(running_mean),
                              _checks.kernel_vector(running_var), eps)
        self._commit_eval((xk, x.dtype, n, d, x.shape, running_mean, running_var, eps),
                          running_mean, running_var)
        return finish(result, target)

    # -- backward

    def backward(self, dout: Any) -> np.ndarray:
        """Gradient with respect to the last forward's input; sets dgamma, dbeta.

        Parameters
        ----------
        dout : array_like
            The gradient of the loss with respect to the last forward's
            output: that output's shape (per feature, also its flattened
            (N, D) shape).

        Returns
        -------
        numpy.ndarray
            dx, of the last forward's input shape.  After a training forward,
            the gradient through the batch statistics (as the book's class);
            after an eval-mode forward, the gradient of the eval-mode
            function with the running statistics held constant.

        Raises
        ------
        RuntimeError
            If no forward has run yet.
        ValueError, TypeError
            For a dout that does not fit the last forward; nothing changes.
        """
        # Read the mode and its cache once: everything below uses these.
        last_train = self._last_train
        if last_train is None:
            raise RuntimeError("backward() called before any forward(); call forward(x) first")
        cache = self._train if last_train else self._eval
        assert cache is not None, "set by the forward that set _last_train"
        if self.per_channel:
            return self._backward_channels(dout, last_train, cache)
        if last_train:
            x, x_dtype, n, d, shape, stats, _, _ = cache
            gamma = self.gamma
            if (_plain_batch(dout) == d and dout.dtype == x_dtype and x.dtype == x_dtype
                    and (dout.shape == shape or dout.shape == (n, d))
                    and _plain_vector(gamma, d, x)
                    and (n < _dtypes.WIDENING_COUNT or x_dtype == F64)):
                dx = _new_output(shape, x_dtype)
                dgamma = _empty(d, x_dtype)
                dbeta = _empty(d, x_dtype)
                _kernels.train_backward(x, dout, dx, n, d, stats[0], stats[2], gamma,
                                        dgamma, dbeta)
                self.dgamma = dgamma
                self.dbeta = dbeta
                return dx
        return self._backward_general(dout, last_train, cache)

    def _backward_general(self, dout: Any, last_train: bool,
                          cache: Union[TrainCache, EvalCache]) -> np.ndarray:
        if last_train:
            x, x_dtype, n, d, shape, stats, _, _ = cache
            running_mean = running_var = None
            eps = 0.0
        else:
            x, x_dtype, n, d, shape, running_mean, running_var, eps = cache
        dout = check_dout(dout, shape, n, d)
        gamma = _checks.operand(self.gamma, "gamma", d, shape)
        dts = _dtypes.grads(last_train, x_dtype, gamma, dout.dtype, running_mean, running_var,
                            count=n)
        result, target = result_buffers(shape, dts.dx, None, "dx", ())
        xk, dk = same_kernel_dtype(x, dout)
        dgamma, dbeta = grad_buffers(d, dts)
        gk = _checks.kernel_vector(gamma)
        if last_train:
            _kernels.train_backward(xk, dk, target, n, d, stats[0], stats[2], gk, dgamma, dbeta)
        else:
            _kernels.eval_backward(xk, dk, target, n, d, gk, _checks.kernel_vector(running_mean),
                                   _checks.kernel_vector(running_var), eps, dgamma, dbeta)
        self.dgamma, self.dbeta = grads_as(dgamma, dbeta, dts)
        return finish(result, target)

    # -- per-channel mode (per_channel=True): x is (N, C, *spatial)

    def _forward_channels_plain(self, x: Any, train_flg: bool) -> np.ndarray:
        """The fast path for NCHW-contiguous and channels-last float32/float64
        batches with parameters of their dtype (as forward's); everything
        else, and every error, goes through _forward_channels."""
        gamma, beta = self.gamma, self.beta
        rm, rv, eps = self.running_mean, self.running_var, self.eps
        plain = _plain_call(x, gamma, beta, rm, rv, True)
        if not (plain and type(eps) is float and 0.0 <= eps < math.inf
                and type(self.momentum) is float):
            return self._forward_channels(x, train_flg)
        c = plain >> 2
        wide = F64 if plain & 1 else F32
        n = x.shape[0]
        s = x.size // (n * c)
        correction = 1.0
        if self.running_var_unbiased:
            if n * s < 2:
                return self._forward_channels(x, train_flg)     # raises
            correction = n * s / (n * s - 1)
        if rm is None or rv is None:
            rm, rv = np.zeros(c), np.zeros(c)
        layout = _channels.ROWS if plain & 2 else _channels.PLANES
        xk = _channels.channels_to_last(x) if plain & 2 else x
        batch = _channels.Batch(xk, layout, x.shape, n, c, s)
        if not train_flg:
            y, target = _channels.output(batch, wide)
            _channels.eval_forward(batch, target, gamma, beta, rm, rv, eps)
            self._commit_eval((batch, x.dtype, n, c, x.shape, rm, rv, eps), rm, rv)
            return y
        xdt = x.dtype
        y, target = _channels.output(batch, xdt)
        stats = _empty((3, c))
        rm_new = _empty(c, wide)
        rv_new = _empty(c, wide)
        buffer = self._buffer
        if buffer is None or buffer.shape != xk.shape or buffer.dtype != xdt:
            buffer = _empty(xk.shape, xdt)
        _channels.train_forward(batch, buffer, target, gamma, beta, eps, stats, rm, rm_new, rv,
                                rv_new, self.momentum, correction)
        self._buffer = buffer
        self._commit_train((batch._replace(array=buffer), xdt, n, c, x.shape, stats, xdt, eps),
                           rm_new, rv_new)
        return y

    def _forward_channels(self, x: Any, train_flg: bool) -> np.ndarray:
        x, n, c, s = _channels.batch(x)
        eps = _checks.check_eps(self.eps)
        gamma = _checks.operand(self.gamma, "gamma", c, x.shape, per_channel=True)
        beta = _checks.operand(self.beta, "beta", c, x.shape, per_channel=True)
        running_mean, running_var = self._running(c, x.shape)
        if not train_flg:
            out_dt = _dtypes.evaluate(x.dtype, gamma, beta, running_mean, running_var).out
            b = _channels.for_kernel(x, n, c, s)
            result, target = _channels.result_buffers(b, out_dt, None, "out", ())
            _channels.eval_forward(b, target, _checks.kernel_vector(gamma),
                                   _checks.kernel_vector(beta),
                                   _checks.kernel_vector(running_mean),
                                   _checks.kernel_vector(running_var), eps)
            self._commit_eval((b, x.dtype, n, c, x.shape, running_mean, running_var, eps),
                              running_mean, running_var)
            return _channels.finish(b, result, target)
        momentum = self.momentum
        _checks.check_momentum(momentum)
        correction = _channels.var_correction(self.running_var_unbiased, n * s, "channel")
        dts = _dtypes.train(x.dtype, gamma, beta, momentum, running_mean, running_var)
        b = _channels.for_kernel(x, n, c, s)
        cache = None
        if np.may_share_memory(b.array, x):
            # The caller's memory: copy it into our buffer in the statistics pass.
            cache = self._buffer
            if cache is None or cache.shape != b.array.shape or cache.dtype != b.array.dtype:
                cache = np.empty(b.array.shape, b.array.dtype)
        result, target = _channels.result_buffers(b, dts.out, None, "out", ())
        stats = np.empty((3, c))
        in_kernel = dts.running_mean in (F32, F64) and dts.running_var in (F32, F64)
        rm_new = np.empty(c, dts.running_mean) if in_kernel else None
        rv_new = np.empty(c, dts.running_var) if in_kernel else None
        _channels.train_forward(
            b, cache, target, _checks.kernel_vector(gamma), _checks.kernel_vector(beta), eps,
            stats, _checks.kernel_vector(running_mean) if in_kernel else None, rm_new,
            _checks.kernel_vector(running_var) if in_kernel else None, rv_new, float(momentum),
            correction)
        if not in_kernel:
            rm_new, rv_new = running_update(momentum, running_mean, running_var, stats[0],
                                            stats[1] * correction, dts.stat)
        assert rm_new is not None and rv_new is not None
        rm_new = self._laid_out(rm_new, self.running_mean, c, x.ndim)
        rv_new = self._laid_out(rv_new, self.running_var, c, x.ndim)
        if cache is not None:
            self._buffer = cache
            b = _channels.Batch(cache, b.layout, b.shape, n, c, s)
        self._commit_train((b, x.dtype, n, c, x.shape, stats, dts.stat, eps), rm_new, rv_new)
        return _channels.finish(b, result, target)

    def _backward_channels(self, dout: Any, last_train: bool,
                           cache: Union[TrainCache, EvalCache]) -> np.ndarray:
        b, x_dtype, _, c, shape = cache[:5]
        gamma = given_gamma = self.gamma
        beta = self.beta
        if (last_train and _plain_channels(dout) == 2 * c + (b.layout == _channels.ROWS)
                and dout.shape == shape and dout.dtype == x_dtype == b.array.dtype
                and _plain_vector(gamma, c, b.array)
                and not (type(beta) is np.ndarray and beta.ndim > 1)
                and (b.rows < _dtypes.WIDENING_COUNT or x_dtype == F64)):
            stats = cache[5]
            dx, target = _channels.output(b, x_dtype)
            dgamma = _empty(c, x_dtype)
            dbeta = _empty(c, x_dtype)
            dk = _channels.channels_to_last(dout) if b.layout == _channels.ROWS else dout
            _channels.train_backward(b, dk, target, stats[0], stats[2], gamma, dgamma, dbeta)
            self.dgamma = dgamma
            self.dbeta = dbeta
            return dx
        dout = _channels.check_dout(dout, shape)
        gamma = _checks.operand(given_gamma, "gamma", c, shape, per_channel=True)
        if last_train:
            stats = cache[5]
            dts = _dtypes.grads(True, x_dtype, gamma, dout.dtype, count=b.rows)
        else:
            running_mean, running_var, eps = cache[5], cache[6], cache[7]
            dts = _dtypes.grads(False, x_dtype, gamma, dout.dtype, running_mean, running_var,
                                count=b.rows)
        b, dk = _channels.same_dtype(b, dout)
        result, target = _channels.result_buffers(b, dts.dx, None, "dx", ())
        dgamma, dbeta = grad_buffers(c, dts)
        if last_train:
            _channels.train_backward(b, dk, target, stats[0], stats[2],
                                     _checks.kernel_vector(gamma), dgamma, dbeta)
        else:
            _channels.eval_backward(b, dk, target, _checks.kernel_vector(gamma),
                                    _checks.kernel_vector(running_mean),
                                    _checks.kernel_vector(running_var), eps, dgamma, dbeta)
        self.dgamma, self.dbeta = self._grads_laid_out(*grads_as(dgamma, dbeta, dts), given_gamma,
                                                       beta, c, len(shape))
        return _channels.finish(b, result, target)
