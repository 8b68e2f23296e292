"""Tests of evaluate.py: metrics on hand-computed matrices, ROUGE-L / exact match on hand-computed cases, batched
generation on a tiny model, the report CLI, bad input, and 1 vs 2 processes through `accelerate launch`."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import evaluate
from evaluate import cl_metrics, exact_match, generate_answers, markdown_table, rouge_l
from tasks.core import Instance, Task
from tasks.errors import SapoError
from tasks.prompts import encode_prompt
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close(a, b):
    return a is not None and math.isclose(a, b, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# Continual-learning metrics on hand-computed matrices (rows: 0 zero-shot, i after task i; columns: tasks 1..N)

R3 = [[10, 20, 30],   # zero-shot
      [50, 25, 35],   # after task 1
      [45, 60, 40],   # after task 2
      [40, 55, 70]]   # after task 3


def test_metrics_full_n3():
    m = cl_metrics(R3)
    # AP = (40 + 55 + 70) / 3 = 55
    assert close(m["AP"], 55.0)
    # BWT: i=2: (R21 - R11) = 45-50 = -5;  i=3: ((40-50) + (55-60)) / 2 = -7.5;  mean(-5, -7.5) = -6.25
    assert close(m["BWT"], -6.25)
    # FWT: i=1: ((25-20) + (35-30)) / 2 = 5;  i=2: (40-30) = 10;  mean(5, 10) = 7.5
    assert close(m["FWT"], 7.5)
    # BWT_last (GEM): ((40-50) + (55-60)) / 2 = -7.5
    assert close(m["BWT_last"], -7.5)
    # OP (TRACE): all 3 tasks seen -> (40 + 55 + 70) / 3 = 55
    assert close(m["OP"], 55.0)
    assert m["progress"]["complete"] and m["progress"]["num_tasks"] == 3 and m["progress"]["num_rows"] == 4
    assert m["rows_used"] == {"AP": [3], "BWT": [1, 2, 3], "FWT": [0, 1, 2], "BWT_last": [1, 2, 3], "OP": [3]}


def test_metrics_n1():
    m = cl_metrics([[12.5], [80.0]])
    # AP = OP = 80; BWT, FWT, BWT_last need two tasks
    assert close(m["AP"], 80.0) and close(m["OP"], 80.0)
    assert m["BWT"] is None and m["FWT"] is None and m["BWT_last"] is None
    assert m["progress"]["complete"]


def test_metrics_partial_2_of_4_rows():
    m = cl_metrics(R3[:2], num_tasks=3)  # zero-shot + after task 1 of 3
    # AP (row 1) = (50 + 25 + 35) / 3 = 36.666..
    assert close(m["AP"], 110 / 3)
    # FWT: only i=1: ((25-20) + (35-30)) / 2 = 5
    assert close(m["FWT"], 5.0)
    # OP: seen task 1 only -> 50
    assert close(m["OP"], 50.0)
    assert m["BWT"] is None and m["BWT_last"] is None  # nothing to forget yet
    assert not m["progress"]["complete"] and m["progress"]["num_rows"] == 2 and m["rows_used"]["FWT"] == [0, 1]
    assert "partial" in m["progress"]["note"]


def test_metrics_partial_3_of_5_rows():
    R = [[10, 20, 30, 40],
         [60, 30, 20, 50],
         [50, 70, 40, 45]]
    m = cl_metrics(R, num_tasks=4)
    # AP (row 2) = (50 + 70 + 40 + 45) / 4 = 51.25
    assert close(m["AP"], 51.25)
    # BWT: i=2 only: 50 - 60 = -10
    assert close(m["BWT"], -10.0)
    # FWT: i=1: ((30-20) + (20-30) + (50-40)) / 3 = 10/3;  i=2: ((40-30) + (45-40)) / 2 = 7.5;  mean = 65/12
    assert close(m["FWT"], (10 / 3 + 7.5) / 2)
    # BWT_last (row 2): 50 - 60 = -10
    assert close(m["BWT_last"], -10.0)
    # OP: tasks 1, 2 seen: (50 + 70) / 2 = 60
    assert close(m["OP"], 60.0)


def test_metrics_zero_shot_only():
    m = cl_metrics([[10, 20, 30]], num_tasks=3)
    assert close(m["AP"], 20.0)
    assert all(m[k] is None for k in ("BWT", "FWT", "BWT_last", "OP"))


@pytest.mark.parametrize("R,n", [([], None), ([[1, 2], [3]], None), ([[1], [2], [3]], None), ([[1, 2]], 3),
                                 ([[1, float("nan")]], None), ([[1, "x"]], None)])
def test_metrics_bad_matrix(R, n):
    with pytest.raises(SapoError):
        cl_metrics(R, n)


def test_markdown_table():
    table = markdown_table(R3, ["a", "b", "c"])
    lines = table.splitlines()
    assert lines[0] == "| | a | b | c | mean |"
    assert lines[2] == "| zero-shot | 10.0 | 20.0 | 30.0 | 20.0 |"
    assert lines[-1] == "| after c | 40.0 | 55.0 | 70.0 | 55.0 |"
    assert len(lines) == 2 + 4


# ----------------------------------------------------------------------------------------------------------------------
# ROUGE-L and exact match


def test_rouge_l_hand_computed():
    # pred tokens [the, cat, is, run], ref [a, cat, run]: LCS 2, P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert math.isclose(rouge_l("the cat is running", ["a cat runs"]), 400 / 7)
    # stemming: running -> run, cats -> cat
    assert rouge_l("running", ["run"]) == 100.0
    assert rouge_l("Cats!", ["cat"]) == 100.0
    assert rouge_l("", ["anything"]) == 0.0 and isinstance(rouge_l("", ["x"]), float)


def test_rouge_l_max_over_references():
    # vs "the cat sat down": LCS 3, P = 1, R = 3/4, F = 6/7; vs "dog": 0
    assert math.isclose(rouge_l("the cat sat", ["dog", "the cat sat down"]), 600 / 7)
    assert rouge_l("dog", ["dog", "the cat sat down"]) == 100.0


def test_rouge_l_chinese():
    # rouge-score's default tokenizer drops every non-[a-z0-9] character: Chinese would always score 0
    assert rouge_l("我支持这个观点", ["支持"]) == 0.0
    # character tokens: pred 7 chars, ref 2, LCS 2: P = 2/7, R = 1, F = 4/9
    assert math.isclose(rouge_l("我支持这个观点", ["支持"], lang="zh"), 400 / 9)
    assert rouge_l("中立", ["支持", "中立"], lang="zh") == 100.0
    # Latin words inside Chinese text are still words (and stemmed)
    assert rouge_l("支持 Running", ["支持 run"], lang="zh") == 100.0


def test_exact_match():
    assert exact_match("  Positive! ", ["positive"]) == 100.0
    assert exact_match("The  answer, is:\nYES.", ["the answer is yes"]) == 100.0
    assert exact_match("pos", ["positive"]) == 0.0
    assert exact_match("yes.", ["no", "Yes"]) == 100.0  # max over references
    assert exact_match("支持。", ["支持"]) == 100.0  # Unicode punctuation too


# ----------------------------------------------------------------------------------------------------------------------
# Generation on a tiny model


@pytest.fixture
def one_thread():
    # Two CPU cores shared with other jobs: a second OpenMP thread only spins. Restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def make_task(inputs, outputs=None):
    outputs = outputs or ["positive"] * len(inputs)
    return Task(name="toy", instruction="Classify the sentiment of the review as positive or negative.",
                suffix="Answer with positive or negative.", label_words=("positive", "negative"),
                test=[Instance(i, o) for i, o in zip(inputs, outputs)])


INPUTS = ["great", "the movie was great and the actors were wonderful, the quick brown fox jumps over the lazy dog",
          "lazy dog", "Sort the numbers in increasing order: 3 1 2", "the actors were wonderful"]


def reference_answer(model, tokenizer, task, instance, max_new_tokens):
    """Unbatched, unpadded greedy generation, decoded after the prompt and up to the first stop token."""
    ids = encode_prompt(tokenizer, task.instruction, instance.input, task.suffix)
    stops = evaluate.stop_token_ids(tokenizer, model)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    tokens = out[:next((k for k, t in enumerate(out) if t in stops), len(out))]
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_batched_generation_equals_unbatched(one_thread, accelerator):
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    task = make_task(INPUTS)
    lengths = {len(encode_prompt(tokenizer, task.instruction, i.input, task.suffix)) for i in task.test}
    assert len(lengths) == len(INPUTS)  # all prompt lengths differ: batches really are padded
    batched = generate_answers(model, tokenizer, task, task.instruction, task.test, accelerator, batch_size=3,
                               max_new_tokens=6, progress=False)
    single = generate_answers(model, tokenizer, task, task.instruction, task.test, accelerator, batch_size=1,
                              max_new_tokens=6, progress=False)
    assert batched == single
    for inst, answer in zip(task.test, batched):
        assert answer == reference_answer(model, tokenizer, task, inst, 6)[1]
        assert inst.input not in answer and "Text:" not in answer and task.suffix not in answer
    assert not model.training  # the mode it came in with


def test_generation_stops_at_eos_and_restores_training_mode(one_thread, accelerator):
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    task = make_task(INPUTS[:1])
    tokens, _ = reference_answer(model, tokenizer, task, task.test[0], 8)
    assert len(tokens) >= 3
    stop = tokens[2]  # make the third generated token the EOS: the answer is what came before its first occurrence
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    expected = tokenizer.decode(tokens[:tokens.index(stop)], skip_special_tokens=True).strip()
    model.train()
    assert generate_answers(model, tokenizer, task, task.instruction, task.test, accelerator, max_new_tokens=8,
                            progress=False) == [expected]
    assert model.training


def test_stop_tokens_include_chat_end_of_turn():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"  # EOS differs from the template's end-of-turn
    stops = evaluate.stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in stops


def test_evaluate_task_scores_and_predictions(tmp_path, monkeypatch, accelerator):
    task = make_task(["a", "b", "c", "d"], [["yes", "Yes!"], ["no"], ["支持"], ["the cat sat down"]])
    answers = ["YES", "maybe", "我支持", "the cat sat"]
    monkeypatch.setattr(evaluate, "generate_answers", lambda *a, **k: answers[:len(a[4])])
    path = tmp_path / "sub" / "toy.jsonl"
    scores = evaluate.evaluate_task(None, None, task, task.instruction, accelerator, predictions_path=path,
                                    lang="auto")
    # lang auto -> zh (a reference holds Chinese). rougeL: 100, 0, 2*(2/3)/(5/3) = 80, "the cat sat" vs "the cat sat
    # down" (word tokens): 6/7; EM: 100, 0, 0, 0
    assert math.isclose(scores.rougeL, (100 + 0 + 80 + 600 / 7) / 4) and scores.score("rougeL") == scores.rougeL
    assert scores.exact_match == 25.0 and scores.num_instances == 4
    assert scores.trace is None and scores.score("trace") is None  # not a TRACE task
    assert scores.to_json() == {"rougeL": scores.rougeL, "exact_match": 25.0, "num_instances": 4}  # as always written
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["prediction"] for r in records] == answers
    assert records[0] == {"input": "a", "references": ["yes", "Yes!"], "prediction": "YES", "rougeL": 100.0,
                          "exact_match": 100.0}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert evaluate.evaluate_task(None, None, task, "x", accelerator, max_instances=2).num_instances == 2
    with pytest.raises(SapoError):
        evaluate.evaluate_task(None, None, task, "x", accelerator, split="dev")  # empty split


# ----------------------------------------------------------------------------------------------------------------------
# Report CLI


def write_run(run_dir, rows=4):
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks = ["task_a", "task_b", "task_c"]
    data = {"tasks": tasks, "rows": ["zero-shot"] + [f"after {t}" for t in tasks][:rows - 1],
            "rougeL": R3[:rows], "exact_match": [[v / 2 for v in row] for row in R3[:rows]]}
    (run_dir / "R.json").write_text(json.dumps(data))
    return run_dir


def test_report_cli(tmp_path, capsys):
    run = write_run(tmp_path / "run1")
    evaluate.main([str(run)])
    assert sorted(p.name for p in run.iterdir()) == ["R.json"]  # reporting alone writes nothing
    evaluate.main([str(run), "--write"])
    out = capsys.readouterr().out
    assert "| after task_c | 40.0 | 55.0 | 70.0 | 55.0 |" in out and "BWT" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "rougeL" and metrics["tasks"] == ["task_a", "task_b", "task_c"]
    assert (metrics["AP"], metrics["BWT"], metrics["FWT"], metrics["BWT_last"], metrics["OP"]) == (55, -6.25, 7.5,
                                                                                                   -7.5, 55)
    assert metrics["other"]["exact_match"]["AP"] == 27.5  # every score halved
    csv_lines = (run / "R.csv").read_text().splitlines()
    assert csv_lines[0] == "row,task_a,task_b,task_c"
    assert csv_lines[1] == "zero-shot,10.0000,20.0000,30.0000"
    assert csv_lines[4] == "after task_c,40.0000,55.0000,70.0000"
    assert (run / "R_exact_match.csv").read_text().splitlines()[4] == "after task_c,20.0000,27.5000,35.0000"
    assert (run / "R.png").stat().st_size > 1000


def test_report_without_matplotlib(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    metrics = evaluate.write_report(run)
    out = capsys.readouterr().out
    assert metrics["AP"] == 55 and (run / "R.csv").exists() and not (run / "R.png").exists()
    assert out.count("\n") == 1 and "matplotlib is not installed" in out


def test_compare_cli(tmp_path, capsys):
    a, b = write_run(tmp_path / "orig"), write_run(tmp_path / "sapo", rows=2)
    reports = evaluate.main(["--compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert "| metric | orig | sapo |" in out
    assert "| AP | 55.00 | 36.67 |" in out and "| BWT | -6.25 | n/a |" in out and "| rows | 4/4 | 2/4 |" in out
    assert reports["sapo"]["progress"]["complete"] is False


def snapshot(run_dir):
    """Every file of a run: name -> (bytes, mtime_ns)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir())}


def test_report_and_compare_never_modify_runs(tmp_path, capsys, monkeypatch):
    a, b = write_run(tmp_path / "orig"), write_run(tmp_path / "sapo", rows=2)
    evaluate.main([str(a), "--write"])  # a finished run has its report files (rougeL)
    capsys.readouterr()
    before = {run: snapshot(run) for run in (a, b)}

    def no_writes(*args, **kwargs):
        raise AssertionError("a report without --write tried to write a file")

    monkeypatch.setattr(evaluate, "write_text_atomic", no_writes)  # root ignores chmod: catch any write attempt too
    monkeypatch.setattr(evaluate, "plot_heatmap", no_writes)
    for run in (a, b):
        run.chmod(0o555)
        for f in run.iterdir():
            f.chmod(0o444)
    try:
        reports = evaluate.main(["--compare", str(a), str(b), "--metric", "exact_match"])
        metrics = evaluate.main([str(b), "--metric", "exact_match"])
    finally:
        for run in (a, b):
            run.chmod(0o755)
    assert {run: snapshot(run) for run in (a, b)} == before
    assert reports["orig"]["metric"] == "exact_match" and reports["orig"]["AP"] == 27.5
    assert math.isclose(metrics["AP"], 55 / 3)  # exact match = R3 halved; last row given is row 1: (25+12.5+17.5)/3
    assert "wrote" not in capsys.readouterr().out


def test_write_into_unwritable_run_is_one_line(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run")

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(evaluate, "write_text_atomic", refuse)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "--write"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write the report into {run}: Permission denied\n"


@pytest.mark.parametrize("content,message", [
    ("{not json", "malformed JSON"),
    (json.dumps({"rows": [], "rougeL": [[1]]}), "tasks"),
    (json.dumps({"tasks": ["a", "b"], "rougeL": [[1, 2], [3]]}), "row 1 has 1 scores"),
    (json.dumps({"tasks": ["a"], "rougeL": [[1], [2], [3]]}), "3 rows for 1 tasks"),
    (json.dumps({"tasks": ["a"], "exact": [[1]]}), "no score matrix"),
])
def test_report_bad_input(tmp_path, capsys, content, message):
    (tmp_path / "R.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_run_dir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: run directory not found: {tmp_path / 'nope'}"]


# ----------------------------------------------------------------------------------------------------------------------
# 1 vs 2 processes through the CLI (SAPO-layout data dir, tiny model dir)


def write_data_dir(root, tasks=("alpha_task", "beta_task"), n_test=7):
    words = "the quick brown fox jumps over the lazy dog , the movie was great and the actors were wonderful".split()
    meta = {}
    for t, task in enumerate(tasks):
        (root / task).mkdir(parents=True)
        for split, n in (("train", 2), ("dev", 1), ("test", n_test)):
            # lengths 1..n_test+t words in a scrambled order: odd count, uneven shards, different paddings
            records = [{"sentence": " ".join(words[(i + t) % 7:(i + t) % 7 + 1 + (3 * i) % (n_test + t)]),
                        "label": ["positive", "negative"][i % 2]} for i in range(n)]
            (root / task / f"{split}.json").write_text(json.dumps(records))
        meta[task] = {"instruction": "Classify the sentiment of the review as positive or negative.",
                      "suffix": "Directly output only positive or negative as your answer.",
                      "labels": ["positive", "negative"]}
    (root / "instructions.json").write_text(json.dumps(meta))
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_vs_two_processes(tmp_path, one_thread, accelerator, capsys):
    model = save_tiny_model_dir(tmp_path / "model")
    data = write_data_dir(tmp_path / "data")
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps({"alpha_task": {"instruction": "Say {positive} or {negative}: {0}"}}))
    args = ["--model", model, "--tasks", "alpha_task,beta_task", "--data-dir", str(data), "--max-new-tokens", "6",
            "--batch-size", "2", "--no-progress", "--instructions", str(instructions)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    evaluate.main([*args, "--output-dir", str(tmp_path / "one")])  # 1 process: in this process (saves a start-up)
    assert capsys.readouterr().out.count("alpha_task: rougeL") == 1
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), "evaluate.py", *args,
                          "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for task in ("alpha_task", "beta_task"):
        a = (tmp_path / "one" / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        b = (tmp_path / "two" / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        assert a == b
        inputs = [json.loads(line)["input"] for line in a.splitlines()]
        expected = [r["sentence"] for r in json.loads((data / task / "test.json").read_text())]
        assert inputs == expected  # every instance once, in the file's order
    assert (tmp_path / "one" / "scores.json").read_text() == (tmp_path / "two" / "scores.json").read_text()
    results = json.loads((tmp_path / "one" / "scores.json").read_text())["results"]
    assert [r["instruction"] for r in results] == ["Say {positive} or {negative}: {0}",
                                                   "Classify the sentiment of the review as positive or negative."]
    assert [r["num_instances"] for r in results] == [7, 7]
    assert two.stdout.count("alpha_task: rougeL") == 1  # printed by the main process only


# ----------------------------------------------------------------------------------------------------------------------
# Run mode: instructions stored in an adapter stack, --dtype, and the note on shortened inputs


def test_run_prompts_with_the_stack_instructions(tmp_path, monkeypatch, capsys):
    model = save_tiny_model_dir(tmp_path / "model")
    data = write_data_dir(tmp_path / "data")
    original = "Classify the sentiment of the review as positive or negative."
    task_dir = tmp_path / "run" / "1-alpha_task"
    task_dir.mkdir(parents=True)
    (task_dir / "sapo_stack.json").write_text(json.dumps(
        {"base_model": model, "adapters": [], "instructions": {"alpha_task": "Say {positive} or {negative}."}}))
    used = {}

    def fake_evaluate_task(model, tokenizer, task, instruction, accelerator, **kwargs):
        used[task.name] = (instruction, next(model.parameters()).dtype)
        return evaluate.TaskScores(rougeL=50.0, exact_match=0.0, num_instances=7)

    monkeypatch.setattr(evaluate, "evaluate_task", fake_evaluate_task)
    args = ["--model", str(task_dir), "--tasks", "alpha_task,beta_task", "--data-dir", str(data), "--dtype", "bf16"]
    results = evaluate.main(args)
    assert used == {"alpha_task": ("Say {positive} or {negative}.", torch.bfloat16),
                    "beta_task": (original, torch.bfloat16)}
    assert [r.instruction_source for r in results] == ["stack", "original"]
    assert (f"note: alpha_task prompted with the instructions stored in {task_dir / 'sapo_stack.json'}"
            in capsys.readouterr().out)
    evaluate.main(args + ["--original-instructions", "--dtype", "auto"])
    assert used == {"alpha_task": (original, torch.float32), "beta_task": (original, torch.float32)}
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"alpha_task": "Answer positive or negative."}))
    results = evaluate.main(args + ["--instructions", str(given)])
    assert used["alpha_task"][0] == "Answer positive or negative." and results[0].instruction_source == "file"


def test_shortened_inputs_are_noted(one_thread, accelerator, capsys):
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    task = make_task(["great", "the quick brown fox " * 40, "lazy dog " * 40])
    limit = len(encode_prompt(tokenizer, task.instruction, "great", task.suffix)) + 20
    generate_answers(model, tokenizer, task, task.instruction, task.test, accelerator, max_new_tokens=1,
                     max_prompt_tokens=limit, progress=False)
    assert capsys.readouterr().out == (f"note: 2 of 3 inputs of task toy were shortened to fit the prompt limit of "
                                       f"{limit} tokens\n")
