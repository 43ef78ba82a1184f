"""What a merge reads and computes, decided before anything is loaded: the slices merged (slices_of), the checks
that need no weights (check), where each output tensor comes from (routes_of) and the groups of tensors that share
settings (tensor_groups)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from evolver_kernels import methods
from evolver_kernels.errors import ArgumentError
from evolver_kernels.io import refs
from evolver_kernels.merge.config import (
    DTYPES,
    MergeConfigError,
    MergeSpec,
    Slice,
    Source,
    flag,
    weight_check,
)
from evolver_kernels.methods import merger
from evolver_kernels.methods.settings import resolve
from evolver_kernels.storage.arena import (
    Layout,
    layer_index,
    with_layer,
)


def slices_of(spec: MergeSpec) -> list[Slice]:
    """The slices merged: the YAML's `slices:`, or one of the whole models (`models:`, --models)."""
    if spec.slices is not None:
        return spec.slices
    settings = spec.model_settings if len(spec.model_settings) == len(spec.models) else [{}] * len(spec.models)
    sources = [
        Source(m, None, s, f"{spec.where}: models entry {k} parameters")
        for k, (m, s) in enumerate(zip(spec.models, settings), 1)
    ]
    return [Slice(sources, Source(spec.base) if spec.base else None)]


def check(spec: MergeSpec) -> methods.MergeMethod:
    """Everything checkable before loading."""
    record = methods.get(spec.method)
    slices = slices_of(spec)
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
        joined = spec.base_model is not None and record.yaml_base_role == "input" and spec.base_model in spec.models
        raise MergeConfigError(
            f"--models: {record.name} merges {'exactly' if record.min_models == record.max_models else 'at most'} "
            f"{record.max_models} model{'s' * (record.max_models != 1)}, got {n}"
            + (f" (base_model {spec.base_model} is one more model for it, as in mergekit)" if joined else "")
        )
    if spec.weights is not None and not record.uses_weights:
        raise MergeConfigError(f"--weights does not apply to {record.name} (it takes no per-model weights)")
    for w in spec.weights or []:
        weight_check(record)(w, "--weights")
    if spec.base and record.yaml_base_role != "base":
        role = (
            "its first model is mergekit's base_model"
            if record.yaml_base_role == "first"
            else "a base has no role in it"
        )
        raise MergeConfigError(f"--base does not apply to {record.name} ({role}): give the models to merge in --models")
    if record.needs_base and slices[0].base is None:
        raise MergeConfigError(
            f"{record.name} needs a base model (--base or base_model:), the common ancestor of the models"
        )
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


def in_place(slices: list[Slice], num_layers: int) -> bool:
    """Slices that re-lay out nothing (mergekit-evolve's genome, `evolve --search recipe`'s recipe): each reads its
    output positions from the same layers of the same models, listed once and in one order, and of one base,
    and together they cover the models' `num_layers`. Such a merge reads the models' files in place, as a
    `models:` merge whose settings vary by layer."""
    models = [s.model for s in slices[0].sources]
    base = slices[0].base.model if slices[0].base else None
    if len(set(models)) != len(models):
        return False
    position = 0
    for sl in slices:
        if [s.model for s in sl.sources] != models or (sl.base.model if sl.base else None) != base:
            return False
        if any(s.layers != (position, position + sl.length) for s in sl.sources + [sl.base] * (sl.base is not None)):
            return False
        position += sl.length
    return position == num_layers


@dataclasses.dataclass(frozen=True)
class Route:
    """Where an output tensor comes from: its slice, its t (the position of its layer in the slice, for
    gradients) and, per source and for the base, the layer it is read from (None: the same name)."""

    slice: int
    t: float
    layers: tuple[int | None, ...]
    base_layer: int | None = None


def input_name(name: str, layer: int | None) -> str:
    return name if layer is None or layer_index(name) is None else with_layer(name, layer)


def routes_of(layout: Layout, order: list[str], slices: list[Slice], num_layers: int) -> dict[str, Route]:
    """mergekit's plan: output layer j is layer idx of its slice, read from layer
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

        routes[e.name] = Route(
            s, idx / (n - 1) if n > 1 else 1.0, tuple(layer(x) for x in slices[s].sources), layer(slices[s].base)
        )
    return routes


def _tensor_settings(
    record: methods.MergeMethod, spec: MergeSpec, sl: Slice, route: Route, name: str
) -> tuple[dict[str, Any], list[float] | None]:
    """The method's settings and the weights for one output tensor (mergekit's parameter_resolver): a shared
    parameter from the slice's, then the global parameters (the output tensor's name for filters), a per-model
    one from the source's own, the slice's, then the global ones (the input tensor's name); flags win."""
    shared = [(sl.settings, sl.where), (spec.settings, f"{spec.where}: parameters")]
    inputs = [input_name(name, layer) for layer in route.layers]

    def per_model(key: str, check) -> list | None:
        values = [
            resolve([(src.settings, src.where), *shared], key, n, route.t, check) for src, n in zip(sl.sources, inputs)
        ]
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
    if weights is None and record.uses_weights and (values := per_model("weight", weight_check(record))) is not None:
        weights = [1.0 if w is None else w for w in values]
    if record.signed_weights and settings.get("normalize") and any(w < 0 for w in weights or []):
        raise MergeConfigError(
            f"{'--weights' if spec.weights is not None else spec.where}: weights {[float(w) for w in weights]} for "
            f"{name} with normalize true: {record.name} takes a negative weight only with normalize false (it "
            "would divide by the sum of the weights, which a negative one can make zero)"
        )
    return settings, weights


def tensor_groups(
    record: methods.MergeMethod, spec: MergeSpec, slices: list[Slice], layout: Layout, routes: dict[str, Route]
) -> list[merger.TensorGroup]:
    """The output tensors grouped by their settings and weights (one group when nothing varies by tensor)."""
    groups: dict[str, merger.TensorGroup] = {}
    for e in layout.entries:
        route = routes[e.name]
        settings, weights = _tensor_settings(record, spec, slices[route.slice], route, e.name)
        key = repr((sorted(settings.items()), weights))
        groups.setdefault(key, ([], settings, weights))[0].append(e)
    return list(groups.values())


def relaid_copies(spec: MergeSpec, identity: bool, slices: list[Slice]) -> int:
    """How many model copies a merge writes into its scratch directory besides the merged tensors."""
    copies = len(slices[0].sources) + (slices[0].base is not None)
    if spec.population_on == "disk":
        return copies
    return 0 if identity or spec.population_on == "cpu" else copies


def cast_layout(layout: Layout, dtype: str | None) -> Layout:
    """`layout` with its floating-point tensors in `dtype` (mergekit's dtype: inputs cast before merging)."""
    if dtype is None:
        return layout
    return Layout.from_params(
        (
            e.aliases,
            DTYPES[dtype] if layout.group_dtype(e.group).is_floating_point else layout.group_dtype(e.group),
            e.shape,
        )
        for e in layout.entries
    )
