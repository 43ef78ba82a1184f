"""Pure-PyTorch implementations: the contract-exact oracle and the naive baseline.

- `crossover_mask_reference` and `de_mutate_crossover_reference` follow docs/ARCHITECTURE.md §2-§3
  exactly and are what every backend is tested against. They allocate freely (words, masks, fp32
  copies): correctness first, never the fast path.
- `naive_de_mutate_crossover` is what a user would write without this package (torch.rand mask,
  torch.where, temporaries). It does not follow the random-stream contract; benchmarks time it.
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels.rng import crossover_threshold, random_words

_BITS_DTYPE = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def crossover_mask_reference(
    numel: int, *, CR: float, seed: int, stream: int = 0, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool [numel]: element offset + k is selected when its Philox word < floor(CR * 2**32)."""
    return random_words(numel, seed=seed, stream=stream, offset=offset, device=device) < crossover_threshold(CR)


def de_mutate_crossover_reference(
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
) -> torch.Tensor:
    """u = where(mask, base + F * (a - b), x), in fp32 with one rounding to x.dtype.

    Unselected elements are copied bit for bit (the select runs on integer views, so NaN payloads
    and -0.0 survive). Returns a new tensor, or writes into `out` when given.
    """
    mask = crossover_mask_reference(x.numel(), CR=CR, seed=seed, stream=stream, offset=offset, device=x.device).view(
        x.shape
    )
    f32 = torch.tensor(F, dtype=torch.float32, device=x.device)  # F rounded to fp32 once, as the kernels do
    mutant = (base.float() + f32 * (a.float() - b.float())).to(x.dtype)
    bits = _BITS_DTYPE[x.dtype]
    result = torch.where(mask, mutant.view(bits), x.view(bits)).view(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def naive_de_mutate_crossover(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    F: float,
    CR: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The baseline a user writes: a full-size torch.rand mask, temporaries, torch.where."""
    mask = torch.rand(x.shape, device=x.device, generator=generator) < CR
    return torch.where(mask, base + F * (a - b), x)


def merge_reference(
    xs: list[torch.Tensor],
    *,
    weights: list[float],
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
) -> torch.Tensor:
    """The fused merge's contract (evolver_kernels.merge_tensors), element by element in fp32, every
    operation rounded on its own (no fused multiply-add), models in slot order k = 0 .. n - 1:

      v_k = x_k - base                      (x_k when there is no base)
      DARE (drop_p > 0): v_k = 0 where the Philox word of (seed, stream + k, offset + j) < floor(drop_p * 2**32),
                         else v_k * fp32(1 / (1 - drop_p))
      per-element drops (drop_thresholds[k] given, della): v_k = 0 where the word < drop_thresholds[k][j]
                         (int64 in [0, 2**32]), else v_k * fp32(drop_rescales[k]) (default 1)
      band (trim or top given): v_k = 0 where |v_k| < trim_k, or (top given) where |v_k| >= top_k
      select (given): m = (sum_k v_k) / n,  var = (sum_k (v_k - m) * (v_k - m)) / n  (variance_reference);
                      every v_k = 0 where var < select
      c_k = w_k (w_k * fisher_k with Fisher weights),  d_k = c_k * v_k
      linear: y = sum_k d_k,  den = sum_k c_k
      TIES (elect; by default when trim is given):
              e_k = ew_k * v_k (ew: elect_weights, default the weights);  s = sum_k e_k
              agree_k = e_k > 0 if s >= 0 else e_k < 0
              y = sum of the agreeing d_k,  den = sum of the agreeing w_k
      normalize: y = y / den, 0 where den == 0 (min_den > 0: y / den', den' = min_den where den < min_den)
      out = base + scale * y                (scale * y without a base), rounded once to x's dtype
      nearswap (nearswap_t given; one model x, a base, nothing else):
              w = clamp(t / max(|base - x|, fp32(1e-6)), 0, 1);  out = w * x + (1 - w) * base

    Returns a new tensor shaped like xs[0].
    """
    f32 = torch.float32
    device = xs[0].device
    if nearswap_t is not None:
        return nearswap_reference(xs[0], base, nearswap_t)
    elect = trim is not None if elect is None else elect
    ew = weights if elect_weights is None else elect_weights
    b = base.float() if base is not None else None
    w = [torch.tensor(v, dtype=f32, device=device) for v in weights]
    rescale = torch.tensor(1.0 / (1.0 - drop_p), dtype=f32, device=device) if drop_p > 0 else None
    vs = []
    for k, x in enumerate(xs):
        v = x.float()
        if b is not None:
            v = v - b
        if drop_p > 0:
            dropped = crossover_mask_reference(
                x.numel(), CR=drop_p, seed=seed, stream=stream + k, offset=offset, device=device
            ).view(x.shape)
            v = torch.where(dropped, torch.zeros((), dtype=f32, device=device), v * rescale)
        if drop_thresholds is not None and drop_thresholds[k] is not None:
            words = random_words(x.numel(), seed=seed, stream=stream + k, offset=offset, device=device)
            dropped = (words < drop_thresholds[k].reshape(-1)).view(x.shape)
            factor = torch.tensor(1.0 if drop_rescales is None else drop_rescales[k], dtype=f32, device=device)
            v = torch.where(dropped, torch.zeros((), dtype=f32, device=device), v * factor)
        if trim is not None or top is not None:
            a = v.abs()
            cut = torch.zeros(x.shape, dtype=torch.bool, device=device)
            if trim is not None:
                cut = cut | (a < torch.tensor(trim[k], dtype=f32, device=device))
            if top is not None:
                cut = cut | (a >= torch.tensor(top[k], dtype=f32, device=device))
            v = torch.where(cut, 0.0, v)
        vs.append(v)
    if select is not None:
        keep = variance_reference(vs) >= torch.tensor(select, dtype=f32, device=device)
        vs = [torch.where(keep, v, 0.0) for v in vs]
    ds, cs = [], []
    for k, v in enumerate(vs):
        c = w[k] * fisher[k].view(v.shape) if fisher is not None else w[k].expand(v.shape)
        ds.append(c * v)
        cs.append(c)
    zero = torch.zeros(xs[0].shape, dtype=f32, device=device)
    y, den = zero.clone(), zero.clone()
    if not elect:
        for d, c in zip(ds, cs):
            y = y + d
            den = den + c
    else:
        es = [torch.tensor(ew[k], dtype=f32, device=device) * v for k, v in enumerate(vs)]
        s = zero.clone()
        for e in es:
            s = s + e
        positive = s >= 0
        for k, (e, d) in enumerate(zip(es, ds)):
            agree = torch.where(positive, e > 0, e < 0)
            y = torch.where(agree, y + d, y)
            den = torch.where(agree, den + w[k], den)
    if normalize:
        if min_den > 0:
            floor = torch.tensor(min_den, dtype=f32, device=device)
            y = y / torch.where(den < floor, floor, den)
        else:
            nonzero = den != 0
            y = torch.where(nonzero, y / torch.where(nonzero, den, 1.0), 0.0)
    scale32 = torch.tensor(scale, dtype=f32, device=device)
    r = b + scale32 * y if b is not None else scale32 * y
    return r.to(xs[0].dtype)


NEARSWAP_DIFF_MIN = 1e-6  # mergekit's clamp of |base - x|


def nearswap_reference(x: torch.Tensor, base: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap of x into base (mergekit's expression, in fp32, rounded once to x's dtype)."""
    f32 = torch.float32
    xf, bf = x.float(), base.float()
    floor = torch.tensor(NEARSWAP_DIFF_MIN, dtype=f32, device=x.device)
    diff = (bf - xf).abs()
    w = torch.tensor(t, dtype=f32, device=x.device) / torch.where(diff < floor, floor, diff)
    w = torch.where(w < 0, 0.0, torch.where(w > 1, 1.0, w))
    return (w * xf + (1 - w) * bf).to(x.dtype)


def variance_reference(vs: list[torch.Tensor]) -> torch.Tensor:
    """The population variance over the models of fp32 tensors `vs`, as the fused merge's selection computes it:
    m = (sum_k v_k) / n, then (sum_k (v_k - m) * (v_k - m)) / n, sums in slot order, each operation rounded."""
    n = torch.tensor(float(len(vs)), dtype=torch.float32, device=vs[0].device)
    s = vs[0]
    for v in vs[1:]:
        s = s + v
    m = s / n
    q = None
    for v in vs:
        t = v - m
        q = t * t if q is None else q + t * t
    return q / n


def naive_merge(
    xs: list[torch.Tensor],
    *,
    weights: list[float],
    base: torch.Tensor | None = None,
    density: float | None = None,
    drop_p: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """What merging tools do (mergekit's generalized task arithmetic, peft's merge_utils): stack the task
    vectors, a full-size torch.bernoulli mask for DARE, top-k by sorting for TIES. For benchmarks."""
    stacked = torch.stack(xs)
    if base is not None:
        stacked = stacked - base
    if drop_p > 0:
        stacked = stacked * torch.bernoulli(torch.full_like(stacked, 1.0 - drop_p)) / (1.0 - drop_p)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * xs[0].dim())
    if density is not None:
        flat = stacked.abs().flatten(1)
        k = max(1, int(density * flat.shape[1]))
        keep = torch.zeros_like(flat).scatter_(1, flat.topk(k, dim=1).indices, 1.0).view_as(stacked)
        stacked = stacked * keep * w
        sign = (stacked.sum(0) >= 0).to(stacked.dtype) * 2 - 1
        agree = stacked.sign() == sign
        merged = (stacked * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-8)
    else:
        merged = (stacked * w).sum(0) / (w.sum() if base is None else 1.0)
    return merged * scale + base if base is not None else merged
