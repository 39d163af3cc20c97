"""Build the typed kernels of bnfast.

Metadata lives in pyproject.toml; this file only describes the extension:
which flags each compiler gets, whether OpenMP is used, and the Cython
directives (set here once, not repeated in the sources).

Environment switches (read at build time):
  BNFAST_OPENMP=0   build the serial kernels even where OpenMP is available
  BNFAST_NATIVE=1   add -march=native (a local build for this CPU only)
  BNFAST_SANITIZE=1 build with -fsanitize=address,undefined (see tools/)
  BNFAST_VARIANTS=0 build only the baseline loops (no AVX2/AVX-512 variants)
  BNFAST_DEBUG=1    keep the debug info (-g) that Python's own CFLAGS ask for;
                    without it the kernels build with -g0, as the wheels do

The kernels are two modules: bnfast._kernels (entry points, validation, work
planning), compiled once for the baseline, and bnfast._loops (the hot loops),
which on x86-64 with GCC or Clang is also compiled for AVX2 and for AVX-512
(bnfast._loops_avx2, bnfast._loops_avx512); bnfast/_native.py picks the
widest one the CPU runs at import.  The default build therefore runs on any
x86-64 CPU and is fast on new ones.  Each variant module gets a
baseline-compiled entry point (bnfast/csrc/isa_entry.c) that checks the CPU
before the module's own initialisation runs, so importing a variant the CPU
cannot run raises ImportError instead of dying on an illegal instruction.
"""
import glob
import os
import platform
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Per-compiler OpenMP flags: (compile args, link args).  Apple's clang has no
# OpenMP of its own; it gets it only from a Homebrew/conda libomp, which the
# probe below finds or does not.
OPENMP_FLAGS = {
    "unix": (["-fopenmp"], ["-fopenmp"]),
    "mingw32": (["-fopenmp"], ["-fopenmp"]),
    "msvc": (["/openmp"], []),
    "darwin": (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
}

OPTIMIZE_FLAGS = {
    "unix": ["-O3", "-fno-math-errno", "-fno-trapping-math"],
    "mingw32": ["-O3", "-fno-math-errno", "-fno-trapping-math"],
    "msvc": ["/O2"],
}

# GCC vectorizes a loop with possibly overlapping pointers behind a run-time
# check of every (written, read) pair, but gives up above 10 pairs; the
# kernels' four-row loops have more.  Added where the compiler takes it.
VECTORIZE_FLAGS = ["--param=vect-max-version-for-alias-checks=64"]

# Hot loops start on a 64-byte line.  Where a tight loop straddles two lines
# the core fetches two per iteration: on Zen 3, a per-channel plane's
# float32 y = (x - c) * k + b ran 1.6x slower when a change elsewhere in the
# module moved it across a line (bench/ab_loops.py measures such pairs).
ALIGN_FLAGS = ["-falign-loops=64"]

# Instruction-set variants: module suffix -> (the bnfast/csrc/cpu.h level
# that runs it, extra flags).  bnfast_cpu_level() checks for exactly these
# features, in the variant's entry point and in bnfast/_native.py.
ISA_VARIANTS = {
    "avx2": ("BNFAST_ISA_AVX2", ["-mavx2", "-mfma", "-mbmi", "-mbmi2"]),
    "avx512": ("BNFAST_ISA_AVX512",
               ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512cd",
                "-mavx512dq", "-mavx512vl", "-mprefer-vector-width=512"]),
}

# Hand-written C: CPU detection and the variants' entry points.
CSRC = os.path.join("bnfast", "csrc")

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
    "embedsignature": True,
    "autotestdict": False,
}


def _env_flag(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _compiler_kind(compiler):
    kind = compiler.compiler_type
    if kind == "unix" and sys.platform == "darwin":
        return "darwin"
    return kind


OPENMP_PROBE = """
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""

PLAIN_PROBE = "int main(void) { return 0; }\n"


def _compiles_with(compiler, compile_args, link_args, source=OPENMP_PROBE):
    """Try to build and link a tiny program with these flags."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as handle:
            handle.write(source)
        try:
            objects = compiler.compile([path], output_dir=tmp, extra_postargs=compile_args)
            compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=link_args)
        except Exception:  # any compile or link failure means "these flags don't work here"
            return False
    return True


class BuildKernels(build_ext):
    """Pick optimisation and OpenMP flags for the compiler actually in use."""

    def build_extensions(self):
        kind = _compiler_kind(self.compiler)
        compile_args = list(OPTIMIZE_FLAGS.get(kind, OPTIMIZE_FLAGS["unix"]))
        link_args = []

        for flags in (VECTORIZE_FLAGS, ALIGN_FLAGS):
            if kind != "msvc" and _compiles_with(self.compiler, flags, [], PLAIN_PROBE):
                compile_args += flags
        # Python's CFLAGS carry -g: debug info is three quarters of each
        # kernel module (10.7 MiB installed with it, 2.1 MiB without).
        if not _env_flag("BNFAST_DEBUG", False) and kind != "msvc":
            compile_args.append("-g0")
        if _env_flag("BNFAST_NATIVE", False) and kind != "msvc":
            compile_args.append("-march=native")
        if _env_flag("BNFAST_SANITIZE", False) and kind != "msvc":
            compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=undefined"]
            link_args += ["-fsanitize=address,undefined"]

        omp_compile, omp_link = [], []
        if _env_flag("BNFAST_OPENMP", True):
            omp_compile, omp_link = OPENMP_FLAGS.get(kind, OPENMP_FLAGS["unix"])
            if not _compiles_with(self.compiler, omp_compile, omp_link):
                omp_compile, omp_link = [], []
                print("bnfast: OpenMP not available for this compiler; building serial kernels",
                      file=sys.stderr)
        keep = []
        for ext in self.extensions:
            # only the kernels (entry points and loops) use OpenMP
            kernels = ext.name.startswith(("bnfast._kernels", "bnfast._loops"))
            isa = ext.name.rpartition("_")[2] if ext.name.startswith("bnfast._loops_") else None
            ext_compile = compile_args + (omp_compile if kernels else [])
            ext_compile += ISA_VARIANTS[isa][1] if isa else []
            ext_link = link_args + (omp_link if kernels else [])
            if isa and not _compiles_with(self.compiler, ext_compile, ext_link, PLAIN_PROBE):
                print(f"bnfast: the compiler does not take {isa} flags; skipping that variant",
                      file=sys.stderr)
                continue
            described = "compile: %s; link: %s" % (" ".join(ext_compile), " ".join(ext_link) or "-")
            ext.extra_compile_args = ext_compile
            ext.extra_link_args = ext_link
            ext.define_macros = list(ext.define_macros or []) + [
                ("BNFAST_BUILD_FLAGS", '"%s"' % described)]
            if isa:
                self._add_entry_point(ext, isa, compile_args)
            keep.append(ext)
        self.extensions = keep
        super().build_extensions()

    def _add_entry_point(self, ext, isa, baseline_args):
        """Link a baseline-compiled PyInit that checks the CPU into a variant.

        Cython's own PyInit_<module> is renamed, so the one Python calls is
        isa_entry.c's, compiled without the variant's flags (see that file).
        """
        module = ext.name.rpartition(".")[2]
        cython_init = "bnfast_cython_init_" + module
        ext.define_macros.append(("PyInit_" + module, cython_init))
        objects = self.compiler.compile(
            [os.path.join(CSRC, "isa_entry.c")],
            output_dir=os.path.join(self.build_temp, "entry_" + isa),
            macros=[("BNFAST_ENTRY", "PyInit_" + module), ("BNFAST_CYTHON_INIT", cython_init),
                    ("BNFAST_VARIANT", '"%s"' % isa),
                    ("BNFAST_VARIANT_LEVEL", ISA_VARIANTS[isa][0])],
            include_dirs=[CSRC],
            extra_postargs=baseline_args)
        ext.extra_objects = list(ext.extra_objects or []) + objects


def _wants_variants():
    if not _env_flag("BNFAST_VARIANTS", True) or _env_flag("BNFAST_NATIVE", False):
        return False
    if _env_flag("BNFAST_SANITIZE", False) or os.name == "nt":
        return False
    # The target's machine: platform.machine() is the build host's, so a cross
    # build names its target in _PYTHON_HOST_PLATFORM (e.g. linux-aarch64), as
    # sysconfig and the wheel tag read it (tools/check_aarch64.sh).
    target = os.environ.get("_PYTHON_HOST_PLATFORM", "").rpartition("-")[2]
    return (target or platform.machine()).lower() in ("x86_64", "amd64")


def _extension(name):
    return Extension(
        name,
        ["%s.pyx" % name.replace(".", "/")],
        include_dirs=[numpy.get_include(), CSRC],
        depends=sorted(glob.glob(os.path.join(CSRC, "*.[ch]"))),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [_extension(name) for name in ("bnfast._kernels", "bnfast._loops", "bnfast._outputs")]
if _wants_variants():
    extensions += [_extension("bnfast._loops_" + isa) for isa in ISA_VARIANTS]

setup(
    ext_modules=cythonize(extensions, compiler_directives=CYTHON_DIRECTIVES),
    cmdclass={"build_ext": BuildKernels},
)
