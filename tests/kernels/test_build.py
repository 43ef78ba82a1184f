"""The build: the compiled extensions import, the ops are registered once with fake implementations,
and the CUDA extension exists wherever nvcc does (a .cu that does not compile fails here)."""

import shutil

import pytest
import torch

import evolver_kernels as ek
from evolver_kernels.kernels import backends


def test_cpu_extension_imports():
    assert backends.cpu_extension() is not None, backends.unavailable_reason("cpu", "cpu")
    assert "cpu" in ek.available_backends("cpu")


def test_ops_are_registered_with_schemas():
    schema = str(torch.ops.evolver_kernels.de_mutate_crossover_.default._schema)
    assert "Tensor(a!) out" in schema and "Tensor? base" in schema


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the CUDA extension is not built here")
def test_cuda_extension_was_built_where_nvcc_exists():
    import os

    if os.environ.get("EVOLVER_KERNELS_SKIP_CUDA_BUILD"):
        pytest.skip("EVOLVER_KERNELS_SKIP_CUDA_BUILD is set")
    assert backends.cuda_extension() is not None, backends.extension_status("_cuda")[1]


def test_fake_implementations_let_torch_compile_trace_the_ops():
    """AOTAutograd traces the ops with fake tensors (their registered fakes), whole-graph, and the compiled
    function gives the eager bits."""
    x, a = torch.randn(1000), torch.randn(1000)
    ek.de_mutate_crossover(x, x, a, x, F=0.5, CR=0.5, seed=0)  # registers the fakes

    def step(x, a, out):
        torch.ops.evolver_kernels.de_mutate_crossover_(x, a, None, None, 0.5, 2**31, 3, 0, 0, out)
        return out * 2

    want = step(x, a, torch.empty_like(x))
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x, a, torch.empty_like(x))
    assert torch.equal(got, want) and not torch.equal(want, x * 2)


def test_available_backends_on_cpu_lists_known_names_in_order():
    names = ek.available_backends("cpu")
    assert names[0] == "reference"
    assert names == [n for n in backends.BACKENDS if n in names]
    assert "cuda" not in names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the CUDA extension is not built here")
def test_cuda_extension_carries_hopper_code_without_spills():
    """sm_90 machine code (H100/H200) for every kernel of both .cu files, none using local memory (spills)."""
    from _util import cuobjdump, resource_usage

    module = backends.cuda_extension()
    if module is None:
        pytest.skip(f"the CUDA extension is not built: {backends.extension_status('_cuda')[1]}")
    cubins = cuobjdump("-lelf", module.__file__)
    for source in ("de_cuda", "merge_cuda"):
        assert f"{source}.sm_90.cubin" in cubins, cubins
    kernels = resource_usage(module.__file__)
    names = " ".join(name for name, _ in kernels)
    for kernel in ("de_group_kernel", "de_vec_kernel", "mask_group_kernel", "merge_kernel"):
        assert kernel in names, names
    assert all("reg" in usage and "local" in usage for _, usage in kernels), kernels
    assert [(n, usage["local"]) for n, usage in kernels if usage["local"] != 0] == []
