"""Sequence-to-sequence: `input` rows with a `target` text.

Metrics: neg-loss, the negated mean cross-entropy of the target tokens (teacher-forced; summed over the
file, then divided by its token count); exact-match, the share of greedy decodings equal to the target
(both stripped of surrounding whitespace).
"""

from __future__ import annotations

import torch

from evolver_kernels.evaluation.base import IGNORE_INDEX, TaskEvaluator, token_nll


class Seq2SeqEvaluator(TaskEvaluator):
    name = "seq2seq"
    metrics = ("neg-loss", "exact-match")

    def encode(self, examples: list[dict]) -> dict:
        tok = self.tokenizer
        enc = tok([e["input"] for e in examples], truncation=True, max_length=self.max_length)
        enc["target_ids"] = tok(
            text_target=[e["target"] for e in examples], truncation=True, max_length=self.max_length
        )["input_ids"]
        return enc

    def add_targets(self, batch: dict, examples: list[dict], idx: list[int], enc: dict) -> None:
        targets = [enc["target_ids"][j] for j in idx]
        width = max(len(t) for t in targets)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        for row, t in enumerate(targets):
            labels[row, : len(t)] = torch.tensor(t)
        batch["labels"] = labels
        batch["targets"] = [examples[j]["target"] for j in idx]  # the text, for exact-match

    def score_file(self, model: torch.nn.Module, batches: list[dict]) -> float:
        if self.metric == "exact-match":
            return self._exact_match(model, batches)
        total, count = 0.0, 0
        for batch in batches:
            loss, n = self._target_nll(model, batch)
            total += float(loss)
            count += n
        return -total / max(count, 1)

    def _exact_match(self, model: torch.nn.Module, batches: list[dict]) -> float:
        hits = torch.cat([self.predict(model, batch)[0] for batch in batches])
        return self.file_metric(hits, torch.ones_like(hits))

    # -- per-example outcomes of exact-match, for early rejection (early_reject.py) ---------------------------
    @property
    def exact_bound(self) -> bool:
        return self.metric == "exact-match"

    def gold(self, file) -> torch.Tensor:
        return torch.ones(len(file.examples), dtype=torch.bool)  # every decoding equal to its target

    def predict(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, None]:
        """Whether each row's greedy decoding equals its target (both stripped); no confidence."""
        width = batch["labels"].shape[1]
        generated = model.generate(**self.inputs(batch), max_new_tokens=width + 2, do_sample=False, num_beams=1)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return torch.tensor([t.strip() == g.strip() for t, g in zip(texts, batch["targets"])], dtype=torch.bool), None

    def file_metric(self, preds: torch.Tensor, gold: torch.Tensor) -> float:
        return int((preds == gold).sum()) / max(len(preds), 1)

    def _target_nll(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        # The labels go into the model too: it builds its decoder inputs from them (teacher forcing).
        labels = batch["labels"].to(self.device)
        logits = model(**self.inputs(batch), labels=labels).logits.float()
        return token_nll(logits, labels)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Mean cross-entropy of the target tokens."""
        total, count = self._target_nll(model, batch)
        return total / count

    def forward(self, model: torch.nn.Module, batch: dict) -> None:
        model(**self.inputs(batch), labels=batch["labels"].to(self.device))
