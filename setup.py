"""Builds evolver_kernels._C (C++/OpenMP, always) and evolver_kernels._cuda (when torch has CUDA and nvcc exists).

Switches (environment variables):
  EVOLVER_KERNELS_SKIP_CUDA_BUILD=1   never build the CUDA extension
  EVOLVER_KERNELS_FORCE_CUDA_BUILD=1  fail instead of skipping when the CUDA extension cannot be built
  EVOLVER_KERNELS_PORTABLE=1          no -march=native for the CPU extension (for binaries moved between CPUs)
  TORCH_CUDA_ARCH_LIST                CUDA architectures; defaults to "8.0;9.0" when no GPU is visible
  CUDA_HOME                           toolkit root (the folder whose include/ holds cuda_runtime.h);
                                      found from nvcc on PATH and the usual places when unset
  MAX_JOBS                            parallel compile jobs (ninja)

Build with `pip install --no-build-isolation .`: the extension must be compiled against the installed torch.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _die(message: str) -> None:
    sys.stderr.write(f"\nevolver-kernels build error: {message}\n\n")
    raise SystemExit(1)


def _find_cuda_home() -> str | None:
    """The real toolkit root. A wrapper script named nvcc makes torch guess its parent's parent, which is wrong."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # a shell wrapper: `exec /path/to/real/nvcc "$@"`
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for token in text.split():
                if token.endswith("/nvcc") and Path(token).exists():
                    candidates.append(str(Path(token).resolve().parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if cand and (Path(cand) / "include" / "cuda_runtime.h").exists() and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand).resolve())
    return None


def _check_cxx_compiler() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _die(f"no C++ compiler found ('{cxx}' is not on PATH). Install one (Debian: apt-get install g++) or set CXX.")
    try:
        subprocess.run([cxx, "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        _die(f"the C++ compiler '{cxx}' does not run: {err}")


def _torch_nvidia_includes() -> list[str]:
    """site-packages/nvidia/*/include of the torch install (CUDA headers shipped as wheels)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(dirs))


def _want_cuda(torch_module) -> tuple[bool, str]:
    if _flag("EVOLVER_KERNELS_SKIP_CUDA_BUILD"):
        return False, "EVOLVER_KERNELS_SKIP_CUDA_BUILD is set"
    if torch_module.version.cuda is None:
        return False, "this torch build has no CUDA"
    if os.environ.get("CUDA_HOME") is None:
        return False, "no CUDA toolkit found (nvcc not on PATH and no CUDA_HOME with include/cuda_runtime.h)"
    return True, ""


def _extensions():
    _check_cxx_compiler()
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _die(
            "torch is not installed in this environment. Install it first (pip install torch), then build "
            "with `pip install --no-build-isolation .` so the extension compiles against that torch."
        )

    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall"]
    if not _flag("EVOLVER_KERNELS_PORTABLE"):
        cxx_flags.append("-march=native")
    include_dirs = [str(ROOT / "csrc")]
    extensions = [
        CppExtension(
            "evolver_kernels._C",
            sources=["csrc/ops.cpp", "csrc/cpu/de_cpu.cpp", "csrc/cpu/merge_cpu.cpp"],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    want, why_not = _want_cuda(torch)
    if not want:
        if _flag("EVOLVER_KERNELS_FORCE_CUDA_BUILD"):
            _die(f"EVOLVER_KERNELS_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {why_not}")
        print(f"evolver-kernels: skipping the CUDA extension ({why_not})")
        return extensions, BuildExtension
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"evolver-kernels: no GPU visible, building for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
    extensions.append(
        CUDAExtension(
            "evolver_kernels._cuda",
            sources=["csrc/cuda/bind_cuda.cpp", "csrc/cuda/de_cuda.cu", "csrc/cuda/merge_cuda.cu"],
            include_dirs=include_dirs + _torch_nvidia_includes(),
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", "--fmad=false", "-lineinfo"],
            },
        )
    )
    return extensions, BuildExtension


ext_modules, build_ext = _extensions()

setup(
    packages=find_packages(include=["evolver_kernels", "evolver_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=shutil.which("ninja") is not None)},
)
