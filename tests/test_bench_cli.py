"""bnfast-bench, the benchmark CLI: arguments, outputs and failure modes, on tiny shapes."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

import bnfast
from bnfast import bench
from bnfast._timing import calls_per_repeat, interleaved
from conftest import REPO

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
                   "--check", "--no-check", "--repeats"):
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
    peers = ["bnfast", "reference", "floor"] + (["torch"] if data["torch"]["available"] else [])
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
    machine = data["machine"]
    for key in ("cpu", "cores", "numpy", "cython", "torch", "bnfast", "threads"):
        assert key in machine
    assert machine["bnfast"] == bnfast.__version__
    assert {"isa", "build_flags"} <= set(machine["build_info"])
    assert data["settings"]["repeats"] == 2 and data["settings"]["check"] is True
    assert set(data["geomean"]) >= {"speedup_vs_reference", "speedup_vs_torch",
                                    "floor_multiple", "by_op"}
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
