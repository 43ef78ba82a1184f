"""Public operators: argument checks and backend dispatch (shared/DESIGN.md section 4).

Every backend implements the same contract; this module checks arguments once, with errors that name
the argument, and never copies or converts a tensor behind the caller's back.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import backends, reference
from .rng import UINT64_LIMIT, crossover_threshold

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The compiled ops carry seed and stream as int64; global indices (offset + numel) stay below 2**62.
INT64_LIMIT = 1 << 63
INDEX_LIMIT = 1 << 62
_FP32_MAX = torch.finfo(torch.float32).max

_fake_registered = False


def _register_fakes() -> None:
    """Fake (meta) implementations so torch.compile / FakeTensor tracing can see through the ops."""
    global _fake_registered
    if _fake_registered or backends.cpu_extension() is None:
        return
    _fake_registered = True

    @torch.library.register_fake("evolver_kernels::de_mutate_crossover_")
    def _de_fake(x, a, base, b, F, threshold, seed, stream, offset, out):  # noqa: ARG001
        return None

    @torch.library.register_fake("evolver_kernels::crossover_mask_")
    def _mask_fake(out, threshold, seed, stream, offset):  # noqa: ARG001
        return None


def _as_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def _as_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_F(F) -> float:
    """F as a float that is finite in fp32 (the kernels compute in fp32)."""
    F = _as_real("F", F)
    if not math.isfinite(F) or abs(F) > _FP32_MAX:
        raise ValueError(f"F must be finite in float32, got {F}")
    return F


def check_CR(CR) -> float:
    """CR as a float in [0, 1]."""
    CR = _as_real("CR", CR)
    if not 0.0 <= CR <= 1.0:  # also rejects NaN
        raise ValueError(f"CR must be in [0, 1], got {CR}")
    return CR


def _check_stream(seed, stream, offset, numel: int) -> tuple[int, int, int]:
    seed = _as_int("seed", seed, 0, UINT64_LIMIT)
    stream = _as_int("stream", stream, 0, UINT64_LIMIT)
    offset = _as_int("offset", offset, 0, INDEX_LIMIT)
    if offset + numel >= INDEX_LIMIT:
        raise ValueError(f"offset + numel must stay below 2**62, got {offset} + {numel}")
    return seed, stream, offset


def _check_tensor(name: str, t, like: torch.Tensor | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {like.dtype}")
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but x is on {like.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first; the op never copies silently)")


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_out_aliasing(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """out may be exactly an input (elementwise, in place is safe) but must not partly overlap one."""
    o_lo, o_hi = _span(out)
    for name, t in inputs.items():
        lo, hi = _span(t)
        if lo < o_hi and o_lo < hi and lo != o_lo:
            raise ValueError(f"out partly overlaps {name}; it may be {name} itself or disjoint from it")


def de_mutate_crossover(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    F: float,
    CR: float,
    seed: int,
    stream: int = 0,
    offset: int = 0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused DE mutation and binomial crossover: u_j = base_j + F * (a_j - b_j) where m_j, else x_j.

    x, base, a, b (and out): same shape, dtype (float32, bfloat16, float16) and device, contiguous.
    m_j = philox word of global index offset + j < floor(CR * 2**32) (shared/DESIGN.md section 3).
    Arithmetic in fp32, one rounding; unselected elements are x's bits. `out` may be x (in place);
    passing the same tensor object as x, base and b (the evolver strategy) reads two tensors, not four.
    Returns `out` (a new tensor when None). No other allocation on the cpu, triton and cuda backends.
    """
    _check_tensor("x", x, None)
    for name, t in (("base", base), ("a", a), ("b", b)):
        _check_tensor(name, t, x)
    if out is not None:
        _check_tensor("out", out, x)
    F = check_F(F)
    CR = check_CR(CR)
    seed, stream, offset = _check_stream(seed, stream, offset, x.numel())
    name = backends.resolve_backend(backend, x.device)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out_aliasing(out, {"x": x, "base": base, "a": a, "b": b})
    threshold = crossover_threshold(CR)

    if name == "reference":
        return reference.de_mutate_crossover_reference(
            x, base, a, b, F=F, CR=CR, seed=seed, stream=stream, offset=offset, out=out
        )
    evolver_inputs = base.data_ptr() == x.data_ptr() and b.data_ptr() == x.data_ptr()
    opt_base = None if evolver_inputs else base
    opt_b = None if evolver_inputs else b
    if name == "triton":
        backends.triton_kernels().de_mutate_crossover(
            x, a, opt_base, opt_b, out, F=F, threshold=threshold, seed=seed, stream=stream, offset=offset
        )
        return out
    _register_fakes()
    torch.ops.evolver_kernels.de_mutate_crossover_(
        x, a, opt_base, opt_b, F, threshold, _to_int64(seed), _to_int64(stream), offset, out
    )
    return out


def crossover_mask(
    numel: int,
    *,
    CR: float,
    seed: int,
    stream: int = 0,
    offset: int = 0,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Bool [numel]: the crossover mask of elements offset .. offset + numel - 1. For tests and debugging:
    the operators never materialise it."""
    numel = _as_int("numel", numel, 0, INDEX_LIMIT)
    CR = check_CR(CR)
    seed, stream, offset = _check_stream(seed, stream, offset, numel)
    device = torch.device(device)
    name = backends.resolve_backend(backend, device)
    if name == "reference":
        return reference.crossover_mask_reference(numel, CR=CR, seed=seed, stream=stream, offset=offset, device=device)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    threshold = crossover_threshold(CR)
    if name == "triton":
        backends.triton_kernels().crossover_mask(out, threshold=threshold, seed=seed, stream=stream, offset=offset)
        return out
    _register_fakes()
    torch.ops.evolver_kernels.crossover_mask_(out, threshold, _to_int64(seed), _to_int64(stream), offset)
    return out


def available_backends(device: torch.device | str) -> list[str]:
    """Subset of ["reference", "cpu", "triton", "cuda"] that can run on `device`."""
    return backends.available_backends(device)


def _to_int64(v: int) -> int:
    """A uint64 reinterpreted as int64 (the schema's int); the kernels read it back as uint64."""
    return v - UINT64_LIMIT if v >= INT64_LIMIT else v
