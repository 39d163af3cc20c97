#!/usr/bin/env bash
# The serial build (what a compiler without OpenMP gives, and what the macOS
# wheels are): `BNFAST_OPENMP=0 pip install .[test]` from a clean copy of the
# tree into a fresh venv, checks that no kernel module was built with or
# links OpenMP, then runs the whole test suite from a copy of tests/ outside
# the tree against the installed package.
#
# A clean copy, not `pip install .` here: setuptools would reuse kernels left
# in build/ by an earlier OpenMP build (it does not track the flags).  About
# 1.5 minutes on 2 cores.  Environment: PYTHON (default python3); KEEP_WORK=1
# keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bnfast-serial.XXXXXX")
cleanup() { if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
step() { printf '\n==> %s\n' "$*"; }
if [ -z "${BNFAST_SEED_REFERENCE:-}" ] && [ -f "$ROOT/../shared/reference/reference_bn.py" ]; then
    export BNFAST_SEED_REFERENCE="$ROOT/../shared/reference/reference_bn.py"
fi

step "clean copy of the tree"
mkdir "$WORK/src"
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    git ls-files -z -co --exclude-standard | tar -cf - --null -T - | tar -xf - -C "$WORK/src"
else   # no git: everything but build products and environments
    tar -cf - --exclude=./build --exclude=./dist --exclude=./wheelhouse --exclude='./.venv*' \
        --exclude='*.so' --exclude='*.pyd' --exclude='bnfast/*.c' --exclude=__pycache__ . \
        | tar -xf - -C "$WORK/src"
fi

step "BNFAST_OPENMP=0 pip install .[test] into a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
start=$SECONDS
BNFAST_OPENMP=0 "$WORK/venv/bin/python" -m pip install --quiet "$WORK/src[test]"
echo "build + install took $((SECONDS - start)) s"

step "no kernel module has OpenMP"
mkdir -p "$WORK/suite"
cp -R tests "$WORK/suite/tests"
rm -rf "$WORK/suite/tests/__pycache__"
(cd "$WORK/suite" && "$WORK/venv/bin/python" - <<'EOF'
import importlib, pathlib, sysconfig
import bnfast
from bnfast import _native
where = pathlib.Path(bnfast.__file__).resolve()
assert pathlib.Path(sysconfig.get_paths()["platlib"]).resolve() in where.parents, where
info = bnfast.build_info()
print("bnfast", bnfast.__version__, "from", where.parent)
print("build_info:", info)
assert info["openmp"] is False, info
assert info["threads"] == 1 and bnfast.get_num_threads() == 1, info
names = {"baseline": "bnfast._kernels", "avx2": "bnfast._kernels_avx2",
         "avx512": "bnfast._kernels_avx512"}
for variant in _native.available():
    module = importlib.import_module(names[variant])
    assert module.openmp_enabled() is False, variant
    assert "openmp" not in module.build_flags(), (variant, module.build_flags())
    libs = [line for line in open(module.__file__, "rb").read().split(b"\0") if b"libgomp" in line]
    assert not libs, (variant, libs)      # no DT_NEEDED entry naming an OpenMP runtime
    print(f"{variant}: openmp_enabled() False, flags: {module.build_flags()}")
try:
    bnfast.set_num_threads(2)
except RuntimeError as exc:
    print("set_num_threads(2) ->", exc)
else:
    raise AssertionError("set_num_threads(2) accepted by a serial build")
EOF
)

step "test suite against the serial build (from $WORK/suite)"
(cd "$WORK/suite" && "$WORK/venv/bin/python" -m pytest -p no:cacheprovider -q -rfEs --tb=short tests)
