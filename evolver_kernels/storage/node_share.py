"""The population held once per node under torchrun (docs/ARCHITECTURE.md §6).

With several ranks, a population in host memory (`--population-on cpu`, or `gpu` where there is no GPU) lives
in shared memory: a fresh scratch directory under $EVOLVER_SHM_DIR (default /dev/shm) that the node's local
rank 0, its writer, creates and fills with the models; every other local rank maps the same files
(population.SharedMemoryPopulation). The disk tier is one set of files per node the same way, under
--population-dir (default --out). The writer alone writes: the initial individuals past the models, the
checkpoint's individuals on --resume, and after each generation's decisions the accepted offspring; the other
ranks skip those writes (they would be the same bytes) and read the new ones after a barrier. Across nodes,
each node holds its copy and every node applies the same decisions. A population on GPUs stays one copy per
rank, on its own GPU.

Scratch directories are rundir.Scratch: locked while the writer lives, removed by it on every exit path it
survives; a killed run's leftovers are removed by the next run that makes one under the same root.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable

import torch

from evolver_kernels.distributed import Ranks
from evolver_kernels.io import rundir
from evolver_kernels.storage.population import Population


def shm_root() -> str:
    """Where shared-memory populations go: $EVOLVER_SHM_DIR, else /dev/shm (a tmpfs on Linux), else the
    temporary directory."""
    root = os.environ.get("EVOLVER_SHM_DIR")
    if root:
        return root
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def shared(tier: str, device: torch.device, ranks: Ranks) -> bool:
    """Whether the run's population is held once per node: with ranks, on disk or in host memory."""
    return ranks.enabled and (tier in ("cpu", "disk") or device.type == "cpu")


class NodePopulation:
    """Creates a node's shared population and keeps its ranks in step with its writer."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.scratch: rundir.Scratch | None = None

    def root(self, parent: str, option: str) -> str:
        """The node's scratch directory under `parent`: made by the writer, its path sent to the node's ranks."""
        if self.ranks.node_writer:
            self.scratch = rundir.Scratch(parent, option)
        paths = self.ranks.gather({self.ranks.rank: (self.ranks.node_key, self.scratch.path if self.scratch else None)})
        return next(path for node, path in paths.values() if node == self.ranks.node_key and path)

    def create(self, make: Callable[[str, bool], Population], parent: str, option: str) -> Population:
        """make(scratch directory, writes) builds the population: first on the writer (which loads the models),
        then, after a barrier, on the other ranks (which map what it wrote)."""
        root = self.root(parent, option)
        pop = make(root, True) if self.ranks.node_writer else None
        self.ranks.barrier()
        return pop if pop is not None else make(root, False)

    def sync(self, pop: Population, changed: Iterable[int]) -> None:
        """After the writer's writes (of individuals `changed`): every rank waits for them and reads them anew."""
        self.ranks.barrier()
        pop.refresh(list(changed))

    def remove(self) -> None:
        if self.scratch is not None:
            self.scratch.remove()
