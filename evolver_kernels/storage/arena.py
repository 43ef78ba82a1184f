"""Flat parameter arenas: one contiguous buffer per dtype for all of a model's evolved parameters.

A `Layout` maps each parameter to (group, offset, shape) in a canonical order (dtype groups sorted by
name; parameters sorted by name; each start aligned to ALIGN elements so every tensor begins on a
16-byte boundary and a Philox group boundary). Tied weights appear once (under their first name in
sorted order); buffers are not parameters and are not evolved.

Every element of an individual has one global index: the group's base index plus its offset in the
group. Operators run over whole groups (or chunks of them) with that index as `offset`, so results never
depend on how the work is chunked or which storage tier holds the individual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from evolver_kernels.errors import ArgumentError, UserError

ALIGN = 64  # elements: 128-256 bytes, a multiple of 4 (Philox groups) and of 16-byte vectors

_DTYPE_NAMES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # canonical parameter name
    aliases: tuple[str, ...]  # every name the parameter has (tied weights), canonical first
    group: str  # dtype name of the group
    offset: int  # element offset within the group
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each parameter lives. groups: dtype name -> (global base index, padded numel)."""

    entries: tuple[Entry, ...]
    groups: dict[str, tuple[int, int]]

    @property
    def numel(self) -> int:
        return sum(size for _, size in self.groups.values())

    @property
    def nbytes(self) -> int:
        return sum(self.group_nbytes(g) for g in self.groups)

    def group_dtype(self, group: str) -> torch.dtype:
        return getattr(torch, group)

    def group_nbytes(self, group: str) -> int:
        """Bytes of one individual's `group` buffer (padding included)."""
        return self.groups[group][1] * self.group_dtype(group).itemsize

    def fingerprint(self) -> str:
        """A short description that two layouts share exactly when they are interchangeable."""
        return json.dumps([[e.name, e.group, e.offset, list(e.shape)] for e in self.entries])

    def subset(self, entries: Iterable[Entry]) -> Layout:
        """This layout seen through some of its entries (same groups, offsets and global indices): a merge run
        on it touches those tensors only."""
        return Layout(tuple(entries), self.groups)

    def spans(self, group: str) -> list[tuple[int, int]]:
        """The element ranges [lo, hi) of `group` that the entries cover, each with its trailing alignment
        padding: [(0, size)] for a whole layout."""
        spans: list[tuple[int, int]] = []
        for e in sorted((e for e in self.entries if e.group == group), key=lambda e: e.offset):
            if spans and spans[-1][1] == e.offset:
                spans[-1] = (spans[-1][0], e.offset + _aligned(e.numel))
            else:
                spans.append((e.offset, e.offset + _aligned(e.numel)))
        return spans

    @staticmethod
    def from_params(params: Iterable[tuple[tuple[str, ...], torch.dtype, tuple[int, ...]]]) -> Layout:
        """Canonical layout of parameters given as (names, dtype, shape); names[0] need not be canonical."""
        items = sorted((tuple(sorted(names)), dtype_name(dtype), tuple(shape)) for names, dtype, shape in params)
        group_sizes: dict[str, int] = {}
        entries = []
        for names, group, shape in items:
            start = group_sizes.get(group, 0)
            entry = Entry(names[0], names, group, start, shape)
            group_sizes[group] = start + _aligned(entry.numel)
            entries.append(entry)
        groups, base = {}, 0
        for group in sorted(group_sizes):
            groups[group] = (base, group_sizes[group])
            base += group_sizes[group]
        return Layout(tuple(entries), groups)

    @staticmethod
    def of_model(model: torch.nn.Module) -> Layout:
        """The layout of a model's parameters (not its buffers); tied parameters once, with all their names."""
        names_of: dict[int, list[str]] = {}
        param_of: dict[int, torch.nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(name)
            param_of[id(p)] = p
        return Layout.from_params((tuple(names_of[k]), p.dtype, tuple(p.shape)) for k, p in param_of.items())


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """One individual's parameters: a flat tensor per dtype group, laid out by `layout`.

    A placed arena (Arena.placed, for evaluation models spread over several devices) holds each group as
    segments instead: contiguous ranges [lo, hi) of the group's indices, each a tensor on its own device.
    `segments(group)` serves both kinds; `buffers` is empty for a placed arena."""

    def __init__(
        self,
        layout: Layout,
        buffers: dict[str, torch.Tensor],
        segments: dict[str, list[tuple[int, int, torch.Tensor]]] | None = None,
    ):
        self.layout = layout
        self.buffers = buffers
        self._segments = segments
        self.files: dict[str, str] = {}  # group -> the file its buffer maps (Arena.on_files)

    @staticmethod
    def empty(layout: Layout, device: torch.device | str = "cpu", pin_memory: bool = False) -> Arena:
        """Zero-filled (padding stays zero, so arenas compare and hash deterministically)."""
        buffers = {
            g: torch.zeros(size, dtype=layout.group_dtype(g), device=device, pin_memory=pin_memory)
            for g, (_, size) in layout.groups.items()
        }
        return Arena(layout, buffers)

    @staticmethod
    def on_files(layout: Layout, directory: str, prefix: str, create: bool = True) -> Arena:
        """An arena whose group buffers are the files `directory`/`prefix`-GROUP.bin mapped MAP_SHARED
        (torch.from_file): its pages are file pages, which the kernel writes back and evicts under memory
        pressure, so it holds no anonymous memory. With `create` the files are made zero-filled and their space
        allocated now (posix_fallocate: a full disk or tmpfs is an error here, not a SIGBUS later); without it
        they are files another process created (a node's shared population)."""
        buffers, files = {}, {}
        for g, (_, numel) in layout.groups.items():
            files[g] = path = os.path.join(directory, f"{prefix}-{g}.bin")
            dtype = layout.group_dtype(g)
            if create:
                nbytes = max(1, numel * dtype.itemsize)
                with open(path, "wb") as f:
                    if hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(f.fileno(), 0, nbytes)
                    else:  # macOS: a sparse file (a full disk shows when its pages are written)
                        f.truncate(nbytes)
            buffers[g] = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        arena = Arena(layout, buffers)
        arena.files = files
        return arena

    def discard(self, entry: Entry) -> None:
        """Gives back the disk blocks and page cache of `entry` in an arena on files (Arena.on_files) that nothing
        reads again: the whole pages of its bytes are punched out of the file (madvise MADV_REMOVE; they read as
        zeros afterwards), the partial pages at its ends kept for its neighbours. A no-op for an arena in memory
        or on a filesystem that cannot punch holes (the file then keeps its size until it is removed)."""
        path = self.files.get(entry.group)
        if path is None or not hasattr(mmap, "MADV_REMOVE"):
            return
        itemsize = self.layout.group_dtype(entry.group).itemsize
        page = mmap.PAGESIZE
        lo = -(-entry.offset * itemsize // page) * page
        hi = (entry.offset + entry.numel) * itemsize // page * page
        if hi <= lo:
            return
        # EOPNOTSUPP and kin: the blocks stay until the scratch directory is removed
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm, contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)

    @staticmethod
    def placed(layout: Layout, place: Callable[[Entry], tuple[str, torch.device]]) -> Arena:
        """Zero-filled arena whose groups are cut into segments: place(entry) gives (placement key, device),
        and a new segment starts wherever the key changes (entries of one key are contiguous in the canonical
        order when keys are module-name prefixes); a segment's padding goes with the entry before it."""
        segments = {}
        for group, (_, size) in layout.groups.items():
            runs: list[tuple[int, str, torch.device]] = []
            for e in sorted((e for e in layout.entries if e.group == group), key=lambda e: e.offset):
                key, device = place(e)
                if not runs or runs[-1][1] != key:
                    runs.append((e.offset if runs else 0, key, torch.device(device)))
            bounds = [lo for lo, _, _ in runs[1:]] + [size]
            segments[group] = [
                (lo, hi, torch.zeros(hi - lo, dtype=layout.group_dtype(group), device=device))
                for (lo, _, device), hi in zip(runs, bounds)
            ]
        return Arena(layout, {}, segments)

    @property
    def is_placed(self) -> bool:
        return self._segments is not None

    def segments(self, group: str) -> list[tuple[int, int, torch.Tensor]]:
        """[(lo, hi, tensor)]: the group's elements [lo, hi) are `tensor` (one segment unless placed)."""
        if self._segments is None:
            return [(0, self.layout.groups[group][1], self.buffers[group])]
        return self._segments[group]

    def chunks(self, group: str, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, elements [lo, hi) of the group) in chunks of at most `chunk`, never across segments."""
        for seg_lo, seg_hi, tensor in self.segments(group):
            for lo, hi in iter_chunks(seg_hi - seg_lo, chunk):
                yield seg_lo + lo, seg_lo + hi, tensor[lo:hi]

    def view(self, entry: Entry) -> torch.Tensor:
        for lo, hi, tensor in self.segments(entry.group):
            if lo <= entry.offset < hi:
                return tensor[entry.offset - lo : entry.offset - lo + entry.numel].view(entry.shape)
        raise KeyError(f"{entry.name}: offset {entry.offset} outside group {entry.group}")


class LayoutMismatchError(ValueError):
    """Two models (or a model and its checkpoint) do not share parameter names, shapes or dtypes."""


class PickleWeightsError(ArgumentError):
    """A model directory with pickle weights only (converted with --allow-pickle, refused otherwise)."""


def safetensors_files(model_dir: str) -> list[str]:
    """The weight files of an HF model directory, chosen as transformers' from_pretrained chooses them: a
    model.safetensors wins over a model.safetensors.index.json beside it (save_pretrained re-saving with another
    shard size leaves both); else the index's shards; else a clear error."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(
                f"{index}: not a safetensors index with a weight_map ({type(err).__name__}: {err})"
            ) from None
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise UserError(f"{index}: weight_map names {shard!r}, not a file beside the index")
            if not os.path.isfile(os.path.join(model_dir, shard)):
                raise UserError(f"{index}: names the shard {shard}, which is missing")
        return [os.path.join(model_dir, s) for s in shards]
    others = (
        [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if os.path.isdir(model_dir)
        else []
    )
    if others:
        raise PickleWeightsError(
            "model_dir",
            f"{model_dir}: only pickle weights ({', '.join(sorted(others))}); convert them to safetensors "
            "(pickle files can run code when loaded), or pass --allow-pickle to load them anyway",
        )
    raise ArgumentError("model_dir", f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def tensor_index(files: list[str]) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """name -> (file, dtype, shape) from safetensors headers, without reading any tensor data."""
    index = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    sl = f.get_slice(key)
                    index[key] = (path, _DTYPE_NAMES[sl.get_dtype()], tuple(sl.get_shape()))
        except (SafetensorError, OSError) as err:
            raise UserError(
                f"{path}: not a readable safetensors file, truncated or corrupt ({' '.join(str(err).split())})"
            ) from None
        except KeyError as err:
            raise UserError(f"{path}: a tensor of unsupported dtype {err}") from None
    return index


def resolve_names(layout: Layout, index: dict, source: str) -> dict[str, str]:
    """Canonical parameter name -> key in the checkpoint (any alias of a tied weight), checking dtype and
    shape; raises LayoutMismatchError naming the tensor that differs."""
    keys = {}
    for e in layout.entries:
        key = next((a for a in e.aliases if a in index), None)
        if key is None:
            raise LayoutMismatchError(f"{source}: parameter {e.name} is missing")
        _, dtype, shape = index[key]
        if tuple(shape) != e.shape:
            raise LayoutMismatchError(f"{source}: {key} has shape {list(shape)}, expected {list(e.shape)}")
        if dtype_name(dtype) != e.group:
            raise LayoutMismatchError(f"{source}: {key} has dtype {dtype_name(dtype)}, expected {e.group}")
        keys[e.name] = key
    return keys


def load_into(arena: Arena, files: list[str], source: str) -> None:
    """Reads a model's parameters tensor by tensor from safetensors files into `arena` (no state_dict)."""
    index = tensor_index(files)
    keys = resolve_names(arena.layout, index, source)
    by_file: dict[str, list[tuple[Entry, str]]] = {}
    for e in arena.layout.entries:
        by_file.setdefault(index[keys[e.name]][0], []).append((e, keys[e.name]))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for e, key in items:
                arena.view(e).copy_(f.get_tensor(key))


LAYER = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")  # a decoder/encoder layer's tensors


def layer_index(name: str) -> int | None:
    """The layer a tensor name belongs to (model.layers.<i>., encoder.layer.<i>., transformer.h.<i>.); None
    for the tensors outside the layer stack (embeddings, final norm, head)."""
    m = LAYER.search(name)
    return int(m.group(3)) if m else None


def num_layers(layout: Layout) -> int:
    """The layers of a layout: 1 + the largest layer index of its tensors (0 without a layer stack)."""
    return 1 + max((layer_index(e.name) for e in layout.entries if layer_index(e.name) is not None), default=-1)


def with_layer(name: str, index: int) -> str:
    """`name` with its layer index replaced by `index` (layer stacking renames the layers it copies)."""
    m = LAYER.search(name)
    if m is None:
        raise ValueError(f"{name} is not a layer's tensor")
    return name[: m.start(3)] + str(index) + name[m.end(3) :]


def iter_chunks(size: int, chunk: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, size, chunk):
        yield lo, min(lo + chunk, size)
