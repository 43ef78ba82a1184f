"""The evaluator's causal-LM scoring under a logits budget: the same score, forwards bounded in size."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.testing import tiny_models


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    model_dir = tiny_models.make_population("llama", str(root), 1)[0]
    dev = tiny_models.write_jsonl(str(root / "dev.jsonl"), tiny_models.lm_rows(40, 2))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model, AutoTokenizer.from_pretrained(model_dir), dev


def _score(lm, budget):
    model, tok, dev = lm
    shapes = []  # of each forward's logits
    handle = model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(out.logits.shape), with_kwargs=True)
    try:
        ev = Evaluator("causal-lm", tok, [dev], config=model.config, batch_size=16, logits_budget=budget)
        return ev(model).score, shapes
    finally:
        handle.remove()


def test_budget_splits_batches_without_changing_the_score(lm):
    whole, shapes = _score(lm, 1 << 40)
    assert max(s[0] for s in shapes) == 16  # one forward per batch
    vocab = lm[0].config.vocab_size
    width = max(s[1] for s in shapes)
    budget = 3 * width * vocab * 4  # three rows of fp32 logits at the widest batch
    split, split_shapes = _score(lm, budget)
    assert len(split_shapes) > len(shapes)
    assert all(rows * w * v * 4 <= budget for rows, w, v in split_shapes)
    assert split == pytest.approx(whole, rel=1e-5)
    one_row, row_shapes = _score(lm, 1)  # below one row: one row per forward
    assert {s[0] for s in row_shapes} == {1}
    assert one_row == pytest.approx(whole, rel=1e-5)
