"""Build of the C quantization kernels (moeplan.kernels._C, from kernels/csrc).

Plain C11. OpenMP is used when the compiler accepts -fopenmp, otherwise the kernels run
single-threaded. No -march=native: the extension must run on any x86-64 / aarch64 machine
that installs the same wheel, and the speed figures are compared against a generic ggml build.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from glob import glob

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts_openmp(cc: str) -> bool:
    if os.environ.get("MOEPLAN_NO_OPENMP"):
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([cc, "-fopenmp", path, "-o", os.path.join(tmp, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[0] if hasattr(self.compiler, "compiler_so") else "cc"
        cc = shutil.which(cc) or cc
        omp = sys.platform != "win32" and _compiler_accepts_openmp(cc)
        for ext in self.extensions:
            ext.extra_compile_args = ["-std=c11", "-O3", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
            ext.extra_link_args = []
            if omp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
                ext.define_macros.append(("MOEPLAN_OPENMP", "1"))
        super().build_extensions()


ext = Extension(
    "moeplan.kernels._C",
    sources=sorted(glob("kernels/csrc/*.c")),
    include_dirs=["kernels/csrc", np.get_include()],
    depends=sorted(glob("kernels/csrc/*.h")),
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
