"""Bad inputs to the driver: each stops before heavy work with one clear message naming the culprit."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from evolver_kernels.evolve import main
from evolver_kernels.evolve.config import ConfigError, parse_config
from evolver_kernels.evolve.run import Run
from evolver_kernels.testing import tiny_models


@pytest.fixture()
def pop(bert_pop):
    return bert_pop.root, bert_pop.models[:3], bert_pop.dev[0]


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def _args(models, dev, out, *extra):
    return ["--models", *models, "--dev", dev, "--out", str(out), "--generations", "1", *extra]


def test_missing_model_directory(pop, tmp_path, capsys):
    _, models, dev = pop
    assert "--models /nope: no such directory" in _error(capsys, _args(["/nope", *models[1:]], dev, tmp_path / "o"))


def test_missing_dev_file(pop, tmp_path, capsys):
    _, models, _ = pop
    assert "--dev /nope.jsonl: no such file" in _error(capsys, _args(models, "/nope.jsonl", tmp_path / "o"))


def test_required_options(capsys):
    assert "--models is required" in _error(capsys, ["--dev", "x.jsonl", "--out", "o"])


def test_mismatched_shapes_name_the_tensor(pop, tmp_path, capsys):
    root, models, dev = pop
    other = tmp_path / "other"
    shutil.copytree(models[1], other)
    weights = load_file(str(other / "model.safetensors"))
    key = "bert.encoder.layer.1.output.dense.bias"
    weights[key] = weights[key][:-1].clone()
    save_file(weights, str(other / "model.safetensors"))
    err = _error(capsys, _args([models[0], str(other), models[2]], dev, tmp_path / "o"))
    assert f"{key} has shape [31], expected [32]" in err and str(other) in err


def test_missing_tensor_named(pop, tmp_path, capsys):
    _, models, dev = pop
    other = tmp_path / "other"
    shutil.copytree(models[1], other)
    weights = load_file(str(other / "model.safetensors"))
    del weights["classifier.bias"]
    save_file(weights, str(other / "model.safetensors"))
    assert "parameter classifier.bias is missing" in _error(capsys, _args([models[0], str(other)], dev, tmp_path / "o"))


def test_different_architectures(pop, tmp_path, capsys):
    _, models, dev = pop
    gpt = tiny_models.make_population("gpt2", str(tmp_path), 1)[0]
    assert "must share one architecture" in _error(capsys, _args([models[0], gpt], dev, tmp_path / "o"))


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "no examples"),
        ('{"text": "good day", "label": 2}\n{"text": "bad", \n', "dev.jsonl:2: not valid JSON"),
        ('{"text": "good day", "label": 2}\n{"text": "bad day"}\n', "dev.jsonl:2: missing label"),
        ('{"text": "good day", "label": 7}\n', "dev.jsonl:1: label 7 outside the model's head (num_labels = 3)"),
        ('{"text": "good day", "label": "joy"}\n', "dev.jsonl:1: unknown label 'joy'"),
        ("[1, 2]\n", "dev.jsonl:1: each line must be a JSON object"),
    ],
)
def test_malformed_data_names_file_and_line(pop, tmp_path, capsys, content, message):
    _, models, _ = pop
    bad = tmp_path / "dev.jsonl"
    bad.write_text(content)
    assert message in _error(capsys, _args(models, str(bad), tmp_path / "o"))


def test_csv_and_tsv_inputs_with_label_names(pop, tmp_path):
    _, models, _ = pop
    (tmp_path / "d.csv").write_text('text,label\n"good day, really",label2\nbad day,label0\n')
    (tmp_path / "d.tsv").write_text("text\tlabel\ngood day\t2\nbad day\t0\n")
    assert (
        main(
            _args(
                models,
                str(tmp_path / "d.csv"),
                tmp_path / "o",
                "--dev",
                str(tmp_path / "d.csv"),
                str(tmp_path / "d.tsv"),
            )
        )
        == 0
    )


def test_csv_error_line_counts_header(pop, tmp_path, capsys):
    _, models, _ = pop
    (tmp_path / "d.csv").write_text("text,label\ngood day,2\nbad day,9\n")
    assert "d.csv:3: label 9 outside" in _error(capsys, _args(models, str(tmp_path / "d.csv"), tmp_path / "o"))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--strategy", "rand/1"], "--strategy rand/1 needs a population of at least 4, got 3"),
        (["--F", "0"], "--F must be in (0, 2]"),
        (["--F", "nan"], "--F must be in (0, 2]"),
        (["--CR", "1.5"], "--CR must be in [0, 1]"),
        (["--generations", "-1"], "--generations must be a non-negative integer"),
        (["--population-size", "2"], "--population-size 2 is smaller than the 3 models plus 0 extra individuals"),
        (["--merge-density", "0.5"], "--merge-density does not apply to average"),
        (["--strategy", "best/1", "--population-size", "4"], "--strategy best/1 needs per-individual fitness"),
        (
            ["--strategy", "best/1", "--fitness", "individual"],
            "--strategy best/1 needs a population of at least 4, got 3",
        ),
        (["--metric", "neg-loss"], "--metric 'neg-loss' does not apply to sequence-classification"),
        (["--task", "nosuchmodule:fn"], "cannot import module 'nosuchmodule'"),
        (["--chunk-elements", "100"], "--chunk-elements must be a multiple of 64"),
        (["--merge-method", "ties"], "--merge-method ties needs --base-model"),
        (["--merge-method", "ties", "--fitness", "individual"], "--merge-method ties applies to --fitness merged"),
        (["--merge-method", "ties", "--base-model", "/nope"], "--base-model /nope: no such directory"),
        (
            ["--merge-method", "dare_ties", "--base-model", "{m0}", "--merge-drop-p", "1"],
            "--merge-drop-p must be in [0, 1)",
        ),
        (
            ["--merge-method", "ties", "--base-model", "{m0}", "--merge-density", "0"],
            "--merge-density must be in (0, 1]",
        ),
    ],
)
def test_bad_options(pop, tmp_path, capsys, extra, message):
    _, models, dev = pop
    extra = [a.replace("{m0}", models[0]) for a in extra]
    assert message in _error(capsys, _args(models, dev, tmp_path / "o", *extra))


def test_dry_run_prints_the_plan_and_stops(pop, tmp_path, capsys):
    _, models, dev = pop
    assert main(_args(models, dev, tmp_path / "o", "--dry-run", "--population-on", "disk")) == 0
    captured = capsys.readouterr()
    assert "memory plan: one model copy" in captured.err and "disk" in captured.err
    assert "dry run" in captured.out
    assert not (tmp_path / "o" / "population").exists() and not (tmp_path / "o" / "checkpoint").exists()


def test_plan_that_cannot_fit_is_refused_with_numbers(pop, tmp_path, capsys, monkeypatch):
    import evolver_kernels.evolve.startup as ev

    _, models, dev = pop
    monkeypatch.setattr(ev, "host_available", lambda: 1000)
    err = _error(capsys, _args(models, dev, tmp_path / "o"))
    assert "of host memory, 1000 B is available" in err and "--population-on" in err


def test_unknown_choice_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse_config(["--strategy", "current-to-best"])


def test_unknown_yaml_key(tmp_path):
    (tmp_path / "c.yaml").write_text("models: [a]\ngenerashuns: 3\n")
    with pytest.raises(ValueError, match="unknown option\\(s\\) generashuns"):
        parse_config(["--config", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("text,want", [("off", "off"), ("on", "on"), ("false", "off"), ('"off"', "off")])
def test_yaml_on_off_option(tmp_path, text, want):
    """early_reject: off in YAML (a boolean to YAML 1.1) means off; another value is an error naming it."""
    (tmp_path / "c.yaml").write_text(f"models: [a]\nearly_reject: {text}\n")
    assert parse_config(["--config", str(tmp_path / "c.yaml")]).early_reject == want
    (tmp_path / "d.yaml").write_text("models: [a]\nearly_reject: maybe\n")
    with pytest.raises(ValueError, match="early_reject must be one of on, off, got 'maybe'"):
        parse_config(["--config", str(tmp_path / "d.yaml")])


def test_pickle_weights_refused_unless_allowed(pop, tmp_path, capsys):
    import torch

    _, models, dev = pop
    pk = tmp_path / "pk"
    shutil.copytree(models[1], pk)
    torch.save(load_file(str(pk / "model.safetensors")), str(pk / "pytorch_model.bin"))
    os.remove(pk / "model.safetensors")
    err = _error(capsys, _args([models[0], str(pk)], dev, tmp_path / "o"))
    assert "only pickle weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert main(_args([models[0], str(pk)], dev, tmp_path / "o2", "--allow-pickle")) == 0


def test_remote_code_refused(pop, tmp_path, capsys):
    _, models, dev = pop
    rc = tmp_path / "rc"
    shutil.copytree(models[1], rc)
    cfg = json.loads((rc / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.X"}
    (rc / "config.json").write_text(json.dumps(cfg))
    assert "needs remote code" in _error(capsys, _args([models[0], str(rc)], dev, tmp_path / "o"))


def test_existing_checkpoint_needs_resume_and_same_config(pop, tmp_path, capsys):
    _, models, dev = pop
    assert main(_args(models, dev, tmp_path / "o")) == 0
    assert "holds a finished run" in _error(capsys, _args(models, dev, tmp_path / "o"))
    assert not os.listdir(tmp_path / "o" / "checkpoint" / "individuals")
    assert "--resume: no checkpoint" in _error(capsys, _args(models, dev, tmp_path / "fresh", "--resume"))
    # an interrupted run: a checkpoint that is not finished
    import evolver_kernels.evolve.run as ev

    calls = []

    def crash(self, *args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(self, *args)

    original = ev.Run.evaluate
    ev.Run.evaluate = crash
    try:
        assert main(_args(models, dev, tmp_path / "i")) == 130
        assert "interrupted: continue with the same command and --resume" in capsys.readouterr().err
    finally:
        ev.Run.evaluate = original
    assert "pass --resume" in _error(capsys, _args(models, dev, tmp_path / "i"))
    assert "--resume with a different configuration: CR" in _error(
        capsys, _args(models, dev, tmp_path / "i", "--resume", "--CR", "0.3")
    )
    assert main(_args(models, dev, tmp_path / "i", "--resume")) == 0


def test_errors_come_before_heavy_work(pop, tmp_path, monkeypatch):
    """Data errors surface before the population is loaded."""
    import evolver_kernels.evolve.startup as ev

    _, models, _ = pop
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    called = []
    monkeypatch.setattr(ev, "make_population", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="missing label"):
        Run(parse_config(_args(models, str(tmp_path / "bad.jsonl"), tmp_path / "o")))
    assert not called


def test_config_error_type():
    assert issubclass(ConfigError, ValueError)


def test_backend_that_cannot_run_on_the_device_stops_before_loading(pop, tmp_path, capsys):
    _, models, dev = pop
    err = _error(capsys, _args(models, dev, tmp_path / "o", "--device", "cpu", "--backend", "cuda"))
    assert "--backend cuda cannot run on cpu" in err and "leave --backend unset" in err
    assert not (tmp_path / "o" / "population").exists()


def test_backend_checked_on_every_device_map_device(pop, tmp_path, capsys):
    _, models, dev = pop
    (tmp_path / "map.json").write_text(json.dumps({"": "cpu"}))
    err = _error(
        capsys,
        _args(
            models,
            dev,
            tmp_path / "o",
            "--population-on",
            "cpu",
            "--backend",
            "cuda",
            "--device-map",
            str(tmp_path / "map.json"),
        ),
    )
    assert "--backend cuda cannot run on cpu (--device-map places modules there)" in err


def test_unknown_backend_in_a_config_file(pop, tmp_path, capsys):
    _, models, dev = pop
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"models": models, "dev": [dev], "out": str(tmp_path / "o"), "backend": "fast"}))
    assert "run.yaml: backend must be one of reference, cpu, triton, cuda, got 'fast'" in _error(
        capsys, ["--config", str(cfg)]
    )


def test_library_errors_name_their_arguments_and_the_cli_its_flags(pop, tmp_path, capsys):
    """A library function names its own argument (model_dir, path, metric); each command says its own flag."""
    from evolver_kernels.errors import ArgumentError
    from evolver_kernels.evaluation.data import load_examples
    from evolver_kernels.io import model_io

    with pytest.raises(ArgumentError, match=r"^model_dir /nope: no config.json") as err:
        model_io.load_config("/nope")
    assert err.value.arg == "model_dir"
    with pytest.raises(ArgumentError, match=r"^path /nope.jsonl: no such file"):
        load_examples("/nope.jsonl", "causal-lm")
    _, models, dev = pop
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--models {empty}: no config.json" in _error(capsys, _args([*models[:2], str(empty)], dev, tmp_path / "o"))
    from evolver_kernels.merge import main as merge_main

    assert merge_main(["--models", models[0], str(empty), "--out", str(tmp_path / "m")]) == 2
    assert f"--models {empty}: no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,merges",
    [([], "average"), (["--fitness", "individual"], "nothing (--fitness individual, no --extra-individuals)")],
)
def test_a_base_model_no_merge_of_the_run_uses_is_refused(pop, tmp_path, capsys, extra, merges):
    """--base-model is never read and dropped: a run whose merges take no base refuses it, naming them."""
    root, models, dev = pop
    err = _error(capsys, _args(models, dev, tmp_path / "o", "--base-model", os.path.join(root, "bert-base"), *extra))
    assert f"--base-model does not apply: this run merges {merges}, which takes no base model" in err


def test_a_dev_file_given_twice_is_refused(pop, tmp_path, capsys):
    """The same dev file twice (however spelled) would count its domain twice in the mean fitness."""
    _, models, dev = pop
    respelled = os.path.join(os.path.dirname(dev), ".", os.path.basename(dev))
    argv = ["--models", *models, "--dev", dev, respelled, "--out", str(tmp_path / "o"), "--generations", "1"]
    assert f"--dev lists {respelled} twice ({dev} is the same file)" in _error(capsys, argv)
