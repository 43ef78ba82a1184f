"""--adapt jde (evolver_kernels/evolve/adaptation.py): the draws, and runs whose F and CR follow jDE's rule exactly."""

import json

import pytest

from evolver_kernels.evolve import adaptation, main
from evolver_kernels.kernels.rng import PURPOSE_ADAPT, derive_seed, random_words


def test_jde_draws_follow_the_rule_from_philox_words():
    jde = adaptation.get("jde").trial
    redrawn_F = redrawn_CR = 0
    for g in range(1, 41):
        for i in range(25):
            u = [int(w) / 2**32 for w in random_words(4, seed=derive_seed(9, g, i, PURPOSE_ADAPT))]
            f, cr = jde(9, g, i, 0.5, 0.7)
            assert f == (0.1 + 0.9 * u[1] if u[0] < 0.1 else 0.5)
            assert cr == (u[3] if u[2] < 0.1 else 0.7)
            assert 0.1 <= f < 1.0 and 0.0 <= cr < 1.0
            redrawn_F += f != 0.5
            redrawn_CR += cr != 0.7
    assert 60 <= redrawn_F <= 140 and 60 <= redrawn_CR <= 140  # about 10% of 1000 draws each
    assert adaptation.get("none").trial is None


def test_unknown_adaptation_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--models", "a", "--dev", "b", "--out", str(tmp_path / "o"), "--adapt", "shade"])
    assert "invalid choice: 'shade'" in capsys.readouterr().err


@pytest.mark.parametrize("fitness,schedule", [("individual", "sequential"), ("merged", "synchronous")])
def test_jde_run_keeps_the_values_of_accepted_offspring(bert_pop, tmp_path, fitness, schedule):
    models, dev = bert_pop
    argv = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--out",
        str(tmp_path / "out"),
        "--generations",
        "4",
        "--seed",
        "3",
        "--fitness",
        fitness,
        "--schedule",
        schedule,
        "--adapt",
        "jde",
        "--F",
        "0.6",
        "--CR",
        "0.4",
    ]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "out" / "evolution.json").read_text())
    assert doc["config"]["adapt"] == "jde"
    jde = adaptation.get("jde").trial
    before = list(zip(doc["generations"][0]["F"], doc["generations"][0]["CR"]))
    assert before == [(0.6, 0.4)] * len(models)
    changed = 0
    for entry in doc["generations"][1:]:
        after = list(zip(entry["F"], entry["CR"]))
        for i, (f, cr) in enumerate(before):
            want = jde(3, entry["generation"], i, f, cr) if i in entry["accepted"] else (f, cr)
            assert after[i] == want
        changed += after != before
        before = after
    assert changed, "no accepted offspring carried a redrawn F or CR: the check above saw nothing adapt"
