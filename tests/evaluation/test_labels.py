"""Dev-file labels of sequence classification (evolver_kernels/evaluation/data.py), read one way from JSONL,
CSV/TSV and datasets directories: multi-label rows as multi-hot vectors or label names (never index lists), and
label names that are numbers, which are refused where a text label could be a name or an index of another class."""

import json

import pytest
import torch

from evolver_kernels.evaluation.data import DataError, load_examples
from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.testing import tiny_models

TASK = "sequence-classification"


def _labels(path, config) -> list:
    """The labels load_examples reads from `path` for a model with `config` (as ClassificationEvaluator asks)."""
    return [
        e["label"]
        for e in load_examples(
            str(path),
            TASK,
            label2id={str(k): int(v) for k, v in config.label2id.items()},
            num_labels=config.num_labels,
            multi_label=config.problem_type == "multi_label_classification",
        )
    ]


def _jsonl(tmp_path, labels, name="dev.jsonl"):
    return tiny_models.write_jsonl(str(tmp_path / name), [{"text": f"t{k}", "label": x} for k, x in enumerate(labels)])


def _csv(tmp_path, labels, name="dev.csv"):
    """A CSV (or, by name, TSV) file of text and label, the labels written as given (quoted for CSV)."""
    path = tmp_path / name
    if name.endswith(".tsv"):
        path.write_text("text\tlabel\n" + "".join(f"t{k}\t{x}\n" for k, x in enumerate(labels)))
    else:
        path.write_text("text,label\n" + "".join(f't{k},"{x}"\n' for k, x in enumerate(labels)))
    return str(path)


def _numeric_names(names):
    config = tiny_models.make_config("bert", num_labels=len(names))
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    return config


@pytest.fixture
def multi():
    return tiny_models.make_config("bert", num_labels=3, multi_label=True)


# -- multi-label: multi-hot vectors and label names -----------------------------------------------------------------
def test_jsonl_multi_hot_vectors_are_read_as_positions_holding_1(tmp_path, multi):
    rows = [[0, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1], [1.0, 0.0, 1.0], [False, True, False]]
    assert _labels(_jsonl(tmp_path, rows), multi) == [[2], [0, 2], [], [0, 1, 2], [0, 2], [1]]


def test_jsonl_lists_of_label_names(tmp_path, multi):
    rows = [["label2", "label0"], ["label1"], [], ["label1", "label1"], "label2", "label0;label2"]
    assert _labels(_jsonl(tmp_path, rows), multi) == [[0, 2], [1], [], [1], [2], [0, 2]]


@pytest.mark.parametrize("name", ["dev.csv", "dev.tsv"])
def test_csv_and_tsv_multi_hot_text_and_names(tmp_path, multi, name):
    rows = ["0,0,1", "1; 0; 1", "0,0,0", "0.0,1.0,0", "label2", "label0;label2", "label1,"]
    assert _labels(_csv(tmp_path, rows, name), multi) == [[2], [0, 2], [], [1], [2], [0, 2], [1]]


def test_datasets_directory_multi_hot_and_names(tmp_path, multi):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [[0, 0, 1], [1, 1, 0]]}).save_to_disk(tmp_path / "hot")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [["label2"], ["label0", "label1"]]}).save_to_disk(
        tmp_path / "names"
    )
    assert _labels(tmp_path / "hot", multi) == _labels(tmp_path / "names", multi) == [[2], [0, 1]]
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [[0, 0, 1], [0, 2]]}).save_to_disk(tmp_path / "idx")
    with pytest.raises(DataError, match=r"idx:2: label \[0, 2\] is not a multi-hot vector of 3 values 0/1"):
        _labels(tmp_path / "idx", multi)


@pytest.mark.parametrize(
    "label,message",
    [
        ([0, 2], "dev.jsonl:3: label [0, 2] is not a multi-hot vector of 3 values 0/1 (nor a list of label names)"),
        ([2], "dev.jsonl:3: label [2] is not a multi-hot vector of 3 values 0/1"),
        ([0, 0, 1, 0], "dev.jsonl:3: label [0, 0, 1, 0] is not a multi-hot vector of 3 values 0/1"),
        ([0, 2, 1], "dev.jsonl:3: label [0, 2, 1] is not a multi-hot vector of 3 values 0/1"),
        ([0, 0.5, 1], "dev.jsonl:3: label [0, 0.5, 1] is not a multi-hot vector of 3 values 0/1"),
        ([1, "label0", 0], "dev.jsonl:3: label [1, 'label0', 0] is not a multi-hot vector of 3 values 0/1"),
        ([[1], [0], [0]], "dev.jsonl:3: label [[1], [0], [0]] is not a multi-hot vector"),
        (["label0", "joy"], "(nor a list of label names: 'joy' is not one; the model's labels are ['label0',"),
        (["0", "2"], "dev.jsonl:3: label ['0', '2'] is not a multi-hot vector of 3 values 0/1 (nor a list of label"),
        ("0;2", "dev.jsonl:3: label '0;2' is not a multi-hot vector of 3 values 0/1 (nor a list of label names)"),
        ("0,label1,1", "dev.jsonl:3: label '0,label1,1' is not a multi-hot vector"),
        ("0,,1", "dev.jsonl:3: label '0,,1' is not a multi-hot vector"),
        (2, "dev.jsonl:3: a multi-label row needs a list of labels, got 2"),
    ],
)
def test_jsonl_multi_label_refusals_name_file_and_line(tmp_path, multi, label, message):
    path = _jsonl(tmp_path, [[1, 0, 0], ["label1"], label])
    with pytest.raises(DataError) as err:
        _labels(path, multi)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("label", ["0;2", "1,2,0", "1,0,1,0", "0 1 1", " "])
def test_csv_multi_label_refusals_name_file_and_line(tmp_path, multi, label):
    with pytest.raises(DataError, match=rf"dev\.csv:3: label {label!r} is not a multi-hot vector of 3 values 0/1"):
        _labels(_csv(tmp_path, ["1,0,0", label]), multi)


def test_multi_label_names_that_are_numbers(tmp_path):
    config = _numeric_names(["1", "2", "3"])
    config.problem_type = "multi_label_classification"
    # a JSON list of strings is names; text of numbers is a vector, also here
    assert _labels(_jsonl(tmp_path, [["1", "3"], [0, 1, 1]]), config) == [[0, 2], [1, 2]]
    assert _labels(_csv(tmp_path, ["1,0,1", "0;1;1"]), config) == [[0, 2], [1, 2]]
    for text in ("1;3", "3"):
        with pytest.raises(
            DataError, match=rf"dev\.csv:2: label '{text}' .*give label names that are numbers as a JSON"
        ):
            _labels(_csv(tmp_path, [text]), config)


def test_evaluator_gold_is_the_multi_hot_vector_written(tmp_path, multi):
    """End to end: the gold rows an Evaluator scores against are the vectors in the dev file, from --dev and
    --select alike (both go through ClassificationEvaluator.read)."""
    rows = [[0, 0, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]]
    dev = _jsonl(tmp_path, rows)
    ev = Evaluator(TASK, tiny_models.make_tokenizer("bert"), [dev], config=multi, batch_size=2)
    assert torch.equal(ev.task_evaluator.gold(ev.files[0]), torch.tensor(rows, dtype=torch.bool))
    with open(dev, "a") as f:
        f.write(json.dumps({"text": "t9", "label": [0, 2]}) + "\n")
    with pytest.raises(DataError, match=r"dev\.jsonl:5: label \[0, 2\] is not a multi-hot vector of 3 values 0/1"):
        Evaluator(TASK, tiny_models.make_tokenizer("bert"), [dev], config=multi)


# -- single-label: indices and label names that are numbers ---------------------------------------------------------
def test_default_names_and_indices_from_every_source(tmp_path):
    config = tiny_models.make_config("bert", num_labels=3)
    assert _labels(_jsonl(tmp_path, [0, 2, "1", "label2", 1.0]), config) == [0, 2, 1, 2, 1]
    assert _labels(_csv(tmp_path, ["0", "2", " 1", "label2"]), config) == [0, 2, 1, 2]
    assert _labels(_csv(tmp_path, ["0", "2", "label1"], "dev.tsv"), config) == [0, 2, 1]


def test_json_integers_are_indices_even_when_names_are_numbers(tmp_path):
    config = _numeric_names(["1", "2", "3"])
    assert _labels(_jsonl(tmp_path, [0, 1, 2, 1]), config) == [0, 1, 2, 1]
    # "3" names class 2 and is no index of this 3-label head: not ambiguous
    assert _labels(_csv(tmp_path, ["3", "0"]), config) == [2, 0]


@pytest.mark.parametrize("writer,name", [(_csv, "dev.csv"), (_jsonl, "dev.jsonl")])
@pytest.mark.parametrize("text,named,index", [("1", 0, 1), ("2", 1, 2)])
def test_text_that_is_a_name_and_another_index_is_refused(tmp_path, writer, name, text, named, index):
    config = _numeric_names(["1", "2", "3"])
    line = 3 if name == "dev.csv" else 2  # the CSV header is line 1
    with pytest.raises(DataError) as err:
        _labels(writer(tmp_path, ["3", text], name), config)
    assert str(err.value).endswith(
        f"/{name}:{line}: label {text!r} is ambiguous: it is the label name of class {named} and the index of class"
        f" {index} (this model's label names are numbers that are not their indices); give indices as JSON integers"
        " in a .jsonl file"
    )


def test_names_that_are_their_own_indices_are_not_ambiguous(tmp_path):
    config = _numeric_names(["0", "1", "2"])
    assert _labels(_csv(tmp_path, ["0", "1", "2", "1"]), config) == [0, 1, 2, 1]
    assert _labels(_jsonl(tmp_path, ["0", 1, "2"]), config) == [0, 1, 2]


def test_single_label_refusals_keep_their_messages(tmp_path):
    config = tiny_models.make_config("bert", num_labels=3)
    for label, message in [
        ("joy", "dev.jsonl:1: unknown label 'joy'; the model's labels are ['label0', 'label1', 'label2']"),
        (7, "dev.jsonl:1: label 7 outside the model's head (num_labels = 3)"),
        ("-1", "dev.jsonl:1: label -1 outside the model's head"),
        ("1.0", "dev.jsonl:1: unknown label '1.0'"),
        (True, "dev.jsonl:1: label True is not an index or a label name"),
        ([0, 1], "dev.jsonl:1: label is a list but the model is single-label"),
    ]:
        with pytest.raises(DataError) as err:
            _labels(_jsonl(tmp_path, [label]), config)
        assert message in str(err.value)
