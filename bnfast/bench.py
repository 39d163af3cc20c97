"""Time bnfast against the NumPy reference, PyTorch and the memory-traffic floor.

Run as ``python -m bnfast.bench`` or ``bnfast-bench``.  Every cell of the grid
(shape x dtype x operation) times these peers, interleaved in one process:

  bnfast     bnfast.BatchNormalization
  reference  bnfast.reference.BatchNormalization, the pure-NumPy twin of the
             class in Deep Learning from Scratch (what bnfast replaces)
  torch      torch.nn.functional.batch_norm on the flattened (N, D) view,
             including the from_numpy/.numpy() conversions a NumPy user pays
             (only when torch can be imported)
  floor      the memory traffic the operation cannot avoid, done by NumPy: a
             fresh output array written once plus the fewest whole-array reads

Operations: train = forward(x, True); eval = forward(x, False); backward =
backward(dout) after one training forward.  Inputs with more than two
dimensions are normalized per flattened feature, D = prod(shape[1:]).

dtypes: x, dout, gamma, beta AND the running statistics all have the dtype
being measured.  With float32 running statistics the eval output stays
float32, as it does in the reference class (float64 running statistics would
promote it, and the cell would measure a float64 output).

Each peer's time is the median over repeats of the per-call time; a repeat is
a loop of enough calls to last ~3 ms.  speedup = peer time / bnfast time
(higher is better); "x floor" = bnfast time / floor time (1.0 = at the floor).
Data are seeded, so every run times the same numbers.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO

import numpy as np

import bnfast
from bnfast._timing import TARGET_REPEAT_S, Timing, interleaved
from bnfast.reference import BatchNormalization as Reference

__all__ = [
    "CHECKED_PEERS", "DEFAULT_REPEATS", "DTYPES", "OPS", "PEERS", "QUICK_SHAPES", "SHAPES", "Case",
    "Cell", "CellResult", "CheckFailed", "check", "expected_result", "grid", "load_torch", "main",
    "make_call", "make_case", "measure", "parse_shapes",
]

SHAPES: tuple[tuple[int, ...], ...] = (
    (100, 100), (32, 128), (256, 1024), (1024, 4096), (32, 64, 32, 32), (8, 3, 224, 224),
    (256, 65536))
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((100, 100), (32, 128), (256, 1024), (32, 64, 32, 32))
#: --per-channel: image batches (N, C, *spatial), statistics per channel.
CHANNEL_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 56, 56), (8, 256, 14, 14), (64, 3, 64, 64), (16, 32, 8, 8, 8), (256, 16, 4, 4))
QUICK_CHANNEL_SHAPES: tuple[tuple[int, ...], ...] = ((8, 256, 14, 14), (64, 3, 64, 64))
#: Memory layouts: "flat" is the default grid (per-feature statistics);
#: per-channel cells are NCHW-contiguous or channels-last ("cl").
CHANNEL_LAYOUTS = ("nchw", "cl")
DTYPES = ("float64", "float32")
OPS = ("train", "eval", "backward")
PEERS = ("bnfast", "reference", "torch", "floor")
#: Peers whose results are compared with the reference twin's.  The reference
#: is the oracle itself, and the floor computes no batch normalization.
CHECKED_PEERS = ("bnfast", "torch")

EPS = 1e-6          # the book's 10e-7, bnfast's default
MOMENTUM = 0.9      # the book's default; torch's momentum is 1 - this
SEED = 20261128
DEFAULT_REPEATS = 7
#: Relative tolerance of a check; absolute tolerance is this times the
#: magnitude of the values compared.
RTOL = {"float64": 1e-10, "float32": 2e-5}
BENCH_EXTRA = 'pip install "bnfast[bench]"'


# --------------------------------------------------------------------------
# The data and the peers


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


@dataclass(frozen=True)
class Cell:
    """One row of the results: a shape (and layout), a dtype and an operation."""
    shape: tuple[int, ...]
    dtype: str
    op: str
    layout: str = "flat"    # "flat" (per feature), or per channel: "nchw" or "cl"

    @property
    def shape_label(self) -> str:
        """'256x1024' (flat), '32x64x56x56 nchw', '32x64x56x56 cl'."""
        suffix = "" if self.layout == "flat" else f" {self.layout}"
        return format_shape(self.shape) + suffix

    @property
    def label(self) -> str:
        """'256x1024-float64-train': the pytest-benchmark group and JSON key."""
        return f"{self.shape_label.replace(' ', '-')}-{self.dtype}-{self.op}"


def grid(shapes: Iterable[tuple[int, ...]], dtypes: Iterable[str],
         ops: Iterable[str], layouts: Iterable[str] = ("flat",)) -> list[Cell]:
    """Cells in run order: each (shape, layout, dtype)'s data serves all its operations."""
    return [Cell(tuple(shape), dtype, op, layout) for shape in shapes for layout in layouts
            for dtype in dtypes for op in ops]


@dataclass(frozen=True)
class Case:
    """The seeded data of one (shape, dtype), shared by every peer and operation.

    No peer writes to these arrays (torch gets copies of the running
    statistics, which it updates in place).
    """
    x: np.ndarray
    dout: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    layout: str = "flat"

    @property
    def per_channel(self) -> bool:
        return self.layout != "flat"


def _in_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """a (N, C, *spatial) with channels-last memory for layout "cl"."""
    if layout != "cl":
        return a
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def make_case(shape: Sequence[int], dtype: str, layout: str = "flat") -> Case:
    """Random data for `shape` in `dtype` (and layout), the same in every run and process."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng([SEED, dt.itemsize, *shape])
    d = shape[1] if layout != "flat" else math.prod(shape[1:])
    x = rng.standard_normal(tuple(shape), dtype=dt)
    x *= 2.0    # features that are neither centred nor unit-scaled
    x += 0.5
    return Case(
        layout=layout,
        x=_in_layout(x, layout),
        dout=_in_layout(rng.standard_normal(tuple(shape), dtype=dt), layout),
        gamma=1.0 + 0.5 * rng.standard_normal(d, dtype=dt),
        beta=rng.standard_normal(d, dtype=dt),
        running_mean=0.1 * rng.standard_normal(d, dtype=dt),
        running_var=0.5 + 1.5 * rng.random(d, dtype=dt),
    )


def _layer_call(layer_class: type, case: Case, op: str) -> Callable[[], Any]:
    """bnfast's layer or the reference twin, which share one API."""
    options = {"per_channel": True} if case.per_channel else {}
    layer = layer_class(case.gamma, case.beta, MOMENTUM, running_mean=case.running_mean,
                        running_var=case.running_var, eps=EPS, **options)
    x = case.x
    if op == "train":
        return lambda: layer.forward(x, True)
    if op == "eval":
        return lambda: layer.forward(x, False)
    layer.forward(x, True)
    dout = case.dout

    def backward() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return layer.backward(dout), layer.dgamma, layer.dbeta
    return backward


def _torch_call(case: Case, op: str) -> Callable[[], Any]:
    """torch's CPU batch norm, called as a NumPy user would call it."""
    import torch

    x, dout = case.x, case.dout
    n = x.shape[0]
    # Flat mode: the (N, D) view, one feature per column.  Per channel: the
    # (N, C, *spatial) tensor itself; from_numpy keeps the strides, so a
    # channels-last array is a torch.channels_last(_3d) tensor.
    def batch(a: np.ndarray) -> Any:
        return torch.from_numpy(a if case.per_channel else a.reshape(n, -1))
    weight = torch.from_numpy(case.gamma)
    bias = torch.from_numpy(case.beta)
    running_mean = torch.from_numpy(case.running_mean.copy())
    running_var = torch.from_numpy(case.running_var.copy())
    momentum = 1.0 - MOMENTUM
    if op in ("train", "eval"):
        training = op == "train"
        batch_norm = torch.nn.functional.batch_norm

        def forward() -> np.ndarray:
            with torch.no_grad():
                out = batch_norm(batch(x), running_mean, running_var,
                                 weight, bias, training=training, momentum=momentum, eps=EPS)
            result: np.ndarray = out.numpy().reshape(x.shape)
            return result
        return forward
    # The same math as the reference's backward: the training-mode gradient
    # from the saved batch mean and 1/std of a forward on the same input.
    x_rows = batch(x)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x_rows, weight, bias, running_mean, running_var, True, momentum, EPS)
    native_backward = torch.ops.aten.native_batch_norm_backward

    def backward() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            dx, dgamma, dbeta = native_backward(
                batch(dout), x_rows, weight, running_mean,
                running_var, save_mean, save_invstd, True, EPS, [True, True, True])
        return dx.numpy().reshape(x.shape), dgamma.numpy(), dbeta.numpy()
    return backward


def _read(a: np.ndarray) -> Any:
    """One read of every element of `a`, as fast as NumPy reads a whole array.

    Measured on this project's 2-core AMD EPYC (median of 9 interleaved
    repeats): NumPy's SIMD maximum loop matches or beats every other
    candidate from 100x100 to 256x65536 in float32 and float64.  It reads each
    element once, has no dependency chain between iterations and allocates
    nothing.  np.add.reduce (and a.sum()) runs 1.8-3.6x slower on
    cache-resident data (pairwise summation); np.dot with a ones vector is
    ~0.5 us quicker on 10^4 elements but reads a second array as large as
    `a`, so 1.7-2x slower from 32 MiB up; a bitwise-or reduce over an
    integer view is no faster and needs a view per dtype.  a.max() is this
    same loop behind an extra Python layer.
    """
    return np.maximum.reduce(a, axis=None)


def _floor_call(case: Case, op: str) -> Callable[[], Any]:
    """The least memory traffic the operation needs, as one callable.

    One callable does all of an operation's pieces, so it is timed exactly
    like the peers (same loop, same interleaving, same median), and it sees
    the cache as they do: an input it read a moment ago is still cached when
    it reads it again, which is also true of every peer's second pass.  A sum
    of per-piece medians would be the median of nothing actually run.
    """
    x, dout = case.x, case.dout
    # order="K": the copy keeps a channels-last array's memory order, as the
    # peers' outputs do (a C-order copy would be a transpose).
    if op == "train":     # the output, plus the statistics pass over x
        return lambda: (x.copy(order="K"), _read(x))
    if op == "eval":      # the output, computed from x in one pass
        return lambda: x.copy(order="K")
    # dx, plus a statistics pass over x and dout (dgamma, dbeta need both)
    # and a second pass over x for dx.
    return lambda: (dout.copy(order="K"), _read(x), _read(x), _read(dout))


def make_call(peer: str, case: Case, op: str) -> Callable[[], Any]:
    """The callable timed for `peer` doing `op` on `case`, set up and ready.

    train and eval calls return the output array; backward calls return
    (dx, dgamma, dbeta).  A floor call returns its pieces (not comparable).
    Building a backward call runs one training forward.
    """
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")
    if peer == "bnfast":
        return _layer_call(bnfast.BatchNormalization, case, op)
    if peer == "reference":
        return _layer_call(Reference, case, op)
    if peer == "torch":
        return _torch_call(case, op)
    if peer == "floor":
        return _floor_call(case, op)
    raise ValueError(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}")


def load_torch() -> tuple[Optional[ModuleType], str]:
    """(torch, its version), or (None, why it cannot be used)."""
    try:
        import torch
    except (ImportError, OSError) as exc:   # OSError: installed, but its libraries fail
        return None, f"torch cannot be imported ({exc})"
    return torch, torch.__version__


# --------------------------------------------------------------------------
# Checking results against the reference twin


class CheckFailed(Exception):
    """A peer's result differs from the reference twin's."""


def expected_result(case: Case, op: str) -> Any:
    """The reference twin's result of `op` on `case`."""
    return make_call("reference", case, op)()


def _dx_scale(case: Case) -> float:
    """Magnitude of the terms dx is computed from, max |gamma * dout / std|.

    dx of a batch is a difference of such terms, which cancel (dx of a batch
    of two is nearly zero), so its rounding error is relative to them, not
    to dx itself.
    """
    if case.per_channel:
        c = case.x.shape[1]
        rows = np.moveaxis(case.x, 1, -1).reshape(-1, c).astype(np.float64)
        dout = np.moveaxis(case.dout, 1, -1).reshape(-1, c)
    else:
        rows = case.x.reshape(case.x.shape[0], -1).astype(np.float64)
        dout = case.dout.reshape(case.x.shape[0], -1)
    std = np.sqrt(rows.var(axis=0) + EPS)
    gain = np.abs(case.gamma.astype(np.float64)) / std
    return float(np.max(np.abs(dout) * gain))


def _compare(what: str, actual: np.ndarray, expected: np.ndarray, rtol: float,
             scale: Optional[float]) -> None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise CheckFailed(f"{what} has shape {actual.shape} and dtype {actual.dtype}; the "
                          f"reference's has shape {expected.shape} and dtype {expected.dtype}")
    if scale is None:
        scale = float(np.max(np.abs(expected)))
    if not np.allclose(actual, expected, rtol=rtol, atol=rtol * scale):
        with np.errstate(all="ignore"):     # the error of a wrong result may overflow
            error = np.abs(actual.astype(np.float64) - expected)
        raise CheckFailed(f"{what} differs from the reference twin's by up to "
                          f"{float(np.nanmax(error)):.3g} (allowed: {rtol:g} x (|value| + "
                          f"{scale:.3g}))")


def check(peer: str, result: Any, expected: Any, case: Case, op: str) -> None:
    """Raise CheckFailed unless `result` matches the reference's `expected`.

    Tolerances: rtol 1e-10 (float64) or 2e-5 (float32), plus an absolute
    tolerance of rtol times the values' magnitude; for dx that magnitude is
    |gamma * dout / std|, the terms dx is computed from.
    """
    rtol = RTOL[case.x.dtype.name]
    if op == "backward":
        parts = zip(("dx", "dgamma", "dbeta"), result, expected, (_dx_scale(case), None, None))
    else:
        parts = zip(("output",), (result,), (expected,), (None,))
    for name, actual, wanted, scale in parts:
        _compare(f"{peer} {op} {name}", np.asarray(actual), np.asarray(wanted), rtol, scale)


# --------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class CellResult:
    """The timings of one cell, by peer (torch absent when unavailable)."""
    cell: Cell
    timings: dict[str, Timing]
    checked: bool

    def time(self, peer: str) -> Optional[float]:
        """Median seconds per call of `peer`, or None if it did not run."""
        timing = self.timings.get(peer)
        return None if timing is None else timing.median

    def speedup(self, peer: str) -> Optional[float]:
        """peer time / bnfast time (for the floor, the inverse of floor_multiple)."""
        other = self.time(peer)
        return None if other is None else other / self.timings["bnfast"].median

    @property
    def floor_multiple(self) -> float:
        """bnfast time / floor time."""
        return self.timings["bnfast"].median / self.timings["floor"].median


def format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def measure(cells: Sequence[Cell], peers: Sequence[str], repeats: int, check_results: bool,
            progress: Optional[TextIO] = None) -> list[CellResult]:
    """Time `peers` on every cell; check first if asked (raises CheckFailed).

    `peers` must include bnfast and floor.  With `progress`, a line per cell
    is written there as it completes.
    """
    results = []
    started = time.perf_counter()
    case_of: tuple[tuple[int, ...], str, str] | None = None
    case: Optional[Case] = None
    for index, cell in enumerate(cells, 1):
        if (cell.shape, cell.dtype, cell.layout) != case_of:
            case = None     # free the last case's arrays before making the next
            case = make_case(cell.shape, cell.dtype, cell.layout)
            case_of = (cell.shape, cell.dtype, cell.layout)
        assert case is not None
        calls = {peer: make_call(peer, case, cell.op) for peer in peers}
        if check_results:
            expected = expected_result(case, cell.op)
            for peer in CHECKED_PEERS:
                if peer in calls:
                    check(peer, calls[peer](), expected, case, cell.op)
            del expected
        result = CellResult(cell, interleaved(calls, repeats), check_results)
        del calls
        results.append(result)
        if progress is not None:
            print(f"[{index:{len(str(len(cells)))}}/{len(cells)}] {cell.shape_label} "
                  f"{cell.dtype} {cell.op}: bnfast {format_time(result.time('bnfast'))}, "
                  f"reference {format_time(result.time('reference'))} "
                  f"({time.perf_counter() - started:.0f} s)", file=progress, flush=True)
    return results


def geomean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Geometric mean of the values that are not None (None if there are none)."""
    logs = [math.log(v) for v in values if v is not None]
    return math.exp(sum(logs) / len(logs)) if logs else None


def summary(results: Sequence[CellResult]) -> dict[str, Optional[float]]:
    return {"speedup_vs_reference": geomean(r.speedup("reference") for r in results),
            "speedup_vs_torch": geomean(r.speedup("torch") for r in results),
            "floor_multiple": geomean(r.floor_multiple for r in results)}


# --------------------------------------------------------------------------
# Reporting


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_average() -> Optional[float]:
    """The 1-minute load average: how busy the machine was (None off Unix)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(torch: Optional[ModuleType], load_before: Optional[float]) -> dict[str, Any]:
    """The machine and the software that ran the benchmark.

    `load_before`: the load average before measuring, a sign of other work
    on the machine.
    """
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count())
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cython": _version("Cython"),
        "torch": None if torch is None else torch.__version__,
        "bnfast": bnfast.__version__,
        "build_info": bnfast.build_info(),
        "threads": {"bnfast": bnfast.get_num_threads(),
                    "torch": None if torch is None else torch.get_num_threads()},
        "load_average_before": load_before,
    }


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _count(number: Optional[int], noun: str) -> str:
    """'1 thread', '2 threads'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def format_table(results: Sequence[CellResult], machine: dict[str, Any], torch_note: str,
                 repeats: int) -> str:
    """The results table, with a header naming the machine and the method."""
    threads = machine["threads"]
    torch_part = (f"torch {machine['torch']} ({_count(threads['torch'], 'thread')})"
                  if machine["torch"] else f"torch not compared: {torch_note}")
    checked = ("results checked against the reference twin" if results and results[0].checked
               else "results not checked (--check checks them)")
    ops = list(dict.fromkeys(r.cell.op for r in results))
    groups = [(f"geomean {op}", [r for r in results if r.cell.op == op]) for op in ops]
    if len(ops) > 1:
        groups.append(("geomean all", list(results)))
    first = max([len(name) for name, _ in groups]
                + [len(r.cell.shape_label) for r in results] + [len("shape")])
    # (heading, width) of each column; text columns are left-aligned.
    columns = [("shape", first), ("dtype", 7), ("op", 8)] + [(peer, 9) for peer in PEERS] \
        + [("vs ref", 7), ("vs torch", 8), ("x floor", 7)]

    def row(values: Sequence[str]) -> str:
        cells = [f"{v:<{w}}" if i < 3 else f"{v:>{w}}"
                 for i, (v, (_, w)) in enumerate(zip(values, columns))]
        return "  ".join(cells).rstrip()

    def span(first_column: int, end_column: int) -> int:
        """Width of columns [first_column, end_column) with their separators."""
        widths = [w for _, w in columns[first_column:end_column]]
        return sum(widths) + 2 * (len(widths) - 1)

    per_channel = any(r.cell.layout != "flat" for r in results)
    mode = ("per-channel statistics (over N and every spatial position); nchw = NCHW-"
            "contiguous, cl = channels-last" if per_channel else
            "per-feature statistics (each sample flattened, as the book's class)")
    lines = [
        mode,
        f"bnfast {machine['bnfast']} ({machine['build_info']['isa']}, "
        f"{_count(threads['bnfast'], 'thread')}) | numpy {machine['numpy']} | {torch_part}",
        f"{machine['cpu']}, {_count(machine['cores'], 'core')} | median of "
        f"{_count(repeats, 'interleaved repeat')} per peer | {checked}",
        "",
        " " * (span(0, 3) + 2) + f"{'median time per call':^{span(3, 7)}}  "
        f"{'bnfast speedup':^{span(7, 9)}}  {'bnfast':>{span(9, 10)}}",
        row([name for name, _ in columns]),
    ]
    for r in results:
        lines.append(row([r.cell.shape_label, r.cell.dtype, r.cell.op]
                         + [format_time(r.time(peer)) for peer in PEERS]
                         + [_ratio(r.speedup("reference")), _ratio(r.speedup("torch")),
                            _ratio(r.floor_multiple)]))
    for name, members in groups:
        means = summary(members)
        lines.append(row([name, "", ""] + [""] * len(PEERS)
                         + [_ratio(means["speedup_vs_reference"]),
                            _ratio(means["speedup_vs_torch"]), _ratio(means["floor_multiple"])]))
    lines.append("")
    lines.append("speedup = peer time / bnfast time (higher is better); x floor = bnfast time "
                 "/ floor time (1.00 = at the memory-traffic floor)")
    return "\n".join(lines)


def report(results: Sequence[CellResult], machine: dict[str, Any], torch_note: str,
           settings: dict[str, Any]) -> dict[str, Any]:
    """Everything measured, as JSON-ready data."""
    cells = []
    for r in results:
        cells.append({
            "label": r.cell.label,
            "shape": list(r.cell.shape),
            "layout": r.cell.layout,
            "features": (r.cell.shape[1] if r.cell.layout != "flat"
                         else math.prod(r.cell.shape[1:])),
            "dtype": r.cell.dtype,
            "op": r.cell.op,
            "checked": r.checked,
            "peers": {peer: {"iterations": t.iterations, "seconds": list(t.seconds),
                             "median_s": t.median} for peer, t in r.timings.items()},
            "speedup_vs_reference": r.speedup("reference"),
            "speedup_vs_torch": r.speedup("torch"),
            "floor_multiple": r.floor_multiple,
        })
    ops = list(dict.fromkeys(r.cell.op for r in results))
    return {
        "machine": machine,
        "torch": ({"available": True, "version": machine["torch"]} if machine["torch"]
                  else {"available": False, "reason": torch_note}),
        "settings": settings,
        "cells": cells,
        "geomean": {**summary(results),
                    "by_op": {op: summary([r for r in results if r.cell.op == op])
                              for op in ops}},
    }


def _bar_label(value: Optional[float]) -> str:
    """Two significant digits, never in exponent notation."""
    if value is None:
        return ""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def plot(results: Sequence[CellResult], path: Path, machine: dict[str, Any]) -> None:
    """A PNG of bnfast's speedup over each peer, one panel per dtype, log scale."""
    from matplotlib.figure import Figure   # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import FuncFormatter

    dtypes = list(dict.fromkeys(r.cell.dtype for r in results))
    peers = [p for p in ("reference", "torch", "floor") if any(p in r.timings for r in results)]
    legend = {"reference": "vs reference (NumPy twin)", "torch": "vs torch",
              "floor": "vs floor (1 = at the floor)"}
    columns = max(sum(r.cell.dtype == dtype for r in results) for dtype in dtypes)
    fig = Figure(figsize=(max(8.0, 0.75 * columns + 1.5), 4.0 * len(dtypes)),
                 layout="constrained")
    axes = fig.subplots(len(dtypes), 1, squeeze=False, sharey=True)[:, 0]
    width = 0.8 / len(peers)
    for ax, dtype in zip(axes, dtypes):
        rows = [r for r in results if r.cell.dtype == dtype]
        positions = np.arange(len(rows))
        for k, peer in enumerate(peers):
            values = [r.speedup(peer) for r in rows]
            bars = ax.bar(positions + (k - (len(peers) - 1) / 2) * width,
                          [np.nan if v is None else v for v in values], width,
                          label=legend[peer])
            ax.bar_label(bars, [_bar_label(v) for v in values], fontsize=6, padding=1)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_xticks(positions, [f"{r.cell.shape_label}\n{r.cell.op}" for r in rows],
                      fontsize=7)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel("peer time / bnfast time")
        ax.set_title(dtype, loc="left", fontweight="bold")
    # From a whole decade (so some tick below the bars is labelled) to room
    # for the bar labels; ticks as plain numbers, not 10^k.
    speedups = [v for r in results for v in map(r.speedup, peers) if v is not None]
    axes[0].set_ylim(10 ** math.floor(math.log10(min(speedups))), 2 * max(speedups))
    for ax in axes:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # Above the first panel, right of its title, where it covers no bar.
    axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(peers),
                   fontsize=8, frameon=False)
    fig.suptitle(f"bnfast {machine['bnfast']} speedup over each peer (log scale, higher is "
                 f"better) - {machine['cpu']}, {_count(machine['threads']['bnfast'], 'thread')}")
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------
# The command line


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """'100x100,32x64x32x32' -> ((100, 100), (32, 64, 32, 32)); ArgumentTypeError if bad."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if not all(part.strip().isdigit() for part in parts):
            raise argparse.ArgumentTypeError(
                f"malformed shape {item.strip()!r}: write sizes joined by 'x', e.g. 256x1024 "
                "or 8x3x224x224, and separate shapes with commas")
        shape = tuple(int(part) for part in parts)
        if len(shape) < 2:
            raise argparse.ArgumentTypeError(
                f"shape {item.strip()!r} has one dimension; give a batch and its features, "
                "e.g. 256x1024")
        if min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {item.strip()!r} has a zero size")
        if shape[0] < 2:
            raise argparse.ArgumentTypeError(
                f"shape {item.strip()!r} has a batch of one; training needs at least two "
                "samples (the batch variance of one sample is 0, and torch refuses it)")
        shapes.append(shape)
    return tuple(dict.fromkeys(shapes))


def _names(kind: str, allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: comma-separated names from `allowed`, in the given order."""
    def parse(text: str) -> tuple[str, ...]:
        names = [name.strip().lower() for name in text.split(",")]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {name!r}; choose from {', '.join(allowed)}")
        return tuple(dict.fromkeys(names))
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _rank_counts(text: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(_positive_int(item.strip()) for item in text.split(",")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfast-bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true",
        help="a representative subset (shapes " + ", ".join(map(format_shape, QUICK_SHAPES))
             + "; both dtypes, all operations) in under a minute; turns --check on")
    parser.add_argument(
        "--per-channel", action="store_true",
        help="per-channel (spatial) batch normalization instead: statistics per channel of "
             "(N, C, *spatial) batches, each shape in NCHW and channels-last layout; default "
             "shapes " + ", ".join(map(format_shape, CHANNEL_SHAPES)) + " (--quick: "
             + ", ".join(map(format_shape, QUICK_CHANNEL_SHAPES)) + ")")
    parser.add_argument(
        "--shapes", type=parse_shapes, metavar="SHAPES",
        help="comma-separated shapes, e.g. 100x100,32x64x32x32 (default: the full grid "
             + ", ".join(map(format_shape, SHAPES)) + ", or the --quick subset)")
    parser.add_argument(
        "--dtypes", type=_names("dtype", DTYPES), default=DTYPES, metavar="DTYPES",
        help="comma-separated, from " + ", ".join(DTYPES) + " (default: both)")
    parser.add_argument(
        "--ops", type=_names("operation", OPS), default=OPS, metavar="OPS",
        help="comma-separated, from " + ", ".join(OPS) + " (default: all)")
    parser.add_argument(
        "--threads", type=_positive_int, metavar="N",
        help="threads for bnfast and torch (default: each library's default, normally "
             "one per core)")
    parser.add_argument(
        "--repeats", type=_positive_int, default=DEFAULT_REPEATS, metavar="N",
        help=f"timed repeats per peer and cell; the median is reported "
             f"(default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=None,
        help="compare bnfast's and torch's results with the reference twin before timing, "
             "and stop if they differ (default: on with --quick, off otherwise)")
    parser.add_argument(
        "--sync-ranks", type=_rank_counts, metavar="K,K,...",
        help="instead of the grid: time SyncBatchNormalization's training step on 1 process "
             "and on K MPI ranks (e.g. 1,2,4), compute and communication apart (needs "
             "bnfast[mpi])")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write every measurement and the machine's description here")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help=f"write a PNG chart here (needs matplotlib: {BENCH_EXTRA})")
    return parser


def _check_output_path(parser: argparse.ArgumentParser, option: str,
                       path: Optional[Path]) -> None:
    """Fail before measuring, not after, if an output cannot be written."""
    if path is not None and not path.resolve().parent.is_dir():
        parser.error(f"{option} {path}: directory {path.resolve().parent} does not exist")


def _set_threads(parser: argparse.ArgumentParser, threads: int,
                 torch: Optional[ModuleType]) -> None:
    try:
        bnfast.set_num_threads(threads)
    except (RuntimeError, ValueError) as exc:    # e.g. a build without OpenMP
        parser.error(f"--threads {threads}: {exc}")
    if torch is not None:
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    if threads > cores:
        print(f"bnfast-bench: warning: {threads} threads on {cores} cores; the threads "
              "will compete and timings will be noisy", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status (argument errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_output_path(parser, "--json", args.json)
    _check_output_path(parser, "--plot", args.plot)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(f"--plot needs matplotlib, which is not installed: {BENCH_EXTRA}")
    if args.sync_ranks is not None:
        return _sync_main(args)
    if args.per_channel:
        shapes = args.shapes or (QUICK_CHANNEL_SHAPES if args.quick else CHANNEL_SHAPES)
        layouts: tuple[str, ...] = CHANNEL_LAYOUTS
    else:
        shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
        layouts = ("flat",)
    check_results = args.quick if args.check is None else args.check

    torch, torch_note = load_torch()
    if args.threads is not None:
        _set_threads(parser, args.threads, torch)
    peers = [p for p in PEERS if p != "torch" or torch is not None]
    if torch is None:
        print(f"bnfast-bench: {torch_note}; timing without it (pip install torch to "
              "compare)", file=sys.stderr)

    load = _load_average()
    if load is not None and load >= 0.5:
        print(f"bnfast-bench: note: load average {load:.2f} at the start: other processes "
              "use (or used within the last minute) the CPU, and timings, multi-threaded "
              "ones most, suffer while they do", file=sys.stderr)
    cells = grid(shapes, args.dtypes, args.ops, layouts)
    print(f"bnfast-bench: {_count(len(cells), 'cell')} x {_count(len(peers), 'peer')} "
          f"({', '.join(peers)}), {_count(args.repeats, 'repeat')} each", file=sys.stderr)
    started = time.perf_counter()
    try:
        results = measure(cells, peers, args.repeats, check_results, progress=sys.stderr)
    except CheckFailed as exc:
        print(f"bnfast-bench: error: check failed: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("bnfast-bench: error: out of memory; leave out the largest --shapes",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bnfast-bench: interrupted", file=sys.stderr)
        return 130
    print(f"bnfast-bench: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    machine = machine_info(torch, load)
    print(format_table(results, machine, torch_note, args.repeats))
    settings = {"quick": args.quick, "repeats": args.repeats, "check": check_results,
                "target_repeat_s": TARGET_REPEAT_S, "shapes": [list(s) for s in shapes],
                "dtypes": list(args.dtypes), "ops": list(args.ops), "peers": peers,
                "per_channel": args.per_channel, "layouts": list(layouts),
                "seed": SEED, "eps": EPS, "momentum": MOMENTUM,
                "statistic": "median of repeats of per-call time"}
    try:
        if args.json is not None:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(report(results, machine, torch_note, settings), out, indent=1)
            print(f"bnfast-bench: wrote {args.json}", file=sys.stderr)
        if args.plot is not None:
            plot(results, args.plot, machine)
            print(f"bnfast-bench: wrote {args.plot}", file=sys.stderr)
    except OSError as exc:
        print(f"bnfast-bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _sync_main(args: argparse.Namespace) -> int:
    """--sync-ranks: SyncBatchNormalization's communication cost (bnfast._sync_bench)."""
    from bnfast import _sync_bench
    try:
        rows = _sync_bench.run_all(args.sync_ranks, args.repeats)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"bnfast-bench: error: {exc}", file=sys.stderr)
        return 1
    print(_sync_bench.format_rows(rows, os.cpu_count() or 1))
    if args.json is not None:
        try:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump({"sync_steps": rows}, out, indent=1)
        except OSError as exc:
            print(f"bnfast-bench: error: {exc}", file=sys.stderr)
            return 1
        print(f"bnfast-bench: wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
