"""Time bnfast against the NumPy reference, PyTorch, JAX, Numba and the memory floor.

Run as ``python -m bnfast.bench`` or ``bnfast-bench``.  Every cell of the grid
(shape x dtype x operation) times these peers, interleaved in one process:

  bnfast     bnfast.BatchNormalization
  reference  bnfast.reference.BatchNormalization, the pure-NumPy twin of the
             class in Deep Learning from Scratch (what bnfast replaces)
  torch      torch.nn.functional.batch_norm; backward: aten's
             native_batch_norm_backward from the forward's saved mean and
             1/std.  Including the from_numpy/.numpy() conversions a NumPy
             user pays (both are views: they copy nothing)
  jax        the same math in jax.numpy under jax.jit, with jax_enable_x64
             (float64 stays float64).  The inputs are placed on the CPU
             device once with jax.device_put (a copy, not timed: a JAX user
             keeps the batch there); each call waits for all of its results
             (block_until_ready) and returns them as NumPy arrays
             (np.asarray: a read-only view, no copy, as torch's .numpy() is).
             Backward: jitted formulas from the forward's saved mean and 1/std
  numba      bnfast._bench_numba: @njit(parallel=True) loops, row-major,
             float64 sums, no fastmath, two passes (statistics, output);
             compiled before timing.  Outputs are new arrays at every call
  floor      the memory traffic the operation cannot avoid (below)

torch, jax and numba run where they are installed (pip install torch jax
numba); the table says "not installed" where they are not, and --peers picks
the peers to run.  Layouts: per feature, every peer works on the flattened
(N, D) view.  Per channel, no peer transposes: torch takes the strided
tensor (a channels-last batch is a channels_last tensor), jax the NHWC array
that a channels-last batch's memory is (and the NCHW array otherwise), and
numba walks the batch's own memory (NCHW planes, or channels-last rows).

Threads: every peer runs on bnfast's thread count (--threads N, or bnfast's
default, normally one per core): torch.set_num_threads, numba.set_num_threads,
the floor's thread pool, and for JAX the size of XLA's CPU thread pool, which
the environment variable PJRT_NPROC sets before JAX starts its CPU client
(bnfast-bench sets it unless it is set already, before importing jax; in a
process that used JAX before, the pool it has stays).  The reference runs
NumPy's loops, on one thread.

Operations: train = forward(x, True); eval = forward(x, False); backward =
backward(dout) after one training forward.  Inputs with more than two
dimensions are normalized per flattened feature, D = prod(shape[1:]) (per
channel with --per-channel).  Every peer computes what the reference's
operation computes: train the output with the batch mean and biased variance
(and the running statistics), eval the output with the running statistics,
backward dx, dgamma and dbeta.

dtypes: x, dout, gamma, beta AND the running statistics all have the dtype
being measured.  With float32 running statistics the eval output stays
float32, as it does in the reference class (float64 running statistics would
promote it, and the cell would measure a float64 output).

The floor is the machine's limit for each operation's unavoidable memory
traffic, counted in passes over an array of x's size:

  train     2 reads + 2 writes.  Statistics pass: read x and write the
            layer's private copy of x (the contract: changing x after
            forward must not change the gradient, so the training forward
            keeps its own copy); normalize pass: read x, write y.
  eval      1 read + 1 write: read x, write y.
  backward  4 reads + 1 write.  Sums pass: read x (the private copy) and
            dout; dx pass: read both again, write dx.

A second pass is needed because no output can be written before the batch's
statistics (train) or the sums of dout and dout * xhat (backward) are known.
The floor moves exactly this traffic and computes nothing.  It has what
bnfast has: outputs allocated and touched when the cell is set up and reused
by every call (bnfast's output cache does the same, so neither pays the OS's
page faults), and the arrays' memory split into equal parts over bnfast's
thread count (a thread pool; the loops release the GIL).  There are several
ways to move the same bytes, each on bnfast's thread count and on one
thread (handing work to a thread costs ~0.1 ms here, more than it saves
below a few MiB); every way is timed among the peers, in the same turns,
and the floor is the fastest way's median (JSON: cells[].floor_strategy,
e.g. "whole, 2 threads", and cells[].floor_ways, every way's median):

  fused   NumPy loops that read and write in one pass (x + 0 into the
          output, np.add; reads alone: np.maximum.reduce), in blocks of
          FLOOR_BLOCK_BYTES, every pass over a block before the next, so
          that a second read comes from cache, as it can in bnfast's strips
          and row tiles.  Their stores read each line before writing it
          (read-for-ownership).
  whole   the same passes, each over a thread's whole part.
  split   the reads alone, in blocks, then each output written by the C
          library's memset (ctypes), which writes whole lines without
          reading them first, as bnfast's streaming stores do.
  overlap the reads of split on all threads but one, which meanwhile
          writes every output whole (two or more threads).
  stream  the passes of whole, each write made with bnfast's own streaming
          stores (bnfast._kernels._stream_copy): no read-for-ownership, and
          the output does not evict x from the cache, as in bnfast's own
          large outputs.

Parameters and statistics (D values each) are not counted.  The table lists
the cells of 8 MiB or more where bnfast still comes in more than 10% under
the floor.

Timing (bnfast._timing.interleaved): each turn waits until the threads of
the peer before have stopped spinning (otherwise every multi-threaded peer
shares a core with the previous peer's idle OpenMP threads on a 2-core
machine), then makes one untimed call (so that a peer is timed in the
state of the caches it leaves, not the state its predecessor left).

Each peer's time is the median over repeats of the per-call time; a repeat is
a loop of enough calls to last ~3 ms.  speedup = peer time / bnfast time
(higher is better); "x floor" = bnfast time / floor time (1.0 = at the floor).
Below the table: the cells where each peer beats bnfast, and the cells whose
x has 8 MiB or more (too large for a core's caches) where bnfast takes less
than 1/1.1 of the floor's time, which should be none: a floor that bnfast
beats by more than noise is not a limit, and is to be fixed.  Data are
seeded, so every run times the same numbers.

Comparing two builds (--compare A.json B.json): timings move from run to
run, so one run of each build says little.  Run the full grid with --json on
one machine, alternating the builds: A, B, A, B.  --compare prints, for every
cell both runs timed, the ratio of the two medians of each peer, A time /
B time (> 1: B is faster), their geometric means and bnfast's worst cells.
Compare the two runs of one build as well (A1 with A2): that is the noise of
the machine, and the peers whose code did not change between A and B
(reference, torch, jax, numba, floor) show it in every comparison; a
difference between A and B is real only where it is larger.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO

import numpy as np

import bnfast
from bnfast import _native
from bnfast._timing import TARGET_REPEAT_S, Timing, interleaved
from bnfast.reference import BatchNormalization as Reference

__all__ = [
    "CHECKED_PEERS", "DEFAULT_REPEATS", "DTYPES", "FLOOR_PLANS", "FLOOR_TRAFFIC", "OPS",
    "OPTIONAL_PEERS", "PEERS", "QUICK_SHAPES", "SHAPES", "Case", "Cell", "CellResult",
    "CheckFailed", "Floor", "FloorPass", "PeerStatus", "check", "compare_runs", "expected_result",
    "floor_traffic", "format_comparison", "grid", "load_peer", "load_torch", "main", "make_call",
    "make_case", "measure", "parse_shapes",
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
#: Every peer, in the order each repeat runs them and the table shows them.
PEERS = ("bnfast", "reference", "torch", "jax", "numba", "floor")
#: Peers that run only where their library is installed.
OPTIONAL_PEERS = ("torch", "jax", "numba")
#: Peers whose results are compared with the reference twin's.  The reference
#: is the oracle itself, and the floor computes no batch normalization.
CHECKED_PEERS = ("bnfast", "torch", "jax", "numba")

EPS = 1e-6          # the book's 10e-7, bnfast's default
MOMENTUM = 0.9      # the book's default; torch's momentum is 1 - this
SEED = 20261128
DEFAULT_REPEATS = 7
#: Relative tolerance of a check; absolute tolerance is this times the
#: magnitude of the values compared.
RTOL = {"float64": 1e-10, "float32": 2e-5}
BENCH_EXTRA = 'pip install "bnfast[bench]"'
PEER_INSTALL = "pip install torch jax numba"


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


@dataclass(frozen=True)
class _Layout:
    """How a peer that wants a plain row-major array sees a case's batch.

    view(a): the array the peer works on, a view of a's memory (never a
    copy); unview(r): a result of that shape back as a view of x's shape;
    axes: the axes of view(x) that the statistics run over.
    """
    view: Callable[[np.ndarray], np.ndarray]
    unview: Callable[[np.ndarray], np.ndarray]
    axes: tuple[int, ...]


def _layout(case: Case) -> _Layout:
    x = case.x
    n, c = x.shape[0], x.shape[1]
    if case.layout == "cl":     # memory is (N, *spatial, C), row-major
        rest = x.shape[2:]
        return _Layout(lambda a: np.moveaxis(a, 1, -1),
                       lambda r: np.moveaxis(r.reshape((n, *rest, c)), -1, 1),
                       tuple(range(x.ndim - 1)))
    if case.layout == "nchw":
        return _Layout(lambda a: a, lambda r: r.reshape(x.shape), (0, *range(2, x.ndim)))
    return _Layout(lambda a: a.reshape(n, -1), lambda r: r.reshape(x.shape), (0,))


def _jax_call(case: Case, op: str) -> Callable[[], Any]:
    """jax.numpy under jax.jit on the CPU, inputs placed beforehand (see the module doc)."""
    import jax
    import jax.numpy as jnp

    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)   # or float64 would run as float32
    layout = _layout(case)
    axes = layout.axes
    xv = layout.view(case.x)
    count = math.prod(xv.shape[i] for i in axes)
    # Per-feature (or per-channel) vectors, shaped to broadcast against xv.
    param_shape = tuple(1 if i in axes else size for i, size in enumerate(xv.shape))

    def put(a: np.ndarray) -> Any:
        return jax.device_put(a)

    x = put(xv)
    gamma, beta, running_mean, running_var = (
        put(v.reshape(param_shape))
        for v in (case.gamma, case.beta, case.running_mean, case.running_var))

    def train(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any) -> Any:
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        invstd = jax.lax.rsqrt(var + EPS)
        out = (x - mean) * (invstd * gamma) + beta
        return (out, mean, invstd, MOMENTUM * running_mean + (1 - MOMENTUM) * mean,
                MOMENTUM * running_var + (1 - MOMENTUM) * var)

    def evaluate(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any) -> Any:
        return (x - running_mean) * (jax.lax.rsqrt(running_var + EPS) * gamma) + beta

    def backward(x: Any, dout: Any, mean: Any, invstd: Any, gamma: Any) -> Any:
        xhat = (x - mean) * invstd
        dbeta = jnp.sum(dout, axis=axes, keepdims=True)
        dgamma = jnp.sum(dout * xhat, axis=axes, keepdims=True)
        dx = (gamma * invstd) * (dout - (dbeta + xhat * dgamma) / count)
        return dx, dgamma.reshape(-1), dbeta.reshape(-1)

    params = (x, gamma, beta, running_mean, running_var)
    call: Callable[[], Any]
    if op == "train":
        jitted = jax.jit(train)

        def call() -> np.ndarray:
            return layout.unview(np.asarray(jax.block_until_ready(jitted(*params))[0]))
    elif op == "eval":
        jitted = jax.jit(evaluate)

        def call() -> np.ndarray:
            return layout.unview(np.asarray(jax.block_until_ready(jitted(*params))))
    else:
        _, mean, invstd, _, _ = jax.block_until_ready(jax.jit(train)(*params))
        args = (x, put(layout.view(case.dout)), mean, invstd, gamma)
        jitted = jax.jit(backward)

        def call() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            dx, dgamma, dbeta = jax.block_until_ready(jitted(*args))
            return layout.unview(np.asarray(dx)), np.asarray(dgamma), np.asarray(dbeta)
    call()      # compile before timing
    return call


def _numba_call(case: Case, op: str) -> Callable[[], Any]:
    """The Numba kernels of bnfast._bench_numba, compiled before timing."""
    from bnfast import _bench_numba as kernels

    if not kernels.available():
        raise ModuleNotFoundError("No module named 'numba'", name="numba")
    layout = _layout(case)
    xv = layout.view(case.x)
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    backward: Callable[..., Any]
    if case.layout == "nchw":   # planes: (N, C, S)
        def view(a: np.ndarray) -> np.ndarray:
            return a.reshape(a.shape[0], a.shape[1], -1)
        train, evaluate, backward = (kernels.train_planes, kernels.eval_planes,
                                     kernels.backward_planes)
        chunks: tuple[int, ...] = ()
    else:                       # rows: (values, features), the statistics down the columns
        def view(a: np.ndarray) -> np.ndarray:
            return a.reshape(-1, a.shape[-1])
        train, evaluate, backward = (kernels.train_rows, kernels.eval_rows,
                                     kernels.backward_rows)
        chunks = (kernels.thread_count(),)
    shape = xv.shape
    x = view(xv)
    params = (case.gamma, case.beta, case.running_mean, case.running_var)

    def unview(r: np.ndarray) -> np.ndarray:
        return layout.unview(r.reshape(shape))

    call: Callable[[], Any]
    if op == "train":
        def call() -> np.ndarray:
            return unview(train(x, *params, EPS, MOMENTUM, *chunks)[0])
    elif op == "eval":
        def call() -> np.ndarray:
            return unview(evaluate(x, *params, EPS))
    else:
        _, mean, invstd, _, _ = train(x, *params, EPS, MOMENTUM, *chunks)
        dout = view(layout.view(case.dout))
        gamma = case.gamma

        def call() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            dx, dgamma, dbeta = backward(x, dout, mean, invstd, gamma, *chunks)
            return unview(dx), dgamma, dbeta
    call()      # compile (or load from Numba's cache) before timing
    return call


# --------------------------------------------------------------------------
# The floor


#: Each operation's unavoidable traffic, in passes over an array of x's size:
#: (reads, writes).  FLOOR_PLANS does exactly this (floor_traffic counts it).
FLOOR_TRAFFIC: dict[str, tuple[int, int]] = {"train": (2, 2), "eval": (1, 1), "backward": (4, 1)}


@dataclass(frozen=True)
class FloorPass:
    """One whole-array pass: reads the arrays named in `reads`, writes those in `writes`.

    Names: "x" and "dout" are the case's inputs; any other name is an
    output of x's shape and layout that the floor allocates.
    """
    reads: tuple[str, ...]
    writes: tuple[str, ...] = ()


FLOOR_PLANS: dict[str, tuple[FloorPass, ...]] = {
    # statistics pass: read x, write the private copy; normalize pass: read x, write y
    "train": (FloorPass(("x",), ("copy",)), FloorPass(("x",), ("y",))),
    "eval": (FloorPass(("x",), ("y",)),),
    # sums pass: read x (the private copy) and dout; dx pass: read both, write dx
    "backward": (FloorPass(("x",)), FloorPass(("dout",)), FloorPass(("x", "dout"), ("dx",))),
}


def floor_traffic(op: str) -> tuple[int, int]:
    """(reads, writes) of FLOOR_PLANS[op], in passes over an array of x's size."""
    plan = FLOOR_PLANS[op]
    return sum(len(p.reads) for p in plan), sum(len(p.writes) for p in plan)


def _floor_read(a: np.ndarray) -> None:
    """One read of every element, as fast as NumPy reads a whole array.

    NumPy's SIMD maximum loop reads each element once, has no dependency
    chain between iterations and allocates nothing.  np.add.reduce runs
    1.8-3.6x slower on cache-resident data (pairwise summation).
    """
    np.maximum.reduce(a)


def _floor_write(out: np.ndarray) -> None:
    """One write of every byte, as fast as the C library writes memory.

    glibc's memset (`rep stosb`) writes whole cache lines without reading
    them first, as bnfast's streaming stores do; NumPy's stores read each
    line before writing it (read-for-ownership).  Measured on this
    project's 2-core AMD EPYC: 2.7x ndarray.fill on 128 MiB.  ctypes
    releases the GIL for the call.
    """
    ctypes.memset(out.ctypes.data, 0, out.nbytes)


def _floor_copy(out: np.ndarray, a: np.ndarray) -> None:
    """A read and a write: a + 0 (measured on this project's 2-core AMD EPYC,
    2 threads on 8-16 MiB: up to 18% faster than np.copyto)."""
    np.add(a, a.dtype.type(0), out=out)


def _floor_add(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    np.add(a, b, out=out)


def _floor_stream_copy(out: np.ndarray, a: np.ndarray) -> None:
    """A read and a write with bnfast's own streaming stores (one thread, the
    GIL released): no read-for-ownership, and the output does not evict
    the input from the cache, as in bnfast's large outputs.  NumPy and
    glibc (below ~192 MiB here) cannot write memory that way."""
    _native.kernels._stream_copy(out, a)


def _floor_stream_add(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Two reads and a write, the write streamed (see _floor_stream_copy)."""
    np.maximum.reduce(a)
    _native.kernels._stream_copy(out, b)


#: The loops the floor is made of, called as loop(*writes, *reads) on 1-D
#: views of the arrays' memory: reads and writes alone, and the passes that
#: read and write at once (one read and one write: copy; two and one: add).
FLOOR_LOOPS: dict[str, Callable[..., None]] = {
    "read": _floor_read, "write": _floor_write, "copy": _floor_copy, "add": _floor_add,
    "stream_copy": _floor_stream_copy, "stream_add": _floor_stream_add}
_FUSED_LOOP = {(1, 0): "read", (1, 1): "copy", (2, 1): "add"}
_STREAM_LOOP = {(1, 0): "read", (1, 1): "stream_copy", (2, 1): "stream_add"}

#: Ways to do a plan's passes, all moving the same bytes; the floor times
#: them when it is set up and keeps the fastest.  "fused": NumPy loops that
#: read and write in one pass (copy, add), block by block; their stores read
#: each line before writing it (read-for-ownership), but a block's second
#: read comes from cache.  "whole": the same passes, each over a thread's
#: whole part (faster where an op makes one pass).  "split": every read
#: alone, block by block, then every write alone (memset), which skips the
#: read-for-ownership, as bnfast's streaming stores do (faster on arrays far
#: larger than the cache).  "overlap": the reads of "split" on all threads
#: but one, which meanwhile writes every output whole (memset's writes skip
#: the cache only in long runs: one memset of 48 MiB or more, measured).
#: "stream": the passes of "whole", each write with bnfast's streaming
#: stores, which keep a batch that fits in the last-level cache there from
#: one call to the next, as bnfast's own streamed outputs do.
FLOOR_STRATEGIES = ("fused", "whole", "split", "overlap", "stream")
#: Each thread does its part block by block, every pass over a block before
#: the next block, so that a second read of a block (train, backward) comes
#: from cache, as it can in bnfast's strips and row tiles.  ("split" writes
#: whole parts: memset's line writes need long runs.)
FLOOR_BLOCK_BYTES = 1 << 20

_pools: dict[int, ThreadPoolExecutor] = {}

_Calls = list[tuple[Callable[..., None], tuple[np.ndarray, ...]]]


def _pool(workers: int) -> ThreadPoolExecutor:
    pool = _pools.get(workers)
    if pool is None:
        pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="bnfast-floor")
    return pool


def _memory(a: np.ndarray) -> np.ndarray:
    """a's elements as a 1-D view, in the order they lie in memory."""
    flat = a.ravel(order="K")
    if not np.may_share_memory(flat, a):
        raise ValueError("the floor needs arrays that are contiguous in some axis order")
    return flat


def _run_loops(calls: _Calls) -> None:
    for loop, arrays in calls:
        loop(*arrays)


class Floor:
    """The floor of `op` on `case`: outputs made and mapped, work split; call it.

    Each thread gets an equal part of every array's memory.  threads:
    bnfast's thread count by default.  strategy: one of FLOOR_STRATEGIES,
    run on `threads` threads; or None for every strategy on `threads`
    threads and on one (handing work to a thread pool costs ~0.1 ms on this
    project's 2-core VM, more than it saves below a few MiB, where bnfast
    itself stays on one thread up to 256 KiB): `plans` holds them all, and
    with `choose` the floor times them (a few calls each) and keeps the
    fastest, which `strategy` and `threads` then name.  (bnfast-bench times
    every plan among the peers instead, with runner(), and reports the
    fastest.)  A call returns the outputs (the same arrays every time; no
    batch normalization is in them).
    """

    def __init__(self, case: Case, op: str, threads: Optional[int] = None,
                 strategy: Optional[str] = None, block_bytes: int = FLOOR_BLOCK_BYTES,
                 choose: bool = True) -> None:
        plan = FLOOR_PLANS[op]
        x = case.x
        arrays = {"x": x, "dout": case.dout}
        self.outputs: dict[str, np.ndarray] = {}
        for step in plan:
            for name in step.writes:
                out = np.empty_like(x)      # x's layout, as the peers' outputs
                out.fill(0)                 # mapped now, not in the timed calls
                arrays[name] = self.outputs[name] = out
        if threads is None:
            threads = bnfast.get_num_threads()
        self._memory = {name: _memory(a) for name, a in arrays.items()}
        self._plan = plan
        self._block = max(1, block_bytes // x.itemsize)
        #: The (loop, arrays) calls of each thread, by (strategy, threads).
        self.plans: dict[tuple[str, int], list[_Calls]] = {}
        counts = (threads,) if strategy is not None or threads == 1 else (threads, 1)
        for count in counts:
            for name in (FLOOR_STRATEGIES if strategy is None else (strategy,)):
                if name == "overlap" and count < 2:
                    continue
                work = self._work(name, count)
                self.plans[name, len(work)] = work   # arrays too small to split: fewer
        self.strategy, self.threads = (
            self._fastest() if strategy is None and choose else next(iter(self.plans)))
        self.work = self.plans[self.strategy, self.threads]

    @staticmethod
    def describe(key: tuple[str, int]) -> str:
        """('whole', 2) -> 'whole, 2 threads'."""
        return f"{key[0]}, {_count(key[1], 'thread')}"

    def runner(self, key: tuple[str, int]) -> Callable[[], tuple[np.ndarray, ...]]:
        """A call of the plan `key` (a key of `plans`), as a callable to time."""
        work = self.plans[key]
        outputs = tuple(self.outputs.values())

        def run() -> tuple[np.ndarray, ...]:
            Floor._run(work)
            return outputs
        return run

    def _work(self, strategy: str, threads: int) -> list[_Calls]:
        """Each thread's calls: equal parts, each (but the last) whole 4 KiB pages
        (fewer parts than threads where x has fewer pages)."""
        memory, plan, loops = self._memory, self._plan, FLOOR_LOOPS
        if strategy == "overlap":   # threads - 1 readers (split), and one writer
            writes: _Calls = [(loops["write"], (memory[name],))
                              for step in plan for name in step.writes]
            readers = [[call for call in calls if call[0] is loops["read"]]
                       for calls in self._work("split", threads - 1)]
            return readers + [writes]
        size = memory["x"].size
        page = max(1, 4096 // memory["x"].itemsize)
        part = -(-size // (threads * page)) * page
        block = max(page, self._block // page * page)
        work = []
        for first in range(0, size, part):
            end = min(first + part, size)
            blocks = [(start, min(start + block, end)) for start in range(first, end, block)]
            calls: _Calls
            if strategy == "split":
                calls = ([(loops["read"], (memory[name][start:stop],))
                          for start, stop in blocks for step in plan for name in step.reads]
                         + [(loops["write"], (memory[name][first:end],))
                            for step in plan for name in step.writes])
            else:
                spans = blocks if strategy == "fused" else [(first, end)]
                kind = _STREAM_LOOP if strategy == "stream" else _FUSED_LOOP
                calls = [(loops[kind[len(step.reads), len(step.writes)]],
                          tuple(memory[name][start:stop] for name in step.writes + step.reads))
                         for start, stop in spans for step in plan]
            work.append(calls)
        return work

    @staticmethod
    def _run(work: list[_Calls]) -> None:
        if len(work) > 1:
            pool = _pool(len(work) - 1)
            others = [pool.submit(_run_loops, calls) for calls in work[1:]]
            _run_loops(work[0])
            for done in others:
                done.result()
        else:
            _run_loops(work[0])

    def _fastest(self, budget_s: float = 0.02) -> tuple[str, int]:
        """The (strategy, threads) whose best call, over turns taken in alternation,
        is fastest.  Best, not median: this only ranks them, and noise can
        only slow a turn down."""
        best = {key: math.inf for key in self.plans}
        for work in self.plans.values():
            self._run(work)     # warm-up
        spent, turns = 0.0, 0
        while turns < 3 or (spent < budget_s * len(best) and turns < 20):
            for key, work in self.plans.items():
                start = time.perf_counter()
                self._run(work)
                took = time.perf_counter() - start
                best[key] = min(best[key], took)
                spent += took
            turns += 1
        return min(best, key=lambda key: best[key])

    @property
    def label(self) -> str:
        """'whole, 2 threads': how this floor moves its bytes."""
        return self.describe((self.strategy, self.threads))

    def __call__(self) -> tuple[np.ndarray, ...]:
        self._run(self.work)
        return tuple(self.outputs.values())


def make_call(peer: str, case: Case, op: str) -> Callable[[], Any]:
    """The callable timed for `peer` doing `op` on `case`, set up and ready.

    train and eval calls return the output array; backward calls return
    (dx, dgamma, dbeta).  A floor call returns its outputs (not comparable).
    Building a backward call runs one training forward; building a jax or
    numba call compiles it.  An optional peer that is not installed raises
    ImportError.
    """
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")
    if peer == "bnfast":
        return _layer_call(bnfast.BatchNormalization, case, op)
    if peer == "reference":
        return _layer_call(Reference, case, op)
    if peer == "torch":
        return _torch_call(case, op)
    if peer == "jax":
        return _jax_call(case, op)
    if peer == "numba":
        return _numba_call(case, op)
    if peer == "floor":
        return Floor(case, op)
    raise ValueError(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}")


# --------------------------------------------------------------------------
# The optional peers' libraries


@dataclass(frozen=True)
class PeerStatus:
    """Whether an optional peer can run here, and on how many threads."""
    name: str
    version: Optional[str] = None   #: None: the peer cannot run
    reason: str = ""                #: why it cannot
    installed: bool = True
    threads: Optional[int] = None

    @property
    def available(self) -> bool:
        return self.version is not None

    @property
    def column(self) -> str:
        """What the table's time column says when the peer cannot run."""
        return "not installed" if not self.installed else "unavailable"

    def as_json(self) -> dict[str, Any]:
        if self.available:
            return {"available": True, "version": self.version, "threads": self.threads}
        return {"available": False, "installed": self.installed, "reason": self.reason}


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load_torch(threads: int) -> PeerStatus:
    import torch
    torch.set_num_threads(threads)
    return PeerStatus("torch", torch.__version__, threads=torch.get_num_threads())


def _load_jax(threads: int) -> PeerStatus:
    if "jax" not in sys.modules:
        # The size of XLA's CPU thread pool, read when JAX makes its CPU client.
        os.environ.setdefault("PJRT_NPROC", str(threads))
    import jax
    jax.config.update("jax_enable_x64", True)
    pool = os.environ.get("PJRT_NPROC", "")
    return PeerStatus("jax", jax.__version__,
                      threads=int(pool) if pool.isdigit() else _usable_cores())


def _load_numba(threads: int) -> PeerStatus:
    if "numba" not in sys.modules and threads > (os.cpu_count() or 1):
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))   # Numba's upper limit
    import numba

    from bnfast import _bench_numba
    if not _bench_numba.available():    # numba imported only now, after _bench_numba
        raise ImportError("bnfast._bench_numba was imported when numba could not be")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return PeerStatus("numba", numba.__version__, threads=numba.get_num_threads())


_LOADERS: dict[str, Callable[[int], PeerStatus]] = {
    "torch": _load_torch, "jax": _load_jax, "numba": _load_numba}


def load_peer(name: str, threads: Optional[int] = None) -> PeerStatus:
    """Import an optional peer's library and give it `threads` threads (bnfast's count)."""
    if threads is None:
        threads = bnfast.get_num_threads()
    try:
        return _LOADERS[name](threads)
    except ModuleNotFoundError as exc:
        return PeerStatus(name, reason=f"{name} is not installed ({exc})", installed=False)
    except (ImportError, OSError) as exc:   # OSError: installed, but its libraries fail
        return PeerStatus(name, reason=f"{name} cannot be imported ({exc})")


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
    """The timings of one cell, by peer (peers that did not run are absent)."""
    cell: Cell
    timings: dict[str, Timing]
    checked: bool
    floor_strategy: Optional[str] = None    #: the floor's fastest way ('whole, 2 threads')
    #: Median seconds of each way the floor has (the floor is the fastest).
    floor_ways: dict[str, float] = field(default_factory=dict)

    def time(self, peer: str) -> Optional[float]:
        """Median seconds per call of `peer`, or None if it did not run."""
        timing = self.timings.get(peer)
        return None if timing is None else timing.median

    def speedup(self, peer: str) -> Optional[float]:
        """peer time / bnfast time (for the floor, the inverse of floor_multiple)."""
        other = self.time(peer)
        return None if other is None else other / self.timings["bnfast"].median

    @property
    def floor_multiple(self) -> Optional[float]:
        """bnfast time / floor time (None without the floor)."""
        floor = self.time("floor")
        return None if floor is None else self.timings["bnfast"].median / floor


_FLOOR_PREFIX = "floor: "


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

    `peers` must include bnfast, and every optional peer in it must be
    installed.  With `progress`, a line per cell is written there as it
    completes.
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
        calls: dict[str, Callable[[], Any]] = {}
        for peer in peers:
            if peer == "floor":     # every way the floor has, timed among the peers
                floor = Floor(case, cell.op, choose=False)
                for key in floor.plans:
                    calls[_FLOOR_PREFIX + Floor.describe(key)] = floor.runner(key)
                del floor
            else:
                calls[peer] = make_call(peer, case, cell.op)
        if check_results:
            expected = expected_result(case, cell.op)
            for peer in CHECKED_PEERS:
                if peer in calls:
                    check(peer, calls[peer](), expected, case, cell.op)
            del expected
        timings = interleaved(calls, repeats)
        del calls
        ways = {name[len(_FLOOR_PREFIX):]: timings.pop(name) for name in list(timings)
                if name.startswith(_FLOOR_PREFIX)}
        fastest = min(ways, key=lambda way: ways[way].median) if ways else None
        if fastest is not None:
            timings["floor"] = ways[fastest]
        result = CellResult(cell, timings, check_results, fastest,
                            {way: timing.median for way, timing in ways.items()})
        results.append(result)
        if progress is not None:
            others = ", ".join(f"{peer} {format_time(result.time(peer))}"
                               for peer in peers if peer != "bnfast")
            print(f"[{index:{len(str(len(cells)))}}/{len(cells)}] {cell.shape_label} "
                  f"{cell.dtype} {cell.op}: bnfast {format_time(result.time('bnfast'))}"
                  f"{'; ' + others if others else ''} "
                  f"({time.perf_counter() - started:.0f} s)", file=progress, flush=True)
    return results


def geomean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Geometric mean of the values that are not None (None if there are none)."""
    logs = [math.log(v) for v in values if v is not None]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _speedup_key(peer: str) -> str:
    return f"speedup_vs_{peer}"


#: The peers bnfast's speedup is reported against (JSON: speedup_vs_<peer>).
SPEEDUP_PEERS = ("reference", "torch", "jax", "numba")


def summary(results: Sequence[CellResult]) -> dict[str, Optional[float]]:
    means: dict[str, Optional[float]] = {
        _speedup_key(peer): geomean(r.speedup(peer) for r in results) for peer in SPEEDUP_PEERS}
    means["floor_multiple"] = geomean(r.floor_multiple for r in results)
    return means


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


def machine_info(statuses: Mapping[str, PeerStatus], load_before: Optional[float],
                 threads: Optional[int] = None) -> dict[str, Any]:
    """The machine and the software that ran the benchmark.

    `statuses`: the optional peers loaded (see load_peer).  `load_before`:
    the load average before measuring, a sign of other work on the machine.
    `threads`: the floor's thread count (bnfast's by default).
    """
    def status(peer: str) -> Optional[PeerStatus]:
        found = statuses.get(peer)
        return found if found is not None and found.available else None

    bnfast_threads = bnfast.get_num_threads()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cython": _version("Cython"),
    }
    for peer in OPTIONAL_PEERS:
        found = status(peer)
        info[peer] = None if found is None else found.version
    threads_by_peer: dict[str, Optional[int]] = {"bnfast": bnfast_threads}
    for peer in OPTIONAL_PEERS:
        found = status(peer)
        threads_by_peer[peer] = None if found is None else found.threads
    threads_by_peer["floor"] = bnfast_threads if threads is None else threads
    info.update({
        "bnfast": bnfast.__version__,
        "build_info": bnfast.build_info(),
        "threads": threads_by_peer,
        "load_average_before": load_before,
    })
    return info


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _count(number: Optional[int], noun: str) -> str:
    """'1 thread', '2 threads'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _speedup_heading(peer: str) -> str:
    return "vs ref" if peer == "reference" else f"vs {peer}"


def format_table(results: Sequence[CellResult], machine: dict[str, Any], repeats: int,
                 peers: Optional[Sequence[str]] = None,
                 statuses: Optional[Mapping[str, PeerStatus]] = None) -> str:
    """The results table, with a header naming the machine and the method.

    peers: the peers asked for (default: those that ran), in PEERS order;
    statuses: why an optional peer asked for did not run.
    """
    statuses = dict(statuses or {})
    if peers is None:
        peers = [p for p in PEERS if any(p in r.timings for r in results)]
    peers = [p for p in PEERS if p in peers or p == "bnfast"]
    threads = machine["threads"]

    def missing(peer: str) -> Optional[PeerStatus]:
        found = statuses.get(peer)
        return found if found is not None and not found.available else None

    parts = [f"bnfast {machine['bnfast']} ({machine['build_info']['isa']}, "
             f"{_count(threads['bnfast'], 'thread')})", f"numpy {machine['numpy']}"]
    for peer in OPTIONAL_PEERS:
        if peer not in peers:
            continue
        gone = missing(peer)
        if gone is not None:
            parts.append(f"{peer} not compared: {gone.reason}")
        elif machine.get(peer):
            parts.append(f"{peer} {machine[peer]} ({_count(threads.get(peer), 'thread')})")
    if "floor" in peers:
        parts.append(f"floor {_count(threads.get('floor'), 'thread')}")
    checked = ("results checked against the reference twin" if results and results[0].checked
               else "results not checked (--check checks them)")
    ops = list(dict.fromkeys(r.cell.op for r in results))
    groups = [(f"geomean {op}", [r for r in results if r.cell.op == op]) for op in ops]
    if len(ops) > 1:
        groups.append(("geomean all", list(results)))
    speedups = [p for p in peers if p in SPEEDUP_PEERS]

    def time_text(r: CellResult, peer: str) -> str:
        gone = missing(peer)
        return gone.column if gone is not None else format_time(r.time(peer))

    body = [[r.cell.shape_label, r.cell.dtype, r.cell.op]
            + [time_text(r, peer) for peer in peers]
            + [_ratio(r.speedup(peer)) for peer in speedups]
            + ([_ratio(r.floor_multiple)] if "floor" in peers else [])
            for r in results]
    for name, members in groups:
        means = summary(members)
        body.append([name, "", ""] + [""] * len(peers)
                    + [_ratio(means[_speedup_key(peer)]) for peer in speedups]
                    + ([_ratio(means["floor_multiple"])] if "floor" in peers else []))
    headings = (["shape", "dtype", "op"] + list(peers) + [_speedup_heading(p) for p in speedups]
                + (["x floor"] if "floor" in peers else []))
    minimum = [0, 7, 8] + [9] * len(peers) + [7] * len(speedups) + [7]
    widths = [max([minimum[i], len(heading)] + [len(row[i]) for row in body])
              for i, heading in enumerate(headings)]

    def row(values: Sequence[str]) -> str:
        cells = [f"{v:<{w}}" if i < 3 else f"{v:>{w}}"
                 for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(cells).rstrip()

    def span(first_column: int, end_column: int) -> int:
        """Width of columns [first_column, end_column) with their separators."""
        spanned = widths[first_column:end_column]
        return sum(spanned) + 2 * (len(spanned) - 1)

    per_channel = any(r.cell.layout != "flat" for r in results)
    mode = ("per-channel statistics (over N and every spatial position); nchw = NCHW-"
            "contiguous, cl = channels-last; no peer transposes" if per_channel else
            "per-feature statistics (each sample flattened, as the book's class)")
    times_end = 3 + len(peers)
    titles = " " * (span(0, 3) + 2) + f"{'median time per call':^{span(3, times_end)}}"
    if speedups:
        titles += f"  {'bnfast speedup':^{span(times_end, times_end + len(speedups))}}"
    if "floor" in peers:
        titles += f"  {'bnfast':>{widths[-1]}}"
    lines = [
        mode,
        " | ".join(parts),
        f"{machine['cpu']}, {_count(machine['cores'], 'core')} | median of "
        f"{_count(repeats, 'interleaved repeat')} per peer | {checked}",
        "",
        titles.rstrip(),
        row(headings),
    ]
    lines += [row(values) for values in body]
    lines.append("")
    lines += _findings(results, speedups, "floor" in peers)
    note = "speedup = peer time / bnfast time (higher is better)"
    if "floor" in peers:
        note += ("; x floor = bnfast time / floor time (1.00 = at the memory-traffic floor: "
                 "train 2 reads + 2 writes of x's size, eval 1 + 1, backward 4 + 1)")
    lines.append(note)
    return "\n".join(lines)


#: Cells whose x has at least this many bytes do not fit in a core's caches:
#: there bnfast should not beat the floor by more than noise.
FLOOR_CHECK_MIN_BYTES = 8 << 20
#: ... where "more than noise" is bnfast taking less than this x the floor's time.
FLOOR_CHECK_MULTIPLE = 1 / 1.1


def _cell_bytes(cell: Cell) -> int:
    return math.prod(cell.shape) * np.dtype(cell.dtype).itemsize


def _findings(results: Sequence[CellResult], speedups: Sequence[str],
              floor: bool) -> list[str]:
    """Where a peer beats bnfast, and where bnfast beats the floor on a large batch."""
    def cells(members: Iterable[tuple[CellResult, Optional[float]]]) -> str:
        return ", ".join(f"{r.cell.shape_label} {r.cell.dtype} {r.cell.op} ({value:.2f})"
                         for r, value in members if value is not None)
    lines = []
    for peer in speedups:
        faster = [(r, r.speedup(peer)) for r in results if (r.speedup(peer) or math.inf) < 1.0]
        lines.append(f"{peer} faster than bnfast (speedup < 1.00): "
                     + (f"{len(faster)} of {len(results)} cells: {cells(faster)}"
                        if faster else "no cell"))
    if floor:
        under = [(r, r.floor_multiple) for r in results
                 if _cell_bytes(r.cell) >= FLOOR_CHECK_MIN_BYTES
                 and (r.floor_multiple or math.inf) < FLOOR_CHECK_MULTIPLE]
        lines.append("bnfast more than 10% under the floor, x of 8 MiB or more: "
                     + (cells(under) if under else "no cell"))
    return lines + ([""] if lines else [])


def report(results: Sequence[CellResult], machine: dict[str, Any], settings: dict[str, Any],
           statuses: Optional[Mapping[str, PeerStatus]] = None) -> dict[str, Any]:
    """Everything measured, as JSON-ready data."""
    statuses = dict(statuses or {})
    cells = []
    for r in results:
        cell: dict[str, Any] = {
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
        }
        for peer in SPEEDUP_PEERS:
            cell[_speedup_key(peer)] = r.speedup(peer)
        cell["floor_multiple"] = r.floor_multiple
        cell["floor_strategy"] = r.floor_strategy
        cell["floor_ways"] = r.floor_ways
        cells.append(cell)
    ops = list(dict.fromkeys(r.cell.op for r in results))
    torch = statuses.get("torch")
    return {
        "machine": machine,
        # "torch" as before the other optional peers came; "peers" has them all.
        "torch": ({"available": True, "version": machine["torch"]} if machine.get("torch")
                  else {"available": False,
                        "reason": torch.reason if torch is not None else "not asked for"}),
        "peers": {peer: (statuses[peer].as_json() if peer in statuses
                         else {"available": False, "reason": "not asked for (--peers)"})
                  for peer in OPTIONAL_PEERS},
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
    peers = [p for p in (*SPEEDUP_PEERS, "floor") if any(p in r.timings for r in results)]
    legend = {"reference": "vs reference (NumPy twin)", "torch": "vs torch", "jax": "vs jax",
              "numba": "vs numba", "floor": "vs floor (1 = at the floor)"}
    columns = max(sum(r.cell.dtype == dtype for r in results) for dtype in dtypes)
    fig = Figure(figsize=(max(8.0, 0.15 * len(peers) * columns + 1.5), 4.0 * len(dtypes)),
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
            ax.bar_label(bars, [_bar_label(v) for v in values], fontsize=5, padding=1)
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
    # Below the last panel's tick labels, where it covers no bar and no title.
    axes[-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(peers),
                    fontsize=8, frameon=False)
    fig.suptitle(f"bnfast {machine['bnfast']} speedup over each peer (log scale, higher is "
                 f"better) - {machine['cpu']}, {_count(machine['threads']['bnfast'], 'thread')}")
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------
# Comparing two runs (--compare)


@dataclass(frozen=True)
class CellComparison:
    """One cell both runs timed: each peer's medians in A and B."""
    label: str
    shape: str      # '256x1024' or '32x64x56x56 cl'
    dtype: str
    op: str
    a: dict[str, float]
    b: dict[str, float]

    def ratio(self, peer: str) -> Optional[float]:
        """A time / B time: > 1 where B is faster (None unless both timed `peer`)."""
        if peer not in self.a or peer not in self.b:
            return None
        return self.a[peer] / self.b[peer]


@dataclass(frozen=True)
class Comparison:
    """Run B against run A, cell by cell."""
    cells: list[CellComparison]
    peers: list[str]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def geomean(self, peer: str, op: Optional[str] = None) -> Optional[float]:
        return geomean(c.ratio(peer) for c in self.cells if op is None or c.op == op)

    def worst(self, peer: str = "bnfast", count: int = 5) -> list[CellComparison]:
        """The cells where B did worst against A (lowest ratio first)."""
        timed = [c for c in self.cells if c.ratio(peer) is not None]
        return sorted(timed, key=lambda c: c.ratio(peer) or 0.0)[:count]


def _medians(run: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, float]]]:
    """label -> (the cell's JSON, {peer: median seconds}) of a --json file's data."""
    found = {}
    for cell in run["cells"]:
        found[cell["label"]] = (cell, {peer: float(t["median_s"])
                                       for peer, t in cell["peers"].items()})
    return found


def _run_summary(run: Mapping[str, Any]) -> str:
    machine = run.get("machine", {})
    threads = machine.get("threads", {}).get("bnfast")
    isa = machine.get("build_info", {}).get("isa", "?")
    settings = run.get("settings", {})
    load = machine.get("load_average_before")
    return (f"bnfast {machine.get('bnfast', '?')} ({isa}, {_count(threads, 'thread')}), "
            f"{machine.get('cpu', '?')}, median of {settings.get('repeats', '?')} repeats, "
            f"load average {'?' if load is None else f'{load:.2f}'} at the start")


def _ratio_of_runs(value: Optional[float]) -> str:
    """Two decimals; two significant digits below 0.1 (not a bare 0.00)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.095 else f"{value:.2g}"


def compare_runs(a: Mapping[str, Any], b: Mapping[str, Any]) -> Comparison:
    """B against A: the cells both runs timed, in A's order, and every peer in both."""
    cells_a, cells_b = _medians(a), _medians(b)
    cells = []
    for label, (cell, medians) in cells_a.items():
        if label in cells_b:
            layout = cell.get("layout", "flat")
            shape = format_shape(cell["shape"]) + ("" if layout == "flat" else f" {layout}")
            cells.append(CellComparison(label, shape, cell["dtype"], cell["op"], medians,
                                        cells_b[label][1]))
    named = [p for p in PEERS if any(c.ratio(p) is not None for c in cells)]
    others = sorted({p for c in cells for p in c.a if c.ratio(p) is not None} - set(named))
    notes = []
    floor_a = a.get("settings", {}).get("floor")
    floor_b = b.get("settings", {}).get("floor")
    if "floor" in named and floor_a != floor_b:
        notes.append("A and B timed different floors (settings.floor differs): the floor's "
                     "ratios compare two different things")
    elif "floor" in named:
        changed = [label for label, (cell, _) in cells_a.items() if label in cells_b
                   and cell.get("floor_strategy") != cells_b[label][0].get("floor_strategy")]
        if changed:
            notes.append(f"the floor moved its bytes another way in B (floor_strategy) in "
                         f"{_count(len(changed), 'cell')}: {', '.join(changed)}")
    def machine(run: Mapping[str, Any], key: str) -> Any:
        found = run.get("machine", {})
        if key == "isa":
            return found.get("build_info", {}).get("isa")
        if key == "threads":
            return found.get("threads", {}).get("bnfast")
        return found.get(key)
    for key in ("cpu", "isa", "threads", "numpy"):
        if machine(a, key) != machine(b, key):
            notes.append(f"{key} differs: A {machine(a, key)}, B {machine(b, key)}")
    return Comparison(cells, named + others, [l for l in cells_a if l not in cells_b],
                      [l for l in cells_b if l not in cells_a], notes)


def format_comparison(comparison: Comparison, name_a: str, name_b: str,
                      run_a: Optional[Mapping[str, Any]] = None,
                      run_b: Optional[Mapping[str, Any]] = None, worst: int = 5) -> str:
    """The --compare table: per cell, bnfast's two medians and every peer's ratio."""
    peers = comparison.peers
    lines = [f"A: {name_a}" + (f" - {_run_summary(run_a)}" if run_a is not None else ""),
             f"B: {name_b}" + (f" - {_run_summary(run_b)}" if run_b is not None else ""),
             "ratio = A's median time / B's median time, per peer: > 1.00 means B is faster, "
             "< 1.00 that B is slower", ""]
    first = max([len("shape")] + [len(c.shape) for c in comparison.cells]
                + [len(f"geomean {c.op}") for c in comparison.cells] + [len("geomean all")])
    timed = "bnfast" in peers
    headings = ["shape", "dtype", "op"] + (["bnfast A", "bnfast B"] if timed else []) + peers
    widths = [first, 7, 8] + ([9, 9] if timed else []) + [max(9, len(p)) for p in peers]

    def row(values: Sequence[str]) -> str:
        return "  ".join(f"{v:<{w}}" if i < 3 else f"{v:>{w}}"
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    lines.append(" " * (sum(widths[:3]) + 6 + (sum(widths[3:5]) + 4 if timed else 0))
                 + "ratio (A / B)")
    lines.append(row(headings))
    for c in comparison.cells:
        times = ([format_time(c.a.get("bnfast")), format_time(c.b.get("bnfast"))]
                 if timed else [])
        lines.append(row([c.shape, c.dtype, c.op] + times
                         + [_ratio_of_runs(c.ratio(p)) for p in peers]))
    ops = list(dict.fromkeys(c.op for c in comparison.cells))
    for op in ops + ([None] if len(ops) > 1 else []):
        lines.append(row([f"geomean {op or 'all'}", "", ""] + (["", ""] if timed else [])
                         + [_ratio_of_runs(comparison.geomean(p, op)) for p in peers]))
    lines.append("")
    if timed and comparison.cells:
        lines.append("bnfast's worst cells (B slowest against A):")
        for c in comparison.worst("bnfast", worst):
            lines.append(f"  {c.shape} {c.dtype} {c.op}: {_ratio_of_runs(c.ratio('bnfast'))} "
                         f"({format_time(c.a['bnfast'])} in A, {format_time(c.b['bnfast'])} "
                         "in B)")
    unchanged = [p for p in peers if p != "bnfast"]
    if unchanged:
        lines.append(f"{', '.join(unchanged)}: code that two builds of bnfast share; their "
                     "ratios away from 1.00 are the noise between the runs")
    if comparison.only_a or comparison.only_b:
        lines.append(f"not compared: {len(comparison.only_a)} cells only in A, "
                     f"{len(comparison.only_b)} only in B")
    lines += [f"note: {note}" for note in comparison.notes]
    return "\n".join(lines)


def _comparison_json(comparison: Comparison, name_a: str, name_b: str) -> dict[str, Any]:
    ops = list(dict.fromkeys(c.op for c in comparison.cells))
    return {
        "a": name_a, "b": name_b, "ratio": "A median / B median (> 1: B is faster)",
        "cells": [{"label": c.label, "a_s": c.a, "b_s": c.b,
                   "ratios": {p: c.ratio(p) for p in comparison.peers}}
                  for c in comparison.cells],
        "geomean": {p: comparison.geomean(p) for p in comparison.peers},
        "geomean_by_op": {op: {p: comparison.geomean(p, op) for p in comparison.peers}
                          for op in ops},
        "only_a": comparison.only_a, "only_b": comparison.only_b, "notes": comparison.notes,
    }


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
        "--peers", type=_names("peer", PEERS), default=PEERS, metavar="PEERS",
        help="comma-separated, from " + ", ".join(PEERS) + " (default: all; bnfast always "
             "runs; torch, jax and numba where installed: " + PEER_INSTALL + ")")
    parser.add_argument(
        "--threads", type=_positive_int, metavar="N",
        help="threads for bnfast and every peer (torch, jax, numba, floor) (default: "
             "bnfast's default, normally one per core)")
    parser.add_argument(
        "--repeats", type=_positive_int, default=DEFAULT_REPEATS, metavar="N",
        help=f"timed repeats per peer and cell; the median is reported "
             f"(default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=None,
        help="compare the results of " + ", ".join(CHECKED_PEERS) + " with the reference "
             "twin before timing, and stop if they differ (default: on with --quick, off "
             "otherwise)")
    parser.add_argument(
        "--sync-ranks", type=_rank_counts, metavar="K,K,...",
        help="instead of the grid: time SyncBatchNormalization's training step on 1 process "
             "and on K MPI ranks (e.g. 1,2,4), compute and communication apart (needs "
             "bnfast[mpi])")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
        help="instead of timing: compare two runs saved with --json (same grid, one "
             "machine): per cell, every peer's A time / B time (> 1: B is faster), the "
             "geometric means and bnfast's worst cells.  Protocol: run the builds "
             "alternately, A, B, A, B, and compare A1 with A2 too (the noise)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write every measurement and the machine's description here "
                             "(with --compare: the comparison)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help=f"write a PNG chart here (needs matplotlib: {BENCH_EXTRA})")
    return parser


def _check_output_path(parser: argparse.ArgumentParser, option: str,
                       path: Optional[Path]) -> None:
    """Fail before measuring, not after, if an output cannot be written."""
    if path is not None and not path.resolve().parent.is_dir():
        parser.error(f"{option} {path}: directory {path.resolve().parent} does not exist")


def _set_threads(parser: argparse.ArgumentParser, threads: int) -> None:
    try:
        bnfast.set_num_threads(threads)
    except (RuntimeError, ValueError) as exc:    # e.g. a build without OpenMP
        parser.error(f"--threads {threads}: {exc}")
    cores = os.cpu_count() or 1
    if threads > cores:
        print(f"bnfast-bench: warning: {threads} threads on {cores} cores; the threads "
              "will compete and timings will be noisy", file=sys.stderr)


def _floor_settings(threads: int) -> dict[str, Any]:
    """How the floor was made: --compare tells runs with different floors apart."""
    return {"traffic": {op: {"reads": r, "writes": w} for op, (r, w) in FLOOR_TRAFFIC.items()},
            "plans": {op: [[list(p.reads), list(p.writes)] for p in plan]
                      for op, plan in FLOOR_PLANS.items()},
            "outputs": "allocated and touched before timing, reused",
            "strategies": {"fused": "np.maximum.reduce, np.add(out=), in blocks",
                           "whole": "np.maximum.reduce, np.add(out=), whole parts",
                           "split": "np.maximum.reduce in blocks, then ctypes.memset"},
            "threads": threads, "block_bytes": FLOOR_BLOCK_BYTES}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status (argument errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_output_path(parser, "--json", args.json)
    _check_output_path(parser, "--plot", args.plot)
    if args.compare is not None:
        return _compare_main(parser, args)
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

    if args.threads is not None:
        _set_threads(parser, args.threads)
    threads = bnfast.get_num_threads()
    asked = [p for p in PEERS if p in args.peers or p == "bnfast"]
    statuses = {peer: load_peer(peer, threads) for peer in asked if peer in OPTIONAL_PEERS}
    for status in statuses.values():
        if not status.available:
            print(f"bnfast-bench: {status.reason}; timing without it (pip install "
                  f"{status.name} to compare)", file=sys.stderr)
    peers = [p for p in asked if p not in statuses or statuses[p].available]

    load = _load_average()
    if load is not None and load >= 0.5:
        print(f"bnfast-bench: note: load average {load:.2f} at the start: other processes "
              "use (or used within the last minute) the CPU, and timings, multi-threaded "
              "ones most, suffer while they do", file=sys.stderr)
    cells = grid(shapes, args.dtypes, args.ops, layouts)
    print(f"bnfast-bench: {_count(len(cells), 'cell')} x {_count(len(peers), 'peer')} "
          f"({', '.join(peers)}), {_count(args.repeats, 'repeat')} each, "
          f"{_count(threads, 'thread')}", file=sys.stderr)
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

    machine = machine_info(statuses, load, threads)
    print(format_table(results, machine, args.repeats, asked, statuses))
    settings = {"quick": args.quick, "repeats": args.repeats, "check": check_results,
                "target_repeat_s": TARGET_REPEAT_S, "shapes": [list(s) for s in shapes],
                "dtypes": list(args.dtypes), "ops": list(args.ops), "peers": peers,
                "peers_asked": asked, "per_channel": args.per_channel,
                "layouts": list(layouts), "seed": SEED, "eps": EPS, "momentum": MOMENTUM,
                "floor": _floor_settings(threads),
                "statistic": "median of repeats of per-call time"}
    try:
        if args.json is not None:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(report(results, machine, settings, statuses), out, indent=1)
            print(f"bnfast-bench: wrote {args.json}", file=sys.stderr)
        if args.plot is not None:
            plot(results, args.plot, machine)
            print(f"bnfast-bench: wrote {args.plot}", file=sys.stderr)
    except OSError as exc:
        print(f"bnfast-bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _compare_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--compare A.json B.json: print (and with --json, save) B against A."""
    runs = []
    for path in args.compare:
        try:
            with open(path, encoding="utf-8") as source:
                data = json.load(source)
            _medians(data)
        except OSError as exc:
            parser.error(f"--compare: cannot read {path}: {exc.strerror or exc}")
        except (ValueError, KeyError, TypeError) as exc:
            parser.error(f"--compare: {path} is not a bnfast-bench --json file ({exc!r})")
        runs.append(data)
    comparison = compare_runs(runs[0], runs[1])
    if not comparison.cells:
        print(f"bnfast-bench: error: --compare: {args.compare[0]} and {args.compare[1]} have "
              "no cell in common", file=sys.stderr)
        return 1
    names = [str(path) for path in args.compare]
    print(format_comparison(comparison, names[0], names[1], runs[0], runs[1]))
    if args.json is not None:
        try:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(_comparison_json(comparison, names[0], names[1]), out, indent=1)
        except OSError as exc:
            print(f"bnfast-bench: error: {exc}", file=sys.stderr)
            return 1
        print(f"bnfast-bench: wrote {args.json}", file=sys.stderr)
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
