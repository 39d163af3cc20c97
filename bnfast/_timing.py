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

Each turn starts with one untimed call, so that every callable is timed in
the state it leaves the caches in, not in the state its predecessor left.
Between turns the timing waits until the process's other threads have gone
quiet (``settle``).  OpenMP runtimes keep a finished parallel region's
threads spinning for a while before they sleep (libgomp's default, measured
on this project's 2-core AMD EPYC: 8.5 ms of CPU after bnfast's last call),
which is longer than a turn: on a 2-core machine every multi-threaded
callable that ran right after bnfast or torch shared a core with a spinning
thread for its whole turn (the memory floor measured 3.45 ms there against
2.24 ms without bnfast in the process).  Waiting lets each turn start with
the machine to itself, whichever callable came before.
"""
from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

__all__ = ["SETTLE_MAX_S", "TARGET_REPEAT_S", "Timing", "calls_per_repeat", "interleaved",
           "settle"]

#: How long one repeat of one callable should last.  perf_counter resolves
#: well under a microsecond, so 3 ms keeps its error below 0.1 %, while short
#: turns keep the interleaving fine-grained.
TARGET_REPEAT_S = 0.003


#: The longest wait for other threads to go quiet before a turn.
SETTLE_MAX_S = 0.03
#: Other threads count as quiet when none has run for this long.
SETTLE_QUIET_S = 0.001
_TASKS = "/proc/self/task"


def _others_running() -> Optional[bool]:
    """Whether another thread of this process is running now (Linux), or None."""
    try:
        own = str(os.getpid())
        for task in os.listdir(_TASKS):
            if task != own:     # the calling (main) thread runs the timing
                with open(f"{_TASKS}/{task}/stat", encoding="ascii", errors="replace") as stat:
                    if stat.read().rpartition(")")[2].split()[0] == "R":
                        return True
        return False
    except (OSError, IndexError):
        return None


def settle(max_s: float = SETTLE_MAX_S, quiet_s: float = SETTLE_QUIET_S) -> float:
    """Wait until no other thread of this process has run for `quiet_s` (at most `max_s`).

    A busy wait, so that this thread's core stays awake.  Where threads'
    states cannot be read (not Linux), waits `max_s` / 3, about as long as
    libgomp's threads spin.  Returns the seconds waited.
    """
    start = time.perf_counter()
    running = _others_running()
    if running is None:
        while time.perf_counter() - start < max_s / 3:
            pass
        return time.perf_counter() - start
    quiet_since = start
    while True:
        now = time.perf_counter()
        if running:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return now - start
        if now - start >= max_s:
            return now - start
        running = _others_running()


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
                target_s: float = TARGET_REPEAT_S,
                settle_s: float = SETTLE_MAX_S) -> dict[str, Timing]:
    """Time every callable in `calls`, interleaved, `repeats` times each.

    Calibrating a callable (calls_per_repeat) also warms it up: first-call
    costs such as lazy set-up and first-touch page faults, which are not
    what we measure, fall in loops that are not recorded.  The garbage
    collector is off while timing, as in ``timeit``, so that a collection
    one callable's garbage triggers is not charged to another.  Each turn
    (and each calibration) starts once the other threads have settled, for
    at most `settle_s` (0: no wait), and with one untimed call: a turn of a
    large cell is one or two calls, and its first call would otherwise find
    the caches as the previous callable left them (its arrays, not this
    one's), a cost that depends on the order of the callables.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    collecting = gc.isenabled()
    gc.disable()
    try:
        iterations = {}
        for name, call in calls.items():
            if settle_s > 0:
                settle(settle_s)
            iterations[name] = calls_per_repeat(call, target_s)
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                if settle_s > 0:
                    settle(settle_s)
                call()      # untimed: the caches as this callable leaves them
                seconds[name].append(_per_call(call, iterations[name]))
    finally:
        if collecting:
            gc.enable()
    return {name: Timing(iterations[name], tuple(seconds[name])) for name in calls}
