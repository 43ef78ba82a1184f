"""Development data: JSONL, CSV/TSV or a `datasets.load_from_disk` directory, checked row by row.

Columns by task: sequence classification `text`, optional `text_pair`, `label`; causal LM `text`; seq2seq
`input`, `target`. Errors name the file and the line (1-based, counting the CSV header as line 1).

Labels are read the same way from every source (the model's label2id gives the names):

- single-label: a JSON integer is always an index. A text label (CSV/TSV, or a JSON string) is a label name when
  it is one, else an index when it reads as an integer; text that is both a label name and the index of another
  class (label names that are numbers other than their own indices: "1", "2", "3" for 0, 1, 2) is ambiguous and
  refused (give indices as JSON integers). Names that are numbers equal to their indices are not ambiguous.
- multi-label: a list of numbers (a JSON list, or text of numbers separated by `,` or `;`) is a multi-hot
  vector: exactly num_labels entries, each 0 or 1 (0.0/1.0, and JSON true/false, are read as 0/1), the labels
  being the positions holding 1; text of numbers is a vector even when the label names are numbers. A list of
  strings (or text of names separated by `,` or `;`) is a list of label names; `[]` is a row with no label.
  Anything else (a vector of the wrong length, values other than 0/1, a mix of numbers and names, an unknown
  name) is refused. A list of indices is not read: `[0, 2]` is refused, write `[1, 0, 1]`.

Labels come back as an int (single-label) or the sorted list of label indices (multi-label).
"""

from __future__ import annotations

import csv
import json
import os
import re

from evolver_kernels.errors import ArgumentError

REQUIRED_COLUMNS = {
    "sequence-classification": ("text", "label"),
    "causal-lm": ("text",),
    "seq2seq": ("input", "target"),
}


class DataError(ArgumentError):
    """Development data that cannot be used; the message names the file and line."""


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL, CSV, TSV file or load_from_disk directory."""
    if not os.path.exists(path):
        raise ArgumentError("path", f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _read_dataset_dir(path)
    try:
        return _read_file(path)
    except UnicodeDecodeError as err:
        raise DataError("path", f"{path}: not UTF-8 text (byte {err.start} cannot be decoded: {err.reason})") from None


def _read_file(path: str) -> list[tuple[int, dict]]:
    # utf-8-sig: a byte-order mark (as some editors and Excel write) is not part of the first column's name
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError("path", f"{path}:{n}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError("path", f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
                rows.append((n, row))
        return rows
    if lower.endswith((".csv", ".tsv")):
        delimiter = "\t" if lower.endswith(".tsv") else ","
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            return [(reader.line_num, dict(row)) for row in reader]
    raise DataError("path", f"{path}: unknown format (use .jsonl, .csv, .tsv or a datasets.save_to_disk directory)")


def _read_dataset_dir(path: str) -> list[tuple[int, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError("path", f"{path}: a directory needs the `datasets` package (pip install datasets)") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError("path", f"{path}: holds splits {list(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    return [(n + 1, dict(row)) for n, row in enumerate(ds)]


def load_examples(
    path: str,
    task: str,
    *,
    label2id: dict[str, int] | None = None,
    num_labels: int | None = None,
    multi_label: bool = False,
) -> list[dict]:
    """Validated examples of one dev file: dicts with the task's columns, labels as ints (lists for
    multi-label) within [0, num_labels)."""
    rows = read_rows(path)
    if not rows:
        raise DataError("path", f"{path}: no examples")
    required = REQUIRED_COLUMNS[task]
    examples = []
    for n, row in rows:
        missing = [c for c in required if row.get(c) is None or row.get(c) == ""]
        if missing:
            raise DataError(
                "path", f"{path}:{n}: missing {', '.join(missing)} (a {task} row needs {', '.join(required)})"
            )
        for column in ("text", "text_pair", "input", "target"):
            if column in row and row[column] is not None and not isinstance(row[column], str):
                raise DataError("path", f"{path}:{n}: {column} must be a string, got {type(row[column]).__name__}")
        example = {c: row[c] for c in ("text", "text_pair", "input", "target") if row.get(c) not in (None, "")}
        if task == "sequence-classification":
            example["label"] = _parse_label(row["label"], path, n, label2id, num_labels, multi_label)
        examples.append(example)
    return examples


def _parse_label(value, path, n, label2id, num_labels, multi_label):
    if multi_label:
        return _label_set(value, path, n, label2id or {}, num_labels)
    if isinstance(value, list):
        raise DataError("path", f"{path}:{n}: label is a list but the model is single-label")
    return _one_label(value, path, n, label2id, num_labels)


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _label_set(value, path, n, label2id: dict, num_labels) -> list[int]:
    """A multi-label row's labels as sorted indices, from a multi-hot vector or a list of label names."""
    vector = names = None
    if isinstance(value, str):
        entries = [v.strip() for v in value.replace(";", ",").split(",")]
        if all(_NUMBER.fullmatch(v) for v in entries):
            vector = [float(v) for v in entries]
        elif any(entries) and not any(_NUMBER.fullmatch(v) for v in entries):
            names = [v for v in entries if v]  # a separator at the end adds no name
    elif isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            names = [v.strip() for v in value]  # [] too: a row with no label
        elif all(isinstance(v, (bool, int, float)) for v in value):
            vector = value
    else:
        raise DataError("path", f"{path}:{n}: a multi-label row needs a list of labels, got {value!r}")
    if vector is not None and (num_labels is None or len(vector) == num_labels) and all(v in (0, 1) for v in vector):
        return [i for i, v in enumerate(vector) if v == 1]
    unknown = [v for v in names if v not in label2id] if names is not None else None
    if unknown == []:
        return sorted({int(label2id[v]) for v in names})
    why = ""
    if unknown:
        known = f"; the model's labels are {sorted(label2id)}" if label2id else "; the model has no label names"
        why = f": {unknown[0]!r} is not one{known}"
    elif isinstance(value, str) and vector is not None and all(v in label2id for v in entries):
        why = ": text of numbers is a vector; give label names that are numbers as a JSON list of strings"
    size = f"{num_labels} " if num_labels is not None else ""
    raise DataError(
        "path",
        f"{path}:{n}: label {value!r} is not a multi-hot vector of {size}values 0/1 (nor a list of label names{why})",
    )


def _one_label(value, path, n, label2id, num_labels) -> int:
    if isinstance(value, bool):
        raise DataError("path", f"{path}:{n}: label {value!r} is not an index or a label name")
    if isinstance(value, str):
        v = value.strip()
        index = int(v) if _INTEGER.fullmatch(v) else None
        if label2id and v in label2id:
            named = int(label2id[v])
            if index is not None and index != named and (num_labels is None or 0 <= index < num_labels):
                raise DataError(
                    "path",
                    f"{path}:{n}: label {value!r} is ambiguous: it is the label name of class {named} and the index"
                    f" of class {index} (this model's label names are numbers that are not their indices);"
                    " give indices as JSON integers in a .jsonl file",
                )
            return named
        if index is None:
            known = f"; the model's labels are {sorted(label2id)}" if label2id else ""
            raise DataError("path", f"{path}:{n}: unknown label {value!r}{known}")
        value = index
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DataError("path", f"{path}:{n}: label {value!r} is not an index or a label name")
    if num_labels is not None and not 0 <= value < num_labels:
        raise DataError("path", f"{path}:{n}: label {value} outside the model's head (num_labels = {num_labels})")
    return value
