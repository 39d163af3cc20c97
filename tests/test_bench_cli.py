"""bnfast-bench, the benchmark CLI: arguments, outputs and failure modes, on tiny shapes."""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

import bnfast
from bnfast import bench
from bnfast._timing import calls_per_repeat, interleaved

# Not `from conftest import REPO`: with `pytest tests bench` in one session,
# "conftest" may be bench/conftest.py.
REPO = pathlib.Path(__file__).resolve().parents[1]

# Two shapes, one of them NCHW, small enough that a whole run takes a moment.
TINY = ["--shapes", "4x3,2x3x2x2", "--repeats", "2"]


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads changes process-wide settings; put them back."""
    torch = sys.modules.get("torch")
    saved = bnfast.get_num_threads(), (torch.get_num_threads() if torch else None)
    yield
    bnfast.set_num_threads(saved[0])
    torch = sys.modules.get("torch")
    if torch is not None and saved[1] is not None:
        torch.set_num_threads(saved[1])


@pytest.fixture
def no_torch(monkeypatch):
    """Make `import torch` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "torch", None)


def run(args, capsys):
    """main(args) -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        status = bench.main(args)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_grid_is_the_published_one():
    assert bench.SHAPES == ((100, 100), (32, 128), (256, 1024), (1024, 4096),
                            (32, 64, 32, 32), (8, 3, 224, 224), (256, 65536))
    assert set(bench.QUICK_SHAPES) <= set(bench.SHAPES)
    assert bench.DTYPES == ("float64", "float32")
    assert bench.OPS == ("train", "eval", "backward")


def test_help_states_the_dtype_choice(capsys):
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    assert "float32 running statistics" in " ".join(out.split())
    for option in ("--quick", "--json", "--plot", "--threads", "--shapes", "--dtypes", "--ops",
                   "--check", "--no-check", "--repeats", "--peers", "--compare"):
        assert option in out


def test_parse_shapes():
    assert bench.parse_shapes("100x100, 32X64x32x32,100x100") == ((100, 100), (32, 64, 32, 32))


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float16"], "unknown dtype 'float16'"),
    (["--dtypes", "float32,int8"], "unknown dtype 'int8'"),
    (["--ops", "forward"], "unknown operation 'forward'"),
    (["--shapes", "100x"], "malformed shape '100x'"),
    (["--shapes", "axb"], "malformed shape 'axb'"),
    (["--shapes", "4x3,,2x2"], "malformed shape ''"),
    (["--shapes", "100"], "one dimension"),
    (["--shapes", "0x5"], "zero size"),
    (["--shapes", "1x5"], "batch of one"),
    (["--threads", "0"], "--threads: expected a whole number >= 1, got '0'"),
    (["--threads", "two"], "got 'two'"),
    (["--repeats", "-1"], "--repeats: expected a whole number >= 1"),
    (["--json", "/no/such/directory/r.json"], "does not exist"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--sync-ranks", "1,0"], "--sync-ranks: expected a whole number >= 1, got '0'"),
    (["--peers", "torch,tensorflow"], "unknown peer 'tensorflow'"),
    (["--compare", "/no/such/a.json", "/no/such/b.json"], "cannot read /no/such/a.json"),
    (["--compare", "a.json"], "--compare: expected 2 arguments"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, args, message):
    status, out, err = run(args, capsys)
    assert status == 2
    assert "usage: bnfast-bench" in err and "bnfast-bench: error:" in err
    assert message in err
    assert out == ""


def test_plot_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, _, err = run(TINY + ["--plot", str(tmp_path / "r.png")], capsys)
    assert status == 2
    assert 'pip install "bnfast[bench]"' in err
    assert "[1/" not in err                     # refused before measuring anything
    assert not (tmp_path / "r.png").exists()


def test_json_has_every_measurement(capsys, tmp_path):
    path = tmp_path / "r.json"
    status, out, err = run(TINY + ["--check", "--json", str(path)], capsys)
    assert status == 0, err
    data = json.loads(path.read_text())
    cells = data["cells"]
    assert [c["label"] for c in cells] == [
        f"{shape}-{dtype}-{op}" for shape in ("4x3", "2x3x2x2")
        for dtype in ("float64", "float32") for op in ("train", "eval", "backward")]
    installed = [p for p in bench.OPTIONAL_PEERS if data["peers"][p]["available"]]
    assert data["torch"]["available"] is data["peers"]["torch"]["available"]
    peers = ["bnfast", "reference", "floor"] + installed
    for cell in cells:
        assert cell["checked"] is True
        assert cell["features"] == (3 if cell["shape"] == [4, 3] else 12)
        assert sorted(cell["peers"]) == sorted(peers)
        for timing in cell["peers"].values():
            assert len(timing["seconds"]) == 2 and timing["iterations"] >= 1
            assert timing["median_s"] == statistics.median(timing["seconds"])
        medians = {peer: t["median_s"] for peer, t in cell["peers"].items()}
        assert cell["speedup_vs_reference"] == pytest.approx(
            medians["reference"] / medians["bnfast"])
        assert cell["floor_multiple"] == pytest.approx(medians["bnfast"] / medians["floor"])
        for peer in bench.OPTIONAL_PEERS:
            expected = medians[peer] / medians["bnfast"] if peer in installed else None
            assert cell[f"speedup_vs_{peer}"] == pytest.approx(expected)
    machine = data["machine"]
    for key in ("cpu", "cores", "numpy", "cython", "torch", "jax", "numba", "bnfast", "threads"):
        assert key in machine
    assert machine["bnfast"] == bnfast.__version__
    assert {"isa", "build_flags"} <= set(machine["build_info"])
    assert data["settings"]["repeats"] == 2 and data["settings"]["check"] is True
    assert set(data["geomean"]) >= {"speedup_vs_reference", "speedup_vs_torch",
                                    "speedup_vs_jax", "speedup_vs_numba", "floor_multiple",
                                    "by_op"}
    # Every peer on bnfast's thread count.
    threads = machine["threads"]
    assert threads["floor"] == threads["bnfast"] == bnfast.get_num_threads()
    assert all(threads[p] == threads["bnfast"] for p in installed)
    assert data["settings"]["floor"]["traffic"]["backward"] == {"reads": 4, "writes": 1}
    for cell in cells:     # the floor: the fastest of the ways timed among the peers
        ways = cell["floor_ways"]
        # ("overlap" needs two threads: a serial build has one)
        expected = set(bench.FLOOR_STRATEGIES) - ({"overlap"} if bnfast.get_num_threads() == 1
                                                   else set())
        assert {way.split(",")[0] for way in ways} == expected
        assert cell["peers"]["floor"]["median_s"] == ways[cell["floor_strategy"]] == min(
            ways.values())
    # The table: one row per cell, then the geometric means.
    rows = [line for line in out.splitlines() if line.startswith(("4x3 ", "2x3x2x2 "))]
    assert len(rows) == len(cells)
    assert "geomean all" in out
    assert "[12/12]" in err                     # progress, on stderr


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.png"
    status, _, err = run(TINY + ["--ops", "eval", "--plot", str(path)], capsys)
    assert status == 0, err
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_runs_without_torch_and_says_so(capsys, tmp_path, no_torch):
    path = tmp_path / "r.json"
    status, out, err = run(TINY + ["--ops", "train", "--json", str(path)], capsys)
    assert status == 0, err
    assert "torch not compared" in out and "pip install torch" in err
    data = json.loads(path.read_text())
    assert data["torch"]["available"] is False and data["torch"]["reason"]
    assert all("torch" not in cell["peers"] for cell in data["cells"])
    assert all(cell["speedup_vs_torch"] is None for cell in data["cells"])
    assert data["geomean"]["speedup_vs_torch"] is None


def test_threads_sets_bnfast_and_torch(capsys, tmp_path):
    path = tmp_path / "r.json"
    status, _, err = run(TINY + ["--ops", "eval", "--threads", "1", "--json", str(path)], capsys)
    assert status == 0, err
    threads = json.loads(path.read_text())["machine"]["threads"]
    assert threads["bnfast"] == 1
    assert threads["torch"] in (1, None)        # None: torch is not installed


def test_quick_means_the_subset_and_checking(capsys, tmp_path, no_torch):
    path = tmp_path / "r.json"
    status, _, err = run(["--quick", "--dtypes", "float32", "--ops", "eval", "--repeats", "1",
                          "--json", str(path)], capsys)
    assert status == 0, err
    data = json.loads(path.read_text())
    assert [tuple(s) for s in data["settings"]["shapes"]] == list(bench.QUICK_SHAPES)
    assert all(cell["checked"] for cell in data["cells"])


def test_a_wrong_result_fails_the_check(capsys, monkeypatch, no_torch):
    monkeypatch.setattr(bnfast.BatchNormalization, "forward",
                        lambda self, x, train_flg=True: np.zeros_like(x))
    status, out, err = run(TINY + ["--ops", "eval", "--check"], capsys)
    assert status == 1
    assert "check failed: bnfast eval output differs from the reference" in err
    assert out == ""


def test_no_check_does_not_compare(capsys, monkeypatch, no_torch):
    monkeypatch.setattr(bnfast.BatchNormalization, "forward",
                        lambda self, x, train_flg=True: np.zeros_like(x))
    status, out, _ = run(TINY + ["--ops", "eval", "--no-check"], capsys)
    assert status == 0 and "not checked" in out


def test_check_of_dx_is_relative_to_the_terms_it_cancels():
    """dx of a batch of two is ~0: its rounding error is relative to |gamma*dout/std|."""
    case = bench.make_case((2, 5), "float32")
    expected = bench.expected_result(case, "backward")
    dx, dgamma, dbeta = expected
    scale = bench._dx_scale(case)
    assert np.abs(dx).max() < 1e-3 * scale
    rtol = bench.RTOL["float32"]
    bench.check("bnfast", (dx + np.float32(0.5 * rtol * scale), dgamma, dbeta), expected, case,
                "backward")
    with pytest.raises(bench.CheckFailed, match="bnfast backward dx"):
        bench.check("bnfast", (dx + np.float32(3 * rtol * scale), dgamma, dbeta), expected,
                    case, "backward")
    with pytest.raises(bench.CheckFailed, match="bnfast backward dgamma"):
        bench.check("bnfast", (dx, dgamma * np.float32(1.01), dbeta), expected, case, "backward")


def test_interleaved_timing():
    calls = {"a": lambda: None, "b": lambda: sum(range(100))}
    timings = interleaved(calls, 3, target_s=0.0005)
    assert list(timings) == ["a", "b"]
    for timing in timings.values():
        assert len(timing.seconds) == 3 and timing.iterations > 1 and timing.median > 0
    assert calls_per_repeat(lambda: None, 0.0005) > calls_per_repeat(lambda: sum(range(1000)),
                                                                     0.0005)
    with pytest.raises(ValueError):
        interleaved(calls, 0)


def test_a_turn_starts_with_an_untimed_call():
    """A callable's first call after another's is not charged to it (cold caches)."""
    state = {"cold": False}

    def other():
        state["cold"] = True

    def slow_when_cold():
        time.sleep(0.03 if state["cold"] else 0.0002)
        state["cold"] = False
    timings = interleaved({"other": other, "measured": slow_when_cold}, 3, target_s=0.001,
                          settle_s=0)
    # A charged cold call would make a turn's mean at least 30 ms / 5 = 6 ms;
    # the bound leaves the 0.2 ms sleeps room to oversleep on a loaded
    # machine (one took 1.1 ms in CI against a 1 ms bound).
    assert timings["measured"].iterations <= 5
    assert max(timings["measured"].seconds) < 0.005


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread states in /proc")
def test_settle_waits_for_other_threads_to_stop():
    """A turn starts once the previous callable's spinning threads are idle."""
    import hashlib
    import threading
    from bnfast._timing import settle
    data = bytes(1 << 20)
    stop = time.perf_counter() + 0.08

    def spin():     # busy outside the GIL, as OpenMP threads spinning at a barrier
        while time.perf_counter() < stop:
            hashlib.sha256(data).digest()
    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.005)
    waited = settle(max_s=1.0)
    assert time.perf_counter() >= stop and waited >= 0.06      # until the spinning ended
    thread.join()
    assert settle(max_s=1.0) < 0.05                 # nothing else runs: quiet at once
    assert settle(max_s=0.0) < 0.01


def test_runs_as_a_module():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ran = subprocess.run([sys.executable, "-m", "bnfast.bench", "--ops", "nonsense"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert ran.returncode == 2
    assert "bnfast-bench: error: argument --ops: unknown operation 'nonsense'" in ran.stderr


def test_sync_ranks_without_mpi4py_says_how_to_get_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    status, out, err = run(["--sync-ranks", "1,2"], capsys)
    assert status == 1 and out == ""
    assert 'needs mpi4py and an MPI library: pip install "bnfast[mpi]"' in err


def test_sync_table_and_timed_communicator():
    from bnfast import _sync_bench
    from threadcomm import run_ranks
    rows = [{"shape": [256, 1024], "dtype": "float64", "ranks": 0, "step_s": 1e-3,
             "communication_s": 0.0, "rows_per_rank": [256]},
            {"shape": [256, 1024], "dtype": "float64", "ranks": 3, "step_s": 2e-3,
             "communication_s": 5e-4, "rows_per_rank": [86, 85, 85]}]
    table = _sync_bench.format_rows(rows, 2).splitlines()
    assert table[-1].split() == ["256x1024", "3", "85-86", "2.00", "ms", "1.50", "ms",
                                 "500.0", "µs", "25%"]
    timed = run_ranks(2, lambda comm: _sync_bench.TimedComm(comm))
    gathered = run_ranks(2, lambda comm: (lambda t: (t.allgather(comm.rank), t.seconds))(
        _sync_bench.TimedComm(comm)))
    assert all(g[0] == [0, 1] and g[1] > 0 for g in gathered)
    assert timed[0].Get_size() == 2


def test_per_channel_grid_runs_both_layouts_and_checks(capsys, tmp_path, no_torch):
    path = tmp_path / "channels.json"
    status, out, err = run(["--per-channel", "--shapes", "4x3x2x2", "--repeats", "2", "--check",
                            "--json", str(path)], capsys)
    assert status == 0, err
    assert out.startswith("per-channel statistics")
    assert "4x3x2x2 nchw" in out and "4x3x2x2 cl" in out
    data = json.loads(path.read_text())
    assert {c["layout"] for c in data["cells"]} == {"nchw", "cl"}
    assert {c["features"] for c in data["cells"]} == {3}
    assert data["settings"]["per_channel"] is True
    case = bench.make_case((4, 3, 2, 2), "float32", "cl")
    assert np.moveaxis(case.x, 1, -1).flags.c_contiguous and case.gamma.shape == (3,)


# --------------------------------------------------------------------------
# The optional peers: selection, "not installed", threads, checks


@pytest.fixture
def no_optional_peers(monkeypatch):
    """Make `import torch`, `import jax` and `import numba` fail."""
    for name in bench.OPTIONAL_PEERS:
        monkeypatch.setitem(sys.modules, name, None)


def test_peers_picks_the_peers(capsys, tmp_path):
    path = tmp_path / "r.json"
    status, out, err = run(TINY + ["--ops", "eval", "--peers", "floor,reference", "--json",
                                   str(path)], capsys)
    assert status == 0, err
    data = json.loads(path.read_text())
    assert data["settings"]["peers"] == ["bnfast", "reference", "floor"]  # bnfast always runs
    assert all(sorted(c["peers"]) == ["bnfast", "floor", "reference"] for c in data["cells"])
    assert all(c["speedup_vs_torch"] is None for c in data["cells"])
    assert {name: p["reason"] for name, p in data["peers"].items()} == {
        name: "not asked for (--peers)" for name in bench.OPTIONAL_PEERS}
    header = next(line for line in out.splitlines() if line.startswith("shape"))
    assert header.split() == ["shape", "dtype", "op", "bnfast", "reference", "floor", "vs",
                              "ref", "x", "floor"]
    assert "torch" not in out and "jax" not in out and "numba" not in out


def test_peers_without_the_floor(capsys):
    status, out, err = run(TINY + ["--ops", "eval", "--peers", "bnfast"], capsys)
    assert status == 0, err
    header = next(line for line in out.splitlines() if line.startswith("shape"))
    assert header.split() == ["shape", "dtype", "op", "bnfast"]


def test_missing_peers_say_not_installed(capsys, tmp_path, no_optional_peers):
    path = tmp_path / "r.json"
    status, out, err = run(TINY + ["--ops", "train", "--json", str(path)], capsys)
    assert status == 0, err
    for name in bench.OPTIONAL_PEERS:
        assert f"{name} is not installed" in err and f"pip install {name}" in err
        assert f"{name} not compared: {name} is not installed" in out
    rows = [line for line in out.splitlines() if line.startswith(("4x3 ", "2x3x2x2 "))]
    assert len(rows) == 4
    # Each optional peer's time column says so, and its speedup is "-".
    assert all(row.count("not installed") == 3 for row in rows)
    header = next(line for line in out.splitlines() if line.startswith("shape")).split()
    assert header[3:9] == list(bench.PEERS)
    for row in rows:
        speedups = row.split()[-5:]     # vs ref, vs torch, vs jax, vs numba, x floor
        assert speedups[1:4] == ["-", "-", "-"] and speedups[0] != "-"
    data = json.loads(path.read_text())
    for name in bench.OPTIONAL_PEERS:
        assert data["peers"][name]["available"] is False
        assert data["peers"][name]["installed"] is False
        assert data["machine"][name] is None and data["machine"]["threads"][name] is None
    assert all(sorted(c["peers"]) == ["bnfast", "floor", "reference"] for c in data["cells"])
    assert data["geomean"]["speedup_vs_jax"] is None


def test_a_peer_that_fails_to_import_is_unavailable(capsys, monkeypatch):
    def broken(threads):
        raise OSError("libtorch_cpu.so: cannot open shared object file")
    monkeypatch.setitem(bench._LOADERS, "torch", broken)
    status = bench.load_peer("torch", 1)
    assert not status.available and status.installed and status.column == "unavailable"
    assert "torch cannot be imported (libtorch_cpu.so" in status.reason


@pytest.mark.parametrize("peer", ["torch", "numba"])
def test_optional_peers_run_on_bnfasts_thread_count(peer):
    status = bench.load_peer(peer, 1)
    if not status.available:
        pytest.skip(status.reason)
    assert status.threads == 1
    assert sys.modules[peer].get_num_threads() == 1
    if peer == "numba":
        from bnfast import _bench_numba
        assert _bench_numba.thread_count() == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("threads", [1, 3])
def test_jax_runs_on_bnfasts_thread_count(threads):
    """XLA's CPU thread pool (threads named tf_XLAEigen) has bnfast's thread count."""
    code = ("import os, sys\n"
            "from bnfast import bench\n"
            f"status = bench.load_peer('jax', {threads})\n"
            "if not status.available: sys.exit(3)\n"
            "import jax.numpy as jnp\n"
            "(jnp.ones(3) * 2).block_until_ready()\n"
            "names = [open(f'/proc/self/task/{t}/comm').read().strip()\n"
            "         for t in os.listdir('/proc/self/task')]\n"
            "print(status.threads, names.count('tf_XLAEigen'))\n")
    env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    if ran.returncode == 3:
        pytest.skip("jax is not installed")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [str(threads), str(threads)]


def test_numba_module_imports_without_numba():
    code = ("import sys; sys.modules['numba'] = None\n"
            "from bnfast import _bench_numba, bench\n"
            "assert not _bench_numba.available()\n"
            "case = bench.make_case((4, 3), 'float64')\n"
            "try:\n"
            "    bench.make_call('numba', case, 'eval')\n"
            "except ImportError as exc:\n"
            "    print('raised', exc.name)\n"
            "print(bench.load_peer('numba').column)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["raised", "numba", "not", "installed"]


@pytest.mark.parametrize("peer", ["jax", "numba"])
def test_a_wrong_peer_result_fails_the_check(capsys, monkeypatch, peer):
    """--check compares jax's and numba's results too (their calls replaced by wrong ones)."""
    monkeypatch.setitem(bench._LOADERS, peer, lambda threads: bench.PeerStatus(
        peer, "0.0", threads=threads))

    def wrong(case, op):
        return lambda: np.zeros_like(case.x)
    monkeypatch.setattr(bench, f"_{peer}_call", wrong)
    status, out, err = run(TINY + ["--ops", "eval", "--peers", peer, "--check"], capsys)
    assert status == 1
    assert f"check failed: {peer} eval output differs from the reference" in err


@pytest.mark.parametrize("layout", ["flat", "nchw", "cl"])
@pytest.mark.parametrize("peer", ["jax", "numba"])
def test_peer_results_match_the_twin(peer, layout):
    if not bench.load_peer(peer).available:
        pytest.skip(f"{peer} is not installed")
    shape = (6, 5) if layout == "flat" else (3, 4, 2, 5)
    for dtype in bench.DTYPES:
        case = bench.make_case(shape, dtype, layout)
        for op in bench.OPS:
            result = bench.make_call(peer, case, op)()
            bench.check(peer, result, bench.expected_result(case, op), case, op)
            out = result[0] if op == "backward" else result
            assert out.shape == case.x.shape and out.strides == case.x.strides  # same layout


# --------------------------------------------------------------------------
# The floor


def test_floor_traffic_is_the_ops_unavoidable_traffic():
    """(reads, writes) in passes over x: train keeps bnfast's private copy of x."""
    assert bench.FLOOR_TRAFFIC == {"train": (2, 2), "eval": (1, 1), "backward": (4, 1)}
    for op in bench.OPS:
        assert bench.floor_traffic(op) == bench.FLOOR_TRAFFIC[op]
    writes = [name for step in bench.FLOOR_PLANS["train"] for name in step.writes]
    assert writes == ["copy", "y"]


#: (writes, reads) of each floor loop's arguments.
LOOP_ARGS = {"read": (0, 1), "write": (1, 0), "copy": (1, 1), "add": (1, 2),
             "stream_copy": (1, 1), "stream_add": (1, 2)}


def _counting_loops(monkeypatch):
    """Replace the floor's loops by ones that record what they read and write."""
    import threading
    moved = {"read": [], "write": [], "threads": set()}

    def counted(kind, loop):
        def run_loop(*arrays):
            writes, reads = LOOP_ARGS[kind]
            assert len(arrays) == writes + reads
            moved["write"] += arrays[:writes]
            moved["read"] += arrays[writes:]
            moved["threads"].add(threading.get_ident())
            loop(*arrays)
        return run_loop
    monkeypatch.setattr(bench, "FLOOR_LOOPS", {
        kind: counted(kind, loop) for kind, loop in bench.FLOOR_LOOPS.items()})
    return moved


def _coverage(blocks, array):
    """How many times each element of `array` is in `blocks`."""
    flat = bench._memory(array)
    count = np.zeros(flat.size, int)
    for block in blocks:
        if np.shares_memory(block, flat):
            offset = (block.ctypes.data - flat.ctypes.data) // flat.itemsize
            count[offset:offset + block.size] += 1
    return count


@pytest.mark.parametrize("strategy", bench.FLOOR_STRATEGIES)
@pytest.mark.parametrize("layout", ["flat", "cl"])
@pytest.mark.parametrize("op", bench.OPS)
def test_floor_moves_its_traffic_on_bnfasts_threads(monkeypatch, op, layout, strategy):
    """Every pass over every block, once: the bytes moved are FLOOR_TRAFFIC x x.nbytes."""
    moved = _counting_loops(monkeypatch)
    shape = (20, 3, 40, 50) if layout == "cl" else (64, 3000)
    case = bench.make_case(shape, "float64", layout)
    floor = bench.Floor(case, op, threads=2, strategy=strategy, block_bytes=16384)
    assert floor.threads == 2 and len(floor.work) == 2 and floor.strategy == strategy
    outputs = floor()
    reads, writes = bench.FLOOR_TRAFFIC[op]
    assert sum(a.nbytes for a in moved["read"]) == reads * case.x.nbytes
    assert sum(a.nbytes for a in moved["write"]) == writes * case.x.nbytes
    assert len(moved["threads"]) == 2
    blocks = {a.nbytes for a in moved["read"]}
    if strategy in ("whole", "stream"):     # one pass over each thread's part (whole pages)
        assert len(blocks) <= 2 and min(blocks) > case.x.nbytes // 3
    else:
        assert max(blocks) == 16384
    # Each input read as often as the plan says, every element of it.
    times = {name: sum(step.reads.count(name) for step in bench.FLOOR_PLANS[op])
             for name in ("x", "dout")}
    assert set(_coverage(moved["read"], case.x)) == {times["x"]}
    assert set(_coverage(moved["read"], case.dout)) == {times["dout"]}
    # The second read of a block follows the first before the next block.
    first = [arrays for _, arrays in floor.work[0]]
    if op == "train":
        assert first[0][-1].ctypes.data == first[1][-1].ctypes.data
    # Outputs in x's layout, every byte written once, the same memory every call.
    assert len(outputs) == writes
    for out in outputs:
        assert out.shape == case.x.shape and out.strides == case.x.strides
        assert not np.shares_memory(out, case.x)
        assert set(_coverage(moved["write"], out)) == {1}
    again = floor()
    assert all(a is b for a, b in zip(outputs, again))


@pytest.mark.parametrize("strategy", bench.FLOOR_STRATEGIES)
def test_floor_writes_really_write(strategy):
    case = bench.make_case((64, 3000), "float32")
    floor = bench.Floor(case, "train", threads=2, strategy=strategy)
    for out in floor.outputs.values():
        out.fill(7.0)
    outputs = floor()
    assert all(not np.any(out == 7.0) for out in outputs)


def test_the_streamed_floor_copies_x_with_bnfasts_streaming_stores():
    """The "stream" way writes what the "whole" way writes: x, byte for byte."""
    case = bench.make_case((64, 3000), "float32")
    streamed = bench.Floor(case, "train", threads=2, strategy="stream")()
    for out in streamed:
        assert out.tobytes() == case.x.tobytes()


def test_floor_keeps_the_faster_strategy(monkeypatch):
    def slow_write(out):
        time.sleep(0.002)
    monkeypatch.setitem(bench.FLOOR_LOOPS, "write", slow_write)
    case = bench.make_case((64, 300), "float64")
    assert bench.Floor(case, "eval").strategy in ("fused", "whole", "stream")
    monkeypatch.undo()

    def slow_copy(out, a):
        time.sleep(0.002)
    monkeypatch.setitem(bench.FLOOR_LOOPS, "copy", slow_copy)
    monkeypatch.setitem(bench.FLOOR_LOOPS, "stream_copy", slow_copy)
    assert bench.Floor(case, "eval").strategy in ("split", "overlap")


def test_floor_threads_follow_bnfast():
    """bnfast's thread count, or one thread where that moves the bytes faster."""
    case = bench.make_case((256, 1024), "float64")      # 2 MiB
    saved = bnfast.get_num_threads()
    try:
        bnfast.set_num_threads(1)
        floor = bench.Floor(case, "eval")
        assert floor.threads == 1 and set(floor.plans) == {
            (name, 1) for name in bench.FLOOR_STRATEGIES if name != "overlap"}
        if bnfast.build_info()["openmp"]:
            bnfast.set_num_threads(2)
            floor = bench.Floor(case, "eval")
            assert set(floor.plans) == {(name, count) for name in bench.FLOOR_STRATEGIES
                                        for count in (1, 2)} - {("overlap", 1)}
            assert (floor.strategy, floor.threads) in floor.plans
            assert floor.label == f"{floor.strategy}, {floor.threads} thread" + (
                "s" if floor.threads > 1 else "")
            assert len(floor.work) == floor.threads
    finally:
        bnfast.set_num_threads(saved)


def test_floor_outputs_are_mapped_before_timing():
    case = bench.make_case((64, 4096), "float32")
    floor = bench.Floor(case, "train", strategy="fused")
    assert set(floor.outputs) == {"copy", "y"}
    for out in floor.outputs.values():
        assert out.flags.owndata and not np.shares_memory(out, case.x)
        assert not out.any()        # filled (touched) at set-up


# --------------------------------------------------------------------------
# --compare


def _run_json(medians, floor="v2", cpu="AMD EPYC"):
    """A minimal --json file: {label: {peer: median seconds}}."""
    cells = []
    for label, peers in medians.items():
        shape, dtype, op = label.rsplit("-", 2)
        layout = "flat"
        if shape.endswith(("-nchw", "-cl")):
            shape, layout = shape.rsplit("-", 1)
        cells.append({"label": label, "shape": [int(n) for n in shape.split("x")],
                      "layout": layout, "dtype": dtype, "op": op,
                      "peers": {p: {"iterations": 1, "seconds": [t], "median_s": t}
                                for p, t in peers.items()}})
    return {"machine": {"cpu": cpu, "numpy": "2.4.6", "bnfast": "0.1.0",
                        "threads": {"bnfast": 2}, "build_info": {"isa": "avx2"}},
            "settings": {"repeats": 7, "floor": floor}, "cells": cells}


A_RUN = {"4x3-float64-train": {"bnfast": 1.0, "reference": 4.0, "floor": 0.5},
         "4x3-float64-eval": {"bnfast": 2.0, "reference": 4.0, "floor": 0.5},
         "2x3x2x2-cl-float32-backward": {"bnfast": 3.0, "reference": 6.0, "floor": 1.0},
         "8x8-float64-train": {"bnfast": 1.0, "reference": 1.0}}
B_RUN = {"4x3-float64-train": {"bnfast": 0.5, "reference": 4.0, "floor": 0.5},
         "4x3-float64-eval": {"bnfast": 4.0, "reference": 5.0, "floor": 0.5},
         "2x3x2x2-cl-float32-backward": {"bnfast": 3.0, "reference": 6.0, "floor": 1.0,
                                         "numba": 2.0},
         "9x9-float64-eval": {"bnfast": 1.0}}


def test_compare_ratios_geomeans_and_worst_cells():
    comparison = bench.compare_runs(_run_json(A_RUN), _run_json(B_RUN))
    assert [c.label for c in comparison.cells] == [
        "4x3-float64-train", "4x3-float64-eval", "2x3x2x2-cl-float32-backward"]
    assert comparison.only_a == ["8x8-float64-train"]
    assert comparison.only_b == ["9x9-float64-eval"]
    assert comparison.peers == ["bnfast", "reference", "floor"]    # numba: only in B
    ratios = [c.ratio("bnfast") for c in comparison.cells]
    assert ratios == [2.0, 0.5, 1.0]            # A / B: 2.0 = B twice as fast
    assert comparison.geomean("bnfast") == pytest.approx(1.0)
    assert comparison.geomean("bnfast", "train") == pytest.approx(2.0)
    assert comparison.geomean("reference") == pytest.approx((0.8) ** (1 / 3))
    assert comparison.cells[2].shape == "2x3x2x2 cl"
    assert [c.label for c in comparison.worst("bnfast", 2)] == [
        "4x3-float64-eval", "2x3x2x2-cl-float32-backward"]
    assert comparison.notes == []


def test_compare_notes_different_floors_and_machines():
    comparison = bench.compare_runs(_run_json(A_RUN, floor=None), _run_json(B_RUN, cpu="Xeon"))
    assert any("different floors" in note for note in comparison.notes)
    assert any(note.startswith("cpu differs") for note in comparison.notes)
    a, b = _run_json(A_RUN), _run_json(B_RUN)
    a["cells"][1]["floor_strategy"] = "whole, 2 threads"
    b["cells"][1]["floor_strategy"] = "split, 2 threads"
    assert bench.compare_runs(a, b).notes == [
        "the floor moved its bytes another way in B (floor_strategy) in 1 cell: "
        "4x3-float64-eval"]


def test_compare_command_line(capsys, tmp_path):
    a, b, out_json = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp.json"
    a.write_text(json.dumps(_run_json(A_RUN)))
    b.write_text(json.dumps(_run_json(B_RUN)))
    status, out, err = run(["--compare", str(a), str(b), "--json", str(out_json)], capsys)
    assert status == 0, err
    assert "> 1.00 means B is faster" in out
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("4x3 ") and " eval " in line)
    assert row.split()[-3:] == ["0.50", "0.80", "1.00"]     # bnfast, reference, floor
    assert "2.000 s" in row and "4.000 s" in row     # bnfast in A, in B
    assert next(line for line in lines if line.startswith("geomean train")).split()[-3:] == [
        "2.00", "1.00", "1.00"]
    worst = lines.index("bnfast's worst cells (B slowest against A):")
    assert lines[worst + 1].startswith("  4x3 float64 eval: 0.50")
    assert "1 cells only in A, 1 only in B" in out
    saved = json.loads(out_json.read_text())
    assert saved["geomean"]["bnfast"] == pytest.approx(1.0)
    assert saved["cells"][0]["ratios"]["bnfast"] == 2.0


@pytest.mark.skipif(not (REPO / "docs" / "benchmark.json").is_file(),
                    reason="a copy of tests/ without the checkout's docs/ (the wheel checks)")
def test_compare_reads_the_published_runs(capsys):
    """The JSON of earlier runs (docs/) compares, with itself at 1.00 everywhere."""
    for name in ("benchmark.json", "benchmark_channels.json"):
        path = str(REPO / "docs" / name)
        status, out, err = run(["--compare", path, path], capsys)
        assert status == 0, err
        geomeans = [line for line in out.splitlines() if line.startswith("geomean all")]
        assert geomeans and set(geomeans[0].split()[2:]) == {"1.00"}


def test_compare_of_a_fresh_run_with_itself(capsys, tmp_path):
    path = tmp_path / "r.json"
    status, _, err = run(TINY + ["--ops", "eval", "--json", str(path)], capsys)
    assert status == 0, err
    status, out, err = run(["--compare", str(path), str(path)], capsys)
    assert status == 0, err
    assert "note:" not in out
    assert len([line for line in out.splitlines() if line.startswith(("4x3 ", "2x3x2x2 "))]) == 4


def test_compare_refuses_files_that_are_not_runs(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"sync_steps": []}')
    status, _, err = run(["--compare", str(bad), str(bad)], capsys)
    assert status == 2 and "is not a bnfast-bench --json file" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_run_json({"5x5-float64-eval": {"bnfast": 1.0}})))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_run_json(A_RUN)))
    status, _, err = run(["--compare", str(good), str(other)], capsys)
    assert status == 1 and "no cell in common" in err


def _result(shape, dtype, op, **medians):
    from bnfast._timing import Timing
    return bench.CellResult(bench.Cell(shape, dtype, op),
                            {peer: Timing(1, (t,)) for peer, t in medians.items()}, False)


def test_table_says_where_peers_win_and_where_the_floor_is_beaten():
    results = [
        _result((1024, 4096), "float32", "eval", bnfast=1.0, torch=0.5, floor=1.25),  # 16 MiB
        _result((1024, 4096), "float32", "train", bnfast=1.0, torch=2.0, floor=1.05),
        _result((100, 100), "float64", "eval", bnfast=1.0, torch=3.0, floor=2.0),     # small
    ]
    machine = {"bnfast": "0", "numpy": "0", "cpu": "cpu", "cores": 2, "torch": "2",
               "build_info": {"isa": "avx2"}, "threads": {"bnfast": 2, "torch": 2, "floor": 2}}
    table = bench.format_table(results, machine, 3, ["bnfast", "torch", "floor"])
    assert ("torch faster than bnfast (speedup < 1.00): 1 of 3 cells: "
            "1024x4096 float32 eval (0.50)") in table
    # 0.80x the floor on 16 MiB is listed; 0.95x (noise) and a small cell are not.
    assert ("bnfast more than 10% under the floor, x of 8 MiB or more: "
            "1024x4096 float32 eval (0.80)") in table
    clean = bench.format_table(results[1:], machine, 3, ["bnfast", "torch", "floor"])
    assert "torch faster than bnfast (speedup < 1.00): no cell" in clean
    assert "under the floor, x of 8 MiB or more: no cell" in clean
