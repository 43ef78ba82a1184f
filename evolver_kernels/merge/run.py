"""The merge itself (run): claim --out, read the models through the population tier, merge every tensor through
the registry's method into the output's own shards (io/mapped_output.py) where it can, else into a file-backed
scratch arena written out after it, then the config, tokenizer and merge.json. Weights are streamed
(docs/ARCHITECTURE.md §5): never a stack of the models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open

from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.io import model_io
from evolver_kernels.io.jsonio import write_json
from evolver_kernels.io.mapped_output import MappedOutput
from evolver_kernels.io.rundir import OutputDir, Scratch, disk_problem, format_bytes
from evolver_kernels.io.shards import write_shards
from evolver_kernels.kernels.backends import device_backends
from evolver_kernels.merge.config import (
    DTYPES,
    MergeConfigError,
    MergeSpec,
    Slice,
    Source,
)
from evolver_kernels.merge.plan import (
    Route,
    check,
    input_name,
    relaid_copies,
    slices_of,
)
from evolver_kernels.merge.target import Target, target_of
from evolver_kernels.methods import merger
from evolver_kernels.storage.arena import (
    Arena,
    Entry,
    Layout,
    layer_index,
    safetensors_files,
    tensor_index,
)
from evolver_kernels.storage.population import MappedModels, MemoryPopulation, SharedMemoryPopulation, make_population


def _locate(
    layout: Layout, routes: dict[str, Route], source: Callable[[Route], tuple[Source, int | None]], spec: MergeSpec
) -> dict[str, tuple[str, str]]:
    """Entry name -> (file, key) of the tensor that fills it in the checkpoint `source(route)` names (a model and
    the layer to read), checked by name and shape before anything is read."""
    indexes: dict[str, dict] = {}
    where = {}
    for e in layout.entries:
        src, layer = source(routes[e.name])
        if src.model not in indexes:
            indexes[src.model] = tensor_index(safetensors_files(spec.local(src.model)))
        index = indexes[src.model]
        key = next((k for k in (input_name(a, layer) for a in e.aliases) if k in index), None)
        if key is None:
            beyond = f" (layer_range {list(src.layers)} beyond its layers?)" if src.layers else ""
            raise MergeConfigError(f"{src.model}: no tensor {input_name(e.name, layer)}{beyond}")
        if tuple(index[key][2]) != e.shape:
            raise MergeConfigError(f"{src.model}: {key} has shape {list(index[key][2])}, expected {list(e.shape)}")
        where[e.name] = (index[key][0], key)
    return where


def _fill(
    arena: Arena, routes: dict[str, Route], source: Callable[[Route], tuple[Source, int | None]], spec: MergeSpec
) -> Arena:
    """`arena` (the output layout) filled tensor by tensor from the checkpoints `source(route)` names, cast to the
    arena's dtypes."""
    by_file: dict[str, list[tuple[Entry, str]]] = {}
    where = _locate(arena.layout, routes, source, spec)
    for e in arena.layout.entries:
        path, key = where[e.name]
        by_file.setdefault(path, []).append((e, key))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for e, key in items:
                arena.view(e).copy_(f.get_tensor(key))
    return arena


class _Routed:
    """The output's tensors read straight from the checkpoints that fill them (passthrough's slices: nothing is
    merged), one at a time, cast to the layout's dtypes as _fill casts them: what the output writer reads of an
    Arena (layout, view, discard), with no copy of the model held or written first. Each tensor is checked for
    NaN and inf as it is read (_check_finite's refusal, `method` named): the writer's one pass over the sources is
    the check's, and its refusal leaves no shard (write_shards)."""

    def __init__(
        self,
        layout: Layout,
        routes: dict[str, Route],
        source: Callable[[Route], tuple[Source, int | None]],
        spec,
        method: str,
    ):
        self.layout, self.method = layout, method
        self._where = _locate(layout, routes, source, spec)
        self._files: dict[str, Any] = {}  # path -> its open safetensors handle (its header parsed once)

    def view(self, e: Entry) -> torch.Tensor:
        path, key = self._where[e.name]
        if path not in self._files:
            self._files[path] = safe_open(path, framework="pt", device="cpu")
        t = self._files[path].get_tensor(key).to(self.layout.group_dtype(e.group))
        _check_finite_entry(t, e, self.method)
        return t

    def discard(self, e: Entry) -> None:
        """Nothing to give back: no entry is held."""

    def close(self) -> None:
        self._files.clear()


def _load_restacked(
    spec: MergeSpec, slices: list[Slice], layout: Layout, routes: dict[str, Route], scratch: Scratch
) -> tuple[Any, Arena | None]:
    """The population of the merged sources (individual k: the k-th source of each tensor's slice) and the base,
    in the output layout and dtype, one individual at a time. With --population-on mapped (or disk) they are
    files in the scratch directory, mapped MAP_SHARED: no anonymous copy of a model is held."""
    n = len(slices[0].sources)
    cpu = torch.device("cpu")
    if spec.population_on == "mapped":  # a file-backed MemoryPopulation (its class serves a node's ranks too)
        pop = SharedMemoryPopulation(layout, n, scratch.path, writes=True)
    else:
        pop = make_population(spec.population_on, layout, [], [], cpu, disk_dir=scratch.path, extra=n)
    for k in range(n):

        def source(r: Route, k=k) -> tuple[Source, int | None]:
            return slices[r.slice].sources[k], r.layers[k]

        if isinstance(pop, MemoryPopulation):
            _fill(pop.arenas[k], routes, source, spec)
            continue
        arena = _fill(Arena.empty(layout), routes, source, spec)
        pop.begin_write(k)
        for group in layout.groups:
            pop.write(k, group, 0, arena.buffers[group])
        pop.commit_write(k)
    base = None
    if slices[0].base is not None:
        base = _fill(
            _scratch_arena(spec, layout, scratch, "base"), routes, lambda r: (slices[r.slice].base, r.base_layer), spec
        )
    return pop, base


def _scratch_arena(spec: MergeSpec, layout: Layout, scratch: Scratch, name: str) -> Arena:
    """A zero-filled arena for the merge's own working copies: in host memory with --population-on cpu, else
    files in the scratch directory mapped MAP_SHARED (the kernel may write them back and evict them)."""
    return Arena.empty(layout) if spec.population_on == "cpu" else Arena.on_files(layout, scratch.path, name)


def _layout_specs(layout: Layout, donor: str, dtype: torch.dtype | None, num_layers: int | None):
    """(specs, entries, index) of _save_layout's output: every tensor it writes (name, dtype, shape) in order, the
    layout's entries by the name the donor gives them, the donor's tensor_index (its buffers are copied)."""
    index = tensor_index(safetensors_files(donor))
    entries = {next((a for a in e.aliases if a in index), e.name): e for e in layout.entries}
    aliases = {a for e in layout.entries for a in e.aliases}
    buffers = sorted(set(index) - aliases)
    for key in buffers:
        if layer_index(key) is not None and num_layers is not None:
            raise MergeConfigError(f"{donor}: {key} is a layer's stored buffer, which layer stacking does not carry")

    def stored(key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if key in entries:
            return layout.group_dtype(entries[key].group), entries[key].shape
        return index[key][1], index[key][2]

    specs = []
    for key in sorted([*entries, *buffers]):
        stored_dtype, shape = stored(key)
        specs.append((key, dtype if dtype is not None and stored_dtype.is_floating_point else stored_dtype, shape))
    return specs, entries, index


def _save_layout(
    arena: Arena | _Routed,
    donor: str,
    out_dir: str,
    dtype: torch.dtype | None,
    num_layers: int | None,
    shard_bytes: int = 2 << 30,
    into: MappedOutput | None = None,
    before_commit: Callable[[], None] | None = None,
) -> list[str]:
    """The merge as an HF model directory when its tensors are not the donor checkpoint's (stacked layers, a
    dtype cast before merging): each tensor under the name the donor gives it, the donor's other tensors
    (buffers), its config (with num_layers and dtype), generation config and tokenizer files; `into`: the
    shards the arena's tensors already are; before_commit: write_shards'. Returns the paths."""
    specs, entries, index = _layout_specs(arena.layout, donor, dtype, num_layers)
    paths = write_shards(
        out_dir,
        specs,
        model_io.output_tensors(arena, entries, index, dtype),
        shard_bytes,
        written=model_io.discard_written(arena, entries),
        into=into,
        before_commit=before_commit,
    )
    with open(os.path.join(donor, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = str(dtype).removeprefix("torch.")
    if num_layers is not None:
        key = "num_hidden_layers"  # the attribute's own name in the file, else the config's name for it (n_layer, ...)
        if key not in config:
            key = getattr(model_io.load_config(donor), "attribute_map", {}).get(key, key)
        config[key] = num_layers
        if isinstance(config.get("layer_types"), list):  # one entry per layer in newer configs
            config["layer_types"] = [config["layer_types"][0]] * num_layers
    paths.append(write_json(os.path.join(out_dir, "config.json"), config))
    return paths + _copy_files(donor, out_dir, ("generation_config.json",) + model_io.TOKENIZER_FILES)


def _copy_files(src: str, out_dir: str, names: tuple[str, ...]) -> list[str]:
    """Copies the files `names` that `src` has into out_dir (and removes those it lacks there)."""
    paths = []
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            paths.append(os.path.join(out_dir, name))
            shutil.copyfile(os.path.join(src, name), paths[-1])
        elif os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    return paths


def _check_vocabulary(spec: MergeSpec) -> None:
    """tokenizer_source: base is the base's tokenizer file for file: every model must have its vocabulary
    (mergekit would move embeddings onto the base's vocabulary, which is not done here)."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(spec.local(spec.tokenizer_from)).get_vocab()
    for m in spec.models:
        if AutoTokenizer.from_pretrained(spec.local(m)).get_vocab() != want:
            raise MergeConfigError(
                f"{spec.where}: tokenizer_source: base: {m}'s vocabulary differs from the base "
                "model's (moving embeddings onto another vocabulary is not supported)"
            )


def _read_inputs(
    spec: MergeSpec, target: Target, slices: list[Slice], models: list[str], base_dir: str | None, scratch: Scratch
):
    """(population, base) on --population-on: the models' own files, or their re-laid-out copies in scratch."""
    layout = target.layout
    if not target.identity:
        return _load_restacked(spec, slices, layout, target.routes, scratch)
    pop = (
        MappedModels(layout, target.files, models)
        if spec.population_on == "mapped"
        else make_population(
            spec.population_on, layout, target.files, models, torch.device("cpu"), disk_dir=scratch.path
        )
    )
    base = None
    if base_dir and spec.population_on == "mapped":
        base = MappedModels(layout, [safetensors_files(base_dir)], [spec.base])
    elif base_dir:
        base = model_io.load_model_arena(
            layout, safetensors_files(base_dir), spec.base, _scratch_arena(spec, layout, scratch, "base")
        )
    return pop, base


def _output_specs(spec: MergeSpec, target: Target, models: list[str]):
    """(specs, entries by output name) of the model _write_output writes: its tensors in order, and which of
    them are the layout's entries."""
    dtype = DTYPES[spec.dtype] if spec.dtype else None
    if target.identity:
        specs, evolved, _ = model_io.model_specs(target.layout, models[0], target.files[0], dtype)
        return specs, evolved
    layout = target.layout
    specs, entries, _ = _layout_specs(
        layout, target.donor, dtype or layout.group_dtype(layout.entries[0].group), target.stacked
    )
    return specs, entries


def _mapped_output(
    spec: MergeSpec, target: Target, models: list[str], scratch: Scratch
) -> tuple[MappedOutput, Arena] | None:
    """The output's shards made now and the arena the merge writes into them (io/mapped_output.py), where the
    output's tensors are the merged ones as they are (no cast on the way out); None: a scratch arena instead."""
    specs, keyed = _output_specs(spec, target, models)
    mapped = MappedOutput(spec.out, scratch.path, specs)
    arena = mapped.arena(target.layout, keyed)
    if arena is None:
        mapped.remove()
        return None
    return mapped, arena


def _write_output(
    spec: MergeSpec,
    record,
    target: Target,
    slices: list[Slice],
    models: list[str],
    arena: Arena | _Routed,
    into: MappedOutput | None = None,
    before_commit: Callable[[], None] | None = None,
) -> list[str]:
    """The merged model, its config and tokenizer, and merge.json in --out; the paths written. `into`: the shards
    the merge wrote the arena into (_mapped_output); before_commit(): called once the tensors are written, before
    any file of the output replaces one there (write_shards)."""
    dtype = DTYPES[spec.dtype] if spec.dtype else None
    if target.identity:
        if before_commit is not None:
            before_commit()
        written = model_io.save_model(arena, models[0], target.files[0], spec.out, dtype=dtype, discard=True, into=into)
    else:
        layout = target.layout
        written = _save_layout(
            arena,
            target.donor,
            spec.out,
            dtype or layout.group_dtype(layout.entries[0].group),
            target.stacked,
            into=into,
            before_commit=before_commit,
        )
    if spec.tokenizer_from:
        copied = _copy_files(spec.local(spec.tokenizer_from), spec.out, model_io.TOKENIZER_FILES)
        written = [p for p in written if os.path.basename(p) not in model_io.TOKENIZER_FILES] + copied
    groups = target.groups
    written.append(
        write_json(
            os.path.join(spec.out, "merge.json"),
            {
                "method": record.name,
                "mergekit_method": spec.read_as,
                "models": spec.models,
                "weights": groups[0][2] or [1.0] * len(slices[0].sources),
                "base": spec.base,
                **target.settings,
                "seed": spec.seed,
                "dev": spec.dev,
                "dtype": spec.dtype,
                "compute_dtype": spec.compute_dtype,
                "tokenizer_source": "base" if spec.tokenizer_from else None,
                "slices": [[[s.model, list(s.layers)] for s in sl.sources] for sl in spec.slices or []] or None,
                "per_tensor": [
                    {"tensors": [e.name for e in entries], **record.settings(s), "weights": w}
                    for entries, s, w in groups
                ]
                if len(groups) > 1
                else None,
                "backends": device_backends(["cpu"]),
                "resolved_models": {ref: path for ref, path in spec.resolved.items() if ref != path},
            },
        )
    )
    return written


def _check_finite(arena: Arena, method: str) -> None:
    """Refuses to write a merge with a NaN or infinite value (a broken input, or weights that cancel under
    normalize), naming the first such tensor; one pass over the merged tensors, chunk by chunk."""
    for entry in arena.layout.entries:
        _check_finite_entry(arena.view(entry), entry, method)


def _check_finite_entry(t: torch.Tensor, entry: Entry, method: str, chunk: int = 1 << 22) -> None:
    """_check_finite's refusal for one tensor (`entry`'s values t)."""
    flat = t.reshape(-1)
    for lo in range(0, entry.numel, chunk):
        if all(torch.isfinite(m) for m in torch.aminmax(flat[lo : lo + chunk])):
            continue  # min and max are NaN where a value is, and inf where one is: a pass at copy speed
        bad = int((~torch.isfinite(flat[lo : lo + chunk])).sum())
        if bad:
            raise MergeConfigError(
                f"the {method} merge of {entry.name} has non-finite values (NaN or inf; {bad} in its first "
                f"{min(entry.numel, lo + chunk)} elements): check the input models for NaN or inf; nothing "
                "was written"
            )


def run(spec: MergeSpec, log=print) -> str:
    """Merges spec.models into spec.out (claimed: io/rundir.py); returns the output directory. The scratch
    directory under --out is removed on every exit path; a failed merge leaves no --out it created."""
    record = check(spec)
    slices = slices_of(spec)
    models = [spec.local(m) for m in spec.models]
    base_dir = spec.local(slices[0].base.model) if slices[0].base else None
    inputs = (
        [("--models", m) for m in models] + [("--base", base_dir)] * bool(base_dir) + [("--dev", d) for d in spec.dev]
    )
    if spec.tokenizer_from:
        _check_vocabulary(spec)
    claimed = OutputDir.claim(spec.out, "merge", inputs)
    scratch = mapped = None
    try:
        target = target_of(spec, record, slices, models)
        layout, groups, settings = target.layout, target.groups, target.settings
        if spec.read_as:
            log(
                f"merge: {spec.where}: mergekit's {spec.read_as} (bernoulli drops keeping `density`, L1-rescaled) is "
                f"{record.name} with epsilon 0; the drops are our Philox draws, not torch's"
            )
        log(
            f"merge: {_count(spec, slices)} of {format_bytes(layout.nbytes)} with {record.phrase(settings)}"
            f"{f' ({len(groups)} groups of tensor settings)' if len(groups) > 1 else ''}; population on "
            f"{spec.population_on}; backends: cpu runs {device_backends(['cpu'])['cpu']}"
        )
        direct = record.copies and not target.identity  # passthrough's slices: the re-laid-out model is the output
        # the merge's working files (the output before it is written, models re-laid out): removed at the end
        relaid = 0 if direct else relaid_copies(spec, target.identity, slices) * layout.nbytes
        problem = disk_problem(
            [("the merged tensors", spec.out, layout.nbytes), ("the models re-laid out", spec.out, relaid)]
        )
        if problem:
            raise MergeConfigError(f"--out {spec.out}: {problem} (the merge's scratch files, before its output)")
        scratch = Scratch(spec.out, "--out")
        pop, base = (None, None) if direct else _read_inputs(spec, target, slices, models, base_dir, scratch)
        if direct:  # each tensor read from its source as it is checked and as it is written: no copy first
            arena = _Routed(
                layout, target.routes, lambda r: (slices[r.slice].sources[0], r.layers[0]), spec, record.name
            )
        else:  # the merge's result: the output's own files where it can be, else scratch files until written out
            in_place = None
            if record.writes_views and record.statistics is None and len(groups) == 1:
                in_place = _mapped_output(spec, target, models, scratch)
            if in_place is not None:
                mapped, arena = in_place
            else:
                arena = Arena.on_files(layout, scratch.path, "merged")
        stats = None
        if record.statistics is not None:
            from transformers import AutoTokenizer

            model_io.attach_arena(target.model, arena, target.files[0])
            evaluator = Evaluator(target.task, AutoTokenizer.from_pretrained(models[0]), spec.dev, config=target.config)
            stats = merger.compute_statistics(
                record.name,
                settings,
                target.model,
                layout,
                lambda k: pop.copy_into(k, arena),
                len(spec.models),
                evaluator,
            )
        if not direct:
            merger.merge_per_tensor(record.name, pop, arena, groups, base, seed=spec.seed, stats=stats)
            pop.close()
        if isinstance(base, MappedModels):
            base.close()
        if direct:  # checked as it is written (_Routed); an earlier merge's outputs cleared once its shards are
            written = _write_output(spec, record, target, slices, models, arena, before_commit=claimed.clear_recorded)
        else:
            _check_finite(arena, record.name)
            claimed.clear_recorded()  # an earlier merge's outputs here (e.g. shards this one does not write)
            written = _write_output(spec, record, target, slices, models, arena, into=mapped)
        claimed.record(written)
        if isinstance(arena, _Routed):
            arena.close()
    except BaseException:
        if mapped is not None:
            mapped.remove()
        if scratch is not None:
            scratch.remove()
        claimed.release(remove_if_unused=True)
        raise
    if scratch is not None:
        scratch.remove()
    claimed.release()
    log(f"merged {_count(spec, slices)} with {record.phrase(settings)} into {spec.out}")
    return spec.out


def _count(spec: MergeSpec, slices: list[Slice]) -> str:
    """How many distinct models the merge merges, as "N models" (a slices merge: every slice's, not the first's)."""
    n = len({os.path.realpath(spec.local(s.model)) for sl in slices for s in sl.sources})
    return f"{n} model{'s' if n != 1 else ''}"
