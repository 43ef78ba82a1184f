"""The merge's output written in place (io/mapped_output.py): the shards it makes are byte for byte what
shards.write_shards writes for the same tensors (one file and several, buffers copied in at commit); the arena
over them writes the output's own bytes; an arena it cannot make is refused (None), and remove() leaves nothing."""

import os

import pytest
import torch
from safetensors.torch import load_file

from evolver_kernels.io import shards
from evolver_kernels.io.mapped_output import MappedOutput
from evolver_kernels.storage.arena import Layout

PARAMS = [
    (("b.weight",), torch.bfloat16, (5, 3)),
    (("a.weight", "tied.weight"), torch.bfloat16, (7,)),
    (("c.weight",), torch.bfloat16, (2, 2, 3)),
]


def _case(tmp_path, buffer_dtype=torch.bfloat16):
    """(layout, specs as the output writes them (sorted names, a buffer among them), output name -> entry, the
    tensors by name)."""
    layout = Layout.from_params(PARAMS)
    gen = torch.Generator().manual_seed(0)
    tensors = {p[0][0]: torch.randn(p[2], generator=gen).to(p[1]) for p in PARAMS}
    tensors["buf"] = torch.arange(3, dtype=torch.float32).to(buffer_dtype)
    specs = sorted((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())
    keyed = {e.name: e for e in layout.entries}
    return layout, specs, keyed, tensors


@pytest.mark.parametrize("shard_bytes", [2 << 30, 40])  # one file; several shards (one tensor each, or two)
def test_the_shards_are_write_shards_bytes(tmp_path, shard_bytes):
    layout, specs, keyed, tensors = _case(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    mapped = MappedOutput(str(tmp_path / "out"), str(tmp_path / "work"), specs, shard_bytes)
    arena = mapped.arena(layout, keyed)
    assert arena is not None and arena.is_placed
    for e in layout.entries:
        arena.view(e).copy_(tensors[e.name])  # what the merge does: write into the output's pages
    assert os.listdir(tmp_path / "out") == []  # nothing under its name before the commit
    paths = shards.write_shards(str(tmp_path / "out"), specs, tensors.__getitem__, shard_bytes, into=mapped)
    want = shards.write_shards(str(tmp_path / "want"), specs, tensors.__getitem__, shard_bytes)
    assert [os.path.basename(p) for p in paths] == [os.path.basename(p) for p in want]
    assert len(paths) == (1 if shard_bytes > 100 else 4)  # three shards and the index
    for got, expected in zip(paths, want):
        with open(got, "rb") as a, open(expected, "rb") as b:
            assert a.read() == b.read(), os.path.basename(got)
    assert os.listdir(tmp_path / "work") == []  # moved, not copied
    loaded = {}
    for p in paths:
        if p.endswith(".safetensors"):
            loaded.update(load_file(p))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_an_arena_that_cannot_be_made_is_refused(tmp_path):
    layout, specs, keyed, _ = _case(tmp_path)
    mapped = MappedOutput(str(tmp_path), str(tmp_path), specs)
    assert mapped.arena(layout, {k: v for k, v in keyed.items() if k != "c.weight"}) is None  # an entry missing
    assert mapped.arena(layout, {**keyed, "buf": keyed["a.weight"]}) is None  # an entry twice
    other = [(n, torch.float32 if n == "a.weight" else d, s) for n, d, s in specs]
    mapped.remove()
    mapped = MappedOutput(str(tmp_path), str(tmp_path), other)
    assert mapped.arena(layout, keyed) is None  # the output casts a.weight: not the merged bytes
    mapped.remove()
    # a float32 tensor after 5 bf16 elements of the buffer: not 4-byte aligned in the file
    layout32 = Layout.from_params([(("z",), torch.float32, (3,))])
    odd = [("a", torch.bfloat16, (5,)), ("z", torch.float32, (3,))]
    mapped = MappedOutput(str(tmp_path), str(tmp_path), odd)
    assert mapped.arena(layout32, {"z": layout32.entries[0]}) is None
    mapped.remove()
    assert sorted(os.listdir(tmp_path)) == []


def test_commit_refuses_other_tensors_and_remove_leaves_nothing(tmp_path):
    layout, specs, keyed, tensors = _case(tmp_path)
    mapped = MappedOutput(str(tmp_path), str(tmp_path), specs)
    mapped.arena(layout, keyed)
    with pytest.raises(ValueError, match="differ from the shards made for it"):
        mapped.commit(specs[:-1], tensors.__getitem__)
    bad = dict(tensors, buf=tensors["buf"].float())
    with pytest.raises(ValueError, match="buf: got torch.float32"):
        mapped.commit(specs, bad.__getitem__)
    mapped.remove()
    assert os.listdir(tmp_path) == []
