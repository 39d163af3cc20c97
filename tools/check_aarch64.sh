#!/usr/bin/env bash
# The package on aarch64 (issue 19, item 5): cross-built with Debian's aarch64
# toolchain, then the test suite under qemu-aarch64 (user-mode emulation).
#
#   1. apt: arm64 as a dpkg foreign architecture; gcc-aarch64-linux-gnu (cross
#      GCC 12 with libgomp), Debian's arm64 libpython3.11(-dev), libgomp1 and
#      libstdc++6 (multiarch, beside the amd64 ones; no arm64 python3.11
#      binary: it would replace the host's), Debian's amd64 python3.11-venv,
#      qemu-user.  Installed only where missing (as root).
#   2. pip download: the aarch64 wheels of NumPy (the newest for cp311) and of
#      the [test] extra, for manylinux up to glibc 2.36 (Debian 12's).
#   3. cross build: a wheel from a clean copy of the tree, built by Debian's
#      amd64 python3.11 with the arm64 interpreter's build configuration:
#      _PYTHON_SYSCONFIGDATA_NAME selects Debian's arm64 sysconfig data
#      (CC/LDSHARED aarch64-linux-gnu-gcc, EXT_SUFFIX ...-aarch64-linux-gnu.so;
#      /usr/include/python3.11/pyconfig.h is multiarch) and
#      _PYTHON_HOST_PLATFORM=linux-aarch64 names the target (setup.py then
#      builds no x86 variant; the wheel is tagged linux_aarch64).  NumPy's
#      headers come from the aarch64 wheel (CPPFLAGS), the build's NumPy is
#      the same version.  OpenMP on (BNFAST_OPENMP=1), as the release
#      wheels (pyproject's cibuildwheel table).
#   4. an emulated environment: a 3-line aarch64 `python` (Py_BytesMain,
#      linked to Debian's arm64 libpython3.11) in a venv layout whose
#      site-packages gets NumPy, the test extra and the bnfast wheel, started
#      through a shell wrapper `qemu-aarch64 -0 <wrapper> ...`: sys.executable
#      is the wrapper, so the tests' child processes (subprocess, spawn) are
#      emulated too, with no binfmt_misc registration needed.
#   5. checks: the extension modules are aarch64 ELF (`file`), only the
#      baseline variant is built, build_info() says isa baseline with OpenMP
#      on; then `python -m pytest tests` under emulation, from a copy of
#      tests/ outside the tree.
#
# Time on 2 cores (Zen 3, qemu 7.2): apt ~30 s on a first run (85 packages;
# nothing after), pip download ~5 s, cross build 30-60 s, the emulated
# environment ~5 s; then the whole suite 3.3-4 min under emulation on a quiet
# machine, 7.6 min beside other work, or --subset 2.7 min (~4 min beside other
# work).  CI runs --subset: see SUBSET below.
#
# Usage: bash tools/check_aarch64.sh [--subset] [PYTEST_ARGS...]
#   --subset      the tests listed in SUBSET below instead of the whole suite
#   PYTEST_ARGS   passed on to pytest (e.g. -k name, -x); test paths given
#                 here replace tests/ (relative to the copy: tests/test_x.py)
# Environment: AARCH64_PYTHON (default 3.11: Debian 12's python3.X; the amd64
# and arm64 builds of that version are used); KEEP_WORK=1 keeps the temporary
# directory (build log, the emulated environment).  PYTHON is not used: the
# cross build needs Debian's own interpreter (its multiarch sysconfig data).
set -euo pipefail
source "$(dirname "$0")/common.sh" aarch64

PYVER=${AARCH64_PYTHON:-3.11}
GLIBC_MAX=36                  # Debian 12's glibc 2.36: manylinux_2_17 .. 2_36
TARGET=aarch64-linux-gnu

# The subset for CI: the whole suite but tests/test_memory.py.  Emulated, that
# file took 57 s on a quiet machine and 220 s beside other work (the whole
# suite 197-232 s and 458 s), which puts the step past CI's ~8 minutes on a
# busy 2-core machine; and it checks nothing that depends on the architecture
# (the GIL released by `nogil` Cython, resident memory, two threads sharing a
# layer: qemu on an x86-64 host keeps x86's memory order, so it cannot catch a
# weak-ordering race anyway).
SUBSET=(tests --ignore=tests/test_memory.py)

subset=0
pytest_args=()
for arg in "$@"; do
    case $arg in
    --subset) subset=1 ;;
    *) pytest_args+=("$arg") ;;
    esac
done

timings=()
started=$SECONDS
timed() {  # timed NAME: record the time since the previous call
    timings+=("$(printf '%-18s %4d s' "$1" $((SECONDS - started)))")
    started=$SECONDS
}

if [ "$(uname -m)" != x86_64 ] || [ ! -f /etc/debian_version ]; then
    echo "check_aarch64: needs a Debian x86-64 host (this is $(uname -m))" >&2
    exit 1
fi

# --- 1. apt ------------------------------------------------------------------
packages=(gcc-aarch64-linux-gnu qemu-user "python$PYVER" "python$PYVER-venv" file
          "libpython$PYVER-dev:arm64" libgomp1:arm64 libstdc++6:arm64)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f '${Status}\n' "$package" 2> /dev/null | grep -q "ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update -qq
    # arm64 libraries are Multi-Arch: same, so the amd64 ones may be upgraded
    # to the same version alongside.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" > "$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log"; exit 1; }
else
    step "apt: everything installed already"
fi
BUILD_PYTHON=/usr/bin/python$PYVER
SYSCONFIG=_sysconfigdata__$TARGET
if [ ! -f "/usr/lib/python$PYVER/$SYSCONFIG.py" ]; then
    echo "check_aarch64: no /usr/lib/python$PYVER/$SYSCONFIG.py (libpython$PYVER-minimal:arm64)" >&2
    exit 1
fi
timed apt

# --- 2. pip download -----------------------------------------------------------
step "pip download: NumPy and the test extra for aarch64 (cp${PYVER/./})"
PYTHON=$BUILD_PYTHON new_venv "$WORK/build"      # the build's venv; its pip downloads
# The project's own requirements, so that this list never drifts from pyproject.
mapfile -t run_requires < <("$BUILD_PYTHON" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
EOF
)
target_pip=(--only-binary=:all: --python-version "$PYVER" --implementation cp
            --abi "cp${PYVER/./}" --platform linux_aarch64 --platform manylinux2014_aarch64)
for minor in $(seq 17 "$GLIBC_MAX"); do
    target_pip+=(--platform "manylinux_2_${minor}_aarch64")
done
"$WORK/build/bin/python" -m pip download --quiet --disable-pip-version-check \
    --dest "$WORK/wheels" "${target_pip[@]}" "${run_requires[@]}"
NUMPY_WHEEL=$(ls "$WORK"/wheels/numpy-*.whl)
NUMPY_VERSION=$(basename "$NUMPY_WHEEL" | cut -d- -f2)
wheels=("$WORK"/wheels/*.whl)
echo "${#wheels[@]} wheels; numpy $NUMPY_VERSION"
timed "pip download"

# --- 3. cross build ------------------------------------------------------------
step "cross build: a linux_aarch64 wheel from a clean copy of the tree"
mkdir "$WORK/src"
clean_copy "$WORK/src"
mapfile -t build_requires < <("$BUILD_PYTHON" - <<'EOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))
EOF
)
echo "numpy==$NUMPY_VERSION" > "$WORK/constraints.txt"    # the target's NumPy
pip_install "$WORK/build" "${build_requires[@]}" wheel -c "$WORK/constraints.txt"
mkdir "$WORK/numpy-aarch64"
"$BUILD_PYTHON" -m zipfile -e "$NUMPY_WHEEL" "$WORK/numpy-aarch64"
NUMPY_INCLUDE=$WORK/numpy-aarch64/numpy/_core/include     # NumPy 2's layout
if ! diff -rq "$NUMPY_INCLUDE" "$("$WORK/build/bin/python" -c 'import numpy; print(numpy.get_include())')" \
        > /dev/null; then
    echo "note: numpy $NUMPY_VERSION's aarch64 headers differ from amd64's; the aarch64 ones come first"
fi
(
    cd "$WORK/src"
    export _PYTHON_HOST_PLATFORM=linux-aarch64 _PYTHON_SYSCONFIGDATA_NAME=$SYSCONFIG
    export CPPFLAGS="-I$NUMPY_INCLUDE" BNFAST_OPENMP=1
    unset CC CXX LDSHARED LDFLAGS        # the arm64 sysconfig data's, not a caller's
    "$WORK/build/bin/python" -m pip wheel -v --no-build-isolation --no-deps --no-cache-dir \
        --disable-pip-version-check -w "$WORK/dist" . > "$WORK/build.log" 2>&1
) || { tail -n 60 "$WORK/build.log"; echo "check_aarch64: the cross build failed" >&2; exit 1; }
grep -E "^ *bnfast: " "$WORK/build.log" || true
WHEEL=$(ls "$WORK"/dist/bnfast-*-linux_aarch64.whl)
echo "built $(basename "$WHEEL")"
timed "cross build"

# --- 4. the emulated environment -----------------------------------------------------
step "emulated environment: Debian's arm64 libpython$PYVER under qemu-aarch64"
ENV=$WORK/env
SITE=$ENV/lib/python$PYVER/site-packages
mkdir -p "$ENV/bin" "$SITE"
printf '#include <Python.h>\nint main(int argc, char** argv) { return Py_BytesMain(argc, argv); }\n' \
    > "$WORK/launcher.c"
"$TARGET-gcc" -O2 -I"/usr/include/python$PYVER" "$WORK/launcher.c" -o "$ENV/bin/python.$TARGET" \
    -L"/usr/lib/$TARGET" -Wl,-rpath-link,"/usr/lib/$TARGET" -l"python$PYVER"
# argv[0] (-0) is the wrapper: Python takes it as sys.executable, finds
# pyvenv.cfg beside it, and children started with sys.executable come back here.
cat > "$ENV/bin/python" <<'EOF'
#!/bin/sh
exec qemu-aarch64 -0 "$0" "${0%/*}/python.aarch64-linux-gnu" "$@"
EOF
chmod +x "$ENV/bin/python"
printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = %s\n' "$PYVER" \
    > "$ENV/pyvenv.cfg"
"$WORK/build/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$WORK/wheels" --target "$SITE" "${target_pip[@]}" "${run_requires[@]}" "$WHEEL"
timed "emulated env"

# --- 5. checks -----------------------------------------------------------------
step "the extension modules: aarch64 ELF; build_info()"
file "$SITE"/bnfast/*.so | sed "s|$SITE/||; s/, BuildID.*//"
if file "$SITE"/bnfast/*.so | grep -v "ARM aarch64" | grep -q .; then
    echo "check_aarch64: an extension module is not aarch64" >&2
    exit 1
fi
mkdir -p "$WORK/suite"
cp -R tests "$WORK/suite/tests"
rm -rf "$WORK/suite/tests/__pycache__"
cp -R docs "$WORK/suite/docs"      # the published benchmark runs test_bench_cli reads
cd "$WORK/suite"
"$ENV/bin/python" - <<'EOF'
import pathlib, platform, sys
import numpy, bnfast
info = bnfast.build_info()
print("machine", platform.machine(), "| python", sys.version.split()[0], "| numpy", numpy.__version__,
      "| bnfast", bnfast.__version__, "from", pathlib.Path(bnfast.__file__).parent)
print("build_info:", info)
assert platform.machine() == "aarch64", platform.machine()
assert info["isa"] == "baseline" and info["isa_built"] == ["baseline"], info
assert info["openmp"], "the aarch64 build has no OpenMP"
assert pathlib.Path(sys.prefix) in pathlib.Path(bnfast.__file__).parents
EOF
timed checks

if [ "$subset" = 1 ]; then
    tests=("${SUBSET[@]}")
    what="the subset: ${SUBSET[*]}"
else
    tests=(tests)
    what="the whole suite"
fi
for arg in "${pytest_args[@]}"; do      # test paths given replace the default
    case $arg in tests/*) tests=(); what="the tests named"; break ;; esac
done
step "pytest under qemu-aarch64: $what"
status=0
"$ENV/bin/python" -m pytest -p no:cacheprovider -q -rfEs "${tests[@]}" "${pytest_args[@]}" \
    || status=$?
timed "pytest (qemu)"

step "timings"
printf '%s\n' "${timings[@]}"
exit "$status"
