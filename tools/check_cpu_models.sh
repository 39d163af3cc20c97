#!/usr/bin/env bash
# The installed package on emulated CPUs older than this one (qemu-user):
# no module may execute an instruction the CPU lacks, whatever is imported.
#
# For each model: import every module of the package (pkgutil walk) and
# check that exactly the kernel variants the model cannot run raise
# ImportError (a SIGILL kills the run); then the kernel tests under each
# variant the model runs (BNFAST_ISA).
#
#   Haswell  AVX2, FMA, BMI1/2, no AVX-512: the avx2 and baseline variants
#   Nehalem  x86-64-v2 (SSE4.2, POPCNT), no AVX: the baseline variant.  The
#            plain x86-64 model (qemu64) cannot run NumPy 2.4 itself, whose
#            own baseline is x86-64-v2.
#
# Debian's qemu-user (7.2) emulates AVX2 and FMA but not AVX-512.  Installs
# qemu-user with apt-get where it is missing (as root).  Uses the installed
# package of the current environment (PYTHON_ENV, default python); about
# 2 minutes per model and variant on 2 cores.
set -euo pipefail
source "$(dirname "$0")/common.sh" cpu-models

python=${PYTHON_ENV:-python}
if [ "$(uname -m)" != x86_64 ]; then
    echo "check_cpu_models: not an x86-64 host ($(uname -m)); the x86-64 models need one" >&2
    exit 1
fi
if ! command -v qemu-x86_64 > /dev/null; then
    step "apt-get install qemu-user"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user > /dev/null
fi
interpreter=$("$python" -c 'import sys; print(sys.executable)')

emulated() {  # emulated MODEL ARGS...: the environment's python on that CPU model
    local model=$1
    shift
    # qemu warns once per CPUID feature that its TCG lacks (pcid, x2apic, ...)
    qemu-x86_64 -cpu "$model" "$interpreter" "$@" 2> >(grep -v "TCG doesn't support" >&2)
}

for model in Haswell Nehalem; do
    step "$model: import every module of the package"
    runnable=$(emulated "$model" - <<'EOF'
import importlib, importlib.util, pkgutil, sys
import bnfast
from bnfast import _native
from bnfast._kernels import cpu_level
level = cpu_level()
needs = {module: need for _, need, module in _native._VARIANTS}
refused, imported = [], []
for info in pkgutil.walk_packages(bnfast.__path__, "bnfast."):
    print(f"  {info.name}", file=sys.stderr, flush=True)   # the last one named is the culprit
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except ImportError as exc:
        refused.append(info.name)
        print(f"    ImportError: {exc}", file=sys.stderr)
expected = sorted(m for m in needs if needs[m] > level and importlib.util.find_spec(m))
assert sorted(refused) == expected, (level, refused, expected)
assert all(needs.get(m, 0) <= level for m in imported), (level, imported)
print(" ".join(name for name in _native.available()
               if dict((n, lv) for n, lv, _ in _native._VARIANTS).get(name, 0) <= level))
print(f"  cpu_level {level}; {len(imported)} modules imported, refused: {refused or 'none'}",
      file=sys.stderr)
EOF
)
    for isa in $runnable; do
        step "$model: the kernel tests with BNFAST_ISA=$isa"
        BNFAST_ISA=$isa emulated "$model" -m pytest -q -p no:cacheprovider tests/test_kernels.py
    done
done
