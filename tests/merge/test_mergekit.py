"""Our merges against an independent merging tool, mergekit (installed by scripts/setup_env.sh), on the same
tiny Llama models: `python -m evolver_kernels.merge` and `mergekit-yaml` on one set of model directories, every
tensor compared. DARE is not compared value for value: the two tools draw their drops from different
generators by design (ours: the Philox contract; mergekit: torch.bernoulli)."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evolver_kernels.merge import main

CASES = {
    # name: (our flags, mergekit method, mergekit top-level parameters, per-model parameters)
    "linear": (
        ["--method", "average", "--weights", "1", "2", "0.5"],
        "linear",
        {},
        [{"weight": w} for w in (1, 2, 0.5)],
    ),
    "task_arithmetic": (
        ["--method", "task_arithmetic", "--weights", "1", "0.5", "2", "--scale", "0.7"],
        "task_arithmetic",
        {"lambda": 0.7},
        [{"weight": w} for w in (1, 0.5, 2)],
    ),
    "ties": (
        ["--method", "ties", "--weights", "1", "0.5", "2", "--density", "0.4"],
        "ties",
        {},
        [{"weight": w, "density": 0.4} for w in (1, 0.5, 2)],
    ),
}


@pytest.fixture()
def models(llama_pop):
    return llama_pop.base, llama_pop.models


def _mergekit(tmp_path, base, paths, method, params, per_model):
    config = {
        "merge_method": method,
        "models": [{"model": p, "parameters": q} for p, q in zip(paths, per_model)],
        "dtype": "float32",
    }
    if method != "linear":
        config["base_model"] = base
    if params:
        config["parameters"] = params
    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "mergekit-out"
    script = "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", script, str(cfg), str(out), "--no-copy-tokenizer"],
        check=True,
        env=env,
        capture_output=True,
    )
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(models, tmp_path, case):
    base, paths = models
    flags, method, params, per_model = CASES[case]
    ours_dir = tmp_path / "ours"
    assert main(["--models", *paths, "--base", base, "--out", str(ours_dir), *flags]) == 0
    ours = load_file(str(ours_dir / "model.safetensors"))
    theirs = _mergekit(tmp_path, base, paths, method, params, per_model)
    assert set(ours) == set(theirs)
    for name in ours:
        # fp32 sums in another order: a few ulps; anything structural (trim, sign, weights) would be far larger
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if case == "ties":  # the comparison is not vacuous: trimming changed the result
        avg = sum(load_file(f"{p}/model.safetensors")["model.layers.0.mlp.up_proj.weight"] for p in paths) / 3
        assert not torch.allclose(ours["model.layers.0.mlp.up_proj.weight"], avg, atol=1e-3)


def test_mergekit_yaml_with_per_model_densities(models, tmp_path):
    """The same mergekit YAML through both tools: per-model `density` (and weights) of a ties merge are honoured
    (they were dropped once, leaving tensors up to 57x away from mergekit's)."""
    base, paths = models
    per_model = [{"weight": 1.0, "density": 0.2}, {"weight": 0.5, "density": 0.6}, {"weight": 2.0, "density": 0.9}]
    config = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [{"model": p, "parameters": q} for p, q in zip(paths, per_model)],
    }
    (tmp_path / "m.yml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "m.yml"), "--out", str(tmp_path / "ours")]) == 0
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = _mergekit(tmp_path, base, paths, "ties", {}, per_model)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    uniform = tmp_path / "uniform"
    assert (
        main(
            [
                "--models",
                *paths,
                "--base",
                base,
                "--method",
                "ties",
                "--density",
                "0.6",
                "--weights",
                "1",
                "0.5",
                "2",
                "--out",
                str(uniform),
            ]
        )
        == 0
    )
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(ours[key], load_file(str(uniform / "model.safetensors"))[key], atol=1e-4)
