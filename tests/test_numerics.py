"""Accuracy against a correctly rounded float64 oracle built on math.fsum.

The oracle sums exactly (fsum) and rounds once, so its mean and variance are
as good as float64 can hold; the normalized output is then computed in
float64.  bnfast's error and the reference twin's error are both measured
against it, and a table of the two is printed at the end of the module
(run with -s to see it).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import bnfast
from bnfast.reference import BatchNormalization as Twin

EPS = 1e-6
SUMMARY: list[tuple[str, float, float]] = []   # (case, bnfast error, twin error)


@pytest.fixture(scope="module", autouse=True)
def summary_table():
    yield
    if SUMMARY:
        width = max(len(case) for case, *_ in SUMMARY)
        print(f"\n{'case':<{width}}  {'bnfast error':>12}  {'twin error':>12}")
        for case, mine, theirs in SUMMARY:
            print(f"{case:<{width}}  {mine:12.3e}  {theirs:12.3e}")


def oracle(x, eps: float = EPS):
    """Per-feature mean, biased variance and normalized batch, as float64.

    mean = fsum(column) / n; var = fsum((column - mean)**2) / n, with the
    squares taken of Python floats; xn = (x - mean) / sqrt(var + eps)."""
    rows = np.asarray(x, np.float64).reshape(len(x), -1)
    n, d = rows.shape
    mean, var = np.empty(d), np.empty(d)
    for j in range(d):
        column = rows[:, j].tolist()
        mean[j] = math.fsum(column) / n
        var[j] = math.fsum((value - mean[j]) ** 2 for value in column) / n
    return mean, var, (rows - mean) / np.sqrt(var + eps)


def normalized_error(layer_class, x, expected_xn) -> float:
    """max |forward(x) - oracle xn| for gamma = 1, beta = 0, where the
    output is the normalized batch itself."""
    layer = layer_class(1.0, 0.0)
    with np.errstate(all="ignore"):
        out = layer.forward(x)
    return float(np.max(np.abs(out.astype(np.float64).reshape(expected_xn.shape) - expected_xn)))


def measure(case: str, x) -> tuple[float, float]:
    """(bnfast error, twin error) of the normalized output; recorded for the table."""
    _, _, xn = oracle(x)
    errors = normalized_error(bnfast.BatchNormalization, x, xn), normalized_error(Twin, x, xn)
    SUMMARY.append((case, *errors))
    return errors


# ---------------------------------------------------------------------------
# A constant feature is exactly constant: mean == value, var == 0, xn == 0.

@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 70000])
@pytest.mark.parametrize("value", [0.1, 1e8 + 0.3, -123456.789])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_constant_feature_normalizes_to_exactly_beta(n, value, dtype):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3)).astype(dtype)
    x[:, 1] = value                    # rounded once to dtype; that value is "the" constant
    x[:, 2] *= 1e3
    constant = float(x[0, 1])
    gamma = np.array([0.5, 1.7, 2.0], dtype)
    beta = np.array([0.25, -3.1, 1.0], dtype)
    layer = bnfast.BatchNormalization(gamma, beta)
    out = layer.forward(x)
    assert np.array_equal(out[:, 1], np.full(n, beta[1])), "output is not exactly beta"
    assert np.all(layer.xn[:, 1] == 0) and np.all(layer.xc[:, 1] == 0)
    fit = bnfast.forward_train(x, gamma, beta)
    assert fit.mean[1] == constant and fit.var[1] == 0.0
    dout = rng.standard_normal((n, 3)).astype(dtype)
    dx = layer.backward(dout)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(layer.dgamma))
    assert np.all(np.isfinite(layer.dbeta))
    assert layer.dgamma[1] == 0.0      # sum(dout * xn) with xn == 0


# ---------------------------------------------------------------------------
# Large offsets: where the reference's naive sums lose digits.

def test_float64_offset_1e8_is_accurate_to_1e_7():
    x = np.random.default_rng(1).standard_normal((65536, 4)) + 1e8
    mine, theirs = measure("float64, 65536 x 4, offset 1e8", x)
    assert mine <= 1e-7, f"bnfast error {mine:.3e} (twin {theirs:.3e})"


def test_float32_offset_1e3_is_accurate_to_2e_6():
    x = (np.random.default_rng(2).standard_normal((10000, 4)) + 1e3).astype(np.float32)
    mine, theirs = measure("float32, 10000 x 4, offset 1e3", x)
    assert mine <= 2e-6, f"bnfast error {mine:.3e} (twin {theirs:.3e})"


# ---------------------------------------------------------------------------
# Never less accurate than the reference.  Both can be exact (a batch of two
# normalizes to +-1), so bnfast may exceed the twin's error by a few units in
# the last place of the output: 4 * machine epsilon * max |xn|.

def _heavy_tails(rng):
    return rng.standard_t(1.5, (5000, 6))


def _cauchy(rng):
    return rng.standard_cauchy((5000, 6))


def _mixed_scales(rng):
    scales = np.logspace(-6, 6, 7)        # one scale per feature, offset by 3 of it
    return rng.standard_normal((3000, 7)) * scales + 3 * scales


def _sorted_ramps(rng):
    return np.sort(rng.random((4000, 5)), axis=0) * 1e3 + 1e4


def _batch_of_two(rng):
    return rng.standard_normal((2, 9)) * 10 + 5


def _offset_1e6(rng):
    return rng.standard_normal((4096, 3)) + 1e6


def _offset_1e12(rng):
    # spread 1e5: wider than float32's spacing at 1e12 (65536), so float32 data varies too
    return rng.standard_normal((4096, 3)) * 1e5 + 1e12


CASES = {"heavy tails (t, df=1.5)": _heavy_tails, "Cauchy": _cauchy,
         "mixed scales 1e-6..1e6": _mixed_scales, "sorted ramps": _sorted_ramps,
         "batch of 2": _batch_of_two, "offset 1e6": _offset_1e6, "offset 1e12": _offset_1e12}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_never_less_accurate_than_the_reference(case, dtype):
    x = CASES[case](np.random.default_rng(3)).astype(dtype)
    mine, theirs = measure(f"{case}, {np.dtype(dtype).name}", x)
    _, _, xn = oracle(x)
    slack = 4 * np.finfo(dtype).eps * float(np.max(np.abs(xn)))
    assert mine <= theirs + slack, f"bnfast error {mine:.3e} > twin error {theirs:.3e}"


# ---------------------------------------------------------------------------
# Running statistics after one step, against the oracle's batch statistics.

STAT_CASES = {
    "normal": lambda rng: rng.standard_normal((4096, 8)) * 3 - 1,
    "offset 1e8": lambda rng: rng.standard_normal((65536, 4)) + 1e8,
    "Cauchy": lambda rng: rng.standard_cauchy((5000, 6)),
    "float32 offset 1e3": lambda rng: (rng.standard_normal((10000, 4)) + 1e3).astype(np.float32),
}


@pytest.mark.parametrize("case", list(STAT_CASES))
def test_running_statistics_after_one_step_match_the_oracle(case):
    """running = 0.9 * old + 0.1 * batch against the same update of the
    oracle's statistics.

    Mean: within 4 ulps of the running mean (the update rounds twice, the
    batch mean once) plus 1e-15 of the spread.  Variance: within 1e-14
    relative, plus 0.1 ulp(mean) / std: bnfast merges per-block means that are
    rounded to float64 near the mean, and each carries up to ulp(mean) / 2 of
    error into the between-block term of the variance (about 4e-12 relative
    at offset 1e8, where the twin's single global mean gets ~1e-13)."""
    rng = np.random.default_rng(4)
    x = STAT_CASES[case](rng)
    d = x.shape[1]
    old_mean, old_var = rng.standard_normal(d), rng.random(d) + 1.0
    mean, var, _ = oracle(x)
    expected_mean = 0.9 * old_mean + 0.1 * mean
    expected_var = 0.9 * old_var + 0.1 * var
    mean_err, var_err = {}, {}       # per feature, for bnfast and the twin
    for name, cls in (("bnfast", bnfast.BatchNormalization), ("twin", Twin)):
        layer = cls(1.0, 0.0, 0.9, old_mean.copy(), old_var.copy())
        layer.forward(x)
        mean_err[name] = np.abs(layer.running_mean - expected_mean)
        var_err[name] = np.abs(layer.running_var - expected_var) / expected_var
    SUMMARY.append((f"running_mean abs, {case}", mean_err["bnfast"].max(), mean_err["twin"].max()))
    SUMMARY.append((f"running_var rel, {case}", var_err["bnfast"].max(), var_err["twin"].max()))
    mean_bound = 4 * np.spacing(np.abs(expected_mean)) + 1e-15 * np.sqrt(var)
    var_bound = 1e-14 + 0.1 * np.spacing(np.abs(mean)) / np.sqrt(var)
    assert np.all(mean_err["bnfast"] <= mean_bound), (mean_err["bnfast"], mean_bound)
    assert np.all(var_err["bnfast"] <= var_bound), (var_err["bnfast"], var_bound)
