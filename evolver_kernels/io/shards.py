"""safetensors files written as the package writes them: the header (safetensors_header), one file tensor by
tensor with one tensor in host memory (write_safetensors), the shard plan and index transformers reads
(plan_shards, write_index), and a model's shards through temporary names (write_shards)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_header(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the file's first bytes: the header's length and the header, padded so the data starts 8-byte aligned as
    safetensors' own writer does it; name -> the tensor's byte range in the data) of a safetensors file whose
    tensors are `specs` (name, dtype, shape), in that order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    ranges = {}
    offset = 0
    for name, dtype, shape in specs:
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        ranges[name] = (offset, end)
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, ranges


def write_safetensors(
    path: str,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensor_for: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    written: Callable[[str], None] | None = None,
) -> None:
    """Writes a safetensors file whose tensors are `specs` (name, dtype, shape), in that order, asking
    tensor_for(name) for one tensor at a time and writing its bytes as they are, by a writer thread: a tensor's
    bytes go to the file while the next tensor is formed (read, checked, cast), so host memory holds two tensors
    at most, where safetensors' save_file holds every tensor of the file and a serialised copy of them.
    written(name), when given, is called by the writer thread once a tensor's bytes are written (its source may
    then be freed)."""
    from concurrent.futures import ThreadPoolExecutor

    head, _ = safetensors_header(specs, metadata)

    def write(name: str, t: torch.Tensor) -> None:
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if written is not None:
            written(name)

    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="safetensors-writer") as writer:
        f.write(head)
        pending = None
        try:
            for name, dtype, shape in specs:
                t = checked_tensor(name, dtype, shape, tensor_for(name)).detach().to("cpu").contiguous()
                if pending is not None:
                    pending.result()  # one tensor in flight: the file's order, a write's error raised here
                pending = writer.submit(write, name, t)
                del t
        finally:
            if pending is not None:
                pending.result()


def checked_tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], t: torch.Tensor) -> torch.Tensor:
    """`t`, refused unless it has the dtype and shape the header gives `name`."""
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: got {t.dtype} {list(t.shape)}, the header says {dtype} {list(shape)}")
    return t


SAFETENSORS_METADATA = {"format": "pt"}
INDEX_FILE = "model.safetensors.index.json"


def plan_shards(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_bytes: int = 2 << 30
) -> list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]]:
    """[(file name, its specs)]: model.safetensors, or shards of at most `shard_bytes` in the specs' order (a
    tensor larger than that alone in its shard) named as transformers names them."""
    plan: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(spec)
        size += nbytes
    if len(plan) == 1:
        return [("model.safetensors", plan[0])]
    return [(f"model-{n:05d}-of-{len(plan):05d}.safetensors", shard) for n, shard in enumerate(plan, 1)]


def write_index(out_dir: str, plan: list, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[str]:
    """model.safetensors.index.json for a sharded plan (plan_shards); the paths written (none for one file)."""
    if len(plan) == 1:
        return []
    path = os.path.join(out_dir, INDEX_FILE)
    weight_map = {name: fname for fname, shard in plan for name, _, _ in shard}
    total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in specs)
    with open(path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [path]


def write_shards(
    out_dir: str,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensor_for: Callable[[str], torch.Tensor],
    shard_bytes: int = 2 << 30,
    written: Callable[[str], None] | None = None,
    into=None,
    before_commit: Callable[[], None] | None = None,
) -> list[str]:
    """Writes the tensors `specs` (name, dtype, shape) as model.safetensors, or as shards of at most
    `shard_bytes` (plan_shards) with model.safetensors.index.json; every shard through a temporary name and
    write_safetensors (with `written`), two tensors in memory at most, and renamed once all are written (a
    failure, tensor_for's refusal included, leaves none of them: all or nothing). before_commit(), when given, is
    called between the last write and the first rename. `into`: the shards already exist as an
    io.mapped_output.MappedOutput of these specs, holding the tensors the merge wrote into them; the others are
    copied in and the shards committed. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    if into is not None:
        if before_commit is not None:
            before_commit()
        return into.commit(specs, tensor_for) + write_index(out_dir, into.plan, specs)
    plan = plan_shards(specs, shard_bytes)
    tmps = [os.path.join(out_dir, fname + ".tmp") for fname, _ in plan]
    try:
        for tmp, (_, shard) in zip(tmps, plan):
            write_safetensors(tmp, shard, tensor_for, metadata=SAFETENSORS_METADATA, written=written)
        if before_commit is not None:
            before_commit()
    except BaseException:
        for tmp in tmps:  # the shards of ours (a full disk, an interrupt, a refused tensor): not left behind
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    paths = [os.path.join(out_dir, fname) for fname, _ in plan]
    for tmp, path in zip(tmps, paths):
        os.replace(tmp, path)
    return paths + write_index(out_dir, plan, specs)
