"""The compiled extensions, defined once for both ways they are built: ahead of time by setup.py (`pip install
--no-build-isolation .`), or just in time at first use against the torch that imports them.

Each build writes what it is built against (torch version, CUDA version, architectures, flags, a hash of the
sources: `record_of`) into a generated header, so the compiled module carries its own record (csrc/module.h:
`build_record()`, `openmp`, `compiler`); `embedded_record` reads it from the binary without loading it. At
import (backends.py), an extension that is missing, fails to import, or was built against another torch is not
used: it is compiled just in time with
torch.utils.cpp_extension (ninja), into a cache directory keyed by torch version, CUDA version, architectures,
flags and sources (EVOLVER_KERNELS_CACHE, default ~/.cache/evolver_kernels), so each combination compiles once
per machine; where no compiler is present the reason is reported. EVOLVER_KERNELS_JIT=0 (or false, no, off)
turns this off.

This module imports only the standard library at the top: setup.py loads it by path before the package exists.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # evolver_kernels/
# the sources: the copy a wheel ships inside the package, else the source tree's top-level csrc/ (editable installs)
CSRC = PACKAGE / "csrc" if (PACKAGE / "csrc").is_dir() else PACKAGE.parent / "csrc"
MARKER = b"EVOLVER_KERNELS_BUILD_RECORD="  # csrc/module.h
RECORD_HEADER = "evolver_build_record.h"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# sources relative to CSRC, per extension (module name -> sources)
SOURCES = {
    "_C": [
        "ops.cpp",
        "cpu/de_cpu.cpp",
        "cpu/merge_cpu.cpp",
        "cpu/select_cpu.cpp",
        "cpu/rescale_cpu.cpp",
        "cpu/gram_cpu.cpp",
    ],
    "_cuda": ["cuda/bind_cuda.cpp", "cuda/de_cuda.cu", "cuda/merge_cuda.cu"],
}


SWITCH_VALUES = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def flag(name: str, default: bool = False) -> bool:
    """An on/off environment switch: 1/true/yes/on or 0/false/no/off (any case); unset or empty: `default`."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in SWITCH_VALUES:
        raise ValueError(f"{name}={os.environ[name]!r}: give 1/true/yes/on or 0/false/no/off")
    return SWITCH_VALUES[value]


def cxx_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall"]
    if not flag("EVOLVER_KERNELS_PORTABLE"):
        flags.append("-march=native")
    return flags


CUDA_CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]
LINK_FLAGS = {"_C": ["-fopenmp"], "_cuda": []}


def find_cuda_home() -> str | None:
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


def nvidia_includes() -> list[str]:
    """site-packages/nvidia/*/include of the torch install (CUDA headers shipped as wheels)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(dirs))


def cxx_compiler_problem() -> str | None:
    """Why no C++ compiler can build the extensions, or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ('{cxx}' is not on PATH; Debian: apt-get install g++, or set CXX)"
    try:
        subprocess.run([cxx, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"the C++ compiler '{cxx}' does not run ({err})"
    return None


def sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(CSRC)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cuda_archs() -> str:
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        majors = {torch.cuda.get_device_capability(k) for k in range(torch.cuda.device_count())}
        return ";".join(f"{a}.{b}" for a, b in sorted(majors))
    return DEFAULT_CUDA_ARCHS


def record_of(extension: str) -> dict:
    """What a build of `extension` now would be built against: the record it carries and the cache key."""
    import torch

    cuda = extension == "_cuda"
    return {
        "extension": extension,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_archs": cuda_archs() if cuda else None,
        "flags": {"cxx": CUDA_CXX_FLAGS, "nvcc": NVCC_FLAGS} if cuda else {"cxx": cxx_flags()},
        "sources": sources_hash(),
    }


def write_record_header(record: dict, directory: Path) -> Path:
    """`directory`/evolver_build_record.h defining the record as a C string (JSON escapes are C escapes)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, sort_keys=True)
    header = directory / RECORD_HEADER
    header.write_text(
        f"// generated by evolver_kernels/kernels/jit.py\n#define EVOLVER_KERNELS_BUILD_RECORD {json.dumps(text)}\n"
    )
    return header


def module_file(extension: str) -> Path | None:
    """The installed binary of `extension` (found, not loaded), or None."""
    import importlib.machinery

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE / f"{extension}{suffix}"
        if path.is_file():
            return path
    return None


def embedded_record(path: Path) -> dict | None:
    """The build record a compiled module carries (csrc/module.h), read from its bytes; None without one. The
    file is searched through a read-only map: a merge that only asks whether the module is current holds no copy
    of its ~12 MB in memory."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.find(MARKER + b"{")
        if at < 0:
            return None
        end = data.find(b"\0", at)
        record = data[at + len(MARKER) : end]
    try:
        return json.loads(record)
    except ValueError:
        return None


def module_record(module) -> dict:
    """What a loaded extension says it was compiled with: its record, OpenMP version and compiler."""
    return {**json.loads(module.build_record()[len(MARKER) :]), "openmp": module.openmp, "compiler": module.compiler}


def stale_reason(extension: str) -> str | None:
    """Why the installed `extension` must not be used with the running torch, or None when it may; asked of the
    binary itself (its embedded record), before it is loaded."""
    import torch

    path = module_file(extension)
    if path is None:
        return "it was not built when the package was installed"
    info = embedded_record(path)
    if info is None:
        return f"{path.name} carries no build record (built by another version of evolver-kernels)"
    if info.get("torch") != torch.__version__:
        return f"it was built against torch {info.get('torch')}, this is torch {torch.__version__}"
    if info.get("cuda") != torch.version.cuda:
        return f"it was built against CUDA {info.get('cuda')}, this torch has CUDA {torch.version.cuda}"
    if CSRC.is_dir() and info.get("sources") != sources_hash():
        return f"it was built from other sources than {CSRC} holds now (reinstall, or let it compile just in time)"
    return None


def cache_root() -> Path:
    return Path(os.environ.get("EVOLVER_KERNELS_CACHE") or Path.home() / ".cache" / "evolver_kernels")


def cache_dir(extension: str, record: dict | None = None) -> Path:
    """The just-in-time build directory of `extension` for the running torch, flags and sources (`record`:
    record_of(extension), when the caller has it)."""
    info = record or record_of(extension)
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    torch_tag = str(info["torch"]).replace("+", "_")
    return cache_root() / f"{extension}-torch{torch_tag}-{key}"


def jit_problem(extension: str) -> str | None:
    """Why `extension` cannot be compiled just in time here, or None."""
    if not flag("EVOLVER_KERNELS_JIT", default=True):
        return f"just-in-time builds are off (EVOLVER_KERNELS_JIT={os.environ['EVOLVER_KERNELS_JIT']})"
    if not (CSRC / SOURCES[extension][0]).exists():
        return f"the kernel sources are not installed ({CSRC} is missing)"
    problem = cxx_compiler_problem()
    if problem:
        return problem
    if extension == "_cuda":
        import torch

        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if flag("EVOLVER_KERNELS_SKIP_CUDA_BUILD"):
            return "EVOLVER_KERNELS_SKIP_CUDA_BUILD is set"
        if find_cuda_home() is None:
            return "no CUDA toolkit found (nvcc not on PATH and no CUDA_HOME with include/cuda_runtime.h)"
    return None


def build(extension: str, log=None):
    """Compiles `extension` against the running torch into its cache directory (once; later calls load it)
    and imports it. Raises RuntimeError with the compiler's complaint when the build fails."""
    from torch.utils.cpp_extension import load

    record = record_of(extension)  # what the module will carry, and its cache directory's key
    directory = cache_dir(extension, record)
    directory.mkdir(parents=True, exist_ok=True)
    if log is not None and not any(directory.glob("*.so")):
        log(
            f"evolver-kernels: compiling the {extension} kernels for torch {record['torch']} "
            f"(once; cached in {directory})"
        )
    generated = directory / "generated"
    kw = {}
    if extension == "_cuda":
        os.environ["CUDA_HOME"] = find_cuda_home() or os.environ.get("CUDA_HOME", "")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_archs())
        kw = {
            "extra_cuda_cflags": NVCC_FLAGS,
            "extra_include_paths": [str(CSRC), str(generated)] + nvidia_includes(),
            "extra_cflags": CUDA_CXX_FLAGS,
        }
    else:
        kw = {"extra_include_paths": [str(CSRC), str(generated)], "extra_cflags": cxx_flags()}
    write_record_header(record, generated)
    try:
        return load(
            name=extension,
            sources=[str(CSRC / s) for s in SOURCES[extension]],
            extra_ldflags=LINK_FLAGS[extension],
            build_directory=str(directory),
            verbose=False,
            **kw,
        )
    except Exception as err:  # the compiler's or the loader's complaint, as the reason
        raise RuntimeError(
            f"the just-in-time build of {extension} in {directory} failed: {' '.join(str(err).split())[-400:]}"
        ) from None
