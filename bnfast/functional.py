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
given ones, and batch statistics, dgamma and dbeta are (D,) ((C,)) vectors.
``out=`` takes an array of x's shape and exactly the result dtype,
C-contiguous (per channel: laid out like x), not overlapping any input; the
per-feature results are always fresh arrays.

Each function is one plan (bnfast._checks: validation, dtypes, layout and
results decided at once) carried out by one kernel call;
``BatchNormalization`` (bnfast.layer) runs the same plans.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _channels, _checks
from ._channels import Batch
from ._checks import F64
from ._native import kernels as _kernels

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
    result, plan, _ = _checks.plan_forward(
        x, gamma, beta, running_mean, running_var, _checks.check_eps(eps), momentum,
        _checks.check_momentum(momentum), True, _checks.check_flag(per_channel, "per_channel"),
        running_var_unbiased, out=out, running="optional")
    stats = plan[_checks.STATS]
    return TrainResult(result, stats[0], stats[1], plan[_checks.RUNNING_MEAN],
                       plan[_checks.RUNNING_VAR])


def forward_eval(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any, *,
                 eps: float = 1e-6, out: Optional[np.ndarray] = None,
                 per_channel: bool = False) -> np.ndarray:
    """gamma * (x - running_mean) / sqrt(running_var + eps) + beta (per
    feature, or per channel of (N, C, *spatial) input)."""
    result: np.ndarray = _checks.plan_forward(
        x, gamma, beta, running_mean, running_var, _checks.check_eps(eps), None, 0.0, False,
        _checks.check_flag(per_channel, "per_channel"), out=out, running="required")[0]
    return result


def _backward(plan: _checks.Plan, dout: Any, gamma: Any, out: Any,
              inputs: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] = _checks.plan_backward(
        plan, dout, gamma, out=out, inputs=inputs)
    return grads


def backward_train(dout: Any, x: Any, mean: Any, var: Any, gamma: Any, *, eps: float = 1e-6,
                   out: Optional[np.ndarray] = None,
                   per_channel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dx, dgamma, dbeta) of the training forward.

    ``mean`` and ``var`` are the batch statistics that forward_train returned
    for this x (any real dtype; used in float64), ``dout`` the gradient of
    its output.  dgamma and dbeta are (D,) ((C,)) vectors.
    """
    plan = _checks.train_plan_of(x, mean, var, eps,
                                 _checks.check_flag(per_channel, "per_channel"))
    return _backward(plan, dout, gamma, out, (x, mean, var))


def backward_eval(dout: Any, x: Any, gamma: Any, running_mean: Any, running_var: Any, *,
                  eps: float = 1e-6, out: Optional[np.ndarray] = None,
                  per_channel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dx, dgamma, dbeta) of forward_eval, statistics held constant:
    dx = dout * gamma / sqrt(running_var + eps), dgamma = sum(dout * xn),
    dbeta = sum(dout)."""
    plan = _checks.eval_plan_of(x, running_mean, running_var, eps,
                                _checks.check_flag(per_channel, "per_channel"))
    return _backward(plan, dout, gamma, out, (x, running_mean, running_var))


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


def moments_of(b: Batch, cache: Optional[np.ndarray] = None) -> Moments:
    """batch_moments of a laid-out batch; the kernel copies it into cache
    unless that is None."""
    mean = np.empty(b.c)
    m2 = np.empty(b.c)
    n, c, s = _channels.split_dims(b)
    _kernels.moments(b.array, cache, n, c, mean, m2, s)
    return Moments(b.n * b.s, mean, m2)


def batch_moments(x: Any, *, per_channel: bool = False) -> Moments:
    """(count, mean, M2) per feature of x (ndim >= 2, flattened per sample), or
    per channel of (N, C, *spatial) x with per_channel; float64.

    Computed as the training forward computes its statistics (one pass of
    shifted sums with an exact fallback, float64 accumulation).
    """
    return moments_of(_checks.layout(x, _checks.check_flag(per_channel, "per_channel"))[1])


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
    # A training forward's plan, without running statistics; the affine
    # kernel carries it out with the given statistics instead of the batch's.
    call: _checks.ForwardCall = _checks.plan_forward(
        x, gamma, beta, None, None, _checks.check_eps(eps), 0.9, 0.9, True,
        _checks.check_flag(per_channel, "per_channel"), out=out, running="optional", run=False)
    plan, result, after, source, target, gk, bk = call
    b = _checks.batch_of(plan)
    moments = _moments_for(moments, b.c)
    normalize_into(_channels.with_array(b, source), target, moments, gk, bk, plan[_checks.EPS])
    if after is not None:
        after()
    return result


def normalize_into(b: Batch, target: np.ndarray, moments: Moments, gamma: np.ndarray,
                   beta: np.ndarray, eps: float) -> None:
    """normalize's output for a laid-out batch into the kernels' target view
    (gamma, beta: kernel vectors)."""
    c = b.c
    scale = _invstd(moments, eps) * np.broadcast_to(gamma.astype(F64, copy=False), (c,))
    shift = np.ascontiguousarray(np.broadcast_to(beta.astype(F64, copy=False), (c,)))
    n, c, s = _channels.split_dims(b)
    _kernels.affine(b.array, target, n, c, moments.mean, scale, shift, s)


def _from_moments(x: Any, moments: Any, eps: Any,
                  per_channel: Any) -> tuple[_checks.Plan, Moments]:
    """The plan of a training forward with these (merged) statistics."""
    per_channel = _checks.check_flag(per_channel, "per_channel")
    arr, b = _checks.layout(x, per_channel)
    moments = _moments_for(moments, b.c)
    return _checks.train_plan_of(arr, moments.mean, moments.var, eps, per_channel), moments


def grad_sums(dout: Any, x: Any, moments: Any, *, eps: float = 1e-6,
              per_channel: bool = False) -> GradSums:
    """Per-feature (per-channel) sums of dout and dout * xhat over this shard,
    float64, where xhat = (x - mean) / sqrt(var + eps) with the given (merged)
    statistics."""
    plan, moments = _from_moments(x, moments, eps, per_channel)
    xk, dk = _checks.with_dout(plan, dout)
    return grad_sums_of(_channels.with_array(_checks.batch_of(plan), xk), dk, moments,
                        plan[_checks.EPS])


def grad_sums_of(b: Batch, dk: np.ndarray, moments: Moments, eps: float) -> GradSums:
    """grad_sums of a laid-out batch and its laid-out dout."""
    sum_dout = np.empty(b.c)
    sum_dout_xc = np.empty(b.c)
    n, c, s = _channels.split_dims(b)
    _kernels.grad_sums(b.array, dk, n, c, moments.mean, sum_dout, sum_dout_xc, s)
    return GradSums(b.n * b.s, sum_dout, sum_dout_xc * _invstd(moments, eps))


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
    plan, moments = _from_moments(x, moments, eps, per_channel)
    sums = _grad_sums_for(sums, plan[_checks.C])
    if sums.count != moments.count:
        raise ValueError(f"sums.count is {sums.count} but moments.count is {moments.count}; "
                         f"both must count the whole (merged) batch")
    call: _checks.BackwardCall = _checks.plan_backward(
        plan, dout, gamma, out=out, inputs=(x, moments.mean, moments.m2), count=moments.count,
        run=False)
    grad_input_into(plan, call, moments, sums, plan[_checks.EPS])
    return call[0], call[2], call[3]


def grad_input_into(plan: _checks.Plan, call: _checks.BackwardCall, moments: Moments,
                    sums: GradSums, eps: float) -> None:
    """Carry out a backward plan with merged statistics and sums (the split
    phases' last step) instead of the shard's own: dx, dgamma and dbeta (the
    sums) into the plan's results."""
    dx, _, dgamma, dbeta, xk, dk, target, gk = call
    b = _checks.batch_of(plan)
    invstd = _invstd(moments, eps)
    count = float(sums.count)
    k = np.broadcast_to(gk.astype(F64, copy=False), (b.c,)) * invstd
    k_xc = invstd * (sums.sum_dout_xhat / count)
    mean_dout = sums.sum_dout / count
    n, c, s = _channels.split_dims(b)
    _kernels.grad_input(xk, dk, target, n, c, moments.mean, mean_dout, k_xc, k, s)
    if target.dtype != dx.dtype:       # a float16 dx, from its float32 stand-in
        np.copyto(_channels.kernel_view(b.layout, dx), target, casting="unsafe")
    np.copyto(dgamma.reshape(-1), sums.sum_dout_xhat, casting="unsafe")
    np.copyto(dbeta.reshape(-1), sums.sum_dout, casting="unsafe")
