"""A from-scratch MLP with batch normalization, trained data-parallel over MPI.

    mpiexec -n 4 python examples/data_parallel_mlp.py

Every rank builds the same network and data (one seed).  Each step, every
rank takes its own shard of the global batch (uneven shards when the batch
does not divide), runs forward and backward with SyncBatchNormalization in
every block, and the weight gradients are summed over the ranks with
Allreduce; each rank's loss gradient is scaled by 1 / (global batch), so the
sum is the gradient of the global mean loss.  dgamma and dbeta come out of
SyncBatchNormalization already summed over the whole batch.

Rank 0 also trains the same network in one process on the whole batch (with
bnfast.BatchNormalization) and prints the two loss curves side by side; the
script exits with status 1 if they differ by more than 1e-8 relative.
Options: --steps N (default 60), --batch B (default 99, so that 2 or 4 ranks
get uneven shards), --ranks K (fail unless the world has K ranks: an mpiexec
that does not match mpi4py's MPI starts K separate one-rank worlds, each of
which would match one process trivially).  The last column, for contrast, is the same data-parallel
training with plain per-shard BatchNormalization.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import bnfast
from bnfast.distributed import SyncBatchNormalization

FEATURES, HIDDEN, CLASSES = 20, (32, 16), 4
LEARNING_RATE = 0.1


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A separable-ish synthetic classification problem (no download needed)."""
    centers = rng.standard_normal((CLASSES, FEATURES)) * 2.0
    labels = rng.integers(0, CLASSES, n)
    return centers[labels] + rng.standard_normal((n, FEATURES)), labels


def init_params(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    sizes = (FEATURES, *HIDDEN, CLASSES)
    params = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layer = {"W": rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
                 "b": np.zeros(fan_out)}
        if i < len(HIDDEN):
            layer["gamma"] = np.ones(fan_out)
            layer["beta"] = np.zeros(fan_out)
        params.append(layer)
    return params


class MLP:
    """Affine -> BN -> ReLU blocks, then Affine -> softmax cross-entropy."""

    def __init__(self, params: list[dict[str, np.ndarray]], make_bn):
        self.params = params
        # The BN layers hold gamma/beta by reference: SGD updates them in place.
        self.bns = [make_bn(p["gamma"], p["beta"]) for p in params[:-1]]

    def loss_and_grads(self, x: np.ndarray, t: np.ndarray, global_batch: int):
        """Sum of this shard's cross-entropy losses, and its gradients of the
        global mean loss (dout scaled by 1 / global_batch)."""
        cache = []
        h = x
        for p, bn in zip(self.params[:-1], self.bns):
            a = h @ p["W"] + p["b"]
            z = bn.forward(a, True)
            cache.append((h, z))
            h = np.maximum(z, 0.0)
        logits = h @ self.params[-1]["W"] + self.params[-1]["b"]
        shifted = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(shifted)
        prob /= prob.sum(axis=1, keepdims=True)
        rows = np.arange(len(t))
        loss_sum = float(-np.log(prob[rows, t] + 1e-12).sum())
        dlogits = prob
        dlogits[rows, t] -= 1.0
        dlogits /= global_batch
        grads: list[dict[str, np.ndarray]] = [dict() for _ in self.params]
        grads[-1]["W"] = h.T @ dlogits
        grads[-1]["b"] = dlogits.sum(axis=0)
        dh = dlogits @ self.params[-1]["W"].T
        for i in reversed(range(len(self.bns))):
            h_in, z = cache[i]
            dz = dh * (z > 0)
            da = self.bns[i].backward(dz)
            grads[i]["gamma"], grads[i]["beta"] = self.bns[i].dgamma, self.bns[i].dbeta
            grads[i]["W"] = h_in.T @ da
            grads[i]["b"] = da.sum(axis=0)
            dh = da @ self.params[i]["W"].T
        return loss_sum, grads

    def sgd(self, grads: list[dict[str, np.ndarray]]) -> None:
        for p, g in zip(self.params, grads):
            for name, value in g.items():
                p[name] -= LEARNING_RATE * value     # in place: BN sees new gamma/beta


def train(comm, steps: int, batch: int, data, shard_of, sync: bool = True) -> list[float]:
    """Mean training loss per step; comm=None trains in this process alone.
    sync=False: plain per-shard batch normalization (what data parallelism
    without SyncBatchNormalization gives), for comparison."""
    x_all, t_all = data
    model = MLP(init_params(np.random.default_rng(1)),
                (lambda g, b: SyncBatchNormalization(g, b, comm=comm)) if comm and sync else
                (lambda g, b: bnfast.BatchNormalization(g, b)))
    curve = []
    for step in range(steps):
        start = (step * batch) % (len(x_all) - batch + 1)
        x, t = x_all[start:start + batch], t_all[start:start + batch]
        if comm is not None:
            x, t = x[shard_of], t[shard_of]
        loss_sum, grads = model.loss_and_grads(x, t, batch)
        if comm is not None:
            loss_sum = comm.allreduce(loss_sum, op=MPI.SUM)
            for layer_grads in grads:
                for name in ("W", "b"):     # gamma/beta grads are already global
                    summed = np.empty_like(layer_grads[name])
                    comm.Allreduce(layer_grads[name], summed, op=MPI.SUM)
                    layer_grads[name] = summed
        curve.append(loss_sum / batch)
        model.sgd(grads)
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=99)
    parser.add_argument("--ranks", type=int, default=None,
                        help="the rank count given to mpiexec -n; checked against the world")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.ranks is not None and size != args.ranks:
        print(f"rank {rank}: mpiexec was asked for {args.ranks} ranks but this world has {size}; "
              f"is the mpiexec on PATH the one of mpi4py's MPI?", file=sys.stderr)
        return 1
    if args.batch < size:
        parser.error(f"--batch {args.batch} leaves some of the {size} ranks without rows")
    data = make_data(np.random.default_rng(0), 2000)
    # Uneven shards: np.array_split gives the first ranks one row more.
    bounds = np.cumsum([0] + [len(s) for s in np.array_split(np.arange(args.batch), size)])
    shard = slice(int(bounds[rank]), int(bounds[rank + 1]))
    parallel = train(comm, args.steps, args.batch, data, shard)
    unsynced = train(comm, args.steps, args.batch, data, shard, sync=False)
    if rank != 0:
        return 0
    single = train(None, args.steps, args.batch, data, shard)
    worst = max(abs(p - s) / abs(s) for p, s in zip(parallel, single))
    print(f"{size} ranks, global batch {args.batch}, shards of "
          f"{', '.join(str(b - a) for a, b in zip(bounds, bounds[1:]))} rows")
    print(f"{'step':>5} {'one process':>20} {f'{size} ranks, synced':>20} {'relative diff':>14}"
          f" {'unsynced BN':>12}")
    for step in sorted({*range(0, args.steps, max(1, args.steps // 10)), args.steps - 1}):
        p, s = parallel[step], single[step]
        print(f"{step:5d} {s:20.16f} {p:20.16f} {abs(p - s) / abs(s):14.2e}"
              f" {unsynced[step]:12.8f}")
    ok = worst <= 1e-8
    print(f"worst relative difference over {args.steps} steps: {worst:.2e} "
          f"({'within' if ok else 'OUTSIDE'} 1e-8)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
