"""The evaluation loop: scores a Hugging Face model on development files (higher is better).

Knows nothing of evolution: it takes a model and returns a `Fitness`. Data is tokenised once, sorted by
length and batched; evaluation runs under torch.inference_mode, with bf16 autocast on a GPU. Several dev
files are scored one by one and averaged (macro over domains); each file's score is kept.

Tasks and metrics:
  sequence-classification  accuracy | macro-f1 | multilabel-f1 (threshold on sigmoid probabilities)
  causal-lm                neg-loss (negated mean token cross-entropy)
  seq2seq                  neg-loss | exact-match (greedy decoding)
  module:function          a user function fn(model, tokenizer, dev_paths, device) -> float
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import torch
import torch.nn.functional as nnf

from .data import load_examples
from .errors import UserError

TASKS = ("sequence-classification", "causal-lm", "seq2seq")
METRICS = {
    "sequence-classification": ("accuracy", "macro-f1", "multilabel-f1"),
    "causal-lm": ("neg-loss",),
    "seq2seq": ("neg-loss", "exact-match"),
}


def default_metric(task: str, multi_label: bool) -> str:
    if task == "sequence-classification":
        return "multilabel-f1" if multi_label else "accuracy"
    return "neg-loss"


def infer_task(config) -> str:
    """The task from the model's architecture name (config.architectures[0])."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    raise ValueError(
        f"cannot infer --task from architecture {arch or '(none)'}; pass --task "
        f"({', '.join(TASKS)} or module:function)"
    )


@dataclasses.dataclass
class Fitness:
    score: float  # the mean over dev files
    per_file: dict[str, float]

    def as_dict(self) -> dict:
        return {"score": self.score, "per_file": self.per_file}


def _macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> float:
    """Macro-F1 over labels present in gold or predictions (sklearn's convention for absent labels: skip)."""
    scores = []
    for c in range(num_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def _multilabel_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Macro-F1 over labels of multi-hot [n, L] predictions (labels absent from both are skipped)."""
    tp = (pred & gold).sum(0).double()
    fp = (pred & ~gold).sum(0).double()
    fn = (~pred & gold).sum(0).double()
    present = (tp + fp + fn) > 0
    if not present.any():
        return 0.0
    return float((2 * tp / (2 * tp + fp + fn).clamp(min=1))[present].mean())


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


class Evaluator:
    """Scores models on fixed dev files; construct once, call for each candidate. Causal-LM scoring forwards
    at most `logits_budget` bytes of fp32 logits at a time (default: default_logits_budget(device))."""

    def __init__(
        self,
        task: str,
        tokenizer,
        dev_paths: list[str],
        *,
        config,
        metric: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        device: torch.device | str = "cpu",
        threshold: float = 0.5,
        max_examples: int | None = None,
        logits_budget: int | None = None,
    ):
        self.device = torch.device(device)
        self.logits_budget = logits_budget if logits_budget is not None else default_logits_budget(self.device)
        self.dev_paths = list(dev_paths)
        self.tokenizer = tokenizer
        self.user_fn = None
        if ":" in task:
            self.user_fn = load_user_function(task)
            self.task, self.metric = task, task
            return
        if task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)} or module:function, got {task!r}")
        self.task = task
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.num_labels = getattr(config, "num_labels", None)
        self.metric = metric or default_metric(task, self.multi_label)
        if self.metric not in METRICS[task]:
            raise ValueError(f"--metric {self.metric!r} does not apply to {task}; use one of {', '.join(METRICS[task])}")
        if self.metric == "multilabel-f1" and not self.multi_label:
            raise ValueError("--metric multilabel-f1 needs a model with problem_type multi_label_classification")
        self.threshold = threshold
        self.batch_size = batch_size
        self.max_length = max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        self.files = []
        for path in self.dev_paths:
            examples = load_examples(
                path, task, label2id=label2id, num_labels=self.num_labels if task == "sequence-classification" else None,
                multi_label=self.multi_label,
            )
            if max_examples:
                examples = examples[:max_examples]
            self.files.append((path, self._batches(examples)))

    # -- tokenisation, once -------------------------------------------------------------------------------
    def _batches(self, examples: list[dict]) -> list[dict]:
        tok = self.tokenizer
        if self.task == "sequence-classification":
            pairs = [e.get("text_pair") for e in examples]
            enc = tok(
                [e["text"] for e in examples], pairs if any(p is not None for p in pairs) else None,
                truncation=True, max_length=self.max_length,
            )
        elif self.task == "causal-lm":
            enc = tok([e["text"] for e in examples], truncation=True, max_length=self.max_length)
        else:
            enc = tok([e["input"] for e in examples], truncation=True, max_length=self.max_length)
            enc["target_ids"] = tok(text_target=[e["target"] for e in examples], truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(examples)), key=lambda k: len(enc["input_ids"][k]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            features = [{k: enc[k][j] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc} for j in idx]
            batch = dict(tok.pad(features, return_tensors="pt"))
            if self.task == "sequence-classification":
                if self.multi_label:
                    multi_hot = torch.zeros(len(idx), self.num_labels, dtype=torch.bool)
                    for row, j in enumerate(idx):
                        multi_hot[row, examples[j]["label"]] = True
                    batch["gold"] = multi_hot
                else:
                    batch["gold"] = torch.tensor([examples[j]["label"] for j in idx])
            elif self.task == "seq2seq":
                targets = [enc["target_ids"][j] for j in idx]
                width = max(len(t) for t in targets)
                labels = torch.full((len(idx), width), -100, dtype=torch.long)
                for row, t in enumerate(targets):
                    labels[row, : len(t)] = torch.tensor(t)
                batch["labels"] = labels
                batch["targets"] = [examples[j]["target"] for j in idx]
            batches.append(batch)
        return batches

    # -- scoring --------------------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module) -> Fitness:
        if self.user_fn is not None:
            value = self.user_fn(model, self.tokenizer, self.dev_paths, self.device)
            try:
                if isinstance(value, (bool, str, bytes)):
                    raise TypeError
                score = float(value)
            except (TypeError, ValueError):
                raise UserError(f"--task {self.task}: the function returned {value!r}; it must return a number "
                                "(higher is better)") from None
            return Fitness(score, {"user": score})
        model.eval()
        per_file = {}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for path, batches in self.files:
                per_file[os.path.basename(path) if _unique_basenames(self.dev_paths) else path] = self._score_file(model, batches)
        return Fitness(sum(per_file.values()) / len(per_file), per_file)

    def classification_report(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """Every classification metric on every dev file: {file: {metric: value}}."""
        if self.task != "sequence-classification":
            raise ValueError("classification_report needs --task sequence-classification")
        model.eval()
        with torch.inference_mode():
            return {path: self._classification_metrics(*self._classify(model, batches)) for path, batches in self.files}

    def _classify(self, model, batches) -> tuple[torch.Tensor, torch.Tensor]:
        preds, golds = [], []
        for batch in batches:
            logits = model(**self._inputs(batch)).logits.float()
            if self.multi_label:
                preds.append((torch.sigmoid(logits) > self.threshold).cpu())
            else:
                preds.append(logits.argmax(-1).cpu())
            golds.append(batch["gold"])
        return torch.cat(preds), torch.cat(golds)

    def _classification_metrics(self, pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
        if self.multi_label:
            return {"accuracy": float((pred == gold).all(-1).double().mean()), "multilabel-f1": _multilabel_f1(pred, gold)}
        return {"accuracy": float((pred == gold).double().mean()), "macro-f1": _macro_f1(pred, gold, self.num_labels)}

    # -- data for merge statistics (merge_stats.py) -------------------------------------------------------
    def examples(self, limit: int | None = None):
        """Single-example batches (padding removed) from the dev files in order, at most `limit`."""
        if self.user_fn is not None:
            raise ValueError("Fisher and RegMean statistics need a built-in --task, not a module:function fitness")
        count = 0
        for _, batches in self.files:
            for batch in batches:
                for row in range(batch["input_ids"].shape[0]):
                    if limit is not None and count >= limit:
                        return
                    width = int(batch["attention_mask"][row].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]
                    one = {}
                    for key, value in batch.items():
                        if key in ("input_ids", "attention_mask", "token_type_ids"):
                            one[key] = value[row : row + 1, :width] if self.tokenizer.padding_side == "right" else value[row : row + 1, -width:]
                        else:
                            one[key] = value[row : row + 1]
                    count += 1
                    yield one

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The batch's mean negative log-likelihood under `model` (differentiable): gold labels for
        classification, next tokens for causal LMs, targets for seq2seq."""
        inputs = self._inputs(batch)
        if self.task == "sequence-classification":
            logits = model(**inputs).logits.float()
            gold = batch["gold"].to(self.device)
            if self.multi_label:
                return nnf.binary_cross_entropy_with_logits(logits, gold.float())
            return nnf.cross_entropy(logits, gold)
        if self.task == "causal-lm":
            logits = model(**inputs).logits.float()
            labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])) == 0, -100)
            return nnf.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        labels = batch["labels"].to(self.device)
        logits = model(**inputs, labels=labels).logits.float()
        return nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def forward_all(self, model: torch.nn.Module, limit: int | None = None) -> None:
        """Runs the model over the dev batches (outputs discarded), for forward hooks; at most `limit` examples."""
        if self.user_fn is not None:
            raise ValueError("Fisher and RegMean statistics need a built-in --task, not a module:function fitness")
        model.eval()
        seen = 0
        with torch.inference_mode():
            for _, batches in self.files:
                for batch in batches:
                    if limit is not None and seen >= limit:
                        return
                    inputs = self._inputs(batch)
                    if self.task == "seq2seq":
                        model(**inputs, labels=batch["labels"].to(self.device))
                    else:
                        model(**inputs)
                    seen += batch["input_ids"].shape[0]

    def _inputs(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _score_file(self, model, batches) -> float:
        if self.task == "sequence-classification":
            return self._classification_metrics(*self._classify(model, batches))[self.metric]
        if self.task == "causal-lm":
            total, count = 0.0, 0
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            for batch in batches:
                inputs = self._inputs(batch)
                rows, width = inputs["input_ids"].shape
                # A forward's logits are rows x width x vocab: for a 128k vocabulary, 32 rows of 256 tokens are
                # 4 GiB in fp32 before the copies cross-entropy makes. Forward as many rows at a time as keep
                # them under the budget (token losses are summed, so the score does not depend on the split).
                step = max(1, self.logits_budget // (width * vocab * 4)) if vocab else rows
                for lo in range(0, rows, step):
                    sub = {k: v[lo : lo + step] for k, v in inputs.items()}
                    logits = model(**sub).logits.float()
                    labels = sub["input_ids"].masked_fill(sub["attention_mask"] == 0, -100)
                    loss = nnf.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                        reduction="sum",
                    )
                    total += float(loss)
                    count += int((labels[:, 1:] != -100).sum())
                    del logits, loss
            return -total / max(count, 1)
        # seq2seq
        if self.metric == "exact-match":
            hits, n = 0, 0
            for batch in batches:
                width = batch["labels"].shape[1]
                generated = model.generate(**self._inputs(batch), max_new_tokens=width + 2, do_sample=False, num_beams=1)
                texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
                hits += sum(t.strip() == g.strip() for t, g in zip(texts, batch["targets"]))
                n += len(texts)
            return hits / max(n, 1)
        total, count = 0.0, 0
        for batch in batches:
            labels = batch["labels"].to(self.device)
            logits = model(**self._inputs(batch), labels=labels).logits.float()
            total += float(nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
        return -total / max(count, 1)


def _unique_basenames(paths: list[str]) -> bool:
    return len({os.path.basename(p) for p in paths}) == len(paths)


def load_user_function(spec: str):
    """`module:function` -> the callable, with a clear error when either part is missing."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"--task {spec!r}: a user function is written module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--task {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--task {spec!r}: {module_name} has no function {fn_name!r}")
    return fn
