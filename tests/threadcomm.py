"""A stand-in for an MPI communicator: k ranks as k threads of one process.

Lets the single-process test suite run SyncBatchNormalization over several
ranks (tests/test_distributed.py); the real MPI runs are in tests/mpi/.
Only what bnfast.distributed uses is implemented: allgather and Get_size.
"""
from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class ThreadComm:
    """Rank `rank` of a group whose ranks share `slots` and `barrier`."""

    def __init__(self, rank: int, size: int, slots: list, barrier: threading.Barrier):
        self.rank, self.size, self._slots, self._barrier = rank, size, slots, barrier

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def allgather(self, obj: Any) -> list:
        # Pickled as MPI would send it, so no rank shares another's arrays.
        self._slots[self.rank] = pickle.dumps(obj)
        self._barrier.wait()
        gathered = [pickle.loads(blob) for blob in self._slots]
        self._barrier.wait()
        return gathered


def run_ranks(size: int, work: Callable[[ThreadComm], Any], timeout: float = 60.0) -> list:
    """work(comm) on `size` ranks at once; their results in rank order.
    An exception on a rank is returned as its result, not raised."""
    slots: list = [None] * size
    barrier = threading.Barrier(size, timeout=timeout)
    comms = [ThreadComm(r, size, slots, barrier) for r in range(size)]

    def call(comm: ThreadComm) -> Any:
        try:
            return work(comm)
        except Exception as exc:      # reported per rank
            return exc
    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(call, comms))
