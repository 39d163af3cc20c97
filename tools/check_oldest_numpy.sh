#!/usr/bin/env bash
# The wheel is built against NumPy 2 (pyproject's build requirement) but
# declares `numpy>=X` at run time.  Install one wheel into two fresh venvs,
# one with the oldest NumPy the project declares (the newest patch release of
# X, e.g. 1.25.2 for `numpy>=1.25`) and one with the newest NumPy on PyPI, and
# run the whole test suite in each, from a copy of tests/ outside the tree.
#
# The wheel: wheelhouse/bnfast-*.whl for this Python (tools/check_wheel.sh
# makes it), else one built here from a clean copy of the tree.  Runs both
# suites even if the first fails; exits 1 if either failed.  About 1.5 minutes
# with a wheel at hand (+1 to build one).  Environment: PYTHON (default
# python3); NUMPY_OLDEST (a pip requirement, overrides the derived one);
# KEEP_WORK=1 keeps the temporary directory.
set -euo pipefail
source "$(dirname "$0")/common.sh" numpy

# The oldest NumPy: `numpy>=X` from [project] dependencies -> `numpy~=X.0`.
DECLARED=$("$PYTHON" - <<'EOF'
import re
text = open("pyproject.toml").read()
deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
print(re.search(r"numpy\s*>=\s*([0-9.]+)", deps).group(1))
EOF
)
NUMPY_OLDEST=${NUMPY_OLDEST:-numpy~=$DECLARED.0}
echo "pyproject declares numpy>=$DECLARED; oldest tested: $NUMPY_OLDEST"

TAG=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
WHEEL=$(ls wheelhouse/bnfast-*-"$TAG"-*.whl 2> /dev/null | head -n 1 || true)
if [ -n "$WHEEL" ]; then
    WHEEL="$ROOT/$WHEEL"
    step "reusing $WHEEL"
else
    step "no wheelhouse/bnfast-*-$TAG-*.whl: building a wheel from a clean copy of the tree"
    mkdir "$WORK/src"
    clean_copy "$WORK/src"
    new_venv "$WORK/builder"
    "$WORK/builder/bin/python" -m pip wheel --quiet --no-deps -w "$WORK/wheel" "$WORK/src"
    WHEEL=$(ls "$WORK"/wheel/bnfast-*.whl)
    echo "built $WHEEL"
fi

mkdir -p "$WORK/suite"
cp -R tests "$WORK/suite/tests"
rm -rf "$WORK/suite/tests/__pycache__"

status=0
summary=()
check() {  # check NAME NUMPY_REQUIREMENT
    local name=$1 req=$2 venv="$WORK/venv-$1"
    step "$name NumPy: fresh venv with $req and the wheel"
    new_venv "$venv"
    pip_install "$venv" "$req" "$WHEEL[test]"
    (cd "$WORK/suite" && "$venv/bin/python" - <<'EOF'
import pathlib, sysconfig
import numpy, bnfast
where = pathlib.Path(bnfast.__file__).resolve()
assert pathlib.Path(sysconfig.get_paths()["platlib"]).resolve() in where.parents, where
print("numpy", numpy.__version__, "| bnfast", bnfast.__version__, "from", where.parent)
print("build_info:", bnfast.build_info())
EOF
    )
    local version log="$WORK/pytest-$name.log" rc=0
    version=$("$venv/bin/python" -c 'import numpy; print(numpy.__version__)')
    (cd "$WORK/suite" && "$venv/bin/python" -m pytest -p no:cacheprovider -q -rfEs tests) \
        2>&1 | tee "$log" | tail -n 40 || rc=$?
    [ "$rc" = 0 ] || status=1
    summary+=("numpy $version: $(tail -n 1 "$log")")
}
check oldest "$NUMPY_OLDEST"
check newest "numpy"

step "summary"
printf '%s\n' "${summary[@]}"
exit "$status"
