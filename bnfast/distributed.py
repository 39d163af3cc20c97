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

from . import _channels, _checks
from ._checks import F64
from .functional import (GradSums, Moments, grad_input_into, grad_sums_of, merge_grad_sums,
                         merge_moments, moments_of, normalize_into)
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
        self._global: Optional[Moments] = None     # the last training forward's merged moments

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
        planned: list[_checks.ForwardCall] = []

        def local() -> tuple[tuple[Any, ...], int, np.ndarray]:
            # The layer's plan, carried out in split phases.  New buffers for
            # the copy of x and the statistics: if another rank fails, those
            # of the last training forward (a backward may still read them)
            # are intact.
            call: _checks.ForwardCall = _checks.plan_forward(
                x, self.gamma, self.beta, self.running_mean, self.running_var, self._eps,
                self._momentum, self._rate, True, self.per_channel, self.running_var_unbiased,
                True, run=False)
            plan, source = call[0], call[3]
            moments = moments_of(_channels.with_array(_checks.batch_of(plan), source),
                                 plan[_checks.ARRAY] if plan[_checks.COPIED] else None)
            planned.append(call)
            meta = ("train", plan[_checks.SHAPE][1:], str(plan[_checks.X_DTYPE]),
                    plan[_checks.EPS], self._rate, self.per_channel)
            return meta, moments.count, np.concatenate([moments.mean, moments.m2])

        shares = self._exchange("forward(train_flg=True)", local)
        plan, out, _, source, target, gk, bk = planned[0]
        b = _checks.batch_of(plan)
        c, eps, stats = b.c, plan[_checks.EPS], plan[_checks.STATS]
        merged = merge_moments(Moments(s.rows, s.data[:c], s.data[c:])  # type: ignore[index]
                               for s in shares)
        correction = _checks.var_correction(self.running_var_unbiased, merged.count,
                                            "channel" if self.per_channel else "feature")
        var = merged.var
        assert stats is not None
        stats[0][...] = merged.mean
        stats[1][...] = var
        stats[2][...] = 1.0 / np.sqrt(var + eps)
        normalize_into(_channels.with_array(b, source), target, merged, gk, bk, eps)
        if target.dtype != out.dtype:     # a float16 output from its float32 stand-in
            np.copyto(_channels.kernel_view(b.layout, out), target, casting="unsafe")
        # (the running statistics as the planner checked them; it has made
        # their new arrays, laid out as the old ones)
        old = _checks.running_pair(self.running_mean, self.running_var, c, b.shape,
                                   self.per_channel) or (np.zeros(c), np.zeros(c))
        _checks.update_running(plan[_checks.RUNNING_MEAN], plan[_checks.RUNNING_VAR],
                               self.momentum, old, merged.mean, var * correction,
                               plan[_checks.STAT_DTYPE])
        self._commit(plan)
        self._global = merged
        self.global_batch_size = merged.count // b.s      # samples
        return out

    # -- backward

    def backward(self, dout: Any) -> np.ndarray:
        """dx of this rank's shard; dgamma and dbeta of the whole batch."""
        last_train = self._last_train
        if last_train is None:
            raise RuntimeError("backward() called before any forward(); call forward(x) first")
        plan = self._train if last_train else self._eval
        assert plan is not None
        gamma, beta = self.gamma, self.beta
        c, eps = plan[_checks.C], plan[_checks.EPS]
        merged = self._global
        if last_train:
            assert merged is not None
            planned: list[_checks.BackwardCall] = []

            def local() -> tuple[tuple[Any, ...], int, np.ndarray]:
                assert plan is not None and merged is not None
                call: _checks.BackwardCall = _checks.plan_backward(
                    plan, dout, gamma, beta, None, self.per_channel, count=merged.count,
                    run=False)
                sums = grad_sums_of(_channels.with_array(_checks.batch_of(plan), call[4]),
                                    call[5], merged, eps)
                planned.append(call)
                return ("backward", c), sums.count, np.concatenate([sums.sum_dout,
                                                                    sums.sum_dout_xhat])

            shares = self._exchange("backward (after a training forward)", local)
            total = merge_grad_sums(GradSums(s.rows, s.data[:c], s.data[c:])  # type: ignore
                                    for s in shares)
            grad_input_into(plan, planned[0], merged, total, eps)
            dx, dgamma, dbeta = planned[0][0], planned[0][2], planned[0][3]
        else:
            grads: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

            def local() -> tuple[tuple[Any, ...], int, np.ndarray]:
                # the eval-mode backward is local; only dgamma and dbeta are summed
                assert plan is not None
                grads.append(_checks.plan_backward(plan, dout, gamma, beta, None,
                                                   self.per_channel))
                return (("backward", c), plan[_checks.N],
                        np.concatenate([grads[0][1].astype(F64).reshape(-1),
                                        grads[0][2].astype(F64).reshape(-1)]))

            shares = self._exchange("backward (after an eval-mode forward)", local)
            dx, dgamma, dbeta = grads[0]
            dgamma_sum = np.zeros(c)
            dbeta_sum = np.zeros(c)
            for share in shares:      # rank order
                assert share.data is not None
                dgamma_sum += share.data[:c]
                dbeta_sum += share.data[c:]
            np.copyto(dgamma.reshape(-1), dgamma_sum, casting="unsafe")
            np.copyto(dbeta.reshape(-1), dbeta_sum, casting="unsafe")
        self.dgamma = dgamma
        self.dbeta = dbeta
        return dx


def _describe_meta(meta: Optional[Sequence[Any]]) -> str:
    if meta is None:
        return "no input"
    if meta[0] == "train":
        _, sample_shape, dtype, eps, momentum, per_channel = meta
        return (f"samples of shape {tuple(sample_shape)} and dtype {dtype}, eps={eps}, "
                f"momentum={momentum}, per_channel={per_channel}")
    return f"{meta[1]} features or channels"
