"""evolver-kernels: fuse fine-tuned models into one by evolving their weights (Evolver), with fused kernels.

Public operators (docs/ARCHITECTURE.md §3): de_mutate_crossover, crossover_mask, available_backends;
merge_tensors (the fused merge behind evolver_kernels.methods.merger).
"""

from evolver_kernels.kernels.backends import BackendUnavailableError
from evolver_kernels.kernels.ops import available_backends, crossover_mask, de_mutate_crossover, merge_tensors

__all__ = ["BackendUnavailableError", "available_backends", "crossover_mask", "de_mutate_crossover", "merge_tensors"]
__version__ = "0.1.0"
