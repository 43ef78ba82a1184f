"""A user's fitness: `--task module:function` names fn(model, tokenizer, dev_paths, device) -> number.

The function reads the dev paths itself (they are not loaded here) and gets the caller's tokenizer as
given. Its return value is the score (higher is better), reported as the single file "user"; anything
that is not a real number (None, a string, a bool) is a UserError naming the function. There are no
batches, so Fisher and RegMean statistics refuse it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import torch

from evolver_kernels.errors import ArgumentError
from evolver_kernels.evaluation.base import STATISTICS_NEED_BUILTIN, DevFiles, Fitness, TaskEvaluator


def load_user_function(spec: str) -> Callable:
    """`module:function` -> the callable, with a clear error when either part is missing."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ArgumentError("task", f"{spec!r}: a user function is written module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ArgumentError("task", f"{spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        # ValueError, not TypeError: the CLIs print a ValueError as a one-line error (a bad --task value).
        raise ArgumentError("task", f"{spec!r}: {module_name} has no function {fn_name!r}")
    return fn


class UserFunctionEvaluator(TaskEvaluator):
    """The fitness of `spec` (module:function); `metric` is the spec too, whatever the option says."""

    name = "module:function"
    metrics = ()

    def __init__(self, spec: str, tokenizer, config, **options):
        self.spec = spec
        self.fn = load_user_function(spec)
        super().__init__(tokenizer, config, **options)

    def _choose_metric(self, metric: str | None) -> str:
        return self.spec

    def _prepare_tokenizer(self, tokenizer):
        return tokenizer  # the function is handed the caller's tokenizer, to pad (or not) as it likes

    def load_files(self, paths: list[str], max_examples: int | None = None, subset=None) -> DevFiles:
        if subset is not None:
            raise ValueError("subset: the function reads the dev files itself; it cannot be split")
        return []  # the function reads the dev paths itself, in whatever format it knows

    def fitness(self, model: torch.nn.Module, files: DevFiles, dev_paths: list[str]) -> Fitness:
        value = self.fn(model, self.tokenizer, dev_paths, self.device)
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError  # float() would accept these, but they are not scores
            score = float(value)
        except (TypeError, ValueError):
            raise ArgumentError(
                "task", f"{self.spec}: the function returned {value!r}; it must return a number (higher is better)"
            ) from None
        return Fitness(score, {"user": score})

    def encode(self, examples: list[dict]) -> dict:
        raise ValueError(STATISTICS_NEED_BUILTIN)

    def score_file(self, model: torch.nn.Module, batches: list[dict]) -> float:
        raise ValueError(STATISTICS_NEED_BUILTIN)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise ValueError(STATISTICS_NEED_BUILTIN)

    def forward(self, model: torch.nn.Module, batch: dict) -> None:
        raise ValueError(STATISTICS_NEED_BUILTIN)

    def examples(self, files: DevFiles, limit: int | None = None) -> Iterator[dict]:
        raise ValueError(STATISTICS_NEED_BUILTIN)

    def forward_all(self, model: torch.nn.Module, files: DevFiles, limit: int | None = None) -> None:
        raise ValueError(STATISTICS_NEED_BUILTIN)
