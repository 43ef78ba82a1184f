"""`python -m evolver_kernels.merge`: one-shot merges of model directories, YAML and flags, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evolver_kernels.io.rundir import SCRATCH_PREFIX
from evolver_kernels.merge import main


@pytest.fixture()
def models(bert_pop):
    return bert_pop.models


def _weights(d):
    return load_file(f"{d}/model.safetensors")


@pytest.mark.parametrize("tier", ["mapped", "cpu", "disk"])
def test_average_by_flags_equals_the_mean(models, tmp_path, tier):
    assert main(["--models", *models[1:], "--out", str(tmp_path / "avg"), "--population-on", tier]) == 0
    out = _weights(tmp_path / "avg")
    ws = [_weights(m) for m in models[1:]]
    for key in out:
        torch.testing.assert_close(out[key], sum(w[key] for w in ws) / 3, rtol=1e-6, atol=1e-6)
    assert not (tmp_path / "avg" / "population").exists()
    import transformers

    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "avg")


def test_mapped_models_read_like_loaded_ones(llama_pop):
    """The default population of the merge CLI reads the models' own files in place: every chunk (inside one
    tensor, across tensors and their alignment padding, a group's end) equals the loaded copy's; a chunk inside
    a tensor is a view of the read-only map, never a writable copy."""
    import random

    from evolver_kernels.io import model_io
    from evolver_kernels.storage.arena import Layout, safetensors_files
    from evolver_kernels.storage.population import MappedModels, make_population

    config = model_io.load_config(llama_pop.models[0])
    layout = Layout.of_model(model_io.empty_model(config, "causal-lm"))
    files = [safetensors_files(m) for m in llama_pop.models]
    mapped = MappedModels(layout, files, llama_pop.models)
    loaded = make_population("cpu", layout, files, llama_pop.models, torch.device("cpu"))
    rng = random.Random(0)
    inside = 0
    for group, (_, size) in layout.groups.items():
        cuts = [0, size] + [e.offset for e in layout.entries if e.group == group]
        for _ in range(300):
            lo = min(max(0, rng.choice(cuts) + rng.randint(-40, 40)), size - 1)
            hi = min(size, lo + rng.choice([1, 7, 100, 5000, size]))
            for k in range(len(files)):
                got = mapped.read(k, group, lo, hi)
                assert torch.equal(got, loaded.read(k, group, lo, hi)), (group, lo, hi)
                if any(e.group == group and e.offset <= lo and hi <= e.offset + e.numel for e in layout.entries):
                    assert got._base is not None  # a view of the map, not a copy
                    inside += 1
    assert inside > 100
    mapped.close()


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_mapped_cpu_and_disk_merges_are_the_same_bytes(llama_pop, tmp_path, method):
    models = llama_pop.models[:2] if method == "slerp" else llama_pop.models
    flags = ["--base", llama_pop.base, "--density", "0.4"] if method == "ties" else ["--t", "0.3"]
    outs = []
    for tier in ("mapped", "cpu", "disk"):
        assert (
            main(
                [
                    "--method",
                    method,
                    "--models",
                    *models,
                    *flags,
                    "--population-on",
                    tier,
                    "--out",
                    str(tmp_path / tier),
                ]
            )
            == 0
        )
        outs.append(_weights(tmp_path / tier))
    for other in outs[1:]:
        assert outs[0].keys() == other.keys()
        assert all(torch.equal(outs[0][k].view(torch.uint8), other[k].view(torch.uint8)) for k in other)


def test_a_relaid_out_merge_is_the_same_bytes_on_every_tier_and_leaves_no_scratch(llama_pop, tmp_path):
    """A `dtype` other than the models' re-lays the models and the base out (mapped: into files of the scratch
    directory under --out); every tier gives the same bytes and --out holds only what the merge writes."""
    import os

    import yaml

    cfg = {
        "merge_method": "ties",
        "base_model": llama_pop.base,
        "dtype": "float16",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in llama_pop.models],
        "parameters": {"density": 0.4},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    outs = []
    for tier in ("mapped", "cpu", "disk"):
        assert main(["--config", str(tmp_path / "m.yaml"), "--population-on", tier, "--out", str(tmp_path / tier)]) == 0
        outs.append(_weights(tmp_path / tier))
        left = [n for n in os.listdir(tmp_path / tier) if n.startswith(SCRATCH_PREFIX) or n.endswith((".bin", ".tmp"))]
        assert not left
    assert all(t.dtype == torch.float16 for t in outs[0].values() if t.is_floating_point())
    for other in outs[1:]:
        assert outs[0].keys() == other.keys()
        assert all(torch.equal(outs[0][k].view(torch.uint8), other[k].view(torch.uint8)) for k in other)


@pytest.mark.parametrize("case", ["ties", "bert_linear", "stacked_linear", "bf16_ties"])
def test_the_output_written_in_place_is_the_scratch_paths_bytes(llama_pop, bert_pop, tmp_path, monkeypatch, case):
    """The merge writes into the output's own shards (io/mapped_output.py) where it can: the same files, byte for
    byte, as the merge into a scratch copy written out after it, and no scratch copy of the merge is made."""
    import os

    import yaml

    import evolver_kernels.merge.run as merge_run

    pop = bert_pop if case == "bert_linear" else llama_pop
    cfg = {"merge_method": "ties" if "ties" in case else "linear", "dtype": "float32"}
    if "ties" in case:
        cfg.update(base_model=pop.base, parameters={"density": 0.4})
    if case == "bf16_ties":
        cfg["dtype"] = "bfloat16"  # a cast before merging: the models re-laid out, the output from the layout
    if case == "stacked_linear":
        cfg["slices"] = [
            {"sources": [{"model": m, "layer_range": [0, 1]} for m in pop.models[:2]]},
            {"sources": [{"model": m, "layer_range": [0, 2]} for m in pop.models[:2]]},
        ]
    else:
        cfg["models"] = [{"model": m, "parameters": {"weight": 1.0}} for m in pop.models]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    made = []
    real_arena = merge_run.Arena.on_files

    def on_files(layout, directory, prefix, create=True):
        made.append(prefix)
        return real_arena(layout, directory, prefix, create)

    monkeypatch.setattr(merge_run.Arena, "on_files", staticmethod(on_files))
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "in_place")]) == 0
    assert "merged" not in made
    monkeypatch.setattr(merge_run, "_mapped_output", lambda *a: None)
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "scratch")]) == 0
    assert "merged" in made
    names = sorted(n for n in os.listdir(tmp_path / "scratch") if n.endswith(".safetensors"))
    assert names == sorted(n for n in os.listdir(tmp_path / "in_place") if n.endswith(".safetensors"))
    for name in names:
        assert (tmp_path / "in_place" / name).read_bytes() == (tmp_path / "scratch" / name).read_bytes(), name
    assert not [n for n in os.listdir(tmp_path / "in_place") if n.startswith(SCRATCH_PREFIX)]


def test_an_arena_on_files_is_zero_filled_shared_and_gives_back_a_written_entry(tmp_path):
    """The merge's output arena (Arena.on_files): zero-filled, its writes in the file (another mapping sees
    them), and an entry written out is punched out of the file while its neighbours keep their values."""
    import os

    from evolver_kernels.storage.arena import Arena, Layout

    layout = Layout.from_params(
        [(("a",), torch.float32, (3000,)), (("b",), torch.float32, (5000,)), (("c",), torch.float32, (7,))]
    )
    arena = Arena.on_files(layout, str(tmp_path), "t")
    (group,) = layout.groups
    assert int(torch.count_nonzero(arena.buffers[group])) == 0
    for k, e in enumerate(layout.entries):
        arena.view(e).fill_(k + 1)
    again = Arena.on_files(layout, str(tmp_path), "t", create=False)
    assert torch.equal(again.buffers[group], arena.buffers[group])
    blocks = os.stat(arena.files[group]).st_blocks
    a, b, c = layout.entries
    arena.discard(b)
    assert os.stat(arena.files[group]).st_blocks < blocks
    assert bool((arena.view(a) == 1).all()) and bool((arena.view(c) == 3).all())
    Arena.empty(layout).discard(b)  # in memory: nothing to give back


def test_yaml_ties_matches_flags(models, tmp_path):
    import yaml

    cfg = {
        "merge_method": "dare_ties",
        "base_model": models[0],
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models[1:], [1.0, 0.5, 1.0])],
        "parameters": {"lambda": 0.8, "drop_p": 0.2, "seed": 3},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "y")]) == 0
    assert (
        main(
            [
                "--method",
                "dare_ties",
                "--base",
                models[0],
                "--models",
                *models[1:],
                "--weights",
                "1",
                "0.5",
                "1",
                "--scale",
                "0.8",
                "--drop-p",
                "0.2",
                "--seed",
                "3",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    a, b = _weights(tmp_path / "y"), _weights(tmp_path / "f")
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "y" / "merge.json").read_text())
    assert record["method"] == "dare_ties" and record["scale"] == 0.8
    base = _weights(models[0])
    assert any(not torch.equal(a[k], base[k]) for k in a)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "ties"], "ties needs a base model"),
        (["--method", "ties", "--base", "{base}", "--density", "0"], "--density must be in (0, 1]"),
        (["--weights", "1", "2"], "--weights: 2 given for 3 models"),
        (["--method", "dare_linear", "--base", "{base}", "--drop-p", "1.0"], "--drop-p must be in [0, 1)"),
        # a flag is never dropped: average gives a base no role (it was merged without it, exit 0)
        (["--base", "{base}"], "--base does not apply to average (a base has no role in it)"),
        (["--method", "fisher", "--base", "{base}"], "--base does not apply to fisher"),
        # a negative weight is task negation, task_arithmetic's without normalize (elsewhere a sum could be 0)
        (["--weights", "1", "-0.5", "1"], "--weights must be >= 0 for average, got -0.5 (a negative weight"),
        (["--method", "ties", "--base", "{base}", "--weights", "1", "-1", "1"], "--weights must be >= 0 for ties"),
        (
            ["--method", "task_arithmetic", "--base", "{base}", "--weights", "1", "-1", "1", "--normalize", "true"],
            "task_arithmetic takes a negative weight only with normalize false",
        ),
    ],
)
def test_errors(models, tmp_path, capsys, argv, message):
    argv = [a.replace("{base}", models[0]) for a in argv]
    assert main(["--models", *models[1:], "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"merge_method": "linear", "models": [{"model": "{m1}", "parameters": {"weight": -1}}, "{m2}"]},
            "models entry 1 parameters: weight must be >= 0 for average, got -1",
        ),
        (
            {"merge_method": "linear", "models": ["{m1}", "{m2}"], "parameters": {"weight": [1, -0.5]}},
            "parameters: weight must be >= 0 for average, got -0.5",
        ),
        (
            {
                "merge_method": "task_arithmetic",
                "base_model": "{base}",
                "models": [{"model": "{m1}", "parameters": {"weight": -1}}, "{m2}"],
                "parameters": {"normalize": [{"filter": "classifier", "value": True}, {"value": False}]},
            },
            "weights [-1.0, 1.0] for classifier.bias with normalize true: task_arithmetic takes a negative weight only",
        ),
    ],
)
def test_yaml_weights_of_either_sign_only_where_they_mean_something(models, tmp_path, capsys, config, message):
    import yaml

    names = {"{m1}": models[1], "{m2}": models[2], "{base}": models[0]}
    text = json.dumps(config)
    for k, v in names.items():
        text = text.replace(k, v)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(json.loads(text)))
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err


def test_a_slices_merge_counts_the_models_it_merges(llama_pop, tmp_path, capsys):
    """Its log counts the distinct models of every slice (it said "merged 1 models" for two, the first slice's)."""
    import yaml

    m = llama_pop.models
    stacked = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": m[1], "layer_range": [1, 2]}]},
        ],
    }
    layered = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": m[0], "layer_range": [0, 1]}, {"model": m[1], "layer_range": [1, 2]}]},
            {"sources": [{"model": m[2], "layer_range": [0, 1]}, {"model": m[1], "layer_range": [0, 1]}]},
        ],
    }
    for name, config, n in (("stacked", stacked, 2), ("layered", layered, 3)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        capsys.readouterr()
        assert main(["--config", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        assert f"merge: {n} models of " in err and f"merged {n} models with " in err, err


def test_mismatched_model_named(models, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(models[2], other)
    w = _weights(other)
    w["classifier.weight"] = w["classifier.weight"][:2].clone()
    save_file(w, str(other / "model.safetensors"))
    assert main(["--models", models[1], str(other), "--out", str(tmp_path / "o")]) == 2
    assert "classifier.weight has shape [2, 32], expected [3, 32]" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_fisher_and_regmean_from_dev_data(models, tmp_path, capsys, method):
    from evolver_kernels.testing.tiny_models import sentiment_rows, write_jsonl

    dev = write_jsonl(str(tmp_path / "dev.jsonl"), sentiment_rows(20, 0))
    argv = ["--method", method, "--models", *models[1:], "--dev", dev, "--examples", "12"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic statistics
    ws = [_weights(m) for m in models[1:]]
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(a[key], sum(w[key] for w in ws) / 3, atol=1e-6)
    assert json.loads((tmp_path / "a" / "merge.json").read_text())["examples"] == 12
    assert main(["--method", method, "--models", *models[1:], "--out", str(tmp_path / "c")]) == 2
    assert f"{method} estimates statistics on data: give --dev" in capsys.readouterr().err


def test_outputs_are_sharded_with_an_index(models, tmp_path):
    """io/shards.write_shards: shards of at most shard_bytes (a tensor larger than that alone in its shard) and
    an index that transformers loads; the same tensors as one file."""
    import os

    import transformers

    from evolver_kernels.io import model_io
    from evolver_kernels.storage.arena import Layout, safetensors_files

    config = model_io.load_config(models[0])
    layout = Layout.of_model(model_io.empty_model(config, "sequence-classification"))
    files = safetensors_files(models[0])
    arena = model_io.load_model_arena(layout, files, models[0])
    one = model_io.save_model(arena, models[0], files, str(tmp_path / "one"))
    sharded = model_io.save_model(arena, models[0], files, str(tmp_path / "sharded"), shard_bytes=20_000)
    shards = [p for p in sharded if p.endswith(".safetensors")]
    assert len(shards) > 2 and [p for p in one if p.endswith(".safetensors")] == [
        str(tmp_path / "one" / "model.safetensors")
    ]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    whole = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in whole.values())
    for path in shards:
        part = load_file(path)
        assert sum(t.nbytes for t in part.values()) <= 20_000 or len(part) == 1
        assert all(torch.equal(part[k], whole[k]) and index["weight_map"][k] == os.path.basename(path) for k in part)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(p, whole[n]) for n, p in loaded.state_dict().items() if n in whole)


@pytest.mark.parametrize("key,value", [("hidden_act", "relu"), ("layer_norm_eps", 1e-5)])
def test_models_whose_configs_compute_otherwise_are_refused(bert_pop, tmp_path, capsys, key, value):
    """The output keeps the first model's config: a model whose config.json differs in what its weights compute
    is refused, naming it and the key (as evolve does)."""
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(bert_pop.models[1], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, key: value}))
    assert main(["--models", bert_pop.models[0], str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        f"--models {other}: config.json differs from {bert_pop.models[0]}'s in what the weights compute: {key}" in err
    )
    assert not (tmp_path / "o").exists()


def test_a_merge_with_non_finite_values_is_not_written(bert_pop, tmp_path, capsys):
    """An input with a NaN makes the merged tensor NaN: the merge says which tensor and writes nothing."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(bert_pop.models[1], broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in sorted(weights) if k.endswith("weight") and weights[k].dim() == 2)
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert main(["--models", bert_pop.models[0], str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"the average merge of {name} has non-finite values" in err and "nothing was written" in err
    assert not (tmp_path / "o").exists()


def test_a_passthrough_of_a_non_finite_tensor_is_not_written(llama_pop, tmp_path, capsys):
    """Layer stacking reads each tensor straight from its source (no copy first): a NaN in a routed tensor is
    still found before anything is written, and named."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_pop.models[1], broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name].view(-1)[5] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": llama_pop.models[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": str(broken), "layer_range": [1, 2]}]},
        ],
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the passthrough merge of model.layers.2.mlp.down_proj.weight has non-finite values" in err
    assert not (tmp_path / "o").exists()
    # over an earlier merge's output: refused as it is written, the earlier output left as it was, no shard left
    good = dict(cfg, slices=[cfg["slices"][0], {"sources": [{"model": llama_pop.models[1], "layer_range": [1, 2]}]}])
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    assert main(["--config", str(tmp_path / "good.yaml"), "--out", str(tmp_path / "o")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "has non-finite values" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before


_NO_TRANSFORMERS = """
import sys
from evolver_kernels.merge import main
code = main(sys.argv[1:])
assert code == 0, code
assert "transformers" not in sys.modules, sorted(m for m in sys.modules if m.startswith("transformers"))[:5]
"""


@pytest.mark.parametrize("method", ["linear", "passthrough"])
def test_causal_lm_merges_start_without_transformers_and_write_the_built_models_bytes(
    llama_pop, tmp_path, monkeypatch, method
):
    """A merge of causal LMs whose headers say their layout, stacking layers or not, imports no transformers (a
    fresh process), and writes the bytes the merge writes when it builds the model to learn the layout."""
    import subprocess
    import sys

    import yaml

    from evolver_kernels.merge import target

    a, b = llama_pop.models[:2]
    if method == "linear":
        cfg = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (a, b)]}
    else:  # 3 layers from 2 models of 2: the output re-lays the layers out
        cfg = {
            "merge_method": "passthrough",
            "dtype": "bfloat16",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 2]}]},
                {"sources": [{"model": b, "layer_range": [1, 2]}]},
            ],
        }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "headers")]
    done = subprocess.run([sys.executable, "-c", _NO_TRANSFORMERS, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setattr(target, "_from_headers", lambda *args: None)
    assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "built")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "headers" / name).read_bytes() == (tmp_path / "built" / name).read_bytes(), name
    if method == "passthrough":
        assert json.loads((tmp_path / "headers" / "config.json").read_text())["num_hidden_layers"] == 3
