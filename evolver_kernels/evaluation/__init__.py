"""One evaluator per task behind one interface (base.TaskEvaluator); `evolver_kernels.evaluation.evaluator.Evaluator`
is the front that the rest of the package uses.

TASKS maps each built-in task name to its evaluator class; `task_class` also sends a module:function
spec to the user-function evaluator, and `build` constructs the evaluator for a --task value.
"""

from __future__ import annotations

from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.base import (
    LOGITS_BUDGET,
    Fitness,
    TaskEvaluator,
    budget_slices,
    default_logits_budget,
    token_nll,
    unique_basenames,
    with_pad_token,
)
from evolver_kernels.evaluation.causal_lm import CausalLMEvaluator
from evolver_kernels.evaluation.classification import ClassificationEvaluator
from evolver_kernels.evaluation.lm_eval_task import LmEvalEvaluator
from evolver_kernels.evaluation.seq2seq import Seq2SeqEvaluator
from evolver_kernels.evaluation.user_function import UserFunctionEvaluator, load_user_function

TASKS: dict[str, type[TaskEvaluator]] = {
    cls.name: cls for cls in (ClassificationEvaluator, CausalLMEvaluator, Seq2SeqEvaluator, LmEvalEvaluator)
}


def is_user_function(task: str) -> bool:
    return ":" in task  # built-in task names have no colon


def task_class(task: str) -> type[TaskEvaluator]:
    """The evaluator class for a --task value."""
    if is_user_function(task):
        return UserFunctionEvaluator
    if task not in TASKS:
        raise ArgumentError("task", f"must be one of {', '.join(TASKS)} or module:function, got {task!r}")
    return TASKS[task]


def build(task: str, tokenizer, config, **options) -> TaskEvaluator:
    """The evaluator of `task` (a TASKS name or module:function); options as TaskEvaluator takes them."""
    cls = task_class(task)
    if cls is UserFunctionEvaluator:
        return UserFunctionEvaluator(task, tokenizer, config, **options)
    return cls(tokenizer, config, **options)


__all__ = [
    "LOGITS_BUDGET",
    "TASKS",
    "CausalLMEvaluator",
    "ClassificationEvaluator",
    "Fitness",
    "LmEvalEvaluator",
    "Seq2SeqEvaluator",
    "TaskEvaluator",
    "UserFunctionEvaluator",
    "budget_slices",
    "build",
    "default_logits_budget",
    "is_user_function",
    "load_user_function",
    "task_class",
    "token_nll",
    "unique_basenames",
    "with_pad_token",
]
