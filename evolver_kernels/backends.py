"""Which backends run on which device, and why the others do not.

Backends (docs/ARCHITECTURE.md §3): "reference" (pure PyTorch), "cpu" (C++/OpenMP extension
evolver_kernels._C), "triton" (on a GPU, or on the CPU under TRITON_INTERPRET=1), "cuda" (CUDA C++
extension evolver_kernels._cuda). The compiled extensions and Triton are imported lazily, once.
"""

from __future__ import annotations

import functools
import importlib
import os
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


def cpu_extension() -> ModuleType | None:
    """evolver_kernels._C (registers torch.ops.evolver_kernels.* with their CPU kernels), or None."""
    return _import("evolver_kernels._C")[0]


def cuda_extension() -> ModuleType | None:
    """evolver_kernels._cuda (adds the CUDA kernels to the same ops), or None."""
    cpu_extension()  # the op schemas live in _C
    return _import("evolver_kernels._cuda")[0]


def triton_kernels() -> ModuleType | None:
    return _import("evolver_kernels.triton_kernels")[0]


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
            return (
                f"the C++ extension evolver_kernels._C did not import ({_import('evolver_kernels._C')[1]}); "
                "rebuild it with `pip install --no-build-isolation -e .`"
            )
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU"
        if cpu_extension() is None or cuda_extension() is None:
            reason = _import("evolver_kernels._C")[1] or _import("evolver_kernels._cuda")[1]
            return (
                f"the CUDA extension evolver_kernels._cuda did not import ({reason}); it is built when torch has "
                "CUDA and nvcc is found, unless EVOLVER_KERNELS_SKIP_CUDA_BUILD is set"
            )
        return None
    # triton
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before evolver_kernels is used)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    module = triton_kernels()
    if module is None:
        return f"triton did not import ({_import('evolver_kernels.triton_kernels')[1]})"
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
    preference = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in preference:
        if unavailable_reason(name, device) is None:
            return name
    raise BackendUnavailableError(f"no backend can run on {device}: {unavailable_reason('reference', device)}")
