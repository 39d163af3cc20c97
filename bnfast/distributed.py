"""``SyncBatchNormalization``: batch normalization over a batch split across processes.

Each process (MPI rank) passes its own shard of the batch; the statistics are
those of the whole (concatenated) batch, so every rank's output, gradients
and running statistics are what one ``BatchNormalization`` computes on the
whole batch, to rounding.  Built on the split-phase functions of
bnfast.functional:

  forward (training):  local (count, mean, M2) -> one allgather -> merge in
                       rank order -> normalize the shard
  backward (training): local sums of dout and dout * xhat -> one allgather
                       -> add in rank order -> dx of the shard

Merging in rank order (not with a reduction whose order depends on the MPI
library or on message timing) gives every rank bitwise-identical statistics,
dgamma and dbeta.  Each exchange also carries every rank's shapes, dtypes and
settings (or the error its input raised), so a mismatch or a bad input on
one rank raises on every rank instead of deadlocking a collective.

mpi4py is imported only when a layer is made without ``comm``; any object
with mpi4py's ``allgather`` and ``Get_size`` (a communicator) will do.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from . import _channels, _checks, _dtypes
from ._checks import F64
from .functional import (GradSums, Moments, Shard, backward_eval, grads_as, merge_grad_sums,
                         merge_moments, running_update, shard_dout, shard_finish,
                         shard_grad_input, shard_grad_sums, shard_moments, shard_normalize,
                         shard_result, split_shard)
from .layer import BatchNormalization

__all__ = ["SyncBatchNormalization", "RankError"]


class RankError(ValueError):
    """Another rank's input was rejected, or the ranks' inputs do not match."""


def _world() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("SyncBatchNormalization without comm= needs mpi4py and an MPI "
                          "library: pip install \"bnfast[mpi]\"") from exc
    return MPI.COMM_WORLD


class _Shared(NamedTuple):
    """What one rank sends in an exchange."""
    op: str                   # which call: every rank must be making the same one
    error: Optional[tuple[str, str]]   # (exception type, message) if this rank's input failed
    meta: Optional[tuple[Any, ...]]    # what must agree across ranks
    rows: int                 # this rank's rows
    data: Optional[np.ndarray]         # float64 per-feature partials


class SyncBatchNormalization(BatchNormalization):
    """``BatchNormalization`` whose batch statistics span every rank of ``comm``.

    Same constructor (plus ``comm``, default ``MPI.COMM_WORLD``), methods,
    attributes, dtypes and errors as ``BatchNormalization``.  Per rank,
    ``xc``, ``xn``, ``input_shape`` and ``batch_size`` describe this rank's
    shard; ``std``, ``dgamma``, ``dbeta`` and the running statistics are the
    whole batch's and identical on every rank; ``global_batch_size`` is the
    whole batch's row count.  Every rank must make the same calls in the same
    order (each training forward and every backward is a collective).

    In eval mode the forward is local (running statistics are the same on
    every rank) and the backward sums dgamma and dbeta over the ranks, so
    that in both modes they are the whole batch's: do not reduce them again.
    ``per_channel`` and ``running_var_unbiased`` work as in
    BatchNormalization (each rank's shard is (N_r, C, *spatial); the
    statistics are per channel over every rank's samples and positions).
    """

    def __init__(self, gamma: Any, beta: Any, momentum: float = 0.9,
                 running_mean: Any = None, running_var: Any = None, *,
                 eps: float = 1e-6, comm: Any = None, per_channel: bool = False,
                 running_var_unbiased: bool = False) -> None:
        super().__init__(gamma, beta, momentum, running_mean, running_var, eps=eps,
                         per_channel=per_channel, running_var_unbiased=running_var_unbiased)
        if comm is None:
            comm = _world()
        for method in ("allgather", "Get_size"):
            if not callable(getattr(comm, method, None)):
                raise TypeError(f"comm must be an MPI communicator (mpi4py.MPI.Comm); got "
                                f"{type(comm).__name__}, which has no {method}()")
        self.comm = comm
        self.global_batch_size: Optional[int] = None
        self._global: Optional[Moments] = None
        self._shard: Optional[Shard] = None

    def __getstate__(self) -> dict[str, Any]:
        # A communicator cannot be pickled; an unpickled layer gets COMM_WORLD.
        state = self.__dict__.copy()
        state["comm"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.comm is None:
            self.comm = _world()

    def __deepcopy__(self, memo: dict[int, Any]) -> "SyncBatchNormalization":
        import copy
        clone = SyncBatchNormalization.__new__(SyncBatchNormalization)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = value if key == "comm" else copy.deepcopy(value, memo)
        return clone

    # -- the exchange

    def _exchange(self, op: str, local: Callable[[], tuple[tuple[Any, ...], int, np.ndarray]]
                  ) -> list[_Shared]:
        """Run `local` (validation and this rank's partials), share the
        outcome with every rank, and raise on every rank if any rank failed
        or the ranks disagree.  Returns every rank's share, in rank order."""
        own: Optional[BaseException] = None
        try:
            meta, count, data = local()
            mine = _Shared(op, None, meta, count, data)
        except Exception as exc:    # any failure: the other ranks must hear of it
            own = exc
            mine = _Shared(op, (type(exc).__name__, str(exc)), None, 0, None)
        shares: list[_Shared] = self.comm.allgather(mine)
        ops = {share.op for share in shares}
        if len(ops) > 1:
            calls = ", ".join(f"rank {r}: {s.op}" for r, s in enumerate(shares))
            raise RuntimeError(f"the ranks made different calls ({calls}); every rank must "
                               f"call forward/backward in the same order")
        if own is not None:
            raise own
        failed = [(r, s.error) for r, s in enumerate(shares) if s.error is not None]
        if failed:
            rank, (kind, message) = failed[0]
            raise RankError(f"{op} failed on rank {rank} ({kind}: {message}); every rank "
                            f"raises so that none waits forever")
        first = shares[0].meta
        for rank, share in enumerate(shares[1:], 1):
            if share.meta != first:
                raise RankError(f"{op}: rank {rank} has {_describe_meta(share.meta)} but rank 0 "
                                f"has {_describe_meta(first)}; all ranks must match")
        return shares

    # -- forward

    def forward(self, x: Any, train_flg: bool = True) -> np.ndarray:
        """Normalize this rank's shard x; training mode uses the whole batch's statistics."""
        if not train_flg:
            return super().forward(x, False)
        prepared: dict[str, Any] = {}

        def local() -> tuple[tuple[Any, ...], int, np.ndarray]:
            prepared.update(self._prepare_train(x))
            moments: Moments = prepared["moments"]
            meta = ("train", prepared["x"].shape[1:], str(prepared["x"].dtype),
                    prepared["eps"], float(self.momentum), self.per_channel)
            return meta, moments.count, np.concatenate([moments.mean, moments.m2])

        shares = self._exchange("forward(train_flg=True)", local)
        d = prepared["shard"].d
        merged = merge_moments(Moments(s.rows, s.data[:d], s.data[d:])  # type: ignore[index]
                               for s in shares)
        return self._finish_train(prepared, merged)

    def _prepare_train(self, x: Any) -> dict[str, Any]:
        """Validation, dtypes and this shard's moments (and cached copy); no state changes."""
        x, sh = split_shard(x, self.per_channel)
        eps = _checks.check_eps(self.eps)
        momentum = self.momentum
        _checks.check_momentum(momentum)
        per_channel = self.per_channel
        gamma = _checks.operand(self.gamma, "gamma", sh.d, x.shape, per_channel=per_channel)
        beta = _checks.operand(self.beta, "beta", sh.d, x.shape, per_channel=per_channel)
        running = self._running(sh.d, x.shape)
        dts = _dtypes.train(x.dtype, gamma, beta, momentum, *running)
        cache = None
        if np.may_share_memory(sh.array, x):
            # the caller's memory: keep a copy, made in the statistics pass
            cache = self._buffer
            if cache is None or cache.shape != sh.array.shape or cache.dtype != sh.array.dtype:
                cache = np.empty(sh.array.shape, sh.array.dtype)
        moments = shard_moments(sh, cache)
        return dict(x=x, shard=sh, eps=eps, gamma=gamma, beta=beta, dts=dts, cache=cache,
                    moments=moments, running=running)

    def _finish_train(self, p: dict[str, Any], merged: Moments) -> np.ndarray:
        x, sh, eps, dts = p["x"], p["shard"], p["eps"], p["dts"]
        correction = _channels.var_correction(self.running_var_unbiased, merged.count,
                                              "channel" if self.per_channel else "feature")
        var = merged.var
        invstd = 1.0 / np.sqrt(var + eps)
        result, target = shard_result(sh, dts.out)
        shard_normalize(sh, target, merged, p["gamma"], p["beta"], eps)
        running_mean, running_var = p["running"]
        rm_new, rv_new = running_update(self.momentum, running_mean, running_var, merged.mean,
                                        var * correction, dts.stat)
        rm_new = self._laid_out(rm_new.astype(dts.running_mean, copy=False), self.running_mean,
                                sh.d, x.ndim)
        rv_new = self._laid_out(rv_new.astype(dts.running_var, copy=False), self.running_var,
                                sh.d, x.ndim)
        stats = np.stack([merged.mean, var, invstd])
        cache = p["cache"]
        if cache is not None:
            self._buffer = cache
            sh = _with_array(sh, cache)
        kept: Any = sh.array if sh.channels is None else sh.channels
        self._commit_train((kept, x.dtype, x.shape[0], sh.d, x.shape, stats, dts.stat, eps),
                           rm_new, rv_new)
        self._shard = sh
        self._global = merged
        self.global_batch_size = merged.count // (sh.count // x.shape[0])   # samples
        return shard_finish(sh, result, target)

    # -- backward

    def backward(self, dout: Any) -> np.ndarray:
        """dx of this rank's shard; dgamma and dbeta of the whole batch."""
        last_train = self._last_train
        if last_train is None:
            raise RuntimeError("backward() called before any forward(); call forward(x) first")
        if last_train:
            return self._backward_train(dout)
        return self._backward_eval(dout)

    def _backward_train(self, dout: Any) -> np.ndarray:
        assert self._train is not None and self._global is not None and self._shard is not None
        x_dtype, eps = self._train[1], self._train[7]
        sh, merged = self._shard, self._global
        d = sh.d
        prepared: dict[str, Any] = {}
        given_gamma, beta = self.gamma, self.beta

        def local() -> tuple[tuple[Any, ...], int, np.ndarray]:
            checked = _checks.as_array(dout, "dout")
            shard, dk = shard_dout(sh, checked)
            gamma = _checks.operand(given_gamma, "gamma", d, sh.shape,
                                    per_channel=self.per_channel)
            dts = _dtypes.grads(True, x_dtype, gamma, checked.dtype, count=merged.count)
            sums = shard_grad_sums(shard, dk, merged, eps)
            prepared.update(shard=shard, dk=dk, gamma=gamma, dts=dts)
            return ("backward", d), sums.count, np.concatenate([sums.sum_dout,
                                                                sums.sum_dout_xhat])

        shares = self._exchange("backward (after a training forward)", local)
        total = merge_grad_sums(GradSums(s.rows, s.data[:d], s.data[d:])  # type: ignore[index]
                                for s in shares)
        dts, shard = prepared["dts"], prepared["shard"]
        result, target = shard_result(shard, dts.dx)
        dgamma, dbeta = shard_grad_input(shard, prepared["dk"], target, merged,
                                         _checks.kernel_vector(prepared["gamma"]), total, eps)
        self.dgamma, self.dbeta = self._grads_laid_out(*grads_as(dgamma, dbeta, dts), given_gamma,
                                                       beta, d, len(sh.shape))
        return shard_finish(shard, result, target)

    def _backward_eval(self, dout: Any) -> np.ndarray:
        assert self._eval is not None
        x, _, n, d, shape, running_mean, running_var, eps = self._eval
        if isinstance(x, _channels.Batch):      # per channel: x's own layout
            x = x.array if x.layout == _channels.PLANES else _channels.channels_to_second(x.array)
        prepared: dict[str, Any] = {}
        gamma, beta = self.gamma, self.beta

        def local() -> tuple[tuple[Any, ...], int, np.ndarray]:
            dx, dgamma, dbeta = backward_eval(dout, x.reshape(shape), gamma, running_mean,
                                              running_var, eps=eps, per_channel=self.per_channel)
            prepared.update(dx=dx, dgamma_dtype=dgamma.dtype, dbeta_dtype=dbeta.dtype)
            return (("backward", d), n,
                    np.concatenate([dgamma.astype(F64), dbeta.astype(F64)]))

        shares = self._exchange("backward (after an eval-mode forward)", local)
        dgamma = np.zeros(d)
        dbeta = np.zeros(d)
        for share in shares:      # rank order
            assert share.data is not None
            dgamma += share.data[:d]
            dbeta += share.data[d:]
        self.dgamma, self.dbeta = self._grads_laid_out(
            dgamma.astype(prepared["dgamma_dtype"], copy=False),
            dbeta.astype(prepared["dbeta_dtype"], copy=False), gamma, beta, d, len(shape))
        result: np.ndarray = prepared["dx"]
        return result


def _with_array(sh: Shard, array: np.ndarray) -> Shard:
    """sh reading `array` (same layout and dims) instead."""
    channels = None
    if sh.channels is not None:
        b = sh.channels
        channels = _channels.Batch(array, b.layout, b.shape, b.n, b.c, b.s)
    return Shard(array, sh.n, sh.d, sh.s, sh.count, sh.shape, channels)


def _describe_meta(meta: Optional[Sequence[Any]]) -> str:
    if meta is None:
        return "no input"
    if meta[0] == "train":
        _, sample_shape, dtype, eps, momentum, per_channel = meta
        return (f"samples of shape {tuple(sample_shape)} and dtype {dtype}, eps={eps}, "
                f"momentum={momentum}, per_channel={per_channel}")
    return f"{meta[1]} features or channels"
