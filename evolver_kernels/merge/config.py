"""mergekit's YAML read into a MergeSpec (read_yaml): every key honoured or refused in one line naming it; the
method's parameters checked against the registry (methods/). The format is in the command's help (cli.py)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from evolver_kernels import methods
from evolver_kernels.errors import UserError
from evolver_kernels.io.jsonio import load_yaml_mapping
from evolver_kernels.methods.settings import check_setting

POPULATION_ON = ("mapped", "cpu", "disk")  # where the merge CLI's models are read from (see the docstring)
YAML_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "dev",
)
RUN_PARAMETERS = {"seed": int, "task": str}  # `parameters:` keys that are options of the run, not of a method
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a per-model weight: any finite number here, >= 0 but for a method with signed_weights (weight_check)
WEIGHT = methods.WEIGHT
# mergekit parameters that never change a value (int8_mask: the dtype of its masks) or whose only value read is
# the one our method has (normalize: linear divides by the weights; the task-vector methods take it as a parameter)
MERGEKIT_ONLY = {
    "int8_mask": None,
    "normalize": {"average": True},
    "rescale": {"breadcrumbs": False, "breadcrumbs_ties": False},
}
# mergekit keys not read, with what to do instead
REFUSED_KEYS = {
    "modules": "give models: or slices: (one module)",
    "tokenizer": "give tokenizer_source: base, or leave it out (the first model's tokenizer)",
    "chat_template": "the output keeps its tokenizer's template",
}
SLICE_KEYS = ("sources", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")


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


def weight_check(record: methods.MergeMethod):
    """The check of one per-model weight for `record`: any finite number for a method with signed_weights
    (task_arithmetic: task negation), else >= 0, the refusal saying why."""
    if record.signed_weights:
        return WEIGHT.check

    def check(value: Any, where: str) -> float:
        value = WEIGHT.check(value, where)
        if value < 0:
            raise MergeConfigError(
                f"{where} must be >= 0 for {record.name}, got {value:g} (a negative weight, task negation, is "
                "task_arithmetic's with normalize false: elsewhere a sum of weights it divides by could be zero)"
            )
        return value

    return check


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
            out["weight"] = check_setting(value, weight_check(record), at)
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
        raise MergeConfigError(
            f"{where}: {given} is not supported for {record.name} (it always merges with "
            f"{key}: {str(table[record.name]).lower()}, mergekit's default)"
        )


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
    return read_mapping(load_yaml_mapping(path), method_flag, f"--config {path}")


def read_mapping(raw: dict, method_flag: str | None = None, where: str = "the merge config") -> MergeSpec:
    """A mergekit config, as its YAML reads, as a MergeSpec (out left empty); `where` names it in errors."""
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
        raise MergeConfigError(
            f"{where}: parameters: weight is a per-model value (models: - model: PATH, parameters: "
            "{weight: W}); give the models in the file"
        )
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
    if record.yaml_base_role != "base":
        spec.base = None  # it is one of the models now
    elif base is not None:
        spec.base = base.model


def _read_slices(spec: MergeSpec, slices: Any, record: methods.MergeMethod, where: str) -> None:
    """mergekit's `slices:`: each a list of `sources` (model, layer_range, parameters) of one length, merged
    layer by layer; the output has the layers of every slice in turn."""
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(
            f"{where}: slices must be a non-empty list of entries (- sources: [...]), got {slices!r}"
        )
    spec.slices = []
    for n, entry in enumerate(slices, 1):
        at = f"{where}: slices entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise MergeConfigError(f"{at}: needs `sources:`, a list of (model, layer_range), got {entry!r}")
        extra = sorted(set(map(str, entry)) - set(SLICE_KEYS))
        if extra:
            raise MergeConfigError(
                f"{at}: key(s) {', '.join(extra)} not supported (a slice has sources and parameters)"
            )
        sources = [_read_source(src, record, f"{at} sources entry {k}") for k, src in enumerate(entry["sources"], 1)]
        lengths = {s.layers[1] - s.layers[0] for s in sources}
        if len(lengths) > 1:
            raise MergeConfigError(
                f"{at}: every source must have as many layers (layer_range lengths {sorted(lengths)})"
            )
        base, sources = _place_base(record, spec.base, sources, at, listed_only=True)
        settings = _parameters(f"{at} parameters", entry.get("parameters"), record, per_model=False)
        for key in RUN_PARAMETERS:
            if key in settings:
                raise MergeConfigError(
                    f"{at} parameters: {key} is an option of the whole merge (top-level parameters:)"
                )
        spec.slices.append(Slice(sources, base, settings, f"{at} parameters"))
    counts = {len(s.sources) for s in spec.slices}
    if len(counts) > 1 or len({s.base is None for s in spec.slices}) > 1:
        raise MergeConfigError(
            f"{where}: slices: every slice must merge as many models (and all or none a base), got {sorted(counts)}"
        )
    seen = dict.fromkeys(s.model for sl in spec.slices for s in sl.sources)
    spec.models = list(seen)
    if record.yaml_base_role != "base" or spec.slices[0].base is None:
        spec.base = None


def _read_source(entry: Any, record: methods.MergeMethod, at: str) -> Source:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise MergeConfigError(f"{at}: needs `model: PATH` and `layer_range: [FIRST, END]`, got {entry!r}")
    extra = sorted(set(map(str, entry)) - set(SOURCE_KEYS))
    if extra:
        raise MergeConfigError(f"{at}: unknown key(s) {', '.join(extra)} (a source has {', '.join(SOURCE_KEYS)})")
    layers = entry.get("layer_range")
    if not (
        isinstance(layers, list)
        and len(layers) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        and 0 <= layers[0] < layers[1]
    ):
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
        raise MergeConfigError(
            f"{where}: tokenizer_source: {source!r} is not supported (give base, the base model's "
            "tokenizer, or leave it out for the first model's)"
        )
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


def _place_base(
    record: methods.MergeMethod, base: str | None, sources: list[Source], where: str, listed_only: bool
) -> tuple[Source | None, list[Source]]:
    """(the base, the merged sources) of a YAML's `models:` (or a slice's `sources:`, listed_only) and
    `base_model:` as mergekit reads them for `record` (MergeMethod.yaml_base_role): in `models:` mergekit adds a
    base_model that is not listed to the inputs (in a slice it must be listed), and a method then treats it as the
    base (not merged), as the first of the two models it interpolates (slerp), or as one more model (a method
    that gives the base no role: linear, karcher)."""
    role = record.yaml_base_role
    listed = [s for s in sources if base is not None and _same_model(s.model, base)]
    others = [s for s in sources if not listed or s not in listed]
    own = listed[0] if listed else None
    if (
        base is not None
        and own is None
        and listed_only
        and (role == "first" or record.needs_base or record.optional_base)
    ):
        raise MergeConfigError(f"{where}: base_model {base} must be one of the slice's sources for {record.name}")
    if own is None and base is not None:
        own = Source(base, None, {}, where)
    if role == "first":
        if base is None:
            raise MergeConfigError(
                f"{where}: base_model is required by {record.name}: it is the first of the two models (t = 0)"
            )
        if len(others) != 1:
            raise MergeConfigError(
                f"{where}: models: {record.name} interpolates base_model and exactly one other "
                f"model, got {len(others)} others"
            )
        return None, [own, others[0]]
    if base is None:
        return None, sources
    if role == "input":
        return None, sources if listed or listed_only else [*sources, own]
    return own, others


def _mentions(raw: dict, key: str) -> bool:
    """`key` among the global, any model's, slice's or source's parameters of a YAML mapping."""
    entries = raw.get("models") if isinstance(raw.get("models"), list) else []
    slices = raw.get("slices") if isinstance(raw.get("slices"), list) else []
    blocks = [raw.get("parameters")] + [e.get("parameters") for e in entries if isinstance(e, dict)]
    for sl in (s for s in slices if isinstance(s, dict)):
        blocks.append(sl.get("parameters"))
        blocks += [e.get("parameters") for e in sl.get("sources") or [] if isinstance(e, dict)]
    return any(isinstance(b, dict) and key in b for b in blocks)
