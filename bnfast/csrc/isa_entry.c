/* The entry point of a loops variant module (bnfast._loops_avx2, ...).
 *
 * A variant's Cython module is compiled with its instruction set's flags
 * (setup.py, ISA_VARIANTS), so the compiler may use those instructions
 * anywhere in it, module initialisation included: importing it on a CPU
 * without them would die with SIGILL.  This file is compiled for the
 * baseline and linked into the same shared object.  setup.py renames
 * Cython's PyInit_<module> to BNFAST_CYTHON_INIT, and the PyInit_<module>
 * below (BNFAST_ENTRY) checks the CPU first: on a CPU that lacks the
 * instructions the import raises ImportError before any of them runs.
 *
 * Macros from setup.py: BNFAST_ENTRY, BNFAST_CYTHON_INIT, BNFAST_VARIANT
 * (the variant's name, a string) and BNFAST_VARIANT_LEVEL (cpu.h's level).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cpu.h"

PyMODINIT_FUNC BNFAST_CYTHON_INIT(void);

PyMODINIT_FUNC BNFAST_ENTRY(void) {
    if (bnfast_cpu_level() < BNFAST_VARIANT_LEVEL) {
        PyErr_Format(PyExc_ImportError,
                     "bnfast's %s kernels need a CPU with %s, which this CPU "
                     "lacks; `import bnfast` loads the widest variant the CPU runs",
                     BNFAST_VARIANT, bnfast_isa_features(BNFAST_VARIANT_LEVEL));
        return NULL;
    }
    return BNFAST_CYTHON_INIT();
}
