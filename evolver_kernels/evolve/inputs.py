"""The inputs of an evolution run, checked without loading any weights: the models' configs (one architecture),
their safetensors headers against the evaluation model's layout, the base model's, devices and backend, the
tokenizer and the dev data (tokenised once), and the memory plan they imply. `--dry-run` stops here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from evolver_kernels import methods
from evolver_kernels.distributed import Ranks
from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.evaluator import Evaluator, infer_task
from evolver_kernels.evolve.config import ConfigError, EvolveConfig, population_size
from evolver_kernels.evolve.heldout import HeldOut
from evolver_kernels.evolve.memory_plan import Plan, PlanInputs, memory_plan
from evolver_kernels.evolve.placement import Placement
from evolver_kernels.io import model_io
from evolver_kernels.io.rundir import same_filesystem
from evolver_kernels.kernels.backends import device_backends
from evolver_kernels.storage import node_share
from evolver_kernels.storage.arena import Layout, PickleWeightsError, resolve_names, safetensors_files, tensor_index


@dataclasses.dataclass
class RunInputs:
    config: object  # the first model's transformers config
    task: str
    files: list[list[str]]  # each model's safetensors files
    base_files: list[str] | None
    model: torch.nn.Module  # the evaluation model, parameters on the meta device until bound to an arena
    layout: Layout
    placement: Placement
    tokenizer: object
    evaluator: Evaluator
    n: int  # individuals
    selection: Evaluator | None = None  # the held-out selection data's (--select, --select-fraction)
    notes: tuple[str, ...] = ()  # what the plan says besides the memory (an option applied otherwise than given)

    def source(self, cfg: EvolveConfig, i: int) -> str:
        """Where individual i comes from, in words."""
        m = len(cfg.models)
        extras = list(cfg.extra_individuals or [])
        if i < m:
            return cfg.models[i]
        if i < m + len(extras):
            return f"the {extras[i - m]} extra individual"
        return f"a seeded offspring of {cfg.models[(i - m - len(extras)) % m]}"


def weight_files(model_dir: str, option: str, allow_pickle: bool, convert_root: str, ranks: Ranks) -> list[str]:
    """A model directory's safetensors files; with allow_pickle, its .bin weights converted under convert_root
    (one directory per source: its name and a hash of its real path and files; rank 0 converts)."""
    try:
        return safetensors_files(model_dir)
    except PickleWeightsError as err:
        if not allow_pickle:
            raise ConfigError(f"{option} {err.detail}") from None
    dest = os.path.join(convert_root, model_io.conversion_key(model_dir))
    if ranks.is_main:
        model_io.convert_pickle_weights(model_dir, dest)
    ranks.barrier()
    return [os.path.join(dest, "model.safetensors")]


def inspect(cfg: EvolveConfig, ranks: Ranks, files_of: Callable[[str, str], list[str]]) -> RunInputs:
    """Everything a run needs before it loads weights, checked; files_of(option, model_dir) lists weights."""
    configs = [model_io.load_config(cfg.local(m)) for m in cfg.models]
    first = configs[0]
    try:
        model_io.check_same_architecture(configs, list(cfg.models))
    except ArgumentError as err:
        raise ConfigError(f"--models {err.detail}") from None
    task = cfg.task or infer_task(first)
    files = [files_of("--models", cfg.local(m)) for m in cfg.models]
    model = model_io.empty_model(first, task)
    layout = Layout.of_model(model)
    for m, f in zip(cfg.models, files):
        resolve_names(layout, tensor_index(f), f"--models {m}")
    base_files = files_of("--base-model", cfg.local(cfg.base_model)) if cfg.base_model else None
    if base_files:
        resolve_names(layout, tensor_index(base_files), f"--base-model {cfg.base_model}")
    placement = Placement(cfg.device, cfg.device_map, ranks, model, layout)
    placement.check_backend(cfg.backend)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.local(cfg.models[0]), trust_remote_code=False)
    max_length, length_note = cfg.max_length, None
    if task in ("sequence-classification", "causal-lm", "seq2seq"):
        max_length, length_note = usable_length(cfg.max_length, first, tokenizer, cfg.models[0], task)
    held_out = HeldOut(cfg.select_fraction, cfg.seed) if cfg.select_fraction is not None else None

    def evaluator_of(paths: list[str], subset, early_reject: bool) -> Evaluator:
        return Evaluator(
            task,
            tokenizer,
            paths,
            config=first,
            metric=cfg.metric,
            batch_size=cfg.batch_size,
            max_length=max_length,
            device=placement.device,
            threshold=cfg.threshold,
            max_examples=cfg.max_dev_examples,
            early_reject=early_reject,
            task_options=task_options(cfg, task),
            subset=subset,
        )

    evaluator = evaluator_of(cfg.dev or [], held_out and held_out.part(held_out=False), cfg.early_reject == "on")
    selection = None
    if held_out is not None:
        selection = evaluator_of(cfg.dev, held_out.part(held_out=True), False)
    elif cfg.select:
        try:
            selection = evaluator_of(cfg.select, None, False)
        except ArgumentError as err:  # the data's errors name their file as a --dev file's would
            if err.arg != "path":
                raise
            raise ConfigError(f"--select {err.detail}") from None
    return RunInputs(
        config=first,
        task=task,
        files=files,
        base_files=base_files,
        model=model,
        layout=layout,
        placement=placement,
        tokenizer=tokenizer,
        evaluator=evaluator,
        n=population_size(cfg),
        selection=selection,
        notes=(length_note,) if length_note else (),
    )


# models whose position ids start past the padding index (padding_idx + 1): that many positions are unusable
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")


def usable_length(max_length: int, config, tokenizer, model: str, task: str) -> tuple[int, str | None]:
    """The tokens per example the evaluator may use, and a note when it is less than --max-length: the model
    embeds no more positions (a longer example would fail inside the model), so examples are cut there, said in
    the plan. A --max-length that leaves no token besides the tokenizer's special tokens cannot be applied and is
    refused (a causal LM needs two: one to predict from, one to score)."""
    special = tokenizer.num_special_tokens_to_add(pair=task == "sequence-classification")
    least = special + (2 if task == "causal-lm" else 1)
    if max_length < least:
        raise ConfigError(
            f"--max-length {max_length} leaves no room for text: {model}'s tokenizer adds {special} special "
            f"tokens{' and a causal LM scores a next token' if task == 'causal-lm' else ''}; give at least {least}"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return max_length, None
    if config.model_type in OFFSET_POSITIONS and isinstance(config.pad_token_id, int):
        positions -= config.pad_token_id + 1
    if max_length <= positions:
        return max_length, None
    return positions, (
        f"note: --max-length {max_length} is more than {model} embeds ({positions} positions): examples are cut "
        f"at {positions} tokens"
    )


def task_options(cfg: EvolveConfig, task: str) -> dict | None:
    """The options of the task's own evaluator (lm-eval's: evaluation/lm_eval_task.py)."""
    if task != "lm-eval":
        return None
    return {
        "tasks": cfg.lm_eval_tasks,
        "task_metrics": cfg.lm_eval_metric,
        "num_fewshot": cfg.lm_eval_fewshot,
        "weights": cfg.lm_eval_weights,
    }


def scoring_bytes(inputs: RunInputs) -> int:
    """Bytes that scoring one batch needs beside the model: causal-LM's logits budget (4 copies), lm-eval's
    batch of logits and their log-softmax; other tasks' outputs are small."""
    if inputs.task == "causal-lm":
        return 4 * inputs.evaluator.logits_budget
    if inputs.task == "lm-eval":
        return inputs.evaluator.task_evaluator.logits_bytes()
    return 0


def plan_of(cfg: EvolveConfig, inputs: RunInputs, ranks: Ranks | None = None) -> Plan:
    """The memory plan of this run on this node (plan.memory_plan with the numbers of these inputs)."""
    ranks = ranks or Ranks()
    stats_bytes, stats_name = 0, ""
    if cfg.fitness == "merged":
        record = methods.get(cfg.merge_method)
        if record.statistics is not None:
            stats_bytes = record.statistics.host_bytes(inputs.model, inputs.layout, inputs.n)
            stats_name = record.name
    scratch = cfg.population_dir or cfg.out
    device = inputs.placement.device
    return memory_plan(
        PlanInputs(
            copy_bytes=inputs.layout.nbytes,
            numel=inputs.layout.numel,
            n=inputs.n,
            tier=cfg.population_on,
            compute="cpu" if device.type == "cpu" else str(device),
            evaluation=inputs.placement.device_bytes(),
            placement=inputs.placement.describe(),
            base_model=bool(cfg.base_model),
            chunk_elements=cfg.chunk_elements,
            stats_bytes=stats_bytes,
            stats_name=stats_name,
            logits_bytes=scoring_bytes(inputs),
            scratch_root=scratch,
            out=cfg.out,
            checkpoint_linked=cfg.population_on == "disk" and same_filesystem(scratch, cfg.out),
            backends=device_backends(inputs.placement.devices(), cfg.backend),
            local_ranks=ranks.local_world if ranks.enabled else 1,
            shared_root=node_share.shm_root()
            if node_share.shared(cfg.population_on, device, ranks) and cfg.population_on != "disk"
            else "",
            replaces=cfg.search == "weights",
        )
    )
