"""The Triton backend, one module per op family: de_kernels (mutation + crossover, the mask, Philox), merge_kernels (the fused
merge, nearswap); common holds what they share. evolver_kernels.kernels.backends imports this package lazily,
after TRITON_INTERPRET is decided."""

from evolver_kernels.kernels.triton.common import INTERPRETED
from evolver_kernels.kernels.triton.de_kernels import crossover_mask, de_mutate_crossover, philox_block
from evolver_kernels.kernels.triton.merge_kernels import merge, nearswap

__all__ = ["INTERPRETED", "crossover_mask", "de_mutate_crossover", "merge", "nearswap", "philox_block"]
