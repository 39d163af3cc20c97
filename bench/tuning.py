#!/usr/bin/env python
"""Sweep bnfast's tuning knobs on this machine and report whether the defaults win.

    python bench/tuning.py [--quick] [--out docs/tuning.md] [--repeats N] [--threads N]
                           [--knobs a,b,...] [--plan]

Every run-time knob of the kernels' ``_set_tuning(...)`` is timed at its
default and at two or three alternatives (half and double, or off) on the
two or three batch shapes where its comment in the constants table
(``cdef enum`` in bnfast/_plan.pxd) says it decides
something, for the layer's training forward, eval forward and backward
(``bnfast.BatchNormalization``).  An alternative is timed only where it
changes the work the kernels do for that shape and operation: the grid that
``_grid_info(n, d, itemsize, out_itemsize)`` reports (for NCHW batches, the
per-channel plan, whose two knob-dependent fields are recomputed here),
including the rows per folded row (``fold``) where a pass covers whole rows.
Alternatives that change nothing are listed as "same grid" and not timed.

Timing: within each repeat the variants run in turns (default, alt1, alt2,
..., default again), each turn a loop of as many calls as last about 5 ms
with the default (3 ms with --quick; counted by ``bnfast._timing``), with
its tuning set just before its turn.  A variant's time is the median of
its per-call times over repeats; the default's pools both of its copies.
Each alternative is reported as a ratio to the default (> 1: the
alternative is slower, so the default wins), next to the noise: the ratio
of the default's second copy to its first.

The constants that are compiled in (not run-time knobs) are listed with
their values and comments, "compile-time; not swept".  The report is
markdown, printed to stdout and written to --out when given.  The kernels
are whichever variant bnfast loaded (set ``BNFAST_ISA=baseline|avx2|avx512``
to choose); the header names it.  Defaults are restored on exit, errors
included.

With the defaults (25 repeats, about 104 cells) a full sweep takes 1-1.5
minutes on 2 quiet cores (4 on a busy one); --quick (one float32 shape per
knob, 5 repeats) a few seconds.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

import bnfast
from bnfast import _native
from bnfast._native import kernels
from bnfast._timing import TARGET_REPEAT_S, calls_per_repeat

OPS = ("train", "eval", "backward")
DEFAULT_REPEATS = 25
QUICK_REPEATS = 5
#: One turn of the default lasts about this long (a full sweep); --quick
#: uses bnfast._timing's 3 ms.
TURN_S = 0.005
#: An alternative must beat (or lose to) the default by more than this
#: fraction, and by more than the cell's own noise, to count.
MIN_EFFECT = 0.03
#: A value no batch reaches: "off" for the size thresholds.
NEVER = sys.maxsize
SEED = 20261128
EPS = 1e-6
MOMENTUM = 0.9


# --------------------------------------------------------------------------
# What is swept


@dataclass(frozen=True)
class Shape:
    """A batch: its shape and layout ("flat": per feature; "nchw", "cl":
    per channel, NCHW-contiguous or channels-last memory)."""
    dims: tuple[int, ...]
    layout: str = "flat"

    @property
    def label(self) -> str:
        text = "x".join(str(n) for n in self.dims)
        return text if self.layout == "flat" else f"{text} {self.layout}"


def _flat(*dims: int) -> Shape:
    return Shape(tuple(dims))


def _cl(*dims: int) -> Shape:
    return Shape(tuple(dims), "cl")


def _nchw(*dims: int) -> Shape:
    return Shape(tuple(dims), "nchw")


Alternatives = Callable[[Any], list[tuple[str, Any]]]


def _half_double(default: Any) -> list[tuple[str, Any]]:
    return [("half", default // 2), ("double", default * 2)]


def _half_double_off(default: Any) -> list[tuple[str, Any]]:
    return [("half", default // 2), ("double", default * 2), ("off", NEVER)]


@dataclass(frozen=True)
class Sweep:
    """One knob: its alternatives, the shapes where it decides something
    (the first one float32 is the --quick shape), and the operations it can
    change."""
    knob: str
    constant: Optional[str]            # the constants-table entry it starts from
    alternatives: Alternatives
    shapes: tuple[tuple[Shape, str], ...]   # (shape, dtype)
    ops: tuple[str, ...] = OPS
    why: str = ""                      # what the shapes exercise


SWEEPS: tuple[Sweep, ...] = (
    Sweep("strip_bytes", "STRIP_BYTES", _half_double,
          ((_flat(128, 8192), "float32"), (_flat(32, 65536), "float32"),
           (_flat(64, 16384), "float64")),
          why="short, wide batches: strip width, and strips against row blocks"),
    Sweep("stream_min_bytes", "STREAM_MIN_BYTES", _half_double_off,
          ((_flat(32, 65536), "float32"), (_flat(1024, 4096), "float32"),
           (_cl(16, 64, 56, 56), "float32"), (_flat(1024, 2048), "float64"),
           (_nchw(32, 64, 56, 56), "float32"), (_nchw(64, 256, 28, 28), "float64"),
           (_flat(256, 65536), "float64")),
          why="outputs of 8-16 MiB, around the last-level-cache threshold (wide rows: "
              "strips and row blocks; 64 channels: element passes too); batches of "
              "25-128 MiB: whole channel or column blocks, or the phases where off"),
    Sweep("col_block", "COL_BLOCK",
          lambda d: [("half", d // 2), ("quarter", d // 4)],
          ((_flat(512, 2048), "float32"), (_flat(1024, 4096), "float32"),
           (_flat(512, 4096), "float64")),
          why="tall batches (row blocks) wider than the block"),
    Sweep("page_bytes", "PAGE_BYTES", _half_double,
          ((_nchw(16, 64, 56, 56), "float32"), (_flat(2048, 4096), "float32"),
           (_flat(16384, 512), "float32"), (_flat(2048, 2048), "float64")),
          why="element passes over outputs of 12-32 MiB (below that the tasks-per-thread "
              "cap decides)"),
    Sweep("max_strip_cols", "MAX_STRIP_COLS",
          lambda d: [("half", d // 2), ("quarter", d // 4)],
          ((_flat(16, 65536), "float32"), (_flat(8, 150528), "float32"),
           (_flat(8, 65536), "float64")),
          why="very short batches whose strips would be wider than the cap"),
    Sweep("cache_stream_min_bytes", "CACHE_STREAM_MIN_BYTES", _half_double_off,
          ((_flat(256, 4096), "float32"), (_flat(32, 65536), "float32"),
           (_nchw(16, 64, 32, 32), "float32"), (_flat(256, 4096), "float64")),
          ops=("train",),
          why="training forwards of 4-8 MiB (the copy of x kept for the backward)"),
    Sweep("stream_pages_max_cols", "STREAM_PAGES_MAX_COLS",
          lambda d: [("off", 0), ("half", d // 2), ("x4", d * 4)],
          ((_cl(16, 64, 56, 56), "float32"), (_flat(16384, 256), "float32"),
           (_flat(8192, 512), "float32"), (_flat(8192, 256), "float64"),
           (_flat(4096, 1024), "float32")),
          why="streamed outputs (above stream_min_bytes) of rows of 64-1024 features"),
    Sweep("fold_max_cols", "FOLD_MAX_COLS",
          lambda d: [("off", 0), ("half", d // 2), ("double", d * 2)],
          ((_flat(4096, 48), "float32"), (_cl(64, 3, 64, 64), "float32"),
           (_flat(2048, 100), "float32"), (_flat(4096, 48), "float64")),
          why="rows of 3-100 features (channels-last images with few channels, narrow "
              "batches)"),
)


# --------------------------------------------------------------------------
# The kernels' tuning


def knob_defaults() -> dict[str, Any]:
    """The run-time knobs of the loaded kernels and their defaults."""
    params = inspect.signature(kernels._set_tuning).parameters
    return {name: p.default for name, p in params.items()
            if p.default is not inspect.Parameter.empty}


def set_tuning(settings: dict[str, Any]) -> None:
    """Set the knobs in `settings`, every other one at its default."""
    kernels._set_tuning(**settings)


def restore_defaults() -> None:
    kernels._set_tuning()


@dataclass(frozen=True)
class Constant:
    name: str
    value: int
    comment: str
    source: str


_ENUM_ENTRY = re.compile(r"^\s+([A-Z][A-Z0-9_]*)\s*=\s*([0-9]+)\s*(#.*)?$")


def _source_files() -> list[Path]:
    here = Path(bnfast.__file__).resolve().parent
    return sorted(p for pattern in ("*.pyx", "*.pxi", "*.pxd") for p in here.glob(pattern)
                  if not re.match(r"_loops_(avx2|avx512|neon)", p.name))


def compiled_constants(files: Optional[Sequence[Path]] = None) -> list[Constant]:
    """The constants of every ``cdef enum:`` block in bnfast's Cython sources,
    each with the comment above it (a constant without one shares the
    previous constant's)."""
    found: list[Constant] = []
    for path in _source_files() if files is None else files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        inside = False
        comment: list[str] = []
        previous = ""
        for line in lines:
            if re.match(r"^cdef enum\s*:", line):
                inside, comment, previous = True, [], ""
                continue
            if not inside:
                continue
            if line.strip() == "":
                continue
            if not line[:1].isspace():
                inside = False
                continue
            text = line.strip()
            if text.startswith("#"):
                comment.append(text.lstrip("#").strip())
                continue
            match = _ENUM_ENTRY.match(line)
            if match is None:
                continue
            name, value, trailing = match.groups()
            if trailing:
                comment.append(trailing.lstrip("#").strip())
            words = " ".join(comment) if comment else (f"(see {previous})" if previous else "")
            found.append(Constant(name, int(value), words, path.name))
            comment, previous = [], name
    return found


# --------------------------------------------------------------------------
# What a variant changes: the work the kernels would do


def kernel_view(shape: Shape) -> tuple[str, int, int, int]:
    """(kind, n, c, s): "rows" (n, c) rows of c features, or "planes" n x c
    planes of s values, as bnfast._channels lays a batch out."""
    dims = shape.dims
    if shape.layout == "flat":
        return "rows", dims[0], math.prod(dims[1:]), 1
    n, c, s = dims[0], dims[1], math.prod(dims[2:])
    if shape.layout == "cl" or s == 1:
        return "rows", n * s, c, 1
    return "planes", n, c, s


_EVAL_FIELDS = ("col_block", "page_rows", "page_cols", "n_col_splits", "n_page_tasks",
                "n_threads", "stream_pages")
_PAGE_FIELDS = ("page_rows", "page_cols", "n_col_splits", "n_page_tasks", "stream_pages")


def route(shape: Shape, dtype: str, op: str, settings: dict[str, Any]) -> tuple[Any, ...]:
    """What the kernels do for `op` on this batch under `settings`: the
    fields of the work grid (or per-channel plan) that `op` reads, plus the
    route switches the grid does not show.  Two variants with equal routes
    run the same code on the same tasks."""
    kind, n, c, s = kernel_view(shape)
    itemsize = np.dtype(dtype).itemsize
    settings = {**knob_defaults(), **settings}
    set_tuning(settings)
    try:
        if kind == "planes":
            return ("planes",) + _planes_route(dict(kernels._planes_info(n, c, s, itemsize)), op)
        grid = dict(kernels._grid_info(n, c, itemsize, itemsize))
    finally:
        restore_defaults()
    # Passes fold short rows (grid["fold"] > 1) where their columns are whole rows.
    fold = grid.pop("fold", 1)
    folded = grid.get("n_col_blocks", 1) == 1 and fold > 1
    if op == "eval":
        return ("eval", folded) + tuple(grid.get(f) for f in _EVAL_FIELDS)
    if op != "train":
        grid.pop("stream_cache", None)
    if grid.get("fused"):
        for f in _PAGE_FIELDS:
            grid.pop(f, None)
    return (op, folded) + tuple(sorted(grid.items()))


def _planes_route(planes: dict[str, Any], op: str) -> tuple[Any, ...]:
    """The fields of a per-channel plan (_planes_info) that `op` reads: an
    eval forward only its element-pass tasks; whole channel blocks
    (`whole_blocks`) no element-pass tasks; only a training forward the copy's
    streaming."""
    if op == "eval":
        return (op, planes["per_task"], planes["n_elem_tasks"], planes["n_threads"])
    if op != "train":
        planes.pop("stream_cache")
    if planes["whole_blocks"]:
        planes.pop("per_task")
        planes.pop("n_elem_tasks")
    return (op,) + tuple(sorted(planes.items()))


# --------------------------------------------------------------------------
# The calls


def _in_layout(a: np.ndarray, layout: str) -> np.ndarray:
    if layout != "cl":
        return a
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


@dataclass
class Data:
    x: np.ndarray
    dout: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    per_channel: bool


def make_data(shape: Shape, dtype: str) -> Data:
    """Seeded data; running statistics of x's dtype, so that every output is too."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng([SEED, dt.itemsize, *shape.dims])
    d = shape.dims[1] if shape.layout != "flat" else math.prod(shape.dims[1:])
    x = rng.standard_normal(shape.dims, dtype=dt)
    x *= 2.0
    x += 0.5
    return Data(x=_in_layout(x, shape.layout),
                dout=_in_layout(rng.standard_normal(shape.dims, dtype=dt), shape.layout),
                gamma=1.0 + 0.5 * rng.standard_normal(d, dtype=dt),
                beta=rng.standard_normal(d, dtype=dt),
                running_mean=0.1 * rng.standard_normal(d, dtype=dt),
                running_var=0.5 + 1.5 * rng.random(d, dtype=dt),
                per_channel=shape.layout != "flat")


def layer_call(data: Data, op: str) -> Callable[[], Any]:
    """One call of `op` through bnfast.BatchNormalization (a fresh layer; a
    backward's layer has run its training forward under the current tuning)."""
    layer = bnfast.BatchNormalization(
        data.gamma, data.beta, MOMENTUM, running_mean=data.running_mean.copy(),
        running_var=data.running_var.copy(), eps=EPS, per_channel=data.per_channel)
    x = data.x
    if op == "train":
        return lambda: layer.forward(x, True)
    if op == "eval":
        return lambda: layer.forward(x, False)
    layer.forward(x, True)
    dout = data.dout
    return lambda: layer.backward(dout)


# --------------------------------------------------------------------------
# Timing


@dataclass
class Variant:
    label: str                      # "default", "default (copy)", "half", ...
    value: Any
    settings: dict[str, Any]
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _loop(call: Callable[[], Any], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    return (time.perf_counter() - start) / iterations


def time_variants(data: Data, op: str, variants: Sequence[Variant], repeats: int,
                  target_s: float) -> int:
    """Interleaved timing of `variants` (each with its own tuning) on one
    cell; fills each variant's per-call seconds, one per repeat, and returns
    the calls per turn (the default's count, used for every variant)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        calls = []
        for v in variants:
            set_tuning(v.settings)
            calls.append(layer_call(data, op))
        set_tuning(variants[0].settings)
        iterations = calls_per_repeat(calls[0], target_s)
        for v, call in zip(variants, calls):           # one untimed turn each: warm-up
            set_tuning(v.settings)
            _loop(call, iterations)
        for _ in range(repeats):
            for v, call in zip(variants, calls):
                set_tuning(v.settings)
                v.seconds.append(_loop(call, iterations))
    finally:
        restore_defaults()
        if collecting:
            gc.enable()
    return iterations


# --------------------------------------------------------------------------
# Results


@dataclass
class Row:
    shape: Shape
    dtype: str
    ops: tuple[str, ...]            # one op when timed; the ops it leaves alone when not
    default: Any
    alt_label: str
    alt_value: Any
    default_s: Optional[float] = None
    ratio: Optional[float] = None
    noise: Optional[float] = None
    note: str = ""                  # why not timed, or an error


@dataclass
class KnobResult:
    sweep: Sweep
    default: Any
    rows: list[Row] = field(default_factory=list)
    skipped: str = ""               # why the whole knob was not swept
    seconds: float = 0.0
    threads: int = 0                # the kernels' threads during the sweep

    @property
    def timed(self) -> list[Row]:
        return [r for r in self.rows if r.ratio is not None]


def format_value(value: Any, knob: str = "") -> str:
    """A knob's value for the tables: sizes of the *_bytes knobs in KiB/MiB."""
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    if value == NEVER:
        return "never"
    if not knob.endswith("_bytes") or value < 1 << 10:
        return str(value)
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            if value % size == 0:
                return f"{value // size} {unit}"
            return f"{value / size:.1f} {unit} ({value})"
    return str(value)


def _threshold(noise: Optional[float]) -> float:
    return max(MIN_EFFECT, abs(1.0 - noise) if noise is not None else 0.0)


#: A cell whose two copies of the default differ by more than this is too
#: noisy to rank alternatives on.
NOISY = 0.10


def verdict(result: KnobResult, brief: bool = False) -> str:
    """One line: does the default win on this machine?  (brief: only the
    largest win, for the summary table.)"""
    if result.skipped:
        return result.skipped
    if any(r.note.startswith("changes the grid") for r in result.rows):
        return "--plan: nothing timed"
    timed = result.timed
    if not timed:
        if any(r.note.startswith("error") for r in result.rows):
            return "errors: see the table"
        threads = result.threads
        return (f"no alternative changes the kernels' work on these shapes with {threads} "
                f"thread{'s' if threads != 1 else ''}: the knob decides nothing here "
                "(candidate for removal, or sweep other shapes)")
    wins: dict[str, tuple[float, Row]] = {}
    losses: dict[str, float] = {}
    for r in timed:
        assert r.ratio is not None
        limit = _threshold(r.noise)
        key = f"{r.alt_label} ({format_value(r.alt_value, result.sweep.knob)})"
        if r.ratio < 1.0 - limit and (key not in wins or r.ratio < wins[key][0]):
            wins[key] = (r.ratio, r)
        if r.ratio > 1.0 + limit:
            losses[key] = max(losses.get(key, 1.0), r.ratio)
    noisy = sum(1 for r in timed if _threshold(r.noise) > NOISY)
    cells = len({(r.shape, r.dtype, r.ops) for r in timed})
    noisy_cells = len({(r.shape, r.dtype, r.ops) for r in timed if _threshold(r.noise) > NOISY})
    suffix = (f" ({noisy_cells} of {cells} cells noisier than {100 * NOISY:.0f}%: rerun on a "
              "quiet machine)" if noisy else "")
    if not wins:
        if losses:
            worst = max(losses.values())
            return (f"default best within noise (alternatives up to "
                    f"{100 * (worst - 1):.0f}% slower)" + suffix)
        return "default best within noise (no alternative differs beyond it)" + suffix
    parts = []
    ranked = sorted(wins.items(), key=lambda kv: kv[1][0])
    for key, (ratio, r) in ranked[:1] if brief else ranked:
        text = (f"alternative {key} faster by {100 * (1 - ratio):.0f}% on {r.shape.label} "
                f"{r.dtype} {r.ops[0]} — consider")
        if key in losses:
            text += f" (but up to {100 * (losses[key] - 1):.0f}% slower elsewhere)"
        parts.append(text)
    if brief and len(ranked) > 1:
        parts.append(f"{len(ranked) - 1} more alternative(s) win somewhere (see below)")
    return "; ".join(parts) + suffix


def _geomeans(result: KnobResult) -> str:
    by_alt: dict[str, list[float]] = {}
    for r in result.timed:
        assert r.ratio is not None
        key = f"{r.alt_label} ({format_value(r.alt_value, result.sweep.knob)})"
        by_alt.setdefault(key, []).append(r.ratio)
    return ", ".join(f"{key} {math.exp(statistics.fmean(math.log(v) for v in values)):.3f} "
                     f"over {len(values)}" for key, values in by_alt.items())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cache_size(index: int) -> str:
    path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


def _commit() -> str:
    try:
        root = Path(bnfast.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "bnfast"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + (" (bnfast/ modified)" if dirty.stdout.strip() else "")


def load_average() -> str:
    """The 1-minute load average (other work on the machine skews timings)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"


def header(args: argparse.Namespace, elapsed: float, threads: int) -> list[str]:
    info = bnfast.build_info()
    forced = os.environ.get("BNFAST_ISA", "")
    isa = f"{info['isa']}" + (f" (BNFAST_ISA={forced})" if forced else " (auto)")
    variants = info.get("isa_built")
    built = ", ".join(str(v) for v in variants) if isinstance(variants, list) else str(variants)
    return [
        "# bnfast tuning sweep",
        "",
        "Generated by `python bench/tuning.py" + "".join(f" {a}" for a in args.argv) + "`.",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {_cpu_model()} ({os.cpu_count()} logical CPUs; L2 {_cache_size(2)}, "
        f"L3 {_cache_size(3)} per cpu0) |",
        f"| kernels | {isa}; built: {built}; "
        f"loops `{_native.loops.__name__}` |",
        f"| threads | {threads} |",
        f"| bnfast | {bnfast.__version__}, commit {_commit()} |",
        f"| numpy | {np.__version__} |",
        f"| Python | {platform.python_version()} |",
        f"| date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
        f"| repeats | {args.repeats} ({'quick' if args.quick else 'full'} sweep, "
        f"{elapsed:.0f} s) |",
        f"| load average | {args.load_before} (1 minute, before the sweep: other work on the "
        "machine skews the timings) |",
        "",
    ]


METHOD = """\
## Method

For each run-time knob of `_set_tuning(...)` the layer (`bnfast.BatchNormalization`)
is timed at the knob's default and at two or three alternatives, every other
knob at its default, on shapes where the knob decides something.  An
alternative is timed only where it changes the kernels' work for that shape
and operation (the fields of `_grid_info(n, d, itemsize, out_itemsize)` the
operation reads, or the per-channel plan, plus the fold switch); otherwise its row says "same grid" and it is not timed.

Within each repeat the variants run in turns: default, alternatives, default
again, each turn a loop of as many calls as last about {target_ms:g} ms with the
default, each with its tuning set just before its turn.  Times are medians
over repeats (the default's pools its two copies).  **ratio** is an
alternative's time over the default's: above 1 the alternative is slower (the
default wins).  **noise** is the default's second copy over its first: how
far apart two runs of the same code come out in that cell.  An alternative
counts as faster (slower) where its ratio is below (above) 1 by more than
the cell's noise and by more than {min_effect:.0f}%.  train: a training forward;
eval: an eval-mode forward; backward: the backward of a training forward.
Running statistics are of x's dtype, so every output is too.
"""


def knob_section(result: KnobResult, comments: dict[str, Constant]) -> list[str]:
    sweep = result.sweep
    lines = [f"### `{sweep.knob}`", ""]
    const = comments.get(sweep.constant or "")
    if const is not None:
        lines += [f"Constant `{const.name}` = {const.value} ({const.source}): {const.comment}", ""]
    if sweep.why:
        lines += [f"Shapes: {sweep.why}.", ""]
    lines += [f"**Verdict:** {verdict(result)}", ""]
    if result.timed:
        lines += [f"Geomean ratio per alternative: {_geomeans(result)}.", ""]
    if result.rows:
        lines += ["| shape | dtype | op | default | default time | alternative | ratio | noise |",
                  "|---|---|---|---|---:|---|---:|---:|"]
        for r in result.rows:
            time_text = f"{r.default_s * 1e6:.1f} µs" if r.default_s is not None else ""
            ratio = f"{r.ratio:.3f}" if r.ratio is not None else r.note
            noise = f"{r.noise:.3f}" if r.noise is not None else ""
            lines.append(f"| {r.shape.label} | {r.dtype} | {', '.join(r.ops)} | "
                         f"{format_value(r.default, sweep.knob)} | {time_text} | "
                         f"{r.alt_label} = {format_value(r.alt_value, sweep.knob)} | {ratio} | "
                         f"{noise} |")
        lines.append("")
    return lines


def report(results: Sequence[KnobResult], args: argparse.Namespace, elapsed: float,
           threads: int, constants: Sequence[Constant], unswept: Sequence[str]) -> str:
    by_name = {c.name: c for c in constants}
    lines = header(args, elapsed, threads)
    lines += METHOD.format(target_ms=args.target_ms,
                           min_effect=100 * MIN_EFFECT).splitlines() + [""]
    lines += ["## Run-time knobs", ""]
    lines += ["| knob | default | verdict |", "|---|---|---|"]
    for result in results:
        knob = result.sweep.knob
        lines.append(f"| `{knob}` | {format_value(result.default, knob)} | "
                     f"{verdict(result, brief=True)} |")
    for name in unswept:
        lines.append(f"| `{name}` | {format_value(knob_defaults()[name], name)} | "
                     "no sweep defined in bench/tuning.py: not swept |")
    lines.append("")
    for result in results:
        lines += knob_section(result, by_name)
    swept_constants = {r.sweep.constant for r in results if r.sweep.constant}
    swept_constants |= {s.constant for s in SWEEPS if s.constant}
    fixed = [c for c in constants if c.name not in swept_constants]
    lines += ["## Compile-time constants", "",
              "These are compiled in (`cdef enum`); changing one needs a rebuild, so "
              "this script does not sweep them.", "",
              "| constant | value | source | status | what it trades |",
              "|---|---:|---|---|---|"]
    if not constants:
        lines.append("| (the Cython sources were not found next to the installed package) "
                     "| | | | |")
    for c in fixed:
        lines.append(f"| `{c.name}` | {c.value} | {c.source} | compile-time; not swept | "
                     f"{c.comment.replace('|', '/')} |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The sweep


def _cells(sweep: Sweep, quick: bool) -> list[tuple[Shape, str]]:
    if not quick:
        return list(sweep.shapes)
    first32 = [cell for cell in sweep.shapes if cell[1] == "float32"]
    return first32[:1] or list(sweep.shapes[:1])


@dataclass(frozen=True)
class Plan:
    """One alternative on one (shape, dtype): the ops whose work it changes
    (timed) and those it leaves alone (not timed), and why not."""
    label: str
    value: Any
    changed: tuple[str, ...]
    same: tuple[str, ...]
    note: str


def plan_knob(sweep: Sweep, defaults: dict[str, Any],
              quick: bool) -> Iterator[tuple[Shape, str, list[Plan]]]:
    """Per (shape, dtype) of the sweep: a Plan for each alternative."""
    default = defaults[sweep.knob]
    for shape, dtype in _cells(sweep, quick):
        plans = []
        for label, value in sweep.alternatives(default):
            if value == default:
                continue
            try:
                set_tuning({sweep.knob: value})
            except (ValueError, TypeError, OverflowError) as exc:
                plans.append(Plan(label, value, (), sweep.ops, f"rejected by _set_tuning: {exc}"))
                continue
            finally:
                restore_defaults()
            changed = tuple(op for op in sweep.ops
                            if route(shape, dtype, op, {sweep.knob: value})
                            != route(shape, dtype, op, {}))
            same = tuple(op for op in sweep.ops if op not in changed)
            plans.append(Plan(label, value, changed, same, "same grid — not timed"))
        yield shape, dtype, plans


def sweep_knob(sweep: Sweep, defaults: dict[str, Any], args: argparse.Namespace,
               log: Callable[[str], None]) -> KnobResult:
    start = time.perf_counter()
    default = defaults[sweep.knob]
    result = KnobResult(sweep, default, threads=bnfast.get_num_threads())
    for shape, dtype, plans in plan_knob(sweep, defaults, args.quick):
        data: Optional[Data] = None
        for op in sweep.ops:
            timed = [(p.label, p.value) for p in plans if op in p.changed]
            if not timed or args.plan:
                continue
            if data is None:
                data = make_data(shape, dtype)
            variants = [Variant("default", default, {})]
            variants += [Variant(label, value, {sweep.knob: value}) for label, value in timed]
            variants.append(Variant("default (copy)", default, {}))
            try:
                time_variants(data, op, variants, args.repeats, args.target_ms / 1000)
            except Exception as exc:       # report the cell, go on with the sweep
                for label, value in timed:
                    result.rows.append(Row(shape, dtype, (op,), default, label, value,
                                           note=f"error: {type(exc).__name__}: {exc}"))
                log(f"  {shape.label} {dtype} {op}: {type(exc).__name__}: {exc}")
                continue
            first, copy = variants[0], variants[-1]
            default_s = statistics.median(first.seconds + copy.seconds)
            noise = copy.median / first.median
            for v in variants[1:-1]:
                result.rows.append(Row(shape, dtype, (op,), default, v.label, v.value,
                                       default_s=default_s, ratio=v.median / default_s,
                                       noise=noise))
            log(f"  {shape.label} {dtype} {op}: default {default_s * 1e6:.1f} us, "
                + ", ".join(f"{v.label} {v.median / default_s:.3f}" for v in variants[1:-1])
                + f", noise {noise:.3f}")
        for p in plans:
            if p.same:
                result.rows.append(Row(shape, dtype, p.same, default, p.label, p.value,
                                       note=p.note))
            if args.plan and p.changed:
                result.rows.append(Row(shape, dtype, p.changed, default, p.label, p.value,
                                       note="changes the grid (--plan: not timed)"))
        del data
    result.seconds = time.perf_counter() - start
    return result


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/tuning.py",
        description="Sweep bnfast's run-time tuning knobs on this machine: each knob's "
                    "default against alternatives, interleaved, as ratios to the default.")
    parser.add_argument("--quick", action="store_true",
                        help=f"one float32 shape per knob and {QUICK_REPEATS} repeats "
                             "(a few seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the markdown report here (e.g. docs/tuning.md)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"repeats per cell (default {DEFAULT_REPEATS}, "
                             f"{QUICK_REPEATS} with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the kernels (default: bnfast's, one per core)")
    parser.add_argument("--knobs", default=None,
                        help="comma-separated knobs to sweep (default: all)")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="length of one turn of the default, in milliseconds "
                             f"(default {1000 * TURN_S:g}, {1000 * TARGET_REPEAT_S:g} with "
                             "--quick)")
    parser.add_argument("--plan", action="store_true",
                        help="only show which alternatives change the grid; time nothing")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.target_ms is None:
        args.target_ms = 1000 * (TARGET_REPEAT_S if args.quick else TURN_S)
    if args.target_ms <= 0:
        parser.error("--target-ms must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    defaults = knob_defaults()
    known = {s.knob for s in SWEEPS}
    wanted = None if args.knobs is None else [k.strip() for k in args.knobs.split(",")
                                             if k.strip()]
    if wanted is not None:
        unknown = [k for k in wanted if k not in known and k not in defaults]
        if unknown:
            print(f"bench/tuning.py: unknown knobs: {', '.join(unknown)} "
                  f"(known: {', '.join(s.knob for s in SWEEPS)})", file=sys.stderr)
            return 2
    constants = compiled_constants()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    threads_before = bnfast.get_num_threads()
    args.load_before = load_average()
    start = time.perf_counter()
    results: list[KnobResult] = []
    try:
        if args.threads is not None:
            bnfast.set_num_threads(args.threads)
        threads = bnfast.get_num_threads()
        restore_defaults()
        for sweep in SWEEPS:
            if wanted is not None and sweep.knob not in wanted:
                continue
            if sweep.knob not in defaults:
                results.append(KnobResult(sweep, None, skipped="not a run-time knob of this "
                                          "build's _set_tuning: not swept"))
                continue
            log(f"{sweep.knob} (default {format_value(defaults[sweep.knob], sweep.knob)})")
            result = sweep_knob(sweep, defaults, args, log)
            log(f"  -> {verdict(result)} [{result.seconds:.1f} s]")
            results.append(result)
    finally:
        restore_defaults()
        bnfast.set_num_threads(threads_before)
    elapsed = time.perf_counter() - start
    unswept = [k for k in defaults if k not in known and (wanted is None or k in wanted)]
    text = report(results, args, elapsed, threads, constants, unswept)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    errors = sum(1 for r in results for row in r.rows if row.note.startswith("error"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
