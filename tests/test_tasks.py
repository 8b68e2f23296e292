"""tasks/: prompt building, loaders, candidate pools, model resolution, and their error messages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import IGNORE_INDEX, SapoError, encode_example, encode_prompt, user_message
from tasks.candidates import candidate_pool, candidate_problem, filter_candidates, load_candidates_file
from tasks.core import Instance, Task
from tasks.loaders import load_hf_task, load_sapo_task, load_sequence, load_superni_file, load_task, read_json
from tasks.models import resolve
from tasks.prompts import encode_generation_prompt
from tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt building

def test_user_message_is_plain_concatenation():
    # Braces in the instruction must survive (the original code ran str.format and swallowed the input).
    assert user_message("Say {x} and {}.", "in {0}", "Answer:") == "Say {x} and {}.\n\nText:\nin {0}\n\nAnswer:"


def test_short_suffixes_are_joined_by_the_authors_slice_rule():
    """The authors' uie_dataset.py joins input and suffix with "\\n\\n"[:len(suffix)]: nothing before an empty suffix,
    one newline before a one-character one, a blank line before a longer one."""
    assert user_message("Do it.", "in", "") == "Do it.\n\nText:\nin"
    assert user_message("Do it.", "in", "?") == "Do it.\n\nText:\nin\n?"
    assert user_message("Do it.", "in", "A:") == "Do it.\n\nText:\nin\n\nA:"
    assert user_message("", "in", "") == "Text:\nin"  # empty instruction and suffix: the input label and the input
    tok = tiny_tokenizer()
    chat = tok.decode(encode_prompt(tok, "Do it.", "in", ""))
    assert chat.startswith("<|im_start|>user\nDo it.\n\nText:\nin<|im_end|>")
    # The prompts of such tasks changed, so their content hash did: a run or a score cache made before does not reuse
    # them. The hash of a task with a longer suffix is what it was (header [name, instruction, suffix, labels]).
    import hashlib

    def old_hash(*header):
        return hashlib.sha256(json.dumps(list(header)).encode()).hexdigest()[:16]

    assert Task("t", "Say it.", "").content_hash() != old_hash("t", "Say it.", "", [])
    assert Task("t", "Say it.", "?").content_hash() != old_hash("t", "Say it.", "?", [])
    assert Task("t", "Say it.", "A:").content_hash() == old_hash("t", "Say it.", "A:", [])


def test_encode_example_matches_hand_written_chat_text_and_mask():
    tok = tiny_tokenizer()
    enc = encode_example(tok, "Classify {it}.", "the movie was great", "Answer positive or negative.", "positive")
    expected_prompt = ("<|im_start|>user\nClassify {it}.\n\nText:\nthe movie was great\n\nAnswer positive or negative."
                       "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected_response = "positive<|im_end|>\n"
    assert tok.decode(enc.input_ids) == expected_prompt + expected_response
    prompt_ids = tok(expected_prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(expected_response, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt_ids + response_ids
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert enc.num_prompt_tokens == len(prompt_ids)
    # The supervised tokens are exactly the answer and the end-of-turn markup.
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == expected_response
    assert not enc.truncated
    # The generation prompt is the same token prefix.
    assert encode_prompt(tok, "Classify {it}.", "the movie was great", "Answer positive or negative.") == prompt_ids


def test_truncation_shortens_only_the_input():
    tok = tiny_tokenizer()
    instruction, suffix, answer = "Count the words.", "Answer with a number.", "twelve words"
    long_input = "the quick brown fox jumps over the lazy dog " * 10
    full = encode_example(tok, instruction, long_input, suffix, answer)
    limit = len(full.input_ids) - 25
    enc = encode_example(tok, instruction, long_input, suffix, answer, max_length=limit)
    assert enc.truncated and len(enc.input_ids) <= limit
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user\nCount the words.\n\nText:\nthe quick brown fox")
    assert text.endswith("\n\nAnswer with a number.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                         "twelve words<|im_end|>\n")
    kept_input = text.split("Text:\n", 1)[1].split("\n\nAnswer with", 1)[0]
    assert long_input.startswith(kept_input) and len(kept_input) < len(long_input)
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "twelve words<|im_end|>\n"
    prompt = encode_prompt(tok, instruction, long_input, suffix, max_length=limit)
    assert len(prompt) <= limit
    fitted = encode_generation_prompt(tok, instruction, long_input, suffix, max_length=limit)
    assert fitted.truncated and fitted.input_ids == prompt
    assert not encode_generation_prompt(tok, instruction, "short", suffix, max_length=limit).truncated


def test_truncation_that_cannot_fit_names_the_limit():
    tok = tiny_tokenizer()
    with pytest.raises(SapoError, match="more than the limit of 10"):
        encode_example(tok, "Count the words in the sentence.", "a b c", "Answer.", "three", max_length=10)


def test_tokenizer_without_chat_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=None)
    with pytest.raises(SapoError, match="no chat template"):
        encode_example(tok, "x", "y", "z", "w")


# ---------------------------------------------------------------------------------------------------------------------
# Loaders

def write_sapo_dir(root: Path, with_train=True):
    task = root / "task900_toy_sentiment"
    task.mkdir(parents=True)
    records = [{"sentence": f"text {i}", "label": "positive" if i % 2 else "negative"} for i in range(6)]
    for split in ("train", "dev", "test") if with_train else ("dev", "test"):
        (task / f"{split}.json").write_text(json.dumps(records))
    (root / "instructions.json").write_text(json.dumps({"task900_toy_sentiment": {
        "instruction": "Say positive or negative.", "suffix": "Answer:", "labels": ["positive", "negative"]}}))
    step = root / "order" / "toy_seq" / "1-task900"
    step.mkdir(parents=True)
    (step / "train_tasks.json").write_text(json.dumps([{"dataset_name": "task900_toy_sentiment"}]))
    return root


def test_sapo_layout_loader(tmp_path):
    root = write_sapo_dir(tmp_path)
    task = load_sapo_task(root, "task900")  # short ids resolve to the task directory
    assert task.name == "task900_toy_sentiment"
    assert task.instruction == "Say positive or negative." and task.suffix == "Answer:"
    assert task.label_words == ("positive", "negative")
    assert [i.input for i in task.train] == [f"text {i}" for i in range(6)]  # file order, no shuffle
    assert task.train[1].outputs == ("positive",)
    seq = load_sequence("toy_seq", root)
    assert seq.task_names == ["task900_toy_sentiment"] and seq.data_dir == str(root)


def test_missing_split_is_reported(tmp_path):
    root = write_sapo_dir(tmp_path, with_train=False)
    task = load_task("task900", root)
    assert task.missing_splits == ("train",)
    with pytest.raises(SapoError, match="has no train split"):
        task.split("train")
    assert len(task.split("dev")) == 6


def test_superni_file_loader(tmp_path):
    path = tmp_path / "task123_toy.json"
    instances = [{"id": str(i), "input": f"in {i}", "output": ["yes" if i % 3 else "no", "alt"]} for i in range(12)]
    path.write_text(json.dumps({"Definition": ["Answer yes or no.", "Be brief."], "Instances": instances}))
    task = load_superni_file(path, n_test=5, n_dev=3)
    assert task.instruction == "Answer yes or no. Be brief."
    assert [i.input for i in task.test] == [f"in {i}" for i in range(5)]
    assert [i.input for i in task.dev] == [f"in {i}" for i in range(5, 8)]
    assert [i.input for i in task.train] == [f"in {i}" for i in range(8, 12)]
    assert task.test[0].outputs == ("no", "alt")
    assert task.label_words == ("no", "yes")


def test_hf_dataset_loader_on_local_files(tmp_path):
    # The Lots-of-LoRAs schema (input, output list, train/valid/test), read through `datasets` from local files.
    ds_dir = tmp_path / "task195_local"
    ds_dir.mkdir()
    for split, n in (("train", 5), ("valid", 2), ("test", 3)):
        with open(ds_dir / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"input": f"{split} {i}", "output": [f"out {i}"], "id": f"{split}-{i}"}) + "\n")
    task = load_hf_task(str(ds_dir), instruction="Copy the number.")
    assert [i.input for i in task.train] == [f"train {i}" for i in range(5)]
    assert [i.input for i in task.dev] == ["valid 0", "valid 1"]
    assert task.test[2].outputs == ("out 2",)


def test_bad_input_errors(tmp_path):
    with pytest.raises(SapoError, match="data directory not found"):
        load_task("task1", tmp_path / "nope")
    root = write_sapo_dir(tmp_path / "d")
    with pytest.raises(SapoError, match="task 'task777' not found"):
        load_task("task777", root)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": [1, 2,,]}')
    with pytest.raises(SapoError, match=r"malformed JSON in .*bad.json: .* line 1 column"):
        read_json(bad)
    with pytest.raises(SapoError, match="unknown sequence 'nope'"):
        load_sequence("nope")
    with pytest.raises(SapoError, match="needs real data"):
        load_sequence("ni_seq_c1")
    empty = Task(name="t", instruction="x", source="here")
    with pytest.raises(SapoError, match="the test split of here is empty"):
        empty.split("test")


# ---------------------------------------------------------------------------------------------------------------------
# Candidate pools

def _task():
    return Task(name="toy", instruction="Decide whether the review is positive or negative.", suffix="Answer:",
                label_words=("positive", "negative"), train=[Instance("a", ("positive",))])


def test_candidate_validation_rules():
    task = _task()
    assert candidate_problem(task, "Is this review positive or negative? Decide.") is None
    assert "drops the label word(s) 'negative'" in candidate_problem(task, "Is the review positive or bad? Decide!")
    assert "drops" in candidate_problem(task, "Is the review Positive or Negative?")  # case matters
    assert "drops" in candidate_problem(task, "Is it positively or negatively worded?")  # whole words only
    assert candidate_problem(task, "   ") == "is empty"
    assert "characters" in candidate_problem(task, "Say it.")  # too short
    assert "characters" in candidate_problem(task, "positive or negative " * 12)  # too long
    pool, rejected = filter_candidates(task, ["Say positive or negative for this review.",
                                              "Say positive or negative for this review.", "", "Say good or bad."])
    assert pool == [task.instruction, "Say positive or negative for this review."]
    assert [why for _, why in rejected][0] == "is a duplicate"


def test_candidates_file(tmp_path):
    task = _task()
    path = tmp_path / "cands.json"
    path.write_text(json.dumps({"toy": ["Label the review as positive or negative."]}))
    assert load_candidates_file(path, task) == [task.instruction, "Label the review as positive or negative."]
    path.write_text(json.dumps(["Label the review as good or bad, please."]))
    with pytest.raises(SapoError, match=r"cands.json: candidate 0 for task toy drops the label word"):
        load_candidates_file(path, task)
    with pytest.raises(SapoError, match="no built-in paraphrase pool"):
        candidate_pool(task)


# ---------------------------------------------------------------------------------------------------------------------
# Model resolution

def test_model_resolution_errors(tmp_path):
    with pytest.raises(SapoError, match="does not exist"):
        resolve(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SapoError, match="has no config.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", [])


def test_hub_id_without_network_is_one_line_error():
    code = ("from tasks import cli_main\nfrom tasks.models import load_tokenizer\n"
            "cli_main(lambda: load_tokenizer('no-such-org/no-such-model'))()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load model 'no-such-org/no-such-model'" in lines[0]
    assert "--model /path/to/copy" in lines[0]
