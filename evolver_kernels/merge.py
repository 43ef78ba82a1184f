"""One-shot merges of Hugging Face model directories: `python -m evolver_kernels.merge`.

    python -m evolver_kernels.merge --config merge.yaml --out merged
    python -m evolver_kernels.merge --method ties --base base_dir --models a b c --density 0.5 --out merged

The YAML follows mergekit's conventions where they fit:

    merge_method: ties            # average | task_arithmetic | ties | dare_linear | dare_ties | fisher | regmean
    base_model: path/to/base      # needed by task_arithmetic, ties and dare_*
    models:
      - model: path/to/a
        parameters: {weight: 1.0}
      - model: path/to/b
    parameters: {density: 0.5, scale: 1.0, drop_p: 0.1, seed: 0}
    dev: [dev_a.jsonl, dev_b.jsonl]   # fisher and regmean: the data their statistics are estimated on
                                      # (parameters: examples (256), alpha (RegMean, 0.5), task)

Weights are streamed (evolver_kernels.merging): never a stack of the models; population on `--population-on`
(cpu: host memory; disk: memory-mapped files under <out>/population).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import merge_stats, merging, model_io
from .arena import Arena, Layout, resolve_names, safetensors_files, tensor_index
from .config import load_yaml_mapping
from .errors import UserError, describe_error
from .evaluate import Evaluator, infer_task
from .offspring import WeightPipeline
from .population import make_population
from .report import write_json
from .rundir import OutputDir, Scratch

METHODS = merging.METHODS
NEEDS_DATA = merge_stats.STATS_METHODS


YAML_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "dev")
# parameters: key -> (spec key, the methods it applies to (None: all), allowed per model too)
PARAMETERS = {
    "weight": ("weights", None, True),
    "density": ("density", ("ties", "dare_ties"), True),
    "scale": ("scale", ("task_arithmetic", "ties", "dare_linear", "dare_ties"), False),
    "lambda": ("scale", ("task_arithmetic", "ties", "dare_linear", "dare_ties"), False),
    "drop_p": ("drop_p", ("dare_linear", "dare_ties"), False),
    "seed": ("seed", ("dare_linear", "dare_ties"), False),
    "examples": ("examples", NEEDS_DATA, False),
    "alpha": ("alpha", ("regmean",), False),
    "task": ("task", NEEDS_DATA, False),
}
ALIASES = {"linear": "average"}  # mergekit's name for the weighted average
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MergeConfigError(UserError):
    """A merge config or flag that cannot be honoured; the message names the key."""


def _number(where: str, value, kind=float):
    if isinstance(value, list):
        raise MergeConfigError(f"{where}: a list (a parameter gradient over layers) is not supported; give one number")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MergeConfigError(f"{where}: must be a number, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise MergeConfigError(f"{where}: must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _parameters(where: str, params, method: str, per_model: bool) -> dict:
    """A `parameters:` mapping checked against the method: unknown keys, keys of other methods and lists are
    refused (never silently dropped)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeConfigError(f"{where}: must be a mapping of parameter names to values, got {params!r}")
    out = {}
    for key, value in params.items():
        if key not in PARAMETERS:
            raise MergeConfigError(f"{where}: unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        target, methods, model_level = PARAMETERS[key]
        if per_model and not model_level:
            raise MergeConfigError(f"{where}: {key} is a global parameter (put it under the top-level parameters:)")
        if methods is not None and method not in methods:
            raise MergeConfigError(f"{where}: {key} does not apply to {method} (it applies to {', '.join(methods)})")
        if key == "task":
            if not isinstance(value, str):
                raise MergeConfigError(f"{where}: task must be a string, got {value!r}")
            out[target] = value
        else:
            out[target] = _number(f"{where}: {key}", value, int if key in ("seed", "examples") else float)
    if "scale" in params and "lambda" in params:
        raise MergeConfigError(f"{where}: give scale or lambda, not both (they are the same parameter)")
    return out


def _read_yaml(path: str, method_flag: str | None) -> dict:
    raw = load_yaml_mapping(path)
    unknown = sorted(set(raw) - set(YAML_KEYS))
    if unknown:
        raise MergeConfigError(f"--config {path}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(YAML_KEYS)})")
    spec: dict = {}
    method = method_flag or raw.get("merge_method") or "average"
    if not isinstance(method, str):
        raise MergeConfigError(f"--config {path}: merge_method must be a string, got {method!r}")
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise MergeConfigError(f"--config {path}: merge_method must be one of {', '.join(METHODS)} (or linear), got {method!r}")
    if raw.get("merge_method") is not None:
        spec["method"] = method
    if raw.get("base_model") is not None:
        if not isinstance(raw["base_model"], str):
            raise MergeConfigError(f"--config {path}: base_model must be a path, got {raw['base_model']!r}")
        spec["base"] = raw["base_model"]
    glob = _parameters(f"--config {path}: parameters", raw.get("parameters"), method, per_model=False)
    models = raw.get("models")
    if models is None and "weights" in glob:
        raise MergeConfigError(f"--config {path}: parameters: weight is given per model (models: - model: PATH, parameters: {{weight: W}})")
    if models is not None:
        if not isinstance(models, list):
            raise MergeConfigError(f"--config {path}: models must be a list of entries (- model: PATH), got {models!r}")
        spec["models"], per_model = [], []
        for n, entry in enumerate(models, 1):
            where = f"--config {path}: models entry {n}"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
                raise MergeConfigError(f"{where}: needs `model: PATH`, got {entry!r}")
            extra = sorted(set(entry) - {"model", "parameters"})
            if extra:
                raise MergeConfigError(f"{where}: unknown key(s) {', '.join(map(str, extra))} (an entry has model and parameters)")
            spec["models"].append(entry["model"])
            per_model.append(_parameters(f"{where} parameters", entry.get("parameters"), method, per_model=True))
        # a model's own parameters override the global ones, as in mergekit
        default_weight = glob.pop("weights", 1.0)
        if default_weight != 1.0 or any("weights" in p for p in per_model):
            spec["weights"] = [p.get("weights", default_weight) for p in per_model]
        if any("density" in p for p in per_model):
            if "density" not in glob and not all("density" in p for p in per_model):
                raise MergeConfigError(f"--config {path}: density is given for some models and not others; give it "
                                       "for every model or under the top-level parameters:")
            spec["density"] = [p.get("density", glob.get("density")) for p in per_model]
            glob.pop("density", None)
    spec.update(glob)
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise MergeConfigError(f"--config {path}: {key} must be one of {', '.join(DTYPES)}, got {raw[key]!r}")
    # mergekit: out_dtype is the output's dtype, defaulting to dtype (we compute in fp32 whatever dtype says)
    if raw.get("out_dtype") or raw.get("dtype"):
        spec["dtype"] = raw.get("out_dtype") or raw.get("dtype")
    if raw.get("dev") is not None:
        dev = raw["dev"] if isinstance(raw["dev"], list) else [raw["dev"]]
        if not all(isinstance(d, str) for d in dev):
            raise MergeConfigError(f"--config {path}: dev must be a list of file paths, got {raw['dev']!r}")
        spec["dev"] = dev
    return spec


def parse_args(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m evolver_kernels.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="mergekit-style YAML (flags below override it)")
    parser.add_argument("--method", choices=METHODS, help="merge method (default: average)")
    parser.add_argument("--models", nargs="+", help="model directories to merge")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model (default: 1 each)")
    parser.add_argument("--base", help="base model directory (the common ancestor)")
    parser.add_argument("--density", type=float, help="TIES: fraction of each task vector kept (default 1.0)")
    parser.add_argument("--scale", type=float, help="task vector scale, lambda (default 1.0)")
    parser.add_argument("--drop-p", type=float, help="DARE drop probability (default 0.5 for dare_*)")
    parser.add_argument("--seed", type=int, help="DARE seed (default 0)")
    parser.add_argument("--dev", nargs="+", help="fisher, regmean: dev data files (JSONL, CSV/TSV) for their statistics")
    parser.add_argument("--task", help="fisher, regmean: task of the dev data (default: from the architecture)")
    parser.add_argument("--examples", type=int, help="fisher, regmean: dev examples used (default 256)")
    parser.add_argument("--alpha", type=float, help="regmean: factor on the Gram matrices' off-diagonals (default 0.5)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the output's tensors (default: the models')")
    parser.add_argument("--population-on", choices=("cpu", "disk"), default="cpu")
    parser.add_argument("--out", required=True, help="output model directory (new, empty, or an earlier merge's)")
    args = parser.parse_args(argv)
    spec: dict = _read_yaml(args.config, args.method) if args.config else {}
    for key in ("method", "models", "weights", "base", "density", "scale", "drop_p", "seed", "dev", "task", "examples",
                "alpha", "dtype"):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    spec["out"] = args.out
    spec["population_on"] = args.population_on
    return spec


def run(spec: dict, log=print) -> str:
    method = spec.get("method") or "average"
    if method not in METHODS:
        raise ValueError(f"merge method must be one of {', '.join(METHODS)}, got {method!r}")
    models = spec.get("models") or []
    if len(models) < 2:
        raise ValueError("give at least two models to merge (--models or models: in the YAML)")
    for m in models + ([spec["base"]] if spec.get("base") else []):
        if not os.path.isdir(m):
            raise FileNotFoundError(f"{m}: no such model directory")
    weights = spec.get("weights") or [1.0] * len(models)
    if len(weights) != len(models):
        raise ValueError(f"--weights: {len(weights)} given for {len(models)} models")
    base_dir = spec.get("base")
    if method in merging.NEEDS_BASE and not base_dir:
        raise ValueError(f"{method} needs a base model (--base or base_model:), the common ancestor of the models")
    dev = spec.get("dev") or []
    if method in NEEDS_DATA and not dev:
        raise ValueError(f"{method} estimates statistics on data: give --dev files (or dev: in the YAML)")
    for path in dev:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--dev {path}: no such file")
    density = spec.get("density", 1.0)
    if isinstance(density, list) and len(density) != len(models):
        raise ValueError(f"density: {len(density)} given for {len(models)} models")
    scale = float(spec.get("scale", 1.0))
    drop_p = float(spec.get("drop_p", 0.5 if method.startswith("dare") else 0.0))
    seed = int(spec.get("seed", 0))
    examples = int(spec.get("examples", 256))
    alpha = float(spec.get("alpha", 0.5))
    if examples < 1:
        raise ValueError(f"--examples must be positive, got {examples}")
    dtype = DTYPES[spec["dtype"]] if spec.get("dtype") else None
    out_dir = spec["out"]
    inputs = [("--models", m) for m in models] + [("--base", base_dir)] * bool(base_dir) + [("--dev", d) for d in dev]
    claimed = OutputDir.claim(out_dir, "merge", inputs)
    scratch = None
    try:
        config = model_io.load_config(models[0])
        task = spec.get("task") or (infer_task(config) if method in NEEDS_DATA else "auto")
        model = model_io.empty_model(config, task)
        layout = Layout.of_model(model)
        files = [safetensors_files(m) for m in models]
        for m, f in zip(models, files):
            resolve_names(layout, tensor_index(f), m)
        if spec.get("population_on") == "disk":
            scratch = Scratch(out_dir, "--out")
        pop = make_population(spec.get("population_on", "cpu"), layout, files, models, torch.device("cpu"),
                              disk_dir=scratch.path if scratch else None)
        arena = Arena.empty(layout)
        base = None
        if base_dir:
            base_files = safetensors_files(base_dir)
            base = make_population("cpu", layout, [base_files], [base_dir], torch.device("cpu")).arenas[0]
        stats = {}
        if method in NEEDS_DATA:
            from transformers import AutoTokenizer

            model_io.attach_arena(model, arena, files[0])
            evaluator = Evaluator(task, AutoTokenizer.from_pretrained(models[0]), dev, config=config)

            pipeline = WeightPipeline(pop, torch.device("cpu"))

            def load(k: int) -> None:
                pipeline.copy_into(k, arena)

            stats = merge_stats.merger_statistics(method, model, layout, load, len(models), evaluator, examples, alpha)
        merger = merging.Merger(method, base, scale=scale, density=density, drop_p=drop_p, seed=seed, weights=weights,
                                **stats)
        merger(pop, arena)
        if hasattr(pop, "close"):
            pop.close()
        claimed.clear_recorded()  # an earlier merge's outputs here (e.g. shards this one does not write)
        written = model_io.save_model(arena, models[0], files[0], out_dir, dtype=dtype)
        written.append(write_json(os.path.join(out_dir, "merge.json"), {
            "method": method, "models": models, "weights": weights, "base": base_dir, "density": density,
            "scale": scale, "drop_p": drop_p, "seed": seed, "dev": dev, "examples": examples, "alpha": alpha,
            "dtype": spec.get("dtype")}))
        claimed.record(written)
    except BaseException:
        if scratch is not None:
            scratch.remove()
        claimed.release(remove_if_unused=True)
        raise
    if scratch is not None:
        scratch.remove()
    claimed.release()
    log(f"merged {len(models)} models with {method} into {out_dir}")
    return out_dir


def main(argv=None) -> int:
    try:
        run(parse_args(argv), log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
