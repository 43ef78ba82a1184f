"""Population storage tiers behind one interface (shared/DESIGN.md section 5).

Tiers (the names of --population-on): "gpu" (every individual in device memory), "cpu" (host memory,
pinned when a GPU computes; chunks are copied to the compute device), "disk" (safetensors files read
through memory maps; not implemented yet, see `make_population`).

Individuals are arenas (evolver_kernels.arena). Readers take chunks of a dtype group; writers replace
an individual chunk by chunk between begin_write and commit_write, so a tier that writes files can make
the replacement atomic. On the memory tiers a chunk read is a view: no copy.
"""

from __future__ import annotations

import abc
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arena import Arena, Layout, load_into

TIERS = ("gpu", "cpu", "disk")


class Population(abc.ABC):
    layout: Layout
    size: int

    @abc.abstractmethod
    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of individual i's `group` buffer. May be a view: do not write into it."""

    def begin_write(self, i: int) -> None:  # noqa: B027 - optional hook
        """Starts replacing individual i; every element of every group is then written once."""

    @abc.abstractmethod
    def write(self, i: int, group: str, lo: int, values: torch.Tensor) -> None:
        """Stores `values` as elements [lo, lo + len) of individual i's `group` buffer."""

    def commit_write(self, i: int) -> None:  # noqa: B027 - optional hook
        """Makes the replacement of individual i visible (atomically, on tiers that write files)."""

    @abc.abstractmethod
    def save(self, i: int, path: str) -> None:
        """Writes individual i as a flat safetensors file (one tensor per group), atomically."""

    @abc.abstractmethod
    def load(self, i: int, path: str) -> None:
        """Reads individual i back from a file written by save()."""


class MemoryPopulation(Population):
    """The gpu and cpu tiers: N arenas resident on `storage_device`."""

    def __init__(self, layout: Layout, size: int, storage_device: torch.device | str, pin_memory: bool = False):
        self.layout = layout
        self.size = size
        self.storage_device = torch.device(storage_device)
        self.arenas = [Arena.empty(layout, self.storage_device, pin_memory=pin_memory) for _ in range(size)]

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        return self.arenas[i].buffers[group][lo:hi]

    def write(self, i: int, group: str, lo: int, values: torch.Tensor) -> None:
        dst = self.arenas[i].buffers[group][lo : lo + values.numel()]
        if dst.data_ptr() != values.data_ptr():
            dst.copy_(values, non_blocking=True)

    def save(self, i: int, path: str) -> None:
        save_flat(self.arenas[i], path)

    def load(self, i: int, path: str) -> None:
        load_flat(self.arenas[i], path)


def save_flat(arena: Arena, path: str) -> None:
    """Atomic write of an arena as safetensors (one tensor per group) with the layout's fingerprint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {g: buf.detach().cpu() for g, buf in arena.buffers.items()}
    save_file(tensors, tmp, metadata={"layout": str(hash_layout(arena.layout))})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_flat(arena: Arena, path: str) -> None:
    with safe_open(path, framework="pt", device="cpu") as f:
        if f.metadata().get("layout") != str(hash_layout(arena.layout)):
            raise ValueError(f"{path}: written for another model layout")
        for g, buf in arena.buffers.items():
            buf.copy_(f.get_tensor(g))


def hash_layout(layout: Layout) -> str:
    import hashlib

    return hashlib.sha256(layout.fingerprint().encode()).hexdigest()[:16]


def make_population(
    tier: str, layout: Layout, model_files: list[list[str]], sources: list[str], compute_device: torch.device
) -> Population:
    """A population of len(model_files) individuals on `tier`, loaded tensor by tensor from safetensors."""
    if tier not in TIERS:
        raise ValueError(f"--population-on must be one of {', '.join(TIERS)}, got {tier!r}")
    if tier == "disk":
        raise NotImplementedError(
            "--population-on disk is not implemented yet (planned: safetensors files through memory maps); "
            "use gpu or cpu"
        )
    if tier == "gpu":
        storage = compute_device
    else:
        storage = torch.device("cpu")
    pin = tier == "cpu" and compute_device.type == "cuda"
    pop = MemoryPopulation(layout, len(model_files), storage, pin_memory=pin)
    for i, (files, source) in enumerate(zip(model_files, sources)):
        load_into(pop.arenas[i], files, source)
    return pop
