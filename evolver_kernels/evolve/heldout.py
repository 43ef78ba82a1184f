"""Held-out selection (`--select FILES`, `--select-fraction P`): data the search never sees, and the choice of
the run's output on it, so that the output is never worse there than any model the user brought.

`--select-fraction P` splits each dev file once, before anything is scored (HeldOut): the examples of each
stratum (the gold label; the set of labels for multi-label rows; one stratum for tasks without labels), in
sorted order of the strata, are ordered by `random_order(derive_seed(seed, 0, f, PURPOSE_SELECT), n_s, s)` (f
the file's position among the dev files, s the stratum's position, n_s its size) and the first
floor(P * n_s + 1/2) are held out for selection (halves rounded up); the search scores the others. `--select FILES` names selection
files instead (one per domain, read like dev files). Without either, nothing changes.

The output (choose): the run's result (its merged model, or its best individual), then every input model, then
each `--extra-individuals` merge of the input models, are built into the evaluation model in that order and
scored on the selection data; a candidate replaces the one chosen so far only when strictly better, so a tie
keeps the run's result, and the output is at least as good on the selection data as every input model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.base import Fitness
from evolver_kernels.kernels.rng import PURPOSE_SELECT, derive_seed, random_order


def _stratum(example: dict):
    label = example.get("label")
    return tuple(label) if isinstance(label, list) else label


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """--select-fraction: which examples of each dev file are held out for selection (the module docstring)."""

    fraction: float
    seed: int

    def split(self, f: int, path: str, examples: list[dict]) -> tuple[list[int], list[int]]:
        """(searched, held out) positions of dev file f's examples, each in file order."""
        strata: dict = {}
        for j, example in enumerate(examples):
            strata.setdefault(_stratum(example), []).append(j)
        file_seed = derive_seed(self.seed, 0, f, PURPOSE_SELECT)
        held: list[int] = []
        for s, key in enumerate(sorted(strata, key=lambda k: (k is None, k))):
            rows = strata[key]
            order = random_order(file_seed, len(rows), s)
            held += [rows[k] for k in order[: math.floor(self.fraction * len(rows) + 0.5)]]
        if not held or len(held) == len(examples):
            raise ArgumentError(
                "select_fraction",
                f"{self.fraction}: {path} has {len(examples)} examples, too few to "
                "hold out that share for selection and search on the rest",
            )
        kept = set(held)
        return [j for j in range(len(examples)) if j not in kept], sorted(held)

    def part(self, held_out: bool) -> Callable[[int, str, list[dict]], list[dict]]:
        """The examples of each dev file that the search (held_out False) or the selection (True) scores."""

        def subset(f: int, path: str, examples: list[dict]) -> list[dict]:
            return [examples[j] for j in self.split(f, path, examples)[held_out]]

        return subset


@dataclasses.dataclass
class Candidate:
    """A model the output may be: `build()` puts it into the evaluation model and returns what it is, in words."""

    name: str  # how evolution.json and the model card name it
    build: Callable[[], str]


@dataclasses.dataclass
class Choice:
    chosen: int  # the candidate output
    phrase: str  # what it is, in words (its build()'s)
    scores: list[dict]  # per candidate: name, score, per_file (on the selection data)

    def margin(self) -> float | None:
        """How much the chosen candidate beats the best other one by (None with a single candidate)."""
        others = [s["score"] for k, s in enumerate(self.scores) if k != self.chosen]
        return self.scores[self.chosen]["score"] - max(others) if others else None

    def record(self, data: str) -> dict:
        """The `selection` entry of evolution.json."""
        return {
            "data": data,
            "candidates": self.scores,
            "chosen": self.scores[self.chosen]["name"],
            "margin_over_next_best": self.margin(),
        }


def choose(candidates: list[Candidate], score: Callable[[str], Fitness], log: Callable[[str], None]) -> Choice:
    """Builds and scores each candidate in order (score(what) scores the evaluation model on the selection
    data); leaves the chosen one in the evaluation model. Ties keep the earlier candidate."""
    scores, best, phrase = [], 0, ""
    for k, candidate in enumerate(candidates):
        built = candidate.build()
        fit = score(f"{candidate.name} on the selection data")
        scores.append({"name": candidate.name, "score": fit.score, "per_file": fit.per_file})
        log(f"selection: {candidate.name}: {fit.score:.4f}")
        if k == 0 or fit.score > scores[best]["score"]:
            best, phrase = k, built
    if best != len(candidates) - 1:
        candidates[best].build()
    return Choice(best, phrase, scores)


def describe_data(select: list[str] | None, fraction: float | None) -> str:
    """The selection data of a run, in words."""
    if select:
        return f"--select {' '.join(select)}"
    return f"--select-fraction {fraction}: held out of each dev file (seeded, stratified by label)"
