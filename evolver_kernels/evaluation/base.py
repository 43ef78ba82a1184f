"""The task interface behind `evolver_kernels.evaluation.evaluator.Evaluator`, and what every task shares.

A `TaskEvaluator` turns examples into padded batches (tokenised once, sorted by length), scores a model on
one file's batches (higher is better), gives a differentiable loss on one batch (Fisher statistics) and
runs one batch forward (RegMean's hooks). `fitness` averages the per-file scores under torch.inference_mode,
with bf16 autocast on a GPU. Every token-level loss goes through `token_nll`; causal-LM scoring splits its
batches with `budget_slices` so that no forward yields more than the logits budget.

The caller's tokenizer is never modified: one without a pad token is copied and the copy is padded with
its eos (or unk) token.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as nnf

from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.data import load_examples

IGNORE_INDEX = -100  # Hugging Face's label for positions that carry no loss (padding, prompts)
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class DevFile:
    """One dev file, tokenised once: its examples, their encoding, and its default batches (every example,
    shortest first). Each batch carries `index`, the positions of its rows among `examples`."""

    path: str
    examples: list[dict]
    enc: dict
    batches: list[dict]


DevFiles = list[DevFile]  # in the order the dev paths were given
Subset = Callable[[int, str, list[dict]], list[dict]]  # (file position, path, examples) -> the examples kept

STATISTICS_NEED_BUILTIN = "Fisher and RegMean statistics need a built-in --task, not a module:function fitness"


@dataclasses.dataclass
class Fitness:
    """A model's score: the mean of the per-file scores. When early rejection stopped the scoring
    (complete False), score and per_file are upper bounds that could not beat the rival (early_reject.py)."""

    score: float  # the mean over dev files
    per_file: dict[str, float]
    # per file key, the record of each example (right or wrong, and how sure: early_reject.record_of), in
    # example order; tasks with exact bounds only
    outcomes: dict[str, str] | None = None
    scored: int = 0  # examples scored
    total: int = 0  # examples a full evaluation scores

    @property
    def complete(self) -> bool:
        return self.scored == self.total

    def as_dict(self) -> dict:
        return {"score": self.score, "per_file": self.per_file}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of fp32 `logits` [..., vocab] against `labels` [...] and the number of tokens it
    covers (labels IGNORE_INDEX carry no loss). The sum stays a tensor, so it can be backpropagated."""
    total = nnf.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((labels != IGNORE_INDEX).sum())


# Bytes of fp32 logits one causal-LM forward may produce while scoring (the batch is split into fewer rows
# when a full batch would exceed it); the memory plan counts four times this (the model's logits, their fp32
# copy, the shifted copy, log-softmax). On the CPU a forward costs about the same split or not; on a GPU a
# forward of a large model is bound by reading its weights, so splitting a batch multiplies its time: there
# the budget is a sixteenth of the device's memory (5 GiB on an 80 GB card).
LOGITS_BUDGET = 128 << 20


def default_logits_budget(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return max(LOGITS_BUDGET, torch.cuda.get_device_properties(device).total_memory // 16)
    return LOGITS_BUDGET


def budget_slices(inputs: dict[str, torch.Tensor], vocab: int | None, budget: int) -> Iterator[dict[str, torch.Tensor]]:
    """Row slices of a batch whose fp32 logits (rows x width x vocab) fit in `budget` bytes, at least one row
    each; the whole batch when the vocabulary is unknown."""
    # For a 128k vocabulary, 32 rows of 256 tokens are 4 GiB of fp32 logits before the copies cross-entropy
    # makes; token losses are summed, so a score does not depend on where the batch is split.
    rows, width = inputs["input_ids"].shape
    step = max(1, budget // (width * vocab * 4)) if vocab else rows
    for lo in range(0, rows, step):
        yield {k: v[lo : lo + step] for k, v in inputs.items()}


def unique_basenames(paths: list[str]) -> bool:
    return len({os.path.basename(p) for p in paths}) == len(paths)


def file_key(path: str, dev_paths: list[str]) -> str:
    """How a dev file is named in per-file scores: its basename when the basenames are unique."""
    return os.path.basename(path) if unique_basenames(dev_paths) else path


def mean_score(per_file: dict[str, float]) -> float:
    """The fitness of per-file scores: their mean, summed in file order (so never lower when one file's score
    rises, which early rejection's bound relies on)."""
    return sum(per_file.values()) / len(per_file)


def with_pad_token(tokenizer):
    """`tokenizer` itself when it can pad, else a copy padding with its eos (or unk) token."""
    if tokenizer.pad_token is not None:
        return tokenizer
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.eos_token or padded.unk_token
    return padded


class TaskEvaluator(abc.ABC):
    """One task's evaluation: data, scoring, losses. Subclasses set `name` and `metrics` (the first is the
    default unless `default_metric` says otherwise) and implement `encode`, `score_file` and `loss`."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        tokenizer,
        config,
        *,
        metric: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        device: torch.device | str = "cpu",
        threshold: float = 0.5,
        logits_budget: int | None = None,
    ):
        self.device = torch.device(device)
        self.logits_budget = logits_budget if logits_budget is not None else default_logits_budget(self.device)
        # Facts of the model's head, kept for every task because the Evaluator exposes them.
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.num_labels = getattr(config, "num_labels", None)
        self.metric = self._choose_metric(metric)
        self.threshold = threshold
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = self._prepare_tokenizer(tokenizer)

    @classmethod
    def default_metric(cls, multi_label: bool) -> str:
        return cls.metrics[0]

    def _choose_metric(self, metric: str | None) -> str:
        metric = metric or self.default_metric(self.multi_label)
        if metric not in self.metrics:
            raise ArgumentError(
                "metric", f"{metric!r} does not apply to {self.name}; use one of {', '.join(self.metrics)}"
            )
        return metric

    def _prepare_tokenizer(self, tokenizer):
        return with_pad_token(tokenizer)

    # -- data, tokenised once ---------------------------------------------------------------------------
    def read(self, path: str) -> list[dict]:
        """The validated examples of one dev file."""
        return load_examples(path, self.name)

    def load_files(self, paths: list[str], max_examples: int | None = None, subset: Subset | None = None) -> DevFiles:
        """Each dev file tokenised and batched, at most `max_examples` examples (the first ones) per file, then
        (with `subset`) the examples subset(position of the file, path, examples) keeps."""
        files = []
        for f, path in enumerate(paths):
            examples = self.read(path)
            if max_examples:
                examples = examples[:max_examples]
            if subset is not None:
                examples = subset(f, path, examples)
            enc = self.encode(examples)
            files.append(DevFile(path, examples, enc, self.pad_batches(examples, enc, range(len(examples)))))
        return files

    @abc.abstractmethod
    def encode(self, examples: list[dict]) -> dict:
        """The tokenizer's encoding of `examples` (unpadded lists, one entry per example)."""

    def add_targets(self, batch: dict, examples: list[dict], idx: list[int], enc: dict) -> None:  # noqa: B027
        """Adds what scoring compares against (gold labels, target tokens) to `batch`, whose rows are
        `examples[j] for j in idx`. Causal LMs need nothing: their targets are their inputs."""

    def pad_batches(self, examples: list[dict], enc: dict, rows) -> list[dict]:
        """Padded batches of `batch_size` of the examples at positions `rows`, shortest first (a stable sort:
        equal lengths keep their order); each batch's `index` holds its rows' positions."""
        order = sorted(rows, key=lambda k: len(enc["input_ids"][k]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            features = [{k: enc[k][j] for k in INPUT_KEYS if k in enc} for j in idx]
            batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
            self.add_targets(batch, examples, idx, enc)
            batch["index"] = torch.tensor(idx, dtype=torch.long)
            batches.append(batch)
        return batches

    def inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The model's inputs of a batch, on the evaluation device."""
        return {k: v.to(self.device) for k, v in batch.items() if k in INPUT_KEYS}

    # -- scoring ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def score_file(self, model: torch.nn.Module, batches: list[dict]) -> float:
        """The metric on one file's batches (higher is better); called under inference mode."""

    # Tasks whose metric is a function of per-example predictions that all-correct predictions maximise
    # (early_reject.py) set `exact_bound` and implement gold, predict and file_metric.
    @property
    def exact_bound(self) -> bool:
        return False

    def gold(self, file: DevFile) -> torch.Tensor:
        """The right predictions of `file`'s examples, in example order (what predict returns per row)."""
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's predictions for the batch's rows and how sure it is of each (higher: surer; None if the
        task cannot say), on the CPU; called under inference mode."""
        raise NotImplementedError

    def file_metric(self, preds: torch.Tensor, gold: torch.Tensor) -> float:
        """The metric of a file's predictions against its gold ones; never lower when a prediction is made right."""
        raise NotImplementedError

    @contextlib.contextmanager
    def scoring_context(self) -> Iterator[None]:
        """Inference mode, with bf16 autocast on a GPU."""
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            yield

    def fitness(self, model: torch.nn.Module, files: DevFiles, dev_paths: list[str]) -> Fitness:
        """The mean of the per-file scores; files are keyed by basename when those are unique."""
        model.eval()
        per_file = {}
        with self.scoring_context():
            for file in files:
                per_file[file_key(file.path, dev_paths)] = self.score_file(model, file.batches)
        total = sum(len(file.examples) for file in files)
        return Fitness(mean_score(per_file), per_file, scored=total, total=total)

    def classification_report(self, model: torch.nn.Module, files: DevFiles) -> dict[str, dict[str, float]]:
        raise ValueError("classification_report needs --task sequence-classification")

    # -- data for merge statistics (methods/statistics.py) ---------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The batch's mean negative log-likelihood under `model` (differentiable)."""

    def forward(self, model: torch.nn.Module, batch: dict) -> None:
        """One forward over `batch` (outputs discarded), for forward hooks."""
        model(**self.inputs(batch))

    def examples(self, files: DevFiles, limit: int | None = None) -> Iterator[dict]:
        """Single-example batches (padding removed) from the dev files in order, at most `limit`."""
        count = 0
        for file in files:
            for batch in file.batches:
                for row in range(batch["input_ids"].shape[0]):
                    if limit is not None and count >= limit:
                        return
                    width = (
                        int(batch["attention_mask"][row].sum())
                        if "attention_mask" in batch
                        else batch["input_ids"].shape[1]
                    )
                    one = {}
                    for key, value in batch.items():
                        if key in INPUT_KEYS:
                            one[key] = (
                                value[row : row + 1, :width]
                                if self.tokenizer.padding_side == "right"
                                else value[row : row + 1, -width:]
                            )
                        else:
                            one[key] = value[row : row + 1]
                    count += 1
                    yield one

    def forward_all(self, model: torch.nn.Module, files: DevFiles, limit: int | None = None) -> None:
        """Runs the model over the dev batches, for forward hooks; stops once `limit` examples were seen
        (whole batches, so a few more may run)."""
        model.eval()
        seen = 0
        with torch.inference_mode():
            for file in files:
                for batch in file.batches:
                    if limit is not None and seen >= limit:
                        return
                    self.forward(model, batch)
                    seen += batch["input_ids"].shape[0]
