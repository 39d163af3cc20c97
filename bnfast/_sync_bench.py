"""Communication cost of SyncBatchNormalization, for ``bnfast-bench --sync-ranks``.

The launcher (run_all, in the benchmark's process) starts ``mpiexec -n K
python -m bnfast._sync_bench`` for each rank count K; every rank times a
training step (forward + backward) on its shard of one global batch, with
the time spent in the communicator's allgather (sending, waiting for the
other ranks, receiving, unpickling) measured apart, and rank 0 prints the
ranks' medians as one JSON line.  One process without MPI, a plain
BatchNormalization on the whole batch, is the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

#: Global batches timed (the grid's mid-size flat and image shapes).
SHAPES = ((256, 1024), (32, 64, 32, 32))
DTYPE = "float64"
STEPS_PER_REPEAT = 10


class TimedComm:
    """A communicator whose allgather calls are timed."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.seconds = 0.0

    def Get_size(self) -> int:
        size: int = self.comm.Get_size()
        return size

    def allgather(self, obj: Any) -> Any:
        start = time.perf_counter()
        result = self.comm.allgather(obj)
        self.seconds += time.perf_counter() - start
        return result


def _shard(n: int, ranks: int, rank: int) -> slice:
    bounds = np.cumsum([0] + [len(s) for s in np.array_split(np.arange(n), ranks)])
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def _data(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(list(shape))
    d = int(np.prod(shape[1:]))
    x = rng.standard_normal(tuple(shape)) * 2 + 0.5
    return x, rng.standard_normal(tuple(shape)), 1 + 0.5 * rng.standard_normal(d), np.zeros(d)


def worker(repeats: int) -> None:
    """One rank: time steps on this rank's shard; rank 0 prints the results."""
    from mpi4py import MPI

    from .distributed import SyncBatchNormalization
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for shape in SHAPES:
        x, dout, gamma, beta = _data(shape)
        mine = _shard(shape[0], size, rank)
        x, dout = x[mine], dout[mine]
        timed = TimedComm(comm)
        layer = SyncBatchNormalization(gamma, beta, comm=timed)
        layer.forward(x)
        layer.backward(dout)        # warm up
        steps, comms = [], []
        for _ in range(repeats):
            comm.Barrier()
            timed.seconds = 0.0
            start = time.perf_counter()
            for _ in range(STEPS_PER_REPEAT):
                layer.forward(x)
                layer.backward(dout)
            steps.append((time.perf_counter() - start) / STEPS_PER_REPEAT)
            comms.append(timed.seconds / STEPS_PER_REPEAT)
        mine_step = statistics.median(steps)
        mine_comm = statistics.median(comms)
        gathered = comm.gather((mine_step, mine_comm), root=0)
        if rank == 0:
            assert gathered is not None
            rows.append({"shape": list(shape), "dtype": DTYPE, "ranks": size,
                         "step_s": max(s for s, _ in gathered),
                         "communication_s": statistics.mean(c for _, c in gathered),
                         "rows_per_rank": [len(r) for r in np.array_split(np.arange(shape[0]),
                                                                           size)]})
    if rank == 0:
        print(json.dumps(rows))


def single_process(repeats: int) -> list[dict[str, Any]]:
    """The baseline: bnfast.BatchNormalization on the whole batch, no MPI."""
    from .layer import BatchNormalization
    rows = []
    for shape in SHAPES:
        x, dout, gamma, beta = _data(shape)
        layer = BatchNormalization(gamma, beta)
        layer.forward(x)
        layer.backward(dout)
        steps = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(STEPS_PER_REPEAT):
                layer.forward(x)
                layer.backward(dout)
            steps.append((time.perf_counter() - start) / STEPS_PER_REPEAT)
        rows.append({"shape": list(shape), "dtype": DTYPE, "ranks": 0,
                     "step_s": statistics.median(steps), "communication_s": 0.0,
                     "rows_per_rank": [shape[0]]})
    return rows


def find_mpiexec() -> Optional[str]:
    """mpiexec beside this Python (the mpich wheel's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def run_all(rank_counts: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Every rank count's rows, after the single-process baseline.  Each rank
    runs max(1, cores // ranks) kernel threads so the ranks do not oversubscribe
    the cores more than their number does."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--sync-ranks needs mpi4py and an MPI library: "
                           "pip install \"bnfast[mpi]\"") from exc
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise RuntimeError("--sync-ranks needs mpiexec (pip install \"bnfast[mpi]\" brings "
                           "MPICH's)")
    rows = single_process(repeats)
    cores = os.cpu_count() or 1
    for ranks in rank_counts:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // ranks)))
        done = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m",
                               "bnfast._sync_bench", "--repeats", str(repeats)],
                              capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"mpiexec -n {ranks} failed ({done.returncode}):\n"
                               f"{done.stderr.strip()}")
        rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def format_rows(rows: Sequence[dict[str, Any]], cores: int) -> str:
    from .bench import format_shape, format_time
    lines = [f"SyncBatchNormalization: one training step (forward + backward) on a global batch "
             f"split over MPI ranks, {DTYPE}, {cores} cores",
             "ranks 0 = one process without MPI (bnfast.BatchNormalization on the whole batch); "
             "communication = time in allgather, waiting included (mean over ranks); "
             "step = slowest rank's median",
             "",
             f"{'global batch':<16}{'ranks':>6}{'rows/rank':>12}{'step':>12}{'compute':>12}"
             f"{'communication':>15}{'comm share':>12}"]
    for row in rows:
        step, comm = row["step_s"], row["communication_s"]
        per_rank = row["rows_per_rank"]
        shown = str(per_rank[0]) if len(set(per_rank)) == 1 else f"{min(per_rank)}-{max(per_rank)}"
        lines.append(f"{format_shape(tuple(row['shape'])):<16}{row['ranks']:>6}{shown:>12}"
                     f"{format_time(step):>12}{format_time(step - comm):>12}"
                     f"{format_time(comm):>15}{comm / step:>11.0%}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of bnfast-bench --sync-ranks")
    parser.add_argument("--repeats", type=int, default=7)
    worker(parser.parse_args(argv).repeats)


if __name__ == "__main__":
    main()
