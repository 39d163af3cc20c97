"""Interleaved wall-clock timing of several callables in one process.

The callables compared in one benchmark cell are timed in turns, A B C A B C
..., each turn ("repeat") a loop of enough calls to last a few milliseconds.
Interleaving spreads slow phases of a shared machine (another tenant, a
frequency change, a page-cache flush) over every callable instead of charging
them to whichever happened to run then.  A callable's time is the median of
its repeats' per-call times: on a noisy 2-core machine outliers are one-sided
(a repeat can only be slowed down) and come in bursts, so the minimum rewards
one lucky repeat and the mean is dragged by one unlucky one, while the median
is what a typical call costs.  All repeats are kept so that other statistics
can be computed from a saved run.
"""
from __future__ import annotations

import gc
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["TARGET_REPEAT_S", "Timing", "calls_per_repeat", "interleaved"]

#: How long one repeat of one callable should last.  perf_counter resolves
#: well under a microsecond, so 3 ms keeps its error below 0.1 %, while short
#: turns keep the interleaving fine-grained.
TARGET_REPEAT_S = 0.003


@dataclass(frozen=True)
class Timing:
    """One callable's measurements in a cell."""
    iterations: int            #: calls per repeat
    seconds: tuple[float, ...]  #: per-call time of each repeat, in order

    @property
    def median(self) -> float:
        """Per-call seconds: the median over repeats."""
        return statistics.median(self.seconds)


def _per_call(call: Callable[[], Any], iterations: int) -> float:
    """Seconds per call, over a loop of `iterations` calls."""
    start = time.perf_counter()
    for _ in itertools.repeat(None, iterations):
        call()
    return (time.perf_counter() - start) / iterations


def calls_per_repeat(call: Callable[[], Any], target_s: float = TARGET_REPEAT_S) -> int:
    """How many calls of `call` last about `target_s` (at least one).

    Loops of 1, 10, 100, ... calls are timed until one lasts a fifth of the
    target, long enough to estimate a call's cost; calls slower than that
    need no loop.  Each loop runs twice and the faster counts, so that one
    preemption cannot make a call look slow and cut every repeat short.
    The calls made here also warm the callable up.
    """
    iterations = 1
    while True:
        per_call = min(_per_call(call, iterations), _per_call(call, iterations))
        if per_call * iterations >= target_s / 5:
            return max(1, round(target_s / per_call))
        iterations *= 10


def interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int,
                target_s: float = TARGET_REPEAT_S) -> dict[str, Timing]:
    """Time every callable in `calls`, interleaved, `repeats` times each.

    Calibrating a callable (calls_per_repeat) also warms it up: first-call
    costs such as lazy set-up and first-touch page faults, which are not
    what we measure, fall in loops that are not recorded.  The garbage
    collector is off while timing, as in ``timeit``, so that a collection
    one callable's garbage triggers is not charged to another.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    collecting = gc.isenabled()
    gc.disable()
    try:
        iterations = {name: calls_per_repeat(call, target_s) for name, call in calls.items()}
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                seconds[name].append(_per_call(call, iterations[name]))
    finally:
        if collecting:
            gc.enable()
    return {name: Timing(iterations[name], tuple(seconds[name])) for name in calls}
