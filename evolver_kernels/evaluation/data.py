"""Development data: JSONL, CSV/TSV or a `datasets.load_from_disk` directory, checked row by row.

Columns by task: sequence classification `text`, optional `text_pair`, `label` (an index or a label name;
a list of them for multi-label); causal LM `text`; seq2seq `input`, `target`. Errors name the file and
the line (1-based, counting the CSV header as line 1).
"""

from __future__ import annotations

import csv
import json
import os

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
        if isinstance(value, str):
            value = [v for v in value.replace(";", ",").split(",") if v.strip()]
        if not isinstance(value, list):
            raise DataError("path", f"{path}:{n}: a multi-label row needs a list of labels, got {value!r}")
        return sorted({_one_label(v, path, n, label2id, num_labels) for v in value})
    if isinstance(value, list):
        raise DataError("path", f"{path}:{n}: label is a list but the model is single-label")
    return _one_label(value, path, n, label2id, num_labels)


def _one_label(value, path, n, label2id, num_labels) -> int:
    if isinstance(value, bool):
        raise DataError("path", f"{path}:{n}: label {value!r} is not an index or a label name")
    if isinstance(value, str):
        v = value.strip()
        if label2id and v in label2id:
            return int(label2id[v])
        if v.lstrip("-").isdigit():
            value = int(v)
        else:
            known = f"; the model's labels are {sorted(label2id)}" if label2id else ""
            raise DataError("path", f"{path}:{n}: unknown label {value!r}{known}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DataError("path", f"{path}:{n}: label {value!r} is not an index or a label name")
    if num_labels is not None and not 0 <= value < num_labels:
        raise DataError("path", f"{path}:{n}: label {value} outside the model's head (num_labels = {num_labels})")
    return value
