"""The slow twin: batch normalization in plain NumPy, with bnfast's contract.

This is the oracle for the tests and the baseline for the benchmarks.  It does
the same NumPy operations, in the same order and the same dtypes, as the
``BatchNormalization`` class of *Deep Learning from Scratch*, so its numbers
and its speed are those of the class users replace.  It differs from that
class only where bnfast's contract does:

* any input with ``ndim >= 2`` is flattened per sample (the book's class
  unpacks exactly four dimensions, so 3-D and 5-D input fail there);
* ``eps`` is a keyword argument (default ``1e-6``, the book's ``10e-7``);
* ``backward`` after an eval-mode ``forward`` differentiates the eval-mode
  function, with the running statistics held constant.  The book's class
  silently reuses the last training batch's cache there.

and in two options the book's class does not have: ``per_channel=True``
(statistics per channel over the batch and every spatial position of
(N, C, *spatial) input, as PyTorch's BatchNorm2d; ``xc`` and ``xn`` then
have x's shape) and ``running_var_unbiased=True`` (the running variance is
updated with the unbiased batch variance, as PyTorch does).

Per channel, gamma, beta and the running statistics are numbers, (C,)
vectors, or arrays laid out to broadcast against x's channel axis, such as
(1, C, 1, 1) for (N, C, H, W) input.  The arithmetic runs on their values
as (C,) vectors; dgamma, dbeta and the new running statistics come out in
the layout of gamma, beta and the old running statistics (C on the channel
axis), so that ``gamma -= lr * dgamma`` works in place.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BatchNormalization"]


class BatchNormalization:
    """Pure-NumPy batch normalization over flattened features (or per channel)."""

    def __init__(self, gamma: Any, beta: Any, momentum: float = 0.9,
                 running_mean: Any = None, running_var: Any = None, *, eps: float = 1e-6,
                 per_channel: bool = False, running_var_unbiased: bool = False) -> None:
        self.per_channel = per_channel
        self.running_var_unbiased = running_var_unbiased
        self.gamma = gamma
        self.beta = beta
        self.momentum = momentum
        self.eps = eps
        self.input_shape: tuple[int, ...] | None = None
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size: int | None = None
        self._count = 0                  # values per feature in the last training batch
        self.xc: Any = None
        self.xn: Any = None
        self.std: Any = None
        self.dgamma: Any = None
        self.dbeta: Any = None
        # What the last forward was, and the eval-mode pieces its backward needs.
        self._last_train: bool | None = None
        self._eval_xn: Any = None
        self._eval_std: Any = None

    def _rows(self, a: np.ndarray) -> np.ndarray:
        """The (values, features) view the statistics run down: (N, D) flat,
        (N * S, C) per channel."""
        if self.per_channel:
            return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
        return a.reshape(a.shape[0], -1)

    def _unrows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of _rows, to the input's shape."""
        assert self.input_shape is not None
        shape = self.input_shape
        if self.per_channel:
            return np.moveaxis(rows.reshape((shape[0], *shape[2:], shape[1])), -1, 1)
        return rows.reshape(shape)

    def _per_channel(self, value: Any) -> Any:
        """Per channel: a laid-out operand ((1, C, 1, 1), ...) as its (C,) or
        (1,) vector of values; anything else as it is."""
        if self.per_channel and isinstance(value, np.ndarray) and value.ndim >= 2:
            return value.reshape(-1)
        return value

    def _laid_out(self, result: np.ndarray, like: Any) -> np.ndarray:
        """Per channel: a (C,) result in the layout of the operand it belongs
        to (like's shape with C on x's channel axis, counted from the right)."""
        if not (self.per_channel and isinstance(like, np.ndarray) and like.ndim >= 2):
            return result
        assert self.input_shape is not None
        shape = list(like.shape)
        axis = like.ndim - len(self.input_shape) + 1      # x's axis 1, right-aligned
        if axis >= 0:
            shape[axis] = result.shape[-1]
        else:       # all ones, short of the channel axis: NumPy gives (1, C, 1, ...)
            shape = [1] * len(self.input_shape)
            shape[1] = result.shape[-1]
        return result.reshape(shape)

    def forward(self, x: Any, train_flg: bool = True) -> np.ndarray:
        x = np.asarray(x)
        self.input_shape = x.shape
        rows = self._rows(x)
        if self.running_mean is None:
            features = rows.shape[1]
            self.running_mean = np.zeros(features)
            self.running_var = np.zeros(features)
        if train_flg:
            normalized = self._normalize_batch(rows)
        else:
            normalized = self._normalize_running(rows)
        self._last_train = bool(train_flg)
        out: np.ndarray = (self._per_channel(self.gamma) * normalized
                           + self._per_channel(self.beta))
        return self._unrows(out)

    def _normalize_batch(self, rows: np.ndarray) -> np.ndarray:
        mean = rows.mean(axis=0)
        centered = rows - mean
        var = np.mean(centered ** 2, axis=0)
        std = np.sqrt(var + self.eps)
        normalized = centered / std
        assert self.input_shape is not None
        self.batch_size = self.input_shape[0]
        self._count = rows.shape[0]
        self.xc = self._unrows(centered) if self.per_channel else centered
        self.xn = self._unrows(normalized) if self.per_channel else normalized
        self.std = std
        keep = self.momentum
        if self.running_var_unbiased:
            var = var * (self._count / (self._count - 1))
        old_mean, old_var = self.running_mean, self.running_var
        self.running_mean = self._laid_out(
            keep * self._per_channel(old_mean) + (1 - keep) * mean, old_mean)
        self.running_var = self._laid_out(
            keep * self._per_channel(old_var) + (1 - keep) * var, old_var)
        result: np.ndarray = normalized
        return result

    def _normalize_running(self, rows: np.ndarray) -> np.ndarray:
        centered = rows - self._per_channel(self.running_mean)
        std = np.sqrt(self._per_channel(self.running_var) + self.eps)
        normalized = centered / std
        self._eval_xn = normalized
        self._eval_std = std
        result: np.ndarray = normalized
        return result

    def backward(self, dout: Any) -> np.ndarray:
        if self._last_train is None:
            raise RuntimeError("backward() called before any forward()")
        dout = np.asarray(dout)
        rows = self._rows(dout.reshape(self.input_shape))
        if self._last_train:
            grad = self._backward_batch(rows)
        else:
            grad = self._backward_running(rows)
        return self._unrows(grad)

    def _backward_batch(self, dout: np.ndarray) -> np.ndarray:
        n = self._count
        xc = self._rows(self.xc) if self.per_channel else self.xc
        xn = self._rows(self.xn) if self.per_channel else self.xn
        self.dbeta = self._laid_out(dout.sum(axis=0), self.beta)
        self.dgamma = self._laid_out(np.sum(xn * dout, axis=0), self.gamma)
        dnormalized = self._per_channel(self.gamma) * dout
        dcentered = dnormalized / self.std
        dstd = -np.sum((dnormalized * xc) / (self.std * self.std), axis=0)
        dvar = 0.5 * dstd / self.std
        dcentered += (2.0 / n) * xc * dvar
        dmean = np.sum(dcentered, axis=0)
        dx: np.ndarray = dcentered - dmean / n
        return dx

    def _backward_running(self, dout: np.ndarray) -> np.ndarray:
        self.dbeta = self._laid_out(dout.sum(axis=0), self.beta)
        self.dgamma = self._laid_out(np.sum(self._eval_xn * dout, axis=0), self.gamma)
        dx: np.ndarray = (self._per_channel(self.gamma) * dout) / self._eval_std
        return dx
