"""Argument checks shared by the operators (ops.py) and the fused merge's parameters (merge_params.py): every
error names the argument; nothing is copied or converted behind the caller's back."""

from __future__ import annotations

import math
import numbers

import torch

from evolver_kernels.kernels.rng import UINT64_LIMIT

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The compiled ops carry seed and stream as int64; global indices (offset + numel) stay below 2**62.
INT64_LIMIT = 1 << 63
INDEX_LIMIT = 1 << 62
FP32_MAX = torch.finfo(torch.float32).max


def as_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def as_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_F(F) -> float:
    """F as a float that is finite in fp32 (the kernels compute in fp32)."""
    F = as_real("F", F)
    if not math.isfinite(F) or abs(F) > FP32_MAX:
        raise ValueError(f"F must be finite in float32, got {F}")
    return F


def check_CR(CR) -> float:
    """CR as a float in [0, 1]."""
    CR = as_real("CR", CR)
    if not 0.0 <= CR <= 1.0:  # also rejects NaN
        raise ValueError(f"CR must be in [0, 1], got {CR}")
    return CR


def check_stream(seed, stream, offset, numel: int) -> tuple[int, int, int]:
    seed = as_int("seed", seed, 0, UINT64_LIMIT)
    stream = as_int("stream", stream, 0, UINT64_LIMIT)
    offset = as_int("offset", offset, 0, INDEX_LIMIT)
    if offset + numel >= INDEX_LIMIT:
        raise ValueError(f"offset + numel must stay below 2**62, got {offset} + {numel}")
    return seed, stream, offset


def check_tensor(name: str, t, like: torch.Tensor | None) -> None:
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


def check_out_aliasing(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """out may be exactly an input (elementwise, in place is safe) but must not partly overlap one."""
    o_lo, o_hi = _span(out)
    for name, t in inputs.items():
        lo, hi = _span(t)
        if lo < o_hi and o_lo < hi and lo != o_lo:
            raise ValueError(f"out partly overlaps {name}; it may be {name} itself or disjoint from it")


def check_out_disjoint(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """out must not overlap these inputs at all (they are read with another element type)."""
    o_lo, o_hi = _span(out)
    for name, t in inputs.items():
        lo, hi = _span(t)
        if lo < o_hi and o_lo < hi:
            raise ValueError(f"out overlaps {name}")


def to_int64(v: int) -> int:
    """A uint64 reinterpreted as int64 (the schema's int); the kernels read it back as uint64."""
    return v - UINT64_LIMIT if v >= INT64_LIMIT else v


MAX_MERGE_INPUTS = 64  # models per call (the CUDA kernel takes their addresses as launch parameters)


def check_reals(name: str, values, n: int, *, minimum: float | None = None, bounds: bool = False) -> list[float]:
    """One number per model, finite in float32 and at least `minimum`; bounds: magnitude bounds instead,
    numbers >= 0 or +inf (no bound)."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"{name} must be a list of {n} numbers (one per model), got {values!r}")
    out = []
    for k, v in enumerate(values):
        v = as_real(f"{name}[{k}]", v)
        if bounds:
            if math.isnan(v) or v < 0 or (math.isfinite(v) and v > FP32_MAX):
                raise ValueError(f"{name}[{k}] must be >= 0 in float32 or inf, got {v}")
        elif not math.isfinite(v) or abs(v) > FP32_MAX or (minimum is not None and v < minimum):
            bound = f" and at least {minimum}" if minimum is not None else ""
            raise ValueError(f"{name}[{k}] must be finite in float32{bound}, got {v}")
        out.append(v)
    return out
