"""bnfast and its peers on the benchmark grid, one benchmark per (cell, peer).

The cells are bnfast-bench's two grids: per-feature (the default) and
per-channel (--per-channel; NCHW and channels-last).  Each test's group is its
cell, e.g. "256x1024-float64-train" or "32x64x56x56-cl-float32-eval", so that
``pytest bench --benchmark-group-by=group`` lists bnfast, reference, torch,
jax, numba and floor side by side.  torch, jax and numba are skipped where
they are not installed, and run on bnfast's thread count where they are.
Every bnfast, torch, jax and numba result is checked against the reference
twin before it is timed (the reference is the oracle, and the floor computes
no batch normalization).  ``bnfast-bench`` times the same callables,
interleaved; this suite gives pytest-benchmark's statistics and its saved,
comparable runs.
"""
from __future__ import annotations

from typing import Any

import pytest

from bnfast import bench
from bnfast._timing import calls_per_repeat

pytest.importorskip("pytest_benchmark")

ROUNDS = bench.DEFAULT_REPEATS
CELLS = (bench.grid(bench.SHAPES, bench.DTYPES, bench.OPS)
         + bench.grid(bench.CHANNEL_SHAPES, bench.DTYPES, bench.OPS, bench.CHANNEL_LAYOUTS))
PARAMS = [(cell, peer) for cell in CELLS for peer in bench.PEERS]


@pytest.mark.parametrize(("cell", "peer"), PARAMS,
                         ids=[f"{cell.label}-{peer}" for cell, peer in PARAMS])
def test_peer(benchmark: Any, cell: bench.Cell, peer: str, installed: None, case: bench.Case,
              expected: Any) -> None:
    call = bench.make_call(peer, case, cell.op)
    if peer in bench.CHECKED_PEERS:
        bench.check(peer, call(), expected, case, cell.op)
    benchmark.group = cell.label
    benchmark.extra_info.update(peer=peer, shape=list(cell.shape), layout=cell.layout,
                                dtype=cell.dtype, op=cell.op)
    # Tiny cells loop enough calls per round (~3 ms) that timer resolution
    # does not matter; with --benchmark-disable the call just runs once.
    iterations = 1 if benchmark.disabled else calls_per_repeat(call)
    benchmark.pedantic(call, iterations=iterations, rounds=ROUNDS, warmup_rounds=1)
