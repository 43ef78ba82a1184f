"""Shared fixtures and markers. Triton runs under its interpreter when no GPU is present: that must be decided
before any Triton kernel is defined, so it is set here, before evolver_kernels is imported by any test.

Markers: `cuda` (needs a CUDA GPU: skipped, saying so, without one), `slow` (end-to-end runs of several
processes: kill -9 and resume, torchrun; `-m "not slow"` leaves them out of a quick run; CI runs everything).
"""

import os
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import evolver_kernels
from evolver_kernels.testing import tiny_models

HAS_CUDA = torch.cuda.is_available()
# (device, backend) pairs under test besides the reference: every backend that runs here.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
KERNEL_CASES = [
    pytest.param(device, backend, id=f"{device}-{backend}")
    for device in DEVICES
    for backend in evolver_kernels.available_backends(device)
    if backend != "reference"
]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible: this test needs one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


class TinyPopulation(NamedTuple):
    """Fine-tunes of one tiny base model (saved beside them as `<kind>-base`) and dev files for them."""

    models: list[str]
    dev: list[str]

    @property
    def base(self) -> str:
        return os.path.join(
            os.path.dirname(self.models[0]), os.path.basename(self.models[0]).rsplit("-", 1)[0] + "-base"
        )

    @property
    def root(self) -> str:
        return os.path.dirname(self.models[0])


@pytest.fixture(scope="session")
def bert_pop(tmp_path_factory) -> TinyPopulation:
    """4 BERT sentiment fine-tunes (noise 0.3: different enough that evolution accepts offspring) of a saved base,
    and 2 dev files of 48 rows. Shared by every driver test; never written into (runs write under tmp_path)."""
    root = tmp_path_factory.mktemp("bert")
    models = tiny_models.make_population("bert", str(root), 4, noise=0.3, save_base=True)
    dev = [tiny_models.write_jsonl(str(root / f"dev{k}.jsonl"), tiny_models.sentiment_rows(48, k)) for k in range(2)]
    return TinyPopulation(models, dev)


@pytest.fixture(scope="session")
def llama_pop(tmp_path_factory) -> TinyPopulation:
    """3 tiny Llama causal-LM fine-tunes of a saved base and one dev file."""
    root = tmp_path_factory.mktemp("llama")
    models = tiny_models.make_population("llama", str(root), 3, noise=0.05, save_base=True)
    dev = [tiny_models.write_jsonl(str(root / "dev.jsonl"), tiny_models.lm_rows(24, 1))]
    return TinyPopulation(models, dev)
