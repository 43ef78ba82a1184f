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
    base_flags = [] if method == "linear" else ["--base", base]  # a base has no role in linear (--base refused)
    assert main(["--models", *paths, *base_flags, "--out", str(ours_dir), *flags]) == 0
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


def _yaml_cases(base, m):
    """name: (mergekit's YAML, the same merge by our flags); mergekit 0.1.5 itself runs every YAML."""
    return {
        # mergekit adds a base_model missing from `models:` to the inputs of linear (a method that gives a base no
        # role): one more model merged, with the global weight (mergekit requires one for it; ours: 1)
        "linear_base_model": (
            {
                "merge_method": "linear",
                "base_model": base,
                "models": [{"model": m[0], "parameters": {"weight": 1.0}}, {"model": m[1]}],
                "parameters": {"weight": 0.25},
            },
            ["--method", "average", "--models", m[0], m[1], base, "--weights", "1", "0.25", "0.25"],
        ),
        # task negation: mergekit's task_arithmetic merges base + sum_k w_k tau_k, a negative w_k included
        "task_negation": (
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [
                    {"model": m[0], "parameters": {"weight": 1.0}},
                    {"model": m[1], "parameters": {"weight": -0.5}},
                    {"model": m[2], "parameters": {"weight": -1.0}},
                ],
                "parameters": {"lambda": 0.8},
            },
            ["--method", "task_arithmetic", "--base", base, "--models", *m]
            + ["--weights", "1", "-0.5", "-1", "--scale", "0.8"],
        ),
    }


@pytest.fixture(scope="module")
def yaml_merged(llama_pop, tmp_path_factory):
    """{case: (ours from the YAML, ours from flags, mergekit's)}."""
    from _util import run_mergekit

    root = tmp_path_factory.mktemp("mergekit-keys")
    cases = _yaml_cases(llama_pop.base, llama_pop.models)
    run_mergekit(root, {name: {**config, "dtype": "float32"} for name, (config, _) in cases.items()})
    out = {}
    for name, (_, flags) in cases.items():
        assert main(["--config", str(root / f"{name}.yml"), "--out", str(root / f"{name}-yaml")]) == 0
        assert main([*flags, "--out", str(root / f"{name}-flags")]) == 0
        out[name] = tuple(
            load_file(str(root / f"{name}-{kind}" / "model.safetensors")) for kind in ("yaml", "flags", "mergekit")
        )
    return out


@pytest.mark.parametrize("case", ["linear_base_model", "task_negation"])
def test_yaml_keys_read_as_mergekit_reads_them(yaml_merged, llama_pop, case):
    """linear's base_model is one more model merged (it was dropped), a negative task_arithmetic weight negates
    its task vector (it was refused): mergekit's tensors, by YAML and by flags; not vacuous: far from the merge
    without the base, or with the weights' magnitudes."""
    from _util import assert_same_as_mergekit

    from_yaml, from_flags, theirs = yaml_merged[case]
    assert_same_as_mergekit(case, from_yaml, from_flags, theirs)
    base = load_file(f"{llama_pop.base}/model.safetensors")
    ws = [load_file(f"{p}/model.safetensors") for p in llama_pop.models]
    if case == "linear_base_model":
        other = {k: (ws[0][k] + 0.25 * ws[1][k]) / 1.25 for k in theirs}
    else:
        other = {k: base[k] + 0.8 * sum(c * (w[k] - base[k]) for c, w in zip((1, 0.5, 1), ws)) for k in theirs}
    assert max((theirs[k] - other[k]).abs().max().item() for k in theirs) > 1e-4, case
