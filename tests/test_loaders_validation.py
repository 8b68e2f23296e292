"""Instance validation in every loader (SAPO layout, SuperNI task file, Hugging Face dataset): a bad record is one
SapoError line naming the file, the record and the field; numbers are references written as str(number)."""
import json
import re

import pytest

from tasks.errors import SapoError
from tasks.loaders import load_hf_task, load_sapo_task, load_superni_file


def write_sapo_task(root, records, entry=None):
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    entry = {"instruction": "Answer the question.", "suffix": "Answer:"} if entry is None else entry
    (root / "instructions.json").write_text(json.dumps({"toy": entry}, ensure_ascii=False), encoding="utf-8")
    return root / "toy" / "train.json"


GOOD = {"sentence": "ok", "label": "yes"}


@pytest.mark.parametrize("record,field,got", [
    ({"sentence": "a", "label": None}, "label", "got null"),
    ({"sentence": {"text": "a"}, "label": "x"}, "sentence", "got an object"),
    ({"sentence": ["a", "b"], "label": "x"}, "sentence", "got a list"),
    ({"sentence": 7, "label": "x"}, "sentence", "got int"),
    ({"sentence": "a", "label": [5, None]}, "label", "got null at position 1 of the list"),
    ({"sentence": "a", "label": []}, "label", "got an empty list"),
    ({"sentence": "a", "label": True}, "label", "got true"),
    ({"sentence": "a", "label": {"answer": "x"}}, "label", "got an object"),
    ({"sentence": "a", "label": ["x", ["y"]]}, "label", "got a list at position 1 of the list"),
    ({"sentence": "a", "label": float("nan")}, "label", "got float"),
])
def test_sapo_layout_rejects_bad_records(tmp_path, record, field, got):
    path = write_sapo_task(tmp_path, [GOOD, GOOD, record])
    with pytest.raises(SapoError) as e:
        load_sapo_task(tmp_path, "toy")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: record 2 (counted from 0): \"{field}\" must be a string")
    assert message.endswith(got)


def test_sapo_layout_numbers_are_references(tmp_path):
    write_sapo_task(tmp_path, [{"sentence": "3 + 4", "label": 7}, {"sentence": "half of 5", "label": 2.5},
                               {"sentence": "both", "label": ["8", 8]}])
    task = load_sapo_task(tmp_path, "toy")
    assert [inst.outputs for inst in task.train] == [("7",), ("2.5",), ("8", "8")]


@pytest.mark.parametrize("entry,message", [
    ({"suffix": "x"}, "entry toy lacks an \"instruction\" string (it may be empty)"),
    ({"instruction": None}, "entry toy lacks an \"instruction\" string"),
    ({"instruction": "x", "suffix": 3}, "entry toy: \"suffix\" must be a string, got int"),
    ({"instruction": "x", "input_label": ["Text:"]}, "entry toy: \"input_label\" must be a string, got a list"),
    ({"instruction": "x", "input_label": " "}, "entry toy: \"input_label\" is empty"),
    ({"instruction": "x", "labels": "A"}, "entry toy: \"labels\" must be a list of strings"),
])
def test_sapo_layout_rejects_bad_instruction_entries(tmp_path, entry, message):
    write_sapo_task(tmp_path, [GOOD], entry)
    with pytest.raises(SapoError, match=re.escape(f"{tmp_path / 'instructions.json'}: {message}")):
        load_sapo_task(tmp_path, "toy")


def test_superni_file_rejects_bad_records(tmp_path):
    path = tmp_path / "task1_toy.json"
    good = {"input": "a", "output": ["yes"]}
    for record, field, got in (({"input": "a", "output": None}, "output", "got null"),
                               ({"input": "a", "output": []}, "output", "got an empty list"),
                               ({"input": 3, "output": ["x"]}, "input", "got int")):
        path.write_text(json.dumps({"Definition": ["Say yes."], "Instances": [good, record]}))
        with pytest.raises(SapoError) as e:
            load_superni_file(path, n_test=1, n_dev=0)
        assert str(e.value).startswith(f"{path}: record 1 (counted from 0): \"{field}\" must be")
        assert str(e.value).endswith(got)
    path.write_text(json.dumps({"Definition": "Count.", "Instances": [{"input": "a b", "output": [2]}]}))
    assert load_superni_file(path, n_test=1, n_dev=0).test[0].outputs == ("2",)


def test_hf_dataset_rejects_bad_records(tmp_path):
    ds_dir = tmp_path / "toy_hf"
    ds_dir.mkdir()
    rows = {"train": [{"input": "a", "output": ["x"]}, {"input": "b", "output": None}],
            "test": [{"input": "c", "output": ["y"]}]}
    for split, records in rows.items():
        (ds_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SapoError) as e:
        load_hf_task(str(ds_dir), instruction="Copy.")
    assert str(e.value) == (f"dataset {str(ds_dir)!r} split train: record 1 (counted from 0): \"output\" must be a "
                            "string, a number or a non-empty list of them, got null")
