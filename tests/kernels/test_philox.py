"""Philox4x32-10 known-answer vectors (Random123) on every definition: PyTorch, C++ (host; device on a
GPU), Triton."""

import pytest
import torch

from evolver_kernels.kernels import backends, rng

COUNTERS = torch.tensor([c for c, _, _ in rng.KNOWN_ANSWERS], dtype=torch.int64)


@pytest.mark.parametrize("case", range(len(rng.KNOWN_ANSWERS)))
def test_pytorch_philox_known_answers(case):
    counter, key, expected = rng.KNOWN_ANSWERS[case]
    words = rng.philox4x32_10(*[torch.tensor(v, dtype=torch.int64) for v in counter], *key)
    assert [int(w) for w in words] == list(expected)


def test_pytorch_philox_batched_matches_scalar():
    counters = torch.randint(0, 2**32, (257, 4), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    batched = torch.stack(rng.philox4x32_10(*counters.unbind(1), 0x12345678, 0x9ABCDEF0), dim=1)
    for row in (0, 100, 256):
        single = rng.philox4x32_10(*[counters[row, k] for k in range(4)], 0x12345678, 0x9ABCDEF0)
        assert [int(w) for w in single] == batched[row].tolist()


def _check_rows(fn, device):
    for i, (_, key, expected) in enumerate(rng.KNOWN_ANSWERS):
        got = fn(COUNTERS[i : i + 1].to(device), *key)
        assert got.cpu()[0].tolist() == list(expected), f"known answer {i}"


def test_cpp_host_philox_known_answers():
    assert backends.cpu_extension() is not None, backends.unavailable_reason("cpu", "cpu")
    _check_rows(torch.ops.evolver_kernels.philox4x32_10, "cpu")


def test_triton_philox_known_answers():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = backends.triton_kernels()
    assert module is not None, backends.unavailable_reason("triton", device)
    _check_rows(module.philox_block, device)


@pytest.mark.cuda
def test_cuda_device_philox_known_answers():
    assert backends.cuda_extension() is not None, backends.unavailable_reason("cuda", "cuda")
    _check_rows(torch.ops.evolver_kernels.philox4x32_10, "cuda")
