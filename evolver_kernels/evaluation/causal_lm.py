"""Causal language modelling: `text` rows, scored by how well the model predicts each next token.

Metric: neg-loss, the negated mean token cross-entropy over every non-padding token after the first
(summed over the file, then divided by its token count, so batching does not weigh the mean). Scoring
forwards at most `logits_budget` bytes of fp32 logits at a time (see base.budget_slices).
"""

from __future__ import annotations

import torch

from evolver_kernels.evaluation.base import IGNORE_INDEX, TaskEvaluator, budget_slices, token_nll


def _next_token_nll(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """token_nll of each position predicting the next input token; padding is not a target."""
    ids = inputs["input_ids"]
    labels = ids.masked_fill(inputs.get("attention_mask", torch.ones_like(ids)) == 0, IGNORE_INDEX)
    return token_nll(logits[:, :-1], labels[:, 1:])


class CausalLMEvaluator(TaskEvaluator):
    name = "causal-lm"
    metrics = ("neg-loss",)

    def encode(self, examples: list[dict]) -> dict:
        return self.tokenizer([e["text"] for e in examples], truncation=True, max_length=self.max_length)

    def score_file(self, model: torch.nn.Module, batches: list[dict]) -> float:
        total, count = 0.0, 0
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        for batch in batches:
            for sub in budget_slices(self.inputs(batch), vocab, self.logits_budget):
                # .float() on the output, not inside token_nll: the model's own (bf16) logits are freed
                # before cross-entropy makes its copies.
                logits = model(**sub).logits.float()
                loss, n = _next_token_nll(logits, sub)
                total += float(loss)
                count += n
                del logits, loss  # before the next slice's forward allocates its logits
        return -total / max(count, 1)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Mean cross-entropy of the batch's next tokens."""
        inputs = self.inputs(batch)
        total, count = _next_token_nll(model(**inputs).logits.float(), inputs)
        return total / count
