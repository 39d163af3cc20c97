"""SyncBatchNormalization under a real MPI launch.

Run by tools/check_mpi.sh as
    BNFAST_MPI_RANKS=K mpiexec -n K python -m pytest -q tests/mpi/sync_mpi_check.py
(the file name keeps it out of the single-process suite).  BNFAST_MPI_RANKS
is the rank count asked for: the launch fails unless the world has that
size, so K unconnected single-process runs (an mpiexec that does not match
mpi4py's MPI) cannot pass for a K-rank run.  Every rank makes
the same data from one seed, keeps its own shard of the batch, and compares
what it gets with a BatchNormalization on the whole batch; results that must
agree across ranks are gathered and compared bitwise.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

import bnfast  # noqa: E402
from bnfast.distributed import RankError, SyncBatchNormalization  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def test_the_world_has_the_ranks_asked_for():
    asked = os.environ.get("BNFAST_MPI_RANKS")
    assert asked is not None, ("set BNFAST_MPI_RANKS to the rank count given to mpiexec -n "
                               "(tools/check_mpi.sh does)")
    assert SIZE == int(asked), (f"mpiexec was asked for {asked} ranks but this world has "
                                f"{SIZE}: is the mpiexec on PATH the one of mpi4py's MPI?")
    assert COMM.allgather(RANK) == list(range(SIZE))


def uneven_cuts(n):
    """Shard bounds: rank 0 gets one row, the rest is split unevenly."""
    if SIZE == 1:
        return [0, n]
    rest = np.linspace(1, n, SIZE, dtype=int)      # 1, ..., n: SIZE - 1 shards
    rest[1:-1] += np.arange(1, SIZE - 1)           # uneven, none empty
    return [0] + [int(c) for c in rest]


def assert_close(got, expected, rtol, scale=None):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = float(np.max(np.abs(expected))) if scale is None else scale
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


def same_on_every_rank(value):
    gathered = COMM.allgather(np.asarray(value))
    assert all(np.array_equal(g, gathered[0]) for g in gathered), "ranks differ"


@pytest.mark.parametrize("shape", [(37, 16), (19, 3, 4, 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ranks_reproduce_the_single_process_layer(shape, dtype):
    rng = np.random.default_rng(7)
    d = int(np.prod(shape[1:]))
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma = (1 + 0.3 * rng.standard_normal(d)).astype(dtype)
    beta = rng.standard_normal(d).astype(dtype)
    single = bnfast.BatchNormalization(gamma.copy(), beta.copy())
    layer = SyncBatchNormalization(gamma.copy(), beta.copy())
    cuts = uneven_cuts(shape[0])
    mine = slice(cuts[RANK], cuts[RANK + 1])
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    for step in range(3):          # running statistics accumulate over steps
        x_step = x + step
        expected = single.forward(x_step)
        expected_dx = single.backward(dout)
        out = layer.forward(x_step[mine])
        dx = layer.backward(dout[mine])
        assert_close(out, expected[mine], rtol)
        dx_scale = float(np.max(np.abs(dout * gamma.reshape(shape[1:]))) / np.min(single.std))
        assert_close(dx, expected_dx[mine], rtol, scale=dx_scale)
        for name in ("dgamma", "dbeta", "running_mean", "running_var", "std"):
            assert_close(getattr(layer, name), getattr(single, name), rtol)
            same_on_every_rank(getattr(layer, name))
        assert layer.global_batch_size == shape[0]
        assert layer.batch_size == cuts[RANK + 1] - cuts[RANK]
    assert_close(layer.forward(x[mine], False), single.forward(x, False)[mine], rtol)
    layer.backward(dout[mine])
    single.backward(dout)
    assert_close(layer.dgamma, single.dgamma, rtol)
    same_on_every_rank(layer.dgamma)


def test_a_bad_shard_raises_on_every_rank():
    x = np.random.default_rng(1).standard_normal((8, 5))
    layer = SyncBatchNormalization(1.0, 0.0)
    bad = x[:, :4] if RANK == SIZE - 1 else x
    if SIZE == 1:
        pytest.skip("a mismatch needs two ranks")
    with pytest.raises(RankError, match=f"rank {SIZE - 1} has samples of shape"):
        layer.forward(bad)
    assert layer.running_mean is None
    empty = x[:0] if RANK == 0 else x
    with pytest.raises(ValueError, match="empty batch"):
        layer.forward(empty)
    # and the layer still works afterwards on every rank
    out = layer.forward(x)
    assert out.shape == x.shape and layer.global_batch_size == 8 * SIZE


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_per_channel_ranks_reproduce_the_single_process_layer(layout):
    rng = np.random.default_rng(11)
    shape = (13, 4, 3, 5)
    x = rng.standard_normal(shape) * 2 + 5
    dout = rng.standard_normal(shape)
    if layout == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    gamma, beta = 1 + 0.3 * rng.standard_normal(4), rng.standard_normal(4)
    options = dict(per_channel=True, running_var_unbiased=True)
    single = bnfast.BatchNormalization(gamma.copy(), beta.copy(), **options)
    layer = SyncBatchNormalization(gamma.copy(), beta.copy(), **options)
    cuts = uneven_cuts(shape[0])
    mine = slice(cuts[RANK], cuts[RANK + 1])
    expected, expected_dx = single.forward(x), single.backward(dout)
    out, dx = layer.forward(x[mine]), layer.backward(dout[mine])
    assert_close(out, expected[mine], 1e-12)
    scale = float(np.max(np.abs(dout)) * np.max(np.abs(gamma)) / np.min(single.std))
    assert_close(dx, expected_dx[mine], 1e-12, scale=scale)
    for name in ("dgamma", "dbeta", "running_mean", "running_var"):
        assert_close(getattr(layer, name), getattr(single, name), 1e-12)
        same_on_every_rank(getattr(layer, name))
