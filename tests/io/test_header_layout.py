"""The merge's layout read from safetensors headers (io/header_layout.py) equals the built model's, family by family,
tied and untied; every checkpoint it cannot read unambiguously is left to the model (None)."""

import json
import os

import pytest
import torch
import transformers as tf

from evolver_kernels.io import model_io
from evolver_kernels.io.header_layout import causal_lm_layout, restacked
from evolver_kernels.merge.config import Slice, Source
from evolver_kernels.merge.plan import routes_of
from evolver_kernels.storage.arena import Layout, safetensors_files, tensor_index

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
# causal-LM families transformers ships whose checkpoints are model.* plus lm_head.weight
FAMILIES = {
    "llama": (tf.LlamaConfig, {}),
    "mistral": (tf.MistralConfig, {}),
    "qwen2": (tf.Qwen2Config, {}),
    "qwen3": (tf.Qwen3Config, {"head_dim": 16}),
    "gemma": (tf.GemmaConfig, {"head_dim": 16}),
    "gemma2": (tf.Gemma2Config, {"head_dim": 16}),
    "phi3": (tf.Phi3Config, {"pad_token_id": 0}),
    "olmo2": (tf.Olmo2Config, {}),
    "granite": (tf.GraniteConfig, {}),
    "starcoder2": (tf.Starcoder2Config, {}),
}


def _save(tmp_path, family: str, tie: bool | None, dtype=torch.bfloat16) -> str:
    cls, extra = FAMILIES[family]
    kwargs = {**SMALL, **extra}
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    config = cls(**kwargs)
    config.architectures = [tf.AutoModelForCausalLM._model_mapping[cls].__name__]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    path = str(tmp_path / f"{family}-{tie}")
    model.save_pretrained(path, safe_serialization=True)
    return path


def _raw(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _built(path: str, layers: int | None = None) -> tuple[Layout, list[str]]:
    """The built model's layout and parameter order, with `layers` layers as merge.target._built_target stacks them."""
    config = model_io.load_config(path)
    if layers is not None:
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[0]] * layers
    model = model_io.empty_model(config, "auto")
    return Layout.of_model(model), [n for n, _ in model.named_parameters(remove_duplicate=False)]


@pytest.mark.parametrize("tie", [True, False, None], ids=["tied", "untied", "default"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_header_layout_is_the_models(tmp_path, family, tie):
    path = _save(tmp_path, family, tie)
    got = causal_lm_layout(_raw(path), tensor_index(safetensors_files(path)))
    assert got is not None, f"{family}: the headers were not read"
    layout, order = got
    built, built_order = _built(path)
    assert layout == built  # names, aliases, dtype groups, offsets, shapes
    # the tensors outside the layers fall on the same side of the layer stack (mergekit's slices need it)
    two = [Slice([Source("a", (0, 1))]), Slice([Source("a", (1, 2))])]
    assert routes_of(layout, order, two, 2) == routes_of(built, built_order, two, 2)


def test_other_checkpoints_are_left_to_the_model(tmp_path):
    llama = _save(tmp_path, "llama", False)
    raw, index = _raw(llama), tensor_index(safetensors_files(llama))
    assert causal_lm_layout(raw, index) is not None

    def edited(**changes):
        return {**raw, **changes}

    cases = {
        "a classifier": (edited(architectures=["LlamaForSequenceClassification"]), index),
        "two architectures": (edited(architectures=["LlamaForCausalLM", "LlamaModel"]), index),
        "another declared dtype": (edited(dtype="float32"), index),
        "no declared dtype": ({k: v for k, v in raw.items() if k != "dtype"}, index),
        "a stored buffer": (raw, {**index, "model.layers.0.self_attn.rotary_emb.inv_freq": index["model.norm.weight"]}),
        "a tensor outside model.": (raw, {**index, "score.weight": index["lm_head.weight"]}),
        "an extra layer": (raw, {**index, "model.layers.2.mlp.up_proj.weight": index["model.norm.weight"]}),
        "fewer layers than the config": (edited(num_hidden_layers=3), index),
        "lm_head missing, untied": (raw, {k: v for k, v in index.items() if k != "lm_head.weight"}),
        "lm_head stored, tied": (edited(tie_word_embeddings=True), index),
        "two dtypes": (raw, {**index, "model.norm.weight": (*index["model.norm.weight"][:1], torch.float32, (32,))}),
    }
    for what, (r, i) in cases.items():
        assert causal_lm_layout(r, i) is None, what


@pytest.mark.parametrize("layers", [1, 3, 5])
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "phi3"])
def test_restacked_header_layout_is_the_stacked_models(tmp_path, family, layers):
    path = _save(tmp_path, family, None)
    relaid = restacked(_raw(path), tensor_index(safetensors_files(path)), layers)
    assert relaid is not None and relaid[0]["num_hidden_layers"] == layers
    layout, order = causal_lm_layout(*relaid)
    built, built_order = _built(path, layers)
    assert layout == built
    halves = [Slice([Source("a", (0, 1))]), Slice([Source("b", (0, layers - 1))])] if layers > 1 else []
    for slices in ([Slice([Source("a", (0, layers))])], halves):
        if slices:
            assert routes_of(layout, order, slices, layers) == routes_of(built, built_order, slices, layers)


def test_layers_unlike_are_not_restacked(tmp_path):
    path = _save(tmp_path, "llama", False)
    raw, index = _raw(path), tensor_index(safetensors_files(path))
    wider = {**index, "model.layers.1.mlp.up_proj.weight": (index["model.norm.weight"][0], torch.bfloat16, (49, 32))}
    assert restacked(raw, wider, 4) is None
    fewer = {k: v for k, v in index.items() if k != "model.layers.1.mlp.up_proj.weight"}
    assert restacked(raw, fewer, 4) is None
    assert restacked({k: v for k, v in raw.items() if k != "num_hidden_layers"}, index, 4) is None
