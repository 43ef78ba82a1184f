"""The state of an evolution run: a typed record, saved as the checkpoint's state.json after every evaluation
(checkpoint.py) and read back by --resume, so a resumed run decides exactly as an uninterrupted one.

JSON has string keys only; individuals are ints here and strings in the file (to_json / from_json convert).
The file format is STATE_VERSION 1: per_file holds the individuals' per-dev-file scores under their index and
the merged model's under "merged". The records of early rejection, the example counts, the adapted control
parameters, the inputs' record and the recipe search's candidates were added to it later with defaults, so a checkpoint written before them still resumes (its first candidates of each
individual are then scored in full, in the default order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

STATE_VERSION = 1


@dataclasses.dataclass
class RunState:
    config: dict[str, Any]  # the options that define the result (what --resume must match)
    generation: int = 0  # the generation in progress; 0 until the initial population is scored
    position: int = 0  # how many individuals of this generation were visited
    fitness: list[float] | None = None  # per individual (fitness individual)
    merged_fitness: float | None = None  # the merged population's (fitness merged)
    per_file: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # individuals' per-file scores
    merged_per_file: dict[str, float] | None = None
    pending: dict[int, float] = dataclasses.field(default_factory=dict)  # synchronous: this generation's offspring
    pending_per_file: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    # early rejection's records (evaluation/early_reject.py): per dev file, a character for each example (wrong,
    # or right and how sure) of each individual (fitness individual), of the merged population (fitness merged) and of this
    # generation's fully scored offspring (synchronous); None where the metric has no per-example outcomes
    outcomes: dict[int, dict[str, str] | None] = dataclasses.field(default_factory=dict)
    merged_outcomes: dict[str, str] | None = None
    pending_outcomes: dict[int, dict[str, str] | None] = dataclasses.field(default_factory=dict)
    examples_scored: int = 0  # examples scored in the generation in progress
    examples_full: int = 0  # examples full evaluations would have scored in it
    accepted_now: list[int] = dataclasses.field(default_factory=list)
    # --adapt (adaptation.py): each individual's [F, CR]; None when every offspring uses --F and --CR
    control: list[list[float]] | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evaluations: int = 0
    individual_files: dict[int, str] = dataclasses.field(default_factory=dict)  # checkpointed individuals
    file_version: int = 0
    finished: bool = False
    # what the run read when it started (provenance.py): None in a checkpoint written before it was recorded
    inputs: dict[str, Any] | None = None
    # --search recipe (recipe.py): every candidate scored, in order: generation, candidate, genome, score, per_file
    recipe: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        per_file = {str(k): v for k, v in self.per_file.items()}
        if self.merged_per_file is not None:
            per_file["merged"] = self.merged_per_file
        return {
            "state_version": STATE_VERSION,
            "config": self.config,
            "generation": self.generation,
            "position": self.position,
            "fitness": self.fitness,
            "merged_fitness": self.merged_fitness,
            "per_file": per_file,
            "pending": {str(k): v for k, v in self.pending.items()},
            "pending_per_file": {str(k): v for k, v in self.pending_per_file.items()},
            "outcomes": {str(k): v for k, v in self.outcomes.items()},
            "merged_outcomes": self.merged_outcomes,
            "pending_outcomes": {str(k): v for k, v in self.pending_outcomes.items()},
            "examples_scored": self.examples_scored,
            "examples_full": self.examples_full,
            "accepted_now": self.accepted_now,
            "control": self.control,
            "history": self.history,
            "evaluations": self.evaluations,
            "individual_files": {str(k): v for k, v in self.individual_files.items()},
            "file_version": self.file_version,
            "finished": self.finished,
            "inputs": self.inputs,
            "recipe": self.recipe,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> RunState:
        per_file = dict(doc.get("per_file", {}))
        merged = per_file.pop("merged", None)
        return RunState(
            config=doc["config"],
            generation=doc["generation"],
            position=doc["position"],
            fitness=doc["fitness"],
            merged_fitness=doc["merged_fitness"],
            per_file={int(k): v for k, v in per_file.items()},
            merged_per_file=merged,
            pending={int(k): v for k, v in doc.get("pending", {}).items()},
            pending_per_file={int(k): v for k, v in doc.get("pending_per_file", {}).items()},
            outcomes={int(k): v for k, v in doc.get("outcomes", {}).items()},
            merged_outcomes=doc.get("merged_outcomes"),
            pending_outcomes={int(k): v for k, v in doc.get("pending_outcomes", {}).items()},
            examples_scored=doc.get("examples_scored", 0),
            examples_full=doc.get("examples_full", 0),
            accepted_now=list(doc.get("accepted_now", [])),
            control=doc.get("control"),
            history=list(doc.get("history", [])),
            evaluations=doc.get("evaluations", 0),
            individual_files={int(k): v for k, v in doc.get("individual_files", {}).items()},
            file_version=doc.get("file_version", 0),
            finished=bool(doc.get("finished", False)),
            inputs=doc.get("inputs"),
            recipe=doc.get("recipe"),
        )
