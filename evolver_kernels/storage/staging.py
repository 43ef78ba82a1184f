"""Host-to-device double buffering for populations kept off the compute device (the cpu tier's pinned host
memory, the disk tier's memory maps) when a GPU computes. Under torchrun the cpu tier is a node's shared memory
(node_share.py), which is not pinned: its copies are correct but do not overlap the kernels (not yet measured).

A chunk loop asks `Staging.chunks(size, chunk, keys_of)` for its chunks; before the loop body runs on chunk c,
the reads of chunk c + 1 (keys_of(lo, hi): (individual, group, lo, hi) tuples) are copied into the other of
two buffer sets on a side stream, so the copies of the next chunk overlap the kernels of this one. `read()`
serves a staged chunk after making the compute stream wait for its copy (an event), or falls back to a
copy on the compute stream. A buffer set is refilled only after the compute stream has passed the work that
used it (an event recorded when the loop body returns), and every loop starts with the side stream waiting
for the compute stream, so writes into the population (device-to-host copies) land before they are re-read.

A staged tensor is valid until the loop body of its chunk returns: callers consume reads within the chunk.
On the CPU, or with staging off, `chunks` is iter_chunks and `read` the population's read; `enabled=True`
forces the bookkeeping on the CPU (synchronous copies) so tests can check it gives the same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from evolver_kernels.storage.arena import iter_chunks
from evolver_kernels.storage.population import MemoryPopulation, Population

Key = tuple[int, str, int, int]  # (individual, group, lo, hi)


class Staging:
    def __init__(self, pop: Population, device: torch.device | str, enabled: bool | None = None):
        self.pop = pop
        self.device = torch.device(device)
        on_device = isinstance(pop, MemoryPopulation) and pop.storage_device.type == self.device.type
        gpu = self.device.type == "cuda" and not on_device
        self.enabled = gpu if enabled is None else enabled
        self.stream = torch.cuda.Stream(self.device) if (gpu and self.enabled) else None
        self._slots: list[dict[Key, tuple[torch.Tensor, object]]] = [{}, {}]
        self._pool: list[dict[tuple[torch.dtype, int], torch.Tensor]] = [{}, {}]
        self._released: list[object] = [None, None]
        self._active: int | None = None
        self.hits = 0
        self.misses = 0

    def chunks(self, size: int, chunk: int, keys_of: Callable[[int, int], list[Key]]) -> Iterator[tuple[int, int]]:
        """iter_chunks(size, chunk), with each chunk's reads staged while the previous chunk computes."""
        if not self.enabled or self._active is not None:  # off, or a loop inside a staged loop: plain reads
            yield from iter_chunks(size, chunk)
            return
        spans = list(iter_chunks(size, chunk))
        if not spans:
            return
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._fill(0, keys_of(*spans[0]))
        for index, (lo, hi) in enumerate(spans):
            slot = index % 2
            if index + 1 < len(spans):
                self._fill(1 - slot, keys_of(*spans[index + 1]))
            self._active = slot
            try:
                yield lo, hi
            finally:
                self._active = None
                self._release(slot)
        self._slots = [{}, {}]

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of individual i's group on the compute device (staged when the chunk loop staged it)."""
        if self._active is not None:
            staged = self._slots[self._active].get((i, group, lo, hi))
            if staged is not None:
                tensor, event = staged
                if event is not None:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(event)
                    # allocated on the side stream: keep the allocator from handing the block out again
                    # before the compute stream's reads of it are done, should the buffers be freed
                    tensor.record_stream(compute)
                self.hits += 1
                return tensor
        self.misses += 1
        return self.pop.read(i, group, lo, hi).to(self.device, non_blocking=True)

    def _buffer(self, slot: int, position: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (dtype, position)
        buf = self._pool[slot].get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._pool[slot][key] = buf
        return buf[:n]

    def _fill(self, slot: int, keys: list[Key]) -> None:
        """Copies the chunks `keys` into buffer set `slot`: on the side stream on a GPU (its event marks the end
        of the copies), synchronously when forced on the CPU."""
        gpu = self.stream is not None
        if gpu and self._released[slot] is not None:
            self.stream.wait_event(self._released[slot])
        staged = {}
        with torch.cuda.stream(self.stream) if gpu else contextlib.nullcontext():
            for position, key in enumerate(dict.fromkeys(keys)):
                src = self.pop.read(*key)
                staged[key] = self._buffer(slot, position, src.dtype, src.numel()).copy_(src, non_blocking=gpu)
            event = None
            if gpu:
                event = torch.cuda.Event()
                event.record(self.stream)
        self._slots[slot] = {key: (tensor, event) for key, tensor in staged.items()}

    def _release(self, slot: int) -> None:
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._released[slot] = event
