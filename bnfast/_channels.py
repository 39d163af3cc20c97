"""Memory layouts the kernels read.

A batch reaches the kernels in one of three layouts (`Batch.layout`):

  flat    per feature: x's own C-contiguous memory, read as (N, D) rows
  rows    per channel, channels-last: memory ordered (N, *spatial, C), as
          ``x.transpose(0, 3, 1, 2)`` of an NHWC array is; read as
          (N * S, C) rows, where a channel is a column (S = prod(spatial))
  planes  per channel, NCHW-contiguous: read as (N, C, S) planes

flat and rows run the rows kernels, planes the planes_* kernels; results
keep the layout of the input.  With one value per plane (S = 1) NCHW memory
is (N, C) rows too and runs as rows.  Which layout a call gets, any
conversion, and the entry point are decided by the planner (bnfast._checks);
this module only describes layouts.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np

from . import _outputs

class Layout(enum.Enum):
    """(An enum: its members stay themselves through pickling and copies, so
    they compare with `is`.)"""
    FLAT = "flat"
    ROWS = "rows"
    PLANES = "planes"


FLAT, ROWS, PLANES = Layout.FLAT, Layout.ROWS, Layout.PLANES


class Batch(NamedTuple):
    """A batch as the kernels read it.  (A named tuple: one is made on every
    call, and a frozen dataclass costs a microsecond to make.)"""
    array: np.ndarray        # kernel-ready memory: x's shape (flat, planes), (N, *spatial, C) (rows)
    layout: Layout           # FLAT, ROWS or PLANES
    shape: tuple[int, ...]   # the caller's x shape
    n: int                   # samples
    c: int                   # features (flat) or channels
    s: int                   # values per feature (channel) in a sample: 1 flat, S per channel

    @property
    def rows(self) -> int:
        """Values per feature (channel)."""
        return self.n * self.s


# Transpose axes by ndim, made once: building them costs as much as the transpose.
_TO_LAST = {ndim: (0, *range(2, ndim), 1) for ndim in range(2, 65)}
_TO_SECOND = {ndim: (0, ndim - 1, *range(1, ndim - 1)) for ndim in range(2, 65)}


def channels_to_last(a: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> the (N, *spatial, C) view (np.moveaxis, without its overhead)."""
    return a.transpose(_TO_LAST[a.ndim])


def channels_to_second(a: np.ndarray) -> np.ndarray:
    """(N, *spatial, C) -> the (N, C, *spatial) view."""
    return a.transpose(_TO_SECOND[a.ndim])


def kernel_view(layout: Layout, arr: np.ndarray) -> np.ndarray:
    """The view of an array of x's shape in a layout, as the kernels read or write it."""
    return channels_to_last(arr) if layout is ROWS else arr


def output(layout: Layout, shape: tuple[int, ...], rows_shape: tuple[int, ...],
           dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A new array of x's shape and dtype dt in a layout, and its kernel view
    (rows_shape: the kernels' (N, *spatial, C) shape in the rows layout)."""
    if layout is ROWS:
        rows = _outputs.empty(rows_shape, dt)
        return channels_to_second(rows), rows
    arr = _outputs.empty(shape, dt)
    return arr, arr


def with_array(b: Batch, array: np.ndarray) -> Batch:
    """b reading another array of the same layout (a copy of its memory)."""
    return Batch(array, b.layout, b.shape, b.n, b.c, b.s)


def centered(b: Batch, mean: np.ndarray) -> np.ndarray:
    """x - mean as a new float64 array, in the reference's shape: (N, D) per
    feature, x's shape per channel."""
    if b.layout is PLANES:
        planes: np.ndarray = b.array.reshape(b.n, b.c, b.s) - mean[:, None]
        return planes.reshape(b.shape)
    rows: np.ndarray = b.array.reshape(-1, b.c) - mean
    return rows if b.layout is FLAT else channels_to_second(rows.reshape(b.array.shape))


def scale(b: Batch, a: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """a (as `centered` gives it) times a per-feature (per-channel) factor, in place."""
    a *= factor if b.layout is FLAT else factor.reshape((1, -1) + (1,) * (a.ndim - 2))
    return a


def describe(layout: Layout) -> str:
    """A layout in words, for messages."""
    return {FLAT: "C-contiguous", PLANES: "laid out like x: NCHW (C-contiguous)",
            ROWS: "laid out like x: channels-last (memory ordered (N, *spatial, C))"}[layout]


def split_dims(b: Batch) -> tuple[int, int, int]:
    """The size arguments of the split-phase kernels: (rows, C, 0) for rows,
    (N, C, S) for planes."""
    if b.layout is PLANES:
        return b.n, b.c, b.s
    return b.n * b.s, b.c, 0
