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
  --select-fraction split of dev file f         random_order(derive_seed(seed, 0, f, PURPOSE_SELECT), n, s)    selection.py
Generation numbers start at 1; generation 0 in the history is the initial population.

The population is the M models, then one individual per --extra-individuals merge of the models, then (when
--population-size asks for more) seeded offspring: slot s holds the evolver-strategy offspring of model
(s - M - E) mod M with a random partner model. All are built before generation 0, deterministically, so a
resumed run rebuilds them exactly. Merge methods with statistics (fisher, regmean) estimate them on the dev
data once per individual before generation 0 and keep them with the checkpoint.

With selection data (--select, --select-fraction) the output is chosen after the last generation among the
run's result, the input models and the --extra-individuals merges (selection.py).

Where the rest is decided: options (config.py), inputs and the memory plan (inputs.py, plan.py), devices
(placement.py), strategies (strategies.py), merge methods (methods/), the fitness modes (fitness.py), the run
state (state.py), checkpoints (checkpoint.py), what a run may write (rundir.py), outputs (report.py).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time

import torch

from evolver_kernels.distributed import Ranks
from evolver_kernels.evaluation.evaluator import Fitness, Rival
from evolver_kernels.evolve import adaptation
from evolver_kernels.evolve.checkpoint import Checkpoint
from evolver_kernels.evolve.config import ConfigError, EvolveConfig, input_paths, validate
from evolver_kernels.evolve.fitness import FITNESS
from evolver_kernels.evolve.heldout import Candidate, choose, describe_data
from evolver_kernels.evolve.initial import fill_slots, initial_statistics
from evolver_kernels.evolve.inputs import RunInputs, inspect, plan_of, weight_files
from evolver_kernels.evolve.memory_plan import host_available
from evolver_kernels.evolve.offspring import WeightPipeline
from evolver_kernels.evolve.report import write_outputs
from evolver_kernels.evolve.state import RunState
from evolver_kernels.evolve.strategies import OffspringSpec, offspring_spec, visiting_order
from evolver_kernels.io import model_io, rundir
from evolver_kernels.kernels.backends import device_backends
from evolver_kernels.kernels.rng import PURPOSE_MERGE, derive_seed
from evolver_kernels.methods.merger import Merger
from evolver_kernels.storage import node_share
from evolver_kernels.storage.arena import load_into
from evolver_kernels.storage.population import MappedModels, make_population


def check_plan(cfg: EvolveConfig, inputs: RunInputs, log, ranks: Ranks | None = None) -> None:
    """Prints the memory plan of this node; refuses one that cannot fit, with the numbers."""
    plan = plan_of(cfg, inputs, ranks)
    log(plan.text())
    problem = plan.refusal(host_available(), lambda d: torch.cuda.mem_get_info(torch.device(d))[0], rundir.disk_problem)
    if problem:
        raise ConfigError(problem)


def check_checkpoint(cfg: EvolveConfig) -> Checkpoint:
    """--out's checkpoint agrees with --resume: none without it, an unfinished one with it."""
    checkpoint = Checkpoint(cfg.out)
    checkpoint.check()
    if checkpoint.finished():
        raise ConfigError(f"--out {cfg.out} holds a finished run (its outputs are there): choose another --out")
    if checkpoint.exists() and not cfg.resume:
        raise ConfigError(f"--out {cfg.out} holds a checkpointed run: pass --resume to continue it, or choose another --out")
    if cfg.resume and not checkpoint.exists():
        raise ConfigError(f"--resume: no checkpoint in {cfg.out}")
    return checkpoint


def dry_run(cfg: EvolveConfig, log=print) -> None:
    """--dry-run: every input checked and the plan printed; nothing is loaded or written (pickle weights are
    converted into a temporary directory, removed again)."""
    validate(cfg)
    ranks = Ranks()
    tmp = tempfile.mkdtemp(prefix="evolver-dry-run-")
    try:
        def files_of(option, model_dir):
            return weight_files(model_dir, option, cfg.allow_pickle, tmp, ranks)

        inputs = inspect(cfg, ranks, files_of)
        check_checkpoint(cfg)
        check_plan(cfg, inputs, log, Ranks.of_launcher())  # under torchrun: the node's plan
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Run:
    """One evolution run: claims --out, checks its inputs, builds the population, then run() evolves it.
    It is the fitness modes' Workbench (fitness.py): the pipeline, the evaluation arena, evaluate, timed."""

    def __init__(self, cfg: EvolveConfig, log=print):
        validate(cfg)
        self.cfg, self.log = cfg, log
        self.out_dir: rundir.OutputDir | None = None
        self.scratch: rundir.Scratch | None = None
        self.pop = self.bar = self.state = None
        self.node: node_share.NodePopulation | None = None  # the population held once per node, with ranks
        self.weights_s = self.evaluation_s = 0.0
        self.non_finite = 0
        cuda = cfg.device.startswith("cuda") if cfg.device else torch.cuda.is_available()
        self.ranks = Ranks.from_env("cuda" if cuda else "cpu")
        if self.ranks.enabled and cfg.schedule != "synchronous":
            raise ConfigError(f"{self.ranks.world} ranks need --schedule synchronous (the sequential schedule is "
                              "serial by definition)")
        if self.ranks.is_main:  # claimed before anything is written (conversions, checkpoints, scratch)
            self.out_dir = rundir.OutputDir.claim(cfg.out, "evolve", input_paths(cfg))
        self.ranks.barrier()  # the other ranks write nothing before rank 0 holds --out
        try:
            self._build()
        except BaseException:
            self.close(failed=True)
            raise

    def _build(self) -> None:
        cfg = self.cfg
        convert_root = os.path.join(cfg.out, "converted")
        self.inputs = inspect(cfg, self.ranks, lambda option, d: weight_files(d, option, cfg.allow_pickle,
                                                                                convert_root, self.ranks))
        self.n, self.device = self.inputs.n, self.inputs.placement.device
        self.checkpoint = check_checkpoint(cfg)
        check_plan(cfg, self.inputs, self.log, self.ranks)
        n_models = len(cfg.models)
        on_disk = cfg.population_on == "disk"
        # the disk tier's files go into a fresh directory of ours, removed when the run ends
        disk_parent = (cfg.population_dir or cfg.out, "--population-dir" if cfg.population_dir else "--out")

        def make(root: str | None, writes: bool = True):
            return make_population(cfg.population_on, self.inputs.layout, self.inputs.files, list(cfg.models),
                                   self.device, disk_dir=root if on_disk else None, extra=self.n - n_models,
                                   shared_dir=root if self.node is not None and not on_disk else None, writes=writes)

        if self.ranks.node_writer:  # shared-memory populations of killed runs (no live writer holds their lock)
            rundir.remove_stale_scratch(node_share.shm_root())
        if node_share.shared(cfg.population_on, self.device, self.ranks):  # once per node (node_share.py)
            self.node = node_share.NodePopulation(self.ranks)
            self.pop = self.node.create(make, *(disk_parent if on_disk else (node_share.shm_root(), "EVOLVER_SHM_DIR")))
        else:
            if on_disk:
                self.scratch = rundir.Scratch(*disk_parent)
            self.pop = make(self.scratch.path if self.scratch else None)
        self.arena = self.inputs.placement.arena()
        self.inputs.placement.bind(self.inputs.model, self.arena, self.inputs.files[0])
        self.base = None
        if cfg.base_model:
            self.base = model_io.load_model_arena(self.inputs.layout, self.inputs.base_files,
                                                  f"--base-model {cfg.base_model}", self.inputs.placement.arena())
        self.pipeline = WeightPipeline(self.pop, self.device, chunk=cfg.chunk_elements, backend=cfg.backend)
        fill_slots(cfg, self.pop, self.pipeline, self.arena, n_models, self.merger, self.timed, self.log)
        self.sync(range(n_models, self.n))
        self.mode = FITNESS[cfg.fitness](self)
        if self.mode.merges:
            start = time.perf_counter()
            stats = initial_statistics(cfg, self.checkpoint, self.inputs, lambda k: self.pipeline.copy_into(k, self.arena),
                                       self.log, save=self.ranks.is_main)
            self.evaluation_s += time.perf_counter() - start
            self.pipeline.merger = self.merger(cfg.merge_method, stats=stats)

    def merger(self, method: str, stats=None) -> Merger:
        return Merger(method, self.base, seed=derive_seed(self.cfg.seed, 0, 0, PURPOSE_MERGE), backend=self.cfg.backend,
                      stats=stats, **self.cfg.merge_settings(method))

    # -- the Workbench of the fitness modes ------------------------------------------------------------------
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
            self.log(f"warning: {what} has fitness {fit.score} ({', '.join(f'{k} {v}' for k, v in fit.per_file.items())}): "
                     "ranked last (-inf); NaN weights or a user function returning NaN are the usual causes")
            fit = Fitness(-math.inf, {k: (v if math.isfinite(v) else -math.inf) for k, v in fit.per_file.items()},
                          scored=fit.scored, total=fit.total)
        return fit

    def rival(self, outcomes: dict[str, str] | None, score: float) -> Rival | None:
        """What a candidate must beat, for early rejection; None (full scoring) without a record."""
        return Rival(outcomes, score, self.cfg.accept_ties) if outcomes is not None else None

    def timed(self, fn, *args, **kw) -> None:
        start = time.perf_counter()
        fn(*args, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weights_s += time.perf_counter() - start

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

    def source(self, i: int) -> str:
        return self.inputs.source(self.cfg, i)

    # -- the run ---------------------------------------------------------------------------------------------
    def _state(self) -> RunState:
        config = self.cfg.result_options()
        if not self.cfg.resume:
            adapting = adaptation.get(self.cfg.adapt).trial is not None
            return RunState(config=config, control=[[self.cfg.F, self.cfg.CR] for _ in range(self.n)] if adapting else None)
        state = self.checkpoint.resume(config, self.pop, cleanup=self.ranks.is_main)
        self.sync(range(self.n))
        return state

    def sync(self, changed) -> None:
        """A population shared by the node's ranks: every rank waits for its writer's writes of `changed`."""
        if self.node is not None:
            self.node.sync(self.pop, changed)

    def run(self) -> dict:
        """Evolves the population and writes the outputs (rank 0); closes the run on every exit path."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, ranks, mode = self.cfg, self.ranks, self.mode
        self.state = state = self._state()
        total = mode.evaluations(cfg.generations, cfg.schedule == "synchronous")
        self.bar = bar = tqdm(total=total, initial=min(state.evaluations, total), desc="evolve", unit="eval",
                              file=sys.stderr, disable=os.environ.get("EVOLVER_PROGRESS", "1") == "0" or not ranks.is_main)
        if state.generation == 0:  # the initial population's fitness
            mode.score_initial(state, bar.update)
            state.evaluations = mode.initial_evaluations()  # not bar.n: a disabled bar (EVOLVER_PROGRESS=0) counts nothing
            state.history.append(self._history_entry(state, 0, []))
            state.generation = 1
            self._save(state, [])
        while state.generation <= cfg.generations:
            g = state.generation
            order = visiting_order(cfg.schedule, cfg.seed, self.n, g)
            while state.position < self.n:
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
                bar.set_postfix(gen=g, best=f"{mode.best(state):.4f}", **self._examples_postfix(state))
            changed = []
            if cfg.schedule == "synchronous":
                state.pending, state.pending_per_file = ranks.gather(state.pending), ranks.gather(state.pending_per_file)
                state.pending_outcomes = ranks.gather(state.pending_outcomes)
                changed = state.accepted_now = mode.end_synchronous(state, g, bar.update)
                self.adopt(state, g, changed)
                self.sync(changed)
            entry = self._history_entry(state, g, sorted(state.accepted_now))
            state.history.append(entry)
            per_file = ", ".join(f"{name} {score:.4f}" for name, score in entry["per_file"].items())
            self.log(f"generation {g}: fitness {mode.describe(state)}, accepted {entry['accepted']}; "
                     f"{'merged' if mode.merges else 'best'} model per dev file: {per_file}; "
                     f"examples scored {entry['examples_scored']} of {entry['examples_full']}")
            state.generation, state.position, state.pending, state.pending_per_file, state.accepted_now = g + 1, 0, {}, {}, []
            state.pending_outcomes = {}
            self._save(state, changed)
        bar.close()
        if not ranks.is_main:
            return {"rank": ranks.rank, "final_fitness": None}
        return self.finish(state)

    def _save(self, state: RunState, changed: list[int]) -> None:
        if self.ranks.is_main:
            self.checkpoint.save(state, self.pop, changed)

    def _history_entry(self, state: RunState, generation: int, accepted: list[int]) -> dict:
        """Pinned keys (generation, population_fitness, accepted) plus the per-file scores of the model the run
        would output now and the dev examples the generation scored against those full evaluations would have
        (every rank's; the counters restart for the next generation)."""
        counts = self.ranks.gather({self.ranks.rank: (state.examples_scored, state.examples_full)})
        state.examples_scored = state.examples_full = 0
        entry = {"generation": generation, "population_fitness": self.mode.population_fitness(state),
                 "accepted": accepted, "per_file": self.mode.per_file(state),
                 "examples_scored": sum(c[0] for c in counts.values()), "examples_full": sum(c[1] for c in counts.values())}
        if state.control is not None:  # --adapt: each individual's F and CR after the generation
            entry["F"], entry["CR"] = [c[0] for c in state.control], [c[1] for c in state.control]
        return entry

    def _early_reject(self) -> str:
        """How candidates were scored, for evolution.json."""
        if not self.inputs.evaluator.exact_bound:
            return f"not applicable ({self.inputs.evaluator.metric} has no exact bound: every example scored)"
        return self.cfg.early_reject

    @staticmethod
    def _examples_postfix(state: RunState) -> dict[str, str]:
        """The progress bar's share of dev examples scored in this generation (early rejection)."""
        if not state.examples_full:
            return {}
        return {"examples": f"{100 * state.examples_scored / state.examples_full:.0f}%"}

    def finish(self, state: RunState) -> dict:
        selection = None
        if self.inputs.selection is None:
            kind = self.mode.build_output(state)
        else:
            choice = choose(self.selection_candidates(state), lambda what: self.evaluate(what, selection=True), self.log)
            kind = choice.phrase
            selection = choice.record(describe_data(self.cfg.select, self.cfg.select_fraction))
        final = self.evaluate("the output model")
        extra = {
            "task": self.inputs.task, "metric": self.inputs.evaluator.metric, "output": kind,
            "evaluations": state.evaluations,
            "timing_s": {"weights": round(self.weights_s, 3), "evaluation": round(self.evaluation_s, 3)},
            "non_finite_evaluations": self.non_finite, "early_reject": self._early_reject(),
            "backends": device_backends(self.inputs.placement.devices(), self.cfg.backend),
            "resolved_models": {ref: path for ref, path in self.cfg.resolved.items() if ref != path},
        }
        if selection is not None:
            extra["selection"] = selection
        written = write_outputs(self.cfg.out, self.arena, self.cfg.local(self.cfg.models[0]), self.inputs.files[0], dict(state.config),
                                state.history, final.as_dict(), extra, self.inputs.evaluator.metric, kind)
        self.out_dir.record(written)
        self.checkpoint.mark_finished(state)
        self.log(f"final fitness {final.score:.4f} ({self.inputs.evaluator.metric}); wrote {self.cfg.out}")
        return {"final_fitness": final.score, "per_file": final.per_file, "history": state.history, **extra}

    # -- held-out selection (selection.py) ---------------------------------------------------------------
    def selection_candidates(self, state: RunState) -> list[Candidate]:
        """The run's result, every input model, every --extra-individuals merge of the input models."""
        cfg = self.cfg
        candidates = [Candidate("the run's result", lambda: self.mode.build_output(state))]
        for k, ref in enumerate(cfg.models):
            def load(k=k, ref=ref) -> str:
                self.timed(load_into, self.arena, self.inputs.files[k], f"--models {ref}")
                return f"the input model {ref}, chosen on the selection data"
            candidates.append(Candidate(f"input model {ref}", load))
        for method in cfg.extra_individuals or []:
            def merge(method=method) -> str:
                models = MappedModels(self.inputs.layout, self.inputs.files, list(cfg.models))
                try:
                    self.timed(self.merger(method), models, self.arena, cfg.chunk_elements)
                finally:
                    models.close()
                return f"the {method} merge of the input models, chosen on the selection data"
            candidates.append(Candidate(f"{method} merge of the input models", merge))
        return candidates

    def close(self, failed: bool = False) -> None:
        """Closes the progress bar, unmaps the population, removes the scratch directory and drops the lock on
        --out (every exit path). A run that failed before writing anything removes the --out it created."""
        if self.bar is not None:
            self.bar.close()
        if self.pop is not None:
            self.pop.close()
        if self.scratch is not None:
            self.scratch.remove()
        if self.node is not None:
            self.node.remove()
        if self.out_dir is not None:
            self.out_dir.release(remove_if_unused=failed)
