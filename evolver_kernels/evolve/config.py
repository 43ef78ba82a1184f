"""The options of `python -m evolver_kernels.evolve`, defined once: the dataclass below is the YAML schema, the
argparse parser (flags override the file) and the validation before any heavy work. Choices come from the
registries (strategies.py, methods/, fitness.py, population tiers, backends), and every merge-method parameter
of methods/ is an option `--merge-<param>` (YAML `merge_<param>`), held in EvolveConfig.merge."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import torch

from evolver_kernels import evaluation, methods
from evolver_kernels.errors import ArgumentError, UserError
from evolver_kernels.evaluation.lm_eval_task import require_lm_eval
from evolver_kernels.evolve import adaptation, strategies
from evolver_kernels.evolve.fitness import FITNESS
from evolver_kernels.io import refs, rundir
from evolver_kernels.io.jsonio import load_yaml_mapping
from evolver_kernels.kernels.backends import BACKENDS
from evolver_kernels.kernels.checks import MAX_MERGE_INPUTS
from evolver_kernels.storage.population import TIERS

SCHEDULES = ("sequential", "synchronous")


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
    generations: int = _opt(15, "number of generations", range=NON_NEGATIVE)
    population_size: int | None = _opt(
        None,
        "individuals (default: the models plus the --extra-individuals); more "
        "slots are filled with seeded offspring of the models",
    )
    strategy: str = _opt("evolver", "mutation strategy", choices=strategies.names)
    fitness: str = _opt(
        "merged",
        "individual: score each offspring alone; merged: score the population's merge with the offspring in its slot",
        choices=lambda: tuple(FITNESS),
    )
    merge_method: str = _opt(
        "average",
        "how --fitness merged merges the population (the output of that mode too)",
        choices=lambda: methods.names(evolvable=True),
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
        """The merges this run computes: --merge-method with --fitness merged, then the --extra-individuals."""
        return [methods.get(self.merge_method)] * (self.fitness == "merged") + [
            methods.get(m) for m in self.extra_individuals or []
        ]

    def result_options(self) -> dict[str, Any]:
        """The options that define the result, as recorded (evolution.json, the checkpoint, what --resume must
        match): to_dict without the transient ones (how the run is driven, not what it computes)."""
        transient = {f.name for f in dataclasses.fields(self) if f.metadata.get("transient")}
        return {k: v for k, v in self.to_dict().items() if k not in transient}


def merge_flag(param: str) -> str:
    """The evolve flag of a merge-method parameter."""
    return "--merge-" + param.replace("_", "-")


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EvolveConfig) if f.metadata.get("cli", True)]


def _choices(f: dataclasses.Field) -> tuple | None:
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
    for f in _cli_fields():
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
            if _choices(f):
                kw["choices"] = _choices(f)
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
    if isinstance(value, bool) and _choices(f) == ("on", "off"):
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
        choices = _choices(f)
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
        fields = {f.name: f for f in _cli_fields()}
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


def validate(cfg: EvolveConfig) -> None:
    """Checks that need no model loaded: presence, types, ranges, paths, and the registries' rules."""
    for name in ("models", "out") + ("dev",) * (cfg.task != "lm-eval"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required")
    check_lm_eval(cfg)
    resolve_refs(cfg)
    if cfg.device is not None:
        check_device(cfg.device)
    for path in cfg.dev or []:
        if not os.path.exists(path):
            raise ConfigError(f"--dev {path}: no such file or directory")
    check_selection(cfg)
    if len({os.path.realpath(cfg.local(m)) for m in cfg.models}) != len(cfg.models):
        raise ConfigError("--models lists the same directory twice")
    for f in _cli_fields():  # choices of options set in code (flags and YAML are checked when parsed)
        value, choices = getattr(cfg, f.name), _choices(f)
        for v in value if isinstance(value, list) else [value]:
            if choices and v is not None and v not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {v!r}")
    extras = list(cfg.extra_individuals or [])
    if len(set(extras)) != len(extras):
        raise ConfigError("--extra-individuals lists a merge twice (it would add two identical individuals)")
    n = population_size(cfg)
    if n < len(cfg.models) + len(extras):
        raise ConfigError(
            f"--population-size {n} is smaller than the {len(cfg.models)} models plus {len(extras)} "
            "extra individuals given: each is an individual"
        )
    strategy = strategies.get(cfg.strategy)
    if n < strategy.min_population:
        raise ConfigError(
            f"--strategy {cfg.strategy} needs a population of at least {strategy.min_population}, got {n}"
        )
    if strategy.needs_individual_fitness and cfg.fitness == "merged":
        raise ConfigError(f"--strategy {cfg.strategy} needs per-individual fitness: use --fitness individual")
    if cfg.merge_method != "average" and cfg.fitness != "merged":
        raise ConfigError(f"--merge-method {cfg.merge_method} applies to --fitness merged")
    used = cfg.merge_methods_used()
    for name, value in cfg.merge.items():
        p = methods.all_params().get(name)
        if p is None:
            raise ConfigError(f"{merge_flag(name)}: no merge method has a parameter {name!r}")
        if not any(m.param(name) is not None for m in used):
            raise ConfigError(
                f"{merge_flag(name)} does not apply to {', '.join(m.name for m in used) or 'this run'} "
                f"(it applies to {', '.join(m.name for m in methods.METHODS.values() if m.param(name))})"
            )
        cfg.merge[name] = p.check(value, merge_flag(name))
    for what, method in [("--merge-method", m.name) for m in used[:1] if cfg.fitness == "merged"] + [
        ("--extra-individuals", m) for m in extras
    ]:
        if methods.get(method).needs_base and not cfg.base_model:
            raise ConfigError(f"{what} {method} needs --base-model (the models' common ancestor)")
        if methods.get(method).statistics is not None and (":" in (cfg.task or "") or cfg.task == "lm-eval"):
            raise ConfigError(f"{what} {method} estimates statistics with a built-in --task, not {cfg.task}")
    if cfg.fitness == "merged" and n > MAX_MERGE_INPUTS:
        raise ConfigError(f"--fitness merged merges at most {MAX_MERGE_INPUTS} individuals, the population has {n}")
    if cfg.device_map is not None:
        if cfg.device_map != "auto" and not os.path.isfile(cfg.device_map):
            raise ConfigError(f"--device-map must be auto or a JSON file, got {cfg.device_map!r} (no such file)")
        if cfg.population_on == "gpu":
            raise ConfigError(
                "--device-map spreads the evaluation model over several devices: keep the population "
                "on cpu or disk (--population-on)"
            )
    for f in _cli_fields():  # the ranges declared with the options (select_fraction, lm_eval_fewshot: above)
        if "range" in f.metadata and f.name not in ("select_fraction", "lm_eval_fewshot"):
            check_range(cfg, f.name)
    rundir.check_out(cfg.out, "evolve", input_paths(cfg))
    if cfg.population_dir:
        rundir.check_scratch_root("--population-dir", cfg.population_dir, input_paths(cfg))


def check_range(cfg: EvolveConfig, name: str) -> None:
    """Option `name`'s value within the range declared with it (None: unset, where the option may be)."""
    f = next(f for f in dataclasses.fields(EvolveConfig) if f.name == name)
    value = getattr(cfg, name)
    if value is not None or f.default is not None:
        f.metadata["range"].check("--" + name.replace("_", "-"), value)


def check_selection(cfg: EvolveConfig) -> None:
    """--select / --select-fraction (heldout.py): one of them, held-out data, a task that can use it."""
    if cfg.select is None and cfg.select_fraction is None:
        return
    if cfg.select is not None and cfg.select_fraction is not None:
        raise ConfigError("--select and --select-fraction are two ways to give selection data: use one")
    what = "--select" if cfg.select is not None else "--select-fraction"
    if cfg.task == "lm-eval":
        raise ConfigError(f"{what} does not apply to --task lm-eval (its data are lm-eval tasks, not dev files)")
    if cfg.select_fraction is not None:
        if ":" in (cfg.task or ""):
            raise ConfigError(
                f"--select-fraction cannot split the dev data of --task {cfg.task} (the function reads "
                "its files itself): give --select files"
            )
        check_range(cfg, "select_fraction")
        return
    dev = {os.path.realpath(d) for d in cfg.dev or []}
    for path in cfg.select:
        if not os.path.exists(path):
            raise ConfigError(f"--select {path}: no such file or directory")
        if os.path.realpath(path) in dev:
            raise ConfigError(f"--select {path} is also a --dev file: selection data must be held out of the search")


LM_EVAL_OPTIONS = ("lm_eval_tasks", "lm_eval_metric", "lm_eval_fewshot", "lm_eval_weights")


def check_lm_eval(cfg: EvolveConfig) -> None:
    """The --lm-eval-* options: given only with --task lm-eval, which needs them and lm-eval installed."""
    given = [name for name in LM_EVAL_OPTIONS if getattr(cfg, name) is not None]
    if cfg.task != "lm-eval":
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to --task lm-eval only")
        return
    try:
        require_lm_eval()
    except ArgumentError as err:
        raise ConfigError(f"--task {err.detail}") from None
    tasks = cfg.lm_eval_tasks or []
    if not tasks:
        raise ConfigError("--task lm-eval needs --lm-eval-tasks (the lm-eval task names)")
    if len(set(tasks)) != len(tasks):
        raise ConfigError("--lm-eval-tasks names a task twice")
    if cfg.metric is not None:
        raise ConfigError("--metric does not apply to --task lm-eval; use --lm-eval-metric")
    if cfg.lm_eval_metric is not None and len(cfg.lm_eval_metric) not in (1, len(tasks)):
        raise ConfigError(
            f"--lm-eval-metric takes one metric or one per task ({len(tasks)}), got {len(cfg.lm_eval_metric)}"
        )
    weights = cfg.lm_eval_weights
    if weights is not None:
        if len(weights) != len(tasks):
            raise ConfigError(f"--lm-eval-weights takes one weight per task ({len(tasks)}), got {len(weights)}")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"--lm-eval-weights must be finite, non-negative and not all 0, got {weights}")
    check_range(cfg, "lm_eval_fewshot")
    for path in cfg.dev or []:
        if not os.path.isdir(path):
            raise ConfigError(
                f"--dev {path}: not a folder (with --task lm-eval, --dev names folders of lm-eval task YAMLs)"
            )


def resolve_refs(cfg: EvolveConfig) -> None:
    """Each model reference (--models, --base-model) to its local directory, in cfg.resolved (refs.py)."""
    for option, ref in [("--models", m) for m in cfg.models] + [("--base-model", cfg.base_model)] * bool(
        cfg.base_model
    ):
        if ref not in cfg.resolved:
            try:
                cfg.resolved[ref] = refs.resolve(ref)
            except ArgumentError as err:
                raise ConfigError(f"{option} {err.detail}") from None


def population_size(cfg: EvolveConfig) -> int:
    """--population-size, by default the models plus the extra individuals."""
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


def check_device(spec: str) -> torch.device:
    """--device as a torch.device: cpu, cuda or cuda:N, refused with one line otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec}: must be cpu, cuda or cuda:N")
    return device
