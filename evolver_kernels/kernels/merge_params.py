"""The fused merge's arguments, defined once: the options of `merge_tensors` (the fields below, their defaults
and their checks), what the backends take beyond them (derived properties), and the compiled op's arguments by
their schema names (`op_arguments`: csrc/ops.cpp declares the schema, csrc/merge_params.h the C++ struct it fills;
torch refuses a call whose names differ from the schema's, and tests/kernels/test_merge_params.py compares them).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from evolver_kernels.kernels.checks import (
    FP32_MAX,
    INDEX_LIMIT,
    MAX_MERGE_INPUTS,
    as_real,
    check_reals,
    check_stream,
    check_tensor,
    to_int64,
)
from evolver_kernels.kernels.rng import crossover_threshold


@dataclasses.dataclass
class MergeParams:
    """One fused merge of n models' tensors, its arguments checked at construction (errors name the argument).

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
    other option). Exact formula: evolver_kernels.kernels.reference.merge_reference.
    """

    xs: list[torch.Tensor]
    weights: list[float] | None = None
    base: torch.Tensor | None = None
    fisher: list[torch.Tensor] | None = None
    trim: list[float] | None = None
    top: list[float] | None = None
    elect: bool | None = None
    elect_weights: list[float] | None = None
    select: float | None = None
    scale: float = 1.0
    normalize: bool = True
    min_den: float = 0.0
    nearswap_t: float | None = None
    drop_p: float = 0.0
    drop_thresholds: list[torch.Tensor | None] | None = None
    drop_rescales: list[float] | None = None
    seed: int = 0
    stream: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.xs, (list, tuple)) or not 1 <= len(self.xs) <= MAX_MERGE_INPUTS:
            raise ValueError(
                f"xs must be a list of 1 to {MAX_MERGE_INPUTS} tensors, got "
                f"{len(self.xs) if isinstance(self.xs, (list, tuple)) else type(self.xs).__name__}"
            )
        self.xs = list(self.xs)
        n = len(self.xs)
        check_tensor("xs[0]", self.xs[0], None)
        like = self.xs[0]
        for k in range(1, n):
            check_tensor(f"xs[{k}]", self.xs[k], like)
        if self.base is not None:
            check_tensor("base", self.base, like)
        self.weights = check_reals("weights", [1.0] * n if self.weights is None else self.weights, n)
        if self.nearswap_t is not None:
            self.nearswap_t = as_real("nearswap_t", self.nearswap_t)
            if not math.isfinite(self.nearswap_t) or abs(self.nearswap_t) > FP32_MAX:
                raise ValueError(f"nearswap_t must be finite in float32, got {self.nearswap_t}")
            others = [
                name
                for name, given in (
                    ("weights", self.weights != [1.0] * n),
                    ("fisher", self.fisher is not None),
                    ("drop_thresholds", self.drop_thresholds is not None),
                    ("trim", self.trim is not None),
                    ("top", self.top is not None),
                    ("elect", bool(self.elect)),
                    ("select", self.select is not None),
                    ("drop_p", self.drop_p != 0.0),
                    ("scale", self.scale != 1.0),
                )
                if given
            ]
            if n != 1 or self.base is None or others:
                raise ValueError(
                    "nearswap_t merges exactly one model into base and takes no other option"
                    + (
                        f" (got {', '.join(others)})"
                        if others
                        else f" (got {n} models" + (", no base)" if self.base is None else ")")
                    )
                )
        self.elect = self.trim is not None if self.elect is None else bool(self.elect)
        if self.fisher is not None:
            if self.elect:
                raise ValueError(
                    "fisher and TIES' election (trim, elect) cannot be combined (Fisher merging is a weighted average)"
                )
            if not isinstance(self.fisher, (list, tuple)) or len(self.fisher) != n:
                raise ValueError(f"fisher must be a list of {n} float32 tensors (one per model)")
            self.fisher = list(self.fisher)
            for k, f in enumerate(self.fisher):
                if not isinstance(f, torch.Tensor) or f.dtype != torch.float32:
                    raise TypeError(f"fisher[{k}] must be a float32 tensor")
                if f.shape != like.shape or f.device != like.device or not f.is_contiguous():
                    raise ValueError(f"fisher[{k}] must be contiguous, shaped {tuple(like.shape)} on {like.device}")
        if self.trim is not None:
            self.trim = check_reals("trim", self.trim, n, bounds=True)
        if self.top is not None:
            self.top = check_reals("top", self.top, n, bounds=True)
        if self.elect_weights is not None:
            if not self.elect:
                raise ValueError("elect_weights is the weights of TIES' sign election: give elect=True (or trim)")
            self.elect_weights = check_reals("elect_weights", self.elect_weights, n)
        if self.select is not None:
            self.select = as_real("select", self.select)
            if math.isnan(self.select) or self.select < 0:
                raise ValueError(f"select must be a variance >= 0 (inf: keep nothing), got {self.select}")
        self.min_den = as_real("min_den", self.min_den)
        if not math.isfinite(self.min_den) or self.min_den < 0 or self.min_den > FP32_MAX:
            raise ValueError(f"min_den must be finite and >= 0, got {self.min_den}")
        self.scale = as_real("scale", self.scale)
        if not math.isfinite(self.scale) or abs(self.scale) > FP32_MAX:
            raise ValueError(f"scale must be finite in float32, got {self.scale}")
        self.drop_p = as_real("drop_p", self.drop_p)
        if not 0.0 <= self.drop_p < 1.0:
            raise ValueError(f"drop_p must be in [0, 1), got {self.drop_p}")
        if self.drop_p > 0 and self.base is None:
            raise ValueError("drop_p > 0 (DARE) drops task-vector elements: give base")
        if self.drop_thresholds is not None:
            if self.drop_p > 0:
                raise ValueError("drop_p and drop_thresholds cannot be combined (one drop per element)")
            if not isinstance(self.drop_thresholds, (list, tuple)) or len(self.drop_thresholds) != n:
                raise ValueError(f"drop_thresholds must be a list of {n} int64 tensors or None (one per model)")
            self.drop_thresholds = list(self.drop_thresholds)
            for k, t in enumerate(self.drop_thresholds):
                if t is None:
                    continue
                if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                    raise TypeError(f"drop_thresholds[{k}] must be an int64 tensor or None")
                if t.numel() != like.numel() or t.device != like.device or not t.is_contiguous():
                    raise ValueError(
                        f"drop_thresholds[{k}] must be contiguous, {like.numel()} elements on {like.device}"
                    )
            self.drop_rescales = check_reals(
                "drop_rescales", [1.0] * n if self.drop_rescales is None else self.drop_rescales, n
            )
        elif self.drop_rescales is not None:
            raise ValueError("drop_rescales scales the survivors of drop_thresholds: give drop_thresholds")
        self.seed, self.stream, self.offset = check_stream(self.seed, self.stream, self.offset, like.numel())
        if self.stream + n > INDEX_LIMIT:
            raise ValueError(f"stream + len(xs) must stay below 2**62, got {self.stream} + {n}")

    # -- what the backends take beyond the options --------------------------------------------------------
    @property
    def band(self) -> bool:
        """A per-model magnitude band applies (trim, top)."""
        return self.trim is not None or self.top is not None

    @property
    def drop_threshold(self) -> int:
        """DARE: an element of model k is dropped where its word is below this (0: no drop)."""
        return crossover_threshold(self.drop_p) if self.drop_p > 0 else 0

    @property
    def rescale(self) -> float:
        """DARE: the survivors' factor, 1 / (1 - drop_p)."""
        return 1.0 / (1.0 - self.drop_p)

    @property
    def election_weights(self) -> list[float] | None:
        """The weights TIES elects the sign with; None without an election."""
        return (self.elect_weights or self.weights) if self.elect else None

    def options(self) -> dict:
        """The options (every field but xs), as the reference takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "xs"}

    def op_arguments(self, out: torch.Tensor) -> dict:
        """The compiled op's arguments by the names of its schema (csrc/ops.cpp)."""
        n = len(self.xs)
        return dict(
            xs=self.xs,
            base=self.base,
            fisher=self.fisher or [],
            weights=self.weights,
            trim=self.trim if self.trim is not None else [0.0] * n,
            top=self.top if self.top is not None else [0.0] * n,
            elect_weights=self.elect_weights if self.elect_weights is not None else self.weights,
            scale=self.scale,
            rescale=self.rescale,
            drop_threshold=self.drop_threshold,
            drop_thresholds=self.drop_thresholds or [],
            drop_rescales=self.drop_rescales or [1.0] * n,
            band=self.band,
            has_top=self.top is not None,
            ties=self.elect,
            select=self.select,
            normalize=bool(self.normalize),
            min_den=self.min_den,
            nearswap_t=self.nearswap_t,
            seed=to_int64(self.seed),
            stream=to_int64(self.stream),
            offset=self.offset,
            out=out,
        )
