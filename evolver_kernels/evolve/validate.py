"""The checks of evolve's options that need no model loaded (validate): presence, the ranges declared with the
options (config.Range), paths, model references resolved, the registries' rules (strategies, merge methods and
their parameters), selection data, lm-eval's options, --out and --population-dir."""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from evolver_kernels import methods
from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.lm_eval_task import require_lm_eval
from evolver_kernels.evolve import strategies
from evolver_kernels.evolve.config import (
    ConfigError,
    EvolveConfig,
    choices_of,
    cli_fields,
    input_paths,
    merge_flag,
    population_size,
)
from evolver_kernels.io import refs, rundir
from evolver_kernels.kernels.checks import MAX_MERGE_INPUTS


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
    repeated = _repeated(cfg.models, cfg.local)
    if repeated:
        raise ConfigError(f"--models lists the same directory twice ({repeated[0]} is {repeated[1]})")
    for option, paths in (("--dev", cfg.dev or []), ("--select", cfg.select or [])):
        repeated = _repeated(paths, str)
        if repeated:
            raise ConfigError(
                f"{option} lists {repeated[0]} twice ({repeated[1]} is the same file): each domain's data once, or "
                "its score would count twice in the mean"
            )
    for f in cli_fields():  # choices of options set in code (flags and YAML are checked when parsed)
        value, choices = getattr(cfg, f.name), choices_of(f)
        for v in value if isinstance(value, list) else [value]:
            if choices and v is not None and v not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {v!r}")
    check_search(cfg)
    extras = list(cfg.extra_individuals or [])
    if len(set(extras)) != len(extras):
        raise ConfigError("--extra-individuals lists a merge twice (it would add two identical individuals)")
    n = population_size(cfg)
    if n < len(cfg.models) + len(extras):
        raise ConfigError(
            f"--population-size {n} is smaller than the {len(cfg.models)} models plus {len(extras)} "
            "extra individuals given: each is an individual"
        )
    if cfg.search == "weights":
        check_evolver(cfg, n)
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
    if cfg.base_model and not any(m.needs_base or m.optional_base for m in used):
        merges = (
            ", ".join(dict.fromkeys(m.name for m in used)) or "nothing (--fitness individual, no --extra-individuals)"
        )
        raise ConfigError(
            f"--base-model does not apply: this run merges {merges}, which takes no base model (it would be read "
            "and never used); give it with a method that takes one (task_arithmetic, ties, ...) or leave it out"
        )
    if (cfg.fitness == "merged" or cfg.search == "recipe") and n > MAX_MERGE_INPUTS:
        raise ConfigError(f"--fitness merged merges at most {MAX_MERGE_INPUTS} individuals, the population has {n}")
    if cfg.device_map is not None:
        if cfg.device_map != "auto" and not os.path.isfile(cfg.device_map):
            raise ConfigError(f"--device-map must be auto or a JSON file, got {cfg.device_map!r} (no such file)")
        if cfg.population_on == "gpu":
            raise ConfigError(
                "--device-map spreads the evaluation model over several devices: keep the population "
                "on cpu or disk (--population-on)"
            )
    for f in cli_fields():  # the ranges declared with the options (select_fraction, lm_eval_fewshot: above)
        if "range" in f.metadata and f.name not in ("select_fraction", "lm_eval_fewshot"):
            check_range(cfg, f.name)
    rundir.check_out(cfg.out, "evolve", input_paths(cfg))
    if cfg.population_dir:
        rundir.check_scratch_root("--population-dir", cfg.population_dir, input_paths(cfg))


# the options of --search weights alone (Evolver's), refused with --search recipe when given
WEIGHTS_ONLY = ("fitness", "strategy", "schedule", "adapt", "F", "CR", "accept_ties", "extra_individuals")
RECIPE_ONLY = ("layer_groups", "sigma0")


def check_search(cfg: EvolveConfig) -> None:
    """--search: the options of the other search refused when given, the --merge-method the search can use, and
    with --search recipe no --merge-<param> for a parameter it searches."""
    fields = {f.name: f for f in cli_fields()}
    record = methods.get(cfg.merge_method)
    if cfg.search == "weights":
        given = [name for name in RECIPE_ONLY if getattr(cfg, name) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to --search recipe")
        if record.evolve_refusal is not None and cfg.fitness == "merged":
            raise ConfigError(
                f"--merge-method {record.name} cannot merge a population ({record.evolve_refusal}); "
                "--search recipe can search its parameters"
            )
        return
    given = [name for name in WEIGHTS_ONLY if getattr(cfg, name) != fields[name].default]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{flag} applies to --search weights (Evolver); --search recipe has no {flag}")
    if cfg.population_size is not None and cfg.population_size < 2:
        raise ConfigError(f"--population-size {cfg.population_size}: CMA-ES needs at least 2 candidates per generation")
    if record.statistics is not None:
        raise ConfigError(
            f"--search recipe: --merge-method {record.name} merges with statistics of whole models, which do not "
            "split by layer group; choose a method without statistics"
        )
    if record.copies or not record.searched:
        raise ConfigError(f"--search recipe: --merge-method {record.name} has no parameter to search")
    problem = record.count_problem(len(cfg.models))
    if problem:
        raise ConfigError(f"--models: {problem}")
    for p in record.searched:
        if p.name in cfg.merge:
            raise ConfigError(
                f"{merge_flag(p.name)}: --search recipe searches {p.name} (per layer group"
                f"{' and model' if p.per_model else ''}, in [{p.search[0]:g}, {p.search[1]:g}]): leave it out"
            )


def check_evolver(cfg: EvolveConfig, n: int) -> None:
    """--search weights' own rules, for a population of n: the strategy's, the merge's, the budget's."""
    if cfg.fitness == "individual" and (cfg.max_evaluations or n) < n:
        raise ConfigError(
            f"--max-evaluations {cfg.max_evaluations} is fewer than the {n} evaluations of the initial "
            "population (--fitness individual scores each individual first)"
        )
    strategy = strategies.get(cfg.strategy)
    if n < strategy.min_population:
        raise ConfigError(
            f"--strategy {cfg.strategy} needs a population of at least {strategy.min_population}, got {n}"
        )
    if strategy.needs_individual_fitness and cfg.fitness == "merged":
        raise ConfigError(f"--strategy {cfg.strategy} needs per-individual fitness: use --fitness individual")
    if cfg.merge_method != "average" and cfg.fitness != "merged":
        raise ConfigError(f"--merge-method {cfg.merge_method} applies to --fitness merged (or --search recipe)")


def _repeated(refs: list[str], local) -> tuple[str, str] | None:
    """(a reference, the earlier one) naming the same file or directory (local(ref): its path), or None."""
    seen: dict[str, str] = {}
    for ref in refs:
        real = os.path.realpath(local(ref))
        if real in seen:
            return ref, seen[real]
        seen[real] = ref
    return None


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


def check_device(spec: str) -> torch.device:
    """--device as a torch.device: cpu, cuda or cuda:N, refused with one line otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec}: must be cpu, cuda or cuda:N")
    return device
