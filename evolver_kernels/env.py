"""`python -m evolver_kernels.env` (console script `evolver-env`): what this installation runs on and why.

Versions (package, Python, torch with its CUDA, triton, transformers, safetensors, accelerate), compilers (C++,
nvcc), each extension (built at install time, compiled just in time, or why unavailable) with what the module
itself says it was compiled with (torch, CUDA, architectures, flags, OpenMP, compiler, the sources' hash), each backend on each visible device with the reason it cannot run and the one that would run,
the build switches in the environment, and the just-in-time cache. `--json` prints the same as JSON;
`--no-build` reports without compiling anything (a missing extension is then reported, not built).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

SWITCHES = (
    "EVOLVER_KERNELS_JIT",
    "EVOLVER_KERNELS_CACHE",
    "EVOLVER_KERNELS_SKIP_CUDA_BUILD",
    "EVOLVER_KERNELS_FORCE_CUDA_BUILD",
    "EVOLVER_KERNELS_PORTABLE",
    "TORCH_CUDA_ARCH_LIST",
    "CUDA_HOME",
    "MAX_JOBS",
    "TRITON_INTERPRET",
    "CXX",
)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _version_line(command: list[str], marker: str = "") -> str:
    """The line of `command`'s output holding `marker` (default: the first line)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({err})"
    lines = [line.strip() for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    return next((line for line in lines if marker in line), lines[0] if lines else "")


def _build_of(name: str) -> dict | str:
    """What extension `name` says it was compiled with: the loaded module's own report, else the record its
    installed binary carries (read, not loaded), else why there is none."""
    from evolver_kernels.kernels import backends, jit

    module = backends.loaded_extension(name)
    if module is not None:
        return jit.module_record(module)
    path = jit.module_file(name)
    if path is None:
        return "not compiled when the package was installed"
    return jit.embedded_record(path) or f"{path.name} carries no build record"


def report() -> dict:
    """Everything the command prints, as a dictionary."""
    import torch

    import evolver_kernels
    from evolver_kernels.kernels import backends, jit

    cxx = os.environ.get("CXX", "c++")
    cuda_home = jit.find_cuda_home()
    devices = ["cpu"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    extensions = {}
    for name in ("_C", "_cuda"):
        if name == "_cuda" and torch.version.cuda is None:
            extensions[name] = {"available": False, "status": "this torch build has no CUDA"}
            continue
        available, status = backends.extension_status(name)
        extensions[name] = {"available": available, "status": status, "build": _build_of(name)}
    per_device = {}
    for device in devices:
        rows = {name: (backends.unavailable_reason(name, device) or "available") for name in backends.BACKENDS}
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", backends.SlowBackendWarning)
                chosen = backends.resolve_backend(None, device)
        except backends.BackendUnavailableError as err:
            chosen = f"none ({err})"
        per_device[device] = {"backends": rows, "runs": chosen, "fastest": backends.PREFERENCE[device.split(":")[0]][0]}
    cache = jit.cache_root()
    return {
        "evolver-kernels": {
            "version": evolver_kernels.__version__,
            "location": os.path.dirname(evolver_kernels.__file__),
        },
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "gpus": [
                f"{torch.cuda.get_device_name(k)} (sm_{''.join(map(str, torch.cuda.get_device_capability(k)))})"
                for k in range(torch.cuda.device_count())
            ],
        },
        "packages": {p: _version(p) for p in ("triton", "transformers", "safetensors", "accelerate", "ninja")},
        "compilers": {
            "c++": _version_line([cxx, "--version"])
            if jit.cxx_compiler_problem() is None
            else jit.cxx_compiler_problem(),
            "nvcc": _version_line([os.path.join(cuda_home, "bin", "nvcc"), "--version"], "release")
            if cuda_home
            else "no CUDA toolkit found",
            "cuda_home": cuda_home,
        },
        "extensions": extensions,
        "devices": per_device,
        "switches": {k: os.environ[k] for k in SWITCHES if k in os.environ},
        "jit_cache": {"root": str(cache), "entries": sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []},
    }


def _text(doc: dict) -> str:
    lines = [
        f"evolver-kernels {doc['evolver-kernels']['version']} at {doc['evolver-kernels']['location']}",
        f"python {doc['python']}",
        f"platform {doc['platform']}",
        f"torch {doc['torch']['version']} (CUDA {doc['torch']['cuda']}); GPUs: {', '.join(doc['torch']['gpus']) or 'none'}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in doc["packages"].items()),
        f"c++: {doc['compilers']['c++']}",
        f"nvcc: {doc['compilers']['nvcc']}",
        "extensions:",
    ]
    for name, e in doc["extensions"].items():
        lines.append(f"  {name}: {'available' if e['available'] else 'UNAVAILABLE'} - {e['status']}")
        if "build" in e:
            lines.append(f"    built with: {json.dumps(e['build'])}")
    for device, d in doc["devices"].items():
        note = "" if d["runs"] == d["fastest"] else f"  <- the fastest, {d['fastest']}, is unavailable: see its line"
        lines.append(f"{device}: runs the {d['runs']} backend{note}")
        lines += [f"  {name}: {why}" for name, why in d["backends"].items()]
    lines.append("switches: " + (", ".join(f"{k}={v}" for k, v in doc["switches"].items()) or "none set"))
    lines.append(f"just-in-time cache: {doc['jit_cache']['root']} ({len(doc['jit_cache']['entries'])} builds)")
    lines += [f"  {entry}" for entry in doc["jit_cache"]["entries"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evolver_kernels.env", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-build", action="store_true", help="report without compiling missing kernels")
    args = parser.parse_args(argv)
    if args.no_build:
        os.environ["EVOLVER_KERNELS_JIT"] = "0"
    doc = report()
    print(json.dumps(doc, indent=2) if args.json else _text(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
