#!/usr/bin/env bash
# Memory safety: build the kernels with AddressSanitizer and UndefinedBehavior-
# Sanitizer (BNFAST_SANITIZE=1: -fsanitize=address,undefined, any UB aborts)
# into a fresh virtual environment and run the test suite under them.  Any
# report fails the run: ASan aborts the process on the first bad access, UBSan
# on the first undefined operation (-fno-sanitize-recover).
#
# Python itself is not instrumented, so the ASan runtime is preloaded, and
# leak detection is off: CPython keeps many allocations alive until exit on
# purpose, which LeakSanitizer would list; resident-memory growth over many
# calls is tested separately (tests/test_memory.py).  Timing- and RSS-based
# tests are skipped here: the sanitizers slow the kernels and grow memory by
# design.
#
# Runs from a fresh clone, without root: needs gcc with libasan and libubsan,
# python3 (with venv) and PyPI.  About 2 minutes on 2 cores.
set -euo pipefail
source "$(dirname "$0")/common.sh" sanitize

LIBASAN=$(gcc -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "check_sanitizers: gcc has no libasan.so here; install the GCC sanitizer runtimes" >&2
    exit 1
fi

# Build from a clean copy, not from the tree: objects an earlier build left
# in build/ must not be reused.
clean_copy "$WORK/src"
new_venv "$WORK/venv"
BNFAST_SANITIZE=1 pip_install "$WORK/venv" "$WORK/src[test]"

cp -R tests "$WORK/tests"
rm -rf "$WORK/tests/__pycache__"
cd "$WORK"     # away from the source tree, whose bnfast/ would shadow the install
ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$LIBASAN" "$WORK/venv/bin/python" - <<'EOF'
import bnfast
flags = bnfast.build_info()["build_flags"]
assert "-fsanitize=address,undefined" in flags, flags
print("sanitized build:", bnfast.__file__, flags)
EOF
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
LD_PRELOAD="$LIBASAN" "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests \
    --deselect tests/test_memory.py::test_many_calls_do_not_grow_resident_memory \
    -k "not release_the_gil and not the_gil_measure"
echo "check_sanitizers: no AddressSanitizer or UndefinedBehaviorSanitizer report"
