"""The per-task evaluators behind Evaluator: the registry, the shared token loss, the caller's tokenizer left
alone, and the user function's checks."""

import sys

import pytest
import torch
import torch.nn.functional as nnf
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from evolver_kernels import evaluation
from evolver_kernels.errors import UserError
from evolver_kernels.evaluation import evaluator as evaluate
from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.testing import tiny_models

ROWS = {"bert": tiny_models.sentiment_rows, "gpt2": tiny_models.lm_rows, "t5": tiny_models.seq2seq_rows}
MODEL_CLASSES = {"bert": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
TASK_OF = {"bert": "sequence-classification", "gpt2": "causal-lm", "t5": "seq2seq"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (model directory, dev file) for one tiny model of each task."""
    root = tmp_path_factory.mktemp("tasks")
    return {
        kind: (
            tiny_models.make_population(kind, str(root / kind), 1)[0],
            tiny_models.write_jsonl(str(root / kind / "dev.jsonl"), rows(12, 3)),
        )
        for kind, rows in ROWS.items()
    }


def _load(tiny, kind):
    model_dir, dev = tiny[kind]
    return MODEL_CLASSES[kind].from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), dev


# -- the caller's tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_without_pad_token_is_copied_not_modified(tiny):
    model, tok, dev = _load(tiny, "gpt2")
    tok.pad_token = None  # the tiny tokenizers have one; GPT-2's own does not
    ev = Evaluator("causal-lm", tok, [dev], config=model.config, batch_size=4)
    assert tok.pad_token is None
    assert ev.tokenizer is not tok and ev.tokenizer.pad_token == tok.eos_token
    # The same score as padding the caller's tokenizer in place (what the evaluator once did).
    padded = AutoTokenizer.from_pretrained(tiny["gpt2"][0])
    padded.pad_token = padded.eos_token
    assert ev(model).score == Evaluator("causal-lm", padded, [dev], config=model.config, batch_size=4)(model).score


def test_tokenizer_with_pad_token_is_used_as_is(tiny):
    model, tok, dev = _load(tiny, "gpt2")
    assert Evaluator("causal-lm", tok, [dev], config=model.config).tokenizer is tok


# -- the shared token loss -----------------------------------------------------------------------------------
def test_token_nll_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, 4:] = -100
    labels[2, :2] = -100
    total, count = evaluation.token_nll(logits, labels)
    flat_logits, flat_labels = logits.reshape(-1, 11), labels.reshape(-1)
    assert count == int((labels != -100).sum()) == 21 - 5
    assert torch.allclose(total, nnf.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum"))
    assert torch.allclose(total / count, nnf.cross_entropy(flat_logits, flat_labels, ignore_index=-100))
    total.backward()
    assert logits.grad[0, 4:].abs().sum() == 0 and logits.grad[0, :4].abs().sum() > 0  # ignored rows: no gradient


def test_budget_slices_cover_every_row_within_the_budget():
    inputs = {"input_ids": torch.arange(70).reshape(7, 10), "attention_mask": torch.ones(7, 10, dtype=torch.long)}
    slices = list(evaluation.budget_slices(inputs, vocab=5, budget=3 * 10 * 5 * 4))
    assert [s["input_ids"].shape[0] for s in slices] == [3, 3, 1]
    assert torch.equal(torch.cat([s["input_ids"] for s in slices]), inputs["input_ids"])
    assert len(list(evaluation.budget_slices(inputs, vocab=None, budget=1))) == 1  # vocabulary unknown: whole batch


# -- the registry --------------------------------------------------------------------------------------------
def test_registry_names_every_built_in_task():
    assert tuple(evaluation.TASKS) == evaluate.TASKS == ("sequence-classification", "causal-lm", "seq2seq", "lm-eval")
    assert {name: cls.metrics for name, cls in evaluation.TASKS.items()} == evaluate.METRICS
    assert evaluation.task_class("some.module:fitness") is evaluation.UserFunctionEvaluator
    with pytest.raises(ValueError, match="^task must be one of sequence-classification, causal-lm, seq2seq"):
        evaluation.task_class("translation")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_each_task_is_reached_through_the_registry(tiny, kind):
    model, tok, dev = _load(tiny, kind)
    task = TASK_OF[kind]
    ev = Evaluator(task, tok, [dev], config=model.config, batch_size=4)
    assert type(ev.task_evaluator) is evaluation.TASKS[task]
    assert ev.metric == evaluate.default_metric(task, False) in evaluation.TASKS[task].metrics
    fit = ev(model)
    assert list(fit.per_file) == ["dev.jsonl"] and fit.score == fit.per_file["dev.jsonl"]
    # The same evaluator, built directly: the same batches and the same score.
    direct = evaluation.build(task, tok, model.config, batch_size=4)
    assert direct.fitness(model, direct.load_files([dev]), [dev]).score == fit.score
    example = next(iter(ev.examples(1)))
    assert ev.loss(model, example).requires_grad


# -- the user function ---------------------------------------------------------------------------------------
USER_FN = """
def returns_none(model, tokenizer, dev_paths, device):
    return None

def returns_text(model, tokenizer, dev_paths, device):
    return "0.5"

def counts_paths(model, tokenizer, dev_paths, device):
    return len(dev_paths)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "taskfit.py").write_text(USER_FN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("taskfit", None)
    yield "taskfit"
    sys.modules.pop("taskfit", None)


@pytest.mark.parametrize("fn,shown", [("returns_none", "None"), ("returns_text", "'0.5'")])
def test_user_function_returning_no_number_is_a_user_error(tiny, user_module, fn, shown):
    model, tok, _ = _load(tiny, "gpt2")
    ev = Evaluator(f"{user_module}:{fn}", tok, ["anything"], config=model.config)
    assert isinstance(ev.task_evaluator, evaluation.UserFunctionEvaluator)
    with pytest.raises(
        UserError, match=f"^task {user_module}:{fn}: the function returned {shown}; it must return a number"
    ):
        ev(model)


def test_user_function_score_and_refused_statistics(tiny, user_module):
    model, tok, _ = _load(tiny, "gpt2")
    ev = Evaluator(f"{user_module}:counts_paths", tok, ["a", "b"], config=model.config, metric="ignored")
    assert ev.metric == ev.task == f"{user_module}:counts_paths" and ev.tokenizer is tok and ev.files == []
    assert ev(model).as_dict() == {"score": 2.0, "per_file": {"user": 2.0}}
    with pytest.raises(ValueError, match="need a built-in --task"):
        next(iter(ev.examples()))
    with pytest.raises(ValueError, match="need a built-in --task"):
        ev.forward_all(model)
    with pytest.raises(ValueError, match=f"{user_module} has no function 'missing'"):
        Evaluator(f"{user_module}:missing", tok, [], config=model.config)
