#!/usr/bin/env bash
# SyncBatchNormalization under real MPI launches, in the active environment
# (bnfast installed): installs the `mpi` extra's packages (mpi4py and MPICH
# from PyPI, no system MPI), runs tests/mpi/sync_mpi_check.py under
# `mpiexec -n 2` and `-n 3`, then examples/data_parallel_mlp.py on 4 ranks,
# which fails unless its loss curve matches one process to 1e-8.  Each launch
# is told the rank count asked for (BNFAST_MPI_RANKS, --ranks) and fails
# unless its world has that size: an mpiexec that does not match mpi4py's MPI
# starts K single-process worlds, which would otherwise pass trivially.
# About 30 s.  Environment: PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
step() { printf '\n==> %s\n' "$*"; }

step "the [mpi] extra's packages, read from the installed bnfast's metadata"
requirements=$("$PYTHON" - <<'PY'
import importlib.metadata, re
for req in importlib.metadata.requires("bnfast") or []:
    spec, _, marker = req.partition(";")
    if re.search(r"""extra\s*==\s*["']mpi["']""", marker):
        rest = re.sub(r"""(\s*and\s*)?extra\s*==\s*["']mpi["'](\s*and\s*)?""", "", marker).strip()
        print(spec.strip() + (f"; {rest}" if rest else ""))
PY
)
echo "$requirements"
[ -n "$requirements" ] || { echo "no [mpi] extra in bnfast's metadata" >&2; exit 1; }
mapfile -t reqs <<<"$requirements"
"$PYTHON" -m pip install --quiet "${reqs[@]}"
MPIEXEC=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")/mpiexec
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec

for ranks in 2 3; do
    step "tests/mpi under mpiexec -n $ranks"
    BNFAST_MPI_RANKS=$ranks timeout 300 "$MPIEXEC" -n "$ranks" "$PYTHON" -m pytest -q \
        -p no:cacheprovider tests/mpi/sync_mpi_check.py
done

step "examples/data_parallel_mlp.py on 4 ranks against one process"
timeout 300 "$MPIEXEC" -n 4 "$PYTHON" examples/data_parallel_mlp.py --ranks 4
