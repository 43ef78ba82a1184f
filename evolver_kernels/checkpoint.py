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

from .errors import UserError
from .population import Population

STATE_VERSION = 1
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
                raise UserError(f"{path} is not a directory of ours (a symlink or a file): remove it or choose another --out")

    def exists(self) -> bool:
        return os.path.isfile(self.state_path)

    def load_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{self.state_path}: not a readable checkpoint ({err}); the run cannot resume from it") from None
        if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
            raise UserError(f"{self.state_path}: written by another version of evolver-kernels")
        return state

    def save(self, state: dict, pop: Population | None, changed: list[int]) -> None:
        """Writes the individuals in `changed` under new names, then state.json pointing at them."""
        self.check()
        os.makedirs(self.ind_dir, exist_ok=True)
        files = dict(state.get("individual_files", {}))
        for i in changed:
            state["file_version"] = state.get("file_version", 0) + 1
            name = f"ind{i}-v{state['file_version']}.safetensors"
            pop.save(i, os.path.join(self.ind_dir, name))
            files[str(i)] = name
        state["individual_files"] = files
        state["state_version"] = STATE_VERSION
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        self.remove_unreferenced(files)

    def finished(self) -> bool:
        return self.exists() and bool(self.load_state().get("finished"))

    def mark_finished(self, state: dict) -> None:
        """After the outputs are written: the individual files are no longer needed (they can be N model
        copies); state.json stays as the record of the run."""
        state = dict(state, finished=True, individual_files={})
        self.save(state, None, [])
        for name in os.listdir(self.dir):
            if name.endswith("-stats.safetensors"):  # Fisher / RegMean statistics (evolve.Run._merge_stats)
                os.remove(os.path.join(self.dir, name))

    def restore(self, state: dict, pop: Population) -> None:
        """Loads the individuals that state.json names into the population."""
        for i, name in state.get("individual_files", {}).items():
            path = os.path.join(self.ind_dir, name)
            try:
                pop.load(int(i), path)
            except (OSError, SafetensorError, ValueError) as err:
                raise UserError(f"{path}: unreadable checkpointed individual ({' '.join(str(err).split())}); "
                                "the run cannot resume from this checkpoint") from None
        self.remove_unreferenced(state.get("individual_files", {}))

    def remove_unreferenced(self, files: dict) -> None:
        """Deletes our own individual files (and leftovers of interrupted writes) that state.json does not name;
        anything else in the folder is left alone."""
        if not os.path.isdir(self.ind_dir) or os.path.islink(self.ind_dir):
            return
        keep = set(files.values())
        for name in os.listdir(self.ind_dir):
            path = os.path.join(self.ind_dir, name)
            if name not in keep and OUR_FILE.fullmatch(name) and not os.path.islink(path) and os.path.isfile(path):
                os.remove(path)
