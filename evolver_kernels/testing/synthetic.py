"""Synthetic Llama-shaped populations for memory tests and benchmarks (no model code, no tokenizer).

`llama_shapes(size)` lists the parameters of a Llama of that size; `synthetic_population` fills a population
on any tier with seeded random bf16 values; `weight_generation` runs one generation of the weight side
(fitness "merged", sequential, a cheap deterministic fitness instead of an evaluation pass).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from evolver_kernels.evolve.offspring import OffspringSpec, WeightPipeline
from evolver_kernels.storage.arena import Arena, Layout, iter_chunks
from evolver_kernels.storage.population import DiskPopulation, MemoryPopulation, Population

SIZES = {  # hidden, intermediate, layers, vocab, heads, kv heads
    "micro": (128, 352, 2, 4096, 4, 4),
    "tiny": (256, 688, 4, 32000, 4, 4),
    "125m": (768, 2048, 12, 32000, 12, 12),
    "1b": (2048, 5632, 22, 32000, 32, 4),
    "7b": (4096, 11008, 32, 32000, 32, 32),
}


def llama_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    h, inter, layers, vocab, heads, kv = SIZES[size]
    kv_dim = h // heads * kv
    shapes = [("model.embed_tokens.weight", (vocab, h)), ("lm_head.weight", (vocab, h)), ("model.norm.weight", (h,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return shapes


def llama_layout(size: str, dtype: torch.dtype = torch.bfloat16) -> Layout:
    return Layout.from_params(((name,), dtype, shape) for name, shape in llama_shapes(size))


def synthetic_population(
    layout: Layout, n: int, tier: str, root: str | None = None, device: str = "cpu", chunk: int = 1 << 20
) -> Population:
    """n individuals of seeded N(0, 1) values, written chunk by chunk (no model-sized temporary)."""
    pop: Population
    if tier == "disk":
        pop = DiskPopulation(layout, n, root)
    else:
        pop = MemoryPopulation(layout, n, device if tier == "gpu" else "cpu")
    for i in range(n):
        gen = torch.Generator(device="cpu").manual_seed(i)
        pop.begin_write(i)
        for g, (_, size) in layout.groups.items():
            for lo, hi in iter_chunks(size, chunk):
                pop.write(i, g, lo, torch.randn(hi - lo, generator=gen).to(layout.group_dtype(g)))
        pop.commit_write(i)
    return pop


def sample_score(values: torch.Tensor) -> float:
    """Cheap and deterministic: the sum of a strided sample of the values (stands in for an evaluation pass)."""
    return float(values.reshape(-1)[::4099].float().sum())


def synthetic_fitness(arena: Arena) -> float:
    return sum(sample_score(buf) for buf in arena.buffers.values())


def weight_generation(
    pop: Population, device: str = "cpu", chunk: int = 1 << 22, seed: int = 0, staging: bool | None = None
) -> list[int]:
    """One sequential generation with fitness "merged" and the evolver strategy; returns the accepted slots.
    staging: the pipeline's double buffering (None: on when a GPU computes on a population off the device)."""
    arena = Arena.empty(pop.layout, device)
    pipe = WeightPipeline(pop, torch.device(device), chunk=chunk, staging=staging)
    pipe.merged_into(arena)
    best = synthetic_fitness(arena)
    accepted = []
    for i in range(pop.size):
        spec = OffspringSpec(i=i, strategy="evolver", picks=((i + 1) % pop.size,), F=0.5, CR=0.5, seed=seed * 1000 + i)
        pipe.merged_into(arena, replace=[spec])
        score = synthetic_fitness(arena)
        if score > best:
            pipe.apply([spec])
            best = score
            accepted.append(i)
    return accepted


class PeakSampler:
    """The largest value of probe() (a byte count), sampled from a thread every `interval` seconds from
    construction until stop(); sampling ends by itself when probe raises OSError (what it measures is gone)."""

    def __init__(self, probe: Callable[[], int], interval: float):
        self._probe, self._interval = probe, interval
        self.peak = probe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak = max(self.peak, self._probe())
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        try:
            return max(self.peak, self._probe())
        except OSError:
            return self.peak


class AnonPeak(PeakSampler):
    """Peak anonymous RSS of a process (this one by default; or a child's pid), RssAnon in /proc/<pid>/status
    sampled every 2 ms: the memory a run holds, without the page cache behind the disk tier's memory maps.
    Sampling ends by itself when the process exits. Linux only."""

    def __init__(self, pid: int | str = "self"):
        self.pid = pid
        super().__init__(lambda: self.now(pid), 0.002)

    @staticmethod
    def now(pid: int | str = "self") -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"RssAnon not found in /proc/{pid}/status (has the process exited?)")


def population_digest(pop: Population, chunk: int = 1 << 22) -> list[str]:
    """sha256 of each individual's bytes, read chunk by chunk."""
    import hashlib

    digests = []
    for i in range(pop.size):
        h = hashlib.sha256()
        for g, (_, size) in pop.layout.groups.items():
            for lo, hi in iter_chunks(size, chunk):
                h.update(pop.read(i, g, lo, hi).contiguous().view(torch.uint8).numpy().tobytes())
        digests.append(h.hexdigest())
    return digests
