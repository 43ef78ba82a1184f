"""Which backends run on which device, and why the others do not.

Backends (docs/ARCHITECTURE.md §3): "reference" (pure PyTorch), "cpu" (C++/OpenMP extension
evolver_kernels._C), "triton" (on a GPU, or on the CPU under TRITON_INTERPRET=1), "cuda" (CUDA C++
extension evolver_kernels._cuda). The compiled extensions and Triton are imported lazily, once; an extension
missing or built against another torch is compiled just in time (jit.py). When the fastest backend of a device
cannot run, the slower one that does run says so once per process (SlowBackendWarning): why, the cost, the fix.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was named that cannot run here; the message says why."""


@functools.cache
def _import(module: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"


@functools.cache
def _extension(name: str) -> tuple[ModuleType | None, str, str]:
    """(module, why it is unavailable, how it was obtained) for extension `name` ("_C" or "_cuda"): the one
    built at install time when it matches the running torch, else one compiled just in time (jit.py)."""
    from evolver_kernels.kernels import jit

    stale = jit.stale_reason(name)
    if stale is None:
        module, error = _import(f"evolver_kernels.{name}")
        if module is not None:
            return module, "", "built at install time"
        why = f"evolver_kernels.{name} did not import ({error})"
    else:
        why = f"the installed evolver_kernels.{name} is not used: {stale}"
    problem = jit.jit_problem(name)
    if problem is not None:
        return None, f"{why}; no just-in-time build: {problem}", ""
    try:
        module = jit.build(name, log=lambda message: print(message, file=sys.stderr, flush=True))
    except RuntimeError as err:
        return None, f"{why}; {err}", ""
    return module, "", f"compiled just in time ({why}) into {jit.cache_dir(name)}"


def extension_status(name: str) -> tuple[bool, str]:
    """(available, a sentence: how it was obtained, or why it is unavailable) for "_C" or "_cuda"."""
    if name == "_cuda":
        cpu_extension()
    module, why, how = _extension(name)
    return module is not None, how if module is not None else why


def loaded_extension(name: str) -> ModuleType | None:
    """Extension `name` ("_C" or "_cuda") as extension_status obtained it, or None."""
    return _extension(name)[0]


def cpu_extension() -> ModuleType | None:
    """evolver_kernels._C (registers torch.ops.evolver_kernels.* with their CPU kernels), or None."""
    return _extension("_C")[0]


def cuda_extension() -> ModuleType | None:
    """evolver_kernels._cuda (adds the CUDA kernels to the same ops), or None."""
    if cpu_extension() is None:  # the op schemas live in _C
        return None
    return _extension("_cuda")[0]


def triton_kernels() -> ModuleType | None:
    return _import("evolver_kernels.kernels.triton")[0]


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; the backends are {', '.join(BACKENDS)}"
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} is not supported (cpu and cuda are)"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device}"
        if cpu_extension() is None:
            return f"the C++ extension is unavailable: {_extension('_C')[1]}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU"
        if cpu_extension() is None:
            return f"the C++ extension is unavailable: {_extension('_C')[1]}"
        if cuda_extension() is None:
            return f"the CUDA extension is unavailable: {_extension('_cuda')[1]}"
        return None
    # triton
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before evolver_kernels is used)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    module = triton_kernels()
    if module is None:
        return f"triton did not import ({_import('evolver_kernels.kernels.triton')[1]})"
    if device.type == "cpu" and not module.INTERPRETED:
        return "the Triton kernels were defined before TRITON_INTERPRET=1 was set; set it before the first use"
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on `device`, in the order reference, cpu, triton, cuda."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend to run: the named one (raising, with the reason, if it cannot run) or the fastest available."""
    device = torch.device(device)
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
        reason = unavailable_reason(backend, device)
        if reason is not None:
            if backend not in BACKENDS:
                raise ValueError(f"backend: {reason}")
            raise BackendUnavailableError(f"backend {backend!r} is unavailable on {device}: {reason}")
        return backend
    preference = PREFERENCE[device.type]
    for name in preference:
        if unavailable_reason(name, device) is None:
            if name != preference[0]:
                warn_slower(device, preference[0], name)
            return name
    raise BackendUnavailableError(f"no backend can run on {device}: {unavailable_reason('reference', device)}")


PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# what running the fallback instead of the fastest backend costs, as measured (benchmarks/RESULTS.md) or expected
COST = {
    ("cpu", "reference"): "about 500x slower (de_mutate_crossover on 2**22 fp32 elements: 2.7 s instead of ~5 ms)",
    ("cuda", "triton"): "expected within ~10% of the CUDA kernels (not measured on a GPU yet)",
    ("cuda", "reference"): "many times slower (unfused PyTorch: several passes over the weights, temporaries)",
}


class SlowBackendWarning(RuntimeWarning):
    """The fastest backend of a device is unavailable and a slower one runs instead."""


_warned: set[str] = set()


def warn_slower(device: torch.device, best: str, used: str) -> None:
    """Warns once per process and device type that `used` runs because `best` cannot: why, the cost, the fix."""
    if device.type in _warned:
        return
    _warned.add(device.type)
    warnings.warn(
        f"evolver-kernels: the {best} backend is unavailable on {device.type} ({unavailable_reason(best, device)}); "
        f"running the {used} backend instead, {COST.get((device.type, used), 'slower')}. Fix: install a C++ "
        "compiler (and the CUDA toolkit for the cuda backend) so the kernels compile at first use, or reinstall "
        "with `pip install --no-build-isolation .` against this torch; `python -m evolver_kernels.env` shows "
        "every backend and why",
        SlowBackendWarning,
        stacklevel=3,
    )


def device_backends(devices, backend: str | None = None) -> dict[str, str]:
    """The backend each device runs (for the plans of evolve and merge, evolution.json and merge.json)."""
    return {str(d): resolve_backend(backend, d) for d in dict.fromkeys(str(d) for d in devices)}
