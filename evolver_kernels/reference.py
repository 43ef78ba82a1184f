"""Pure-PyTorch implementations: the contract-exact oracle and the naive baseline.

- `crossover_mask_reference` and `de_mutate_crossover_reference` follow shared/DESIGN.md sections 3-4
  exactly and are what every backend is tested against. They allocate freely (words, masks, fp32
  copies): correctness first, never the fast path.
- `naive_de_mutate_crossover` is what a user would write without this package (torch.rand mask,
  torch.where, temporaries). It does not follow the random-stream contract; benchmarks time it.
"""

from __future__ import annotations

import torch

from .rng import crossover_threshold, random_words

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
    mask = crossover_mask_reference(
        x.numel(), CR=CR, seed=seed, stream=stream, offset=offset, device=x.device
    ).view(x.shape)
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
