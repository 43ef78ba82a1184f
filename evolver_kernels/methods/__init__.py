"""Merge methods: the registry (registry.py) and one module per family, each registering its methods when
imported. Importing this package registers the built-in ones."""

# isort: off
# registration order is the order of --help, error messages and the README table
from evolver_kernels.methods import (  # noqa: F401 - registers the built-in methods
    linear,
    task_vectors,
    statistics,
    spherical,
    model_stock,
    sparsify,
    nearswap,
    ram,
    arcee_fusion,
)

# isort: on
from evolver_kernels.methods.registry import (
    METHODS,
    WEIGHT,
    MergeContext,
    MergeMethod,
    Param,
    Statistics,
    all_params,
    get,
    markdown_table,
    names,
    register,
    unregister,
)
from evolver_kernels.methods.streaming import base_chunk

__all__ = [
    "METHODS",
    "WEIGHT",
    "MergeContext",
    "MergeMethod",
    "Param",
    "Statistics",
    "all_params",
    "base_chunk",
    "get",
    "markdown_table",
    "names",
    "register",
    "unregister",
]
