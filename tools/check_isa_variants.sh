#!/usr/bin/env bash
# The suite against every kernel variant this CPU runs besides the one that
# loads by default (bnfast/_native.py: baseline, avx2, avx512; the widest
# loads).  A wheel ships all three and another machine loads another one, so
# each is tested here, forced with BNFAST_ISA.  Uses the installed package
# of the current environment; about 20-60 s per variant on 2 cores.
set -euo pipefail
source "$(dirname "$0")/common.sh" isa

python=${PYTHON_ENV:-python}
read -r default others < <("$python" - <<'EOF'
from bnfast import _native
from bnfast._kernels import cpu_level
needs = {name: level for name, level, _ in _native._VARIANTS}   # the loader's own table
runnable = [name for name in _native.available() if needs.get(name, 0) <= cpu_level()]
print(_native.isa, " ".join(name for name in runnable if name != _native.isa))
EOF
)
echo "default variant: $default; also runnable here: ${others:-none}"
for isa in $others; do
    step "the suite with BNFAST_ISA=$isa"
    BNFAST_ISA=$isa "$python" -c "from bnfast import _native; assert _native.isa == '$isa'"
    BNFAST_ISA=$isa "$python" -m pytest -q -p no:cacheprovider tests
done
