"""The Evolver generation loop and `python -m evolver_kernels.evolve` (docs/ARCHITECTURE.md §1 and §6).

Random choices, all derived from the run seed through Philox (evolver_kernels.kernels.rng), so a run is reproducible
from its config alone and a resumed run repeats exactly what an uninterrupted one does:
  visiting order of generation g (sequential)  random_order(seed, N, g, 0xFFFFFFFF)          strategies.py
  partners of individual i in generation g     random_order(seed, N, g, i), without i (and without the best
                                               individual for best/1), the strategy's count   strategies.py
  crossover seed of that offspring             derive_seed(seed, g, i, PURPOSE_OFFSPRING), stream 0
  seed of the random merges (DARE) of          derive_seed(seed, 0, 0, PURPOSE_MERGE)
  --merge-method and --extra-individuals
  seeded individual s (--population-size)      partner random_order(seed, M, 0, s), crossover seed
                                               derive_seed(seed, 0, s, PURPOSE_OFFSPRING)
  --adapt jde draws of offspring i in gen. g    random_words(4) under derive_seed(seed, g, i, PURPOSE_ADAPT)   adaptation.py
  --select-fraction split of dev file f         random_order(derive_seed(seed, 0, f, PURPOSE_SELECT), n, s)    heldout.py
Generation numbers start at 1; generation 0 in the history is the initial population.

The population is the M models, then one individual per --extra-individuals merge of the models, then (when
--population-size asks for more) seeded offspring: slot s holds the evolver-strategy offspring of model
(s - M - E) mod M with a random partner model. All are built before generation 0, deterministically, so a
resumed run rebuilds them exactly. Merge methods with statistics (fisher, regmean) estimate them on the dev
data once per individual before generation 0 and keep them with the checkpoint.

With selection data (--select, --select-fraction) the output is chosen after the last generation among the
run's result, the input models and the --extra-individuals merges (heldout.py).

Where the rest is decided: options (config.py), the start-up (startup.py: inputs checked, --out claimed, the
memory plan accepted, the storage built; inputs.py, memory_plan.py, placement.py), strategies (strategies.py),
merge methods (methods/), the fitness modes (fitness.py), the run state (state.py), checkpoints
(checkpoint.py), what a run may write (io/rundir.py), the output chosen and written (output.py, report.py).
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from evolver_kernels.evaluation.evaluator import Fitness, Rival
from evolver_kernels.evolve import adaptation
from evolver_kernels.evolve.config import EvolveConfig
from evolver_kernels.evolve.fitness import FITNESS
from evolver_kernels.evolve.initial import fill_slots, initial_statistics
from evolver_kernels.evolve.output import write_run_outputs
from evolver_kernels.evolve.startup import (  # noqa: F401 - dry_run, check_*: the command's
    Storage,
    build_storage,
    check_checkpoint,
    check_plan,
    dry_run,
    start,
)
from evolver_kernels.evolve.state import RunState
from evolver_kernels.evolve.strategies import OffspringSpec, offspring_spec, visiting_order
from evolver_kernels.methods.merger import Merger


def examples_postfix(state: RunState) -> dict[str, str]:
    """The progress bar's share of dev examples scored in this generation (early rejection)."""
    if not state.examples_full:
        return {}
    return {"examples": f"{100 * state.examples_scored / state.examples_full:.0f}%"}


class Search:
    """What both searches share (this module's Run, Evolver; recipe.RecipeRun, --search recipe): the start-up
    (--out claimed, inputs checked, plan accepted), the storage, scoring (evaluate, timed) and the end (close).
    A search's prepare() builds what it needs once the storage is there; run() searches and writes the outputs."""

    def __init__(self, cfg: EvolveConfig, log=print):
        self.cfg, self.log = cfg, log
        self.storage: Storage | None = None
        self.bar = self.state = None
        self.weights_s = self.evaluation_s = 0.0
        self.non_finite = 0
        self.setup = start(cfg, log)  # inputs checked, plan accepted, --out claimed
        self.ranks, self.inputs, self.checkpoint = self.setup.ranks, self.setup.inputs, self.setup.checkpoint
        self.n, self.device = self.inputs.n, self.inputs.placement.device
        try:
            self.storage = build_storage(self.setup)
            self.pop, self.arena, self.base = self.storage.pop, self.storage.arena, self.storage.base
            self.pipeline = self.storage.pipeline
            self.prepare()
        except BaseException:
            self.close(failed=True)
            raise

    def prepare(self) -> None:
        """What the search builds once its storage exists."""

    def merger(self, method: str, stats=None) -> Merger:
        return Merger(
            method,
            self.base,
            seed=self.cfg.merge_seed,
            backend=self.cfg.backend,
            stats=stats,
            **self.cfg.merge_settings(method),
        )

    def evaluate(self, what: str = "a candidate", rival: Rival | None = None, selection: bool = False) -> Fitness:
        """Scores the evaluation model on the dev data (against `rival`: early rejection) and counts the
        examples scored in the generation's state; with `selection`, on the selection data, every example. A
        NaN (or infinite) fitness is ranked last: -inf, with a warning, so that it is never chosen as best and
        never blocks an improvement."""
        start = time.perf_counter()
        fit = (self.inputs.selection if selection else self.inputs.evaluator)(self.inputs.model, rival)
        self.evaluation_s += time.perf_counter() - start
        if self.state is not None and not selection:
            self.state.examples_scored += fit.scored
            self.state.examples_full += fit.total
        if not math.isfinite(fit.score):
            self.non_finite += 1
            self.log(
                f"warning: {what} has fitness {fit.score} ({', '.join(f'{k} {v}' for k, v in fit.per_file.items())}): "
                "ranked last (-inf); NaN weights or a user function returning NaN are the usual causes"
            )
            fit = Fitness(
                -math.inf,
                {k: (v if math.isfinite(v) else -math.inf) for k, v in fit.per_file.items()},
                scored=fit.scored,
                total=fit.total,
            )
        return fit

    def timed(self, fn, *args, **kw) -> None:
        start = time.perf_counter()
        fn(*args, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weights_s += time.perf_counter() - start

    def source(self, i: int) -> str:
        return self.inputs.source(self.cfg, i)

    def sync(self, changed) -> None:
        """A population shared by the node's ranks: every rank waits for its writer's writes of `changed`."""
        if self.storage is not None and self.storage.node is not None:
            self.storage.node.sync(self.pop, changed)

    def examples_counted(self, state: RunState) -> dict[str, int]:
        """The dev examples every rank scored in the generation, against those full evaluations would have; the
        counters restart for the next generation (history entries' examples_scored, examples_full)."""
        counts = self.ranks.gather({self.ranks.rank: (state.examples_scored, state.examples_full)})
        state.examples_scored = state.examples_full = 0
        return {
            "examples_scored": sum(c[0] for c in counts.values()),
            "examples_full": sum(c[1] for c in counts.values()),
        }

    def progress(self, total: int, initial: int):
        """The progress bar (stderr, rank 0; EVOLVER_PROGRESS=0 turns it off)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=min(initial, total),
            desc="evolve",
            unit="eval",
            file=sys.stderr,
            disable=os.environ.get("EVOLVER_PROGRESS", "1") == "0" or not self.ranks.is_main,
        )
        return self.bar

    def run(self) -> dict:
        """Searches and writes the outputs (rank 0); closes the run on every exit path."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        raise NotImplementedError

    def build_output(self, state: RunState) -> str:
        """Puts the search's result into the evaluation model; returns what it is, in words."""
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        """Closes the progress bar, unmaps the population, removes the scratch directory and drops the lock on
        --out (every exit path). A run that failed before writing anything removes the --out it created."""
        if self.bar is not None:
            self.bar.close()
        if self.storage is not None:
            self.storage.close()
        self.setup.release(failed)


class Run(Search):
    """One Evolver run (--search weights): builds the population, then run() evolves it. It is the fitness
    modes' Workbench (fitness.py): the pipeline, the evaluation arena, evaluate, timed."""

    def prepare(self) -> None:
        cfg = self.cfg
        n_models = len(cfg.models)
        fill_slots(cfg, self.pop, self.pipeline, self.arena, n_models, self.merger, self.timed, self.log)
        self.sync(range(n_models, self.n))
        self.mode = FITNESS[cfg.fitness](self)
        if self.mode.merges:
            start_s = time.perf_counter()
            stats = initial_statistics(
                cfg,
                self.checkpoint,
                self.inputs,
                lambda k: self.pipeline.copy_into(k, self.arena),
                self.log,
                save=self.ranks.is_main,
            )
            self.evaluation_s += time.perf_counter() - start_s
            self.pipeline.merger = self.merger(cfg.merge_method, stats=stats)

    def build_output(self, state: RunState) -> str:
        return self.mode.build_output(state)

    # -- the Workbench of the fitness modes ------------------------------------------------------------------
    def rival(self, outcomes: dict[str, str] | None, score: float) -> Rival | None:
        """What a candidate must beat, for early rejection; None (full scoring) without a record."""
        return Rival(outcomes, score, self.cfg.accept_ties) if outcomes is not None else None

    def better(self, new: float, old: float) -> bool:
        return new > old or (self.cfg.accept_ties and new == old)

    def spec(self, generation: int, i: int, fitness: list[float] | None) -> OffspringSpec:
        cfg = self.cfg
        return offspring_spec(cfg.strategy, *self.control(generation, i), cfg.seed, self.n, generation, i, fitness)

    def control(self, generation: int, i: int) -> tuple[float, float]:
        """F and CR of offspring i in `generation`: --F and --CR, or --adapt's draw from individual i's own."""
        trial = adaptation.get(self.cfg.adapt).trial
        if trial is None:
            return self.cfg.F, self.cfg.CR
        return trial(self.cfg.seed, generation, i, *self.state.control[i])

    def adopt(self, state: RunState, generation: int, accepted: list[int]) -> None:
        """Accepted offspring pass their F and CR on to their individuals (--adapt)."""
        if state.control is not None:
            for i in accepted:  # control(generation, i) reads individual i's values alone
                state.control[i] = list(self.control(generation, i))

    # -- the run ---------------------------------------------------------------------------------------------
    def _state(self) -> RunState:
        if not self.cfg.resume:
            adapting = adaptation.get(self.cfg.adapt).trial is not None
            return RunState(
                config=self.cfg.result_options(),
                control=[[self.cfg.F, self.cfg.CR] for _ in range(self.n)] if adapting else None,
                inputs=self.setup.inputs_record,
            )
        state = self.setup.resumed  # checked at start-up (startup.start: same options, inputs, a state of this run)
        self.checkpoint.restore(state, self.pop, cleanup=self.ranks.is_main)
        self.sync(range(self.n))
        return state

    def _run(self) -> dict:
        cfg, ranks, mode = self.cfg, self.ranks, self.mode
        self.state = state = self._state()
        total = mode.evaluations(cfg.generations, cfg.schedule == "synchronous")
        if cfg.max_evaluations is not None:
            total = min(total, cfg.max_evaluations)
        bar = self.progress(total, state.evaluations)
        if state.generation == 0:  # the initial population's fitness
            mode.score_initial(state, bar.update)
            state.evaluations = (
                mode.initial_evaluations()
            )  # not bar.n: a disabled bar (EVOLVER_PROGRESS=0) counts nothing
            state.history.append(self._history_entry(state, 0, []))
            state.generation = 1
            self._save(state, [])
        while state.generation <= cfg.generations and self.budget_left(state):
            g = state.generation
            order = visiting_order(cfg.schedule, cfg.seed, self.n, g)
            while state.position < self.n and self.budget_left(state):
                i = order[state.position]
                bar.update(1)
                state.evaluations += 1
                state.position += 1
                if not ranks.mine(i):
                    continue  # another rank scores this offspring; its score arrives with the gather below
                spec = self.spec(g, i, state.fitness)
                fit = mode.candidate(state, spec)
                changed = []
                if cfg.schedule == "synchronous":
                    state.pending[i], state.pending_per_file[i] = fit.score, fit.per_file
                    state.pending_outcomes[i] = fit.outcomes
                elif self.better(fit.score, mode.to_beat(state, i)):
                    mode.accept(state, spec, fit)
                    self.adopt(state, g, [i])
                    state.accepted_now.append(i)
                    changed = [i]
                if not ranks.enabled:  # ranks checkpoint at generation ends: their pending scores are split
                    self._save(state, changed)  # after every evaluation; individuals when accepted
                bar.set_postfix(gen=g, best=f"{mode.best(state):.4f}", **examples_postfix(state))
            changed = []
            if cfg.schedule == "synchronous":
                state.pending, state.pending_per_file = (
                    ranks.gather(state.pending),
                    ranks.gather(state.pending_per_file),
                )
                state.pending_outcomes = ranks.gather(state.pending_outcomes)
                changed = state.accepted_now = mode.end_synchronous(state, g, bar.update)
                self.adopt(state, g, changed)
                self.sync(changed)
            entry = self._history_entry(state, g, sorted(state.accepted_now))
            state.history.append(entry)
            per_file = ", ".join(f"{name} {score:.4f}" for name, score in entry["per_file"].items())
            self.log(
                f"generation {g}: fitness {mode.describe(state)}, accepted {entry['accepted']}; "
                f"{'merged' if mode.merges else 'best'} model per dev file: {per_file}; "
                f"examples scored {entry['examples_scored']} of {entry['examples_full']}"
            )
            state.generation, state.position, state.pending, state.pending_per_file, state.accepted_now = (
                g + 1,
                0,
                {},
                {},
                [],
            )
            state.pending_outcomes = {}
            self._save(state, changed)
        bar.close()
        if not self.budget_left(state):
            self.log(f"stopped after {state.evaluations} fitness evaluations (--max-evaluations {cfg.max_evaluations})")
        if not ranks.is_main:
            return {"rank": ranks.rank, "final_fitness": None}
        return self.finish(state)

    def budget_left(self, state: RunState) -> bool:
        """Whether another offspring's evaluation fits --max-evaluations (a generation it cuts short ends with the
        offspring scored so far; the synchronous merged mode keeps one for scoring accepted offspring together)."""
        if self.cfg.max_evaluations is None:
            return True
        reserve = int(self.cfg.schedule == "synchronous" and self.mode.merges)
        return state.evaluations < self.cfg.max_evaluations - reserve

    def _save(self, state: RunState, changed: list[int]) -> None:
        if self.ranks.is_main:
            self.checkpoint.save(state, self.pop, changed)

    def _history_entry(self, state: RunState, generation: int, accepted: list[int]) -> dict:
        """Pinned keys (generation, population_fitness, accepted) plus the per-file scores of the model the run
        would output now and the dev examples the generation scored against those full evaluations would have
        (every rank's; the counters restart for the next generation)."""
        entry = {
            "generation": generation,
            "population_fitness": self.mode.population_fitness(state),
            "accepted": accepted,
            "per_file": self.mode.per_file(state),
            **self.examples_counted(state),
        }
        if state.control is not None:  # --adapt: each individual's F and CR after the generation
            entry["F"], entry["CR"] = [c[0] for c in state.control], [c[1] for c in state.control]
        return entry

    def finish(self, state: RunState) -> dict:
        """Chooses and writes the output (output.py); rank 0 only."""
        return write_run_outputs(self, state)
