"""One-shot merges of Hugging Face model directories: `python -m evolver_kernels.merge`.

    python -m evolver_kernels.merge --config merge.yaml --out merged
    python -m evolver_kernels.merge --method ties --base base_dir --models a b c --density 0.5 --out merged

Methods, their parameters, defaults and ranges come from the registry (evolver_kernels/methods/): each method
parameter is a flag `--<param>` (per-model ones take one value or one per model) and a key of the YAML's
`parameters:`. The YAML follows mergekit's conventions and is read strictly (every key honoured or refused):

    merge_method: ties            # or linear (mergekit's name for average), task_arithmetic, dare_ties, slerp, ...
    base_model: path/to/base      # needed by the task-vector methods; as in mergekit, slerp's first model
                                  # (t = 0) and for karcher one more model merged
    models:
      - model: path/to/a
        parameters: {weight: 1.0, density: 0.3}   # per model: weight, and the method's per-model parameters
      - model: path/to/b
    parameters: {density: 0.5, lambda: 1.0, seed: 0}  # global: the method's parameters (a model's own win),
                                                      # weight (default per model), seed, task
    dtype: bfloat16               # the output's dtype (out_dtype wins); we compute in fp32 whatever it says
    dev: [dev_a.jsonl, dev_b.jsonl]   # methods with statistics (fisher, regmean): the data they are estimated on

Weights are streamed (docs/ARCHITECTURE.md §5): never a stack of the models; the population lives on
`--population-on` (cpu: host memory; disk: memory-mapped files in a scratch directory under --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import torch

from . import merging, methods, model_io, refs
from .arena import Arena, Layout, resolve_names, safetensors_files, tensor_index
from .backends import device_backends
from .config import load_yaml_mapping
from .errors import ArgumentError, UserError, describe_error
from .evaluate import Evaluator, infer_task
from .offspring import WeightPipeline
from .population import make_population
from .report import write_json
from .rundir import OutputDir, Scratch, format_bytes

YAML_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "dev")
RUN_PARAMETERS = {"seed": int, "task": str}  # `parameters:` keys that are options of the run, not of a method
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# the library's argument names (errors.ArgumentError) as this command's flags
FLAGS = {"model_dir": "--models", "path": "--dev", "task": "--task", "metric": "--metric"}


class MergeConfigError(UserError):
    """A merge config or flag that cannot be honoured; the message names the key."""


@dataclasses.dataclass
class MergeSpec:
    out: str
    method: str = "average"
    models: list[str] = dataclasses.field(default_factory=list)
    weights: list[float] | None = None
    base: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's parameters given
    seed: int = 0
    dev: list[str] = dataclasses.field(default_factory=list)
    task: str | None = None
    dtype: str | None = None
    population_on: str = "cpu"
    resolved: dict[str, str] = dataclasses.field(default_factory=dict)  # model reference -> local directory

    def local(self, ref: str) -> str:
        return self.resolved.get(ref, ref)


def flag(param: str) -> str:
    return "--" + param.replace("_", "-")


def _parameters(where: str, params, record: methods.MergeMethod, per_model: bool) -> dict[str, Any]:
    """A `parameters:` mapping checked against the method: unknown keys, keys of other methods, global keys
    given per model and lists (parameter gradients) are refused, never dropped."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeConfigError(f"{where}: must be a mapping of parameter names to values, got {params!r}")
    out: dict[str, Any] = {}
    for key, value in params.items():
        at = f"{where}: {key}"
        if isinstance(value, list):
            raise MergeConfigError(f"{at}: a list (a parameter gradient over layers) is not supported; give one number")
        if key == "weight":
            if not record.uses_weights:
                raise MergeConfigError(f"{at} does not apply to {record.name} (it takes no per-model weights)")
            out["weight"] = methods.Param("weight", float, 1.0, "", low=0.0).check(value, at)
            continue
        if key in RUN_PARAMETERS and not per_model:
            if not isinstance(value, RUN_PARAMETERS[key]) or isinstance(value, bool):
                raise MergeConfigError(f"{at} must be {'an integer' if key == 'seed' else 'a string'}, got {value!r}")
            out[key] = value
            continue
        p = record.param(key)
        if p is None:
            known = [q.name for q in methods.all_params().values()] + ["weight", *RUN_PARAMETERS]
            if key in known or any(key in q.aliases for q in methods.all_params().values()):
                have = ", ".join(q.name for q in record.params) or "none"
                raise MergeConfigError(f"{at} does not apply to {record.name} (its parameters: {have})")
            raise MergeConfigError(f"{where}: unknown parameter {key!r} (known: {', '.join(known)})")
        if per_model and not p.per_model:
            raise MergeConfigError(f"{at} is a global parameter (put it under the top-level parameters:)")
        if p.name in out:
            raise MergeConfigError(f"{where}: {p.name} given twice (as {' and '.join([p.name, *p.aliases])})")
        out[p.name] = p.check(value, at)
    return out


def read_yaml(path: str, method_flag: str | None) -> MergeSpec:
    """A mergekit-style YAML file as a MergeSpec (out left empty); method_flag (--method) wins over the file."""
    raw = load_yaml_mapping(path)
    where = f"--config {path}"
    unknown = sorted(set(map(str, raw)) - set(YAML_KEYS))
    if unknown:
        raise MergeConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(YAML_KEYS)})")
    method = method_flag or raw.get("merge_method") or "average"
    if not isinstance(method, str):
        raise MergeConfigError(f"{where}: merge_method must be a string, got {method!r}")
    try:
        record = methods.get(method)
    except UserError as err:
        raise MergeConfigError(f"{where}: merge_method: {err}") from None
    spec = MergeSpec(out="", method=record.name)
    if record.name in DARE_METHODS and _mentions(raw, "density"):
        # mergekit's dare methods call the fraction DARE keeps `density`; ours is drop_p = 1 - density, and our
        # density (dare_ties) trims by magnitude as TIES does. Read with our meaning it would be another merge.
        raise MergeConfigError(f"{where}: density with {record.name} is mergekit's kept fraction, which is not read "
                               "with that meaning yet: give drop_p (= 1 - density) instead")
    if raw.get("base_model") is not None:
        if not isinstance(raw["base_model"], str):
            raise MergeConfigError(f"{where}: base_model must be a path, got {raw['base_model']!r}")
        spec.base = raw["base_model"]
    glob = _parameters(f"{where}: parameters", raw.get("parameters"), record, per_model=False)
    spec.seed = glob.pop("seed", 0)
    spec.task = glob.pop("task", None)
    default_weight = glob.pop("weight", None)
    models = raw.get("models")
    if models is None and default_weight is not None:
        raise MergeConfigError(f"{where}: parameters: weight is a per-model value (models: - model: PATH, parameters: "
                               "{weight: W}); give the models in the file")
    if models is not None:
        if not isinstance(models, list):
            raise MergeConfigError(f"{where}: models must be a list of entries (- model: PATH), got {models!r}")
        per_model = []
        for n, entry in enumerate(models, 1):
            at = f"{where}: models entry {n}"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
                raise MergeConfigError(f"{at}: needs `model: PATH`, got {entry!r}")
            extra = sorted(set(map(str, entry)) - {"model", "parameters"})
            if extra:
                raise MergeConfigError(f"{at}: unknown key(s) {', '.join(extra)} (an entry has model and parameters)")
            spec.models.append(entry["model"])
            per_model.append(_parameters(f"{at} parameters", entry.get("parameters"), record, per_model=True))
        spec.models, per_model = _place_base(record, spec.base, spec.models, per_model, where)
        if record.yaml_base != "base":
            spec.base = None  # it is one of the models now
        # a model's own parameters override the global ones, as in mergekit
        if default_weight is not None or any("weight" in p for p in per_model):
            spec.weights = [p.get("weight", 1.0 if default_weight is None else default_weight) for p in per_model]
        for p in record.params:
            if p.per_model and any(p.name in q for q in per_model):
                if p.name not in glob and not all(p.name in q for q in per_model):
                    raise MergeConfigError(f"{where}: {p.name} is given for some models and not others; give it for "
                                           "every model or under the top-level parameters:")
                glob[p.name] = [q.get(p.name, glob.get(p.name)) for q in per_model]
    spec.params = glob
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise MergeConfigError(f"{where}: {key} must be one of {', '.join(DTYPES)}, got {raw[key]!r}")
    spec.dtype = raw.get("out_dtype") or raw.get("dtype")  # mergekit: out_dtype defaults to dtype
    if raw.get("dev") is not None:
        dev = raw["dev"] if isinstance(raw["dev"], list) else [raw["dev"]]
        if not all(isinstance(d, str) for d in dev):
            raise MergeConfigError(f"{where}: dev must be a list of file paths, got {raw['dev']!r}")
        spec.dev = dev
    return spec


DARE_METHODS = ("dare_linear", "dare_ties")


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def _place_base(record: methods.MergeMethod, base: str | None, models: list[str], per_model: list[dict],
                where: str) -> tuple[list[str], list[dict]]:
    """The merged models of a YAML's `models:` and `base_model:` as mergekit reads them for `record`
    (MergeMethod.yaml_base): mergekit adds a base_model that is not listed to the inputs, and a method then
    treats it as the base (not merged: a listed entry equal to it is dropped), as the first of the two
    models it interpolates (slerp), or as one more model (a method that gives the base no role)."""
    if record.yaml_base == "first":
        if base is None:
            raise MergeConfigError(f"{where}: base_model is required by {record.name}: it is the first of the two "
                                   "models (t = 0)")
        others = [(m, p) for m, p in zip(models, per_model) if not _same_model(m, base)]
        own = [p for m, p in zip(models, per_model) if _same_model(m, base)]
        if len(others) != 1:
            raise MergeConfigError(f"{where}: models: {record.name} interpolates base_model and exactly one other "
                                   f"model, got {len(others)} others")
        return [base, others[0][0]], [own[0] if own else {}, others[0][1]]
    if base is None:
        return models, per_model
    if record.yaml_base == "input":
        if any(_same_model(m, base) for m in models):
            return models, per_model
        return [*models, base], [*per_model, {}]
    if record.needs_base or record.optional_base:
        kept = [(m, p) for m, p in zip(models, per_model) if not _same_model(m, base)]
        return [m for m, _ in kept], [p for _, p in kept]
    return models, per_model


def _mentions(raw: dict, key: str) -> bool:
    """`key` among the global or any model's parameters of a YAML mapping."""
    entries = raw.get("models") if isinstance(raw.get("models"), list) else []
    blocks = [raw.get("parameters")] + [e.get("parameters") for e in entries if isinstance(e, dict)]
    return any(isinstance(b, dict) and key in b for b in blocks)


def build_parser() -> argparse.ArgumentParser:
    """The flags, built now from the registry (methods registered after import are included)."""
    parser = argparse.ArgumentParser(prog="python -m evolver_kernels.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="mergekit-style YAML (flags below override it)")
    names = [name for m in methods.METHODS.values() for name in (m.name, *m.aliases)]
    parser.add_argument("--method", choices=names, help="merge method (default: average)")
    parser.add_argument("--models", nargs="+", help="model directories to merge")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model (default: 1 each)")
    parser.add_argument("--base", help="base model directory (the common ancestor)")
    parser.add_argument("--seed", type=int, help="seed of methods that draw random numbers (DARE; default 0)")
    parser.add_argument("--dev", nargs="+", help="methods with statistics: dev data files (JSONL, CSV/TSV)")
    parser.add_argument("--task", help="methods with statistics: task of the dev data (default: from the architecture)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the output's tensors (default: the models')")
    parser.add_argument("--population-on", choices=("cpu", "disk"), default="cpu")
    parser.add_argument("--out", required=True, help="output model directory (new, empty, or an earlier merge's)")
    group = parser.add_argument_group("method parameters (evolver_kernels/methods/)")
    for name, p in methods.all_params().items():
        users = ", ".join(m.name for m in methods.METHODS.values() if m.param(name) is not None)
        group.add_argument(flag(name), dest=f"param:{name}", type=p.type, nargs="+" if p.per_model else None,
                           metavar=name.upper(), help=f"{p.help}; used by {users}; values: {p.range_text()}"
                                                       f"{' (one, or one per model)' if p.per_model else ''} (default {p.default})")
    return parser


def parse_args(argv: list[str] | None = None) -> MergeSpec:
    args = vars(build_parser().parse_args(argv))
    spec = read_yaml(args["config"], args["method"]) if args["config"] else MergeSpec(out="")
    if args["method"]:
        spec.method = methods.get(args["method"]).name
    for key in ("models", "weights", "base", "seed", "dev", "task", "dtype"):
        if args[key] is not None:
            setattr(spec, key, args[key])
    for key, value in args.items():
        if key.startswith("param:") and value is not None:
            name = key.removeprefix("param:")
            spec.params[name] = value[0] if isinstance(value, list) and len(value) == 1 else value
    spec.out, spec.population_on = args["out"], args["population_on"]
    return spec


def _check(spec: MergeSpec) -> tuple[methods.MergeMethod, dict[str, Any]]:
    """Everything checkable before loading; the method's settings."""
    record = methods.get(spec.method)
    if len(spec.models) < 2:
        raise MergeConfigError("give at least two models to merge (--models or models: in the YAML)")
    for option, ref in [("--models", m) for m in spec.models] + [("--base", spec.base)] * bool(spec.base):
        try:
            spec.resolved[ref] = refs.resolve(ref)
        except ArgumentError as err:
            raise MergeConfigError(f"{option} {err.detail}") from None
    if spec.weights is not None and len(spec.weights) != len(spec.models):
        raise MergeConfigError(f"--weights: {len(spec.weights)} given for {len(spec.models)} models")
    if record.max_models is not None and len(spec.models) > record.max_models:
        raise MergeConfigError(f"--models: {record.name} merges exactly {record.max_models} models, got "
                               f"{len(spec.models)}")
    if spec.weights is not None and not record.uses_weights:
        raise MergeConfigError(f"--weights does not apply to {record.name} (it takes no per-model weights)")
    if spec.base and not (record.needs_base or record.optional_base) and record.yaml_base != "base":
        role = "its first model is mergekit's base_model" if record.yaml_base == "first" else "a base has no role in it"
        raise MergeConfigError(f"--base does not apply to {record.name} ({role}): give the models to merge in --models")
    if record.needs_base and not spec.base:
        raise MergeConfigError(f"{record.name} needs a base model (--base or base_model:), the common ancestor of the models")
    if record.statistics is not None and not spec.dev:
        raise MergeConfigError(f"{record.name} estimates statistics on data: give --dev files (or dev: in the YAML)")
    for path in spec.dev:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--dev {path}: no such file")
    settings = record.settings(spec.params, flag)
    for p in record.params:
        if isinstance(settings[p.name], list) and len(settings[p.name]) != len(spec.models):
            raise MergeConfigError(f"{flag(p.name)}: {len(settings[p.name])} values given for {len(spec.models)} models")
    return record, settings


def run(spec: MergeSpec, log=print) -> str:
    """Merges spec.models into spec.out (claimed: rundir.py); returns the output directory."""
    record, settings = _check(spec)
    models = [spec.local(m) for m in spec.models]
    base_dir = spec.local(spec.base) if spec.base else None
    inputs = [("--models", m) for m in models] + [("--base", base_dir)] * bool(base_dir) + [("--dev", d) for d in spec.dev]
    claimed = OutputDir.claim(spec.out, "merge", inputs)
    scratch = None
    try:
        configs = [model_io.load_config(m) for m in models]
        config = configs[0]
        for m, c in zip(spec.models[1:], configs[1:]):
            if c.model_type != config.model_type:
                raise MergeConfigError(f"--models {m} is a {c.model_type}, {spec.models[0]} a {config.model_type}: "
                                       "the models must share one architecture")
        task = spec.task or (infer_task(config) if record.statistics else "auto")
        model = model_io.empty_model(config, task)
        layout = Layout.of_model(model)
        files = [safetensors_files(m) for m in models]
        for m, f in zip(spec.models, files):
            resolve_names(layout, tensor_index(f), m)
        log(f"merge: {len(spec.models)} models of {format_bytes(layout.nbytes)} with {record.phrase(settings)}; "
            f"population on {spec.population_on}; backends: cpu runs {device_backends(['cpu'])['cpu']}")
        if spec.population_on == "disk":
            scratch = Scratch(spec.out, "--out")
        pop = make_population(spec.population_on, layout, files, models, torch.device("cpu"),
                              disk_dir=scratch.path if scratch else None)
        arena = Arena.empty(layout)
        base = model_io.load_model_arena(layout, safetensors_files(base_dir), spec.base) if base_dir else None
        stats = None
        if record.statistics is not None:
            from transformers import AutoTokenizer

            model_io.attach_arena(model, arena, files[0])
            evaluator = Evaluator(task, AutoTokenizer.from_pretrained(models[0]), spec.dev, config=config)
            pipeline = WeightPipeline(pop, torch.device("cpu"))
            stats = merging.compute_statistics(record.name, settings, model, layout,
                                               lambda k: pipeline.copy_into(k, arena), len(spec.models), evaluator)
        merging.Merger(record.name, base, weights=spec.weights, seed=spec.seed, stats=stats, **settings)(pop, arena)
        pop.close()
        claimed.clear_recorded()  # an earlier merge's outputs here (e.g. shards this one does not write)
        written = model_io.save_model(arena, models[0], files[0], spec.out,
                                      dtype=DTYPES[spec.dtype] if spec.dtype else None)
        written.append(write_json(os.path.join(spec.out, "merge.json"), {
            "method": record.name, "models": spec.models, "weights": spec.weights or [1.0] * len(spec.models),
            "base": spec.base, **settings, "seed": spec.seed, "dev": spec.dev, "dtype": spec.dtype,
            "backends": device_backends(["cpu"]),
            "resolved_models": {ref: path for ref, path in spec.resolved.items() if ref != path}}))
        claimed.record(written)
    except BaseException:
        if scratch is not None:
            scratch.remove()
        claimed.release(remove_if_unused=True)
        raise
    if scratch is not None:
        scratch.remove()
    claimed.release()
    log(f"merged {len(spec.models)} models with {record.phrase(settings)} into {spec.out}")
    return spec.out


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv), log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {describe_error(err, flags=FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the command again (it replaces only the files a merge writes in --out)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
