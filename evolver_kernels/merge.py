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
    # or slices: [{sources: [{model, layer_range: [first, end], parameters}], parameters}]: layer stacking
    # (passthrough) or layer ranges merged layer by layer; a parameter value may be a gradient over layers
    # ([0, 0.5, 1]) or conditionals ([{filter: mlp, value: 0.3}, {value: 0.5}]), resolved per tensor
    dtype: bfloat16               # inputs cast to it before merging (we compute in fp32 and round once)
    out_dtype: float32            # the output's dtype (default: dtype)
    tokenizer_source: base        # the base model's tokenizer (default: the first model's)
    dev: [dev_a.jsonl, dev_b.jsonl]   # methods with statistics (fisher, regmean): the data they are estimated on

Weights are streamed (docs/ARCHITECTURE.md §5): never a stack of the models; the population lives on
`--population-on` (mapped, the default: the models' own safetensors files, base model included, read through
read-only memory maps, no copy; cpu: loaded into host memory; disk: copied into memory-mapped files in a
scratch directory under --out). Slices and a `dtype` other than the models' need the models re-laid out: mapped
then writes them into files of that scratch directory and maps them. The merged tensors are computed into a
file there too, mapped MAP_SHARED (the kernel writes its pages back and evicts them under memory pressure, so a
merge's anonymous memory is its chunk buffers, whatever the model's size), then written out as safetensors
shards one tensor at a time, each tensor's blocks punched out of the scratch file once written (Arena.discard);
the scratch directory is removed at the end, also on failure. Disk: about the output's size while the merge runs
and is written out (plus the re-laid-out models and base for slices and dtypes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open

from . import merging, methods, model_io, refs
from .arena import Arena, Entry, Layout, layer_index, resolve_names, safetensors_files, tensor_index, with_layer
from .backends import device_backends
from .config import load_yaml_mapping
from .errors import ArgumentError, UserError, describe_error
from .evaluate import Evaluator, infer_task
from .methods.settings import check_setting, resolve
from .offspring import WeightPipeline
from .population import MappedModels, MemoryPopulation, SharedMemoryPopulation, make_population
from .report import write_json
from .rundir import OutputDir, Scratch, disk_problem, format_bytes

POPULATION_ON = ("mapped", "cpu", "disk")  # where the merge CLI's models are read from (see the docstring)
YAML_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "dev")
RUN_PARAMETERS = {"seed": int, "task": str}  # `parameters:` keys that are options of the run, not of a method
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT = methods.Param("weight", float, 1.0, "", low=0.0, per_model=True)
# mergekit parameters that never change a value (int8_mask: the dtype of its masks) or whose only value read is
# the one our method has (normalize: linear divides by the weights; the task-vector methods take it as a parameter)
MERGEKIT_ONLY = {"int8_mask": None,
                 "normalize": {"average": True},
                 "rescale": {"breadcrumbs": False, "breadcrumbs_ties": False}}
# mergekit keys not read, with what to do instead
REFUSED_KEYS = {
    "modules": "give models: or slices: (one module)",
    "tokenizer": "give tokenizer_source: base, or leave it out (the first model's tokenizer)",
    "chat_template": "the output keeps its tokenizer's template",
}
SLICE_KEYS = ("sources", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")


# the library's argument names (errors.ArgumentError) as this command's flags
FLAGS = {"model_dir": "--models", "path": "--dev", "task": "--task", "metric": "--metric"}


class MergeConfigError(UserError):
    """A merge config or flag that cannot be honoured; the message names the key."""


@dataclasses.dataclass
class Source:
    """A model merged in a slice: its layers [lo, hi) (None: all, mergekit's `models:`) and its own settings."""

    model: str
    layers: tuple[int, int] | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    where: str = ""


@dataclasses.dataclass
class Slice:
    """mergekit's output slice: the sources merged layer by layer, the base (of a method that takes one)."""

    sources: list[Source]
    base: Source | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    where: str = ""

    @property
    def length(self) -> int | None:
        return None if self.sources[0].layers is None else self.sources[0].layers[1] - self.sources[0].layers[0]


@dataclasses.dataclass
class MergeSpec:
    out: str
    method: str = "average"
    models: list[str] = dataclasses.field(default_factory=list)  # merged models (`models:`, --models)
    weights: list[float] | None = None  # --weights (they override the YAML's)
    base: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # --<param> flags (they override the YAML's)
    seed: int = 0
    dev: list[str] = dataclasses.field(default_factory=list)
    task: str | None = None
    dtype: str | None = None  # the output's dtype (out_dtype, --dtype)
    compute_dtype: str | None = None  # mergekit's dtype: the inputs are cast to it before merging
    population_on: str = "mapped"
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # the YAML's global `parameters:`
    model_settings: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per model of `models:`
    slices: list[Slice] | None = None  # mergekit's `slices:`
    tokenizer_from: str | None = None  # tokenizer_source: base -> the base model
    base_model: str | None = None  # the YAML's base_model, whatever role the method gives it (config donor)
    where: str = "--config"
    read_as: str | None = None  # the YAML's merge_method where it is read as another method (mergekit's dare)
    resolved: dict[str, str] = dataclasses.field(default_factory=dict)  # model reference -> local directory

    def local(self, ref: str) -> str:
        return self.resolved.get(ref, ref)


def flag(param: str) -> str:
    return "--" + param.replace("_", "-")


def _parameters(where: str, params, record: methods.MergeMethod, per_model: bool) -> dict[str, Any]:
    """A `parameters:` mapping checked against the method: unknown keys, keys of other methods and global keys
    given per model are refused, never dropped. Values are mergekit settings (a scalar, a gradient list or
    {filter, value} conditionals: methods/settings.py), returned checked and unresolved."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeConfigError(f"{where}: must be a mapping of parameter names to values, got {params!r}")
    out: dict[str, Any] = {}
    for key, value in params.items():
        at = f"{where}: {key}"
        if key == "weight":
            if not record.uses_weights:
                raise MergeConfigError(f"{at} does not apply to {record.name} (it takes no per-model weights)")
            out["weight"] = check_setting(value, WEIGHT.check, at)
            continue
        if key in RUN_PARAMETERS and not per_model:
            if not isinstance(value, RUN_PARAMETERS[key]) or isinstance(value, bool):
                raise MergeConfigError(f"{at} must be {'an integer' if key == 'seed' else 'a string'}, got {value!r}")
            out[key] = value
            continue
        if key in MERGEKIT_ONLY and record.param(key, aliases=True) is None:
            _mergekit_only(record, key, value, at)
            continue
        p = record.param(key, aliases=True)
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
        out[p.name] = check_setting(value, p.check, at)
    return out


def _mergekit_only(record: methods.MergeMethod, key: str, value: Any, where: str) -> None:
    """mergekit's int8_mask (no effect on values) is accepted; normalize only with the value our method has."""
    table = MERGEKIT_ONLY[key]
    if table is None:
        return
    if record.name not in table:
        raise MergeConfigError(f"{where} does not apply to {record.name}")
    try:
        given = methods.registry.boolean(value)
    except ValueError:
        raise MergeConfigError(f"{where} must be true or false, got {value!r}") from None
    if given != table[record.name]:
        raise MergeConfigError(f"{where}: {given} is not supported for {record.name} (it always merges with "
                               f"{key}: {str(table[record.name]).lower()}, mergekit's default)")


def _method(raw: dict, method_flag: str | None, where: str) -> methods.MergeMethod:
    method = method_flag or raw.get("merge_method") or "average"
    if not isinstance(method, str):
        raise MergeConfigError(f"{where}: merge_method must be a string, got {method!r}")
    try:
        return methods.get(method)
    except UserError as err:
        raise MergeConfigError(f"{where}: merge_method: {err}") from None


def _check_keys(raw: dict, where: str) -> None:
    for key in map(str, raw):
        if key in REFUSED_KEYS:
            raise MergeConfigError(f"{where}: {key} is not supported ({REFUSED_KEYS[key]})")
    unknown = sorted(set(map(str, raw)) - set(YAML_KEYS))
    if unknown:
        raise MergeConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(YAML_KEYS)})")
    if (raw.get("models") is not None) + (raw.get("slices") is not None) > 1:
        raise MergeConfigError(f"{where}: give models: or slices:, not both")


def read_yaml(path: str, method_flag: str | None) -> MergeSpec:
    """A mergekit YAML file as a MergeSpec (out left empty); method_flag (--method) wins over the file."""
    raw = load_yaml_mapping(path)
    where = f"--config {path}"
    _check_keys(raw, where)
    record = _method(raw, method_flag, where)
    mergekit_dare = record.name in MERGEKIT_DARE and not _mentions(raw, "drop_p")
    read_as = record.name if mergekit_dare else None
    if mergekit_dare:
        if _mentions(raw, "epsilon"):
            raise MergeConfigError(f"{where}: epsilon does not apply to mergekit's {record.name} (della's parameter)")
        record = methods.get(MERGEKIT_DARE[record.name])
    spec = MergeSpec(out="", method=record.name, where=where, read_as=read_as)
    if raw.get("base_model") is not None:
        if not isinstance(raw["base_model"], str):
            raise MergeConfigError(f"{where}: base_model must be a path, got {raw['base_model']!r}")
        spec.base = spec.base_model = raw["base_model"]
    spec.settings = _parameters(f"{where}: parameters", raw.get("parameters"), record, per_model=False)
    if mergekit_dare:
        spec.settings = {"epsilon": 0.0, "normalize": False, **spec.settings}
    spec.seed = spec.settings.pop("seed", 0)
    spec.task = spec.settings.pop("task", None)
    if raw.get("models") is not None:
        _read_models(spec, raw["models"], record, where)
    elif raw.get("slices") is not None:
        _read_slices(spec, raw["slices"], record, where)
    elif "weight" in spec.settings:
        raise MergeConfigError(f"{where}: parameters: weight is a per-model value (models: - model: PATH, parameters: "
                               "{weight: W}); give the models in the file")
    _read_dtypes(spec, raw, where)
    _read_tokenizer_source(spec, raw, where)
    if raw.get("dev") is not None:
        dev = raw["dev"] if isinstance(raw["dev"], list) else [raw["dev"]]
        if not all(isinstance(d, str) for d in dev):
            raise MergeConfigError(f"{where}: dev must be a list of file paths, got {raw['dev']!r}")
        spec.dev = dev
    return spec


def _read_models(spec: MergeSpec, models: Any, record: methods.MergeMethod, where: str) -> None:
    if not isinstance(models, list):
        raise MergeConfigError(f"{where}: models must be a list of entries (- model: PATH), got {models!r}")
    sources = []
    for n, entry in enumerate(models, 1):
        at = f"{where}: models entry {n}"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise MergeConfigError(f"{at}: needs `model: PATH`, got {entry!r}")
        extra = sorted(set(map(str, entry)) - {"model", "parameters"})
        if extra:
            raise MergeConfigError(f"{at}: unknown key(s) {', '.join(extra)} (an entry has model and parameters)")
        settings = _parameters(f"{at} parameters", entry.get("parameters"), record, per_model=True)
        sources.append(Source(entry["model"], None, settings, f"{at} parameters"))
    base, sources = _place_base(record, spec.base, sources, where, listed_only=False)
    spec.models = [s.model for s in sources]
    spec.model_settings = [s.settings for s in sources]
    if record.yaml_base != "base":
        spec.base = None  # it is one of the models now
    elif base is not None:
        spec.base = base.model


def _read_slices(spec: MergeSpec, slices: Any, record: methods.MergeMethod, where: str) -> None:
    """mergekit's `slices:`: each a list of `sources` (model, layer_range, parameters) of one length, merged
    layer by layer; the output has the layers of every slice in turn."""
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(f"{where}: slices must be a non-empty list of entries (- sources: [...]), got {slices!r}")
    spec.slices = []
    for n, entry in enumerate(slices, 1):
        at = f"{where}: slices entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise MergeConfigError(f"{at}: needs `sources:`, a list of (model, layer_range), got {entry!r}")
        extra = sorted(set(map(str, entry)) - set(SLICE_KEYS))
        if extra:
            raise MergeConfigError(f"{at}: key(s) {', '.join(extra)} not supported (a slice has sources and parameters)")
        sources = [_read_source(src, record, f"{at} sources entry {k}") for k, src in enumerate(entry["sources"], 1)]
        lengths = {s.layers[1] - s.layers[0] for s in sources}
        if len(lengths) > 1:
            raise MergeConfigError(f"{at}: every source must have as many layers (layer_range lengths {sorted(lengths)})")
        base, sources = _place_base(record, spec.base, sources, at, listed_only=True)
        settings = _parameters(f"{at} parameters", entry.get("parameters"), record, per_model=False)
        for key in RUN_PARAMETERS:
            if key in settings:
                raise MergeConfigError(f"{at} parameters: {key} is an option of the whole merge (top-level parameters:)")
        spec.slices.append(Slice(sources, base, settings, f"{at} parameters"))
    counts = {len(s.sources) for s in spec.slices}
    if len(counts) > 1 or len({s.base is None for s in spec.slices}) > 1:
        raise MergeConfigError(f"{where}: slices: every slice must merge as many models (and all or none a base), "
                               f"got {sorted(counts)}")
    seen = dict.fromkeys(s.model for sl in spec.slices for s in sl.sources)
    spec.models = list(seen)
    if record.yaml_base != "base" or spec.slices[0].base is None:
        spec.base = None


def _read_source(entry: Any, record: methods.MergeMethod, at: str) -> Source:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise MergeConfigError(f"{at}: needs `model: PATH` and `layer_range: [FIRST, END]`, got {entry!r}")
    extra = sorted(set(map(str, entry)) - set(SOURCE_KEYS))
    if extra:
        raise MergeConfigError(f"{at}: unknown key(s) {', '.join(extra)} (a source has {', '.join(SOURCE_KEYS)})")
    layers = entry.get("layer_range")
    if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in layers) and 0 <= layers[0] < layers[1]):
        raise MergeConfigError(f"{at}: layer_range must be [FIRST, END] with 0 <= FIRST < END, got {layers!r}")
    settings = _parameters(f"{at} parameters", entry.get("parameters"), record, per_model=True)
    return Source(entry["model"], (layers[0], layers[1]), settings, f"{at} parameters")


def _read_dtypes(spec: MergeSpec, raw: dict, where: str) -> None:
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise MergeConfigError(f"{where}: {key} must be one of {', '.join(DTYPES)}, got {raw[key]!r}")
    spec.compute_dtype = raw.get("dtype")
    spec.dtype = raw.get("out_dtype") or raw.get("dtype")  # mergekit: the output stays in dtype without out_dtype


def _read_tokenizer_source(spec: MergeSpec, raw: dict, where: str) -> None:
    source = raw.get("tokenizer_source")
    if source is None:
        return
    if source != "base":
        raise MergeConfigError(f"{where}: tokenizer_source: {source!r} is not supported (give base, the base model's "
                               "tokenizer, or leave it out for the first model's)")
    if raw.get("base_model") is None:
        raise MergeConfigError(f"{where}: tokenizer_source: base needs a base_model")
    spec.tokenizer_from = raw["base_model"]


# mergekit's dare_linear / dare_ties: each task-vector element kept with probability `density` (default 1), the
# kept task vector L1-rescaled per tensor (`rescale`, default true), no magnitude trim, normalize false by
# default. That is della_linear / della with epsilon 0, which is how a YAML that does not give our drop_p reads
# them (the flags' dare_linear / dare_ties: DARE's drop_p with the paper's 1 / (1 - p), and ties' trim).
MERGEKIT_DARE = {"dare_linear": "della_linear", "dare_ties": "della"}


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def _place_base(record: methods.MergeMethod, base: str | None, sources: list[Source], where: str,
                listed_only: bool) -> tuple[Source | None, list[Source]]:
    """(the base, the merged sources) of a YAML's `models:` (or a slice's `sources:`, listed_only) and
    `base_model:` as mergekit reads them for `record` (MergeMethod.yaml_base): in `models:` mergekit adds a
    base_model that is not listed to the inputs (in a slice it must be listed), and a method then treats it as the
    base (not merged), as the first of the two models it interpolates (slerp), or as one more model (a method
    that gives the base no role)."""
    listed = [s for s in sources if base is not None and _same_model(s.model, base)]
    others = [s for s in sources if not listed or s not in listed]
    own = listed[0] if listed else None
    if base is not None and own is None and listed_only and (record.yaml_base == "first" or record.needs_base
                                                             or record.optional_base):
        raise MergeConfigError(f"{where}: base_model {base} must be one of the slice's sources for {record.name}")
    if own is None and base is not None:
        own = Source(base, None, {}, where)
    if record.yaml_base == "first":
        if base is None:
            raise MergeConfigError(f"{where}: base_model is required by {record.name}: it is the first of the two "
                                   "models (t = 0)")
        if len(others) != 1:
            raise MergeConfigError(f"{where}: models: {record.name} interpolates base_model and exactly one other "
                                   f"model, got {len(others)} others")
        return None, [own, others[0]]
    if base is None:
        return None, sources
    if record.yaml_base == "input":
        return None, sources if listed or listed_only else [*sources, own]
    if record.needs_base or record.optional_base:
        return own, others
    return None, sources


def _mentions(raw: dict, key: str) -> bool:
    """`key` among the global, any model's, slice's or source's parameters of a YAML mapping."""
    entries = raw.get("models") if isinstance(raw.get("models"), list) else []
    slices = raw.get("slices") if isinstance(raw.get("slices"), list) else []
    blocks = [raw.get("parameters")] + [e.get("parameters") for e in entries if isinstance(e, dict)]
    for sl in (s for s in slices if isinstance(s, dict)):
        blocks.append(sl.get("parameters"))
        blocks += [e.get("parameters") for e in sl.get("sources") or [] if isinstance(e, dict)]
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
    parser.add_argument("--population-on", choices=POPULATION_ON, default="mapped",
                        help="mapped (default): read the models' files in place through read-only memory maps; "
                             "cpu: load them into host memory; disk: copy them into a scratch directory under --out "
                             "(the merged tensors are held in a file there with every choice)")
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
    if args["models"] is not None and (spec.model_settings or spec.slices):
        raise MergeConfigError(f"--models: {spec.where} gives the models already (with their parameters)")
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


def _slices(spec: MergeSpec) -> list[Slice]:
    """The slices merged: the YAML's `slices:`, or one of the whole models (`models:`, --models)."""
    if spec.slices is not None:
        return spec.slices
    settings = spec.model_settings if len(spec.model_settings) == len(spec.models) else [{}] * len(spec.models)
    sources = [Source(m, None, s, f"{spec.where}: models entry {k} parameters")
               for k, (m, s) in enumerate(zip(spec.models, settings), 1)]
    return [Slice(sources, Source(spec.base) if spec.base else None)]


def _check(spec: MergeSpec) -> methods.MergeMethod:
    """Everything checkable before loading."""
    record = methods.get(spec.method)
    slices = _slices(spec)
    n = len(slices[0].sources)
    if n < record.min_models:
        raise MergeConfigError("give at least two models to merge (--models or models: in the YAML)")
    given = [("--models", s.model) for sl in slices for s in sl.sources]
    given += [("--base", sl.base.model) for sl in slices if sl.base]
    given += [("--base", b) for b in (spec.base, spec.base_model) if b]
    for option, ref in given:
        try:
            spec.resolved[ref] = refs.resolve(ref)
        except ArgumentError as err:
            raise MergeConfigError(f"{option} {err.detail}") from None
    if spec.weights is not None and len(spec.weights) != n:
        raise MergeConfigError(f"--weights: {len(spec.weights)} given for {n} models")
    if record.max_models is not None and n > record.max_models:
        raise MergeConfigError(f"--models: {record.name} merges exactly {record.max_models} models, got {n}")
    if spec.weights is not None and not record.uses_weights:
        raise MergeConfigError(f"--weights does not apply to {record.name} (it takes no per-model weights)")
    if spec.base and not (record.needs_base or record.optional_base) and record.yaml_base != "base":
        role = "its first model is mergekit's base_model" if record.yaml_base == "first" else "a base has no role in it"
        raise MergeConfigError(f"--base does not apply to {record.name} ({role}): give the models to merge in --models")
    if record.needs_base and slices[0].base is None:
        raise MergeConfigError(f"{record.name} needs a base model (--base or base_model:), the common ancestor of the models")
    if record.statistics is not None and not spec.dev:
        raise MergeConfigError(f"{record.name} estimates statistics on data: give --dev files (or dev: in the YAML)")
    for path in spec.dev:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--dev {path}: no such file")
    settings = record.settings(spec.params, flag)
    for p in record.params:
        if isinstance(settings[p.name], list) and len(settings[p.name]) != n:
            raise MergeConfigError(f"{flag(p.name)}: {len(settings[p.name])} values given for {n} models")
    return record


@dataclasses.dataclass(frozen=True)
class Route:
    """Where an output tensor comes from: its slice, its t (the position of its layer in the slice, for
    gradients) and, per source and for the base, the layer it is read from (None: the same name)."""

    slice: int
    t: float
    layers: tuple[int | None, ...]
    base_layer: int | None = None


def _input_name(name: str, layer: int | None) -> str:
    return name if layer is None or layer_index(name) is None else with_layer(name, layer)


def _routes(layout: Layout, order: list[str], slices: list[Slice], num_layers: int) -> dict[str, Route]:
    """mergekit's plan (plan.py): output layer j is layer idx of its slice, read from layer
    layer_range[0] + idx of each source, t = idx / (n - 1) in a slice of n layers (1 when n = 1); a tensor
    outside the layers (embeddings, final norm, head) has t = 0 and comes from the first slice's sources when it
    is before the layers in the model (`order`: its parameters in order), else from the last slice's."""
    out_layers = []
    for s, sl in enumerate(slices):
        n = num_layers if sl.length is None else sl.length
        out_layers += [(s, idx, n) for idx in range(n)]
    first_layer = next((k for k, name in enumerate(order) if layer_index(name) is not None), len(order))
    routes = {}
    for e in layout.entries:
        i = layer_index(e.name)
        if i is None:
            before = min(order.index(a) for a in e.aliases if a in order) < first_layer
            sl = slices[0] if before else slices[-1]
            routes[e.name] = Route(0 if before else len(slices) - 1, 0.0, (None,) * len(sl.sources))
            continue
        s, idx, n = out_layers[i]

        def layer(src: Source | None, idx=idx) -> int | None:
            return None if src is None or src.layers is None else src.layers[0] + idx

        routes[e.name] = Route(s, idx / (n - 1) if n > 1 else 1.0, tuple(layer(x) for x in slices[s].sources),
                               layer(slices[s].base))
    return routes


def _tensor_settings(record: methods.MergeMethod, spec: MergeSpec, sl: Slice, route: Route,
                     name: str) -> tuple[dict[str, Any], list[float] | None]:
    """The method's settings and the weights for one output tensor (mergekit's parameter_resolver): a shared
    parameter from the slice's, then the global parameters (the output tensor's name for filters), a per-model
    one from the source's own, the slice's, then the global ones (the input tensor's name); flags win."""
    shared = [(sl.settings, sl.where), (spec.settings, f"{spec.where}: parameters")]
    inputs = [_input_name(name, layer) for layer in route.layers]

    def per_model(key: str, check) -> list | None:
        values = [resolve([(src.settings, src.where), *shared], key, n, route.t, check)
                  for src, n in zip(sl.sources, inputs)]
        return values if any(v is not None for v in values) else None

    settings: dict[str, Any] = {}
    for p in record.params:
        if p.name in spec.params:
            settings[p.name] = spec.params[p.name]
        elif p.per_model:
            values = per_model(p.name, p.check)
            if values is not None:
                values = [p.default if v is None else v for v in values]
                settings[p.name] = values[0] if len(set(values)) == 1 else values
        elif (value := resolve(shared, p.name, name, route.t, p.check)) is not None:
            settings[p.name] = value
    weights = spec.weights
    if weights is None and record.uses_weights and (values := per_model("weight", WEIGHT.check)) is not None:
        weights = [1.0 if w is None else w for w in values]
    return settings, weights


def _groups(record: methods.MergeMethod, spec: MergeSpec, slices: list[Slice], layout: Layout,
            routes: dict[str, Route]) -> list[merging.TensorGroup]:
    """The output tensors grouped by their settings and weights (one group when nothing varies by tensor)."""
    groups: dict[str, merging.TensorGroup] = {}
    for e in layout.entries:
        route = routes[e.name]
        settings, weights = _tensor_settings(record, spec, slices[route.slice], route, e.name)
        key = repr((sorted(settings.items()), weights))
        groups.setdefault(key, ([], settings, weights))[0].append(e)
    return list(groups.values())


def _fill(arena: Arena, routes: dict[str, Route], source: Callable[[Route], tuple[Source, int | None]],
          spec: MergeSpec) -> Arena:
    """`arena` (the output layout) filled tensor by tensor from the checkpoints `source(route)` names (a model
    and the layer to read), cast to the arena's dtypes."""
    indexes: dict[str, dict] = {}
    by_file: dict[str, list[tuple[Entry, str]]] = {}
    for e in arena.layout.entries:
        src, layer = source(routes[e.name])
        if src.model not in indexes:
            indexes[src.model] = tensor_index(safetensors_files(spec.local(src.model)))
        index = indexes[src.model]
        key = next((k for k in (_input_name(a, layer) for a in e.aliases) if k in index), None)
        if key is None:
            beyond = f" (layer_range {list(src.layers)} beyond its layers?)" if src.layers else ""
            raise MergeConfigError(f"{src.model}: no tensor {_input_name(e.name, layer)}{beyond}")
        if tuple(index[key][2]) != e.shape:
            raise MergeConfigError(f"{src.model}: {key} has shape {list(index[key][2])}, expected {list(e.shape)}")
        by_file.setdefault(index[key][0], []).append((e, key))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for e, key in items:
                arena.view(e).copy_(f.get_tensor(key))
    return arena


def _load_restacked(spec: MergeSpec, slices: list[Slice], layout: Layout, routes: dict[str, Route],
                    scratch: Scratch) -> tuple[Any, Arena | None]:
    """The population of the merged sources (individual k: the k-th source of each tensor's slice) and the base,
    in the output layout and dtype, one individual at a time. With --population-on mapped (or disk) they are
    files in the scratch directory, mapped MAP_SHARED: no anonymous copy of a model is held."""
    n = len(slices[0].sources)
    cpu = torch.device("cpu")
    if spec.population_on == "mapped":  # a file-backed MemoryPopulation (its class serves a node's ranks too)
        pop = SharedMemoryPopulation(layout, n, scratch.path, writes=True)
    else:
        pop = make_population(spec.population_on, layout, [], [], cpu, disk_dir=scratch.path, extra=n)
    for k in range(n):
        def source(r: Route, k=k) -> tuple[Source, int | None]:
            return slices[r.slice].sources[k], r.layers[k]

        if isinstance(pop, MemoryPopulation):
            _fill(pop.arenas[k], routes, source, spec)
            continue
        arena = _fill(Arena.empty(layout), routes, source, spec)
        pop.begin_write(k)
        for group in layout.groups:
            pop.write(k, group, 0, arena.buffers[group])
        pop.commit_write(k)
    base = None
    if slices[0].base is not None:
        base = _fill(_scratch_arena(spec, layout, scratch, "base"), routes,
                     lambda r: (slices[r.slice].base, r.base_layer), spec)
    return pop, base


def _relaid_copies(spec: MergeSpec, identity: bool, slices: list[Slice]) -> int:
    """How many model copies a merge writes into its scratch directory besides the merged tensors."""
    copies = len(slices[0].sources) + (slices[0].base is not None)
    if spec.population_on == "disk":
        return copies
    return 0 if identity or spec.population_on == "cpu" else copies


def _scratch_arena(spec: MergeSpec, layout: Layout, scratch: Scratch, name: str) -> Arena:
    """A zero-filled arena for the merge's own working copies: in host memory with --population-on cpu, else
    files in the scratch directory mapped MAP_SHARED (the kernel may write them back and evict them)."""
    return Arena.empty(layout) if spec.population_on == "cpu" else Arena.on_files(layout, scratch.path, name)


def _cast(layout: Layout, dtype: str | None) -> Layout:
    """`layout` with its floating-point tensors in `dtype` (mergekit's dtype: inputs cast before merging)."""
    if dtype is None:
        return layout
    return Layout.from_params((e.aliases, DTYPES[dtype] if layout.group_dtype(e.group).is_floating_point
                               else layout.group_dtype(e.group), e.shape) for e in layout.entries)


def _save_layout(arena: Arena, donor: str, out_dir: str, dtype: torch.dtype | None, num_layers: int | None,
                 shard_bytes: int = 2 << 30) -> list[str]:
    """The merge as an HF model directory when its tensors are not the donor checkpoint's (stacked layers, a
    dtype cast before merging): each tensor under the name the donor gives it, the donor's other tensors
    (buffers), its config (with num_layers and dtype), generation config and tokenizer files. Returns the paths."""
    index = tensor_index(safetensors_files(donor))
    entries = {next((a for a in e.aliases if a in index), e.name): e for e in arena.layout.entries}
    aliases = {a for e in arena.layout.entries for a in e.aliases}
    buffers = sorted(set(index) - aliases)
    for key in buffers:
        if layer_index(key) is not None and num_layers is not None:
            raise MergeConfigError(f"{donor}: {key} is a layer's stored buffer, which layer stacking does not carry")

    def stored(key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if key in entries:
            return arena.layout.group_dtype(entries[key].group), entries[key].shape
        return index[key][1], index[key][2]

    specs = []
    for key in sorted([*entries, *buffers]):
        stored_dtype, shape = stored(key)
        specs.append((key, dtype if dtype is not None and stored_dtype.is_floating_point else stored_dtype, shape))
    paths = model_io.write_shards(out_dir, specs, model_io.output_tensors(arena, entries, index, dtype), shard_bytes,
                                  written=model_io.discard_written(arena, entries))
    with open(os.path.join(donor, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = str(dtype).removeprefix("torch.")
    if num_layers is not None:
        key = getattr(model_io.load_config(donor), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
        config[key] = num_layers
        if isinstance(config.get("layer_types"), list):  # one entry per layer in newer configs
            config["layer_types"] = [config["layer_types"][0]] * num_layers
    paths.append(write_json(os.path.join(out_dir, "config.json"), config))
    return paths + _copy_files(donor, out_dir, ("generation_config.json",) + model_io.TOKENIZER_FILES)


def _copy_files(src: str, out_dir: str, names: tuple[str, ...]) -> list[str]:
    """Copies the files `names` that `src` has into out_dir (and removes those it lacks there)."""
    paths = []
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            paths.append(os.path.join(out_dir, name))
            shutil.copyfile(os.path.join(src, name), paths[-1])
        elif os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    return paths


def _check_vocabulary(spec: MergeSpec) -> None:
    """tokenizer_source: base is the base's tokenizer file for file: every model must have its vocabulary
    (mergekit would move embeddings onto the base's vocabulary, which is not done here)."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(spec.local(spec.tokenizer_from)).get_vocab()
    for m in spec.models:
        if AutoTokenizer.from_pretrained(spec.local(m)).get_vocab() != want:
            raise MergeConfigError(f"{spec.where}: tokenizer_source: base: {m}'s vocabulary differs from the base "
                                   "model's (moving embeddings onto another vocabulary is not supported)")


def run(spec: MergeSpec, log=print) -> str:
    """Merges spec.models into spec.out (claimed: rundir.py); returns the output directory."""
    record = _check(spec)
    slices = _slices(spec)
    models = [spec.local(m) for m in spec.models]
    base_dir = spec.local(slices[0].base.model) if slices[0].base else None
    inputs = [("--models", m) for m in models] + [("--base", base_dir)] * bool(base_dir) + [("--dev", d) for d in spec.dev]
    if spec.tokenizer_from:
        _check_vocabulary(spec)
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
        donor = models[0]
        stacked = None
        if spec.slices is not None:
            donor = spec.local(spec.base_model or slices[0].sources[0].model)  # mergekit's config donor
            config = copy.deepcopy(model_io.load_config(donor))
            stacked = sum(sl.length for sl in slices)
            config.num_hidden_layers = stacked
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = [config.layer_types[0]] * stacked
        model = model_io.empty_model(config, task)
        native = Layout.of_model(model)
        layout = _cast(native, spec.compute_dtype)
        identity = stacked is None and layout.fingerprint() == native.fingerprint()
        files = [safetensors_files(m) for m in models]
        if identity:
            for m, f in zip(spec.models, files):
                resolve_names(layout, tensor_index(f), m)
        elif record.statistics is not None:
            raise MergeConfigError(f"{record.name} estimates statistics on the models as they are: slices and a dtype "
                                   "other than theirs are not supported")
        order = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        num_layers = 1 + max((layer_index(e.name) for e in layout.entries if layer_index(e.name) is not None),
                             default=-1)
        routes = _routes(layout, order, slices, num_layers)
        groups = _groups(record, spec, slices, layout, routes)
        settings = record.settings(groups[0][1])
        if spec.read_as:
            log(f"merge: {spec.where}: mergekit's {spec.read_as} (bernoulli drops keeping `density`, L1-rescaled) is "
                f"{record.name} with epsilon 0; the drops are our Philox draws, not torch's")
        log(f"merge: {len(slices[0].sources)} models of {format_bytes(layout.nbytes)} with {record.phrase(settings)}"
            f"{f' ({len(groups)} groups of tensor settings)' if len(groups) > 1 else ''}; population on "
            f"{spec.population_on}; backends: cpu runs {device_backends(['cpu'])['cpu']}")
        direct = record.copies and not identity  # passthrough's slices: the re-laid-out model is the output
        # the merge's working files (the output before it is written, models re-laid out): removed at the end
        relaid = 0 if direct else _relaid_copies(spec, identity, slices) * layout.nbytes
        problem = disk_problem([("the merged tensors", spec.out, layout.nbytes),
                                ("the models re-laid out", spec.out, relaid)])
        if problem:
            raise MergeConfigError(f"--out {spec.out}: {problem} (the merge's scratch files, before its output)")
        scratch = Scratch(spec.out, "--out")
        base = None
        if identity:
            pop = MappedModels(layout, files, models) if spec.population_on == "mapped" else \
                make_population(spec.population_on, layout, files, models, torch.device("cpu"), disk_dir=scratch.path)
            if base_dir and spec.population_on == "mapped":
                base = MappedModels(layout, [safetensors_files(base_dir)], [spec.base])
            elif base_dir:
                base = model_io.load_model_arena(layout, safetensors_files(base_dir), spec.base,
                                                 _scratch_arena(spec, layout, scratch, "base"))
        elif not direct:
            pop, base = _load_restacked(spec, slices, layout, routes, scratch)
        arena = Arena.on_files(layout, scratch.path, "merged")  # the merge's result, until it is written out
        if direct:
            _fill(arena, routes, lambda r: (slices[r.slice].sources[0], r.layers[0]), spec)
        stats = None
        if record.statistics is not None:
            from transformers import AutoTokenizer

            model_io.attach_arena(model, arena, files[0])
            evaluator = Evaluator(task, AutoTokenizer.from_pretrained(models[0]), spec.dev, config=config)
            pipeline = WeightPipeline(pop, torch.device("cpu"))
            stats = merging.compute_statistics(record.name, settings, model, layout,
                                               lambda k: pipeline.copy_into(k, arena), len(spec.models), evaluator)
        if not direct:
            merging.merge_per_tensor(record.name, pop, arena, groups, base, seed=spec.seed, stats=stats)
            pop.close()
        if isinstance(base, MappedModels):
            base.close()
        claimed.clear_recorded()  # an earlier merge's outputs here (e.g. shards this one does not write)
        dtype = DTYPES[spec.dtype] if spec.dtype else None
        if identity:
            written = model_io.save_model(arena, models[0], files[0], spec.out, dtype=dtype, discard=True)
        else:
            written = _save_layout(arena, donor, spec.out, dtype or layout.group_dtype(layout.entries[0].group),
                                   stacked)
        if spec.tokenizer_from:
            copied = _copy_files(spec.local(spec.tokenizer_from), spec.out, model_io.TOKENIZER_FILES)
            written = [p for p in written if os.path.basename(p) not in model_io.TOKENIZER_FILES] + copied
        written.append(write_json(os.path.join(spec.out, "merge.json"), {
            "method": record.name, "mergekit_method": spec.read_as, "models": spec.models,
            "weights": groups[0][2] or [1.0] * len(slices[0].sources),
            "base": spec.base, **settings, "seed": spec.seed, "dev": spec.dev, "dtype": spec.dtype,
            "compute_dtype": spec.compute_dtype, "tokenizer_source": "base" if spec.tokenizer_from else None,
            "slices": [[[s.model, list(s.layers)] for s in sl.sources] for sl in spec.slices or []] or None,
            "per_tensor": [{"tensors": [e.name for e in entries], **record.settings(s), "weights": w}
                           for entries, s, w in groups] if len(groups) > 1 else None,
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
    log(f"merged {len(slices[0].sources)} models with {record.phrase(settings)} into {spec.out}")
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
