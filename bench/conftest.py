"""Fixtures of the pytest-benchmark suite: each cell's data and reference result.

From the repository root:

    pytest bench --benchmark-group-by=group     # every peer of a cell side by side
    pytest bench --benchmark-disable            # a quick correctness pass only

Data and peers come from bnfast.bench, the machinery of ``bnfast-bench``.
Tests run cell by cell (all peers of one cell in a row), so caching the
current cell's data and reference result makes each of them once per cell.
"""
from __future__ import annotations

import functools
from typing import Any

import pytest

from bnfast import bench


@functools.lru_cache(maxsize=None)
def _peer_status(peer: str) -> bench.PeerStatus:
    return bench.load_peer(peer)


@pytest.fixture
def installed(peer: str) -> None:
    """Skip an optional peer (torch, jax, numba) that is not installed; the
    first use imports its library and sets it to bnfast's thread count."""
    if peer in bench.OPTIONAL_PEERS:
        status = _peer_status(peer)
        if not status.available:
            pytest.skip(status.reason)


@functools.lru_cache(maxsize=1)
def _case(shape: tuple[int, ...], dtype: str, layout: str) -> bench.Case:
    return bench.make_case(shape, dtype, layout)


@functools.lru_cache(maxsize=1)
def _expected(cell: bench.Cell) -> Any:
    return bench.expected_result(_case(cell.shape, cell.dtype, cell.layout), cell.op)


@pytest.fixture
def case(cell: bench.Cell) -> bench.Case:
    """The seeded data of the test's cell (shared by its peers: read-only)."""
    return _case(cell.shape, cell.dtype, cell.layout)


@pytest.fixture
def expected(cell: bench.Cell) -> Any:
    """The reference twin's result for the test's cell."""
    return _expected(cell)
