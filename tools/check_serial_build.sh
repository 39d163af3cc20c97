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
source "$(dirname "$0")/common.sh" serial

step "clean copy of the tree"
clean_copy "$WORK/src"

step "BNFAST_OPENMP=0 pip install .[test] into a fresh venv"
new_venv "$WORK/venv"
start=$SECONDS
BNFAST_OPENMP=0 pip_install "$WORK/venv" "$WORK/src[test]"
echo "build + install took $((SECONDS - start)) s"

step "no kernel module has OpenMP"
mkdir -p "$WORK/suite"
cp -R tests "$WORK/suite/tests"
rm -rf "$WORK/suite/tests/__pycache__"
(cd "$WORK/suite" && "$WORK/venv/bin/python" - <<'EOF'
import importlib, importlib.util, pathlib, sysconfig
import bnfast
from bnfast import _native
where = pathlib.Path(bnfast.__file__).resolve()
assert pathlib.Path(sysconfig.get_paths()["platlib"]).resolve() in where.parents, where
info = bnfast.build_info()
print("bnfast", bnfast.__version__, "from", where.parent)
print("build_info:", info)
assert info["openmp"] is False, info
assert info["threads"] == 1 and bnfast.get_num_threads() == 1, info
names = {"entry points": "bnfast._kernels", "baseline": "bnfast._loops",
         "avx2": "bnfast._loops_avx2", "avx512": "bnfast._loops_avx512"}
for variant in ["entry points"] + _native.available():
    data = open(importlib.util.find_spec(names[variant]).origin, "rb").read()
    libs = [line for line in data.split(b"\0") if b"libgomp" in line]
    assert not libs, (variant, libs)      # no DT_NEEDED entry naming an OpenMP runtime
    try:
        module = importlib.import_module(names[variant])
    except ImportError as exc:   # a variant this CPU cannot run: only its file can be read
        assert b"compile: " in data and b"-fopenmp" not in data, variant
        print(f"{variant}: not runnable on this CPU ({exc}); no OpenMP flag or runtime in it")
        continue
    assert module.openmp_enabled() is False, variant
    flags = getattr(module, "build_flags", lambda: "(entry points)")()
    assert "openmp" not in flags, (variant, flags)
    print(f"{variant}: openmp_enabled() False, flags: {flags}")
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
