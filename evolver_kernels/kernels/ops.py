"""Public operators: argument checks and backend dispatch (docs/ARCHITECTURE.md §3).

Every backend implements the same contract; this module checks arguments once, with errors that name
the argument, and never copies or converts a tensor behind the caller's back.
"""

from __future__ import annotations

import math
import numbers

import torch

from evolver_kernels.kernels import backends, reference
from evolver_kernels.kernels.rng import UINT64_LIMIT, crossover_threshold

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
    def _de_fake(x, a, base, b, F, threshold, seed, stream, offset, out):
        return None

    @torch.library.register_fake("evolver_kernels::crossover_mask_")
    def _mask_fake(out, threshold, seed, stream, offset):
        return None

    @torch.library.register_fake("evolver_kernels::merge_")
    def _merge_fake(xs, base, fisher, weights, trim, top, elect_weights, scale, rescale, drop_threshold,
                    drop_thresholds, drop_rescales, band, has_top, ties, select, normalize, min_den, nearswap_t, seed,
                    stream, offset, out):
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


def _check_out_disjoint(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """out must not overlap these inputs at all (they are read with another element type)."""
    o_lo, o_hi = _span(out)
    for name, t in inputs.items():
        lo, hi = _span(t)
        if lo < o_hi and o_lo < hi:
            raise ValueError(f"out overlaps {name}")


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
    m_j = philox word of global index offset + j < floor(CR * 2**32) (docs/ARCHITECTURE.md §2).
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


MAX_MERGE_INPUTS = 64  # models per call (the CUDA kernel takes their addresses as launch parameters)


def _check_reals(name: str, values, n: int, *, minimum: float | None = None, bounds: bool = False) -> list[float]:
    """One number per model, finite in float32 and at least `minimum`; bounds: magnitude bounds instead,
    numbers >= 0 or +inf (no bound)."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"{name} must be a list of {n} numbers (one per model), got {values!r}")
    out = []
    for k, v in enumerate(values):
        v = _as_real(f"{name}[{k}]", v)
        if bounds:
            if math.isnan(v) or v < 0 or (math.isfinite(v) and v > _FP32_MAX):
                raise ValueError(f"{name}[{k}] must be >= 0 in float32 or inf, got {v}")
        elif not math.isfinite(v) or abs(v) > _FP32_MAX or (minimum is not None and v < minimum):
            bound = f" and at least {minimum}" if minimum is not None else ""
            raise ValueError(f"{name}[{k}] must be finite in float32{bound}, got {v}")
        out.append(v)
    return out


def merge_tensors(
    xs: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    base: torch.Tensor | None = None,
    fisher: list[torch.Tensor] | None = None,
    trim: list[float] | None = None,
    top: list[float] | None = None,
    elect: bool | None = None,
    elect_weights: list[float] | None = None,
    select: float | None = None,
    scale: float = 1.0,
    normalize: bool = True,
    min_den: float = 0.0,
    nearswap_t: float | None = None,
    drop_p: float = 0.0,
    drop_thresholds: list[torch.Tensor | None] | None = None,
    drop_rescales: list[float] | None = None,
    seed: int = 0,
    stream: int = 0,
    offset: int = 0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused merge of n models' tensors in one pass: each input read once (twice for TIES on a GPU, from
    cache), the output written once, no stacking and no mask tensors.

    xs: 1 to 64 tensors of one shape, dtype (float32, bfloat16, float16) and device, contiguous; base
    likewise (the common ancestor; tau_k = x_k - base). weights: one per model (default 1). fisher: one
    float32 tensor per model, elementwise weights (Fisher merging; not with TIES). trim: one magnitude per
    model, below which a task-vector element is zeroed; top: one magnitude per model, at or above which it is
    zeroed (breadcrumbs' outliers). elect: TIES' sign election and sum of the agreeing models (default: when
    trim is given); elect_weights: the weights the sign is elected with (default: `weights`; sce elects on
    the unweighted task vectors). select: keep an element (in every model) only where the variance of the task
    vectors over the models is at least this (sce). drop_p in [0, 1): DARE's drop probability, from the
    Philox contract with stream + k for model k and the element's global index offset + j (needs base).
    drop_thresholds (della; not with drop_p): per model None or an int64 tensor like x of per-element
    thresholds in [0, 2**32]: the element is dropped where its word is below, the survivors times
    drop_rescales[k] (default 1). normalize: divide by the summed weights (of the agreeing models, for
    TIES), or by min_den where they sum to less (min_den > 0; sce). nearswap_t: mergekit's nearswap of one
    model into `base` instead (w = clamp(t / max(|base - x|, 1e-6), 0, 1), out = w x + (1 - w) base; no
    other option). Exact formula: evolver_kernels.kernels.reference.merge_reference. `out` may be one of the inputs;
    returns `out` (a new tensor when None). Allocates nothing else, but for the triton backend's small
    per-call tables (addresses, weights, bounds).
    """
    if not isinstance(xs, (list, tuple)) or not 1 <= len(xs) <= MAX_MERGE_INPUTS:
        raise ValueError(f"xs must be a list of 1 to {MAX_MERGE_INPUTS} tensors, got "
                         f"{len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__}")
    xs = list(xs)
    n = len(xs)
    _check_tensor("xs[0]", xs[0], None)
    like = xs[0]
    for k in range(1, n):
        _check_tensor(f"xs[{k}]", xs[k], like)
    if base is not None:
        _check_tensor("base", base, like)
    weights = _check_reals("weights", [1.0] * n if weights is None else weights, n)
    if nearswap_t is not None:
        nearswap_t = _as_real("nearswap_t", nearswap_t)
        if not math.isfinite(nearswap_t) or abs(nearswap_t) > _FP32_MAX:
            raise ValueError(f"nearswap_t must be finite in float32, got {nearswap_t}")
        others = [name for name, given in (("weights", weights != [1.0] * n), ("fisher", fisher is not None),
                                           ("drop_thresholds", drop_thresholds is not None),
                                           ("trim", trim is not None), ("top", top is not None),
                                           ("elect", bool(elect)), ("select", select is not None),
                                           ("drop_p", drop_p != 0.0), ("scale", scale != 1.0)) if given]
        if n != 1 or base is None or others:
            raise ValueError("nearswap_t merges exactly one model into base and takes no other option"
                             + (f" (got {', '.join(others)})" if others else f" (got {n} models"
                                + (", no base)" if base is None else ")")))
    elect = trim is not None if elect is None else bool(elect)
    if fisher is not None:
        if elect:
            raise ValueError("fisher and TIES' election (trim, elect) cannot be combined (Fisher merging is a "
                             "weighted average)")
        if not isinstance(fisher, (list, tuple)) or len(fisher) != n:
            raise ValueError(f"fisher must be a list of {n} float32 tensors (one per model)")
        fisher = list(fisher)
        for k, f in enumerate(fisher):
            if not isinstance(f, torch.Tensor) or f.dtype != torch.float32:
                raise TypeError(f"fisher[{k}] must be a float32 tensor")
            if f.shape != like.shape or f.device != like.device or not f.is_contiguous():
                raise ValueError(f"fisher[{k}] must be contiguous, shaped {tuple(like.shape)} on {like.device}")
    if trim is not None:
        trim = _check_reals("trim", trim, n, bounds=True)
    if top is not None:
        top = _check_reals("top", top, n, bounds=True)
    if elect_weights is not None:
        if not elect:
            raise ValueError("elect_weights is the weights of TIES' sign election: give elect=True (or trim)")
        elect_weights = _check_reals("elect_weights", elect_weights, n)
    if select is not None:
        select = _as_real("select", select)
        if math.isnan(select) or select < 0:
            raise ValueError(f"select must be a variance >= 0 (inf: keep nothing), got {select}")
    min_den = _as_real("min_den", min_den)
    if not math.isfinite(min_den) or min_den < 0 or min_den > _FP32_MAX:
        raise ValueError(f"min_den must be finite and >= 0, got {min_den}")
    scale = _as_real("scale", scale)
    if not math.isfinite(scale) or abs(scale) > _FP32_MAX:
        raise ValueError(f"scale must be finite in float32, got {scale}")
    drop_p = _as_real("drop_p", drop_p)
    if not 0.0 <= drop_p < 1.0:
        raise ValueError(f"drop_p must be in [0, 1), got {drop_p}")
    if drop_p > 0 and base is None:
        raise ValueError("drop_p > 0 (DARE) drops task-vector elements: give base")
    if drop_thresholds is not None:
        if drop_p > 0:
            raise ValueError("drop_p and drop_thresholds cannot be combined (one drop per element)")
        if not isinstance(drop_thresholds, (list, tuple)) or len(drop_thresholds) != n:
            raise ValueError(f"drop_thresholds must be a list of {n} int64 tensors or None (one per model)")
        drop_thresholds = list(drop_thresholds)
        for k, t in enumerate(drop_thresholds):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"drop_thresholds[{k}] must be an int64 tensor or None")
            if t.numel() != like.numel() or t.device != like.device or not t.is_contiguous():
                raise ValueError(f"drop_thresholds[{k}] must be contiguous, {like.numel()} elements on {like.device}")
        drop_rescales = _check_reals("drop_rescales", [1.0] * n if drop_rescales is None else drop_rescales, n)
    elif drop_rescales is not None:
        raise ValueError("drop_rescales scales the survivors of drop_thresholds: give drop_thresholds")
    seed, stream, offset = _check_stream(seed, stream, offset, like.numel())
    if stream + n > INDEX_LIMIT:
        raise ValueError(f"stream + len(xs) must stay below 2**62, got {stream} + {n}")
    name = backends.resolve_backend(backend, like.device)
    if out is None:
        out = torch.empty_like(like)
    else:
        _check_tensor("out", out, like)
        inputs = {f"xs[{k}]": x for k, x in enumerate(xs)}
        if base is not None:
            inputs["base"] = base
        _check_out_aliasing(out, inputs)
        _check_out_disjoint(out, {f"fisher[{k}]": f for k, f in enumerate(fisher or [])})
    if name == "reference":
        return out.copy_(reference.merge_reference(
            xs, weights=weights, base=base, fisher=fisher, trim=trim, top=top, elect=elect,
            elect_weights=elect_weights, select=select, scale=scale, normalize=normalize, min_den=min_den,
            nearswap_t=nearswap_t, drop_p=drop_p, drop_thresholds=drop_thresholds, drop_rescales=drop_rescales,
            seed=seed, stream=stream, offset=offset))
    drop_threshold = crossover_threshold(drop_p) if drop_p > 0 else 0
    rescale = 1.0 / (1.0 - drop_p)
    if name == "triton" and nearswap_t is not None:
        backends.triton_kernels().nearswap(xs[0], base, out, nearswap_t)
        return out
    if name == "triton":
        backends.triton_kernels().merge(
            xs, base, fisher, weights, trim, top, (elect_weights or weights) if elect else None, select, out,
            scale=scale,
            normalize=bool(normalize), min_den=min_den, rescale=rescale, drop_threshold=drop_threshold,
            drop_thresholds=drop_thresholds, drop_rescales=drop_rescales, seed=seed, stream=stream, offset=offset)
        return out
    _register_fakes()
    torch.ops.evolver_kernels.merge_(
        xs, base, fisher or [], weights, trim if trim is not None else [0.0] * n, top if top is not None else [0.0] * n,
        elect_weights if elect_weights is not None else weights, scale, rescale, drop_threshold,
        drop_thresholds or [], drop_rescales or [1.0] * n,
        trim is not None or top is not None, top is not None, elect, select, bool(normalize), min_den, nearswap_t,
        _to_int64(seed), _to_int64(stream), offset, out)
    return out
