"""bnfast.distributed.SyncBatchNormalization over several ranks.

The ranks here are threads sharing a stand-in communicator (threadcomm.py),
so the single-process suite covers the multi-rank logic; tests/mpi/ runs the
same checks under a real `mpiexec`.
"""
from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import bnfast
from bnfast.distributed import RankError, SyncBatchNormalization
from conftest import assert_close, dx_scale, make_params
from threadcomm import run_ranks

CUTS = {
    1: [0, 23],
    2: [0, 1, 23],            # a one-row shard
    3: [0, 9, 10, 23],
    4: [0, 5, 11, 12, 23],
}


def sync_round(comm, x, dout, gamma, beta, cuts, **kwargs):
    """One rank's training forward + backward, then eval forward + backward."""
    shard = slice(cuts[comm.rank], cuts[comm.rank + 1])
    layer = SyncBatchNormalization(gamma, beta, comm=comm, **kwargs)
    out = layer.forward(x[shard])
    dx = layer.backward(dout[shard])
    state = dict(out=out, dx=dx, dgamma=layer.dgamma, dbeta=layer.dbeta, xn=layer.xn,
                 xc=layer.xc, std=layer.std, running_mean=layer.running_mean,
                 running_var=layer.running_var, batch_size=layer.batch_size,
                 global_batch_size=layer.global_batch_size)
    state["eval_out"] = layer.forward(x[shard], False)
    state["eval_dx"] = layer.backward(dout[shard])
    state["eval_dgamma"], state["eval_dbeta"] = layer.dgamma, layer.dbeta
    return state


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_rank_gets_the_whole_batch_result(rng, ranks, dtype):
    shape = (23, 4, 3)
    gamma, beta = make_params(rng, 12, dtype)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    kwargs = dict(running_mean=np.zeros(12, dtype), running_var=np.ones(12, dtype))
    single = bnfast.BatchNormalization(gamma, beta, **copy.deepcopy(kwargs))
    expected = dict(out=single.forward(x), dx=single.backward(dout))
    expected.update(dgamma=single.dgamma, dbeta=single.dbeta, xn=single.xn, xc=single.xc,
                    std=single.std, running_mean=single.running_mean,
                    running_var=single.running_var)
    expected["eval_out"] = single.forward(x, False)
    expected["eval_dx"] = single.backward(dout)
    expected["eval_dgamma"], expected["eval_dbeta"] = single.dgamma, single.dbeta
    cuts = CUTS[ranks]
    states = run_ranks(ranks, lambda comm: sync_round(comm, x, dout, gamma, beta, cuts,
                                                      **copy.deepcopy(kwargs)))
    for state in states:
        assert isinstance(state, dict), state
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    for key in ("out", "dx", "xn", "xc", "eval_out", "eval_dx"):
        got = np.concatenate([s[key] for s in states])
        scale = dx_scale(single, dout) if "dx" in key else None
        assert_close(got, expected[key].reshape(got.shape), rtol=rtol, scale=scale, what=key)
    for key in ("dgamma", "dbeta", "std", "running_mean", "running_var", "eval_dgamma",
                "eval_dbeta"):
        for state in states:
            assert_close(state[key], expected[key], rtol=rtol, what=key)
            # bitwise the same on every rank: merged in rank order
            assert np.array_equal(state[key], states[0][key]), key
    assert [s["batch_size"] for s in states] == list(np.diff(cuts))
    assert {s["global_batch_size"] for s in states} == {23}


def failing_ranks(ranks, work):
    results = run_ranks(ranks, work, timeout=20)
    assert all(isinstance(r, Exception) for r in results), results
    return results


def test_an_empty_shard_raises_on_every_rank(rng):
    gamma, beta = make_params(rng, 3)
    x = rng.standard_normal((6, 3))

    def work(comm):
        layer = SyncBatchNormalization(gamma, beta, comm=comm)
        return layer.forward(x[:0] if comm.rank == 1 else x)
    own, other = failing_ranks(3, work)[1], failing_ranks(3, work)[0]
    assert type(own) is ValueError and "empty batch: shape (0, 3)" in str(own)
    assert type(other) is RankError and "rank 1" in str(other) and "empty batch" in str(other)


@pytest.mark.parametrize("change, message", [
    (lambda x: x[:, :2], r"samples of shape \(2,\)"),
    (lambda x: x.astype(np.float32), "dtype float32"),
    (lambda x: x.reshape(len(x), 3, 1), r"samples of shape \(3, 1\)"),
])
def test_mismatched_shards_raise_on_every_rank_and_change_nothing(rng, change, message):
    gamma, beta = make_params(rng, 3)
    x = rng.standard_normal((6, 3))
    layers = {}

    def work(comm):
        layer = layers[comm.rank] = SyncBatchNormalization(1.0, 0.0, comm=comm)
        return layer.forward(change(x) if comm.rank == 2 else x)
    for error in failing_ranks(3, work):
        assert type(error) is RankError
        assert "rank 2 has" in str(error) and re.search(message, str(error))
    for layer in layers.values():
        assert layer.running_mean is None and layer.input_shape is None
        assert layer._last_train is None


def test_mismatched_calls_raise_instead_of_deadlocking(rng):
    x = rng.standard_normal((6, 3))

    def work(comm):
        layer = SyncBatchNormalization(1.0, 0.0, comm=comm)
        layer.forward(x)
        if comm.rank == 0:
            return layer.forward(x)     # while rank 1 calls backward
        return layer.backward(x)
    for error in failing_ranks(2, work):
        assert type(error) is RuntimeError and "different calls" in str(error)


def test_bad_dout_on_one_rank_raises_everywhere_and_keeps_gradients(rng):
    x = rng.standard_normal((6, 3))

    def work(comm):
        layer = SyncBatchNormalization(1.0, 0.0, comm=comm)
        layer.forward(x)
        layer.backward(x)
        before = layer.dgamma
        try:
            layer.backward(x[:, :2] if comm.rank == 1 else x)
        except ValueError as exc:
            assert layer.dgamma is before
            return exc
        return None
    errors = run_ranks(2, work)
    assert "dout has shape (6, 2)" in str(errors[1])
    assert type(errors[0]) is RankError and "rank 1" in str(errors[0])


def test_construction_and_copies():
    with pytest.raises(TypeError, match="comm must be an MPI communicator"):
        SyncBatchNormalization(1.0, 0.0, comm=object())
    layer = run_ranks(1, lambda comm: SyncBatchNormalization(np.ones(3), np.zeros(3),
                                                             comm=comm))[0]
    clone = copy.deepcopy(layer)
    assert clone.comm is layer.comm and clone.gamma is not layer.gamma
    state = pickle.loads(pickle.dumps(layer.__getstate__()))
    assert state["comm"] is None     # a communicator does not travel


def test_importing_bnfast_does_not_import_mpi4py():
    code = "import sys, bnfast, bnfast.distributed; sys.exit('mpi4py' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def channels_last(x):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("param_shape", [(3,), (1, 3, 1, 1)])
def test_per_channel_ranks_get_the_whole_batch_result(rng, layout, dtype, param_shape):
    """(1, 3, 1, 1) operands: dgamma, dbeta and running statistics in that
    layout on every rank, as the single-process layer gives them."""
    shape = (9, 3, 4, 5)
    gamma, beta = (p.reshape(param_shape) for p in make_params(rng, 3, dtype))
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    if layout == "channels_last":
        x, dout = channels_last(x), channels_last(dout)
    kwargs = dict(running_mean=np.zeros(param_shape, dtype),
                  running_var=np.ones(param_shape, dtype),
                  per_channel=True, running_var_unbiased=True)
    single = bnfast.BatchNormalization(gamma, beta, **copy.deepcopy(kwargs))
    expected = {"out": single.forward(x), "dx": single.backward(dout)}
    expected.update(dgamma=single.dgamma, dbeta=single.dbeta, xn=single.xn, std=single.std,
                    running_mean=single.running_mean, running_var=single.running_var)
    expected["eval_out"] = single.forward(x, False)
    single.backward(dout)
    expected.update(eval_dgamma=single.dgamma, eval_dbeta=single.dbeta)
    assert expected["dgamma"].shape == expected["running_var"].shape == param_shape
    cuts = [0, 1, 5, 9]
    states = run_ranks(3, lambda comm: sync_round(comm, x, dout, gamma, beta, cuts,
                                                  **copy.deepcopy(kwargs)))
    for state in states:
        assert isinstance(state, dict), state
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    for key in ("out", "dx", "xn"):
        got = np.concatenate([s[key] for s in states])
        scale = (float(np.max(np.abs(dout)) * np.max(np.abs(gamma)) / np.min(single.std))
                 if key == "dx" else None)
        assert_close(got, expected[key], rtol=rtol, scale=scale, what=key)
        if layout == "channels_last":
            assert all(np.moveaxis(s[key], 1, -1).flags.c_contiguous for s in states), key
    for key in ("dgamma", "dbeta", "std", "running_mean", "running_var", "eval_dgamma",
                "eval_dbeta"):
        for state in states:
            assert_close(state[key], expected[key], rtol=rtol, what=key)
            assert np.array_equal(state[key], states[0][key]), key
    assert {s["global_batch_size"] for s in states} == {9}
