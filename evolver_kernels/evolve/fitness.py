"""The fitness modes (`--fitness`): what a candidate is, what it must beat, what acceptance changes and what the
run outputs, behind one interface, so the generation loop (evolve.Run) has no branch on the mode.

- individual: the offspring alone is built into the evaluation model's arena and scored; it must beat its
  parent's score; the output is the best individual.
- merged: the population's merge (--merge-method) with the offspring in its slot is scored; it must beat the
  merged population's score; the output is the merge of the evolved population (the reference code's setting).

A mode works on a `Workbench`: the run's weight pipeline, evaluation arena, evaluation, timing, ranks and
acceptance rule (evolve.Run is one). Scores that reach a mode are finite or -inf (evolve.Run.evaluate ranks
NaN last).
"""

from __future__ import annotations

import abc
from typing import Protocol

from evolver_kernels.evaluation.evaluator import Fitness, Rival
from evolver_kernels.evolve.state import RunState
from evolver_kernels.evolve.strategies import OffspringSpec, best_index


class Workbench(Protocol):
    n: int
    pipeline: object  # offspring.WeightPipeline
    arena: object  # the evaluation model's Arena
    ranks: object  # distributed.Ranks

    def evaluate(self, what: str, rival: Rival | None = None) -> Fitness: ...
    def rival(self, outcomes: dict[str, str] | None, score: float) -> Rival | None: ...
    def timed(self, fn, *args, **kw) -> None: ...
    def better(self, new: float, old: float) -> bool: ...
    def spec(self, generation: int, i: int, fitness: list[float] | None) -> OffspringSpec: ...
    def source(self, i: int) -> str: ...


class FitnessMode(abc.ABC):
    name: str
    merges = False  # whether the score of a candidate is a merge's

    def __init__(self, bench: Workbench):
        self.bench = bench

    def evaluations(self, generations: int, synchronous: bool) -> int:
        """Evaluations of a whole run (for the progress bar)."""
        return self.initial_evaluations() + generations * self.bench.n

    @abc.abstractmethod
    def initial_evaluations(self) -> int: ...

    @abc.abstractmethod
    def score_initial(self, state: RunState, progress) -> None:
        """Scores the initial population into `state`; progress(k) after k evaluations."""

    @abc.abstractmethod
    def candidate(self, state: RunState, spec: OffspringSpec) -> Fitness:
        """Builds the candidate of offspring spec.i into the evaluation model and scores it against the model it
        must beat (early rejection: an incomplete Fitness when it cannot win)."""

    @abc.abstractmethod
    def to_beat(self, state: RunState, i: int) -> float:
        """The score offspring i must beat."""

    @abc.abstractmethod
    def accept(self, state: RunState, spec: OffspringSpec, fit: Fitness) -> None:
        """Sequential schedule: offspring spec.i replaces its parent (its candidate is still in the arena)."""

    @abc.abstractmethod
    def end_synchronous(self, state: RunState, generation: int, progress) -> list[int]:
        """Synchronous schedule: decides the generation from state.pending, applies it; returns the accepted."""

    @abc.abstractmethod
    def population_fitness(self, state: RunState): ...

    @abc.abstractmethod
    def best(self, state: RunState) -> float: ...

    @abc.abstractmethod
    def per_file(self, state: RunState) -> dict[str, float]:
        """The per-dev-file scores of the model the run would output now."""

    @abc.abstractmethod
    def describe(self, state: RunState) -> str: ...

    @abc.abstractmethod
    def build_output(self, state: RunState) -> str:
        """Puts the run's output model into the arena; returns a phrase saying what it is."""

    def _apply(self, specs: list[OffspringSpec]) -> None:
        self.bench.timed(self.bench.pipeline.apply, specs)


class IndividualFitness(FitnessMode):
    name = "individual"

    def initial_evaluations(self) -> int:
        return self.bench.n

    def score_initial(self, state: RunState, progress) -> None:
        bench = self.bench
        fits = {}
        for i in range(bench.n):
            if bench.ranks.mine(i):
                bench.timed(bench.pipeline.copy_into, i, bench.arena)
                fits[i] = _message(bench.evaluate(f"individual {i}"))
            progress(1)
        fits = bench.ranks.gather(fits)
        state.fitness = [fits[i]["score"] for i in range(bench.n)]
        state.per_file = {i: fits[i]["per_file"] for i in range(bench.n)}
        state.outcomes = {i: fits[i]["outcomes"] for i in range(bench.n)}

    def candidate(self, state: RunState, spec: OffspringSpec) -> Fitness:
        self.bench.timed(self.bench.pipeline.offspring_into, spec, self.bench.arena)
        rival = self.bench.rival(state.outcomes.get(spec.i), state.fitness[spec.i])  # its parent
        return self.bench.evaluate(f"the offspring of individual {spec.i}", rival)

    def to_beat(self, state: RunState, i: int) -> float:
        return state.fitness[i]

    def accept(self, state: RunState, spec: OffspringSpec, fit: Fitness) -> None:
        self.bench.timed(self.bench.pipeline.write_from, spec.i, self.bench.arena)  # the offspring is in the arena
        state.fitness[spec.i] = fit.score
        state.per_file[spec.i] = fit.per_file
        state.outcomes[spec.i] = fit.outcomes

    def end_synchronous(self, state: RunState, generation: int, progress) -> list[int]:
        # the offspring scored (all of them, unless --max-evaluations cut the generation short)
        accepted = [i for i in sorted(state.pending) if self.bench.better(state.pending[i], state.fitness[i])]
        specs = [self.bench.spec(generation, i, state.fitness) for i in accepted]
        self._apply(specs)
        for i in accepted:
            state.fitness[i] = state.pending[i]
            state.per_file[i] = state.pending_per_file[i]
            state.outcomes[i] = state.pending_outcomes.get(i)
        return accepted

    def population_fitness(self, state: RunState):
        return list(state.fitness)

    def best(self, state: RunState) -> float:
        return max(state.fitness)

    def per_file(self, state: RunState) -> dict[str, float]:
        return state.per_file[best_index(state.fitness)]

    def describe(self, state: RunState) -> str:
        return "[" + ", ".join(f"{f:.4f}" for f in state.fitness) + "]"

    def build_output(self, state: RunState) -> str:
        best = best_index(state.fitness)
        self.bench.timed(self.bench.pipeline.copy_into, best, self.bench.arena)
        return f"the best individual (#{best}, from {self.bench.source(best)})"


class MergedFitness(FitnessMode):
    name = "merged"
    merges = True

    def evaluations(self, generations: int, synchronous: bool) -> int:
        # synchronous: offspring accepted together are also scored together, once per generation
        return 1 + generations * (self.bench.n + synchronous)

    def initial_evaluations(self) -> int:
        return 1

    def score_initial(self, state: RunState, progress) -> None:
        bench = self.bench
        if bench.ranks.is_main:
            bench.timed(bench.pipeline.merged_into, bench.arena)
        fit = bench.ranks.broadcast(_message(bench.evaluate("the merged population")) if bench.ranks.is_main else None)
        state.merged_fitness = fit["score"]
        state.merged_per_file = fit["per_file"]
        state.merged_outcomes = fit["outcomes"]
        progress(1)

    def candidate(self, state: RunState, spec: OffspringSpec) -> Fitness:
        self.bench.timed(self.bench.pipeline.merged_into, self.bench.arena, replace=[spec])
        rival = self.bench.rival(state.merged_outcomes, state.merged_fitness)  # the merged population
        return self.bench.evaluate(f"the merge with the offspring of individual {spec.i}", rival)

    def to_beat(self, state: RunState, i: int) -> float:
        return state.merged_fitness

    def accept(self, state: RunState, spec: OffspringSpec, fit: Fitness) -> None:
        self._apply([spec])
        state.merged_fitness = fit.score
        state.merged_per_file = fit.per_file
        state.merged_outcomes = fit.outcomes

    def end_synchronous(self, state: RunState, generation: int, progress) -> list[int]:
        bench = self.bench
        accepted = [i for i in sorted(state.pending) if bench.better(state.pending[i], state.merged_fitness)]
        if len(accepted) > 1:
            # Each offspring improved the merged model alone; together they may not. Score them together
            # and keep the better of the combination and the best single offspring, so the merged fitness
            # never decreases.
            specs = [bench.spec(generation, i, state.fitness) for i in accepted]
            if bench.ranks.is_main:
                bench.timed(bench.pipeline.merged_into, bench.arena, replace=specs)
            combined = bench.ranks.broadcast(
                _message(bench.evaluate("the accepted offspring together")) if bench.ranks.is_main else None
            )
            progress(1)
            state.evaluations += 1
            best = max(accepted, key=lambda i: (state.pending[i], -i))
            if combined["score"] < state.pending[best]:
                accepted = [best]
                state.merged_fitness = state.pending[best]
                state.merged_per_file = state.pending_per_file[best]
                state.merged_outcomes = state.pending_outcomes.get(best)
            else:
                state.merged_fitness = combined["score"]
                state.merged_per_file = combined["per_file"]
                state.merged_outcomes = combined["outcomes"]
        elif accepted:
            state.merged_fitness = state.pending[accepted[0]]
            state.merged_per_file = state.pending_per_file[accepted[0]]
            state.merged_outcomes = state.pending_outcomes.get(accepted[0])
        self._apply([bench.spec(generation, i, state.fitness) for i in accepted])
        return accepted

    def population_fitness(self, state: RunState):
        return state.merged_fitness

    def best(self, state: RunState) -> float:
        return state.merged_fitness

    def per_file(self, state: RunState) -> dict[str, float]:
        return state.merged_per_file

    def describe(self, state: RunState) -> str:
        return f"{state.merged_fitness:.4f} (merged)"

    def build_output(self, state: RunState) -> str:
        self.bench.timed(self.bench.pipeline.merged_into, self.bench.arena)
        return f"the merge ({self.bench.pipeline.merger.describe()}) of the evolved population"


def _message(fit: Fitness) -> dict:
    """A fully scored Fitness as rank 0 broadcasts it: score, per-file scores and outcomes."""
    return {**fit.as_dict(), "outcomes": fit.outcomes}


FITNESS: dict[str, type[FitnessMode]] = {mode.name: mode for mode in (IndividualFitness, MergedFitness)}
