# Shared by the tools/check_*.sh scripts: `source tools/common.sh NAME` from
# a script, after `set -euo pipefail`.  Moves to the repository root and sets:
#   ROOT     the repository root
#   PYTHON   the interpreter to build with (env PYTHON, default python3)
#   WORK     a temporary directory, removed on exit unless KEEP_WORK=1
# and exports BNFAST_SEED_REFERENCE (the book's class beside the checkout, for
# the test that compares with it) unless it is set already.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bnfast-$1.XXXXXX")
cleanup() { if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
if [ -z "${BNFAST_SEED_REFERENCE:-}" ] && [ -f "$ROOT/../shared/reference/reference_bn.py" ]; then
    export BNFAST_SEED_REFERENCE="$ROOT/../shared/reference/reference_bn.py"
fi

step() { printf '\n==> %s\n' "$*"; }

new_venv() {  # new_venv DIR: a fresh virtual environment with a current pip
    "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install --quiet --upgrade pip
}

# pip_install VENV ARGS...: pip install without the wheel cache, so that a
# wheel built earlier with other build switches is never reused.
pip_install() {
    local venv=$1
    shift
    "$venv/bin/python" -m pip install --quiet --no-cache-dir "$@"
}

clean_copy() {  # clean_copy DEST: the files git tracks or does not ignore
    mkdir -p "$1"
    if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        git ls-files -z -co --exclude-standard | tar -cf - --null -T - | tar -xf - -C "$1"
    else   # no git: everything but build products and environments
        tar -cf - --exclude=./build --exclude=./dist --exclude=./wheelhouse --exclude='./.venv*' \
            --exclude='*.so' --exclude='*.pyd' --exclude='bnfast/*.c' --exclude=__pycache__ . \
            | tar -xf - -C "$1"
    fi
}
