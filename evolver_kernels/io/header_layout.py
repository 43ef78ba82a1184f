"""A merge's Layout read from the checkpoint's safetensors headers and raw config.json, without building the model.

Building the model on the meta device (model_io.empty_model) imports transformers' configuration and modeling
code: seconds and ~136 MiB before the first tensor is read, longer than the whole merge of a small model. For the
checkpoints whose parameters the headers name unambiguously, the layout is read from the headers instead; for
every other (returned None) the merge builds the model as before, so no checkpoint is read differently:

- one causal LM (config.json's `architectures` is one `...ForCausalLM`) whose tensors all live under `model.`
  (the decoder) or are `lm_head.weight`, with layers 0 .. num_hidden_layers - 1 and nothing else numbered;
- one floating dtype, the one config.json declares (the model would otherwise be built in another dtype);
- no stored buffers (e.g. rotary `inv_freq` of old checkpoints): every tensor is then a parameter;
- tied embeddings decided without ambiguity: `lm_head.weight` stored and `tie_word_embeddings` false (untied),
  or not stored and `tie_word_embeddings` true or absent (transformers omits it when true, the library
  default): lm_head.weight is then an alias of model.embed_tokens.weight, as the model ties them.

A merge whose slices stack layers (passthrough) reads the config donor's checkpoint restacked (`restacked`): each
output layer like its layer 0, when all its layers are alike, as the built model with num_hidden_layers changed.

tests/io/test_header_layout.py checks that these layouts (names, aliases, dtypes, offsets) and the order of the
tensors outside the layers equal those of the built model for each family of causal LM transformers ships here.
"""

from __future__ import annotations

from evolver_kernels.storage.arena import LAYER, Layout, dtype_name, layer_index

HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
BUFFERS = ("inv_freq", "position_ids", "masked_bias", "_float_tensor")  # names of stored buffers, not parameters


def causal_lm_layout(raw: dict, index: dict) -> tuple[Layout, list[str]] | None:
    """(layout, order) of a causal-LM checkpoint from its raw config.json dict and tensor_index(files): the
    parameters' layout and their names with those before the layer stack first (merge.plan.routes_of's
    `order`); None when the checkpoint is not one this module reads unambiguously (the module docstring)."""
    arch = raw.get("architectures")
    if not (isinstance(arch, list) and len(arch) == 1 and str(arch[0]).endswith("ForCausalLM")):
        return None
    dtypes = {dtype for _, dtype, _ in index.values()}
    declared = raw.get("dtype", raw.get("torch_dtype"))
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point or dtype_name(next(iter(dtypes))) != declared:
        return None
    if EMBED not in index or any(not (k.startswith("model.") or k == HEAD) for k in index):
        return None
    if any(k.rsplit(".", 1)[-1] in BUFFERS for k in index):
        return None
    layers = raw.get("num_hidden_layers")
    if not isinstance(layers, int) or {layer_index(k) for k in index} - {None} != set(range(layers)):
        return None
    tie = raw.get("tie_word_embeddings", True)
    if (HEAD in index) == (tie is not False):  # stored and tied, or missing and untied: the model decides
        return None
    tied = HEAD not in index
    layout = Layout.from_params(
        ((k, HEAD) if tied and k == EMBED else (k,), dtype, shape) for k, (_, dtype, shape) in index.items()
    )

    def before(name: str) -> bool:  # the embeddings precede the layers; the final norm and an untied head follow
        return layer_index(name) is None and ("embed" in name or (tied and name == HEAD))

    names = [e.name for e in layout.entries]
    order = [n for n in names if before(n)] + [n for n in names if layer_index(n) is not None]
    placed = set(order)
    order += [n for n in names if n not in placed]
    return layout, order


def restacked(raw: dict, index: dict, layers: int) -> tuple[dict, dict] | None:
    """(raw config, tensor index) of the checkpoint with `layers` layers, each like its layer 0 (mergekit's layer
    stacking: the output keeps the config donor's architecture with num_hidden_layers = layers, as
    merge.target._built_target builds it), for causal_lm_layout; None when the layers differ in their tensors'
    names, dtypes or shapes (the model decides then) or the config does not count its layers by that name."""
    if not isinstance(raw.get("num_hidden_layers"), int):
        return None
    per_layer: dict[int, dict] = {}
    outside = {}
    for name, value in index.items():
        i = layer_index(name)
        if i is None:
            outside[name] = value
        else:
            per_layer.setdefault(i, {})[LAYER.sub(r"\g<1>\g<2>.#.", name, count=1)] = value[1:]
    if not per_layer or any(tensors != per_layer[0] for tensors in per_layer.values()):
        return None
    stacked = dict(outside)
    for i in range(layers):
        for name, (dtype, shape) in per_layer[0].items():
            stacked[name.replace(".#.", f".{i}.", 1)] = ("", dtype, shape)
    config = dict(raw, num_hidden_layers=layers)
    if isinstance(config.get("layer_types"), list) and config["layer_types"]:
        config["layer_types"] = [config["layer_types"][0]] * layers
    return config, stacked
