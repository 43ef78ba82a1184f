"""mergekit's parameter settings, resolved per tensor (mergekit 0.1.5: config.evaluate_setting and
parameter_resolver.resolve_parameter), for a method parameter declared once in the registry (Param).

A setting is a scalar; a gradient, a list of anchors interpolated over a slice's layers at t in [0, 1]
(numbers: linearly between the two anchors around t (len - 1); booleans: the anchor int(t (len - 1)));
or conditionals, a mapping {filter: substring, value: scalar or gradient} or a list of them, where the first
whose filter is in the tensor's name (no filter, or "*": any tensor) gives the value. Settings are looked up in
scopes from the most specific (a slice's source, a model) to the global `parameters:`; a scope without the
key, or whose conditionals match no filter (or an empty list), leaves the choice to the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evolver_kernels.errors import UserError

Check = Callable[[Any, str], Any]  # Param.check: (value, where) -> the value converted, or a one-line error
CONDITIONAL_KEYS = ("filter", "value")


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def check_setting(setting: Any, check: Check, where: str) -> Any:
    """`setting` with its shape checked (scalar, gradient or conditionals) and every scalar converted by
    `check`; unknown conditional keys and other shapes are refused, naming `where`."""
    if _scalar(setting):
        return check(setting, where)
    if isinstance(setting, Mapping):
        unknown = sorted(set(map(str, setting)) - set(CONDITIONAL_KEYS))
        if unknown or "value" not in setting:
            raise UserError(f"{where}: a conditional is {{filter: SUBSTRING, value: V}}, got {dict(setting)!r}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise UserError(f"{where}: filter must be a substring of tensor names, got {setting['filter']!r}")
        value = setting["value"]
        if not (_scalar(value) or (isinstance(value, list) and all(_scalar(v) for v in value))):
            raise UserError(f"{where}: a conditional's value is a number or a gradient (a list), got {value!r}")
        return {"filter": setting.get("filter"), "value": check_setting(value, check, where)}
    if isinstance(setting, list):
        if all(_scalar(v) for v in setting):
            return [check(v, where) for v in setting]
        if all(isinstance(v, Mapping) for v in setting):
            return [check_setting(v, check, where) for v in setting]
        raise UserError(f"{where}: a list is a gradient (numbers) or conditionals ({{filter, value}}), got {setting!r}")
    raise UserError(f"{where}: must be a number, a gradient (a list) or conditionals, got {setting!r}")


def evaluate(setting: Any, tensor: str, t: float, check: Check, where: str) -> Any | None:
    """The value of a checked setting for tensor `tensor` at position t of its slice; None when conditionals
    match nothing (the next scope decides)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if _scalar(setting):
        return setting
    if not setting:
        return None
    if all(_scalar(v) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        value = (1 - frac) * setting[i0] + frac * setting[i1]
        if isinstance(setting[0], int) and not float(value).is_integer():
            raise UserError(f"{where}: the gradient gives {value} for {tensor}, not an integer")
        return check(value, where)
    for cond in setting:
        if cond["filter"] in (None, "*") or cond["filter"] in tensor:
            return evaluate(cond["value"], tensor, t, check, where)
    return None


def resolve(
    scopes: Sequence[tuple[Mapping[str, Any] | None, str]], name: str, tensor: str, t: float, check: Check
) -> Any | None:
    """The value of parameter `name` for `tensor`: the first scope (settings, where) whose setting gives one;
    None when none does (the caller's default)."""
    for settings, where in scopes:
        if settings is not None and name in settings:
            value = evaluate(settings[name], tensor, t, check, f"{where}: {name}")
            if value is not None:
                return value
    return None
