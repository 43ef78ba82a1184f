"""YAML in, JSON out, one way for both commands: a YAML mapping read strictly (a duplicate key is refused, not
silently replaced by the last one), strict JSON written atomically (non-finite numbers as null)."""

from __future__ import annotations

import json
import math
import os

import yaml

from evolver_kernels.errors import UserError


class YamlFileError(UserError):
    """A YAML file that cannot be read as the mapping it must be; the message names the file."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # merge keys (<<) first: an override of a merged key is not a duplicate
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml_mapping(path: str, option: str = "--config") -> dict:
    """A YAML file that must hold a mapping; one-line errors for a missing file, bad YAML, a duplicate key or
    another shape."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.load(f, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        problem = str(err).replace("\n", " ")
        raise YamlFileError(f"{option} {path}: not valid YAML ({' '.join(problem.split())})") from None
    except UnicodeDecodeError:
        raise YamlFileError(f"{option} {path}: not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise YamlFileError(f"{option} {path}: must be a mapping of option names to values")
    return loaded


def json_safe(value):
    """`value` with every non-finite float (a fitness ranked last, NaN) as None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str, doc) -> str:
    """Strict JSON (non-finite numbers as null), written atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(doc), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return path


def write_yaml(path: str, doc: dict, comment: str = "") -> str:
    """`doc` as YAML in its own key order (floats as Python writes them: they read back exactly), after a
    `# comment` line when given, written atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if comment:
            f.write(f"# {comment}\n")
        yaml.safe_dump(doc, f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)
    return path
