"""A merge's output written in place: the safetensors shards created before the merge in a working directory on the
output's filesystem (their headers written, their space allocated), and mapped MAP_SHARED, so that the merge
writes each merged tensor straight into the output file's pages. Before, the merge wrote a scratch copy of the
whole model and then copied it into the output: every byte of the output was written to the disk twice.

The files are byte for byte what io/shards.write_shards writes for the same specs (the same header, tensors in
the same order). commit() copies in the tensors the merge did not write (the source's stored buffers) and moves
each shard to its name in the output directory (a rename: nothing is copied); remove() takes back every file it
made (a failed or interrupted merge leaves none).
"""

from __future__ import annotations

import os

import torch

from evolver_kernels.io import shards
from evolver_kernels.storage.arena import Arena, Entry, Layout

Spec = tuple[str, torch.dtype, tuple[int, ...]]


class MappedOutput:
    """The shards of `specs` (shards.plan_shards with `shard_bytes`) for `out_dir`, made in `work_dir` (a directory
    of the run's own on out_dir's filesystem) and mapped."""

    def __init__(self, out_dir: str, work_dir: str, specs: list[Spec], shard_bytes: int = 2 << 30):
        self.out_dir, self.specs = out_dir, list(specs)
        self.plan = shards.plan_shards(self.specs, shard_bytes)
        self._tmp: list[str] = []
        self._maps: list[torch.Tensor] = []  # per shard: the whole file as uint8
        self._at: dict[str, tuple[int, int, int]] = {}  # name -> (shard, first byte, end byte) in its file
        self._placed: set[str] = set()  # the names an arena of ours holds (written by the merge)
        try:
            for fname, shard in self.plan:
                head, ranges = shards.safetensors_header(shard, shards.SAFETENSORS_METADATA)
                total = len(head) + max((end for _, end in ranges.values()), default=0)
                tmp = os.path.join(work_dir, fname)
                with open(tmp, "wb") as f:
                    self._tmp.append(tmp)
                    f.write(head)
                    if hasattr(os, "posix_fallocate"):  # a full disk is an error now, not a SIGBUS later
                        os.posix_fallocate(f.fileno(), 0, total)
                    else:
                        f.truncate(total)
                self._maps.append(torch.from_file(tmp, shared=True, size=total, dtype=torch.uint8))
                for name, (a, b) in ranges.items():
                    self._at[name] = (len(self._maps) - 1, len(head) + a, len(head) + b)
        except BaseException:
            self.remove()
            raise

    def _bytes(self, name: str) -> torch.Tensor:
        shard, a, b = self._at[name]
        return self._maps[shard][a:b]

    def arena(self, layout: Layout, keyed: dict[str, Entry]) -> Arena | None:
        """An arena of `layout` whose entries are the output's tensors (keyed: output name -> entry; every entry
        once), each a view of its bytes in the mapped shard; None where one cannot be (an entry missing, empty,
        of another dtype or shape than its spec, or not aligned to its element size in the file)."""
        specs = {name: (dtype, shape) for name, dtype, shape in self.specs}
        if len(keyed) != len(layout.entries) or len({e.name for e in keyed.values()}) != len(layout.entries):
            return None
        segments: dict[str, list[tuple[int, int, torch.Tensor]]] = {g: [] for g in layout.groups}
        for name, e in keyed.items():
            dtype = layout.group_dtype(e.group)
            if name not in specs or specs[name] != (dtype, tuple(e.shape)) or e.numel == 0:
                return None
            raw = self._bytes(name)
            if raw.storage_offset() % dtype.itemsize:
                return None
            segments[e.group].append((e.offset, e.offset + e.numel, raw.view(dtype)))
        for group in segments:
            segments[group].sort(key=lambda s: s[0])
        self._placed = set(keyed)
        return Arena(layout, {}, segments)

    def commit(self, specs: list[Spec], tensor_for) -> list[str]:
        """Copies tensor_for(name) into every tensor the arena did not hold, then gives each shard its name;
        the shard paths."""
        if list(specs) != self.specs:
            raise ValueError("the output's tensors differ from the shards made for it")
        for name, dtype, shape in self.specs:
            if name not in self._placed:
                t = shards.checked_tensor(name, dtype, shape, tensor_for(name))
                self._bytes(name).copy_(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
        self._maps.clear()
        paths = []
        for (fname, _), tmp in zip(self.plan, self._tmp):
            paths.append(os.path.join(self.out_dir, fname))
            os.replace(tmp, paths[-1])
        self._tmp.clear()
        return paths

    def remove(self) -> None:
        """Unmaps the shards and removes those not yet committed."""
        self._maps.clear()
        for tmp in self._tmp:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._tmp.clear()
