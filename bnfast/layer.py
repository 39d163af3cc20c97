"""``BatchNormalization``: the drop-in layer, with the reference class's contract.

Every call takes one route: the planner (bnfast._checks) validates the
call, resolves its dtypes and lays it out into a plan, without touching any
state; one kernel call carries the plan out; then the layer commits what
the plan says the call leaves, all at once.  A rejected call raises in the
planner, so it changes nothing.  The common case (float32/float64 arrays of
one dtype, laid out for the kernels) is not a second copy of the method but
a trivial plan, made in a few C queries.
"""
from __future__ import annotations

from typing import Any, Final, Optional

import numpy as np

from . import _channels, _checks

__all__ = ["BatchNormalization"]

_plan_forward = _checks.plan_forward
_plan_backward = _checks.plan_backward
# A plan's fields (see _checks, "Plans")
_ARRAY: Final = _checks.ARRAY
_N: Final = _checks.N
_SHAPE: Final = _checks.SHAPE
_TRAIN: Final = _checks.TRAIN
_RUNNING_MEAN: Final = _checks.RUNNING_MEAN
_RUNNING_VAR: Final = _checks.RUNNING_VAR
_FRESH: Final = _checks.FRESH
_COPIED: Final = _checks.COPIED


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
        self.per_channel = _checks.check_flag(per_channel, "per_channel")
        self.running_var_unbiased = _checks.check_flag(running_var_unbiased,
                                                       "running_var_unbiased")
        self.gamma = gamma
        self.beta = beta
        self.momentum = momentum
        self.eps = eps
        self.input_shape: Optional[tuple[int, ...]] = None
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size: Optional[int] = None
        self.dgamma: Optional[np.ndarray] = None
        self.dbeta: Optional[np.ndarray] = None
        # What the last training and eval-mode forwards left.  The training
        # one's x lives in bnfast's memory (a copy made in the statistics
        # pass), so later changes to the caller's array do not change the
        # gradient, as in the reference.
        self._train: Optional[_checks.Plan] = None
        self._views: dict[str, np.ndarray] = {}
        self._eval: Optional[_checks.Plan] = None
        self._last_train: Optional[bool] = None
        # Reused by the next training forward (the last one's go with the plan
        # it replaces): the buffer for the copy of x, and the statistics' (3, D)
        # buffer with its three rows.
        self._buffer: Optional[np.ndarray] = None
        self._stats: Optional[tuple[np.ndarray, ...]] = None

    # eps and momentum are checked when they are set (a bad value raises
    # there, at the mistake), so each call reads them as they are.

    @property
    def eps(self) -> float:
        """The variance floor, ``sqrt(var + eps)`` (a finite number >= 0)."""
        return self._eps

    @eps.setter
    def eps(self, value: Any) -> None:
        self._eps = _checks.check_eps(value)

    @property
    def momentum(self) -> Any:
        """The running statistics' decay: ``momentum * old + (1 - momentum) * batch``."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: Any) -> None:
        self._rate = _checks.check_momentum(value)    # as a float, for the kernels
        self._momentum = value      # as given: NumPy arithmetic promotes by its type

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
            dtypes = f"x {last[_checks.X_DTYPE].name}, " + dtypes
        return (f"{type(self).__name__}({unit}={count}, mode={mode!r}, eps={self.eps!r}, "
                f"momentum={self.momentum!r}, dtypes: {dtypes})")

    def _count(self) -> Optional[int]:
        """The layer's features (channels): from the last forward, else the
        operands that have more than one value; None while unknown."""
        last = self._train if self._last_train else self._eval
        if last is not None:
            return last[_checks.C]
        for value in (self.gamma, self.beta, self.running_mean, self.running_var):
            size = getattr(value, "size", 1)
            if isinstance(size, int) and size > 1:
                return size
        return None

    # -- the reference's cached intermediates, from the last training forward

    def _view(self, name: str) -> Optional[np.ndarray]:
        """xc, xn ((N, D); x's shape per channel) and std (D,) in the
        reference's dtype, made once from the last training forward."""
        plan = self._train
        if plan is None:
            return None
        found = self._views.get(name)
        if found is None:
            stats, stat_dtype = plan[_checks.STATS], plan[_checks.STAT_DTYPE]
            assert stats is not None
            if name == "std":
                found = np.sqrt(stats[1] + plan[_checks.EPS]).astype(stat_dtype)
            else:
                b = _checks.batch_of(plan)
                centered = _channels.centered(b, stats[0])
                if name == "xn":
                    _channels.scale(b, centered, stats[2])
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
        out: np.ndarray
        out, plan, stats = _plan_forward(
            x, self.gamma, self.beta, self.running_mean, self.running_var, self._eps,
            self._momentum, self._rate, train_flg, self.per_channel, self.running_var_unbiased,
            True, self._buffer, self._stats)
        self._commit(plan, stats)
        return out

    def _commit(self, plan: _checks.Plan, stats: Optional[tuple[np.ndarray, ...]] = None) -> None:
        """The state a completed forward leaves (all of it, at once); stats:
        the training statistics' buffer, for the next training forward."""
        if plan[_TRAIN]:
            self._train = plan
            self._views = {}
            self._last_train = True
            self.batch_size = plan[_N]
            self.running_mean = plan[_RUNNING_MEAN]
            self.running_var = plan[_RUNNING_VAR]
            if plan[_COPIED]:
                self._buffer = plan[_ARRAY]
            self._stats = stats
        else:
            self._eval = plan
            self._last_train = False
            if plan[_FRESH]:
                self.running_mean = plan[_RUNNING_MEAN]
                self.running_var = plan[_RUNNING_VAR]
        self.input_shape = plan[_SHAPE]

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
        # Read the mode and its cache once: everything below uses these, even
        # if converting gamma runs code that calls forward (another thread).
        last_train = self._last_train
        if last_train is None:
            raise RuntimeError("backward() called before any forward(); call forward(x) first")
        plan = self._train if last_train else self._eval
        assert plan is not None, "set by the forward that set _last_train"
        dx: np.ndarray
        dx, self.dgamma, self.dbeta = _plan_backward(plan, dout, self.gamma, self.beta, None,
                                                     self.per_channel)
        return dx
