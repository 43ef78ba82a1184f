"""`--search recipe`: CMA-ES (the `cma` package) over merge recipes, mergekit-evolve's search, beside the
Evolver's search of the weights themselves (run.py).

The genome (genome.py) holds the --merge-method's searched parameters per layer group and model. Generation 0
scores the starting recipe (weight 1/M, the defaults: about the plain merge); each later generation asks CMA-ES
for its candidates, builds each one through the fused merge straight into the evaluation model's weights (no
file per candidate, no stack of the models; the population of the models on any tier), scores it with the run's
evaluator in full (CMA-ES ranks by the scores themselves, so no early rejection) and tells CMA-ES the scores.
The result is the best candidate scored (ties keep the earlier); with selection data the output is chosen among
it, the input models and the --extra-individuals merges, as for Evolver (output.py).

Random choices: CMA-ES's normal draws come from numpy's PCG64 seeded with derive_seed(seed, 0, 0,
PURPOSE_RECIPE) (cma's own seeding of numpy's global generator is switched off), the merge's random drops from
the run's merge seed (derive_seed(seed, 0, 0, PURPOSE_MERGE), written into the recipe). CMA-ES's state is never
stored: --resume rebuilds it by asking and telling again the generations the checkpoint records (the same
draws, the same scores: the same state, bit for bit) and checks that every candidate it asks again is the one
recorded. Under torchrun each rank scores its share of a generation's candidates (candidate j on rank
j mod world) and every rank tells CMA-ES all the scores, so every rank holds the same state.

--max-evaluations E stops after E evaluations (generation 0's included), within a generation if it comes to
that: the candidates scored count, the generation is not told.
"""

from __future__ import annotations

import math
import os

import numpy as np

from evolver_kernels.errors import UserError
from evolver_kernels.evolve.genome import SIGMA0, Genome
from evolver_kernels.evolve.offspring import CandidateView
from evolver_kernels.evolve.output import write_run_outputs
from evolver_kernels.evolve.run import Search, examples_postfix
from evolver_kernels.evolve.state import RunState
from evolver_kernels.io.jsonio import write_yaml
from evolver_kernels.kernels.rng import PURPOSE_RECIPE, derive_seed
from evolver_kernels.methods.merger import merge_per_tensor

RECIPE_FILE = "recipe.yaml"
# what CMA-ES is told for a candidate ranked last (fitness -inf): worse than any score, and finite, which
# cma's bookkeeping of function values needs
WORST_COST = 1e300


def strategy(genome: Genome, seed: int, popsize: int, sigma0: float):
    """A CMA-ES over `genome`, drawing from its own seeded generator and writing no file."""
    import cma

    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, 0, 0, PURPOSE_RECIPE)))
    lows, highs = genome.bounds()
    options = {
        "bounds": [lows, highs],
        "CMA_stds": [hi - lo for lo, hi in zip(lows, highs)],  # sigma0 in units of each interval's width
        "popsize": popsize,
        "seed": np.nan,  # cma leaves numpy's global generator alone; its draws are randn's
        "randn": lambda *shape: rng.standard_normal(shape),
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
    }
    return cma.CMAEvolutionStrategy(genome.x0(), sigma0, options)


def cost(score: float) -> float:
    """A fitness (higher is better, -inf last) as what CMA-ES minimises."""
    return -score if math.isfinite(score) else WORST_COST


class RecipeRun(Search):
    """One --search recipe run: the models on their tier, CMA-ES over the genome, run() searches and writes."""

    def prepare(self) -> None:
        self.genome: Genome = self.setup.genome
        self.order = [name for name, _ in self.inputs.model.named_parameters(remove_duplicate=False)]
        self.popsize = self.genome.candidates
        self.es = None

    def build(self, x: list[float]) -> None:
        """The evaluation model's weights = the merge of the models under genome x."""
        groups = self.genome.tensor_groups(x, self.inputs.layout, self.order)
        self.timed(
            merge_per_tensor,
            self.cfg.merge_method,
            CandidateView(self.pipeline, []),  # the models, read through the staging onto the compute device
            self.arena,
            groups,
            self.base,
            seed=self.cfg.merge_seed,
            backend=self.cfg.backend,
            chunk=self.cfg.chunk_elements,
        )

    def score(self, generation: int, j: int, x: list[float]) -> dict:
        self.build(x)
        fit = self.evaluate(f"candidate {j} of generation {generation}")
        return {"generation": generation, "candidate": j, "genome": x, "score": fit.score, "per_file": fit.per_file}

    def budget_left(self, state: RunState) -> bool:
        return self.cfg.max_evaluations is None or state.evaluations < self.cfg.max_evaluations

    def total(self) -> int:
        total = 1 + self.cfg.generations * self.popsize
        return total if self.cfg.max_evaluations is None else min(total, self.cfg.max_evaluations)

    # -- the run -----------------------------------------------------------------------------------------------
    def _state(self) -> RunState:
        self.es = strategy(self.genome, self.cfg.seed, self.popsize, self.cfg.sigma0 or SIGMA0)
        if not self.cfg.resume:
            return RunState(config=self.cfg.result_options(), inputs=self.setup.inputs_record, recipe=[])
        state = self.setup.resumed
        recorded = state.recipe or []
        for g in range(1, state.generation + 1):  # the generations done, then the one in progress
            scored = [c for c in recorded if c["generation"] == g]
            if g == state.generation and state.position == 0:
                break  # asked in _run, as an uninterrupted run asks it
            asked = self._ask()
            if any(asked[c["candidate"]] != c["genome"] for c in scored):
                raise UserError(
                    f"{self.checkpoint.state_path}: CMA-ES asks other candidates in generation {g} than the "
                    "checkpoint records (another version of cma, or an edited checkpoint): it cannot resume"
                )
            if g < state.generation and len(scored) == self.popsize:  # a generation cut short was not told
                self.es.tell(asked, [cost(c["score"]) for c in scored])
        return state

    def _ask(self) -> list[list[float]]:
        self.asked = [[float(v) for v in x] for x in self.es.ask()]
        return self.asked

    def _run(self) -> dict:
        cfg, ranks = self.cfg, self.ranks
        self.state = state = self._state()
        bar = self.progress(self.total(), state.evaluations)
        if state.generation == 0:  # the starting recipe
            record = self.score(0, 0, self.genome.x0()) if ranks.is_main else None
            state.recipe.append(ranks.broadcast(record))
            bar.update(1)
            state.evaluations = 1
            state.history.append(self._history_entry(state, 0))
            state.generation = 1
            self._save(state)
        # cma's stop criteria are read at a generation's start (a generation resumed part-way is finished)
        while (
            state.generation <= cfg.generations and self.budget_left(state) and (state.position or not self.es.stop())
        ):
            g = state.generation
            if state.position == 0:
                self._ask()
            scores = {}
            while state.position < self.popsize and self.budget_left(state):
                j = state.position
                bar.update(1)
                state.evaluations += 1
                state.position += 1
                if ranks.mine(j):
                    scores[j] = self.score(g, j, self.asked[j])
                if not ranks.enabled:  # ranks gather at the generation's end, and checkpoint there
                    state.recipe.append(scores[j])
                    self._save(state)
                bar.set_postfix(gen=g, best=f"{self.best(state)['score']:.4f}", **examples_postfix(state))
            if ranks.enabled:
                gathered = ranks.gather(scores)
                state.recipe += [gathered[j] for j in sorted(gathered)]
            told = [c for c in state.recipe if c["generation"] == g]
            if len(told) == self.popsize:  # else --max-evaluations cut the generation short: not told
                self.es.tell(self.asked, [cost(c["score"]) for c in told])
            state.history.append(self._history_entry(state, g))
            entry = state.history[-1]
            self.log(
                f"generation {g}: best {entry['best']:.4f} (of {len(state.recipe)} candidates), this generation "
                f"{max(entry['population_fitness']):.4f}; step size {self.es.sigma:.4g}"
            )
            state.generation, state.position = g + 1, 0
            self._save(state)
        bar.close()
        if not self.budget_left(state):
            self.log(f"stopped after {state.evaluations} fitness evaluations (--max-evaluations {cfg.max_evaluations})")
        elif self.es.stop() and state.generation <= cfg.generations:
            self.log(f"CMA-ES stopped: {', '.join(f'{k} {v}' for k, v in self.es.stop().items())}")
        if not ranks.is_main:
            return {"rank": ranks.rank, "final_fitness": None}
        best = self.best(state)
        search = {
            "recipe": {
                "file": RECIPE_FILE,
                "genome": best["genome"],
                "genes": [gene.name for gene in self.genome.genes],
                "generation": best["generation"],
                "candidate": best["candidate"],
                "dev_fitness": best["score"],
                "candidates_per_generation": self.popsize,
                "candidates_scored": len(state.recipe),
                "sigma0": cfg.sigma0 or SIGMA0,
                "cma_stop": {k: str(v) for k, v in self.es.stop().items()},
            }
        }
        return write_run_outputs(self, state, search=search, more=lambda: [self._write_recipe(best["genome"])])

    def best(self, state: RunState) -> dict:
        """The best candidate scored so far (ties keep the earlier)."""
        best = state.recipe[0]
        for c in state.recipe[1:]:
            if c["score"] > best["score"]:
                best = c
        return best

    def build_output(self, state: RunState) -> str:
        best = self.best(state)
        self.build(best["genome"])
        return (
            f"the best recipe found ({self.genome.record.name} over {self.genome.groups} layer group(s); "
            f"generation {best['generation']}, candidate {best['candidate']}; {RECIPE_FILE})"
        )

    def _write_recipe(self, x: list[float]) -> str:
        return write_yaml(
            os.path.join(self.cfg.out, RECIPE_FILE),
            self.genome.mapping(x),
            "the best recipe of this `evolve --search recipe` run: "
            "python -m evolver_kernels.merge --config recipe.yaml --out DIR",
        )

    def _history_entry(self, state: RunState, generation: int) -> dict:
        """generation, population_fitness (the generation's candidates' scores), accepted (the candidates that
        were the best so far when scored), best, per_file (the best's) and the dev examples scored."""
        scored = [c for c in state.recipe if c["generation"] == generation]
        before = [c["score"] for c in state.recipe if c["generation"] < generation]
        record, improved = max(before, default=-math.inf), []
        for c in scored:
            if c["score"] > record:
                record = c["score"]
                improved.append(c["candidate"])
        best = self.best(state)
        return {
            "generation": generation,
            "population_fitness": [c["score"] for c in scored],
            "accepted": improved,
            "best": best["score"],
            "per_file": best["per_file"],
            **self.examples_counted(state),
        }

    def _save(self, state: RunState) -> None:
        if self.ranks.is_main:
            self.checkpoint.save(state, None, [])
