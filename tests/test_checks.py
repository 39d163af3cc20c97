"""The planner (bnfast/_checks.py): one plan per call, one route for x.

A call is planned (validation, dtypes, layout, results) without touching any
state, carried out by one kernel call, then committed.  Calls whose inputs
are ready for the kernels take the trivial plan (no conversion, dtypes from
a memo); every other call is planned in full, and the two must give the
same bits wherever their inputs hold the same numbers.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

import bnfast
from bnfast import _checks, _dtypes
from bnfast._channels import FLAT, PLANES, ROWS

from test_channels import channels_last


def kernel_calls(call, monkeypatch):
    """The bnfast functions entered (as (module, name)) and the kernel entry
    points called (as ('kernel', name)) while call() runs, in order."""
    events = []
    for name in ("train_forward", "eval_forward", "train_backward", "eval_backward"):
        kernel = getattr(_checks, "_" + name)

        def recording(*args, kernel=kernel, name=name):
            # the last argument, s, is 0 for rows and > 0 for NCHW planes
            events.append(("kernel", ("planes_" if args[-1] else "") + name))
            return kernel(*args)
        monkeypatch.setattr(_checks, "_" + name, recording)

    def profile(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if module.startswith("bnfast"):
                events.append((module, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return events


def route(events):
    """The modules x passes through, consecutive repeats merged; the planning
    helpers (_channels, _dtypes and the twin it runs for a dtype it has not
    seen) count as planning."""
    merged = []
    for module, _ in events:
        stage = {"bnfast._channels": "bnfast._checks", "bnfast._dtypes": "bnfast._checks",
                 "bnfast.reference": "bnfast._checks"}.get(module, module)
        if not merged or merged[-1] != stage:
            merged.append(stage)
    return merged


@pytest.mark.parametrize("per_channel", [False, True], ids=["per feature", "per channel"])
@pytest.mark.parametrize("ready", [True, False], ids=["trivial plan", "general plan"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_forward_goes_layer_planning_kernel_layer_once(rng, monkeypatch, per_channel, ready,
                                                         train):
    x = rng.standard_normal((8, 3, 4))
    if not ready:
        x = np.asfortranarray(x.astype(np.float32))
    layer = bnfast.BatchNormalization(np.ones(3 if per_channel else 12),
                                      np.zeros(3 if per_channel else 12),
                                      per_channel=per_channel)
    layer.forward(x, train)
    events = kernel_calls(lambda: layer.forward(x, train), monkeypatch)
    assert route(events) == ["bnfast.layer", "bnfast._checks", "kernel", "bnfast.layer"], events
    assert [name for module, name in events if module == "kernel"] == [
        ("planes_" if per_channel else "") + ("train_forward" if train else "eval_forward")]
    assert events[-1] == ("bnfast.layer", "_commit")


@pytest.mark.parametrize("per_channel", [False, True], ids=["per feature", "per channel"])
def test_a_backward_goes_layer_planning_kernel_layer_once(rng, monkeypatch, per_channel):
    x = rng.standard_normal((8, 3, 4))
    layer = bnfast.BatchNormalization(np.ones(3 if per_channel else 12),
                                      np.zeros(3 if per_channel else 12),
                                      per_channel=per_channel)
    layer.forward(x)
    dout = rng.standard_normal(x.shape)
    layer.backward(dout)
    events = kernel_calls(lambda: layer.backward(dout), monkeypatch)
    # (back in the layer, backward only binds dgamma and dbeta: no call to record)
    assert route(events) == ["bnfast.layer", "bnfast._checks", "kernel"], events
    assert [name for module, name in events if module == "kernel"] == [
        ("planes_" if per_channel else "") + "train_backward"]


def _spy_resolver(monkeypatch):
    """Counts the full dtype resolutions (the general plan resolves; the
    trivial plan reads the memo)."""
    calls = []
    for name in ("train", "evaluate", "grads"):
        real = getattr(_dtypes, name)
        monkeypatch.setattr(_dtypes, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("running", ["unset", "x dtype", "float64"])
def test_ready_inputs_take_the_trivial_plan(rng, monkeypatch, dtype, running):
    x = rng.standard_normal((6, 5)).astype(dtype)
    kwargs = {}
    if running != "unset":
        rdtype = dtype if running == "x dtype" else np.float64
        kwargs = dict(running_mean=np.zeros(5, rdtype), running_var=np.ones(5, rdtype))
    layer = bnfast.BatchNormalization(np.ones(5, dtype), np.zeros(5, dtype), **kwargs)
    layer.forward(x), layer.backward(x), layer.forward(x, False)   # warm the memo
    calls = _spy_resolver(monkeypatch)
    plan, _, after, source, _, gamma, _ = _checks.plan_forward(
        x, layer.gamma, layer.beta, layer.running_mean, layer.running_var, layer.eps,
        layer.momentum, layer.momentum, True, run=False)
    assert source is x and after is None and gamma is layer.gamma
    layer.forward(x), layer.backward(x), layer.forward(x, False)
    assert calls == []


@pytest.mark.parametrize("change", ["strided gamma", "gamma (1, D)", "int momentum",
                                    "fortran x", "float16 running statistics"])
def test_other_inputs_take_the_general_plan(rng, monkeypatch, change):
    d = 5
    x = rng.standard_normal((6, d)).astype(np.float32)
    gamma, beta = np.ones(d, np.float32), np.zeros(d, np.float32)
    kwargs = {}
    if change == "strided gamma":
        gamma = np.repeat(gamma, 2)[::2]
    elif change == "gamma (1, D)":
        gamma = gamma.reshape(1, d)
    elif change == "int momentum":
        kwargs["momentum"] = 1
    elif change == "fortran x":
        x = np.asfortranarray(x.reshape(6, 1, d))
    else:
        kwargs.update(running_mean=np.zeros(d, np.float16), running_var=np.ones(d, np.float16))
    layer = bnfast.BatchNormalization(gamma, beta, **kwargs)
    calls = _spy_resolver(monkeypatch)
    layer.forward(x)
    assert calls == ["train"]


def _full_round(layer, x, dout):
    results = [layer.forward(x), layer.backward(dout), layer.dgamma, layer.dbeta,
               layer.running_mean, layer.running_var, layer.xn, layer.std]
    results += [layer.forward(x, False), layer.backward(dout), layer.dgamma, layer.dbeta]
    return results


@pytest.mark.parametrize("layout", ["per feature", "nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_trivial_plan_and_the_general_plan_give_the_same_bits(rng, monkeypatch, layout,
                                                                  dtype):
    """The same numbers through both plans: ready arrays, and the same values
    as strided gamma and beta (which the general plan copies)."""
    per_channel = layout != "per feature"
    x = (rng.standard_normal((6, 5, 4, 3)) * 2 + 1).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    if layout == "channels_last":
        x, dout = channels_last(x), channels_last(dout)
    c = 5 if per_channel else 60
    gamma = (1 + 0.4 * rng.standard_normal(c)).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    make = lambda g, b: bnfast.BatchNormalization(  # noqa: E731
        g, b, running_mean=np.zeros(c, dtype), running_var=np.ones(c, dtype),
        per_channel=per_channel)
    _full_round(make(gamma, beta), x, dout)      # the memo of dtypes is warm
    calls = _spy_resolver(monkeypatch)
    results = []
    for strided in (False, True):
        g, b = (np.repeat(v, 2)[::2] if strided else v for v in (gamma, beta))
        layer = make(g, b)
        before = len(calls)
        results.append(_full_round(layer, x, dout))
        assert (len(calls) > before) == strided, calls     # the plan each took
    for i, (trivial, general) in enumerate(zip(*results)):
        assert trivial.dtype == general.dtype and trivial.shape == general.shape, i
        assert trivial.strides == general.strides, i
        assert np.array_equal(trivial, general), i


@pytest.mark.parametrize("name, make, expected, copied", [
    ("per feature", lambda x: x, FLAT, False),
    ("nchw", lambda x: x, PLANES, False),
    ("channels-last", channels_last, ROWS, False),
    ("one value per plane", lambda x: np.ascontiguousarray(x[:, :, :1, :1]), ROWS, False),
    ("2-D per channel", lambda x: np.ascontiguousarray(x[:, :, 0, 0]), ROWS, False),
    ("strided", lambda x: x[:, :, ::2], PLANES, True),
    ("fortran", np.asfortranarray, PLANES, True),
    ("int64", lambda x: x.astype(np.int64), PLANES, True),
    ("byte-swapped", lambda x: x.astype(x.dtype.newbyteorder()), PLANES, True),
])
def test_the_layout_is_read_in_place_when_the_kernels_can(name, make, expected, copied):
    x = make(np.arange(4 * 3 * 4 * 6, dtype=np.float64).reshape(4, 3, 4, 6))
    per_channel = name != "per feature"
    arr, b = _checks.layout(x, per_channel)
    assert b.layout is expected and b.shape == x.shape
    assert np.shares_memory(b.array, x) != copied
    # the kernels' view holds x's values
    rows = (b.array.reshape(b.n, b.c, b.s) if b.layout is PLANES
            else b.array.reshape(b.n * b.s, b.c))
    expected_rows = (np.asarray(x, np.float64).reshape(b.n, b.c, b.s) if b.layout is PLANES
                     else (np.moveaxis(np.asarray(x, np.float64), 1, -1).reshape(-1, b.c)
                           if per_channel else np.asarray(x, np.float64).reshape(b.n, -1)))
    assert np.array_equal(rows, expected_rows)


def test_planning_a_rejected_call_writes_nothing_and_keeps_no_plan(rng):
    """The planner raises before anything is allocated into the layer: the
    layer's state and the caller's arrays are as they were."""
    layer = bnfast.BatchNormalization(np.ones(4), np.zeros(4))
    x = rng.standard_normal((5, 4))
    layer.forward(x)
    plan, buffer, stats = layer._train, layer._buffer, layer._stats
    keep, keep_stats = buffer.copy(), stats[0].copy()
    with pytest.raises(ValueError, match="not a per-feature shape"):
        layer.forward(rng.standard_normal((5, 3)))
    assert layer._train is plan and layer._buffer is buffer and layer._stats is stats
    assert np.array_equal(buffer, keep) and np.array_equal(stats[0], keep_stats)
