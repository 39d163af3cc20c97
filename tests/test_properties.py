"""Property-based tests: bnfast against the twin over random shapes, dtypes,
memory layouts, value ranges and multi-step train / eval / backward / update
sequences; backward against central differences.

Two hypothesis profiles, chosen by the environment variable
BNFAST_HYPOTHESIS_PROFILE: "ci" (the default: 100 examples per test,
the whole module in well under 30 s) and "thorough" (thousands).

How results are compared.  Two oracles:

* same-dtype: the twin itself, on the same arrays.  Used on well-conditioned
  data only (per-feature offsets within a few spreads, no constant feature).
  Tolerance: BASE_RTOL of the natural scale, 1e-4 for float32 (the twin
  computes in float32, bnfast in float64) and 1e-9 for float64, plus the
  twin's own rounding where a small batch happens to be tightly clustered:
  its naive sums of n values are off by up to n * eps * max |x|, which the
  normalization divides by std, so 2 * n * eps * max |x| / std per feature.
* shifted float64: the twin in float64 on x - o, where o is the per-feature
  offset the data was built around.  Batch normalization does not depend on
  a per-feature shift, and the subtraction is exact (|x - o| <= |o| / 2, so
  Sterbenz), so this oracle stays accurate for large offsets and gives
  exactly 0 for constant features, where the same-dtype twin's rounding
  noise would be amplified by 1 / sqrt(eps).  bnfast itself holds values near
  o in float64, so it may be off by about eps64 * |o| per step: the
  tolerance adds STEP_ULPS * steps * eps64 * max |x| / std per feature.

Natural scales: out ~ |gamma| * (max |xn| + 1) + |beta|; dx ~ |gamma| *
max |dout| / std (dx cancels: it is a difference of such terms); dgamma ~
sum |dout| * (max |xn| + 1); dbeta ~ sum |dout|; running statistics ~ their
size plus the batch spread.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bnfast
from bnfast.reference import BatchNormalization as Twin

settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=3000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("BNFAST_HYPOTHESIS_PROFILE", "ci"))

EPS = 1e-6
EPS64 = float(np.finfo(np.float64).eps)
BASE_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
STEP_ULPS = 16
MOMENTUM = 0.9
LEARNING_RATE = 0.1
LAYOUTS = ("c", "fortran", "strided", "negative", "byteswapped")


@st.composite
def feature_shapes(draw, max_features: int = 300) -> tuple[int, ...]:
    """1 to 3 feature dimensions whose product is at most max_features."""
    dims, budget = [], max_features
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, budget))
        dims.append(size)
        budget = max(1, budget // size)
    return tuple(dims)


class Spec(NamedTuple):
    seed: int
    n: int
    features: tuple[int, ...]
    dtype: np.dtype
    layout: str
    scale: float           # spread of every feature
    offset: float          # offsets are up to this many spreads
    constant_share: float  # share of features made exactly constant (shifted oracle only)


@st.composite
def specs(draw, well_conditioned: bool) -> Spec:
    offsets = [0.0, 1.0, 3.0] if well_conditioned else [0.0, 16.0, 1e3, 1e6]
    return Spec(seed=draw(st.integers(0, 2**32 - 1)), n=draw(st.integers(1, 64)),
                features=draw(feature_shapes()),
                dtype=np.dtype(draw(st.sampled_from([np.float32, np.float64]))),
                layout=draw(st.sampled_from(LAYOUTS)),
                scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
                offset=draw(st.sampled_from(offsets)),
                constant_share=0.0 if well_conditioned else draw(st.sampled_from([0.0, 0.3, 1.0])))


OPS = st.lists(st.sampled_from(["train", "eval", "backward", "update"]), min_size=1, max_size=8)


def laid_out(arr: np.ndarray, layout: str) -> np.ndarray:
    """The same values in the given memory layout."""
    if layout == "c":
        return np.ascontiguousarray(arr)
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "strided":
        big = np.zeros((arr.shape[0] * 2,) + arr.shape[1:], arr.dtype)
        big[::2] = arr
        return big[::2]
    if layout == "negative":
        return np.ascontiguousarray(arr[::-1])[::-1]
    return arr.astype(arr.dtype.newbyteorder(">"))


class Sequence:
    """bnfast and its oracle driven through the same calls, compared after each."""

    def __init__(self, spec: Spec, shifted: bool):
        self.spec, self.shifted = spec, shifted
        self.rng = np.random.default_rng(spec.seed)
        self.d = math.prod(spec.features)
        d, dtype, rng = self.d, spec.dtype, self.rng
        # Per-feature offsets, representable in dtype; |z * scale| <= |o| / 2 below.
        signs = rng.choice([-1.0, 1.0], d)
        self.offsets = (signs * spec.offset * spec.scale * (1 + rng.random(d))).astype(dtype)
        self.offsets = self.offsets.astype(np.float64)
        self.constant = rng.random(d) < spec.constant_share
        self.shift = self.offsets if shifted else np.zeros(d)
        self.gamma = (rng.standard_normal(d) * 0.5 + 1.0).astype(dtype)
        self.beta = rng.standard_normal(d).astype(dtype)
        self.layer = bnfast.BatchNormalization(self.gamma, self.beta, MOMENTUM,
                                               self.offsets.copy(), np.ones(d))
        oracle_dtype = np.float64 if shifted else dtype
        self.oracle = Twin(self.gamma.astype(oracle_dtype), self.beta.astype(oracle_dtype),
                           MOMENTUM, self.offsets - self.shift, np.ones(d))
        self.steps = 1
        self.magnitude = np.abs(self.offsets)   # max |x| per feature so far
        self.shape: tuple[int, ...] | None = None
        self.std: np.ndarray | None = None     # std the last forward divided by

    # -- data -------------------------------------------------------------
    def batch(self) -> np.ndarray:
        spec = self.spec
        n = spec.n if self.rng.random() < 0.7 else int(self.rng.integers(1, spec.n + 1))
        z = np.clip(self.rng.standard_normal((n, self.d)), -6, 6)
        if self.shifted and spec.offset:
            z *= min(1.0, spec.offset / 12)      # |z * scale| <= |o| / 2: exact x - o
        z[:, self.constant] = 0.0
        return (self.offsets + z * spec.scale).astype(spec.dtype).reshape((n,) + spec.features)

    def for_oracle(self, arr: np.ndarray, subtract_shift: bool) -> np.ndarray:
        if not self.shifted:
            return arr
        values = arr.astype(np.float64)
        if subtract_shift:
            values = values - self.shift.reshape(self.spec.features)
        return values

    # -- comparison -------------------------------------------------------
    def allowed(self, scale, std) -> np.ndarray:
        """scale * (BASE + unit * max |x| / std), per feature."""
        if self.shifted:      # bnfast's own rounding of values near the offset
            unit = STEP_ULPS * self.steps * EPS64
        else:                 # the twin's naive sums in the data's dtype
            unit = 2 * self.spec.n * float(np.finfo(self.spec.dtype).eps)
        rtol = BASE_RTOL[self.spec.dtype] + unit * self.magnitude / std
        return np.broadcast_to(scale, (self.d,)) * rtol

    def check(self, what: str, actual, expected, scale, std) -> None:
        actual = np.asarray(actual)
        expected = np.asarray(expected)
        if not self.shifted:
            assert actual.dtype == expected.dtype, \
                f"{what}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        a = actual.astype(np.float64).reshape(-1, self.d)
        e = expected.astype(np.float64).reshape(-1, self.d)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(e)), what
        allowed = self.allowed(scale, std)
        error = np.abs(a - e)
        worst = int(np.argmax(np.max(error - allowed, axis=0)))
        assert np.all(error <= allowed), (
            f"{what}: feature {worst}: error {error[:, worst].max():.3e} > "
            f"allowed {allowed[worst]:.3e} (spec {self.spec})")

    def magnitudes(self, arr) -> np.ndarray:
        return np.abs(np.asarray(arr, np.float64).reshape(-1, self.d))

    # -- operations -------------------------------------------------------
    def forward(self, train: bool) -> None:
        x = self.batch()
        self.magnitude = np.maximum(self.magnitude,
                                    np.abs(x.astype(np.float64)).reshape(len(x), -1).max(0))
        out = self.layer.forward(laid_out(x, self.spec.layout), train)
        expected = self.oracle.forward(self.for_oracle(x, True), train)
        self.shape = x.shape
        oracle = self.oracle
        if train:
            self.std = np.asarray(oracle.std, np.float64)
            normalized = self.magnitudes(oracle.xn)
        else:
            self.std = np.sqrt(np.asarray(oracle.running_var, np.float64) + EPS)
            normalized = self.magnitudes(oracle._eval_xn)
        gamma, beta = np.abs(self.gamma.astype(np.float64)), np.abs(self.beta.astype(np.float64))
        self.check("out", out, expected, gamma * (normalized.max(0) + 1) + beta, self.std)
        if train:
            self.check("xn", self.layer.xn, oracle.xn, normalized.max(0) + 1, self.std)
            self.check("xc", self.layer.xc, oracle.xc, self.std * (normalized.max(0) + 1),
                       self.std)
            self.check("std", self.layer.std, oracle.std, self.std, self.std)
            self.check_running()
            self.steps += 1
            if self.constant.any():
                rows = out.reshape(len(x), -1)
                assert np.all(rows[:, self.constant] == self.beta[self.constant]), \
                    "a constant feature's output is not exactly beta"
                assert np.all(self.layer.xn[:, self.constant] == 0)

    def check_running(self) -> None:
        layer, oracle = self.layer, self.oracle
        spread = self.std
        shifted_mean = np.asarray(oracle.running_mean)
        self.check("running_mean", layer.running_mean, shifted_mean + self.shift,
                   np.abs(shifted_mean) + spread, spread)
        self.check("running_var", layer.running_var, oracle.running_var,
                   np.abs(np.asarray(oracle.running_var, np.float64)) + spread ** 2, spread)

    def backward(self) -> None:
        if self.shape is None:
            return
        dout = self.rng.standard_normal(self.shape).astype(self.spec.dtype)
        dx = self.layer.backward(laid_out(dout, self.spec.layout))
        expected = self.oracle.backward(self.for_oracle(dout, False))
        oracle = self.oracle
        normalized = self.magnitudes(oracle.xn if oracle._last_train else oracle._eval_xn)
        dout_size = self.magnitudes(dout)
        gamma = np.abs(self.gamma.astype(np.float64))
        self.check("dx", dx, expected, gamma * dout_size.max(0) / self.std, self.std)
        self.check("dgamma", self.layer.dgamma, oracle.dgamma,
                   dout_size.sum(0) * (normalized.max(0) + 1), self.std)
        self.check("dbeta", self.layer.dbeta, oracle.dbeta, dout_size.sum(0), self.std)

    def update(self) -> None:
        """gamma -= lr * dgamma, beta -= lr * dbeta, in place, with the same
        (oracle's) gradient on both sides so the parameters stay identical."""
        if self.oracle.dgamma is None:
            return
        self.gamma -= (LEARNING_RATE * self.oracle.dgamma).astype(self.spec.dtype)
        self.beta -= (LEARNING_RATE * self.oracle.dbeta).astype(self.spec.dtype)
        self.oracle.gamma[...] = self.gamma
        self.oracle.beta[...] = self.beta

    def run(self, ops: list[str]) -> None:
        for op in ops:
            if op in ("train", "eval"):
                self.forward(op == "train")
            elif op == "backward":
                self.backward()
            else:
                self.update()


@PROFILE
@given(spec=specs(well_conditioned=True), ops=OPS)
def test_sequences_match_the_same_dtype_twin(spec, ops):
    Sequence(spec, shifted=False).run(ops)


@PROFILE
@given(spec=specs(well_conditioned=False), ops=OPS)
def test_sequences_with_offsets_and_constant_features_match_the_shifted_oracle(spec, ops):
    Sequence(spec, shifted=True).run(ops)


def _loss(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dout: np.ndarray, train: bool,
          running: tuple[np.ndarray, np.ndarray]) -> float:
    if train:
        out = bnfast.forward_train(x, gamma, beta).out
    else:
        out = bnfast.forward_eval(x, gamma, beta, *running)
    return math.fsum((out * dout).ravel().tolist())


def _central_differences(arr: np.ndarray, loss, h: float) -> np.ndarray:
    grad = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + h
        plus = loss()
        arr[idx] = old - h
        minus = loss()
        arr[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


@PROFILE
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), d=st.integers(1, 4),
       extra=st.sampled_from([(), (1,), (2,)]), train=st.booleans())
def test_backward_matches_central_differences(seed, n, d, extra, train):
    rng = np.random.default_rng(seed)
    shape = (n, d) + extra
    features = d * math.prod(extra)
    x = rng.standard_normal(shape) * 2 + 0.5
    if train and n > 1:
        # Curvature grows like 1 / std**3: keep the finite-difference error small.
        assume(x.reshape(n, -1).std(axis=0).min() > 0.1)
    gamma = rng.standard_normal(features) * 0.5 + 1.0
    beta = rng.standard_normal(features)
    dout = rng.standard_normal(shape)
    running = (rng.standard_normal(features), rng.random(features) + 0.5)
    if train:
        fit = bnfast.forward_train(x, gamma, beta)
        functional = bnfast.backward_train(dout, x, fit.mean, fit.var, gamma)
    else:
        functional = bnfast.backward_eval(dout, x, gamma, *running)
    layer = bnfast.BatchNormalization(gamma, beta, running_mean=running[0],
                                      running_var=running[1])
    layer.forward(x, train)
    from_layer = (layer.backward(dout), layer.dgamma, layer.dbeta)
    loss = lambda: _loss(x, gamma, beta, dout, train, running)  # noqa: E731
    for i, (name, arr) in enumerate((("dx", x), ("dgamma", gamma), ("dbeta", beta))):
        numeric = _central_differences(arr, loss, h=1e-6)
        scale = max(1.0, float(np.abs(numeric).max()))
        for source, analytic in (("functional", functional[i]), ("layer", from_layer[i])):
            np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6 * scale,
                                       err_msg=f"{source} {name}")

