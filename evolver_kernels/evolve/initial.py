"""What a run holds before generation 0 besides the models: the individuals past the models (evolve/run.py's docstring gives the rule): one individual per
--extra-individuals merge of the models, then, up to --population-size, seeded offspring: slot s holds the
evolver-strategy offspring of model (s - M - E) mod M with the first other model of random_order(seed, M, 0, s),
crossover seed derive_seed(seed, 0, s, PURPOSE_OFFSPRING). Deterministic, so a resumed run rebuilds them.
And the statistics of a merge method that has them, estimated once and kept with the checkpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from evolver_kernels.evolve.checkpoint import Checkpoint
from evolver_kernels.evolve.config import EvolveConfig
from evolver_kernels.evolve.offspring import WeightPipeline
from evolver_kernels.evolve.strategies import OffspringSpec
from evolver_kernels.kernels.rng import PURPOSE_OFFSPRING, derive_seed, random_order
from evolver_kernels.methods import merger
from evolver_kernels.methods.merger import Merger
from evolver_kernels.storage.arena import Arena
from evolver_kernels.storage.population import Population, PopulationPrefix


def seeded_spec(cfg: EvolveConfig, n_models: int, first_seeded: int, s: int) -> OffspringSpec:
    """The offspring that seeds slot s (s >= first_seeded, the slot after the models and the extras)."""
    parent = (s - first_seeded) % n_models
    partner = next(k for k in random_order(cfg.seed, n_models, 0, s) if k != parent)
    return OffspringSpec(
        i=parent,
        strategy="evolver",
        picks=(partner,),
        F=float(cfg.F),
        CR=float(cfg.CR),
        seed=derive_seed(cfg.seed, 0, s, PURPOSE_OFFSPRING),
    )


def fill_slots(
    cfg: EvolveConfig,
    pop: Population,
    pipeline: WeightPipeline,
    arena: Arena,
    n_models: int,
    merger_for: Callable[[str], Merger],
    timed: Callable,
    log: Callable[[str], None],
) -> None:
    """Writes individuals n_models .. pop.size - 1, building each in `arena` first."""
    if not pop.writes:  # another rank of the node builds them into the shared population (node_share.py)
        return
    extras = list(cfg.extra_individuals or [])
    for j, method in enumerate(extras):
        log(f"extra individual #{n_models + j}: {method} of the {n_models} models")
        timed(merger_for(method), PopulationPrefix(pop, n_models), arena, cfg.chunk_elements)
        timed(pipeline.write_from, n_models + j, arena)
    first_seeded = n_models + len(extras)
    for s in range(first_seeded, pop.size):
        spec = seeded_spec(cfg, n_models, first_seeded, s)
        log(f"seeded individual #{s}: offspring of model {spec.i} with model {spec.picks[0]}")
        timed(pipeline.offspring_into, spec, arena)
        timed(pipeline.write_from, s, arena)


def initial_statistics(
    cfg: EvolveConfig,
    checkpoint: Checkpoint,
    inputs,
    load: Callable[[int], None],
    log: Callable[[str], None],
    save: bool = True,
):
    """The statistics of --merge-method for every individual as the run starts (None for a method without),
    estimated once on the dev data (load(k) puts individual k into the evaluation model) and, with `save` (one
    rank), written atomically beside the checkpoint, so that a resumed run merges with the same ones."""
    method = cfg.merge_method
    if merger.methods.get(method).statistics is None:
        return None
    settings, path = cfg.merge_settings(method), checkpoint.stats_path(method)
    if cfg.resume and os.path.isfile(path):
        log(f"{method}: statistics from {path}")
        return merger.load_statistics(method, settings, inputs.layout, inputs.n, path)
    start = time.perf_counter()
    os.makedirs(checkpoint.dir, exist_ok=True)
    return merger.compute_statistics(
        method,
        settings,
        inputs.model,
        inputs.layout,
        load,
        inputs.n,
        inputs.evaluator,
        save_to=path if save else None,
        progress=lambda k: log(
            f"{method}: statistics of individual {k + 1}/{inputs.n} ({time.perf_counter() - start:.1f} s)"
        ),
    )
