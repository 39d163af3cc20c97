"""The Numba peer of bnfast-bench: batch normalization as a Numba user writes it.

What a competent user writes without tuning for one machine: ``@njit(parallel
=True)``, loops in row-major order (the innermost index walks contiguous
memory), float64 sums, no ``fastmath``, and two passes over the data (the
statistics, then the output).  The statistics are sums shifted by the first
row's values, so that ``E[(x - s)^2] - E[x - s]^2`` does not cancel.  Row
chunks (one per thread) keep partial sums that are added in chunk order.

Two layouts, so that no layout needs a transpose:

* rows (N, D): statistics down the columns.  The per-feature grid (the
  flattened batch) and per-channel channels-last batches (whose memory is the
  (N * H * W, C) matrix) both run this way;
* planes (N, C, S): per-channel NCHW batches, each (sample, channel) plane of
  S = H * W values one task.  Without fastmath, LLVM may not reorder the
  float64 sum of a plane, so these sums run as one dependent chain per plane.

Each function compiles at its first call for the argument types it gets
(bnfast-bench calls it once before timing it); ``cache=True`` lets later
processes load the machine code from Numba's cache.  This module imports
without Numba (``available()`` is then False and bnfast-bench says "not
installed").
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar, cast

import numpy as np

numba: Any
try:
    numba = importlib.import_module("numba")
except ImportError:     # the module still imports; available() is False
    numba = None
#: Numba's parallel range (a plain range when Numba is not installed).
prange: Any = range if numba is None else numba.prange

__all__ = ["available", "thread_count", "backward_planes", "backward_rows", "eval_planes",
           "eval_rows", "train_planes", "train_rows"]

F = TypeVar("F", bound=Callable[..., Any])


def _jit(function: F) -> F:
    """@njit(parallel=True), compiled at the first call for its argument types
    (cache=True: later processes load the machine code from Numba's cache)."""
    if numba is None:
        return function
    return cast(F, numba.njit(parallel=True, cache=True)(function))


def available() -> bool:
    return numba is not None


def thread_count() -> int:
    """Numba's thread count: the rows kernels' `chunks` argument."""
    assert numba is not None
    return int(numba.get_num_threads())


# --------------------------------------------------------------------------
# rows: x is (N, D), statistics per column


@_jit
def _sums_rows(x: Any, shift: Any, chunks: int) -> Any:
    """(2, D): sums of x - shift and of its square, per column."""
    n, d = x.shape
    part = np.zeros((chunks, 2, d))
    for c in prange(chunks):
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            for j in range(d):
                v = x[i, j] - shift[j]
                part[c, 0, j] += v
                part[c, 1, j] += v * v
    total = np.zeros((2, d))
    for c in range(chunks):
        total += part[c]
    return total


@_jit
def _affine_rows(x: Any, center: Any, scale: Any, beta: Any) -> Any:
    """(x - center) * scale + beta, per column, in x's dtype."""
    n, d = x.shape
    out = np.empty_like(x)
    for i in prange(n):
        for j in range(d):
            out[i, j] = (x[i, j] - center[j]) * scale[j] + beta[j]
    return out


@_jit
def train_rows(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
               eps: float, momentum: float, chunks: int) -> Any:
    """Training forward: (out, mean, invstd, new running mean, new running var)."""
    n, d = x.shape
    shift = x[0].astype(np.float64)
    sums = _sums_rows(x, shift, chunks)
    mean = np.empty(d)
    var = np.empty(d)
    for j in range(d):
        m = sums[0, j] / n
        mean[j] = shift[j] + m
        var[j] = max(sums[1, j] / n - m * m, 0.0)
    invstd = 1.0 / np.sqrt(var + eps)
    out = _affine_rows(x, mean, gamma * invstd, beta)
    new_mean = (momentum * running_mean + (1.0 - momentum) * mean).astype(running_mean.dtype)
    new_var = (momentum * running_var + (1.0 - momentum) * var).astype(running_var.dtype)
    return out, mean, invstd, new_mean, new_var


@_jit
def eval_rows(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
              eps: float) -> Any:
    """Eval-mode forward with the running statistics."""
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    return _affine_rows(x, running_mean.astype(np.float64), gamma * invstd, beta)


@_jit
def backward_rows(x: Any, dy: Any, mean: Any, invstd: Any, gamma: Any, chunks: int) -> Any:
    """Backward of the training forward: (dx, dgamma, dbeta)."""
    n, d = x.shape
    part = np.zeros((chunks, 2, d))
    for c in prange(chunks):
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            for j in range(d):
                part[c, 0, j] += dy[i, j]
                part[c, 1, j] += dy[i, j] * ((x[i, j] - mean[j]) * invstd[j])
    sums = np.zeros((2, d))
    for c in range(chunks):
        sums += part[c]
    dbeta, dgamma = sums[0], sums[1]
    k = gamma * invstd
    dx = np.empty_like(dy)
    for i in prange(n):
        for j in range(d):
            xhat = (x[i, j] - mean[j]) * invstd[j]
            dx[i, j] = k[j] * (dy[i, j] - (dbeta[j] + xhat * dgamma[j]) / n)
    return dx, dgamma.astype(dy.dtype), dbeta.astype(dy.dtype)


# --------------------------------------------------------------------------
# planes: x is (N, C, S), statistics per channel over N and S


@_jit
def _sums_planes(x: Any, shift: Any) -> Any:
    """(2, C): sums of x - shift and of its square, per channel."""
    n, c, s = x.shape
    part = np.zeros((n * c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        a = 0.0
        b = 0.0
        for t in range(s):
            v = x[i, ch, t] - shift[ch]
            a += v
            b += v * v
        part[p, 0] = a
        part[p, 1] = b
    total = np.zeros((2, c))
    for p in range(n * c):
        total[0, p % c] += part[p, 0]
        total[1, p % c] += part[p, 1]
    return total


@_jit
def _affine_planes(x: Any, center: Any, scale: Any, beta: Any) -> Any:
    n, c, s = x.shape
    out = np.empty_like(x)
    for p in prange(n * c):
        i, ch = p // c, p % c
        for t in range(s):
            out[i, ch, t] = (x[i, ch, t] - center[ch]) * scale[ch] + beta[ch]
    return out


@_jit
def train_planes(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                 eps: float, momentum: float) -> Any:
    n, c, s = x.shape
    count = n * s
    shift = x[0, :, 0].astype(np.float64)
    sums = _sums_planes(x, shift)
    mean = np.empty(c)
    var = np.empty(c)
    for j in range(c):
        m = sums[0, j] / count
        mean[j] = shift[j] + m
        var[j] = max(sums[1, j] / count - m * m, 0.0)
    invstd = 1.0 / np.sqrt(var + eps)
    out = _affine_planes(x, mean, gamma * invstd, beta)
    new_mean = (momentum * running_mean + (1.0 - momentum) * mean).astype(running_mean.dtype)
    new_var = (momentum * running_var + (1.0 - momentum) * var).astype(running_var.dtype)
    return out, mean, invstd, new_mean, new_var


@_jit
def eval_planes(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                eps: float) -> Any:
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    return _affine_planes(x, running_mean.astype(np.float64), gamma * invstd, beta)


@_jit
def backward_planes(x: Any, dy: Any, mean: Any, invstd: Any, gamma: Any) -> Any:
    n, c, s = x.shape
    count = n * s
    part = np.zeros((n * c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        a = 0.0
        b = 0.0
        for t in range(s):
            g = dy[i, ch, t]
            a += g
            b += g * ((x[i, ch, t] - mean[ch]) * invstd[ch])
        part[p, 0] = a
        part[p, 1] = b
    dbeta = np.zeros(c)
    dgamma = np.zeros(c)
    for p in range(n * c):
        dbeta[p % c] += part[p, 0]
        dgamma[p % c] += part[p, 1]
    k = gamma * invstd
    dx = np.empty_like(dy)
    for p in prange(n * c):
        i, ch = p // c, p % c
        for t in range(s):
            xhat = (x[i, ch, t] - mean[ch]) * invstd[ch]
            dx[i, ch, t] = k[ch] * (dy[i, ch, t] - (dbeta[ch] + xhat * dgamma[ch]) / count)
    return dx, dgamma.astype(dy.dtype), dbeta.astype(dy.dtype)
