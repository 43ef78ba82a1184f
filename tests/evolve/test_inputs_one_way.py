"""Every model input is read in one way, as its owner's own loader reads it, or refused in one line naming the
model: configs compared beyond shapes, label orders, tied embeddings, weight files with transformers' precedence,
--max-length within what the model embeds."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from evolver_kernels.evolve import main
from evolver_kernels.testing import tiny_models


def _copy(models, tmp_path):
    out = []
    for k, m in enumerate(models):
        out.append(str(tmp_path / f"m{k}"))
        shutil.copytree(m, out[-1])
    return out


def _edit_config(model_dir, **changes):
    path = Path(model_dir) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _same_weights(a, b) -> bool:
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _args(models, dev, out, *extra):
    return ["--models", *models, "--dev", dev, "--out", str(out), "--generations", "1", *extra]


@pytest.mark.parametrize("key,value", [("hidden_act", "relu"), ("layer_norm_eps", 1e-5)])
def test_a_config_that_computes_otherwise_is_refused(bert_pop, tmp_path, capsys, key, value):
    models = _copy(bert_pop.models[:2], tmp_path)
    _edit_config(models[1], **{key: value})
    err = _error(capsys, _args(models, bert_pop.dev[0], tmp_path / "o"))
    assert (
        f"error: --models {models[1]}: config.json differs from {models[0]}'s in what the weights compute: {key}" in err
    )
    assert not (tmp_path / "o").exists()


def test_labels_in_another_order_are_refused(bert_pop, tmp_path, capsys):
    models = _copy(bert_pop.models[:2], tmp_path)
    names = ["neg", "neu", "pos"]
    _edit_config(models[0], id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    _edit_config(models[1], id2label=dict(enumerate(names[::-1])), label2id={n: i for i, n in enumerate(names[::-1])})
    err = _error(capsys, _args(models, bert_pop.dev[0], tmp_path / "o"))
    assert f"--models {models[1]}: its labels" in err and "rows would mix classes" in err


def test_a_later_model_with_its_own_lm_head_after_a_tied_one_is_refused(tmp_path, capsys):
    models = tiny_models.make_population("llama", str(tmp_path / "pop"), 2, noise=0.05)
    dev = tiny_models.write_jsonl(str(tmp_path / "dev.jsonl"), tiny_models.lm_rows(8, 1))
    tied = json.loads((Path(models[0]) / "config.json").read_text()).get("tie_word_embeddings")
    first, second = (models[0], models[1]) if tied else (models[1], models[0])
    _edit_config(first, tie_word_embeddings=True)
    _edit_config(second, tie_word_embeddings=False)
    weights = load_file(os.path.join(second, "model.safetensors"))
    embed = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights.setdefault("lm_head.weight", weights[embed].clone() * 2)
    save_file(weights, os.path.join(second, "model.safetensors"), metadata={"format": "pt"})
    err = _error(capsys, _args([first, second], dev, tmp_path / "o"))
    assert f"--models {second}: config.json differs" in err and "tie_word_embeddings" in err


def test_a_single_file_wins_over_a_stale_index_as_in_transformers(bert_pop, tmp_path):
    """save_pretrained re-saving with another shard size leaves model.safetensors and an index: from_pretrained
    loads model.safetensors, so do we; an index whose shards are gone beside it is no obstacle either."""
    models = _copy(bert_pop.models[:2], tmp_path)
    clean = tmp_path / "clean"
    assert main(_args(models, bert_pop.dev[0], clean, "--generations", "0")) == 0
    stale = tmp_path / "stale"
    AutoModelForSequenceClassification.from_pretrained(bert_pop.models[2]).save_pretrained(stale, max_shard_size="20KB")
    for name in os.listdir(stale):
        if name.startswith("model-"):
            shutil.copy(stale / name, os.path.join(models[1], name))
    shutil.copy(stale / "model.safetensors.index.json", os.path.join(models[1], "model.safetensors.index.json"))
    out_a = tmp_path / "a"
    assert main(_args(models, bert_pop.dev[0], out_a, "--generations", "0")) == 0
    assert _same_weights(clean, out_a)  # the stale shards (another model's weights) were not read
    for name in os.listdir(models[1]):  # shards gone, the index left beside a valid model.safetensors
        if name.startswith("model-"):
            os.remove(os.path.join(models[1], name))
    out_b = tmp_path / "b"
    assert main(_args(models, bert_pop.dev[0], out_b, "--generations", "0")) == 0
    assert _same_weights(clean, out_b)
    want = AutoModelForSequenceClassification.from_pretrained(models[1]).state_dict()
    from evolver_kernels.storage.arena import safetensors_files

    assert safetensors_files(models[1]) == [os.path.join(models[1], "model.safetensors")]
    got = load_file(os.path.join(models[1], "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in got if k in want)


def test_max_length_above_the_positions_cuts_there_and_says_so(bert_pop, tmp_path, capsys):
    long_text = " ".join(["good"] * 400)
    dev = tiny_models.write_jsonl(str(tmp_path / "long.jsonl"), [{"text": long_text, "label": 1}] * 4)
    assert main(_args(bert_pop.models[:2], dev, tmp_path / "o", "--max-length", "512")) == 0
    assert "note: --max-length 512 is more than" in capsys.readouterr().err


def test_max_length_too_small_to_apply_is_refused(bert_pop, tmp_path, capsys):
    err = _error(capsys, _args(bert_pop.models[:2], bert_pop.dev[0], tmp_path / "o", "--max-length", "1"))
    assert "--max-length 1 leaves no room for text" in err and "give at least" in err
