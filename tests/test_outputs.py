"""The output cache (bnfast/_outputs.pyx): large outputs reuse the memory of
freed ones, yet every output is a fresh, owning array that shares memory with
nothing alive, and the cache never holds more than its limit."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import bnfast
from bnfast import _outputs
from bnfast.reference import BatchNormalization as Twin
from conftest import assert_close, make_params

BIG = (256, 1024)          # 2 MiB of float64: above MIN_BYTES
SMALL = (32, 128)          # 32 KiB: NumPy's own allocator


@pytest.fixture(autouse=True)
def _restore_limit():
    limit = bnfast.get_output_cache_limit()
    yield
    bnfast.set_output_cache_limit(limit)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _layer(rng, d, dtype=np.float64):
    gamma, beta = make_params(rng, d)
    return bnfast.BatchNormalization(gamma.astype(dtype), beta.astype(dtype))


def test_a_freed_output_is_reused_by_the_next_output_of_its_size():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(BIG)
    layer = _layer(rng, BIG[1])
    y = layer.forward(x)
    first = _address(y)
    del y
    hits = bnfast.output_cache_info()["hits"]
    y = layer.forward(x)
    assert _address(y) == first
    assert bnfast.output_cache_info()["hits"] == hits + 1


def test_live_outputs_never_share_memory_and_reused_memory_is_fully_rewritten():
    rng = np.random.default_rng(1)
    layer = _layer(rng, BIG[1])
    twin = Twin(layer.gamma, layer.beta)
    kept = []
    for step in range(4):
        x = rng.standard_normal(BIG) * (step + 1) + step
        dout = rng.standard_normal(BIG)
        y, dx = layer.forward(x), layer.backward(dout)
        assert_close(y, twin.forward(x), 1e-12)
        assert_close(dx, twin.backward(dout), 1e-10)
        if step % 2:
            kept += [y, dx]          # the others die and their memory is reused
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            assert not np.shares_memory(a, b)


def _page_offset(a: np.ndarray) -> int:
    return _address(a) % 4096


def _page_distance(a: int, b: int) -> int:
    return min((a - b) % 4096, (b - a) % 4096)


def _at_page_offset(offset: int) -> np.ndarray:
    """A float64 array of BIG's size starting `offset` bytes into a page."""
    raw = np.empty(BIG[0] * BIG[1] * 8 + 8192, np.uint8)
    start = (-_address(raw)) % 4096 + offset
    return raw[start:start + BIG[0] * BIG[1] * 8].view(np.float64).reshape(BIG)


@pytest.mark.parametrize("offsets, expected", [((16,), 2048), ((0,), 2048),
                                               ((3072,), 1024), ((16, 2064), 1024),
                                               ((0, 1024, 2048), 3072)])
def test_a_large_output_sits_in_the_widest_gap_between_its_inputs_in_the_page(offsets,
                                                                             expected):
    """Stores that agree with later loads in their low 12 bits stall them
    (4K aliasing): a large output is placed half the widest gap away from
    the arrays the kernels read beside it, on a 64-byte line; blocks reused
    from the cache keep that place."""
    near = tuple(_at_page_offset(o) for o in offsets)
    y = _outputs.empty(BIG, np.dtype(np.float64), near)
    assert _page_offset(y) == expected
    del y
    hits = bnfast.output_cache_info()["hits"]
    y = _outputs.empty(BIG, np.dtype(np.float64), near)
    assert _page_offset(y) == expected
    assert bnfast.output_cache_info()["hits"] == hits + 1


def test_the_layer_places_its_large_outputs_away_from_what_the_kernels_read():
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal(BIG), rng.standard_normal(BIG)
    layer = _layer(rng, BIG[1])
    y = layer.forward(x)
    cache = layer._buffer
    assert cache is not None
    dx = layer.backward(dout)
    for out in (y, cache):
        assert _page_distance(_page_offset(out), _page_offset(x)) >= 1024
    assert _page_distance(_page_offset(dx), _page_offset(cache)) >= 512
    assert _page_distance(_page_offset(dx), _page_offset(dout)) >= 512
    assert all(_address(a) % 64 == 0 for a in (y, cache, dx))


def test_outputs_are_ordinary_owning_arrays():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(BIG)
    y = _layer(rng, BIG[1]).forward(x)
    assert y.flags.owndata and y.base is None and y.flags.writeable
    assert _address(y) % 64 == 0
    again = pickle.loads(pickle.dumps(y))
    np.testing.assert_array_equal(again, y)
    before = y.copy()
    y.resize((BIG[0] * 2, BIG[1]), refcheck=False)     # reallocates through the cache
    np.testing.assert_array_equal(y[:BIG[0]], before)
    y.resize((3, 5), refcheck=False)
    np.testing.assert_array_equal(y.ravel(), before.ravel()[:15])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_per_channel_outputs_use_the_cache_and_keep_their_layout(layout):
    rng = np.random.default_rng(3)
    shape = (16, 8, 32, 32)          # 1 MiB of float64
    x = rng.standard_normal(shape)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gamma, beta = make_params(rng, 8)
    layer = bnfast.BatchNormalization(gamma, beta, per_channel=True)
    twin = Twin(gamma, beta, per_channel=True)
    hits = bnfast.output_cache_info()["hits"]
    for _ in range(3):
        y = layer.forward(x)
        assert_close(y, twin.forward(x), 1e-12)
        assert y.strides == x.strides
        del y
    assert bnfast.output_cache_info()["hits"] >= hits + 2


def test_small_outputs_do_not_touch_the_cache():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(SMALL)
    layer = _layer(rng, SMALL[1])
    before = bnfast.output_cache_info()
    for _ in range(5):
        layer.forward(x)
        layer.backward(x)
    after = bnfast.output_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


@pytest.mark.parametrize("shape", [(3, 4), (5,), (2, 1, 3), (BIG[0] * 2, BIG[1]), [3, 4], 7])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ">f8"])
def test_empty_makes_the_array_np_empty_would(shape, dtype):
    """Small outputs are made in C (np.empty's argument parsing costs more
    than the allocation), large ones in the cache: both as np.empty's."""
    dt = np.dtype(dtype)
    got = _outputs.empty(shape, dt)
    want = np.empty(shape, dt)
    assert (got.shape, got.dtype, got.strides) == (want.shape, want.dtype, want.strides)
    assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable
    assert got.flags.aligned and got.base is None


def test_empty_keeps_the_dtypes_reference_count():
    dt = np.dtype(np.float64, metadata={"tag": 1})     # a dtype of its own, not a singleton
    before = sys.getrefcount(dt)
    arrays = [_outputs.empty((3, 2), dt) for _ in range(100)]
    assert sys.getrefcount(dt) == before + 100
    del arrays
    assert sys.getrefcount(dt) == before


def test_empty_refuses_what_np_empty_refuses():
    for shape, error in (((-1, 3), ValueError), ((2, "3"), TypeError),
                         ((2**62, 2**62), ValueError), ((2**70, 1), ValueError)):
        with pytest.raises(error):
            np.empty(shape)
        with pytest.raises(error):
            _outputs.empty(shape, np.dtype(np.float64))


def test_the_cache_holds_at_most_its_limit_and_zero_empties_it():
    nbytes = BIG[0] * BIG[1] * 8
    bnfast.set_output_cache_limit(2 * nbytes)
    blocks = [_outputs.empty(BIG, np.dtype(np.float64)) for _ in range(3)]
    del blocks
    info = bnfast.output_cache_info()
    assert info["held_bytes"] == 2 * nbytes and info["held_blocks"] == 2
    bnfast.set_output_cache_limit(0)
    info = bnfast.output_cache_info()
    assert info["held_bytes"] == 0 and info["held_blocks"] == 0 and info["limit"] == 0
    # with no cache, outputs come from NumPy and are not counted
    y = _outputs.empty(BIG, np.dtype(np.float64))
    del y
    assert bnfast.output_cache_info() == info


def test_the_cache_keeps_at_most_max_blocks():
    bnfast.set_output_cache_limit(1 << 40)
    sizes = [(_outputs.MIN_BYTES // 8 + 512 * k,) for k in range(_outputs.MAX_BLOCKS + 5)]
    blocks = [_outputs.empty(s, np.dtype(np.float64)) for s in sizes]
    del blocks
    assert bnfast.output_cache_info()["held_blocks"] == _outputs.MAX_BLOCKS


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("1G", TypeError), (None, TypeError)])
def test_a_bad_limit_raises_and_changes_nothing(bad, error):
    limit = bnfast.get_output_cache_limit()
    with pytest.raises(error, match="output cache limit"):
        bnfast.set_output_cache_limit(bad)
    assert bnfast.get_output_cache_limit() == limit


def test_the_limit_comes_from_the_environment():
    code = "import bnfast; print(bnfast.get_output_cache_limit())"
    env = dict(os.environ, BNFAST_OUTPUT_CACHE_MIB="3")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 3 << 20
    env["BNFAST_OUTPUT_CACHE_MIB"] = "lots"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "BNFAST_OUTPUT_CACHE_MIB must be a whole number of MiB" in done.stderr


def test_tracemalloc_still_sees_every_output():
    """The memory-bound tests measure outputs with tracemalloc; a reused
    block must still count as the allocation it is."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(BIG)
    layer = _layer(rng, BIG[1])
    layer.forward(x)                 # warm: the cache now has a block, the layer its buffer
    del x
    x = rng.standard_normal(BIG)
    tracemalloc.start()
    try:
        y = layer.forward(x)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current >= y.nbytes


def test_threads_freeing_and_taking_blocks_concurrently():
    rng = np.random.default_rng(6)
    bnfast.set_output_cache_limit(3 * BIG[0] * BIG[1] * 8)
    xs = [rng.standard_normal(BIG) for _ in range(4)]
    layers = [_layer(rng, BIG[1]) for _ in range(4)]
    expected = [Twin(layer.gamma, layer.beta).forward(x) for layer, x in zip(layers, xs)]
    failures = []

    def work(k):
        for _ in range(25):
            y = layers[k].forward(xs[k])
            if not np.allclose(y, expected[k], rtol=1e-12, atol=1e-12):
                failures.append(k)
            layers[k].backward(xs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert bnfast.output_cache_info()["held_bytes"] <= bnfast.get_output_cache_limit()
