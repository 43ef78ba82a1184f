"""The weight side of a generation: offspring, merged candidates and accepted replacements, streamed in
chunks over the population's arenas through evolver_kernels.kernels.ops.

Memory: nothing here allocates a model-sized tensor. Offspring are written straight into the evaluation
arena (fitness "individual") or, for fitness "merged", recomputed chunk by chunk into chunk buffers, because
an offspring is a pure function of (x_i, x_r..., seed): there is no need to keep it.
"""

from __future__ import annotations

import torch

from evolver_kernels.evolve.strategies import OffspringSpec
from evolver_kernels.kernels.ops import de_mutate_crossover
from evolver_kernels.kernels.rng import STREAM_CROSSOVER
from evolver_kernels.methods.merger import Merger
from evolver_kernels.storage.arena import Arena
from evolver_kernels.storage.population import Population, ReadOnlyView
from evolver_kernels.storage.staging import Staging


class ChunkBuffers:
    """Reusable chunk-sized buffers per (dtype, role) on the compute device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict[tuple[torch.dtype, str], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, role: str, n: int) -> torch.Tensor:
        key = (dtype, role)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._bufs[key] = buf
        return buf[:n]


class WeightPipeline:
    """Chunked operators over a population, on `device`, `chunk` elements at a time."""

    def __init__(
        self,
        population: Population,
        device: torch.device,
        chunk: int = 1 << 22,
        backend: str | None = None,
        merger: Merger | None = None,
        staging: bool | None = None,
    ):
        self.pop = population
        self.device = torch.device(device)
        self.chunk = chunk
        self.backend = backend
        self.merger = merger or Merger("average")
        self.buffers = ChunkBuffers(self.device)
        # reads of a population off the compute device are double-buffered (staging.py); None: on a GPU only
        self.staging = Staging(population, self.device, staging)

    def read(self, k: int, group: str, lo: int, hi: int, device: torch.device | None = None) -> torch.Tensor:
        """Chunk [lo, hi) of individual k on `device` (default: the compute device, through the staging)."""
        if device is None or device == self.device:
            return self.staging.read(k, group, lo, hi)
        return self.pop.read(k, group, lo, hi).to(device, non_blocking=True)

    @staticmethod
    def reads_of(specs, group: str, lo: int, hi: int) -> list[tuple[int, str, int, int]]:
        """The reads that building these offspring's chunk [lo, hi) of `group` makes (for the staging)."""
        return [(k, group, lo, hi) for spec in specs for k in (spec.i, *spec.roles())]

    def offspring_chunk(self, spec: OffspringSpec, group: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Chunk [lo, hi) of `group` of offspring spec.i, written into `out` (on the device `out` is on)."""
        base_index = self.pop.layout.groups[group][0]
        tensors = {spec.i: self.read(spec.i, group, lo, hi, out.device)}
        ib, ia, ibb = spec.roles()
        for k in (ib, ia, ibb):  # one read per individual: a role held by x_i passes x_i's own tensor object,
            if k not in tensors:  # which the kernels detect and read once (the evolver strategy reads 2 tensors)
                tensors[k] = self.read(k, group, lo, hi, out.device)
        return de_mutate_crossover(
            tensors[spec.i],
            tensors[ib],
            tensors[ia],
            tensors[ibb],
            F=spec.F,
            CR=spec.CR,
            seed=spec.seed,
            stream=STREAM_CROSSOVER,
            offset=base_index + lo,
            out=out,
            backend=self.backend,
        )

    def offspring_into(self, spec: OffspringSpec, arena: Arena) -> None:
        """Writes offspring spec.i into `arena` (the evaluation model's own arena; for a placed arena, each
        chunk computed on the device that holds it)."""
        for group, (_, size) in self.pop.layout.groups.items():
            if arena.is_placed:
                for lo, hi, dst in arena.chunks(group, self.chunk):
                    self.offspring_chunk(spec, group, lo, hi, dst)
                continue
            for lo, hi in self.staging.chunks(
                size, self.chunk, lambda lo, hi, g=group: self.reads_of([spec], g, lo, hi)
            ):
                self.offspring_chunk(spec, group, lo, hi, arena.buffers[group][lo:hi])

    def merged_into(self, arena: Arena, replace: list[OffspringSpec] = ()) -> None:
        """arena = the merge (self.merger; the simple average by default) of the population, each slot spec.i
        holding that offspring for the specs in `replace` (all computed from the population as it is now).

        The offspring are recomputed chunk by chunk as the merge reads them, and the merge is a pure function
        of what it reads (fp32 sums in slot order, one rounding): rejecting an offspring needs no undo, and
        the same state always gives the same bits.
        """
        self.merger(CandidateView(self, replace), arena, chunk=self.chunk)

    def copy_into(self, k: int, arena: Arena) -> None:
        """arena = individual k."""
        self.pop.copy_into(k, arena, self.chunk)

    def apply(self, specs: list[OffspringSpec]) -> None:
        """Replaces each specs[j].i by its offspring, all computed from the population as it is now
        (so offspring that read each other's parents, as in the synchronous schedule, are unaffected by
        the order of the writes)."""
        if not specs:
            return
        if self.pop.writes:  # else the node's writer writes them (node_share.py); cached terms are stale all the same
            self._write_offspring(specs)
        for spec in specs:
            self.merger.changed(spec.i)

    def _write_offspring(self, specs: list[OffspringSpec]) -> None:
        for spec in specs:
            self.pop.begin_write(spec.i)
        for group, (_, size) in self.pop.layout.groups.items():
            dtype = self.pop.layout.group_dtype(group)
            for lo, hi in self.staging.chunks(
                size, self.chunk, lambda lo, hi, g=group: self.reads_of(specs, g, lo, hi)
            ):
                chunks = [
                    self.offspring_chunk(spec, group, lo, hi, self.buffers.get(dtype, f"apply{j}", hi - lo))
                    for j, spec in enumerate(specs)
                ]
                for spec, values in zip(specs, chunks):
                    self.pop.write(spec.i, group, lo, values)
        for spec in specs:
            self.pop.commit_write(spec.i)

    def write_from(self, i: int, arena: Arena) -> None:
        """Replaces individual i by the contents of `arena` (an accepted offspring already built there)."""
        if self.pop.writes:  # else the node's writer writes it (node_share.py)
            self.pop.begin_write(i)
            for group in self.pop.layout.groups:
                for lo, _, values in arena.chunks(group, self.chunk):
                    self.pop.write(i, group, lo, values)
            self.pop.commit_write(i)
        self.merger.changed(i)


class CandidateView(ReadOnlyView):
    """The population as a merge sees it with offspring in some slots: a read-only Population whose reads of
    slot spec.i return that offspring, computed on the fly into a reusable buffer (`replaced` names those slots,
    `stored` the population underneath), and whose chunks stage the next chunk's reads."""

    def __init__(self, pipeline: WeightPipeline, replace: list[OffspringSpec]):
        self.pipeline = pipeline
        self.layout = pipeline.pop.layout
        self.size = pipeline.pop.size
        self.offspring = {spec.i: spec for spec in replace}

    @property
    def stored(self) -> Population:
        return self.pipeline.pop

    @property
    def replaced(self) -> frozenset[int]:
        return frozenset(self.offspring)

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        if i not in self.offspring:
            return self.pipeline.read(i, group, lo, hi)
        buf = self.pipeline.buffers.get(self.layout.group_dtype(group), f"u{i}", hi - lo)
        return self.pipeline.offspring_chunk(self.offspring[i], group, lo, hi, buf)

    def chunks(self, group: str, size: int, chunk: int):
        def keys(lo, hi):
            return [
                key
                for k in range(self.size)
                for key in (
                    self.pipeline.reads_of([self.offspring[k]], group, lo, hi)
                    if k in self.offspring
                    else [(k, group, lo, hi)]
                )
            ]

        return self.pipeline.staging.chunks(size, chunk, keys)
