#!/usr/bin/env python
"""Compare two builds of bnfast's hot loops in one process.

    python bench/ab_loops.py BASE [--quick] [--per-channel | --all] [--cells CELLS]
                             [--repeats N] [--target-ms MS] [--threads N] [--json PATH]

BASE is another build of this checkout: a directory that holds
``bnfast/_loops*.so`` (a git worktree of the commit to compare against,
built in place with ``python setup.py build_ext --inplace``).  The running
bnfast's loops module (the variant it loaded: set ``BNFAST_ISA`` to choose)
and BASE's build of the same variant are both loaded into this process, and
every cell is timed in turns, this build, BASE, this build again, with the
dispatch switched between them (``_kernels._use_loops``) before each turn.
Data, outputs, the planner and the Python layer are the same objects in
every turn, so what differs is only the loops' machine code.

Why: on a shared machine the same build's cells swing by up to 30% from
process to process (memory placement, neighbours), which hides a 10%
change in the loops; in one process the two turns of this build agree to a
few percent.  The "noise" column is that agreement: this build's second
turn over its first.  The comparison across processes (``bnfast-bench
--compare``) is still the one to use where the planner or the Python layer
changed.

BASE's loops must have been built from the same data layouts
(bnfast/_plan.pxd) as this build: other layouts are refused with an
ImportError, since the planner would hand them structures they misread.

Speedup = BASE's time / this build's (the mean of its two turns): above 1,
this build is faster.  A cell counts as slower beyond noise where its
speedup is under 1 by more than its noise and by more than 3%.
"""
from __future__ import annotations

import argparse
import gc
import glob
import importlib.machinery
import importlib.util
import json
import math
import os
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bnfast                                           # noqa: E402
from bnfast import _native, bench                       # noqa: E402
from bnfast._timing import calls_per_repeat             # noqa: E402
from tuning import Shape, _loop, layer_call, make_data  # noqa: E402

OPS = ("train", "eval", "backward")
DTYPES = ("float64", "float32")


def load_base(base: str) -> ModuleType:
    """BASE's build of the loops variant this process runs, as a module
    (not registered: the running one keeps its name in sys.modules)."""
    name = _native.loops.__name__
    stem = name.rpartition(".")[2]
    paths = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in glob.glob(os.path.join(base, "bnfast", stem + suffix))]
    if not paths:
        raise FileNotFoundError(f"{base}: no bnfast/{stem} extension module (build BASE in "
                                f"place: python setup.py build_ext --inplace)")
    mine = getattr(_native.loops, "__file__", None)
    if mine is not None and os.path.samefile(paths[0], mine):
        raise ValueError(f"{base} is this build: give the directory of another one")
    running = sys.modules.pop(name)
    try:
        spec = importlib.util.spec_from_file_location(name, paths[0])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.modules[name] = running
    _native.kernels._use_loops(module)         # refuses other layouts
    _native.kernels._use_loops(_native.loops)
    return module


def default_cells(quick: bool, per_feature: bool, per_channel: bool) -> list[tuple[Shape, str, str]]:
    shapes: list[Shape] = []
    if per_feature:
        shapes += [Shape(s) for s in (bench.QUICK_SHAPES if quick else bench.SHAPES)]
    if per_channel:
        for s in (bench.QUICK_CHANNEL_SHAPES if quick else bench.CHANNEL_SHAPES):
            shapes += [Shape(s, "nchw"), Shape(s, "cl")]
    return [(shape, dtype, op) for shape in shapes for dtype in DTYPES for op in OPS]


def parse_cells(text: str) -> list[tuple[Shape, str, str]]:
    """"256x1024:float32:train,8x3x224x224:nchw:float64:backward" (layout:
    flat when not given)."""
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) == 3:
            parts.insert(1, "flat")
        if len(parts) != 4 or parts[1] not in ("flat", "nchw", "cl") \
                or parts[2] not in DTYPES or parts[3] not in OPS:
            raise argparse.ArgumentTypeError(
                f"cell {item!r}: expected SHAPE[:LAYOUT]:DTYPE:OP, layout flat|nchw|cl, "
                f"dtype {'|'.join(DTYPES)}, op {'|'.join(OPS)}")
        dims = tuple(int(n) for n in parts[0].split("x"))
        cells.append((Shape(dims, parts[1]), parts[2], parts[3]))
    return cells


def time_cell(shape: Shape, dtype: str, op: str, base: ModuleType, repeats: int,
              target_s: float) -> dict[str, Any]:
    """Per-call seconds of this build (two turns) and BASE, interleaved."""
    data = make_data(shape, dtype)
    call = layer_call(data, op)
    builds = (_native.loops, base, _native.loops)
    times: list[list[float]] = [[], [], []]
    collecting = gc.isenabled()
    gc.disable()
    try:
        iterations = calls_per_repeat(call, target_s)
        for module in builds:                   # an untimed turn each: warm-up
            _native.kernels._use_loops(module)
            _loop(call, iterations)
        for _ in range(repeats):
            for turn, module in enumerate(builds):
                _native.kernels._use_loops(module)
                times[turn].append(_loop(call, iterations))
    finally:
        _native.kernels._use_loops(_native.loops)
        if collecting:
            gc.enable()
    first, base_s, second = (statistics.median(t) for t in times)
    mine = (first + second) / 2
    return {"cell": f"{shape.label} {dtype} {op}", "this_s": mine, "base_s": base_s,
            "speedup": base_s / mine, "noise": second / first}


def slower(row: dict[str, Any]) -> bool:
    spread = abs(row["noise"] - 1.0)
    return row["speedup"] < 1.0 - max(spread, 0.03)


def report(rows: Sequence[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             f"{'cell':36s} {'this build':>11s} {'base':>11s} {'speedup':>8s} {'noise':>7s}"]
    for r in rows:
        lines.append(f"{r['cell']:36s} {r['this_s'] * 1e6:9.1f}us {r['base_s'] * 1e6:9.1f}us "
                     f"{r['speedup']:8.3f} {r['noise']:7.3f}" + ("  slower" if slower(r) else ""))
    speedups = [r["speedup"] for r in rows]
    noises = [r["noise"] for r in rows]
    lowest = min(rows, key=lambda r: r["speedup"])
    lines += ["",
              f"geomean speedup {math.exp(statistics.fmean(map(math.log, speedups))):.3f} over "
              f"{len(rows)} cells; lowest {lowest['speedup']:.3f} ({lowest['cell']})",
              f"noise (this build's second turn / first): geomean "
              f"{math.exp(statistics.fmean(map(math.log, noises))):.3f}, range "
              f"{min(noises):.3f}-{max(noises):.3f}",
              f"slower beyond noise: {sum(map(slower, rows))} of {len(rows)} cells"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", metavar="BASE", help="directory of the other build")
    parser.add_argument("--quick", action="store_true", help="the bench's --quick shapes")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--per-channel", action="store_true", help="the per-channel grid only")
    grid.add_argument("--all", action="store_true", help="both grids")
    parser.add_argument("--cells", type=parse_cells, metavar="CELLS",
                        help="SHAPE[:LAYOUT]:DTYPE:OP,... instead of a grid")
    parser.add_argument("--repeats", type=int, default=15, metavar="N")
    parser.add_argument("--target-ms", type=float, default=3.0, metavar="MS",
                        help="length of one turn (default 3 ms)")
    parser.add_argument("--threads", type=int, default=None, metavar="N")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        bnfast.set_num_threads(args.threads)
    base = load_base(args.base)
    cells = args.cells or default_cells(args.quick, not args.per_channel,
                                        args.per_channel or args.all)
    rows = []
    for shape, dtype, op in cells:
        rows.append(time_cell(shape, dtype, op, base, args.repeats, args.target_ms / 1e3))
        print(f"[{len(rows)}/{len(cells)}] {rows[-1]['cell']}: {rows[-1]['speedup']:.3f}",
              file=sys.stderr, flush=True)
    header = (f"this build: {_native.loops.__file__}\nbase: {base.__file__}\n"
              f"variant {_native.isa}, {bnfast.get_num_threads()} threads, "
              f"{args.repeats} repeats of 3 turns")
    print(report(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
