"""--resume proves its inputs are the ones the run started with (evolve/provenance.py): a model re-saved with other
weights or a dev file relabelled between the kill and the resume is refused in one line naming it; the same path
spelled another way is the same input; a checkpoint edited into a state the run cannot be in is refused."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from evolver_kernels.evolve import main
from evolver_kernels.evolve.run import Run
from evolver_kernels.testing import tiny_models


@pytest.fixture()
def copied(bert_pop, tmp_path):
    """Models and dev files of our own (the test changes them), and an interrupted run over them."""
    models = []
    for k, m in enumerate(bert_pop.models[:3]):
        models.append(str(tmp_path / f"m{k}"))
        shutil.copytree(m, models[-1])
    dev = str(tmp_path / "dev.jsonl")
    shutil.copy(bert_pop.dev[0], dev)
    return models, dev


def _args(models, dev, out, *extra):
    return ["--models", *models, "--dev", dev, "--out", str(out), "--generations", "2", "--seed", "3", *extra]


def _interrupted(args, monkeypatch, after=4):
    """Runs `args` until Run.evaluate call `after` raises KeyboardInterrupt (as Ctrl-C does): exit 130."""
    calls, original = [], Run.evaluate

    def evaluate(self, *a, **k):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    assert main(args) == 130
    monkeypatch.setattr(Run, "evaluate", original)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    return err[-1]


def test_a_model_resaved_with_other_weights_is_refused(copied, tmp_path, capsys, monkeypatch):
    models, dev = copied
    args = _args(models, dev, tmp_path / "out")
    _interrupted(args, monkeypatch)
    path = os.path.join(models[1], "model.safetensors")
    weights = load_file(path)
    save_file({k: v * 1.01 for k, v in weights.items()}, path, metadata={"format": "pt"})
    err = _error(capsys, [*args, "--resume"])
    assert f"--resume: --models {models[1]} changed since the run started (model.safetensors" in err


def test_a_dev_file_relabelled_with_the_same_rows_is_refused(copied, tmp_path, capsys, monkeypatch):
    models, dev = copied
    args = _args(models, dev, tmp_path / "out")
    _interrupted(args, monkeypatch)
    rows = [json.loads(line) for line in Path(dev).read_text().splitlines()]
    tiny_models.write_jsonl(dev, [dict(r, label=(r["label"] + 1) % 3) for r in rows])
    os.utime(dev, ns=(os.stat(dev).st_atime_ns, os.stat(dev).st_mtime_ns + 10**9))  # a later edit, same size
    assert f"--resume: --dev {os.path.realpath(dev)} changed since the run started" in _error(
        capsys, [*args, "--resume"]
    )


def test_a_dev_file_that_shrank_says_it_changed(copied, tmp_path, capsys, monkeypatch):
    models, dev = copied
    args = _args(models, dev, tmp_path / "out")
    _interrupted(args, monkeypatch)
    lines = Path(dev).read_text().splitlines(keepends=True)
    Path(dev).write_text("".join(lines[: len(lines) // 3]))
    err = _error(capsys, [*args, "--resume"])
    assert "changed since the run started" in err and "outcomes" not in err


def test_the_same_paths_spelled_otherwise_resume_to_the_same_bytes(copied, tmp_path, monkeypatch):
    models, dev = copied
    assert main(_args(models, dev, tmp_path / "straight")) == 0
    out = tmp_path / "run"
    _interrupted(_args(models, dev, out), monkeypatch)
    monkeypatch.chdir(tmp_path)
    respelled = [f"./{os.path.basename(m)}/" for m in models]
    assert main(_args(respelled, "./dev.jsonl", "run/", "--resume")) == 0
    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_an_edited_checkpoint_state_is_refused(copied, tmp_path, capsys, monkeypatch):
    models, dev = copied
    args = _args(models, dev, tmp_path / "out")
    _interrupted(args, monkeypatch)
    state_path = tmp_path / "out" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps(dict(state, generation=99)))
    err = _error(capsys, [*args, "--resume"])
    assert "state.json: generation 99 is outside 0 .. 3 (--generations 2): not a state of this run" in err
    assert not (tmp_path / "out" / "evolution.json").exists()


def test_a_checkpoint_without_an_inputs_record_still_resumes(copied, tmp_path, monkeypatch):
    """Checkpoints written before inputs were recorded resume as before."""
    models, dev = copied
    args = _args(models, dev, tmp_path / "out")
    _interrupted(args, monkeypatch)
    state_path = tmp_path / "out" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["inputs"]
    state_path.write_text(json.dumps(state))
    assert main([*args, "--resume"]) == 0
