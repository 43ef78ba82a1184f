"""The options of `python -m evolver_kernels.evolve`, defined once: the dataclass below is the YAML schema, the
argparse parser (flags override the file) and the validation before any heavy work. Choices come from the
registries (strategies.py, methods/, fitness.py, population tiers, backends), and every merge-method parameter
of methods/ is an option `--merge-<param>` (YAML `merge_<param>`), held in EvolveConfig.merge."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

from evolver_kernels import evaluation, methods
from evolver_kernels.errors import UserError
from evolver_kernels.evolve import adaptation, strategies
from evolver_kernels.evolve.fitness import FITNESS
from evolver_kernels.io.jsonio import load_yaml_mapping
from evolver_kernels.kernels.backends import BACKENDS
from evolver_kernels.kernels.rng import PURPOSE_MERGE, derive_seed
from evolver_kernels.storage.population import TIERS

SCHEDULES = ("sequential", "synchronous")
SEARCHES = ("weights", "recipe")


class ConfigError(UserError):
    """An option that cannot work; the message names it."""


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric option's values, declared with the option: validate checks them, --help shows them."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    multiple_of: int | None = None
    text: str | None = None  # how a message says it (default: from the bounds)

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.integer and self.high is None:
            return "a positive integer" if self.low == 1 else "a non-negative integer"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, flag: str, value) -> None:
        """Refuses `value` (named by `flag`) outside the range, in one line."""
        kind = numbers.Integral if self.integer else numbers.Real
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (self.low is None or (value > self.low if self.low_open else value >= self.low))
        ok = ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))
        if not ok:
            raise ConfigError(f"{flag} must be {self.describe()}, got {value}")
        if self.multiple_of and value % self.multiple_of:
            raise ConfigError(f"{flag} must be a multiple of {self.multiple_of}, got {value}")


POSITIVE = Range(1, integer=True)
NON_NEGATIVE = Range(0, integer=True)
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)


def _opt(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class EvolveConfig:
    models: list[str] = _opt(
        None,
        "fine-tunes of one base model: Hugging Face model directories (safetensors) or Hub ids org/name[@revision]",
        nargs="+",
    )
    dev: list[str] = _opt(
        None,
        "development data: JSONL, CSV/TSV or load_from_disk directories; one per domain (--task "
        "lm-eval: folders of lm-eval task YAMLs, optional)",
        nargs="+",
    )
    out: str = _opt(None, "output directory: the fused model, evolution.json, a fitness plot, a model card")
    select: list[str] | None = _opt(
        None,
        "held-out selection data, read like --dev (one file per domain) and never searched on: "
        "the output is the best on it of the run's result, every input model and the "
        "--extra-individuals merges",
        nargs="+",
        later=True,
    )
    select_fraction: float | None = _opt(
        None,
        "hold out this share of each dev file (a seeded split, stratified by label) as selection data (as --select)",
        later=True,
        range=OPEN_UNIT,
    )
    task: str | None = _opt(None, f"{', '.join(evaluation.TASKS)} or module:function (default: from the architecture)")
    metric: str | None = _opt(None, "accuracy, macro-f1, multilabel-f1, neg-loss or exact-match (default: by task)")
    search: str = _opt(
        "weights",
        "weights: evolve every element of the weights (Evolver); recipe: CMA-ES over the --merge-method's "
        "searchable parameters per layer group and model (mergekit-evolve's genome; recipe.py)",
        choices=SEARCHES,
        later=True,
    )
    generations: int = _opt(15, "number of generations", range=NON_NEGATIVE)
    max_evaluations: int | None = _opt(
        None,
        "stop after this many fitness evaluations, the initial ones included (as mergekit-evolve's --max-fevals)",
        later=True,
        range=POSITIVE,
    )
    layer_groups: int | None = _opt(
        None,
        "--search recipe: the models' layers in this many groups of consecutive layers, each with its own "
        "parameters (mergekit-evolve's layer_granularity is the layers per group; default 1)",
        later=True,
        range=POSITIVE,
    )
    sigma0: float | None = _opt(
        None,
        "--search recipe: CMA-ES's initial step size, in the searched intervals' units (default 1/6, "
        "mergekit-evolve's)",
        later=True,
        range=Range(0, 1, low_open=True),
    )
    population_size: int | None = _opt(
        None,
        "individuals (default: the models plus the --extra-individuals); more "
        "slots are filled with seeded offspring of the models. --search recipe: candidates per CMA-ES generation "
        "(default: cma's, 4 + 3 ln(genes))",
        range=POSITIVE,
    )
    strategy: str = _opt("evolver", "mutation strategy", choices=strategies.names)
    fitness: str = _opt(
        "merged",
        "individual: score each offspring alone; merged: score the population's merge with the offspring in its slot",
        choices=lambda: tuple(FITNESS),
    )
    merge_method: str = _opt(
        "average",
        "how --fitness merged merges the population (the output of that mode too); --search recipe: the merge "
        "whose parameters are searched",
        choices=lambda: methods.names(),
    )
    base_model: str | None = _opt(
        None, "the models' common ancestor (a directory or a Hub id), needed by the task-vector methods"
    )
    extra_individuals: list[str] | None = _opt(
        None,
        "merges of the models added to the initial population as individuals, with the --merge-* settings",
        nargs="+",
        choices=lambda: methods.names(with_statistics=False, evolvable=True),
    )
    schedule: str = _opt(
        "sequential", "sequential: acceptances visible at once; synchronous: classic DE generations", choices=SCHEDULES
    )
    adapt: str = _opt(
        "none",
        "how each offspring's F and CR are chosen: none (--F and --CR) or jde (self-adaptive, per "
        "individual, starting from --F and --CR; adaptation.py)",
        choices=lambda: tuple(adaptation.ADAPTATIONS),
        later=True,
    )
    F: float = _opt(0.5, "mutation scale", range=Range(0, 2, low_open=True))
    CR: float = _opt(0.5, "crossover rate: probability that an element takes the mutant value", range=Range(0, 1))
    seed: int = _opt(
        0,
        "run seed: every random choice and offspring derives from it",
        range=Range(0, 2**64, high_open=True, integer=True, text="an integer in [0, 2**64)"),
    )
    population_on: str = _opt(
        "gpu",
        "where the population lives: gpu (device memory; RAM without a GPU), cpu (host memory) or disk (memory-mapped safetensors files)",
        choices=TIERS,
    )
    population_dir: str | None = _opt(
        None, "directory under which the disk tier creates its scratch directory of individual files (default: --out)"
    )
    device: str | None = _opt(None, "compute device (default: cuda if available, else cpu)")
    device_map: str | None = _opt(
        None,
        "spread the evaluation model over several devices: auto (accelerate's infer_auto_device_map: the GPUs, then the CPU) or a JSON file {module name: device}; the population stays on cpu or disk",
    )
    resume: bool = _opt(False, "continue the run checkpointed in --out (same config required)", transient=True)
    dry_run: bool = _opt(False, "check the inputs, print the memory plan and stop", transient=True)
    accept_ties: bool = _opt(
        False, "accept an offspring whose fitness equals its parent's (default: strict improvement)"
    )
    early_reject: str = _opt(
        "on",
        "stop scoring a candidate once it cannot beat the model it must beat (exact for "
        "accuracy, macro-f1, multilabel-f1, exact-match: the same decisions and outputs; "
        "losses and user functions are always scored in full); off: score every example",
        choices=("on", "off"),
        transient=True,
    )
    batch_size: int = _opt(32, "evaluation batch size", range=POSITIVE)
    max_length: int = _opt(256, "tokens per example at most", range=POSITIVE)
    max_dev_examples: int | None = _opt(
        None, "use at most this many examples of each dev file (lm-eval: of each task, its limit)", range=POSITIVE
    )
    threshold: float = _opt(0.5, "multi-label decision threshold on sigmoid probabilities", range=OPEN_UNIT)
    lm_eval_tasks: list[str] | None = _opt(
        None,
        "--task lm-eval: lm-evaluation-harness tasks (in the --dev folders or "
        "lm-eval's registry); the fitness is the mean of their metrics",
        nargs="+",
    )
    lm_eval_metric: list[str] | None = _opt(
        None,
        "--task lm-eval: the metric of every task, or one per task, e.g. acc or acc_norm (default: each task's first)",
        nargs="+",
    )
    lm_eval_fewshot: int | None = _opt(
        None, "--task lm-eval: few-shot examples per prompt (default: each task's own, else 0)", range=NON_NEGATIVE
    )
    lm_eval_weights: list[float] | None = _opt(
        None, "--task lm-eval: one weight per task for the fitness mean (default: equal)", nargs="+"
    )
    chunk_elements: int = _opt(
        1 << 22, "elements per chunk of the streamed weight operators", range=Range(1, integer=True, multiple_of=64)
    )
    backend: str | None = _opt(
        None, "operator backend (default: the fastest available on each device)", choices=BACKENDS
    )
    allow_pickle: bool = _opt(False, "accept pickle (.bin) weights; off by default because unpickling can run code")
    # the merge methods' parameters given (--merge-<param> / merge_<param>): {param: value}; the rest default
    merge: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"cli": False})
    # model reference (as given) -> its local directory (refs.py), filled by validate()
    resolved: dict[str, str] = dataclasses.field(default_factory=dict, metadata={"cli": False})

    def local(self, ref: str) -> str:
        """The local directory of a model reference of this run (a Hub id's cache snapshot)."""
        return self.resolved.get(ref, ref)

    @property
    def merge_seed(self) -> int:
        """The seed of the run's random merges (DARE's drops): derive_seed(seed, 0, 0, PURPOSE_MERGE)."""
        return derive_seed(self.seed, 0, 0, PURPOSE_MERGE)

    def merge_settings(self, method: str) -> dict[str, Any]:
        """Every parameter of `method`, from the given values over the registry's defaults."""
        record = methods.get(method)
        return record.settings({k: v for k, v in self.merge.items() if record.param(k) is not None}, merge_flag)

    def to_dict(self) -> dict[str, Any]:
        """The options as given (those added after the first release only when set: an older checkpoint stays
        resumable and an older record comparable), and as merge_<param> every parameter of the merge methods this run uses
        (--merge-method and --extra-individuals: the others cannot change the result, and a method added to the
        package later must not make an older checkpoint unresumable)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("cli", True) and not (f.metadata.get("later") and getattr(self, f.name) == f.default)
        }
        used = self.merge_methods_used()
        for name, p in methods.all_params().items():
            if any(record.param(name) is not None for record in used):
                out[f"merge_{name}"] = self.merge.get(name, p.default)
        return out

    def merge_methods_used(self) -> list[methods.MergeMethod]:
        """The merges this run computes: --merge-method with --fitness merged or --search recipe, then the
        --extra-individuals."""
        merges = self.fitness == "merged" or self.search == "recipe"
        return [methods.get(self.merge_method)] * merges + [methods.get(m) for m in self.extra_individuals or []]

    def result_options(self) -> dict[str, Any]:
        """The options that define the result, as recorded (evolution.json, the checkpoint, what --resume must
        match): to_dict without the transient ones (how the run is driven, not what it computes)."""
        transient = {f.name for f in dataclasses.fields(self) if f.metadata.get("transient")}
        return {k: v for k, v in self.to_dict().items() if k not in transient}


def merge_flag(param: str) -> str:
    """The evolve flag of a merge-method parameter."""
    return "--merge-" + param.replace("_", "-")


def cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EvolveConfig) if f.metadata.get("cli", True)]


def choices_of(f: dataclasses.Field) -> tuple | None:
    """A field's choices, resolved now (registries may have grown since import)."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if isinstance(choices, Callable) else choices


def _scalar_type(f: dataclasses.Field):
    """The one parser of a field's values, for flags and YAML alike (a YAML scalar goes through it as text)."""
    return {"int": int, "int | None": int, "float": float, "float | None": float, "list[float] | None": float}.get(
        f.type, str
    )


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type == "bool"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evolver_kernels.evolve",
        description="Fuse fine-tuned models of one base model by evolving their weights (Evolver).",
    )
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    for f in cli_fields():
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS keeps unset flags out of the namespace, so that they do not override the YAML file
        values = f"; values: {f.metadata['range'].describe()}" if "range" in f.metadata else ""
        kw = {"help": f"{f.metadata['help']}{values} (default: {f.default})", "default": argparse.SUPPRESS}
        if _is_bool(f):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _scalar_type(f)
            if "nargs" in f.metadata:
                kw["nargs"] = f.metadata["nargs"]
            if choices_of(f):
                kw["choices"] = choices_of(f)
        parser.add_argument(flag, **kw)
    group = parser.add_argument_group("merge-method parameters (methods/: each applies to the methods named)")
    for name, p in methods.all_params().items():
        users = [m.name for m in methods.METHODS.values() if m.param(name) is not None]
        group.add_argument(
            merge_flag(name),
            dest=f"merge:{name}",
            type=p.type,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{p.help}; used by {', '.join(users)}; values: {p.range_text()} (default: {p.default})",
        )
    return parser


def _from_yaml(f: dataclasses.Field, value: Any, where: str) -> Any:
    """A YAML value of option `f`, checked and converted as its flag would be: booleans must be YAML booleans,
    numbers go through the flag's own type (so `F: 1e-1`, a string to YAML 1.1, is 0.1), choices are checked."""
    if value is None:
        return f.default
    if isinstance(value, bool) and choices_of(f) == ("on", "off"):
        return "on" if value else "off"  # YAML 1.1 reads a bare on / off as a boolean
    if _is_bool(f):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {f.name} must be true or false, got {value!r}")
        return value

    def scalar(v):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            kind = "a number" if _scalar_type(f) in (int, float) else "a string"
            raise ConfigError(f"{where}: {f.name} must be {kind}, got {v!r}")
        try:
            v = _scalar_type(f)(str(v).strip() if not isinstance(v, str) else v)
        except ValueError:
            kind = {int: "an integer", float: "a number"}[_scalar_type(f)]
            raise ConfigError(f"{where}: {f.name} must be {kind}, got {v!r}") from None
        choices = choices_of(f)
        if choices and v not in choices:
            raise ConfigError(f"{where}: {f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")
        return v

    if f.metadata.get("nargs") == "+":
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"{where}: {f.name} is an empty list")
        return [scalar(v) for v in values]
    if isinstance(value, list):
        raise ConfigError(f"{where}: {f.name} takes one value, got a list")
    return scalar(value)


def parse_config(argv: list[str] | None = None) -> EvolveConfig:
    """Flags over the YAML file over the defaults; unknown YAML keys are an error naming them."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    merge: dict[str, Any] = {}
    if config_path:
        loaded = load_yaml_mapping(config_path)
        fields = {f.name: f for f in cli_fields()}
        params = {f"merge_{name}": name for name in methods.all_params()}
        loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(fields) - set(params))
        if unknown:
            raise ConfigError(f"--config {config_path}: unknown option(s) {', '.join(unknown)}")
        for key, value in loaded.items():
            if key in params:  # checked with the flag's name in validate()
                merge[params[key]] = value
            else:
                values[key] = _from_yaml(fields[key], value, f"--config {config_path}")
    for key in [k for k in args if k.startswith("merge:")]:
        merge[key.removeprefix("merge:")] = args.pop(key)
    values.update(args)
    return EvolveConfig(**values, merge=merge)


def population_size(cfg: EvolveConfig) -> int:
    """The individuals the run holds: --population-size, by default the models plus the extra individuals; with
    --search recipe the models (--population-size is then CMA-ES's candidates per generation)."""
    if cfg.search == "recipe":
        return len(cfg.models)
    return (
        cfg.population_size if cfg.population_size is not None else len(cfg.models) + len(cfg.extra_individuals or [])
    )


def input_paths(cfg: EvolveConfig) -> list[tuple[str, str]]:
    """(option, path) of everything the run reads: never written into (rundir.py)."""
    paths = (
        [("--models", cfg.local(m)) for m in cfg.models]
        + [("--dev", d) for d in cfg.dev or []]
        + [("--select", d) for d in cfg.select or []]
    )
    if cfg.base_model:
        paths.append(("--base-model", cfg.local(cfg.base_model)))
    return paths
