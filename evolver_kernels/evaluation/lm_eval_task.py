"""lm-evaluation-harness tasks as the fitness (`--task lm-eval`): the mean (or weighted mean) over the named
tasks of each task's metric, every task's score kept as a per-file score.

The candidate is scored in memory: lm-eval's HFLM is wrapped once around the evaluation model and a copy of
the caller's tokenizer; the pipeline writes each candidate's weights into that model's parameters, so no
model file is written or read per candidate. Tasks are loaded and their requests built once, as
`lm_eval.simple_evaluate` builds them (lm-eval's own default seeds: random 0, numpy, torch and few-shot 1234);
every call then runs lm-eval's `evaluate` on those requests. A score is therefore a function of the weights
alone, equal to what `lm_eval --model hf --model_args pretrained=<dir>,max_length=<--max-length>` reports for
the same tasks, few-shot count and limit. A metric lm-eval ranks lower-is-better (perplexities) is negated.

Local tasks: the dev paths are folders of task YAMLs (lm-eval's include_path); their data can be local JSON or
JSONL files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`). lm-eval's built-in tasks are indexed
only when a name is not found in those folders (indexing them takes seconds).

lm-eval is an optional dependency: `pip install "evolver-kernels[lm-eval]"`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Iterator

import torch

from evolver_kernels.errors import ArgumentError, UserError
from evolver_kernels.evaluation.base import DevFiles, Fitness, TaskEvaluator

EXTRA = 'pip install "evolver-kernels[lm-eval]"'
STATISTICS_NEED_EXAMPLES = "Fisher and RegMean statistics need a task with examples of our own, not --task lm-eval"
_RESULT_FIELDS = ("name", "alias", "sample_len", "samples")  # keys of an lm-eval result row that are not metrics


def require_lm_eval() -> None:
    """Refuses, in one line naming the extra, when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ArgumentError("task", f"lm-eval needs lm-evaluation-harness, which is not installed: {EXTRA}") from None


@contextlib.contextmanager
def lm_eval_seeds(device: torch.device) -> Iterator[None]:
    """lm-eval's default seeds, set as simple_evaluate sets them; the caller's random states come back after."""
    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            random.seed(DEFAULT_RANDOM_SEED)
            np.random.seed(DEFAULT_OTHER_SEED)
            torch.manual_seed(DEFAULT_OTHER_SEED)
            yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """lm-eval's warnings about a pre-built model silenced: handing it one is what this module means to do."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hflm(model: torch.nn.Module, tokenizer, batch_size: int, max_length: int):
    """lm-eval's HFLM around `model` (used as it is: same device, dtype, parameters), without progress bars."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):  # per-candidate progress bars would bury the run's own
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    with _quiet("lm_eval.models.huggingface"):
        return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _requests_built(**_kwargs) -> None:
    """Stands in for a loaded task's build_all_requests: its requests were built once, and lm-eval's evaluate()
    would rebuild them on every call (drawing few-shot examples again from an advanced generator)."""


class LmEvalEvaluator(TaskEvaluator):
    """The lm-eval tasks `tasks` (names in the dev folders or lm-eval's registry); `task_metrics` one metric for
    every task or one per task (default: each task's first); `num_fewshot` overrides the tasks' own (except a
    task fixed at 0, as lm-eval does); `weights` one per task (default: equal). The metric, batch size and
    max_length options are lm-eval's; `max_examples` (load_files) is its limit."""

    name = "lm-eval"
    metrics = ()

    def __init__(
        self,
        tokenizer,
        config,
        *,
        tasks: list[str] | None = None,
        task_metrics: list[str] | None = None,
        num_fewshot: int | None = None,
        weights: list[float] | None = None,
        **options,
    ):
        require_lm_eval()
        if not tasks:
            raise UserError("--task lm-eval needs --lm-eval-tasks (the lm-eval task names)")
        self.tasks = list(tasks)
        metrics = list(task_metrics or [None])
        if len(metrics) not in (1, len(self.tasks)):
            raise UserError(
                f"--lm-eval-metric takes one metric or one per task ({len(self.tasks)}), got {len(metrics)}"
            )
        self.task_metrics = metrics * len(self.tasks) if len(metrics) == 1 else metrics
        if weights is not None and len(weights) != len(self.tasks):
            raise UserError(f"--lm-eval-weights takes one weight per task ({len(self.tasks)}), got {len(weights)}")
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.tasks)
        self.num_fewshot = num_fewshot
        self.vocab = getattr(config, "vocab_size", None)
        self.loaded: dict | None = None
        self.limit: int | None = None
        self.sign: dict[str, float] = {}  # -1 for a metric lm-eval ranks lower-is-better
        self.docs = 0
        self._wrapped: tuple[torch.nn.Module, object] | None = None
        super().__init__(tokenizer, config, **options)

    def _choose_metric(self, metric: str | None) -> str:
        if metric is not None:
            raise UserError("--metric does not apply to --task lm-eval; use --lm-eval-metric")
        return "lm-eval"  # named with the tasks' metrics once they are loaded (load_files)

    def _prepare_tokenizer(self, tokenizer):
        return tokenizer  # HFLM gets a copy and configures its padding as lm-eval does

    def logits_bytes(self) -> int:
        """Bytes one HFLM batch needs beside the model: its logits and their log-softmax, batch_size rows of
        max_length tokens (counted in fp32); 0 when the vocabulary is unknown."""
        return 2 * self.batch_size * self.max_length * (self.vocab or 0) * 4

    # -- tasks, loaded and built once ----------------------------------------------------------------------
    def load_files(self, paths: list[str], max_examples: int | None = None, subset=None) -> DevFiles:
        """Loads the tasks (the dev paths: folders of task YAMLs) and builds their requests; no dev files of ours."""
        if subset is not None:
            raise ValueError("subset: its data are lm-eval tasks; it cannot be split")
        from lm_eval.defaults import DEFAULT_OTHER_SEED
        from lm_eval.evaluator_utils import get_sample_size
        from lm_eval.tasks import TaskManager

        self.limit = max_examples
        with lm_eval_seeds(self.device):
            manager = TaskManager(include_path=list(paths), include_defaults=False) if paths else None
            if manager is None or any(t not in manager.all_tasks for t in self.tasks):
                manager = TaskManager(include_path=list(paths) or None)
            unknown = [t for t in self.tasks if t not in manager.all_tasks]
            if unknown:
                where = f" in {', '.join(paths)} or" if paths else ""
                raise UserError(f"--lm-eval-tasks {', '.join(unknown)}: no such task{where} in lm-eval's registry")
            try:
                self.loaded = manager.load(self.tasks)
            except Exception as err:  # a task's YAML or data that lm-eval cannot read
                raise UserError(
                    f"--lm-eval-tasks: lm-eval cannot load {', '.join(self.tasks)}: {' '.join(str(err).split())}"
                ) from None
            self.task_metrics = [
                self._check_metric(name, metric) for name, metric in zip(self.tasks, self.task_metrics)
            ]
            for task in self.loaded["tasks"].values():
                if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=self.num_fewshot)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
                task.build_all_requests(limit=get_sample_size(task, self.limit), rank=0, world_size=1)
                task.build_all_requests = _requests_built
                self.docs += len({inst.doc_id for inst in task.instances})
        shown = set(self.task_metrics)
        self.metric = "lm-eval " + (
            shown.pop() if len(shown) == 1 else ", ".join(f"{t} {m}" for t, m in zip(self.tasks, self.task_metrics))
        )
        return []

    def _leaf(self, name: str):
        """The task `name` names, or a group's first task (whose metrics the group aggregates)."""
        if name in self.loaded["tasks"]:
            return self.loaded["tasks"][name]
        group = self.loaded["groups"].get(name)
        if group is None:
            raise UserError(f"--lm-eval-tasks {name}: a tag, not a task or group; name its tasks instead")
        return group.get_all_tasks()[0]

    def _check_metric(self, name: str, metric: str | None) -> str:
        """The metric of task `name` (default: its first), refused when the task does not compute it; notes in
        self.sign whether lm-eval ranks it lower-is-better (-1: the score is negated)."""
        task = self._leaf(name)
        known = list(task.aggregation())
        metric = metric or known[0]
        base = metric.split(",")[0]
        if base not in known:
            raise UserError(f"--lm-eval-metric {metric}: task {name} computes {', '.join(known)}")
        self.sign[name] = 1.0 if task.higher_is_better().get(base, True) else -1.0
        return metric

    # -- scoring --------------------------------------------------------------------------------------------
    def _lm(self, model: torch.nn.Module):
        """HFLM around `model`, built on its first call and kept (the pipeline rewrites its weights in place)."""
        if self._wrapped is None or self._wrapped[0] is not model:
            self._wrapped = (model, _hflm(model, copy.deepcopy(self.tokenizer), self.batch_size, self.max_length))
        return self._wrapped[1]

    @staticmethod
    def _value(row: dict, name: str, metric: str) -> float:
        """The metric's value in lm-eval's result row of task `name` (keys `metric,filter`: a metric without a
        filter is its first filter's)."""
        keys = [k for k in row if k not in _RESULT_FIELDS and "_stderr," not in k]
        matches = [k for k in keys if k == metric or ("," not in metric and k.split(",")[0] == metric)]
        if not matches:
            raise UserError(f"--lm-eval-metric {metric}: lm-eval reported {', '.join(keys)} for {name}")
        return float(row[matches[0]])

    def fitness(self, model: torch.nn.Module, files: DevFiles, dev_paths: list[str]) -> Fitness:
        """The weighted mean of the tasks' scores; each task's score under its name."""
        from lm_eval.evaluator import evaluate

        model.eval()
        lm = self._lm(model)
        for task in self.loaded["tasks"].values():
            for inst in task.instances:
                inst.resps.clear()
                inst.filtered_resps.clear()
        with lm_eval_seeds(self.device):
            results = evaluate(lm=lm, task_dict=self.loaded, limit=self.limit, bootstrap_iters=0, log_samples=False)
        per_file = {
            name: self.sign[name] * self._value(results["results"][name], name, metric)
            for name, metric in zip(self.tasks, self.task_metrics)
        }
        score = sum(w * per_file[t] for t, w in zip(self.tasks, self.weights)) / sum(self.weights)
        return Fitness(score, per_file, scored=self.docs, total=self.docs)

    # -- no examples of ours: no statistics ----------------------------------------------------------------
    def encode(self, examples: list[dict]) -> dict:
        raise ValueError(STATISTICS_NEED_EXAMPLES)

    def score_file(self, model: torch.nn.Module, batches: list[dict]) -> float:
        raise ValueError(STATISTICS_NEED_EXAMPLES)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise ValueError(STATISTICS_NEED_EXAMPLES)

    def forward(self, model: torch.nn.Module, batch: dict) -> None:
        raise ValueError(STATISTICS_NEED_EXAMPLES)

    def examples(self, files: DevFiles, limit: int | None = None) -> Iterator[dict]:
        raise ValueError(STATISTICS_NEED_EXAMPLES)

    def forward_all(self, model: torch.nn.Module, files: DevFiles, limit: int | None = None) -> None:
        raise ValueError(STATISTICS_NEED_EXAMPLES)
