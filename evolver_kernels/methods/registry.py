"""The merge-method registry: one record per method, from which everything else is derived.

A record (MergeMethod) holds the method's name, whether it needs a base model, the statistics it estimates on
development data (if any), its parameters (Param: type, default, range, help, whether a model may carry its own
value) and the function that merges. From these records come: `evolve`'s `--merge-method` choices and its
`--merge-<param>` flags and `merge_<param>` YAML keys, the merge CLI's `--method` choices, `--<param>` flags and
mergekit-style `parameters:` keys, every range check, the memory plan's statistics bytes, `--extra-individuals`'
choices, and the method table in the README (tests/test_registries.py checks that table against this).

Adding a method is one module that calls `register(MergeMethod(...))` when imported; the built-in ones are
imported by evolver_kernels/methods/__init__.py. A merge function has the signature
`merge(pop, out, ctx) -> out`: `pop` any Population-like reader (evolver_kernels.storage.population), `out` the Arena to
fill, `ctx` a MergeContext; the base model `ctx.base` is read with `base_chunk(ctx.base, group, lo, hi, device)`
(evolver_kernels.methods: an Arena in `evolve`, the base's own memory-mapped files in the merge CLI).
Functions stream chunk by chunk (docs/ARCHITECTURE.md §5): never a stack of the N models, never a mask tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from evolver_kernels.errors import UserError


def boolean(value: Any) -> bool:
    """A flag's or YAML value as a bool: a bool, 0 / 1, or true / false / yes / no / on / off (any case).
    It is the `type` of boolean Params, so argparse parses `--<param> false` with it as well."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value.strip().lower()]
    raise ValueError(f"not a boolean: {value!r}")


_BOOLEAN_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


@dataclasses.dataclass(frozen=True)
class Param:
    """A method parameter. `low` / `high` bound it (open bounds when low_open / high_open); per_model: a merge
    may take one value per model (mergekit's per-model `parameters:`); aliases: other YAML names for it. A
    default of None means each method's own (the help says which), and None then reads as unset."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    per_model: bool = False
    aliases: tuple[str, ...] = ()
    # the interval `evolve --search recipe` explores (CMA-ES's bounds), inside the range; None: not searched
    search: tuple[float, float] | None = None

    def range_text(self) -> str:
        if self.type is boolean:
            return "true or false"
        if self.low is None and self.high is None:
            return "any finite number" if self.type is float else "any integer"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any, where: str) -> Any:
        """`value` converted to the parameter's type and checked against its range; `where` names it in errors
        (a flag, a YAML key). A per-model parameter may be a list of values."""
        if value is None and self.default is None:  # unset: the method's own default (normalize)
            return None
        if self.per_model and isinstance(value, (list, tuple)):
            if not value:
                raise UserError(f"{where} is an empty list")
            return [self.check(v, where) for v in value]
        if self.type is boolean:
            try:
                return boolean(value)
            except ValueError:
                raise UserError(f"{where} must be true or false, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where} must be {'an integer' if self.type is int else 'a number'}, got {value!r}")
        try:
            value = self.type(value)
        except ValueError:
            raise UserError(
                f"{where} must be {'an integer' if self.type is int else 'a number'}, got {value!r}"
            ) from None
        ok = not (isinstance(value, float) and not math.isfinite(value))
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            bounded = self.low is not None or self.high is not None
            raise UserError(f"{where} must be {'in ' if bounded else ''}{self.range_text()}, got {value}")
        return value


# a merge's per-model weight (merge's --weights, mergekit's per-model `weight`); not a method parameter, but
# searched by `evolve --search recipe` for every method that takes weights (uses_weights)
WEIGHT = Param("weight", float, 1.0, "the model's weight in the merge", per_model=True, search=(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What a method estimates on development data before it can merge (once per individual, kept with an
    evolve run's checkpoint). estimate(model, layout, load, n, evaluator, settings, progress) -> stats, where
    load(k) puts individual k into `model`; save(stats, path) and load_file(layout, n, path, settings) -> stats
    round-trip it; host_bytes(model, layout, n) is its memory for the plan. A stats object has changed(i), called
    when individual i is replaced (an offspring keeps its slot's statistics)."""

    estimate: Callable[..., Any]
    save: Callable[[Any, str], None]
    load_file: Callable[..., Any]
    host_bytes: Callable[..., int]


@dataclasses.dataclass
class MergeContext:
    """Everything a merge function gets besides the population and the output arena."""

    settings: dict[str, Any]  # every parameter of the method, checked (per-model ones: a value or a list)
    base: Any = None  # the base model (streaming.Base: an Arena or a reader of its files), for methods with needs_base
    weights: list[float] | None = None  # one per model, None: 1 each
    seed: int = 0  # for methods that draw random numbers (Philox, docs/ARCHITECTURE.md §2)
    backend: str | None = None
    chunk: int = 1 << 22
    stats: Any = None  # the Statistics' estimate, for methods that have one


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str  # one line for the README table and --help
    merge: Callable[[Any, Any, MergeContext], Any]
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    statistics: Statistics | None = None
    aliases: tuple[str, ...] = ()  # other names (mergekit's)
    describe: Callable[[dict], str] | None = None  # a phrase for outputs; default: name and settings
    optional_base: bool = False  # uses a base model when one is given (merges x_k - base), else the x_k
    max_models: int | None = None  # the most models it merges (slerp, nuslerp: exactly 2)
    min_models: int = 2  # the fewest (passthrough: 1, it copies its model)
    # the result is its one model unchanged (passthrough): a merge whose models are re-laid out (mergekit's
    # slices) fills its output from the checkpoints directly, with no population in between
    copies: bool = False
    uses_weights: bool = True  # takes one weight per model (merge's --weights, mergekit's per-model weight)
    # why `evolve --merge-method` cannot use it (None: it can). A population merge takes every individual of a
    # population view and must be recomputable chunk by chunk from it, with one meaning for any N.
    evolve_refusal: str | None = None
    # how mergekit's `base_model:` reads for this method: "base" (the common ancestor; a `models:` entry equal
    # to it is the base, not one more model), "first" (the first of the merged models: slerp), "input" (one more
    # model merged, appended unless listed: mergekit adds it to the inputs of a method that gives the base no
    # role, e.g. karcher); None: "base" for a method that takes a base, else "input" (yaml_base_role)
    yaml_base: str | None = None
    # a per-model weight may be negative (task negation: base + sum_k w_k tau_k, as mergekit's task_arithmetic);
    # only where nothing divides by the sum of the weights, which a negative one can make zero: the method's
    # normalize must default to false, and a merge that sets it true is refused
    signed_weights: bool = False
    # its merge writes `out` only through Arena.view, chunks and segments, never through out.buffers: the merge
    # command may then hand it an arena of the output's own files (io/mapped_output.py), each tensor a view of
    # its bytes there, instead of a scratch copy written out afterwards. False (the default, a plug-in's): the
    # scratch copy, whose buffers are whole groups
    writes_views: bool = False

    @property
    def yaml_base_role(self) -> str:
        """How mergekit's `base_model:` reads for this method (yaml_base, or its default)."""
        if self.yaml_base is not None:
            return self.yaml_base
        return "base" if self.needs_base or self.optional_base else "input"

    def check_use(self, n_models: int | None, weights: list[float] | None, base: Any, stats: Any) -> None:
        """Refuses a use the record does not declare (one place for every method): per-model weights to a
        method without uses_weights, a missing base for needs_base, missing statistics, and once the models are
        known (n_models; None: not yet) a model count outside min_models .. max_models or weights of another
        count."""
        if weights is not None and not self.uses_weights:
            raise ValueError(f"{self.name} takes no per-model weights")
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} needs a base model (the common ancestor of the merged models)")
        if self.statistics is not None and stats is None:
            raise ValueError(f"{self.name} needs its statistics (methods.merger.compute_statistics)")
        if n_models is None:
            return
        if weights is not None and len(weights) != n_models:
            raise ValueError(f"{self.name}: {len(weights)} weights for {n_models} models")
        problem = self.count_problem(n_models)
        if problem:
            raise ValueError(problem)

    def count_problem(self, n_models: int) -> str | None:
        """Why this method cannot merge `n_models` models (outside min_models .. max_models), or None."""
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            most = "" if self.max_models is None else f" and at most {self.max_models}"
            return f"{self.name} merges at least {self.min_models}{most} models, got {n_models}"
        return None

    @property
    def searched(self) -> tuple[Param, ...]:
        """What `evolve --search recipe` searches for this method, per layer group: the per-model weight (when it
        takes weights), then its parameters with a search interval (per model or shared by the models)."""
        return (WEIGHT,) * self.uses_weights + tuple(p for p in self.params if p.search is not None)

    def param(self, name: str, aliases: bool = False) -> Param | None:
        """The parameter called `name`; with `aliases`, also by another of its names (mergekit YAML's: flags
        and evolve's options use the names alone, so that one flag has one meaning)."""
        return next((p for p in self.params if p.name == name or (aliases and name in p.aliases)), None)

    def settings(self, given: dict[str, Any], where: Callable[[str], str] = str) -> dict[str, Any]:
        """Every parameter of the method: the given values (checked; `where(name)` phrases a name for errors)
        over the defaults. A parameter the method does not have is refused, never dropped."""
        out = {p.name: p.default for p in self.params}
        for key, value in given.items():
            p = self.param(key)
            if p is None:
                have = ", ".join(p.name for p in self.params) or "none"
                raise UserError(f"{where(key)} does not apply to {self.name} (its parameters: {have})")
            out[p.name] = p.check(value, where(key))
        return out

    def phrase(self, settings: dict[str, Any]) -> str:
        if self.describe is not None:
            return self.describe(settings)
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items() if v is not None)
        return f"{self.name} ({shown})" if shown else self.name


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Adds a method. Names and aliases are unique; a parameter name means one thing across methods (same type,
    default, range and per-model scope), so `--merge-<param>` and `parameters: {<param>}` have one meaning."""
    for name in (method.name, *method.aliases):
        if name in METHODS or any(name in m.aliases for m in METHODS.values()):
            raise ValueError(f"merge method {name!r} is registered already")
    for p in method.params:
        known = all_params().get(p.name)
        if known is not None and dataclasses.replace(known, help="") != dataclasses.replace(p, help=""):
            raise ValueError(
                f"merge method {method.name}: parameter {p.name} differs from the one other methods declare"
            )
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes a method (tests that register their own)."""
    METHODS.pop(name, None)


def get(name: str) -> MergeMethod:
    """The method called `name` (or one of its aliases); the error lists the known names."""
    for method in METHODS.values():
        if name == method.name or name in method.aliases:
            return method
    raise UserError(f"unknown merge method {name!r}; known: {', '.join(names())}")


def names(with_statistics: bool = True, evolvable: bool = False) -> list[str]:
    """Registered method names, in registration order (with_statistics=False: those that need no dev data;
    evolvable=True: those `evolve` can merge a population with, evolve_refusal None)."""
    return [
        m.name
        for m in METHODS.values()
        if (with_statistics or m.statistics is None) and (not evolvable or m.evolve_refusal is None)
    ]


def all_params() -> dict[str, Param]:
    """Every parameter name of every method (one record each: register() keeps them consistent)."""
    found: dict[str, Param] = {}
    for method in METHODS.values():
        for p in method.params:
            found.setdefault(p.name, p)
    return found


def _default_text(p: Param) -> str:
    if p.default is None:  # each method has its own (the help says which)
        return "the method's"
    return str(p.default).lower() if p.type is boolean else str(p.default)


def markdown_table() -> str:
    """The README's method table, generated from the records."""
    rows = [
        "| method | what it computes | base model | statistics on dev data | parameters (default, range) | "
        "`evolve --merge-method` | `evolve --search recipe` searches |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS.values():
        params = (
            "; ".join(
                f"`{p.name}` ({_default_text(p)}, {p.range_text()}{', per model' if p.per_model else ''}"
                f"{f'; searched in [{p.search[0]:g}, {p.search[1]:g}]' if p.search else ''})"
                for p in m.params
            )
            or "none"
        )
        name = f"`{m.name}`" + (f" (alias {', '.join(f'`{a}`' for a in m.aliases)})" if m.aliases else "")
        base = "yes" if m.needs_base else "optional" if m.optional_base else "no"
        evolve = "yes" if m.evolve_refusal is None else f"no: {m.evolve_refusal}"
        searched = (
            "no (statistics)"
            if m.statistics
            else ", ".join(f"{p.name}{' per model' if p.per_model else ''}" for p in m.searched) or "nothing"
        )
        if m.copies:
            searched = "nothing"
        rows.append(
            f"| {name} | {m.summary} | {base} | {'yes' if m.statistics else 'no'} | {params} | {evolve} | {searched} |"
        )
    return "\n".join(rows)
