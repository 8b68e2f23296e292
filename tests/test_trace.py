"""TRACE in the SAPO layout: a Chinese classification task (input label "文本:"), an empty-instruction code task (Py150),
numeric answers (NumGLUE), the per-task `input_label` field, the `trace` order, exact prompts, and ROUGE-L on Chinese
references. The data is a small fixture written here, shaped like the authors' TRACE folder."""
import json
import math

import pytest

import evaluate
from tasks.core import Task
from tasks.loaders import load_sequence, load_task
from tasks.prompts import encode_example, encode_generation_prompt, encode_task_example, user_message
from tiny import tiny_tokenizer

CSTANCE_INSTRUCTION = "判断以下文本对指定对象的态度，选择一项：A.支持，B.反对，C.中立。输出A，B或者C。"
CSTANCE_SUFFIX = "直接只回答A 或者 B 或者 C作为你的答案。"
NUMGLUE_INSTRUCTION = "Solve the following math problem."
NUMGLUE_SUFFIX = "Directly output only the numerical value as you answer."

TASKS = {
    "C-STANCE": ({"instruction": CSTANCE_INSTRUCTION, "suffix": CSTANCE_SUFFIX, "labels": ["A", "B", "C"]},
                 [{"sentence": "我支持这个观点\n对象：\n观点", "label": "A"},
                  {"sentence": "这不对\n对象：\n政策", "label": "B"}]),
    "Py150": ({"instruction": "", "suffix": "Answer:", "labels": []},
              [{"sentence": "def add(a, b):\n    return", "label": "a + b"}]),
    "NumGLUE-cm": ({"instruction": NUMGLUE_INSTRUCTION, "suffix": NUMGLUE_SUFFIX, "labels": []},
                   [{"sentence": "There are 68 car wheels. How many cars?", "label": 17},
                    {"sentence": "Half of 5?", "label": "2.5"}]),
    "FOMC": ({"instruction": "What is the monetary policy stance? Choose A, B or C.", "suffix": "Answer:",
              "labels": ["A", "B", "C"], "input_label": "Statement:"},
             [{"sentence": "Rates stay.", "label": "C"}]),
    "CN-SUMMARY": ({"instruction": "用一句话总结下面的会议记录。", "suffix": "直接输出总结。"},
                   [{"sentence": "会议决定明年修路。", "label": "明年修路"}]),
    "ScienceQA": ({"instruction": "Choose an answer for the following question.", "suffix": "Answer:",
                   "labels": ["A", "B"]},
                  [{"sentence": "Which is a walk?\n\nChoices:\nA. 13 seconds\nB. 13 minutes", "label": "B"},
                   {"sentence": "Which is hot?\n\nChoices:\nA. ice\nB. fire", "label": "B"}]),
    "MeetingBank": ({"instruction": "Write a summary of the following meeting transcripts.", "suffix": "Answer:"},
                    [{"sentence": "Council met and voted.", "label": "the cat sat on the mat"}]),
}
ORDER = [("1-cstance", "C-STANCE"), ("2-fomc", "FOMC"), ("3-py150", "Py150"), ("4-numgluecm", "NumGLUE-cm")]


@pytest.fixture
def trace_dir(tmp_path):
    meta = {}
    for name, (entry, records) in TASKS.items():
        meta[name] = entry
        (tmp_path / name).mkdir()
        for split in ("train", "dev", "test"):
            (tmp_path / name / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "instructions.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    for step, name in ORDER:
        (tmp_path / "order" / "trace" / step).mkdir(parents=True)
        (tmp_path / "order" / "trace" / step / "train_tasks.json").write_text(
            json.dumps([{"sampling strategy": "full", "dataset_name": name}]))
    return tmp_path


def test_trace_sequence_and_tasks_load(trace_dir):
    sequence = load_sequence("trace", trace_dir)
    assert sequence.task_names == ["C-STANCE", "FOMC", "Py150", "NumGLUE-cm"]
    tasks = {name: load_task(name, sequence.data_dir) for name in sequence.task_names}
    assert tasks["Py150"].instruction == "" and tasks["Py150"].suffix == "Answer:"
    assert tasks["C-STANCE"].label_words == ("A", "B", "C")
    assert [i.outputs for i in tasks["NumGLUE-cm"].train] == [("17",), ("2.5",)]
    assert {n: t.input_label for n, t in tasks.items()} == {"C-STANCE": "文本:", "FOMC": "Statement:",
                                                            "Py150": "Text:", "NumGLUE-cm": "Text:"}


def test_trace_prompts_exact(trace_dir):
    cstance, py150, numglue, fomc = (load_task(n, trace_dir) for n in ("C-STANCE", "Py150", "NumGLUE-cm", "FOMC"))

    def message(task, instance):
        return user_message(task.instruction, instance.input, task.suffix, input_label=task.input_label)

    assert message(cstance, cstance.train[0]) == (
        "判断以下文本对指定对象的态度，选择一项：A.支持，B.反对，C.中立。输出A，B或者C。\n\n文本:\n我支持这个观点\n对象：\n观点\n\n"
        "直接只回答A 或者 B 或者 C作为你的答案。")
    assert message(py150, py150.train[0]) == "Text:\ndef add(a, b):\n    return\n\nAnswer:"  # no leading blank lines
    assert message(numglue, numglue.train[0]) == (
        "Solve the following math problem.\n\nText:\nThere are 68 car wheels. How many cars?\n\n"
        "Directly output only the numerical value as you answer.")
    assert message(fomc, fomc.train[0]) == ("What is the monetary policy stance? Choose A, B or C.\n\nStatement:\n"
                                            "Rates stay.\n\nAnswer:")
    # The whole chat text, as training and generation see it.
    tok = tiny_tokenizer()
    enc = encode_example(tok, cstance.instruction, cstance.train[0].input, cstance.suffix, cstance.train[0].label,
                         input_label=cstance.input_label)
    assert tok.decode(enc.input_ids) == ("<|im_start|>user\n" + message(cstance, cstance.train[0]) + "<|im_end|>\n"
                                         "<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")
    assert encode_task_example(tok, cstance, cstance.instruction, cstance.train[0]) == enc
    prompt = encode_generation_prompt(tok, py150.instruction, py150.train[0].input, py150.suffix,
                                      input_label=py150.input_label)
    assert tok.decode(prompt.input_ids) == ("<|im_start|>user\nText:\ndef add(a, b):\n    return\n\nAnswer:<|im_end|>\n"
                                            "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt.truncated


def test_input_label_in_content_hash_only_when_not_default():
    english = Task(name="t", instruction="Say it.", suffix="Answer:")
    assert english.content_hash() == Task(name="t", instruction="Say it.", suffix="Answer:",
                                          input_label="Text:").content_hash()
    # The hash of a task with the default label is what it was before the field existed: sha256 of the header
    # ["t", "Say it.", "Answer:", []] (no instances), as computed by the code of main before this change.
    assert english.content_hash() == "344d776fc445120b"
    assert Task(name="t", instruction="Say it.", suffix="Answer:", input_label="Code:").content_hash() \
        != english.content_hash()
    chinese = Task(name="t", instruction=CSTANCE_INSTRUCTION)
    assert chinese.input_label == "文本:"
    assert chinese.content_hash() != Task(name="t", instruction=CSTANCE_INSTRUCTION, input_label="Text:").content_hash()


def test_trace_scores_chinese_references_by_character(trace_dir, monkeypatch, fresh_accelerate_state):
    from accelerate import Accelerator

    summary, cstance = load_task("CN-SUMMARY", trace_dir), load_task("C-STANCE", trace_dir)
    assert evaluate.score_lang(summary.test) == "zh" and evaluate.score_lang(cstance.test) == "en"  # A/B/C: letters
    seen = {}

    def fake_generate(model, tokenizer, task, instruction, instances, accelerator, **kwargs):
        seen[task.name] = instruction
        return {"CN-SUMMARY": ["明年要修路"], "C-STANCE": ["A", "C"]}[task.name]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    accelerator = Accelerator(cpu=True)
    scores = evaluate.evaluate_task(None, None, summary, summary.instruction, accelerator, lang="auto")
    # characters: prediction 明年要修路 (5), reference 明年修路 (4), LCS 4: P = 4/5, R = 1, F = 2PR/(P+R) = 8/9
    assert math.isclose(scores.rougeL, 800 / 9) and scores.exact_match == 0.0
    scores = evaluate.evaluate_task(None, None, cstance, cstance.instruction, accelerator, lang="auto")
    assert scores.rougeL == 50.0 and scores.exact_match == 50.0  # "A" right, "C" for "B" wrong


def test_train_sapo_runs_trace_and_trains_the_empty_instruction_without_selection(trace_dir, tmp_path):
    """`--sequence trace`: tasks with an instruction are selected from their pools, Py150 (empty instruction) is
    trained as it is, and selection.json says so."""
    import train_sapo
    from tiny import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    pools = {"C-STANCE": ["请判断文本对指定对象的态度，并选择一项：A.支持，B.反对，C.中立。"],
             "FOMC": ["Which monetary policy stance does the statement take? Choose A, B or C."],
             "NumGLUE-cm": ["Work out the answer to this math problem."]}
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(pools, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "run"
    train_sapo.main(["--model", model_dir, "--data-dir", str(trace_dir), "--sequence", "trace", "--candidates",
                     str(candidates), "--output-dir", str(out), "--score-instances", "2", "--train-instances", "2",
                     "--epochs", "1", "--global-batch-size", "2", "--micro-batch-size", "2", "--eval-instances", "1",
                     "--max-new-tokens", "3", "--eval-batch-size", "2"])
    R = json.loads((out / "R.json").read_text())
    assert R["tasks"] == ["C-STANCE", "FOMC", "Py150", "NumGLUE-cm"] and len(R["rougeL"]) == 5
    # Every task is a TRACE task: R holds TRACE's own scores, recomputed here from the predictions, and the report
    # (metrics.json, R.csv) is on them.
    from tasks.trace_metrics import trace_score

    assert R["trace_metrics"] == {"C-STANCE": "accuracy", "FOMC": "accuracy", "Py150": "edit_similarity",
                                  "NumGLUE-cm": "accuracy"}
    for i, row_dir in enumerate(["0-zero-shot", "1-C-STANCE", "2-FOMC", "3-Py150", "4-NumGLUE-cm"]):
        for j, name in enumerate(R["tasks"]):
            records = [json.loads(line) for line in (out / row_dir / "predictions" / f"{name}.jsonl").read_text()
                       .splitlines()]
            assert R["trace"][i][j] == sum(trace_score(name, r["prediction"], r["references"]) for r in records) \
                / len(records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "trace" and metrics["AP"] == sum(R["trace"][4]) / 4
    py150 = json.loads((out / "3-Py150" / "selection.json").read_text())
    assert py150["method"] == "none" and py150["instruction"] == "" and len(py150["candidates"]) == 1
    assert "empty instruction" in py150["note"] and py150["candidates"][0]["score"] is None
    for k, name in ((1, "C-STANCE"), (2, "FOMC"), (4, "NumGLUE-cm")):
        selection = json.loads((out / f"{k}-{name}" / "selection.json").read_text())
        scores = [c["score"] for c in selection["candidates"]]
        assert selection["method"] == "sapo" and len(scores) == 2 and selection["selected"] == scores.index(min(scores))


# ---------------------------------------------------------------------------------------------------------------------
# TRACE's own scores (tasks/trace_metrics.py). Each value below is worked out by hand from TRACE's definitions; the
# same functions were compared with TRACE's metrics.py / evaluations/*.py run on fuzzywuzzy 0.18 and rouge 1.0.1.

def test_trace_accuracy_is_exact_string_equality():
    from tasks.trace_metrics import accuracy, answer_letter_accuracy, trace_score

    assert accuracy("A", "A") == 100.0 and accuracy("a", "A") == 0.0 and accuracy("A.", "A") == 0.0  # no normalising
    assert accuracy("", "") == 0.0  # TRACE skips an empty pair but still counts it
    assert trace_score("NumGLUE-cm", "17", ["17"]) == 100.0 and trace_score("NumGLUE-cm", "17.0", ["17"]) == 0.0
    # ScienceQA: the first character is the answer letter
    assert answer_letter_accuracy("B. 13 minutes", "B") == 100.0 and answer_letter_accuracy("A", "B\nBecause") == 0.0
    assert answer_letter_accuracy("", "B") == 0.0 and trace_score("ScienceQA", "Bfire", "B") == 100.0


def test_py150_edit_similarity_post_processing_and_ratio():
    from tasks.trace_metrics import edit_similarity, fuzz_ratio, py150_postprocess

    assert py150_postprocess("x = <NUM_LIT> + <STR_LIT:hi> + <STR_LIT> + <CHAR_LIT:'c'> + <NUM_LIT:12>") == \
        "x = 0 + hi +  + 'c' + 12"
    # difflib's ratio 2M/T: "abcd"/"abce" match "abc": 2*3/8 -> 75; "kitten"/"sitting" match "itt" + "n": 2*4/13 ->
    # 61.5 -> 62; one shared letter in 8+8: 2*1/16 = 12.5 -> 12 (Python rounds halves to even)
    assert (fuzz_ratio("abcd", "abce"), fuzz_ratio("kitten", "sitting"), fuzz_ratio("abcdefgh", "aijklmno")) == \
        (75, 62, 12)
    assert fuzz_ratio("x" * 10, "x" * 300) == 6  # 2*10/310 = 6.45: difflib's popular-element rule still extends it
    # difflib is not an edit distance: it takes the longest block "aa" (a[0:2] = b[2:4]) first, then nothing fits on
    # either side: 2*2/7 -> 57, where python-Levenshtein's ratio (LCS "aaa") would give 2*3/7 -> 86
    assert fuzz_ratio("aaa", "abaa") == 57
    assert fuzz_ratio("same", "same") == 100 and fuzz_ratio("", "x") == 0
    # post-processing first: "<STR_LIT>" vanishes on both sides, "<NUM_LIT>" becomes "0"
    assert edit_similarity("f(<STR_LIT>)", "f()") == 100.0
    assert edit_similarity("<NUM_LIT>", "1") == 0.0  # "0" vs "1": no common character
    assert edit_similarity("<STR_LIT>", "x") == 0.0  # empty after post-processing: skipped, counted 0


def test_meetingbank_rouge_l_is_the_rouge_package_with_the_reference_as_hypothesis():
    from tasks.trace_metrics import rouge_l_trace

    # rouge 1.0.1 counts distinct words: hypothesis slot = reference "the cat sat on the mat" {the,cat,sat,on,mat}
    # (n = 5), reference slot = prediction "the cat sat" (m = 3), union LCS 3: R = 3/3, P = 3/5, F = 2PR/(P+R) = 0.75
    # (rouge-score's token F1 would be 2 * 1 * 0.5 / 1.5 = 0.667)
    assert math.isclose(rouge_l_trace("the cat sat", "the cat sat on the mat"), 75.0, abs_tol=1e-5)
    # Sentences split on ".": "a b" and "c d" against "a c" and "b d": the union LCS of each sentence is 2 words,
    # 4 of 4 in all: F = 1 (the unsplit token LCS "a c d" would give 0.75)
    assert math.isclose(rouge_l_trace("a b. c d", "a c. b d"), 100.0, abs_tol=1e-5)
    assert rouge_l_trace("", "x y") == 0.0 and rouge_l_trace("...", "x y") == 0.0  # TRACE: skipped / would raise


def test_trace_scores_reach_evaluate_and_the_report(trace_dir, tmp_path, monkeypatch, fresh_accelerate_state):
    """evaluate_task adds TRACE's score for TRACE tasks only; a run whose tasks are all TRACE's is reported on it."""
    from accelerate import Accelerator

    answers = {"C-STANCE": ["A", "C"], "Py150": ["a+b"], "ScienceQA": ["B. 13 minutes", "A"],
               "MeetingBank": ["the cat sat"], "CN-SUMMARY": ["明年修路"]}
    monkeypatch.setattr(evaluate, "generate_answers", lambda model, tok, task, *a, **k: answers[task.name])
    accelerator = Accelerator(cpu=True)
    got = {}
    for name in answers:
        task = load_task(name, trace_dir)
        got[name] = evaluate.evaluate_task(None, None, task, task.instruction, accelerator, lang="auto",
                                           predictions_path=tmp_path / "pred" / f"{name}.jsonl")
    assert got["C-STANCE"].trace == 50.0 and got["C-STANCE"].trace_metric == "accuracy"
    # "a+b" vs "a + b": difflib matches "a", "+", "b": 2*3/8 = 75
    assert got["Py150"].trace == 75.0 and got["Py150"].trace_metric == "edit_similarity"
    assert got["Py150"].to_json() == {"rougeL": got["Py150"].rougeL, "exact_match": 0.0, "trace": 75.0,
                                      "trace_metric": "edit_similarity", "num_instances": 1}  # scores.json's keys
    assert got["ScienceQA"].trace == 50.0 and got["ScienceQA"].exact_match == 0.0  # letter B right, then A wrong
    assert math.isclose(got["MeetingBank"].trace, 75.0, abs_tol=1e-5)
    assert got["CN-SUMMARY"].trace is None and got["CN-SUMMARY"].trace_metric is None  # no TRACE definition
    assert set(got["CN-SUMMARY"].to_json()) == {"rougeL", "exact_match", "num_instances"}
    record = json.loads((tmp_path / "pred" / "Py150.jsonl").read_text().splitlines()[0])
    assert record["prediction"] == "a+b" and record["trace"] == 75.0

    # R of a 3-task TRACE run (rows: zero-shot, after task 1..3), reported on "trace" unless --metric says otherwise.
    # AP = (40+70+60)/3 = 56.67; BWT = mean(i=2: 50-80 = -30; i=3: mean(40-80, 70-90) = -30) = -30;
    # FWT = mean(i=1: mean(20-10, 30-20) = 10; i=2: 30-20 = 10) = 10
    trace = [[0, 10, 20], [80, 20, 30], [50, 90, 30], [40, 70, 60]]
    run = tmp_path / "run"
    run.mkdir()
    (run / "R.json").write_text(json.dumps({"tasks": ["C-STANCE", "FOMC", "Py150"], "trace": trace,
                                            "rougeL": [[v / 2 for v in row] for row in trace],
                                            "exact_match": [[0, 0, 0]] * 4,
                                            "trace_metrics": {"C-STANCE": "accuracy", "FOMC": "accuracy",
                                                              "Py150": "edit_similarity"}}))
    metrics = evaluate.report_metrics(run)
    assert metrics["metric"] == "trace"
    assert math.isclose(metrics["AP"], 170 / 3) and metrics["BWT"] == -30 and metrics["FWT"] == 10
    assert math.isclose(metrics["other"]["rougeL"]["AP"], 85 / 3)
    assert evaluate.main([str(run), "--metric", "rougeL"])["metric"] == "rougeL"
    assert evaluate.write_report(run)["metric"] == "trace"
    assert (run / "R.csv").read_text().splitlines()[4] == "after Py150,40.0000,70.0000,60.0000"
    (run / "R.json").write_text(json.dumps({"tasks": ["C-STANCE", "task195"], "rougeL": [[1, 2]]}))  # not all TRACE
    assert evaluate.report_metrics(run)["metric"] == "rougeL"
    with pytest.raises(evaluate.SapoError, match="has no 'trace' matrix .*every task of the run is a TRACE task"):
        evaluate.report_metrics(run, "trace")
