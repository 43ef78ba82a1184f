"""mergekit's YAML read with mergekit's meaning: the same file through mergekit itself and through
`python -m evolver_kernels.merge --config`, every tensor compared (and config.json's layer count), for each feature:
parameter gradients over layers, `filter` conditionals, model- over global-level precedence, dtype / out_dtype,
`slices` with `layer_range` (passthrough layer stacking, a linear merge of two models' layer ranges),
tokenizer_source: base; keys we do not read are refused; mergekit's own example configs run unchanged (model names
replaced by tiny local models of the examples' 40 layers). Each comparison is checked not to be vacuous: the
result differs from the same merge without the feature by far more than the tolerance."""

import json
import os
import shutil

import pytest
import torch
import yaml
from _util import run_mergekit
from safetensors.torch import load_file

from evolver_kernels.merge import main
from evolver_kernels.testing import tiny_models

LAYERS = 8  # the feature cases'
EXAMPLE_LAYERS = 40  # mergekit's examples slice 13B Llamas of 40 layers
RTOL, ATOL = 1e-5, 1e-6
FAR = 1e-4  # "not vacuous": a feature moves some tensor by this much at least (100x the tolerance)


def _make_models(root: str, layers: int, n: int = 3) -> dict[str, str]:
    """A base and n noisy fine-tunes of a tiny Llama of `layers` layers; and the base again with another
    tokenizer_config (model_max_length 77, the same vocabulary) to tell tokenizers apart."""
    import transformers as tf

    config = tiny_models.make_config("llama")
    config.num_hidden_layers = layers
    tokenizer = tiny_models.make_tokenizer("llama")
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(config).eval()
    paths = {"base": os.path.join(root, "base")}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for k in range(n):
        model = tf.LlamaForCausalLM(config).eval()
        model.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        paths[f"m{k}"] = os.path.join(root, f"m{k}")
        model.save_pretrained(paths[f"m{k}"])
        tokenizer.save_pretrained(paths[f"m{k}"])
    paths["base_tok"] = os.path.join(root, "base_tok")
    shutil.copytree(paths["base"], paths["base_tok"])
    tok_config = os.path.join(paths["base_tok"], "tokenizer_config.json")
    with open(tok_config) as f:
        doc = json.load(f)
    doc["model_max_length"] = 77
    with open(tok_config, "w") as f:
        json.dump(doc, f)
    return paths


def _models(*names, **params):
    return [{"model": f"{{{n}}}", **({"parameters": params[n]} if n in params else {})} for n in names]


# name: (the YAML, the same merge without the feature; our result must differ from it by more than FAR)
CASES = {
    "slerp_gradient_t": (
        {
            "merge_method": "slerp",
            "base_model": "{m0}",
            "models": _models("m0", "m1"),
            "parameters": {"t": [0.0, 0.3, 1.0]},
        },
        {"merge_method": "slerp", "base_model": "{m0}", "models": _models("m0", "m1"), "parameters": {"t": 0.0}},
    ),
    "linear_gradient_weight": (
        {
            "merge_method": "linear",
            "models": _models(
                "m0", "m1", "m2", m0={"weight": [1.0, 0.2]}, m1={"weight": 0.5}, m2={"weight": [0.1, 2.0, 0.3]}
            ),
        },
        {
            "merge_method": "linear",
            "models": _models("m0", "m1", "m2", m0={"weight": 1.0}, m1={"weight": 0.5}, m2={"weight": 0.1}),
        },
    ),
    "ties_filter_density": (
        {
            "merge_method": "ties",
            "base_model": "{base}",
            "models": _models("m0", "m1", "m2"),
            "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]},
        },
        {
            "merge_method": "ties",
            "base_model": "{base}",
            "models": _models("m0", "m1", "m2"),
            "parameters": {"weight": 1.0, "density": 0.8},
        },
    ),
    "model_over_global": (  # m1's own density wins; m2's conditional matches self_attn only, elsewhere the global
        {
            "merge_method": "ties",
            "base_model": "{base}",
            "models": _models(
                "m0", "m1", "m2", m1={"density": 0.2}, m2={"density": [{"filter": "self_attn", "value": 0.9}]}
            ),
            "parameters": {"density": 0.5, "weight": [0.5, 1.0]},
        },
        {
            "merge_method": "ties",
            "base_model": "{base}",
            "models": _models("m0", "m1", "m2"),
            "parameters": {"density": 0.5, "weight": [0.5, 1.0]},
        },
    ),
    "out_dtype_bfloat16": (
        {
            "merge_method": "linear",
            "models": _models("m0", "m1", m0={"weight": 1.0}, m1={"weight": 0.3}),
            "out_dtype": "bfloat16",
        },
        {"merge_method": "linear", "models": _models("m0", "m1", m0={"weight": 1.0}, m1={"weight": 0.3})},
    ),
    "dtype_bfloat16": (  # the inputs are rounded to bfloat16 before merging, the output stays bfloat16
        {
            "merge_method": "linear",
            "models": _models("m0", "m1", m0={"weight": 1.0}, m1={"weight": 0.3}),
            "dtype": "bfloat16",
            "out_dtype": "float32",
        },
        {"merge_method": "linear", "models": _models("m0", "m1", m0={"weight": 1.0}, m1={"weight": 0.3})},
    ),
    "passthrough_stacked": (  # 6 + 5 layers from two 8-layer models
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "{m0}", "layer_range": [0, 6]}]},
                {"sources": [{"model": "{m1}", "layer_range": [3, 8]}]},
            ],
        },
        None,
    ),
    "slices_linear": (  # layer i of m0's range merged with layer i of m1's, per-slice and per-source weights
        {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": "{m0}", "layer_range": [0, 3], "parameters": {"weight": [1.0, 0.0]}},
                        {"model": "{m1}", "layer_range": [5, 8]},
                    ],
                    "parameters": {"weight": 0.5},
                },
                {
                    "sources": [{"model": "{m0}", "layer_range": [3, 8]}, {"model": "{m1}", "layer_range": [0, 5]}],
                    "parameters": {"weight": 1.0},
                },
            ],
        },
        {"merge_method": "linear", "models": _models("m0", "m1")},
    ),
    "tokenizer_source_base": (
        {
            "merge_method": "ties",
            "base_model": "{base_tok}",
            "models": _models("m0", "m1"),
            "parameters": {"density": 0.5, "weight": 1.0},
            "tokenizer_source": "base",
        },
        None,
    ),
}

# mergekit's example configs (github.com/arcee-ai/mergekit, examples/), models renamed to the tiny ones
EXAMPLES = {
    "gradient-slerp": """
slices:
  - sources:
      - model: {m0}
        layer_range: [0, 40]
      - model: {m1}
        layer_range: [0, 40]
merge_method: slerp
base_model: {m0}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "linear": """
models:
  - model: {m0}
    parameters:
      weight: 1.0
  - model: {m1}
    parameters:
      weight: 0.3
  - model: {m2}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "ties": """
models:
  - model: {m0}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {m1}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {m2}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "bio-merge": """
models:
  - model: {m0}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {m1}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "orcamini-platy-44layer": """
slices:
  - sources:
    - model: {m0}
      layer_range: [0, 24]
  - sources:
    - model: {m1}
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
}


def _fill(x, paths):
    if isinstance(x, dict):
        return {k: _fill(v, paths) for k, v in x.items()}
    if isinstance(x, list):
        return [_fill(v, paths) for v in x]
    return x.format(**paths) if isinstance(x, str) and x.startswith("{") else x


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "model.safetensors"))


def _layers(directory) -> int:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """{case: (ours, mergekit's, ours without the feature or None)} as output directories; mergekit runs every
    config in one process."""
    root = tmp_path_factory.mktemp("mergekit-yaml")
    paths = _make_models(str(root / "models"), LAYERS)
    big = _make_models(str(root / "models40"), EXAMPLE_LAYERS)
    configs = {name: _fill(config, paths) for name, (config, _) in CASES.items()}
    configs.update({f"example-{name}": yaml.safe_load(text.format(**big)) for name, text in EXAMPLES.items()})
    run_mergekit(root, configs)
    out = {}
    for name in configs:
        assert main(["--config", str(root / f"{name}.yml"), "--out", str(root / f"{name}-ours")]) == 0, name
        plain = CASES.get(name, (None, None))[1]
        if plain is not None:
            (root / f"{name}-plain.yml").write_text(yaml.safe_dump(_fill(plain, paths)))
            assert main(["--config", str(root / f"{name}-plain.yml"), "--out", str(root / f"{name}-plain")]) == 0
        out[name] = (root / f"{name}-ours", root / f"{name}-mergekit", root / f"{name}-plain" if plain else None)
    out["paths"] = paths
    return out


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, name: str, bf16: bool) -> None:
    """Equal within fp32 rounding; values rounded to bfloat16 (bf16) within one bfloat16 rounding, where fp32
    results an ulp apart straddle a rounding boundary (rare: test_same_tensors_as_mergekit counts them)."""
    if bf16:
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=ATOL, msg=lambda m: f"{name}: {m}")
    else:
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _worst(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(merged, case):
    ours_dir, theirs_dir, plain_dir = merged[case]
    ours, theirs = _weights(ours_dir), _weights(theirs_dir)
    assert set(ours) == set(theirs)
    print(f"{case}: max |ours - mergekit| = {_worst(ours, theirs):.3g}")
    bf16 = "bfloat16" in (CASES[case][0].get("dtype"), CASES[case][0].get("out_dtype"))
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        _assert_close(ours[name], theirs[name], name, bf16)
    if bf16:
        equal = sum((ours[k] == theirs[k]).sum().item() for k in theirs) / sum(t.numel() for t in theirs.values())
        assert equal >= 0.999, f"{case}: {equal:.2%} of the elements equal bit for bit"
    assert _layers(ours_dir) == _layers(theirs_dir)
    if plain_dir is not None:  # not vacuous
        assert _worst(ours, _weights(plain_dir)) > FAR, case


def test_passthrough_stacks_layers(merged):
    """11 layers from 8-layer models: output layer 6 + i is m1's layer 3 + i; embeddings from the first
    slice's model, final norm and head from the last one's (mergekit)."""
    ours_dir, _, _ = merged["passthrough_stacked"]
    ours, paths = _weights(ours_dir), merged["paths"]
    m0, m1 = _weights(paths["m0"]), _weights(paths["m1"])
    assert _layers(ours_dir) == 11
    key = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(ours[key.format(7)], m1[key.format(4)])
    assert torch.equal(ours[key.format(3)], m0[key.format(3)])
    assert torch.equal(ours["model.embed_tokens.weight"], m0["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], m1["lm_head.weight"])


def test_tokenizer_source_base(merged):
    """The base model's tokenizer (told apart by its model_max_length), as mergekit writes it."""
    from transformers import AutoTokenizer

    ours_dir, theirs_dir, _ = merged["tokenizer_source_base"]
    assert AutoTokenizer.from_pretrained(str(ours_dir)).model_max_length == 77
    assert AutoTokenizer.from_pretrained(str(theirs_dir)).model_max_length == 77
    assert (
        AutoTokenizer.from_pretrained(str(ours_dir)).get_vocab()
        == AutoTokenizer.from_pretrained(str(theirs_dir)).get_vocab()
    )


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_mergekit_examples_run_unchanged(merged, name):
    """mergekit's examples compute in float16 (their dtype): mergekit's arithmetic runs partly in float16 and
    ours in float32 with one rounding, so they agree to float16 roundings, not to fp32's. In the TIES examples,
    task vectors of float16 inputs often tie in magnitude at a tensor's trim threshold: ours keeps every tied
    element, mergekit's sort keeps some (methods/task_vectors.py), so a few elements (< 0.5%) differ."""
    ours_dir, theirs_dir, _ = merged[f"example-{name}"]
    ours, theirs = _weights(ours_dir), _weights(theirs_dir)
    assert set(ours) == set(theirs) and _layers(ours_dir) == _layers(theirs_dir)
    print(f"example {name}: max |ours - mergekit| = {_worst(ours, theirs):.3g}")
    close = total = 0
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype == torch.float16
        close += torch.isclose(ours[key].float(), theirs[key].float(), rtol=2e-3, atol=2e-3).sum().item()
        total += theirs[key].numel()
    assert close / total >= (0.995 if name in ("ties", "bio-merge") else 1.0), f"{name}: {close / total:.3%} close"


@pytest.mark.parametrize(
    "config,message",
    [
        ({"tokenizer_source": "union"}, "tokenizer_source: 'union' is not supported"),
        ({"tokenizer_source": "{m1}"}, "is not supported (give base"),
        ({"tokenizer": {"source": "base"}}, "tokenizer is not supported"),
        ({"chat_template": "chatml"}, "chat_template is not supported"),
        ({"modules": {}}, "modules is not supported"),
        ({"out_path": "x"}, "unknown key(s) out_path"),
        (
            {"merge_method": "linear", "base_model": None, "parameters": {"normalize": False}},
            "normalize: False is not supported for average",
        ),
        ({"parameters": {"rescale": True}}, "rescale does not apply to ties"),
        ({"parameters": {"density": [{"filter": "mlp", "value": 0.5, "when": 1}]}}, "a conditional is {filter"),
        (
            {
                "models": None,
                "slices": [{"sources": [{"model": "{m0}", "layer_range": [0, 2]}], "residual_weight": 0.5}],
            },
            "residual_weight not supported",
        ),
        (
            {
                "models": None,
                "slices": [
                    {"sources": [{"model": "{m0}", "layer_range": [0, 2]}, {"model": "{m1}", "layer_range": [0, 3]}]}
                ],
            },
            "every source must have as many layers",
        ),
    ],
)
def test_refused(merged, tmp_path, capsys, config, message):
    base = {"merge_method": "ties", "base_model": "{base}", "models": _models("m0", "m1")}
    doc = {k: v for k, v in _fill({**base, **config}, merged["paths"]).items() if v is not None}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(doc))
    assert main(["--config", str(tmp_path / "c.yml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) < 300, err
