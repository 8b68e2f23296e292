"""train_sapo.py end to end on a tiny model: every method and selection mode, resume, reload with stock peft,
the O-LoRA penalty, the learning-rate schedule, and 1 vs 2 processes."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_sapo
from tasks.olora import olora_penalty
from tasks.schedule import lr_factor
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--sequence", "sentiment,count_words", "--score-instances", "4", "--max-candidates", "3",
         "--train-instances", "12", "--epochs", "2", "--global-batch-size", "8", "--micro-batch-size", "4",
         "--eval-instances", "6", "--max-new-tokens", "5", "--lr", "5e-3", "--eval-batch-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def run(model_dir, out, *extra):
    train_sapo.main(["--model", model_dir, "--output-dir", str(out), *SMALL, *extra])
    return json.loads((Path(out) / "R.json").read_text())


def reload_and_score(model_dir, out, R):
    """Load the final state with stock peft (PeftModel.from_pretrained + load_adapter) and re-evaluate every task."""
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import evaluate
    from tasks.loaders import load_task

    config = json.loads((out / "config.json").read_text())
    task_dirs = sorted(p for p in out.iterdir() if p.is_dir() and p.name[0].isdigit() and p.name[0] != "0")
    adapters = [str(d / "adapter") for d in task_dirs]
    if config["method"] == "seq-lora":
        adapters = adapters[-1:]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(a, adapter_name=f"a{i}")
    peft_model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    peft_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scores = []
    for name, task_dir in zip(R["tasks"], task_dirs):
        task = load_task(name, n_train=config["train_instances"])
        instruction = json.loads((task_dir / "selection.json").read_text())["instruction"]
        result = evaluate.evaluate_task(peft_model, tokenizer, task, instruction, Accelerator(),
                                        max_instances=config["eval_instances"], batch_size=4,
                                        max_new_tokens=config["max_new_tokens"], progress=False)
        scores.append(result.rougeL)
    return scores


@pytest.mark.parametrize("method,select", [("lora-inc", "sapo"), ("o-lora", "sapo"), ("seq-lora", "original"),
                                           ("lora-inc", "original")])
def test_end_to_end(model_dir, tmp_path, method, select):
    out = tmp_path / "run"
    R = run(model_dir, out, "--method", method, "--select", select)
    assert R["tasks"] == ["sentiment", "count_words"]
    assert len(R["rougeL"]) == 3 and all(len(row) == 2 for row in R["rougeL"])  # N+1 rows: zero-shot + 2
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("AP", "BWT", "FWT"):
        assert isinstance(metrics[key], float)
    assert metrics["AP"] == pytest.approx(sum(R["rougeL"][2]) / 2)
    for k, name in enumerate(R["tasks"], start=1):
        selection = json.loads((out / f"{k}-{name}" / "selection.json").read_text())
        if select == "original":
            assert selection["selected"] == 0 and len(selection["candidates"]) == 1
        else:
            scores = [c["score"] for c in selection["candidates"]]
            assert len(scores) == 3 and selection["selected"] == scores.index(min(scores))
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(R["tasks"]) and all(t["training_seconds"] > 0 for t in timings.values())
    # The saved adapters load with stock peft and give the run's final scores.
    assert reload_and_score(model_dir, out, R) == pytest.approx(R["rougeL"][-1], abs=1e-9)
    log = [json.loads(line) for line in (out / "1-sentiment" / "train_log.jsonl").read_text().splitlines()]
    if method == "o-lora":
        assert log[0]["olora_orth"] == 0.0  # no earlier adapter on the first task
        log2 = [json.loads(line) for line in (out / "2-count_words" / "train_log.jsonl").read_text().splitlines()]
        assert all(r["olora_orth"] > 0 for r in log2)


def test_resume_after_a_task_and_mid_training(model_dir, tmp_path, monkeypatch):
    reference = run(model_dir, tmp_path / "full", "--checkpoint-every", "1")

    # Stop after task 1: the second task's training is interrupted before it starts.
    real_train = train_sapo.train_task
    calls = {"n": 0}

    def stop_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_sapo, "train_task", stop_on_second)
    with pytest.raises(SystemExit):
        run(model_dir, tmp_path / "stopped", "--checkpoint-every", "1")
    monkeypatch.setattr(train_sapo, "train_task", real_train)
    assert (tmp_path / "stopped" / "1-sentiment" / "scores.json").exists()
    assert not (tmp_path / "stopped" / "2-count_words" / "adapter").exists()
    assert run(model_dir, tmp_path / "stopped", "--checkpoint-every", "1")["rougeL"] == reference["rougeL"]

    # Stop in the middle of task 2's training, right after its first checkpoint.
    real_save = train_sapo.save_checkpoint
    seen = {"n": 0}

    def stop_after_checkpoint(accelerator, checkpoint, step, extra=None):
        real_save(accelerator, checkpoint, step, extra)
        if "count_words" in str(checkpoint):
            seen["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(train_sapo, "save_checkpoint", stop_after_checkpoint)
    with pytest.raises(SystemExit):
        run(model_dir, tmp_path / "mid", "--checkpoint-every", "1")
    monkeypatch.setattr(train_sapo, "save_checkpoint", real_save)
    assert seen["n"] == 1 and (tmp_path / "mid" / "2-count_words" / "checkpoint" / "sapo_step.json").exists()
    resumed = run(model_dir, tmp_path / "mid", "--checkpoint-every", "1")
    assert resumed["rougeL"] == reference["rougeL"]
    log = (tmp_path / "mid" / "2-count_words" / "train_log.jsonl").read_text().splitlines()
    full_log = (tmp_path / "full" / "2-count_words" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log] == pytest.approx([json.loads(x)["loss"] for x in full_log], rel=1e-5)


def test_changed_config_is_refused_then_overwrite_moves_it_aside(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(model_dir, out, "--select", "original", "--sequence", "sentiment")
    before = (out / "R.json").read_text()
    with pytest.raises(SystemExit) as e:
        run(model_dir, out, "--select", "original", "--sequence", "sentiment", "--lr", "1e-3")
    assert e.value.code == 2
    assert "holds a run with another config (lr differ)" in capsys.readouterr().err
    assert (out / "R.json").read_text() == before  # nothing finished was touched
    run(model_dir, out, "--select", "original", "--sequence", "sentiment", "--lr", "1e-3", "--overwrite")
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(backups) == 1 and (backups[0] / "R.json").read_text() == before


def test_olora_penalty_matches_hand_computation():
    from peft import LoraConfig, get_peft_model

    from tasks.models import activate_adapters

    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, adapter_name="task1")
    peft_model.add_adapter("task2", config)
    peft_model.add_adapter("task3", config)
    activate_adapters(peft_model, ["task1", "task2", "task3"], trainable="task3")
    expected_orth, expected_l2 = 0.0, 0.0
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            a_new = proj.lora_A["task3"].weight.double()
            for prev in ("task1", "task2"):
                a_prev = proj.lora_A[prev].weight.double()
                for i in range(a_prev.shape[0]):
                    for j in range(a_new.shape[0]):
                        expected_orth += abs(float(a_prev[i] @ a_new[j]))
            expected_l2 += float(a_new.norm()) + float(proj.lora_B["task3"].weight.double().norm())
    total, orth = olora_penalty(peft_model, "task3", ["task1", "task2"], 0.5, 0.1)
    assert float(orth) == pytest.approx(expected_orth, rel=1e-5)
    assert float(total) == pytest.approx(0.5 * expected_orth + 0.1 * expected_l2, rel=1e-5)
    first_total, first_orth = olora_penalty(peft_model, "task1", [], 0.5, 0.0)
    assert float(first_total) == 0.0 and float(first_orth) == 0.0
    total.backward()  # the penalty trains only the new adapter
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["task3"].weight.grad is not None
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["task1"].weight.grad is None


def test_learning_rate_schedule_follows_the_formula(model_dir, tmp_path):
    out = tmp_path / "run"
    run(model_dir, out, "--select", "original", "--sequence", "sentiment", "--train-instances", "40",
        "--epochs", "3", "--warmup-ratio", "0.2", "--lr", "1e-3")
    log = [json.loads(line) for line in (out / "1-sentiment" / "train_log.jsonl").read_text().splitlines()]
    total = 3 * math.ceil(40 / 8)
    warmup = round(0.2 * total)
    assert len(log) == total
    for record in log:
        s = record["step"] - 1  # 0-based optimizer step; its lr: linear warmup, then cosine to 0
        expected = (1e-3 * (s + 1) / warmup if s < warmup else
                    1e-3 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
        assert record["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)


# DeepSpeed's WarmupLR, warmup_type "log", warmup_num_steps W = 5, as the authors' runs used it (factor of --lr at
# each 0-based optimizer step), computed by hand: step 0 runs at warmup_min_lr = 0 (set when WarmupLR is built), then
# step s at ln(s) / ln(5) up to s = 5, then constant 1.
# ln 2 / ln 5 = 0.693147 / 1.609438, ln 3 / ln 5 = 1.098612 / 1.609438, ln 4 / ln 5 = 1.386294 / 1.609438.
WARMUP_LOG_W5 = [0.0, 0.0, 0.430677, 0.682606, 0.861353, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_warmup_log_schedule_matches_the_hand_table(model_dir, tmp_path):
    assert [lr_factor(s, 15, 5, "warmup-log") for s in range(15)] == pytest.approx(WARMUP_LOG_W5, abs=1e-6)
    # DeepSpeed floors warmup_num_steps at 2: W = 1 behaves as W = 2.
    assert [lr_factor(s, 4, 1, "warmup-log") for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    # Warmup steps: the authors' rule (transformers' get_warmup_steps, ceil) for warmup-log; round for the others.
    ratio = train_sapo.Config(warmup_ratio=0.05, schedule="warmup-log")
    assert train_sapo.warmup_steps_of(ratio, 130) == 7 and train_sapo.warmup_steps_of(ratio, 160) == 8
    assert train_sapo.warmup_steps_of(train_sapo.Config(warmup_ratio=0.05), 130) == 6
    # The paper preset runs it; the schedule the scripts asked for is one flag away.
    assert train_sapo.parse_config(["--preset", "paper"])[0].schedule == "warmup-log"
    assert train_sapo.parse_config(["--preset", "paper", "--schedule", "cosine"])[0].schedule == "cosine"
    # A run: 40 instances x 3 epochs / 8 = 15 steps, warmup ceil(0.3 x 15) = 5; every step's logged rate is the table's.
    out = tmp_path / "run"
    run(model_dir, out, "--select", "original", "--sequence", "sentiment", "--train-instances", "40",
        "--epochs", "3", "--warmup-ratio", "0.3", "--lr", "1e-3", "--schedule", "warmup-log")
    log = [json.loads(line) for line in (out / "1-sentiment" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * f for f in WARMUP_LOG_W5], abs=1e-9)
    assert json.loads((out / "config.json").read_text())["schedule"] == "warmup-log"
    assert json.loads((out / "1-sentiment" / "training.json").read_text())["warmup_steps"] == 5


def test_one_and_two_processes_agree(model_dir, tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    common = ["train_sapo.py", "--model", model_dir, *SMALL]
    one = subprocess.run([accelerate, "launch", "--num_processes", "1", *common, "--output-dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29517",
                          *common, "--output-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "R.json").read_text())
    r2 = json.loads((tmp_path / "two" / "R.json").read_text())
    for k, name in enumerate(r1["tasks"], start=1):
        s1 = json.loads((tmp_path / "one" / f"{k}-{name}" / "selection.json").read_text())
        s2 = json.loads((tmp_path / "two" / f"{k}-{name}" / "selection.json").read_text())
        assert s1["selected"] == s2["selected"]
        assert [c["score"] for c in s1["candidates"]] == pytest.approx([c["score"] for c in s2["candidates"]],
                                                                       rel=1e-5)
    assert sum(r1["rougeL"], []) == pytest.approx(sum(r2["rougeL"], []), abs=1e-6)
    # Greedy predictions of the final state are the same text.
    for name in r1["tasks"]:
        p1 = (tmp_path / "one" / "2-count_words" / "predictions" / f"{name}.jsonl").read_text()
        p2 = (tmp_path / "two" / "2-count_words" / "predictions" / f"{name}.jsonl").read_text()
        assert [json.loads(x)["prediction"] for x in p1.splitlines()] == \
            [json.loads(x)["prediction"] for x in p2.splitlines()]
    l1 = (tmp_path / "one" / "2-count_words" / "train_log.jsonl").read_text().splitlines()
    l2 = (tmp_path / "two" / "2-count_words" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in l1] == pytest.approx([json.loads(x)["loss"] for x in l2], rel=1e-4)


def test_reselection_during_training_is_logged_and_counted(model_dir, tmp_path):
    out = tmp_path / "run"
    run(model_dir, out, "--sequence", "sentiment", "--reselect-every", "1", "--reselect-top", "2")
    selection = json.loads((out / "1-sentiment" / "selection.json").read_text())
    steps = 2 * math.ceil(12 / 8)
    assert [e["step"] for e in selection["reselections"]] == list(range(1, steps))  # not after the last step
    assert all(len(e["scores"]) == 2 for e in selection["reselections"])
    # Scored on the held-out training instances after the 12 trained on; the shortlist as pool indices (the switch
    # rule itself: tests/test_faithful.py).
    assert selection["reselect_instances"] == "train[12:16]"
    pool = {c["index"] for c in selection["candidates"]}
    assert all(set(e["candidates"]) <= pool and e["switched"] == ((e["lower_bound"] or 0) > 0)
               for e in selection["reselections"])
    assert selection["final_instruction"] in [c["instruction"] for c in selection["candidates"]]
    timings = json.loads((out / "timings.json").read_text())["sentiment"]
    assert timings["selection_seconds"] == pytest.approx(
        selection["seconds"] + sum(e["seconds"] for e in selection["reselections"]))
    assert timings["reselection_seconds"] > 0


GENERATING_LAUNCHER = '''
import json, os, runpy, sys
sys.path.insert(0, {root!r})
import tasks.paraphrases as paraphrases
import tasks.pools as pools

rank = int(os.environ.get("RANK", "0"))


def sample_local(model, tokenizer, prompt, n, temperature, seed):
    # The "model" writes valid tagged rewrites that name the process they were sampled on: if every process
    # sampled its own pool, the pools would differ between ranks.
    return ["<START>Version " + str(i) + " from rank " + str(rank) + ": decide whether the review is positive or "
            "negative overall.</START>" for i in range(n)]


paraphrases.sample_local = sample_local
real_build = pools.PoolSource.build


def build(self, task, **kwargs):
    pool = real_build(self, task, **kwargs)
    with open(os.path.join({out!r}, "pool-" + task.name + "-rank" + str(rank) + ".json"), "w") as f:
        json.dump(pool, f)
    return pool


pools.PoolSource.build = build
sys.argv = ["train_sapo.py", *sys.argv[1:]]
runpy.run_path(os.path.join({root!r}, "train_sapo.py"), run_name="__main__")
'''


def test_generated_pool_is_sampled_once_and_shared_by_every_process(model_dir, tmp_path):
    """--generate K on 2 processes: the main process samples, every process scores the same pool, original first."""
    launcher = tmp_path / "launch_generating.py"
    launcher.write_text(GENERATING_LAUNCHER.format(root=str(ROOT), out=str(tmp_path)))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
                           "--num_processes", "2", "--main_process_port", "29519", str(launcher),
                           "--model", model_dir, "--output-dir", str(tmp_path / "run"), *SMALL,
                           "--sequence", "sentiment", "--generate", "2", "--epochs", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tasks.loaders import load_task

    original = load_task("sentiment", n_train=8).instruction
    pools = [json.loads((tmp_path / f"pool-sentiment-rank{r}.json").read_text()) for r in (0, 1)]
    assert pools[0] == pools[1]  # the same candidates on both processes
    assert pools[0][0] == original and len(pools[0]) == 3  # the original is candidate 0, then the K paraphrases
    assert all("from rank 0:" in p for p in pools[0][1:])  # sampled on the main process only
    selection = json.loads((tmp_path / "run" / "1-sentiment" / "selection.json").read_text())
    assert [c["instruction"] for c in selection["candidates"]] == pools[0]
    cache = json.loads((tmp_path / "run" / "paraphrases.json").read_text())  # cached once, next to the run
    assert [entry["paraphrases"] for entry in cache.values()] == [pools[0][1:]]


# ----------------------------------------------------------------------------------------------------------------------
# Typed run records read what earlier versions wrote, and write it back key for key.

SCORES_JSON_BEFORE = {  # a row of R as train_sapo.py wrote it when a task's scores were a plain dict
    "row": "after sentiment",
    "scores": {"sentiment": {"rougeL": 62.5, "exact_match": 50.0, "num_instances": 16},
               "Py150": {"rougeL": 40.0, "exact_match": 0.0, "trace": 75.0, "trace_metric": "edit_similarity",
                         "num_instances": 4}},
    "seconds": 3.25}


def test_a_row_written_before_the_typed_scores_reads_and_writes_back_the_same(tmp_path):
    from tasks import SapoError
    from tasks.records import read_record

    path = tmp_path / "scores.json"
    path.write_text(json.dumps(SCORES_JSON_BEFORE, indent=2))
    row = read_record(path, train_sapo.Row)
    sentiment, py150 = row.scores["sentiment"], row.scores["Py150"]
    assert (sentiment.rougeL, sentiment.exact_match, sentiment.num_instances, sentiment.trace) == (62.5, 50.0, 16, None)
    assert (py150.score("trace"), py150.trace_metric, py150.score("exact_match")) == (75.0, "edit_similarity", 0.0)
    assert json.dumps(row.to_json()) == json.dumps(SCORES_JSON_BEFORE)  # the same keys, in the same order
    with pytest.raises(ValueError, match="unknown score 'rouge'"):
        sentiment.score("rouge")
    damaged = {**SCORES_JSON_BEFORE, "scores": {"sentiment": {"rougeL": 1.0, "exact_match": 0.0}}}
    path.write_text(json.dumps(damaged))
    with pytest.raises(SapoError, match="scores.json record: missing key scores.sentiment.num_instances"):
        read_record(path, train_sapo.Row)


def test_task_timings_are_the_timings_json_entry_written_before():
    training = train_sapo.Training(steps=12, accumulation=2, warmup_steps=1, seconds=40.0, reselection_seconds=1.5,
                                   gradient_checkpointing="off", estimated_peak_bytes=10, peak_memory_bytes=9,
                                   peak_memory="rss")
    chosen = train_sapo.TaskSelection(select="sapo", split="train", original="o", selection=train_sapo.score_prompts
                                      .Selection(task="t", method="sapo", selected=0, instruction="o", candidates=[],
                                                 seconds=8.0),
                                      reselections=[train_sapo.Reselection(5, [0], [1.0], 0, 0, None, None, False, "o",
                                                                           2.0)])
    row = train_sapo.Row(row="after t", scores={}, seconds=3.0)
    timings = train_sapo.task_timings(chosen, training, row)
    # timings.json's entry, key for key and in order, as the dict-building code wrote it
    assert json.dumps(timings.to_json()) == json.dumps({
        "steps": 12, "accumulation": 2, "warmup_steps": 1, "reselection_seconds": 1.5, "gradient_checkpointing": "off",
        "estimated_peak_bytes": 10, "peak_memory_bytes": 9, "peak_memory": "rss", "training_seconds": 40.0,
        "selection_seconds": 10.0, "evaluation_seconds": 3.0, "selection_overhead_pct": 25.0})
    untimed = train_sapo.task_timings(chosen, dataclasses.replace(training, seconds=0.0), row)
    assert untimed.selection_overhead_pct is None and "selection_overhead_pct" not in untimed.to_json()
