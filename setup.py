"""Builds evolver_kernels._C (C++/OpenMP, always) and evolver_kernels._cuda (when torch has CUDA and nvcc exists)
ahead of time, against the torch of the build environment; each module carries the record of what it was built
against (a generated header, csrc/module.h). The sources, flags and toolchain lookups are defined once in
evolver_kernels/kernels/jit.py, which also compiles the extensions just in time at first use when they are missing or
were built against another torch than the one that imports them.

    pip install --no-build-isolation .   compiles now, against the torch already installed (the usual way)
    pip install .                        with build isolation torch is not in the build environment: nothing is
                                         compiled now, the kernels compile at first use (a C++ compiler is
                                         needed then; `python -m evolver_kernels.env` reports the state)

Switches (environment variables):
  EVOLVER_KERNELS_SKIP_CUDA_BUILD=1   never build the CUDA extension
  EVOLVER_KERNELS_FORCE_CUDA_BUILD=1  fail instead of skipping when the CUDA extension cannot be built
  EVOLVER_KERNELS_PORTABLE=1          no -march=native for the CPU extension (for binaries moved between CPUs)
  TORCH_CUDA_ARCH_LIST                CUDA architectures; defaults to "8.0;9.0" when no GPU is visible
  CUDA_HOME                           toolkit root (the folder whose include/ holds cuda_runtime.h);
                                      found from nvcc on PATH and the usual places when unset
  MAX_JOBS                            parallel compile jobs (ninja)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("evolver_kernels_jit", ROOT / "evolver_kernels" / "kernels" / "jit.py")
jit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jit)


def _die(message: str) -> None:
    sys.stderr.write(f"\nevolver-kernels build error: {message}\n\n")
    raise SystemExit(1)


def _csrc(name: str) -> list[str]:
    return [f"csrc/{s}" for s in jit.SOURCES[name]]


def _extensions():
    cuda_home = jit.find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "evolver-kernels: torch is not importable in the build environment (pip's build isolation): no "
            "kernels are compiled now; they compile at first use against the torch that imports them (a C++ "
            "compiler is needed then). To compile now: pip install --no-build-isolation ."
        )
        return [], None
    problem = jit.cxx_compiler_problem()
    if problem:
        _die(problem)
    include_dirs = [str(ROOT / "csrc")]
    extensions = [
        CppExtension(
            "evolver_kernels._C",
            sources=_csrc("_C"),
            include_dirs=include_dirs + _record("_C"),
            extra_compile_args={"cxx": jit.cxx_flags()},
            extra_link_args=jit.LINK_FLAGS["_C"],
        )
    ]
    why_not = None
    if jit.flag("EVOLVER_KERNELS_SKIP_CUDA_BUILD"):
        why_not = "EVOLVER_KERNELS_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        why_not = "this torch build has no CUDA"
    elif os.environ.get("CUDA_HOME") is None:
        why_not = "no CUDA toolkit found (nvcc not on PATH and no CUDA_HOME with include/cuda_runtime.h)"
    if why_not:
        if jit.flag("EVOLVER_KERNELS_FORCE_CUDA_BUILD"):
            _die(f"EVOLVER_KERNELS_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {why_not}")
        print(f"evolver-kernels: skipping the CUDA extension ({why_not})")
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = jit.DEFAULT_CUDA_ARCHS
            print(f"evolver-kernels: no GPU visible, building for TORCH_CUDA_ARCH_LIST={jit.DEFAULT_CUDA_ARCHS}")
        extensions.append(
            CUDAExtension(
                "evolver_kernels._cuda",
                sources=_csrc("_cuda"),
                include_dirs=include_dirs + _record("_cuda") + jit.nvidia_includes(),
                extra_compile_args={"cxx": jit.CUDA_CXX_FLAGS, "nvcc": jit.NVCC_FLAGS},
            )
        )
    return extensions, BuildExtension


def _record(name: str) -> list[str]:
    """The include folder of extension `name`'s generated build record (build/generated/<name>/)."""
    directory = ROOT / "build" / "generated" / name
    jit.write_record_header(jit.record_of(name), directory)
    return [str(directory)]


ext_modules, build_ext = _extensions()


class BuildPy(build_py):
    """Ships the kernel sources (top-level csrc/) inside the package, for just-in-time builds."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "evolver_kernels"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "csrc", target / "csrc", dirs_exist_ok=True)  # for just-in-time builds


cmdclass = {"build_py": BuildPy}
if build_ext is not None:
    cmdclass["build_ext"] = build_ext.with_options(use_ninja=shutil.which("ninja") is not None)
setup(
    packages=find_packages(include=["evolver_kernels", "evolver_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
