"""Atomic checkpoints of an evolution run, for --resume.

Layout under <out>/checkpoint/: state.json (the run's progress, written last, by rename) and
individuals/ind<i>-v<version>.safetensors (an individual that differs from its model directory). A new
individual file gets a new name and becomes current only when state.json names it, so a run killed at any
moment resumes from the last state.json with files that match it; files it does not name are leftovers
of an interrupted step and are deleted.
"""

from __future__ import annotations

import json
import os
import re

from safetensors import SafetensorError

from evolver_kernels.errors import UserError
from evolver_kernels.evolve.provenance import check_same_inputs, differing_options
from evolver_kernels.evolve.state import STATE_VERSION, RunState
from evolver_kernels.storage.population import Population

STATS_SUFFIX = "-stats.safetensors"
# the names save() gives individual files, and the temporary names of their atomic writes (population.py)
OUR_FILE = re.compile(r"ind\d+-v\d+\.safetensors(\.tmp-\d+|\.tmp-link)?")


class Checkpoint:
    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, "checkpoint")
        self.state_path = os.path.join(self.dir, "state.json")
        self.ind_dir = os.path.join(self.dir, "individuals")

    def check(self) -> None:
        """The checkpoint folders are real directories (a symlink could lead writes and deletions elsewhere)."""
        for path in (self.dir, self.ind_dir):
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                raise UserError(
                    f"{path} is not a directory of ours (a symlink or a file): remove it or choose another --out"
                )

    def exists(self) -> bool:
        return os.path.isfile(self.state_path)

    def load_state(self) -> RunState:
        try:
            with open(self.state_path) as f:
                doc = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(
                f"{self.state_path}: not a readable checkpoint ({err}); the run cannot resume from it"
            ) from None
        if not isinstance(doc, dict) or doc.get("state_version") != STATE_VERSION:
            raise UserError(f"{self.state_path}: written by another version of evolver-kernels")
        try:
            return RunState.from_json(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{self.state_path}: not a readable checkpoint ({type(err).__name__}: {err})") from None

    def save(self, state: RunState, pop: Population | None, changed: list[int]) -> None:
        """Writes the individuals in `changed` under new names, then state.json pointing at them."""
        self.check()
        os.makedirs(self.ind_dir, exist_ok=True)
        for i in changed:
            state.file_version += 1
            name = f"ind{i}-v{state.file_version}.safetensors"
            pop.save(i, os.path.join(self.ind_dir, name))
            state.individual_files[i] = name
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        self.remove_unreferenced(state.individual_files)

    def finished(self) -> bool:
        return self.exists() and self.load_state().finished

    def mark_finished(self, state: RunState) -> None:
        """After the outputs are written: the individual files are no longer needed (they can be N model
        copies); state.json stays as the record of the run."""
        state.finished = True
        state.individual_files = {}
        self.save(state, None, [])
        for name in os.listdir(self.dir):
            if name.endswith(STATS_SUFFIX):  # merge statistics (initial.py)
                os.remove(os.path.join(self.dir, name))

    def stats_path(self, method: str) -> str:
        """Where a merge method's statistics are kept for --resume."""
        return os.path.join(self.dir, f"{method}{STATS_SUFFIX}")

    def resume(self, config: dict, inputs: dict, n: int, generations: int) -> RunState:
        """The checkpointed state, if it is this run's: written with the same `config` (refused naming every option
        that differs; path options compared as the real paths they name), from the same `inputs` (provenance.py),
        and a state this run can be in (`n` individuals, `generations`): a checkpoint edited or written by another
        run is refused in one line, never resumed."""
        state = self.load_state()
        paths = (state.inputs or {}).get("paths")
        differing = differing_options(state.config, config, paths)
        if differing:
            raise UserError(
                "--resume with a different configuration: "
                + ", ".join(f"{k} (checkpoint {state.config.get(k)!r}, now {config.get(k)!r})" for k in differing)
            )
        check_same_inputs(state.inputs, inputs)
        problem = _impossible(state, n, generations)
        if problem:
            raise UserError(f"{self.state_path}: {problem}: not a state of this run (edited?); it cannot resume")
        return state

    def restore(self, state: RunState, pop: Population, cleanup: bool = True) -> None:
        """Loads the individuals that state.json names into the population (a population whose `writes` is
        False skips them: its node's writer loads them)."""
        for i, name in state.individual_files.items():
            path = os.path.join(self.ind_dir, name)
            try:
                pop.load(i, path)
            except (OSError, SafetensorError, ValueError) as err:
                raise UserError(
                    f"{path}: unreadable checkpointed individual ({' '.join(str(err).split())}); "
                    "the run cannot resume from this checkpoint"
                ) from None
        if cleanup:
            self.remove_unreferenced(state.individual_files)

    def remove_unreferenced(self, files: dict[int, str]) -> None:
        """Deletes our own individual files (and leftovers of interrupted writes) that state.json does not name;
        anything else in the folder is left alone."""
        if not os.path.isdir(self.ind_dir) or os.path.islink(self.ind_dir):
            return
        keep = set(files.values())  # the names state.json refers to
        for name in os.listdir(self.ind_dir):
            path = os.path.join(self.ind_dir, name)
            if name not in keep and OUR_FILE.fullmatch(name) and not os.path.islink(path) and os.path.isfile(path):
                os.remove(path)


def _impossible(state: RunState, n: int, generations: int) -> str | None:
    """Why `state` cannot be a state of a run of `n` individuals and `generations` generations, or None."""
    if not isinstance(state.generation, int) or not 0 <= state.generation <= generations + 1:
        return f"generation {state.generation!r} is outside 0 .. {generations + 1} (--generations {generations})"
    if not isinstance(state.position, int) or not 0 <= state.position <= n:
        return f"position {state.position!r} is outside 0 .. {n} (the population's size)"
    if len(state.history) != state.generation:
        return f"{len(state.history)} generations in its history, at generation {state.generation}"
    if state.fitness is not None and len(state.fitness) != n:
        return f"{len(state.fitness)} fitness values for {n} individuals"
    if state.control is not None and len(state.control) != n:
        return f"{len(state.control)} control parameter pairs for {n} individuals"
    if any(not 0 <= i < n for i in [*state.individual_files, *state.pending, *state.per_file]):
        return f"an individual outside 0 .. {n - 1}"
    return None
