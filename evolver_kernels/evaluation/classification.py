"""Sequence classification: `text` (and optional `text_pair`) against gold `label`s.

Metrics: accuracy, macro-f1 (single-label, argmax), multilabel-f1 (multi-label models: a label is
predicted when its sigmoid probability exceeds `threshold`; accuracy then means every label right).
Labels are read through the model's label2id; the loss is cross-entropy (binary for multi-label).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.base import DevFiles, TaskEvaluator
from evolver_kernels.evaluation.data import load_examples


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
    # Integer counts, one division per label and an exactly rounded sum (fsum): the score never falls when a
    # prediction is made right, in floating point too (early_reject.py's bound relies on it).
    tp, fp, fn = ((pred & gold).sum(0).tolist(), (pred & ~gold).sum(0).tolist(), (~pred & gold).sum(0).tolist())
    scores = [2 * t / (2 * t + p + n) for t, p, n in zip(tp, fp, fn) if t + p + n > 0]
    return math.fsum(scores) / len(scores) if scores else 0.0


class ClassificationEvaluator(TaskEvaluator):
    name = "sequence-classification"
    metrics = ("accuracy", "macro-f1", "multilabel-f1")

    def __init__(self, tokenizer, config, **options):
        super().__init__(tokenizer, config, **options)
        if self.metric == "multilabel-f1" and not self.multi_label:
            raise ArgumentError("metric", "multilabel-f1 needs a model with problem_type multi_label_classification")
        self.label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}

    @classmethod
    def default_metric(cls, multi_label: bool) -> str:
        return "multilabel-f1" if multi_label else "accuracy"

    def read(self, path: str) -> list[dict]:
        return load_examples(
            path, self.name, label2id=self.label2id, num_labels=self.num_labels, multi_label=self.multi_label
        )

    def encode(self, examples: list[dict]) -> dict:
        pairs = [e.get("text_pair") for e in examples]
        return self.tokenizer(
            [e["text"] for e in examples],
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=self.max_length,
        )

    def add_targets(self, batch: dict, examples: list[dict], idx: list[int], enc: dict) -> None:
        if self.multi_label:
            multi_hot = torch.zeros(len(idx), self.num_labels, dtype=torch.bool)
            for row, j in enumerate(idx):
                multi_hot[row, examples[j]["label"]] = True
            batch["gold"] = multi_hot
        else:
            batch["gold"] = torch.tensor([examples[j]["label"] for j in idx])

    def score_file(self, model: torch.nn.Module, batches: list[dict]) -> float:
        return self._metrics(*self._classify(model, batches))[self.metric]

    def classification_report(self, model: torch.nn.Module, files: DevFiles) -> dict[str, dict[str, float]]:
        """Every classification metric on every dev file: {file: {metric: value}}, without autocast."""
        model.eval()
        with torch.inference_mode():
            return {f.path: self._metrics(*self._classify(model, f.batches)) for f in files}

    def _classify(self, model: torch.nn.Module, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        preds = [self.predict(model, batch)[0] for batch in batches]
        return torch.cat(preds), torch.cat([batch["gold"] for batch in batches])

    # -- per-example predictions, for early rejection (early_reject.py) -------------------------------------
    @property
    def exact_bound(self) -> bool:
        return True  # accuracy, macro-F1 and multi-label F1 are all maximised by right predictions

    def gold(self, file) -> torch.Tensor:
        batch: dict = {}
        self.add_targets(batch, file.examples, list(range(len(file.examples))), file.enc)
        return batch["gold"]

    def predict(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (multi-hot rows for multi-label models) and confidence: the margin of the top logit over the
        second (the distance of the label nearest to the threshold)."""
        logits = model(**self.inputs(batch)).logits.float()
        if self.multi_label:
            probs = torch.sigmoid(logits)
            return (probs > self.threshold).cpu(), (probs - self.threshold).abs().amin(-1).cpu()
        top = logits.topk(min(2, logits.shape[-1]), dim=-1).values
        margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else torch.zeros_like(top[:, 0])
        return logits.argmax(-1).cpu(), margin.cpu()

    def file_metric(self, preds: torch.Tensor, gold: torch.Tensor) -> float:
        return self._metrics(preds, gold)[self.metric]

    def _metrics(self, pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
        if self.multi_label:
            return {
                "accuracy": float((pred == gold).all(-1).double().mean()),
                "multilabel-f1": _multilabel_f1(pred, gold),
            }
        return {"accuracy": float((pred == gold).double().mean()), "macro-f1": _macro_f1(pred, gold, self.num_labels)}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Cross-entropy of the gold labels (binary cross-entropy per label for multi-label models)."""
        logits = model(**self.inputs(batch)).logits.float()
        gold = batch["gold"].to(self.device)
        if self.multi_label:
            return nnf.binary_cross_entropy_with_logits(logits, gold.float())
        return nnf.cross_entropy(logits, gold)
