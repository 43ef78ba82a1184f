"""Models named by Hub id: a cache directory in the Hub's layout, built here, resolved offline (HF_HUB_OFFLINE=1);
nothing here can reach the Hub."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from evolver_kernels.evolve import main as evolve_main
from evolver_kernels.io import refs
from evolver_kernels.merge import main as merge_main

COMMITS = ["a" * 40, "b" * 40, "c" * 40]


def _add_to_cache(cache, repo: str, model_dir: str, commit: str, refs_: tuple[str, ...] = ("main",)) -> str:
    """One snapshot of `repo` at `commit` in the Hub cache layout (models--org--name/snapshots, refs)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs_:
        (folder / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture()
def hub(bert_pop, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshots = [_add_to_cache(cache, f"acme/bert-{k}", bert_pop.models[k], COMMITS[k]) for k in range(3)]
    _add_to_cache(cache, "acme/bert-base", bert_pop.base, "d" * 40, refs_=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, snapshots


def test_hub_ids_resolve_from_the_cache_offline(hub):
    cache, snapshots = hub
    assert refs.resolve("acme/bert-0") == snapshots[0]
    assert refs.resolve(f"acme/bert-1@{COMMITS[1]}") == snapshots[1]
    assert refs.resolve("acme/bert-base@v1").endswith("d" * 40)
    with pytest.raises(ValueError, match=f"acme/missing: not in the Hugging Face cache {cache}, offline"):
        refs.resolve("acme/missing")
    with pytest.raises(ValueError, match="acme/bert-0@nope: not in the Hugging Face cache"):
        refs.resolve("acme/bert-0@nope")
    with pytest.raises(ValueError, match=r"/no/such/dir: no such directory \(nor a Hub id"):
        refs.resolve("/no/such/dir")


def test_evolve_and_merge_take_hub_ids(bert_pop, hub, tmp_path):
    _, snapshots = hub
    ids = ["acme/bert-0", "acme/bert-1", "acme/bert-2"]
    args = ["--models", *ids, "--dev", bert_pop.dev[0], "--generations", "1", "--seed", "3"]
    assert evolve_main([*args, "--out", str(tmp_path / "by-id")]) == 0
    assert evolve_main(["--models", *bert_pop.models[:3], *args[4:], "--out", str(tmp_path / "by-path")]) == 0
    a, b = (
        load_file(str(tmp_path / "by-id" / "model.safetensors")),
        load_file(str(tmp_path / "by-path" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    doc = json.loads((tmp_path / "by-id" / "evolution.json").read_text())
    assert doc["config"]["models"] == ids and doc["resolved_models"]["acme/bert-0"] == snapshots[0]
    # the merge CLI, by flags and in a mergekit YAML, with a Hub id as base model
    assert (
        merge_main(
            [
                "--method",
                "task_arithmetic",
                "--base",
                "acme/bert-base@v1",
                "--models",
                *ids[:2],
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    (tmp_path / "m.yaml").write_text(
        json.dumps(
            {
                "merge_method": "task_arithmetic",
                "base_model": "acme/bert-base",
                "models": [{"model": m} for m in ids[:2]],
            }
        )
    )
    assert merge_main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "y")]) == 0
    m, y = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(tmp_path / "y" / "model.safetensors"))
    assert all(torch.equal(m[k], y[k]) for k in m)


def test_a_missing_hub_id_is_one_line_naming_it(bert_pop, hub, tmp_path, capsys):
    cache, _ = hub
    assert (
        evolve_main(["--models", "acme/bert-0", "acme/nothing", "--dev", bert_pop.dev[0], "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert f"error: --models acme/nothing: not in the Hugging Face cache {cache}, offline (HF_HUB_OFFLINE=1)" in err
    assert merge_main(["--models", "acme/bert-0", "acme/nothing", "--out", str(tmp_path / "m")]) == 2
    assert "--models acme/nothing: not in the Hugging Face cache" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "m")


def test_a_hub_id_whose_revision_moved_since_the_kill_is_refused_on_resume(
    bert_pop, hub, tmp_path, capsys, monkeypatch
):
    """acme/bert-1 without a revision resolves to refs/main: moved to another commit between the interruption and
    --resume, the run would read other weights; it is refused, naming the id and the revision to pin."""
    from evolver_kernels.evolve.run import Run

    cache, _ = hub
    args = [
        "--models",
        "acme/bert-0",
        "acme/bert-1",
        "acme/bert-2",
        "--dev",
        bert_pop.dev[0],
        "--generations",
        "2",
        "--out",
        str(tmp_path / "o"),
    ]
    calls, original = [], Run.evaluate

    def evaluate(self, *a, **k):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    assert evolve_main(args) == 130
    monkeypatch.setattr(Run, "evaluate", original)
    _add_to_cache(cache, "acme/bert-1", bert_pop.models[3], "e" * 40)  # refs/main moves on
    capsys.readouterr()
    assert evolve_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: --models acme/bert-1 resolves to" in err and "pin the revision" in err
