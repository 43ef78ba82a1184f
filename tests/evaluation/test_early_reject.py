"""Exact early rejection (evaluation/early_reject.py): a candidate scored only until it cannot beat its rival
is rejected exactly when a full evaluation rejects it.

The scorer is checked on models whose every prediction is chosen (a lookup table keyed by the example's
tokens), for each metric with an exact bound, on random predictions, ties, per-file averaging, multi-label and
candidates decided by the last example; then the driver end to end: --early-reject on and off give the same
model bytes and histories in both fitness modes and schedules, with fewer examples scored."""

import json
import os
import random

import pytest
import torch
from _util import KILL_RUN, run_evolve
from safetensors.torch import load_file

from evolver_kernels.evaluation.early_reject import correct
from evolver_kernels.evaluation.evaluator import Evaluator, Rival
from evolver_kernels.evolve import main
from evolver_kernels.testing import tiny_models

WORDS = tiny_models.WORDS  # the tiny tokenizer's vocabulary: every text has its own token ids


class TableModel(torch.nn.Module):
    """A classifier whose logits for each example are looked up by its (unpadded) token ids."""

    def __init__(self, table: dict[tuple[int, ...], torch.Tensor]):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        rows = [self.table[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(input_ids, attention_mask)]
        return type("Out", (), {"logits": torch.stack(rows)})()


def _dev_files(tmp_path, sizes, num_labels, multi_label, seed):
    rng = random.Random(seed)
    texts = set()
    paths = []
    for f, size in enumerate(sizes):
        rows: list[dict] = []
        while len(rows) < size:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            if text in texts:
                continue
            texts.add(text)
            if multi_label:
                chosen = rng.sample(range(num_labels), rng.randint(1, 2))
                label = [int(c in chosen) for c in range(num_labels)]  # a multi-hot vector
            else:
                label = rng.randrange(num_labels - 1)  # the last label never gold: predicting it adds a class
            rows.append({"text": text, "label": label})
        paths.append(tiny_models.write_jsonl(str(tmp_path / f"dev{f}.jsonl"), rows))
    return paths


def _evaluator(tmp_path, metric, early, sizes=(37, 23), num_labels=4, seed=0):
    multi_label = metric == "multilabel-f1"
    config = tiny_models.make_config("bert", num_labels=num_labels, multi_label=multi_label)
    tok = tiny_models.make_tokenizer("bert")
    dev = _dev_files(tmp_path, sizes, num_labels, multi_label, seed)
    return Evaluator(
        "sequence-classification", tok, dev, config=config, metric=metric, batch_size=5, early_reject=early
    )


def _table_model(ev: Evaluator, preds: list[torch.Tensor], sure: torch.Generator | None = None) -> TableModel:
    """A model predicting preds[file][example] (labels, or multi-hot rows with threshold 0.5); with `sure`,
    margins drawn from it (else all equal)."""
    table = {}
    for f, p in zip(ev.files, preds):
        for j in range(len(f.examples)):
            key = tuple(f.enc["input_ids"][j])
            margin = 1.0 + float(torch.rand((), generator=sure)) if sure is not None else 1.0
            if p.dim() == 2:
                table[key] = torch.where(p[j], 4.0 * margin, -4.0 * margin)
            else:
                table[key] = torch.nn.functional.one_hot(p[j], ev.num_labels).float() * margin
    return TableModel(table)


def _random_preds(ev: Evaluator, rng: torch.Generator, p_right: float) -> list[torch.Tensor]:
    """Predictions right with probability p_right, else random (for multi-label: random label sets)."""
    out = []
    for f in ev.files:
        gold = ev.task_evaluator.gold(f)
        if gold.dim() == 2:
            noise = torch.rand(gold.shape, generator=rng) < 0.3
        else:
            noise = torch.randint(0, ev.num_labels, gold.shape, generator=rng)
        keep = torch.rand(gold.shape[0], generator=rng) < p_right
        out.append(torch.where(_rows(keep, gold), gold, noise))
    return out


@pytest.mark.parametrize("metric", ["accuracy", "macro-f1", "multilabel-f1"])
def test_early_decisions_equal_full_decisions(tmp_path, metric):
    """For random candidates and rivals, with and without ties winning: the candidate beats the rival by its
    full score exactly when the early scorer lets it complete and it beats it; a completed early scoring equals
    the full one (score, per-file scores, outcomes); an early stop's score bounds the full score from above."""
    early = _evaluator(tmp_path, metric, early=True)
    full = Evaluator(
        "sequence-classification",
        early.tokenizer,
        early.dev_paths,
        config=_config(metric),
        metric=metric,
        batch_size=5,
        early_reject=False,
    )
    rng = torch.Generator().manual_seed(1)
    stopped = completed = 0
    fewer = []
    for trial in range(40):
        rival_preds = _random_preds(early, rng, 0.3 + 0.6 * (trial % 5) / 4)
        rival_fit = full(_table_model(early, rival_preds, sure=rng))
        assert rival_fit.complete and set(rival_fit.outcomes) == {"dev0.jsonl", "dev1.jsonl"}
        if trial % 2:  # an unrelated candidate
            cand = _table_model(early, _random_preds(early, rng, 0.3 + 0.6 * (trial % 7) / 6))
        else:  # an offspring: the rival's predictions, a few of them changed
            other = _random_preds(early, rng, 0.5)
            cand = _table_model(
                early,
                [
                    torch.where(_rows(torch.rand(r.shape[0], generator=rng) < 0.1, r), o, r)
                    for r, o in zip(rival_preds, other)
                ],
            )
        for ties_win in (False, True):
            # the rival's own score, and scores just around the candidate's, so that ties and near-misses occur
            cand_full = full(cand, Rival(rival_fit.outcomes, rival_fit.score, ties_win))
            for score in (rival_fit.score, cand_full.score, cand_full.score - 1e-12, cand_full.score + 1e-12):
                rival = Rival(rival_fit.outcomes, score, ties_win)
                got_full, got = full(cand, rival), early(cand, rival)
                assert got_full.complete and got_full.score == cand_full.score
                assert rival.beaten_by(got_full.score) == (got.complete and rival.beaten_by(got.score))
                assert got.score >= got_full.score
                assert all(got.per_file[k] >= v for k, v in got_full.per_file.items())
                if got.complete:
                    completed += 1
                    assert (got.score, got.per_file, got.outcomes) == (
                        got_full.score,
                        got_full.per_file,
                        got_full.outcomes,
                    )
                else:
                    stopped += 1
                    assert got.outcomes is None and got.scored < got.total
                    fewer.append(got.scored / got.total)
    assert stopped > 20 and completed > 20  # both paths were taken, many times
    assert min(fewer) < 0.5  # some stops came early, not just before the end


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example mask shaped to broadcast over `like`'s rows."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def _config(metric):
    return tiny_models.make_config("bert", num_labels=4, multi_label=metric == "multilabel-f1")


def test_rival_order_wrong_first_then_right_least_sure_first(tmp_path):
    """With a rival, every example the rival gets wrong (all files) comes before any it gets right, and those in
    groups by the rival's confidence, least sure first; within a group and file, batches are sorted by length;
    every example is scored exactly once."""
    ev = _evaluator(tmp_path, "accuracy", early=False, sizes=(97, 61))
    rng = torch.Generator().manual_seed(3)
    rival_fit = ev(_table_model(ev, _random_preds(ev, rng, 0.7), sure=rng))
    record = rival_fit.outcomes
    assert {c for r in record.values() for c in r} == set("x0123456789")
    order = ev.outcome_scorer.order(Rival(record, rival_fit.score))
    keys = ev.outcome_scorer.keys
    # groups of at least 2 batches of 5: file 0 (7x right) has 7, file 1 (5x right) has 5
    counts = [sum(c != "x" for c in record[k]) // 10 for k in keys]
    assert counts == [7, 5]

    def group(n, j):
        c = record[keys[n]][j]
        return 0 if c == "x" else 1 + int(c) * counts[n] // 10

    phases = [group(n, int(j)) for n, b in order for j in b["index"]]
    assert phases == sorted(phases) and set(phases) == set(range(8))
    seen = sorted((n, int(j)) for n, b in order for j in b["index"])
    assert seen == [(n, j) for n, f in enumerate(ev.files) for j in range(len(f.examples))]
    for n, f in enumerate(ev.files):
        for phase in range(8):
            lengths = [
                len(f.enc["input_ids"][int(j)])
                for m, b in order
                if m == n
                for j in b["index"]
                if group(n, int(j)) == phase
            ]
            assert lengths == sorted(lengths)


def test_record_deciles_follow_the_confidence():
    from evolver_kernels.evaluation.early_reject import record_of

    right = torch.tensor([True, False, True, True, True, False, True, True, True, True, True, True])
    confidence = torch.tensor([0.9, 5.0, 0.1, 0.5, 0.5, 0.0, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4])
    # ten right ones: one per decile, in order of confidence (0.5 twice: the earlier position first)
    assert record_of(right, confidence) == "9x0" + "45" + "x" + "21" + "876" + "3"


@pytest.mark.parametrize("ties_win", [False, True])
def test_a_candidate_decided_by_the_last_example(tmp_path, ties_win):
    """The rival gets everything wrong; the candidate equals it but for the example scored last, which it gets
    right: it wins there and only there, so it must be scored to the end and beat the rival. The same candidate
    with that example wrong ties the rival, which only the last example shows: accepted only when ties win."""
    ev = _evaluator(tmp_path, "accuracy", early=True)
    wrong = [(ev.task_evaluator.gold(f) + 1) % ev.num_labels for f in ev.files]
    rival_fit = ev(_table_model(ev, wrong))
    assert rival_fit.score == 0.0
    rival = Rival(rival_fit.outcomes, rival_fit.score, ties_win)
    last_file, last_batch = ev.outcome_scorer.order(rival)[-1]
    winner = [w.clone() for w in wrong]
    j = int(last_batch["index"][-1])
    winner[last_file][j] = ev.task_evaluator.gold(ev.files[last_file])[j]
    got = ev(_table_model(ev, winner), rival)
    assert got.complete and got.scored == got.total and rival.beaten_by(got.score)
    tie = ev(_table_model(ev, wrong), rival)  # the tie is known only after the last example, too
    assert tie.complete and rival.beaten_by(tie.score) == ties_win


def test_correct_per_example():
    assert correct(torch.tensor([1, 2, 0]), torch.tensor([1, 0, 0])).tolist() == [True, False, True]
    pred = torch.tensor([[True, False], [True, True]])
    assert correct(pred, torch.tensor([[True, False], [True, False]])).tolist() == [True, False]


def test_a_record_of_another_length_is_refused(tmp_path):
    ev = _evaluator(tmp_path, "accuracy", early=True)
    rival_fit = ev(_table_model(ev, _random_preds(ev, torch.Generator().manual_seed(0), 0.5)))
    bad = dict(rival_fit.outcomes, **{"dev0.jsonl": rival_fit.outcomes["dev0.jsonl"][:-1]})
    with pytest.raises(ValueError, match="record of dev0.jsonl has 36 outcomes for 37 examples"):
        ev(_table_model(ev, _random_preds(ev, torch.Generator().manual_seed(1), 0.5)), Rival(bad, 0.5))


# -- the driver ------------------------------------------------------------------------------------------------
def _evolve(models, dev, out, *extra):
    argv = ["--models", *models, "--dev", *dev, "--out", str(out), "--generations", "3", "--seed", "11", *extra]
    return run_evolve(argv)


def _same_run(a, b, doc_a, doc_b):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)) for k in wa)

    def decisions(doc):
        return [{k: v for k, v in g.items() if k != "examples_scored"} for g in doc["generations"]]

    assert decisions(doc_a) == decisions(doc_b)
    assert (doc_a["final_fitness"], doc_a["final_per_file"]) == (doc_b["final_fitness"], doc_b["final_per_file"])
    # --early-reject does not define the result: it is not among the recorded options
    assert {k: v for k, v in doc_a["config"].items() if k != "out"} == {
        k: v for k, v in doc_b["config"].items() if k != "out"
    }
    assert "early_reject" not in doc_a["config"]


@pytest.mark.parametrize(
    "fitness,schedule,extra",
    [
        ("merged", "sequential", ["--metric", "macro-f1"]),
        ("individual", "sequential", ["--metric", "accuracy", "--accept-ties"]),
        ("individual", "synchronous", ["--metric", "macro-f1"]),
        ("merged", "synchronous", ["--metric", "accuracy", "--accept-ties"]),
    ],
)
def test_evolve_same_bytes_with_and_without_early_rejection(bert_pop, tmp_path, fitness, schedule, extra):
    models, dev = bert_pop
    args = ["--fitness", fitness, "--schedule", schedule, "--batch-size", "8", *extra]
    on = _evolve(models, dev, tmp_path / "on", *args)
    off = _evolve(models, dev, tmp_path / "off", *args, "--early-reject", "off")
    _same_run(tmp_path / "on", tmp_path / "off", on, off)
    assert on["early_reject"] == "on" and off["early_reject"] == "off"
    full = sum(g["examples_full"] for g in on["generations"])
    assert (
        full
        == sum(g["examples_scored"] for g in off["generations"])
        == sum(g["examples_full"] for g in off["generations"])
    )
    assert sum(g["examples_scored"] for g in on["generations"]) < full  # something was rejected early
    # generation 0 scores the initial population in full
    assert on["generations"][0]["examples_scored"] == on["generations"][0]["examples_full"] > 0


def test_evolve_multilabel_same_bytes(tmp_path):
    models = tiny_models.make_population("roberta", str(tmp_path), 3, num_labels=4, multi_label=True, noise=0.3)
    rows = [
        {"text": r["text"], "label": [int(c in (r["label"], 3)) for c in range(4)]}
        for r in tiny_models.sentiment_rows(40, 3)
    ]
    dev = [tiny_models.write_jsonl(str(tmp_path / "dev.jsonl"), rows)]
    args = ["--threshold", "0.05", "--fitness", "individual", "--batch-size", "8"]
    on = _evolve(models, dev, tmp_path / "on", *args)
    off = _evolve(models, dev, tmp_path / "off", *args, "--early-reject", "off")
    _same_run(tmp_path / "on", tmp_path / "off", on, off)
    assert on["metric"] == "multilabel-f1"


def test_losses_are_scored_in_full(llama_pop, tmp_path):
    """neg-loss has no exact bound: every example of every candidate is scored, and evolution.json says so."""
    doc = _evolve(llama_pop.models, llama_pop.dev, tmp_path / "lm", "--generations", "1")
    assert doc["early_reject"].startswith("not applicable (neg-loss")
    assert all(g["examples_scored"] == g["examples_full"] > 0 for g in doc["generations"])


def test_resume_with_early_rejection_switched(bert_pop, tmp_path):
    """--early-reject is not part of the result: a run checkpointed with it on resumes with it off (and the
    outputs are those of an uninterrupted run)."""
    models, dev = bert_pop
    args = ["--fitness", "individual", "--metric", "macro-f1"]
    straight = _evolve(models, dev, tmp_path / "straight", *args)
    first = ["--models", *models, "--dev", *dev, "--out", str(tmp_path / "r"), "--seed", "11", *args]
    assert main([*first, "--generations", "3", "--early-reject", "off", "--dry-run"]) == 0
    import subprocess
    import sys

    # killed after the initial population and one offspring: state.json holds the records
    killed = subprocess.run(
        [sys.executable, KILL_RUN, "save", "3", "--", *first, "--generations", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "EVOLVER_PROGRESS": "0"},
    )
    assert killed.returncode < 0, killed.stderr[-2000:]
    with open(tmp_path / "r" / "checkpoint" / "state.json") as f:
        state = json.load(f)
    assert set(state["outcomes"]) == {"0", "1", "2", "3"} and all(state["outcomes"].values())
    assert main([*first, "--generations", "3", "--resume", "--early-reject", "off"]) == 0
    with open(tmp_path / "r" / "evolution.json") as f:
        resumed = json.load(f)
    _same_run(tmp_path / "straight", tmp_path / "r", straight, resumed)
