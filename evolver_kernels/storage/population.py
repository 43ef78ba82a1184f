"""Population storage tiers behind one interface (docs/ARCHITECTURE.md §4).

Tiers (the names of --population-on): "gpu" (every individual in device memory), "cpu" (host memory,
pinned when a GPU computes; chunks are copied to the compute device), "disk" (one flat safetensors file
per individual, read through a memory map; a replacement is written to a new file and renamed into place,
so a crash never leaves a half-written individual; host memory holds chunk buffers only).

Individuals are arenas (evolver_kernels.storage.arena). Readers take chunks of a dtype group; writers replace
an individual chunk by chunk between begin_write and commit_write, so a tier that writes files can make
the replacement atomic. On the memory tiers a chunk read is a view: no copy.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import json
import mmap
import os
import shutil
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evolver_kernels.errors import ArgumentError
from evolver_kernels.storage.arena import Arena, Layout, iter_chunks, load_into, resolve_names, tensor_index
from evolver_kernels.storage.readahead import readahead_window, will_need

TIERS = ("gpu", "cpu", "disk")


class Population(abc.ABC):
    layout: Layout
    size: int
    # False for a rank that shares its node's population without writing it (node_share.py): its writes are
    # dropped, since the node's writer writes the same bytes, and it reads them after a barrier (refresh)
    writes: bool = True

    @abc.abstractmethod
    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of individual i's `group` buffer. May be a view: do not write into it."""

    def begin_write(self, i: int) -> None:  # noqa: B027 - optional hook
        """Starts replacing individual i; every element of every group is then written once."""

    @abc.abstractmethod
    def write(self, i: int, group: str, lo: int, values: torch.Tensor) -> None:
        """Stores `values` as elements [lo, lo + len) of individual i's `group` buffer."""

    def commit_write(self, i: int) -> None:  # noqa: B027 - optional hook
        """Makes the replacement of individual i visible (atomically, on tiers that write files)."""

    @abc.abstractmethod
    def save(self, i: int, path: str) -> None:
        """Writes individual i as a flat safetensors file (one tensor per group), atomically."""

    @abc.abstractmethod
    def load(self, i: int, path: str) -> None:
        """Reads individual i back from a file written by save()."""

    def chunks(self, group: str, size: int, chunk: int) -> Iterator[tuple[int, int]]:
        """The [lo, hi) spans a loop reading every individual's `group` should take (a view may stage the
        next span's reads while this one computes: offspring.CandidateView)."""
        return iter_chunks(size, chunk)

    def copy_into(self, i: int, arena: Arena, chunk: int = 1 << 22) -> None:
        """arena = individual i, `chunk` elements at a time."""
        for group in self.layout.groups:
            for lo, hi, dst in arena.chunks(group, chunk):
                dst.copy_(self.read(i, group, lo, hi), non_blocking=True)

    @property
    def stored(self) -> Population:
        """The population whose individuals this reader shows (itself; a view: the one underneath)."""
        return self

    @property
    def replaced(self) -> frozenset[int]:
        """Slots whose reads differ from `stored` (a view with offspring in some slots); cached per-individual
        terms of those slots must not be used."""
        return frozenset()

    def prefetch(self, i: int, group: str, lo: int, hi: int) -> None:  # noqa: B027 - optional hook
        """A hint: elements [lo, hi) of individual i's group will be read soon (a reader of files starts reading
        them now); nothing by default."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases what the tier holds open (memory maps); the population is not used afterwards."""

    def refresh(self, indices) -> None:  # noqa: B027 - optional hook
        """Individuals another process of the node replaced: reads must see the new bytes (the disk tier drops
        its maps of the old files; shared memory needs nothing)."""


class MemoryPopulation(Population):
    """The gpu and cpu tiers: N arenas resident on `storage_device`."""

    def __init__(self, layout: Layout, size: int, storage_device: torch.device | str, pin_memory: bool = False):
        self.layout = layout
        self.size = size
        self.storage_device = torch.device(storage_device)
        self.arenas = [Arena.empty(layout, self.storage_device, pin_memory=pin_memory) for _ in range(size)]

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        return self.arenas[i].buffers[group][lo:hi]

    def write(self, i: int, group: str, lo: int, values: torch.Tensor) -> None:
        if not self.writes:
            return
        dst = self.arenas[i].buffers[group][lo : lo + values.numel()]
        if dst.data_ptr() != values.data_ptr():
            dst.copy_(values, non_blocking=True)

    def save(self, i: int, path: str) -> None:
        save_flat(self.arenas[i], path)

    def load(self, i: int, path: str) -> None:
        if self.writes:
            load_flat(self.arenas[i], path)


class SharedMemoryPopulation(MemoryPopulation):
    """The host-memory tiers under several ranks of one node: each individual's group buffers are files in a
    shared-memory directory `root` (tmpfs), which every local rank maps MAP_SHARED (torch.from_file), so the
    node holds the population once. The writer creates the files; the other ranks map them afterwards and
    never write (their `writes` is False)."""

    def __init__(self, layout: Layout, size: int, root: str, writes: bool):
        self.layout, self.size, self.root, self.writes = layout, size, root, writes
        self.storage_device = torch.device("cpu")
        # zero-filled and allocated by the writer; the other ranks map the files afterwards
        self.arenas = [Arena.on_files(layout, root, f"ind{i}", create=writes) for i in range(size)]


def save_flat(arena: Arena, path: str) -> None:
    """Atomic write of an arena as safetensors (one tensor per group) with the layout's fingerprint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {g: buf.detach().cpu() for g, buf in arena.buffers.items()}
    save_file(tensors, tmp, metadata={"layout": hash_layout(arena.layout)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_flat(arena: Arena, path: str) -> None:
    with safe_open(path, framework="pt", device="cpu") as f:
        if f.metadata().get("layout") != hash_layout(arena.layout):
            raise ValueError(f"{path}: written for another model layout")
        for g, buf in arena.buffers.items():
            buf.copy_(f.get_tensor(g))


def hash_layout(layout: Layout) -> str:
    import hashlib

    return hashlib.sha256(layout.fingerprint().encode()).hexdigest()[:16]


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_DATA_ALIGN = 64


def _flat_header(layout: Layout) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of a flat individual file (one tensor per group) and each group's byte start."""
    entries, starts, pos = {}, {}, 0
    for g, (_, size) in layout.groups.items():
        nbytes = layout.group_nbytes(g)
        entries[g] = {"dtype": _SAFETENSORS_DTYPES[g], "shape": [size], "data_offsets": [pos, pos + nbytes]}
        starts[g] = pos
        pos += nbytes
    entries["__metadata__"] = {"layout": hash_layout(layout)}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * ((-(8 + len(header))) % _DATA_ALIGN)  # data starts 64-byte aligned
    return len(header).to_bytes(8, "little") + header, starts


class DiskPopulation(Population):
    """The disk tier: `root/ind<i>.safetensors`, flat, memory-mapped for reading (page cache, not anonymous
    memory), replaced by writing `ind<i>.safetensors.new` chunk by chunk and renaming it on commit."""

    def __init__(self, layout: Layout, size: int, root: str, writes: bool = True):
        self.layout = layout
        self.size = size
        self.root = root
        self.writes = writes  # False: another rank of the node writes these files (node_share.py)
        os.makedirs(root, exist_ok=True)
        self.header, self.group_start = _flat_header(layout)
        self.elsize = {g: layout.group_dtype(g).itemsize for g in layout.groups}
        self._maps: dict[int, tuple[mmap.mmap, object]] = {}
        self._writing: dict[int, int] = {}

    def path(self, i: int) -> str:
        return os.path.join(self.root, f"ind{i}.safetensors")

    def _map(self, i: int) -> mmap.mmap:
        if i not in self._maps:
            f = open(self.path(i), "rb")  # noqa: SIM115 - kept open with its map until _unmap
            self._maps[i] = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), f)
        return self._maps[i][0]

    def _unmap(self, i: int) -> None:
        entry = self._maps.pop(i, None)
        if entry is not None:
            entry[0].close()
            entry[1].close()

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        offset = len(self.header) + self.group_start[group] + lo * self.elsize[group]
        import warnings

        with warnings.catch_warnings():  # a read-only map: torch warns that the tensor is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map(i), dtype=self.layout.group_dtype(group), count=hi - lo, offset=offset)

    def begin_write(self, i: int) -> None:
        if not self.writes:
            return
        fd = os.open(self.path(i) + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, self.header)
        self._writing[i] = fd

    def write(self, i: int, group: str, lo: int, values: torch.Tensor) -> None:
        if not self.writes:
            return
        fd = self._writing.get(i)
        if fd is None:
            raise RuntimeError(f"write to individual {i} outside begin_write/commit_write")
        data = values.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        os.pwrite(fd, memoryview(data), len(self.header) + self.group_start[group] + lo * self.elsize[group])

    def commit_write(self, i: int) -> None:
        if not self.writes:
            return
        fd = self._writing.pop(i)
        os.fsync(fd)
        os.close(fd)
        self._unmap(i)
        os.replace(self.path(i) + ".new", self.path(i))

    def write_from_files(self, i: int, files: list[str], source: str, chunk: int = 1 << 22) -> None:
        """Creates individual i from a model's safetensors files, tensor by tensor (padding written as zeros)."""
        index = tensor_index(files)
        keys = resolve_names(self.layout, index, source)
        self.begin_write(i)
        handles = {}
        try:
            for g, (_, size) in self.layout.groups.items():
                dtype = self.layout.group_dtype(g)
                for lo, hi in iter_chunks(size, chunk):
                    self.write(i, g, lo, torch.zeros(hi - lo, dtype=dtype))
            for e in self.layout.entries:
                key = keys[e.name]
                path = index[key][0]
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt", device="cpu")
                self.write(i, e.group, e.offset, handles[path].get_tensor(key).reshape(-1))
        finally:
            handles.clear()
        self.commit_write(i)

    def save(self, i: int, path: str) -> None:
        _link_or_copy(self.path(i), path)

    def load(self, i: int, path: str) -> None:
        if not self.writes:
            return
        with safe_open(path, framework="pt", device="cpu") as f:
            if f.metadata().get("layout") != hash_layout(self.layout):
                raise ValueError(f"{path}: written for another model layout")
        with open(path, "rb") as f:
            same_layout = f.read(len(self.header)) == self.header
        if same_layout:  # one of ours: link it into place
            self._unmap(i)
            tmp = self.path(i) + ".new"
            _link_or_copy(path, tmp)
            os.replace(tmp, self.path(i))
            return
        self.begin_write(i)  # another writer's layout of the same tensors: stream them over
        with safe_open(path, framework="pt", device="cpu") as f:
            for g, (_, size) in self.layout.groups.items():
                sl = f.get_slice(g)
                for lo, hi in iter_chunks(size, 1 << 22):
                    self.write(i, g, lo, sl[lo:hi])
        self.commit_write(i)

    def close(self) -> None:
        """Unmaps every file (the files themselves live in a scratch directory its owner removes: rundir.py)."""
        for i in list(self._maps):
            self._unmap(i)

    def refresh(self, indices) -> None:
        for i in indices:  # the writer renamed new files into place: map those on the next read
            self._unmap(i)


def _link_or_copy(src: str, dst: str) -> None:
    """Individual files are never modified after their rename: a hard link is a safe, free copy."""
    tmp = dst + ".tmp-link"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class ReadOnlyView(Population):
    """A population seen through a view that only reads (merges read views; nothing may write them)."""

    def write(self, i, group, lo, values):
        raise TypeError(f"{type(self).__name__} is a read-only view")

    def save(self, i, path):
        raise TypeError(f"{type(self).__name__} is a read-only view")

    def load(self, i, path):
        raise TypeError(f"{type(self).__name__} is a read-only view")


class PopulationPrefix(ReadOnlyView):
    """Individuals 0 .. size-1 of a population (e.g. the models, without the extra individuals)."""

    def __init__(self, pop: Population, size: int):
        self.pop, self.layout, self.size = pop, pop.layout, size

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        if not 0 <= i < self.size:
            raise IndexError(f"individual {i} outside this view of {self.size}")
        return self.pop.read(i, group, lo, hi)


READ_AHEAD_MIN = 1 << 20  # bytes: a read of MappedModels smaller than this hints nothing ahead


class MappedModels(ReadOnlyView):
    """The models' own safetensors files as a read-only population: each file memory-mapped read-only (so
    nothing can write it), a chunk within one tensor is a view of the page cache (no copy), a chunk that spans
    tensors is assembled (alignment padding as zeros). What a one-shot merge reads in place of N loaded copies:
    the anonymous memory it needs is the output and the chunk buffers."""

    def __init__(self, layout: Layout, model_files: list[list[str]], sources: list[str]):
        self.layout, self.size = layout, len(model_files)
        self._files: list[tuple[mmap.mmap, object]] = []
        # per individual and group: (start, end, flat view of the tensor), sorted by start
        self._spans: list[dict[str, list[tuple[int, int, torch.Tensor]]]] = []
        # per individual and group, in the same order: (map, byte offset of the tensor, read-ahead window)
        self._bytes: list[dict[str, list[tuple[mmap.mmap, int, int]]]] = []
        self._starts: list[dict[str, list[int]]] = []
        try:
            for files, source in zip(model_files, sources):
                self._spans.append(self._map_model(files, source))
        except BaseException:
            self.close()
            raise

    def _map_model(self, files: list[str], source: str) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
        import warnings

        index = tensor_index(files)
        keys = resolve_names(self.layout, index, source)
        maps, items = {}, {g: [] for g in self.layout.groups}
        for path in sorted({index[keys[e.name]][0] for e in self.layout.entries}):
            f = open(path, "rb")  # noqa: SIM115 - kept open with its map until close()
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._files.append((mm, f))
            header_len = int.from_bytes(mm[:8], "little")
            maps[path] = (mm, 8 + header_len, json.loads(mm[8 : 8 + header_len]), readahead_window(path))
        for e in self.layout.entries:
            key = keys[e.name]
            mm, data_start, header, window = maps[index[key][0]]
            begin = header[key]["data_offsets"][0]
            with warnings.catch_warnings():  # a read-only map: torch warns that the tensor is not writable
                warnings.simplefilter("ignore", UserWarning)
                view = (
                    torch.frombuffer(
                        mm, dtype=self.layout.group_dtype(e.group), count=e.numel, offset=data_start + begin
                    )
                    if e.numel
                    else torch.empty(0, dtype=self.layout.group_dtype(e.group))
                )
            items[e.group].append((e.offset, e.offset + e.numel, view, mm, data_start + begin, window))
        for group_items in items.values():
            group_items.sort(key=lambda item: item[0])
        spans = {g: [item[:3] for item in group_items] for g, group_items in items.items()}
        self._starts.append({g: [item[0] for item in group_items] for g, group_items in items.items()})
        self._bytes.append({g: [item[3:] for item in group_items] for g, group_items in items.items()})
        return spans

    def _read_ahead(self, i: int, group: str, lo: int, hi: int) -> None:
        """Asks the kernel to start reading elements [lo, hi) of individual i's group from the disk now
        (storage/readahead.will_need: asynchronous), so that the read of the next chunk overlaps the merge of this
        one."""
        itemsize = self.layout.group_dtype(group).itemsize
        spans, places = self._spans[i][group], self._bytes[i][group]
        k = max(0, bisect.bisect_right(self._starts[i][group], lo) - 1)
        for (start, end, _), (mm, at, window) in zip(spans[k:], places[k:]):
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, end)
            if a < b:
                will_need(mm, at + (a - start) * itemsize, at + (b - start) * itemsize, window)

    def prefetch(self, i: int, group: str, lo: int, hi: int) -> None:
        self._read_ahead(i, group, lo, hi)

    def read(self, i: int, group: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of model i's group (a view of the page cache when one tensor holds them), the
        next hi - lo elements read ahead when they are READ_AHEAD_MIN bytes or more (a sample's small blocks are
        read by the kernel's own read-around: a hint per block would cost more than it brings)."""
        if (hi - lo) * self.layout.group_dtype(group).itemsize >= READ_AHEAD_MIN:
            self._read_ahead(i, group, hi, hi + (hi - lo))
        spans = self._spans[i][group]
        k = bisect.bisect_right(self._starts[i][group], lo) - 1
        if k >= 0 and spans[k][0] <= lo and hi <= spans[k][1]:
            start, _, view = spans[k]
            return view[lo - start : hi - start]
        out = torch.zeros(hi - lo, dtype=self.layout.group_dtype(group))
        for start, end, view in spans[max(k, 0) :]:
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out[a - lo : b - lo] = view[a - start : b - start]
        return out

    def close(self) -> None:
        self._spans, self._starts, self._bytes = [], [], []
        for mm, f in self._files:
            # a chunk view still referenced keeps its map open until it is collected
            with contextlib.suppress(BufferError):
                mm.close()
            f.close()
        self._files = []


def make_population(
    tier: str,
    layout: Layout,
    model_files: list[list[str]],
    sources: list[str],
    compute_device: torch.device,
    disk_dir: str | None = None,
    extra: int = 0,
    shared_dir: str | None = None,
    writes: bool = True,
) -> Population:
    """A population of len(model_files) + extra individuals on `tier`, the first loaded tensor by tensor from
    safetensors; the `extra` slots are left for the caller to write (begin_write / write / commit_write).
    With `shared_dir` a host-memory tier is held in shared memory there (SharedMemoryPopulation); `writes`
    False maps a node's population that its writer creates and loads (the disk tier: in `disk_dir`)."""
    if tier not in TIERS:
        raise ArgumentError("tier", f"must be one of {', '.join(TIERS)}, got {tier!r}")
    if tier == "disk":
        if not disk_dir:
            raise ArgumentError("disk_dir", "is needed by the disk tier (a directory for the individuals)")
        pop = DiskPopulation(layout, len(model_files) + extra, disk_dir, writes=writes)
        if writes:
            for i, (files, source) in enumerate(zip(model_files, sources)):
                pop.write_from_files(i, files, source)
        return pop
    storage = compute_device if tier == "gpu" else torch.device("cpu")
    if shared_dir is not None:
        if storage.type != "cpu":
            raise ArgumentError("shared_dir", f"applies to host memory, not a {tier} tier on {storage}")
        pop = SharedMemoryPopulation(layout, len(model_files) + extra, shared_dir, writes)
    else:
        pin = tier == "cpu" and compute_device.type == "cuda"
        pop = MemoryPopulation(layout, len(model_files) + extra, storage, pin_memory=pin)
    if writes:
        for i, (files, source) in enumerate(zip(model_files, sources)):
            load_into(pop.arenas[i], files, source)
    return pop
