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
import json
import os
import sys

import torch
import yaml

from . import merge_stats, merging, model_io
from .arena import Arena, Layout, resolve_names, safetensors_files, tensor_index
from .evaluate import Evaluator, infer_task
from .offspring import WeightPipeline
from .population import make_population

METHODS = merging.METHODS
NEEDS_DATA = merge_stats.STATS_METHODS


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
    parser.add_argument("--population-on", choices=("cpu", "disk"), default="cpu")
    parser.add_argument("--out", required=True, help="output model directory")
    args = parser.parse_args(argv)
    spec: dict = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"--config {args.config}: no such file")
        with open(args.config) as f:
            raw = yaml.safe_load(f) or {}
        known = {"merge_method", "base_model", "models", "parameters", "dtype", "dev"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"--config {args.config}: unknown key(s) {', '.join(unknown)}")
        spec["method"] = raw.get("merge_method")
        spec["base"] = raw.get("base_model")
        models = raw.get("models") or []
        spec["models"] = [m["model"] if isinstance(m, dict) else m for m in models]
        spec["weights"] = [float(((m.get("parameters") or {}) if isinstance(m, dict) else {}).get("weight", 1.0)) for m in models]
        params = raw.get("parameters") or {}
        for key in ("density", "scale", "drop_p", "seed", "examples", "alpha", "task"):
            if key in params:
                spec[key] = params[key]
        if raw.get("dev"):
            spec["dev"] = list(raw["dev"])
        if "lambda" in params:
            spec["scale"] = params["lambda"]
    for key in ("method", "models", "weights", "base", "density", "scale", "drop_p", "seed", "dev", "task", "examples",
                "alpha"):
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
    density = float(spec.get("density", 1.0))
    scale = float(spec.get("scale", 1.0))
    drop_p = float(spec.get("drop_p", 0.5 if method.startswith("dare") else 0.0))
    seed = int(spec.get("seed", 0))
    examples = int(spec.get("examples", 256))
    alpha = float(spec.get("alpha", 0.5))
    if examples < 1:
        raise ValueError(f"--examples must be positive, got {examples}")

    config = model_io.load_config(models[0])
    task = spec.get("task") or (infer_task(config) if method in NEEDS_DATA else "auto")
    model = model_io.empty_model(config, task)
    layout = Layout.of_model(model)
    files = [safetensors_files(m) for m in models]
    for m, f in zip(models, files):
        resolve_names(layout, tensor_index(f), m)
    out_dir = spec["out"]
    pop = make_population(spec.get("population_on", "cpu"), layout, files, models, torch.device("cpu"),
                          disk_dir=os.path.join(out_dir, "population"))
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
    merger = merging.Merger(method, base, scale=scale, density=density, drop_p=drop_p, seed=seed, weights=weights, **stats)
    merger(pop, arena)
    model_io.save_model(arena, models[0], files[0], out_dir)
    with open(os.path.join(out_dir, "merge.json"), "w") as f:
        json.dump({"method": method, "models": models, "weights": weights, "base": base_dir, "density": density,
                   "scale": scale, "drop_p": drop_p, "seed": seed, "dev": dev, "examples": examples, "alpha": alpha},
                  f, indent=2)
    if spec.get("population_on") == "disk":
        import shutil

        shutil.rmtree(os.path.join(out_dir, "population"), ignore_errors=True)
    log(f"merged {len(models)} models with {method} into {out_dir}")
    return out_dir


def main(argv=None) -> int:
    try:
        run(parse_args(argv), log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
