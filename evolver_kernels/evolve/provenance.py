"""What a run read, recorded so that --resume can prove it reads the same: every model directory's and dev
file's files with their sizes and modification times (a Hub id's by its resolved snapshot, i.e. its revision), and
every path option as the real path it named. A resumed run whose inputs changed since it started is refused in one
line naming the input (its result would match neither the original run nor a fresh one); the same path spelled
another way (`out/run/`, `./out/run`, an absolute path) is the same input."""

from __future__ import annotations

import os
from typing import Any

from evolver_kernels.evolve.config import ConfigError, EvolveConfig
from evolver_kernels.io.model_io import TOKENIZER_FILES

# the options that name files or directories: compared as the real paths they name
PATH_OPTIONS = ("models", "dev", "select", "base_model", "out", "population_dir", "device_map")
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def canonical(value: Any) -> Any:
    """A path option's value with each existing local path as its real path (Hub ids and other text as given)."""
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    return value


def differing_options(recorded: dict[str, Any], now: dict[str, Any], recorded_paths: dict | None) -> list[str]:
    """The options whose values differ, path options compared as real paths (`recorded_paths`: the real paths the
    run recorded when it started; None for a checkpoint written before they were recorded)."""
    differ = []
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if key in PATH_OPTIONS:
            a = recorded_paths[key] if recorded_paths and key in recorded_paths else canonical(a)
            b = canonical(b)
        if a != b:
            differ.append(key)
    return differ


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _files_of_model(model_dir: str) -> dict[str, list[int]]:
    """The files a run reads from a model directory: config, tokenizer, every weight file (safetensors, shards,
    index, pickle weights): name -> [size, mtime_ns]."""
    found = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        weights = name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt"))
        if os.path.isfile(path) and (weights or name in MODEL_FILES):
            found[name] = _stat(path)
    return found


def _files_of_data(path: str) -> dict[str, list[int]]:
    """A dev file's [size, mtime_ns], or every file of a data directory (datasets, lm-eval task folders)."""
    if os.path.isfile(path):
        return {os.path.basename(path): _stat(path)}
    found = {}
    for top, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(top, name)
            found[os.path.relpath(full, path)] = _stat(full)
    return found


def record_inputs(cfg: EvolveConfig) -> dict[str, Any]:
    """The run's inputs as they are now (kept in the checkpoint's state)."""
    models = [
        {"ref": m, "path": os.path.realpath(cfg.local(m)), "files": _files_of_model(cfg.local(m))} for m in cfg.models
    ]
    record = {
        "paths": {k: canonical(getattr(cfg, k)) for k in PATH_OPTIONS if getattr(cfg, k) is not None},
        "--models": models,
        "--dev": [{"path": os.path.realpath(d), "files": _files_of_data(d)} for d in cfg.dev or []],
        "--select": [{"path": os.path.realpath(d), "files": _files_of_data(d)} for d in cfg.select or []],
    }
    if cfg.base_model:
        base = cfg.local(cfg.base_model)
        record["--base-model"] = [
            {"ref": cfg.base_model, "path": os.path.realpath(base), "files": _files_of_model(base)}
        ]
    return record


def check_same_inputs(recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuses a resume whose inputs differ from those recorded when the run started (None: a checkpoint written
    before inputs were recorded, accepted as before)."""
    if recorded is None:
        return
    for option in ("--models", "--base-model", "--dev", "--select"):
        for was, now_entry in zip(recorded.get(option, []), now.get(option, [])):
            name = was.get("ref") or was["path"]
            if was.get("ref") and was["path"] != now_entry["path"]:
                raise ConfigError(
                    f"--resume: {option} {name} resolves to {now_entry['path']}, not to {was['path']} as when the run "
                    "started (another Hub revision?): pin the revision (org/name@commit) the run started with, "
                    "or start a new run"
                )
            if was["files"] != now_entry["files"]:
                changed = sorted(
                    k
                    for k in set(was["files"]) | set(now_entry["files"])
                    if was["files"].get(k) != now_entry["files"].get(k)
                )
                raise ConfigError(
                    f"--resume: {option} {name} changed since the run started ({', '.join(changed[:3])}"
                    f"{' and more' if len(changed) > 3 else ''}: other size or modification time); the resumed "
                    "run would match neither the original run nor a fresh one: restore it, or start a new run"
                )
