"""Every bad input raises a clear error that names the argument; nothing is silently copied or converted."""

import pytest
import torch

import evolver_kernels as ek
from evolver_kernels import BackendUnavailableError


def _tensors(n=16, dtype=torch.float32):
    return [torch.randn(n).to(dtype) for _ in range(4)]


def _call(x, base, a, b, **kw):
    kw = {"F": 0.5, "CR": 0.5, "seed": 1, **kw}
    return ek.de_mutate_crossover(x, base, a, b, **kw)


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("slot", ["base", "a", "b"])
def test_shape_mismatch_names_the_argument(backend, slot):
    x, base, a, b = _tensors()
    args = {"base": base, "a": a, "b": b}
    args[slot] = torch.randn(17)
    with pytest.raises(ValueError, match=rf"{slot} has shape \(17,\) but x has \(16,\)"):
        _call(x, args["base"], args["a"], args["b"], backend=backend)


@pytest.mark.parametrize("slot", ["base", "a", "b", "out"])
def test_dtype_mismatch_names_the_argument(slot):
    x, base, a, b = _tensors()
    args = {"base": base, "a": a, "b": b, "out": None}
    args[slot] = torch.randn(16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=rf"{slot} has dtype torch.bfloat16 but x has torch.float32"):
        _call(x, args["base"], args["a"], args["b"], out=args["out"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool])
def test_unsupported_dtype(dtype):
    x = torch.zeros(8, dtype=dtype)
    with pytest.raises(TypeError, match="x has dtype .* supported: float32, bfloat16, float16"):
        _call(x, x, x, x)


def test_device_mismatch_names_the_argument():
    x, base, a, b = _tensors()
    with pytest.raises(ValueError, match="a is on meta but x is on cpu"):
        _call(x, base, a.to("meta"), b)


@pytest.mark.parametrize("slot", ["x", "base", "a", "b", "out"])
def test_non_contiguous_is_refused_not_copied(slot):
    tensors = dict(
        zip(
            ["x", "base", "a", "b"],
            [torch.randn(8, 4).t() if s == slot else torch.randn(4, 8) for s in ["x", "base", "a", "b"]],
        )
    )
    out = torch.randn(8, 4).t() if slot == "out" else None
    with pytest.raises(ValueError, match=f"{slot} must be contiguous"):
        _call(tensors["x"], tensors["base"], tensors["a"], tensors["b"], out=out)


def test_non_tensor_argument():
    x, base, a, b = _tensors()
    with pytest.raises(TypeError, match="a must be a torch.Tensor, got list"):
        _call(x, base, [1.0] * 16, b)


@pytest.mark.parametrize("CR", [-0.1, 1.5, float("nan"), float("inf")])
def test_cr_outside_unit_interval(CR):
    x, base, a, b = _tensors()
    with pytest.raises(ValueError, match="CR must be in \\[0, 1\\]"):
        _call(x, base, a, b, CR=CR)
    with pytest.raises(ValueError, match="CR must be in \\[0, 1\\]"):
        ek.crossover_mask(8, CR=CR, seed=0)


@pytest.mark.parametrize("F", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_non_finite_F(F):
    x, base, a, b = _tensors()
    with pytest.raises(ValueError, match="F must be finite in float32"):
        _call(x, base, a, b, F=F)


@pytest.mark.parametrize(
    "name,value,exc",
    [
        ("F", "0.5", TypeError),
        ("CR", None, TypeError),
        ("seed", 1.5, TypeError),
        ("seed", -1, ValueError),
        ("seed", 2**64, ValueError),
        ("stream", -3, ValueError),
        ("offset", -1, ValueError),
        ("offset", 2**62, ValueError),
        ("seed", True, TypeError),
    ],
)
def test_bad_scalars_name_the_argument(name, value, exc):
    x, base, a, b = _tensors()
    with pytest.raises(exc, match=name):
        _call(x, base, a, b, **{name: value})


def test_unknown_backend():
    x, base, a, b = _tensors()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        _call(x, base, a, b, backend="fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        _call(x, base, a, b, backend=3)


def test_unavailable_backend_says_why():
    x, base, a, b = _tensors()
    with pytest.raises(
        BackendUnavailableError, match="backend 'cuda' is unavailable on cpu: the cuda backend runs on CUDA tensors"
    ):
        _call(x, base, a, b, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="unavailable on cpu"):
        ek.crossover_mask(8, CR=0.5, seed=0, backend="cuda")


def test_partly_overlapping_out_is_refused():
    buf = torch.randn(20)
    x, a = buf[:16], torch.randn(16)
    with pytest.raises(ValueError, match="out partly overlaps x"):
        _call(x, x, a, x, out=buf[2:18])


def test_cpp_ops_check_their_arguments_too():
    """Direct torch.ops calls bypass ops.py; the C++ layer still refuses what the kernels cannot handle."""
    x = torch.randn(8)
    with pytest.raises(RuntimeError, match="a has 4 elements, x has 8"):
        torch.ops.evolver_kernels.de_mutate_crossover_(x, torch.randn(4), None, None, 0.5, 2**31, 0, 0, 0, x)
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.evolver_kernels.crossover_mask_(torch.empty(4, dtype=torch.bool), 2**32 + 1, 0, 0, 0)
