"""Hugging Face model directories in and out: configs, the evaluation model bound to an arena, outputs.

The evaluation model is built without weights (accelerate's init_empty_weights) and its parameters are
then set to views into its own arena, so an offspring written into the arena is the model evaluated.
Outputs are written shard by shard under the first model's tensor names, so `from_pretrained(out)` loads
them; buffers stored in the first model's checkpoint are carried over unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evolver_kernels.errors import ArgumentError
from evolver_kernels.io.shards import write_shards
from evolver_kernels.storage.arena import Arena, Layout, load_into, resolve_names, tensor_index

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "added_tokens.json",
)


def read_config_json(model_dir: str) -> dict:
    """config.json of a model directory as a dict, refusing in one line a missing or malformed file and remote code."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ArgumentError("model_dir", f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ArgumentError("model_dir", f"{model_dir}: config.json is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ArgumentError("model_dir", f"{model_dir}: config.json is not a JSON object")
    if raw.get("auto_map"):
        raise ArgumentError(
            "model_dir", f"{model_dir}: the model needs remote code (auto_map in config.json), which is never run"
        )
    return raw


def load_config(model_dir: str):
    """The transformers config of a model directory (read_config_json's checks first)."""
    from transformers import AutoConfig

    read_config_json(model_dir)
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


# config.json keys that say nothing of what the weights compute (bookkeeping, generation and output defaults, token
# ids the tokenizer owns): models that differ only in these are one architecture
METADATA_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "finetuning_task",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "tokenizer_class",
        "task_specific_params",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "prefix",
        "id2label",
        "label2id",
    }
)


def same_config_json(raws: list[dict]) -> bool:
    """The raw config.json dicts agree on every key but METADATA_KEYS, and on their labels: then the models are one
    architecture (check_same_architecture would pass) without building their transformers configs."""

    def weights(raw: dict) -> dict:
        return {k: v for k, v in raw.items() if k not in METADATA_KEYS}

    return all(weights(r) == weights(raws[0]) and r.get("id2label") == raws[0].get("id2label") for r in raws[1:])


def _default_labels(id2label: dict) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def check_same_architecture(configs: list, names: list[str], option: str = "--models") -> None:
    """Refuses models that are not one architecture beyond their shapes: another model type, any differing
    config key that changes what the weights compute (hidden_act, layer_norm_eps, ...), or classification
    heads whose labels are in another order (their rows would mix classes); names[k] is configs[k]'s model."""
    first = configs[0].to_dict()
    for name, config in zip(names[1:], configs[1:]):
        other = config.to_dict()
        if other.get("model_type") != first.get("model_type"):
            raise ArgumentError(
                "model_dir",
                f"{name} is a {other.get('model_type')}, {names[0]} a {first.get('model_type')}: "
                "the models must share one architecture",
            )
        keys = sorted((set(first) | set(other)) - METADATA_KEYS)
        differ = [k for k in keys if first.get(k) != other.get(k)]
        if differ:
            shown = "; ".join(f"{k} {other.get(k)!r} (not {first.get(k)!r})" for k in differ[:4])
            raise ArgumentError(
                "model_dir",
                f"{name}: config.json differs from {names[0]}'s in what the weights compute: {shown}"
                + (f" and {len(differ) - 4} more" if len(differ) > 4 else ""),
            )
        a = {int(k): str(v) for k, v in (first.get("id2label") or {}).items()}
        b = {int(k): str(v) for k, v in (other.get("id2label") or {}).items()}
        if a != b and not (_default_labels(a) or _default_labels(b)):
            raise ArgumentError(
                "model_dir",
                f"{name}: its labels (id2label {dict(sorted(b.items()))}) are not {names[0]}'s "
                f"({dict(sorted(a.items()))}): the classification heads' rows would mix classes; re-save the "
                "model with the same label order",
            )


def model_class(config, task: str):
    """The transformers class that evaluates `task`; for a user function, the checkpoint's own architecture."""
    import transformers

    if task == "sequence-classification":
        return transformers.AutoModelForSequenceClassification
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls if cls is not None else transformers.AutoModel


def empty_model(config, task: str) -> torch.nn.Module:
    """The model of `config` with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        cls = model_class(config, task)
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # from_config does not always tie (transformers 5), from_pretrained does
    return model.eval()


def load_model_arena(layout: Layout, files: list[str], source: str, arena: Arena | None = None) -> Arena:
    """A model's weights (safetensors `files`, checked against `layout`; errors name `source`) read tensor by
    tensor into `arena` (default: a new arena in host memory). The one way a whole model (a base model) is
    loaded outside a population."""
    arena = arena if arena is not None else Arena.empty(layout)
    load_into(arena, files, source)
    return arena


def bind_to_arena(model: torch.nn.Module, arena: Arena) -> None:
    """Makes every parameter of `model` a view into `arena` (tied parameters share one view)."""
    for entry in arena.layout.entries:
        param = torch.nn.Parameter(arena.view(entry), requires_grad=False)
        for alias in entry.aliases:
            module_name, _, attr = alias.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._parameters[attr] = param


def load_checkpoint_buffers(model: torch.nn.Module, files: list[str]) -> None:
    """Copies buffers that the checkpoint stores (e.g. BatchNorm statistics) into the model."""
    index = tensor_index(files)
    for name, buf in model.named_buffers():
        if name in index and buf is not None:
            with safe_open(index[name][0], framework="pt", device="cpu") as f:
                buf.copy_(f.get_tensor(name))


def attach_arena(
    model: torch.nn.Module, arena: Arena, files: list[str], device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Makes an empty_model() evaluable: parameters become views into `arena`, buffers stored in the
    checkpoint `files` are loaded, and the model moves to `device` (the arena's device for its parameters)."""
    if Layout.of_model(model).fingerprint() != arena.layout.fingerprint():
        raise ValueError("the evaluation model's parameters differ from the population's layout")
    bind_to_arena(model, arena)
    load_checkpoint_buffers(model, files)
    return model.to(device)


def _pickle_files(model_dir: str) -> list[str]:
    return sorted(f for f in os.listdir(model_dir) if f.endswith(".bin"))


def conversion_key(model_dir: str) -> str:
    """A directory name for the conversion of `model_dir`'s pickle weights: its name, then a hash of its real
    path and of its .bin files' names, sizes and modification times."""
    import hashlib

    real = os.path.realpath(model_dir)
    stamp = [real] + [
        f"{n}:{os.stat(os.path.join(real, n)).st_size}:{os.stat(os.path.join(real, n)).st_mtime_ns}"
        for n in _pickle_files(real)
    ]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return f"{os.path.basename(real) or 'model'}-{digest}"


def convert_pickle_weights(model_dir: str, dest_dir: str) -> str:
    """--allow-pickle: converts a model's .bin weights to one safetensors file under dest_dir (tensor data
    only: torch.load with weights_only=True refuses arbitrary objects, and no code in the file runs)."""
    import pickle

    dest = os.path.join(dest_dir, "model.safetensors")
    if os.path.exists(dest):
        return dest
    names = _pickle_files(model_dir)
    if not names:
        raise ArgumentError("model_dir", f"{model_dir}: no safetensors and no .bin weights")
    state = {}
    for name in names:
        path = os.path.join(model_dir, name)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ArgumentError(
                "model_dir",
                f"{model_dir}: {name} is not a plain tensor checkpoint, refused without running it ({reason[:200]})",
            ) from None
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise ArgumentError("model_dir", f"{model_dir}: {name} does not hold a dictionary of tensors")
        state.update(loaded)
    os.makedirs(dest_dir, exist_ok=True)
    seen, tensors = {}, {}
    for key, t in state.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:  # a tied weight saved twice: keep one name, as safetensors requires
            continue
        seen[ptr] = key
        tensors[key] = t.contiguous().clone()
    tmp = dest + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, dest)
    return dest


# torch dtype -> the dtype name in a safetensors header
def output_tensors(arena: Arena, evolved: dict, index: dict, dtype: torch.dtype | None):
    """key -> the tensor an output writes under that name: the arena's entry evolved[key], else the tensor
    from its safetensors file (index: tensor_index); floating-point ones cast to `dtype` when given."""

    def tensor_for(key: str) -> torch.Tensor:
        if key in evolved:
            t = arena.view(evolved[key]).detach()
        else:
            with safe_open(index[key][0], framework="pt", device="cpu") as f:
                t = f.get_tensor(key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return tensor_for


def discard_written(arena: Arena, evolved: dict) -> Callable[[str], None]:
    """The writers' `written` hook for an output of `arena` (evolved: key -> entry): each entry's disk blocks
    given back once its tensor is in the output (a no-op for an arena in memory)."""

    def written(key: str) -> None:
        if key in evolved:
            arena.discard(evolved[key])

    return written


def model_specs(layout: Layout, src_dir: str, src_files: list[str], dtype: torch.dtype | None = None):
    """(specs, evolved, index) of save_model's output: the (name, dtype, shape) of every tensor it writes, in
    order (the source checkpoint's names, sorted, a tied alias once); key -> the layout's entry written under it;
    the source's tensor_index (its other tensors, buffers, are copied from it)."""
    index = tensor_index(src_files)
    keys = resolve_names(layout, index, src_dir)
    evolved = {keys[e.name]: e for e in layout.entries}
    tied = {alias for e in layout.entries for alias in e.aliases if alias != keys[e.name]}
    names = [k for k in sorted(index) if k not in tied]
    specs = [
        (k, dtype if dtype is not None and index[k][1].is_floating_point else index[k][1], index[k][2]) for k in names
    ]
    return specs, evolved, index


def save_model(
    arena: Arena,
    src_dir: str,
    src_files: list[str],
    out_dir: str,
    shard_bytes: int = 2 << 30,
    dtype: torch.dtype | None = None,
    discard: bool = False,
    into=None,
) -> list[str]:
    """Writes `arena` as an HF model directory: safetensors shards named as in the source checkpoint, the
    source's buffers, config, generation config and tokenizer files. With `dtype`, every floating-point
    tensor is cast to it (one rounding from the arena's values) and config.json says so. With `discard` the
    arena's entries are given back once written (Arena.discard: the merge's arena on scratch files, read once).
    `into`: the shards the arena's tensors already are (write_shards). Returns every path written."""
    os.makedirs(out_dir, exist_ok=True)
    specs, evolved, index = model_specs(arena.layout, src_dir, src_files, dtype)
    tensor_for = output_tensors(arena, evolved, index, dtype)
    paths = write_shards(
        out_dir,
        specs,
        tensor_for,
        shard_bytes,
        written=discard_written(arena, evolved) if discard else None,
        into=into,
    )
    for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            paths.append(os.path.join(out_dir, name))
            shutil.copyfile(src, paths[-1])
    if dtype is not None:
        config_path = os.path.join(out_dir, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = str(dtype).removeprefix("torch.")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    return paths


def device_for(name: str, device_map: dict[str, str]) -> str:
    """The device of parameter / buffer / module `name` under an accelerate-style device map (longest module
    prefix wins; "" covers the whole model)."""
    best = None
    for key in device_map:
        covers = key == "" or name == key or name.startswith(key + ".")
        if covers and (best is None or len(key) > len(best)):
            best = key
    if best is None:
        raise ArgumentError("device_map", f"places no module that holds {name}")
    return best


def place_model(
    model: torch.nn.Module, arena: Arena, files: list[str], device_map: dict[str, str], main_device: torch.device
) -> torch.nn.Module:
    """Makes an empty_model() evaluable over several devices: parameters become views into the placed
    `arena` (each on the device the map gives its module), buffers follow their modules, and accelerate's
    hooks move activations to each placed module's device and the outputs back to `main_device`."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    if Layout.of_model(model).fingerprint() != arena.layout.fingerprint():
        raise ValueError("the evaluation model's parameters differ from the population's layout")
    bind_to_arena(model, arena)
    load_checkpoint_buffers(model, files)
    for name, buf in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[attr] = buf.to(device_map[device_for(name, device_map)])
    for key, device in device_map.items():
        if key:
            add_hook_to_module(model.get_submodule(key), AlignDevicesHook(execution_device=torch.device(device)))
    add_hook_to_module(model, AlignDevicesHook(execution_device=main_device, io_same_device=True))
    return model
