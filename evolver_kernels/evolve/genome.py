"""`--search recipe`'s genome: mergekit-evolve's (mergekit/evo/genome.py), declared by the registry.

The models' L layers are cut into K = --layer-groups groups of L / K consecutive layers. For each group, in
order, the genome holds for each model, in --models order, the method's per-model searched parameters (the
weight first, for a method that takes weights; then e.g. ties' density), then the parameters the models share
(slerp's t): `MergeMethod.searched`, each searched in its Param's `search` interval (CMA-ES's bounds). The
starting point is mergekit-evolve's: weight 1/M for M models, every other parameter its registry default
(density 1, t 0.5), clipped into its interval.

A genome reads as a mergekit config (`mapping`): `slices:`, one per group, whose sources are the models (and the
base model, for a method that takes one) over the group's layers with their values, the method's other settings
(the --merge-<param> given) and the merge seed in the global `parameters:`. That mapping is the recipe the run
writes (recipe.yaml): `python -m evolver_kernels.merge --config recipe.yaml` computes the same tensors from it
through the same planning code (merge/plan.py: tensors outside the layers take the first group's values when
they come before the layers, the last group's otherwise, as mergekit plans them), and mergekit reads it as its
own (mergekit-evolve writes the same shape).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from evolver_kernels import methods
from evolver_kernels.evolve.config import ConfigError, EvolveConfig
from evolver_kernels.merge import config as merge_config
from evolver_kernels.merge import plan
from evolver_kernels.methods.merger import TensorGroup
from evolver_kernels.storage.arena import Layout

SIGMA0 = 1 / 6  # mergekit-evolve's initial step size


@dataclasses.dataclass(frozen=True)
class Gene:
    """One searched value: parameter `param` of layer group `group`, for model `model` (None: shared)."""

    group: int
    model: int | None
    param: methods.Param

    @property
    def name(self) -> str:
        who = "" if self.model is None else f" model {self.model}"
        return f"group {self.group}{who} {self.param.name}"


class Genome:
    """The genome of a --search recipe run over `layers` layers (see the module docstring)."""

    def __init__(self, cfg: EvolveConfig, layers: int):
        self.cfg = cfg
        self.record = methods.get(cfg.merge_method)
        self.groups = cfg.layer_groups or 1
        self.layers = layers
        if layers == 0:
            raise ConfigError("--search recipe: the models have no layer stack to group (no layers.<i>. tensors)")
        if layers % self.groups:
            raise ConfigError(
                f"--layer-groups {self.groups} does not divide the models' {layers} layers into equal groups "
                f"(divisors of {layers}: {', '.join(str(k) for k in range(1, layers + 1) if layers % k == 0)})"
            )
        n = len(cfg.models)
        per_model = [p for p in self.record.searched if p.per_model]
        shared = [p for p in self.record.searched if not p.per_model]
        self.genes = [
            gene
            for g in range(self.groups)
            for gene in [Gene(g, k, p) for k in range(n) for p in per_model] + [Gene(g, None, p) for p in shared]
        ]
        self.settings = {
            k: v
            for k, v in cfg.merge_settings(self.record.name).items()
            if v is not None and k not in {p.name for p in self.record.searched}
        }

    @property
    def size(self) -> int:
        return len(self.genes)

    @property
    def candidates(self) -> int:
        """CMA-ES's candidates per generation: --population-size, else cma's default 4 + int(3 ln genes)."""
        population = self.cfg.population_size
        return population if population is not None else int(4 + 3 * math.log(self.size))

    def x0(self) -> list[float]:
        """The starting point (mergekit-evolve's): weight 1/M, the other parameters their defaults."""
        n = len(self.cfg.models)
        start = []
        for gene in self.genes:
            lo, hi = gene.param.search
            value = 1.0 / n if gene.param is methods.WEIGHT else float(gene.param.default)
            start.append(min(max(value, lo), hi))
        return start

    def bounds(self) -> tuple[list[float], list[float]]:
        return [g.param.search[0] for g in self.genes], [g.param.search[1] for g in self.genes]

    def describe(self) -> str:
        n = len(self.cfg.models)
        searched = ", ".join(
            f"{p.name} in [{p.search[0]:g}, {p.search[1]:g}]{' per model' if p.per_model else ''}"
            for p in self.record.searched
        )
        return (
            f"recipe genome: {self.size} genes = {self.groups} layer group(s) of {self.layers // self.groups} "
            f"layers x ({searched}) for {n} models of {self.record.name}"
        )

    def values(self, x: list[float]) -> list[dict[str, Any]]:
        """Per layer group: {"layers": [first, end], "models": [{param: value} per model], "shared": {...}}."""
        per = self.layers // self.groups
        out = [
            {"layers": [g * per, (g + 1) * per], "models": [{} for _ in self.cfg.models], "shared": {}}
            for g in range(self.groups)
        ]
        for gene, v in zip(self.genes, x):
            target = out[gene.group]["shared"] if gene.model is None else out[gene.group]["models"][gene.model]
            target[gene.param.name] = float(v)
        return out

    def mapping(self, x: list[float]) -> dict[str, Any]:
        """Genome `x` as a mergekit config (the module docstring): what recipe.yaml holds."""
        record, cfg = self.record, self.cfg
        models = [_reference(cfg, m) for m in cfg.models]
        base = _reference(cfg, cfg.base_model) if cfg.base_model else None
        role = record.yaml_base_role
        slices = []
        for group in self.values(x):
            sources = [
                {"model": m, "layer_range": list(group["layers"]), **({"parameters": v} if v else {})}
                for m, v in zip(models, group["models"])
            ]
            if base is not None and role == "base":
                sources.append({"model": base, "layer_range": list(group["layers"])})
            slices.append({"sources": sources, **({"parameters": group["shared"]} if group["shared"] else {})})
        params = {_yaml_name(record, k): v for k, v in self.settings.items()}
        params["seed"] = cfg.merge_seed  # the run's seed of random drops
        out = {"merge_method": record.aliases[0] if record.aliases else record.name}
        if role == "first":  # slerp: mergekit's base_model is the first of the two models
            out["base_model"] = models[0]
        elif base is not None:
            out["base_model"] = base
        return {**out, "slices": slices, "parameters": params}

    def tensor_groups(self, x: list[float], layout: Layout, order: list[str]) -> list[TensorGroup]:
        """The settings and weights of every tensor of `layout` under genome `x`, as the merge CLI plans them from
        mapping(x) (`order`: the model's parameter names in order, which says where the tensors outside the layers
        are)."""
        spec = merge_config.read_mapping(self.mapping(x), where="--search recipe's genome")
        slices = plan.slices_of(spec)
        routes = plan.routes_of(layout, order, slices, self.layers)
        return plan.tensor_groups(self.record, spec, slices, layout, routes)


def _reference(cfg: EvolveConfig, ref: str) -> str:
    """A model as the recipe names it: a Hub id as given, a local directory as an absolute path."""
    return ref if cfg.local(ref) != ref else os.path.abspath(ref)


def _yaml_name(record: methods.MergeMethod, name: str) -> str:
    """A parameter's name in mergekit's YAML (its first alias where it has one: scale is mergekit's lambda)."""
    p = record.param(name)
    return p.aliases[0] if p is not None and p.aliases else name
