"""What a merge produces, decided from the configs before any weight is read (target_of): the output's layout,
read from the safetensors headers where they say it (io/header_layout.py: no transformers modeling code
imported), else from the model built on the meta device; its config donor, stacked layers, the input files, where
each tensor comes from and each group of tensors' settings."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.evaluator import infer_task
from evolver_kernels.io import model_io
from evolver_kernels.io.header_layout import causal_lm_layout, restacked
from evolver_kernels.merge.config import MergeConfigError, MergeSpec, Slice
from evolver_kernels.merge.plan import Route, cast_layout, in_place, routes_of, tensor_groups
from evolver_kernels.storage.arena import Layout, num_layers, resolve_names, safetensors_files, tensor_index


@dataclasses.dataclass
class Target:
    """What the merge produces, decided from the configs before any weight is read: the output model's config
    and layout, the input files, where each tensor comes from and the settings of each group of tensors."""

    config: Any  # the transformers config (None: the layout was read from the headers)
    task: str
    donor: str  # the model whose config (and, without tokenizer_source, tokenizer) the output keeps
    stacked: int | None  # layers of a slices merge's output (None: the models' own layout)
    model: torch.nn.Module | None  # the output architecture on the meta device (None: read from the headers)
    layout: Layout
    identity: bool  # the output has the models' own layout and dtypes: their files are read in place
    files: list[list[str]]
    routes: dict[str, Route]
    groups: list
    settings: dict[str, Any]


def _from_headers(spec: MergeSpec, record, slices: list[Slice], models: list[str]):
    """(layout, order, config donor, stacked layers) of the output read from the safetensors headers and raw
    configs (io/header_layout.py), when the merge needs nothing else of transformers: no statistics, no task,
    one config, and slices that re-lay out layers only of layers alike. None: the model is built instead (the
    merge's start-up then imports transformers' modeling code)."""
    if record.statistics is not None or spec.task not in (None, "causal-lm"):
        return None
    raws = [model_io.read_config_json(m) for m in models]
    if not model_io.same_config_json(raws):
        return None  # check_same_architecture on the transformers configs decides, and names what differs
    read = causal_lm_layout(raws[0], tensor_index(safetensors_files(models[0])))
    if read is None or spec.slices is None or in_place(slices, raws[0]["num_hidden_layers"]):
        return None if read is None else (*read, models[0], None)
    donor = spec.local(spec.base_model or slices[0].sources[0].model)  # mergekit's config donor
    stacked = sum(sl.length for sl in slices)
    relaid = restacked(model_io.read_config_json(donor), tensor_index(safetensors_files(donor)), stacked)
    read = causal_lm_layout(*relaid) if relaid is not None else None
    return None if read is None else (*read, donor, stacked)


def target_of(spec: MergeSpec, record, slices: list[Slice], models: list[str]) -> Target:
    read = _from_headers(spec, record, slices, models)
    config = model = None
    task = spec.task or "auto"
    if read is not None:
        native, order, donor, stacked = read
    else:
        config, model, task, donor, stacked = _built_target(spec, record, slices, models)
        native = Layout.of_model(model)
        order = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    layout = cast_layout(native, spec.compute_dtype)
    identity = stacked is None and layout.fingerprint() == native.fingerprint()
    files = [safetensors_files(m) for m in models]
    if identity:
        for m, f in zip(spec.models, files):
            resolve_names(layout, tensor_index(f), m)
    elif record.statistics is not None:
        raise MergeConfigError(
            f"{record.name} estimates statistics on the models as they are: slices and a dtype "
            "other than theirs are not supported"
        )
    routes = routes_of(layout, order, slices, num_layers(layout))
    groups = tensor_groups(record, spec, slices, layout, routes)
    return Target(
        config, task, donor, stacked, model, layout, identity, files, routes, groups, record.settings(groups[0][1])
    )


def _built_target(spec: MergeSpec, record, slices: list[Slice], models: list[str]):
    """(config, model on the meta device, task, config donor, stacked layers) of the output, from the models'
    transformers configs."""
    configs = [model_io.load_config(m) for m in models]
    config = configs[0]
    try:  # one architecture beyond shapes: the output keeps the first model's config
        model_io.check_same_architecture(configs, list(spec.models))
    except ArgumentError as err:
        raise MergeConfigError(f"--models {err.detail}") from None
    task = spec.task or (infer_task(config) if record.statistics else "auto")
    donor, stacked = models[0], None
    if spec.slices is not None and not in_place(slices, config.num_hidden_layers):
        donor = spec.local(spec.base_model or slices[0].sources[0].model)  # mergekit's config donor
        config = copy.deepcopy(model_io.load_config(donor))
        stacked = sum(sl.length for sl in slices)
        config.num_hidden_layers = stacked
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[0]] * stacked
    return config, model_io.empty_model(config, task), task, donor, stacked
