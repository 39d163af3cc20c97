"""Shared helpers: the twin as oracle, input layouts, tolerant comparisons."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

import bnfast
from bnfast.reference import BatchNormalization as Twin

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261128)


def tolerance(dtype) -> float:
    """Relative tolerance for comparing two correct float results of dtype."""
    return {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 2e-5}.get(np.dtype(dtype), 1e-10)


def assert_close(actual, expected, rtol=None, scale=None, what=""):
    """Equal shapes and dtypes; values within rtol, relative to `scale`.

    `scale` defaults to the largest |expected|; pass the magnitude of the
    terms a result is computed from where it cancels (dx of a batch of two is
    a difference of O(|gamma * dout / std|) terms), since rounding error is
    relative to those terms, not to their small difference.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    rtol = tolerance(expected.dtype) if rtol is None else rtol
    finite = np.isfinite(expected)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN positions differ"
    if scale is None:
        scale = float(np.max(np.abs(expected[finite]), initial=0.0))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol,
                               atol=rtol * max(scale, 1e-30), err_msg=what)


def dx_scale(layer, dout) -> float:
    """Magnitude of the terms dx is computed from: |gamma| * |dout| / std."""
    gamma = np.abs(np.asarray(layer.gamma, dtype=np.float64))
    dout = np.asarray(dout, dtype=np.float64).reshape(len(dout), -1)
    std = np.asarray(layer.std if layer._last_train is not False else
                     np.sqrt(np.asarray(layer.running_var, np.float64) + layer.eps), np.float64)
    return float(np.max(np.abs(dout) * gamma / std, initial=0.0))


def layouts(x: np.ndarray):
    """The same values in every memory layout the layer must accept."""
    yield "c", np.ascontiguousarray(x)
    yield "fortran", np.asfortranarray(x)
    big = np.zeros((x.shape[0] * 2,) + x.shape[1:], x.dtype)
    big[::2] = x
    yield "strided", big[::2]
    yield "negative", np.ascontiguousarray(x[::-1])[::-1]
    readonly = np.array(x)
    readonly.flags.writeable = False
    yield "readonly", readonly
    swapped = x.astype(x.dtype.newbyteorder(">" if x.dtype.byteorder != ">" else "<"))
    yield "byteswapped", swapped
    raw = np.empty(x.nbytes + 1, np.uint8)[1:].view(x.dtype).reshape(x.shape)
    raw[...] = x
    yield "unaligned", raw


def make_params(rng, d, dtype=np.float64):
    gamma = (rng.standard_normal(d) * 0.5 + 1.0).astype(dtype)
    beta = rng.standard_normal(d).astype(dtype)
    return gamma, beta


def pair(gamma, beta, **kwargs):
    """A bnfast layer and a twin layer built from the same (copied) arguments."""
    copy = lambda v: v.copy() if isinstance(v, np.ndarray) else v  # noqa: E731
    extra = {k: copy(v) for k, v in kwargs.items()}
    return (bnfast.BatchNormalization(copy(gamma), copy(beta), **extra),
            Twin(copy(gamma), copy(beta), **{k: copy(v) for k, v in kwargs.items()}))


def seed_reference_path() -> pathlib.Path | None:
    """The book's class, verbatim, beside the checkout (../shared/reference)."""
    env = os.environ.get("BNFAST_SEED_REFERENCE")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "reference" / "reference_bn.py")
    for path in candidates:
        if path.is_file():
            return path
    return None
