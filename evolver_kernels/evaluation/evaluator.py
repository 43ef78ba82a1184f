"""The evaluation loop: scores a Hugging Face model on development files (higher is better).

Knows nothing of evolution: it takes a model and returns a `Fitness`. Data is tokenised once, sorted by
length and batched; evaluation runs under torch.inference_mode, with bf16 autocast on a GPU. Several dev
files are scored one by one and averaged (macro over domains); each file's score is kept.

Tasks and metrics:
  sequence-classification  accuracy | macro-f1 | multilabel-f1 (threshold on sigmoid probabilities)
  causal-lm                neg-loss (negated mean token cross-entropy)
  seq2seq                  neg-loss | exact-match (greedy decoding)
  lm-eval                  lm-evaluation-harness tasks' metrics, (weighted) mean over tasks; the dev paths are
                           folders of task YAMLs (evaluation/lm_eval_task.py)
  module:function          a user function fn(model, tokenizer, dev_paths, device) -> float

Accuracy, macro-F1, multi-label F1 and exact-match are scored through per-example predictions, which give each
fully scored model a record; a call with a Rival built from one is scored in the rival's order and, with early
rejection on, stops once the rival cannot be beaten (evaluation/early_reject.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# The noqa'd names are re-exported: callers have imported these private helpers from this module.
from evolver_kernels import evaluation
from evolver_kernels.evaluation.base import LOGITS_BUDGET, Fitness, Subset, default_logits_budget
from evolver_kernels.evaluation.base import unique_basenames as _unique_basenames  # noqa: F401
from evolver_kernels.evaluation.classification import _macro_f1, _multilabel_f1  # noqa: F401
from evolver_kernels.evaluation.early_reject import OutcomeScorer, Rival
from evolver_kernels.evaluation.user_function import load_user_function

TASKS = tuple(evaluation.TASKS)
METRICS = {name: cls.metrics for name, cls in evaluation.TASKS.items()}

__all__ = [
    "LOGITS_BUDGET",
    "METRICS",
    "TASKS",
    "Evaluator",
    "Fitness",
    "Rival",
    "default_logits_budget",
    "default_metric",
    "infer_task",
    "load_user_function",
]


def default_metric(task: str, multi_label: bool) -> str:
    cls = evaluation.TASKS.get(task)
    return cls.default_metric(multi_label) if cls is not None else "neg-loss"


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
        f"cannot infer --task from architecture {arch or '(none)'}; pass --task ({', '.join(TASKS)} or module:function)"
    )


class Evaluator:
    """Scores models on fixed dev files; construct once, call for each candidate. Causal-LM scoring forwards
    at most `logits_budget` bytes of fp32 logits at a time (default: default_logits_budget(device)).

    A front for the task's evaluator (evolver_kernels.evaluation): it loads the dev files once and hands
    them to that evaluator on every call (with `subset`, only the examples it keeps: selection.HeldOut). `tokenizer` is the one used for the data: the caller's, or a copy
    of it with a pad token when it had none. `task_options` are the task's own keyword arguments (lm-eval's
    tasks, metrics, few-shot count, weights: evaluation/lm_eval_task.py)."""

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
        early_reject: bool = True,
        task_options: dict | None = None,
        subset: Subset | None = None,
    ):
        self.device = torch.device(device)
        self.logits_budget = logits_budget if logits_budget is not None else default_logits_budget(self.device)
        self.dev_paths = list(dev_paths)
        self.task = task
        self.task_evaluator = evaluation.build(
            task,
            tokenizer,
            config,
            metric=metric,
            batch_size=batch_size,
            max_length=max_length,
            device=self.device,
            threshold=threshold,
            logits_budget=self.logits_budget,
            **(task_options or {}),
        )
        te = self.task_evaluator
        self.user_fn = getattr(te, "fn", None)  # the module:function callable; None for built-in tasks
        self.tokenizer = te.tokenizer
        self.multi_label, self.num_labels = te.multi_label, te.num_labels
        self.threshold, self.batch_size, self.max_length = te.threshold, te.batch_size, te.max_length
        self.files = te.load_files(self.dev_paths, max_examples, subset)
        self.metric = te.metric  # after loading: lm-eval names its tasks' metrics once they are loaded
        # per-example outcomes and early rejection where the metric allows an exact bound (early_reject.py)
        self.outcome_scorer = OutcomeScorer(te, self.files, self.dev_paths, early_reject) if te.exact_bound else None

    @property
    def exact_bound(self) -> bool:
        """Whether scores come with per-example outcomes that a Rival can be built from (early rejection)."""
        return self.outcome_scorer is not None

    def __call__(self, model: torch.nn.Module, rival: Rival | None = None) -> Fitness:
        """The model's fitness. With a `rival` (tasks with exact_bound only), scored in the rival's order and,
        with early rejection on, stopped as soon as the rival cannot be beaten (then the Fitness is incomplete:
        upper bounds that do not beat it)."""
        if self.outcome_scorer is not None:
            return self.outcome_scorer(model, rival)
        if rival is not None:
            raise ValueError(f"{self.metric} has no per-example outcomes to compare with a rival")
        return self.task_evaluator.fitness(model, self.files, self.dev_paths)

    def classification_report(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """Every classification metric on every dev file: {file: {metric: value}}."""
        return self.task_evaluator.classification_report(model, self.files)

    # -- data for Fisher and RegMean statistics --------------------------------------------------------------
    def examples(self, limit: int | None = None) -> Iterator[dict]:
        """Single-example batches (padding removed) from the dev files in order, at most `limit`."""
        # A generator itself, so a task that has no examples (module:function) refuses on first use, not here.
        yield from self.task_evaluator.examples(self.files, limit)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The batch's mean negative log-likelihood under `model` (differentiable): gold labels for
        classification, next tokens for causal LMs, targets for seq2seq."""
        return self.task_evaluator.loss(model, batch)

    def forward_all(self, model: torch.nn.Module, limit: int | None = None) -> None:
        """Runs the model over the dev batches (outputs discarded), for forward hooks; at most `limit` examples."""
        self.task_evaluator.forward_all(model, self.files, limit)
