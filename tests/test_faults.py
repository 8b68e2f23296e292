"""Faults a new user meets, each one line and nothing lost: a diverging run stops at its first non-finite step (no
adapter, no row, the last finite checkpoint kept) and every JSON written is strict; length limits beyond the model's
context; run records of the wrong shape; text no tokenizer can encode; SIGTERM like SIGINT, then a resume equal to an
uninterrupted run; a GGUF file as --model."""
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import probe_prompts
import score_prompts
import train_sapo
from tasks.divergence import check_finite_step
from tasks.errors import SapoError
from tasks.loaders import write_json
from tasks.paraphrases import read_paraphrase_cache
from tasks.score_cache import read_score_cache
from test_reliability import TASK, exit_line, toy_args
from test_tasks import write_sapo_dir
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def strict_load(text: str):
    """json.loads that refuses NaN / Infinity (what a strict reader does)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def every_json_is_strict(run_dir: Path):
    for path in run_dir.rglob("*.json*"):
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                strict_load(line)
        elif path.suffix == ".json":
            strict_load(path.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# 1. A diverging run stops at its first non-finite step; strict JSON everywhere.

def test_diverging_run_stops_in_one_line_and_keeps_the_last_finite_checkpoint(model_dir, tmp_path, capsys):
    data = write_sapo_dir(tmp_path / "data")
    out = tmp_path / "run"
    # lr 1e37: Adam moves every LoRA weight by about the learning rate, so after step 1 the adapter's output overflows
    # float32 and step 2's loss is NaN (before: training went on, saved a NaN adapter, printed AP = 0.00 and exit 0).
    args = toy_args(model_dir, data, out, "--lr", "1e37", "--global-batch-size", "2", "--micro-batch-size", "2",
                    "--epochs", "2", "--warmup-ratio", "0", "--checkpoint-every", "1")
    code, line = exit_line(train_sapo.main, args, capsys)
    task_dir = out / f"1-{TASK}"
    assert code == 2
    assert line == (f"error: task 1-{TASK}: training diverged at step 2/6: the loss is nan at learning rate 1e+37; "
                    f"no adapter and no row were saved for it, its last finite checkpoint (step 1) is kept in "
                    f"{task_dir / 'checkpoint'}; try a lower --lr (or a smaller --max-grad-norm, a longer "
                    "--warmup-ratio, --dtype fp32) and rerun with --overwrite or another --output-dir")
    assert not (task_dir / "adapter").exists() and not (task_dir / "training.json").exists()
    assert not (task_dir / "scores.json").exists()
    assert strict_load((out / "R.json").read_text())["rows"] == ["zero-shot"]  # no row after the task
    # The checkpoint kept is step 1's, and every weight in it is finite.
    assert strict_load((task_dir / "checkpoint" / "sapo_step.json").read_text())["step"] == 1
    from safetensors.torch import load_file

    saved = load_file(str(task_dir / "checkpoint" / "model.safetensors"))
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    log = [strict_load(x) for x in (task_dir / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1] and math.isfinite(log[0]["loss"])  # the NaN step is not logged
    every_json_is_strict(out)


def test_an_update_that_breaks_the_weights_stops_even_with_a_finite_loss(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    check_finite_step(accelerator, "t", 1, 4, torch.tensor(6.0), 3, torch.tensor(0.5), 1e-3, weights,
                      tmp_path / "checkpoint")  # all finite: returns
    with torch.no_grad():
        weights[1][0] = float("inf")
    with pytest.raises(SapoError) as e:
        check_finite_step(accelerator, "t", 3, 4, torch.tensor(6.0), 3, torch.tensor(0.5), 1e-3, weights,
                          tmp_path / "checkpoint")
    assert str(e.value).startswith("task t: training diverged at step 3/4: the update made the adapter's weights "
                                   "non-finite (loss 2) at learning rate 0.001; no adapter and no row were saved for "
                                   "it, no checkpoint was written yet;")
    with pytest.raises(SapoError, match="diverged at step 2/4: the O-LoRA penalty is inf"):
        check_finite_step(accelerator, "t", 2, 4, torch.tensor(6.0), 3, torch.tensor(float("inf")), 1e-3,
                          weights[:1], tmp_path / "checkpoint")


def test_the_json_writer_refuses_nan_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "R.json"
    with pytest.raises(SapoError) as e:
        write_json(path, {"rows": ["zero-shot"], "rougeL": [[12.5, float("nan")]]})
    assert str(e.value) == f"refusing to write rougeL[0][1] = nan into {path}: a non-finite number is not JSON"
    assert not path.exists()


def test_a_non_finite_candidate_score_is_an_error_not_a_pick(model_dir):
    from tasks.loaders import load_task

    task = load_task("sentiment", seed=0, n_train=4)
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    with torch.no_grad():  # a damaged state: one NaN weight makes every candidate's loss NaN
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    pool = score_prompts.PoolSource(max_candidates=2).build(task)
    with pytest.raises(SapoError, match=r"^task sentiment: candidate 0 scored nan, not a finite loss"):
        score_prompts.select_candidates(model, tokenizer, task, pool, task.train[:2], progress=False)
    # racing goes through the same scorer
    with pytest.raises(SapoError, match=r"^task sentiment: candidate 0 scored nan"):
        score_prompts.select_candidates(model, tokenizer, task, pool, task.train[:2],
                                        settings=score_prompts.ScoringSettings(method="sapo-race", race_first=2),
                                        progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Length limits against the model's context (the tiny model's max_position_embeddings is 2048).

def test_score_prompts_max_length_beyond_the_context_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    base = ["--model", model_dir, "--task", "sentiment", "--instances", "2", "--max-candidates", "2", "--no-cache",
            "--no-progress"]
    scored = {}
    real = score_prompts.select_candidates

    def record(*a, **k):
        scored["max_length"] = inspect.signature(real).bind(*a, **k).arguments["settings"].max_length
        return real(*a, **k)

    monkeypatch.setattr(score_prompts, "select_candidates", record)
    code, line = exit_line(score_prompts.main, base + ["--max-length", "2049"], capsys)
    assert (code, line) == (2, f"error: --max-length = 2049 tokens is beyond the model's context "
                               f"(max_position_embeddings 2048 in {model_dir}): lower it, or pass "
                               "--allow-beyond-context for a model whose context is extended (RoPE scaling)")
    assert "max_length" not in scored  # refused before any scoring
    score_prompts.main(base + ["--max-length", "2048"])
    assert scored["max_length"] == 2048
    score_prompts.main(base + ["--max-length", "2049", "--allow-beyond-context"])
    assert scored["max_length"] == 2049


def test_evaluate_prompt_plus_new_tokens_beyond_the_context_is_refused(model_dir, tmp_path, capsys):
    import evaluate

    out = tmp_path / "eval"
    base = ["--model", model_dir, "--tasks", "sentiment", "--max-instances", "2", "--no-progress",
            "--output-dir", str(out), "--max-prompt-tokens", "2000"]
    code, line = exit_line(evaluate.main, base + ["--max-new-tokens", "49"], capsys)
    assert (code, line) == (2, "error: --max-prompt-tokens + --max-new-tokens = 2049 tokens is beyond the model's "
                               f"context (max_position_embeddings 2048 in {model_dir}): lower it, or pass "
                               "--allow-beyond-context for a model whose context is extended (RoPE scaling)")
    assert not out.exists()  # refused before any answer was generated or written
    evaluate.main(base + ["--max-new-tokens", "48"])  # at the context exactly: runs
    evaluate.main(base + ["--max-new-tokens", "49", "--allow-beyond-context"])
    assert (out / "predictions" / "sentiment.jsonl").exists()


def test_train_sapo_and_probe_lengths_beyond_the_context_are_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = toy_args(model_dir, write_sapo_dir(tmp_path / "data"), out, "--max-source-length", "2000",
                    "--max-target-length", "49")
    code, line = exit_line(train_sapo.main, args, capsys)
    assert (code, line) == (2, "error: --max-source-length + --max-target-length = 2049 tokens is beyond the model's "
                               f"context (max_position_embeddings 2048 in {model_dir}): lower it, or pass "
                               "--allow-beyond-context for a model whose context is extended (RoPE scaling)")
    assert not (out / "0-zero-shot").exists()  # before the zero-shot evaluation
    config, _ = train_sapo.parse_config(args[:-4] + ["--max-source-length", "2000", "--max-new-tokens", "49",
                                                     "--max-target-length", "8"])
    with pytest.raises(SapoError, match=r"^--max-source-length \+ --max-new-tokens = 2049 tokens is beyond"):
        train_sapo.check_model_context(tiny_model(64), config)
    config.allow_beyond_context = True
    train_sapo.check_model_context(tiny_model(64), config)
    probe, _ = probe_prompts.parse_config(["--model", model_dir, "--max-source-length", "2040",
                                           "--max-target-length", "9"])
    with pytest.raises(SapoError, match=r"^--max-source-length \+ --max-target-length = 2049 tokens is beyond"):
        train_sapo.check_model_context(tiny_model(64), probe)  # what probe_prompts calls once the model is read


# ----------------------------------------------------------------------------------------------------------------------
# 4. Run records that are valid JSON but of the wrong shape: one line naming the file and what is wrong.

@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    """A finished toy run (one task, the original instruction) and its data."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    root = tmp_path_factory.mktemp("finished")
    data = write_sapo_dir(root / "data")
    train_sapo.main(toy_args(model_dir, data, root / "run"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    return root / "run", data


def _drop(key):
    def change(record):
        del record[key]
        return record
    return change


def _set(key, value):
    def change(record):
        record[key] = value
        return record
    return change


TASK_DIR = f"1-{TASK}"
REDO = f"restore it, or delete {{run}}/{TASK_DIR} and every later task folder to redo them"


@pytest.mark.parametrize("file,change,problem,advice", [
    (f"{TASK_DIR}/selection.json", _drop("select"), "missing key select", REDO),
    (f"{TASK_DIR}/selection.json", _set("candidates", [{"index": 0}]), "missing key candidates[0].instruction",
     REDO),
    (f"{TASK_DIR}/selection.json", _set("selected", "0"), "selected must be an integer, got a string", REDO),
    (f"{TASK_DIR}/selection.json", lambda r: [r], "the record must be an object, got a list", REDO),
    (f"{TASK_DIR}/training.json", _set("surprise", 1), "unexpected key surprise", REDO),
    (f"{TASK_DIR}/training.json", _set("steps", None), "steps must be an integer, got null", REDO),
    (f"{TASK_DIR}/scores.json", lambda r: {**r, "scores": {TASK: {"rougeL": 1.0}}},
     f"missing key scores.{TASK}.exact_match", "delete it to evaluate that row again"),
    ("0-zero-shot/scores.json", _drop("seconds"), "missing key seconds", "delete it to evaluate that row again"),
    ("config.json", lambda r: {**r, "run_key": {**r["run_key"], "tasks": "task900"}},
     "run_key.tasks must be a list, got a string", "restore it, or use another --output-dir"),
    ("config.json", lambda r: {**r, "run_key": {**r["run_key"], "pools": {"a": 1}}},
     "run_key.pools.a must be a string, got an integer", "restore it, or use another --output-dir"),
])
def test_a_record_of_the_wrong_shape_is_one_line_naming_the_file(finished_run, tmp_path, capsys, file, change,
                                                                  problem, advice, model_dir):
    run, data = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, copy), capsys)
    name = Path(file).name
    assert (code, line) == (2, f"error: {path} is not a valid {name} record: {problem}; "
                               f"{advice.format(run=copy)}")
    # Malformed JSON in the same file gets the same advice.
    path.write_text("{")
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, copy), capsys)
    assert code == 2 and line.startswith(f"error: malformed JSON in {path}: ")
    assert line.endswith(f"; {advice.format(run=copy)}")


def test_a_damaged_checkpoint_record_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    data = write_sapo_dir(tmp_path / "data")
    out = tmp_path / "run"
    args = toy_args(model_dir, data, out, "--global-batch-size", "2", "--checkpoint-every", "1")
    real_save = train_sapo.save_checkpoint

    def killed_after_step_1(accelerator, checkpoint, step, extra=None):
        real_save(accelerator, checkpoint, step, extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sapo, "save_checkpoint", killed_after_step_1)
    assert exit_line(train_sapo.main, args, capsys)[0] == 130
    monkeypatch.setattr(train_sapo, "save_checkpoint", real_save)
    checkpoint = out / TASK_DIR / "checkpoint"
    step_file = checkpoint / "sapo_step.json"
    step_file.write_text(json.dumps({"step": "1", "seconds": 0.5, "reselector": None}))
    code, line = exit_line(train_sapo.main, args, capsys)
    assert (code, line) == (2, f"error: {step_file} is not a valid sapo_step.json record: step must be an integer, "
                               f"got a string; delete {checkpoint} to train the task again from its start")


def test_damaged_caches_are_one_line(tmp_path):
    cache = tmp_path / "score_cache.json"
    entry = {"task": "t", "instruction": "i", "state_id": "s", "instance_sums": [1.0, 2.0], "instance_counts": [1, 2],
             "seconds": 0.1}
    cache.write_text(json.dumps({"k": entry}))
    assert read_score_cache(cache)["k"] == entry
    cache.write_text(json.dumps({"k": {**entry, "instance_sums": [1.0, None]}}))
    with pytest.raises(SapoError) as e:
        read_score_cache(cache)
    assert str(e.value) == (f"{cache} is not a valid score_cache.json record: k.instance_sums[1] must be a number, "
                            "got null; delete it to score again")
    cache.write_text('{"k": ' + json.dumps(entry).replace("2.0]", "NaN]") + "}")  # what Python used to write
    with pytest.raises(SapoError, match=r"k.instance_sums\[1\] must be a finite number, got nan"):
        read_score_cache(cache)
    paraphrases = tmp_path / "paraphrases.json"
    paraphrases.write_text(json.dumps({"k": {"task": "t", "paraphraser": "p", "temperature": 0.6, "seed": 0,
                                             "paraphrases": "one"}}))
    with pytest.raises(SapoError) as e:
        read_paraphrase_cache(paraphrases)
    assert str(e.value) == (f"{paraphrases} is not a valid paraphrases.json record: k.paraphrases must be a list, "
                            "got a string; delete it to generate the paraphrases again")


def test_probe_records_keep_undefined_numbers_as_null(tmp_path):
    from tasks.records import json_safe, read_record

    path = tmp_path / "indicators.json"
    stored = probe_prompts.StoredIndicators(candidates=["a"], instances={"pre_update_loss": 4},
                                            indicators=[probe_prompts.Indicators(pre_update_loss=1.5)],
                                            static=[probe_prompts.Indicators(pre_update_loss=2.5)])
    import dataclasses

    write_json(path, json_safe(dataclasses.asdict(stored)))  # NaN (not computed) -> null: strict JSON
    strict_load(path.read_text())
    back = read_record(path, probe_prompts.StoredIndicators, undefined_floats=True)
    assert back.indicators[0].pre_update_loss == 1.5 and math.isnan(back.indicators[0].gradient_norm)
    assert back.static[0].pre_update_loss == 2.5 and back.instances == {"pre_update_loss": 4}
    path.write_text(json.dumps({"candidates": ["a"], "instances": {}, "indicators": [{"pre_update_loss": "x"}],
                                "static": []}))
    with pytest.raises(SapoError, match=r"indicators\[0\].pre_update_loss must be a number, got a string"):
        read_record(path, probe_prompts.StoredIndicators, undefined_floats=True)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Text no tokenizer can encode: a lone surrogate (legal in JSON) is one line naming the file and the entry.

def test_a_lone_surrogate_in_a_data_file_or_a_candidate_file_is_one_line(model_dir, tmp_path, capsys):
    data = write_sapo_dir(tmp_path / "data")
    train = data / TASK / "train.json"
    # JSON's escape for half an emoji (before: a traceback from the tokenizer, after the zero-shot evaluation)
    train.write_text(train.read_text().replace('"text 3"', '"text \\ud83d 3"'))
    out = tmp_path / "run"
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, out), capsys)
    assert (code, line) == (2, f"error: {train}: record 3 (counted from 0): \"sentence\" holds a lone surrogate "
                               "'\\ud83d' at character 5, which no tokenizer can encode (fix the text: an emoji or "
                               "other character split in half)")
    assert not out.exists()
    train.write_text(train.read_text().replace('"text \\ud83d 3"', '"text 3"'))

    candidates = tmp_path / "cands.json"
    candidates.write_text('{"task900_toy_sentiment": ["Answer positive or negative.", '
                          '"Reply positive or negative \\udc00 now."]}')
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, out, "--select", "sapo", "--candidates",
                                                     str(candidates)), capsys)
    assert (code, line) == (2, f"error: {candidates}: candidate 1 for task {TASK} holds a lone surrogate '\\udc00' "
                               "at character 27, which no tokenizer can encode (fix the text: an emoji or other "
                               "character split in half): 'Reply positive or negative \\udc00 now.'")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# 6. SIGTERM (what schedulers send) like SIGINT: one line, the state kept, and the resume equals an uninterrupted run.

SLOW_TRAINING = (  # a real train_sapo process whose optimizer steps take 0.4 s each, so that SIGTERM lands mid-training
    "import sys, time\n"
    "import train_sapo\n"
    "real = train_sapo.micro_batches\n"
    "def slow(*a):\n"
    "    time.sleep(0.4)\n"
    "    return real(*a)\n"
    "train_sapo.micro_batches = slow\n"
    "train_sapo.main(sys.argv[1:])\n"
    "train_sapo.exit_after_main()\n")


def test_sigterm_in_training_then_resume_equals_an_uninterrupted_run(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    data = write_sapo_dir(tmp_path / "data")
    extra = ("--global-batch-size", "2", "--epochs", "3", "--checkpoint-every", "1")
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_TRAINING, *toy_args(model_dir, data, stopped, *extra)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step_file = stopped / TASK_DIR / "checkpoint" / "sapo_step.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if step_file.exists() and json.loads(step_file.read_text() or "{}").get("step", 0) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before the signal"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143  # 128 + SIGTERM, as a shell reports it (before: killed silently, -15)
    assert err.strip().splitlines()[-1] == "interrupted: rerun the same command to resume"
    assert not (stopped / TASK_DIR / "adapter").exists() and step_file.exists()

    train_sapo.main(toy_args(model_dir, data, stopped, *extra))  # the same command resumes
    assert "resuming training of" in capsys.readouterr().out
    train_sapo.main(toy_args(model_dir, data, whole, *extra))
    a = load_file(str(stopped / TASK_DIR / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(whole / TASK_DIR / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((stopped / "R.json").read_text()) == json.loads((whole / "R.json").read_text())
    log = lambda run: [{k: v for k, v in json.loads(x).items()}  # noqa: E731
                       for x in (run / TASK_DIR / "train_log.jsonl").read_text().splitlines()]
    assert log(stopped) == log(whole)


def wait_for_checkpoint(process, step_file: Path, step: int):
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(step_file.read_text()).get("step", 0) >= step:
                return
        except (OSError, ValueError):  # not written yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} while training ran (exit {process.poll()})")


def test_sigterm_to_a_two_process_launch_stops_both_and_the_same_command_resumes(model_dir, tmp_path):
    """torchrun passes SIGTERM on to every process it launched: each prints the line, the checkpoint stays, and the
    same 2-process command resumes (before this change the resume was refused: the checkpoint's weight names were
    compared with DDP's "module."-prefixed ones)."""
    from safetensors.torch import load_file

    data = write_sapo_dir(tmp_path / "data")
    script = tmp_path / "slow_train_sapo.py"
    script.write_text(SLOW_TRAINING)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29541"]
    extra = ("--global-batch-size", "2", "--micro-batch-size", "1", "--epochs", "2", "--checkpoint-every", "1")
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    process = subprocess.Popen([*launch, str(script), *toy_args(model_dir, data, stopped, *extra)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(process, stopped / TASK_DIR / "checkpoint" / "sapo_step.json", 2)
        process.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler does
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert err.count("interrupted: rerun the same command to resume") == 2  # one line from each process
    assert not (stopped / TASK_DIR / "adapter").exists()
    resumed = subprocess.run([*launch, "train_sapo.py", *toy_args(model_dir, data, stopped, *extra)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming training of {TASK_DIR} at step" in resumed.stdout
    # The uninterrupted run on one process (in this one, to spare a third launch): the same optimizer steps, summed
    # in another order (the 2-process runs themselves are bit-identical to each other: checked by hand, see the notes).
    train_sapo.main(toy_args(model_dir, data, whole, *extra))
    a = load_file(str(stopped / TASK_DIR / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(whole / TASK_DIR / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7)
    steps = lambda run: [json.loads(x) for x in (run / TASK_DIR / "train_log.jsonl").read_text().splitlines()]  # noqa
    assert [x["step"] for x in steps(stopped)] == [x["step"] for x in steps(whole)] == list(range(1, 7))
    assert [x["loss"] for x in steps(stopped)] == pytest.approx([x["loss"] for x in steps(whole)], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 7. A GGUF file as --model: loaded (converted once); any other file is one line.

def write_tiny_gguf(model_dir: str, path: Path):
    """The tiny HF model as a llama-architecture GGUF (float32 tensors, the byte-level BPE as a gpt2 vocabulary), the
    way llama.cpp's converter writes one: q/k rows permuted to its rotary layout, which transformers undoes."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(len(tok))
    state = json.loads(tok.backend_tokenizer.to_str())
    tokens = sorted(state["model"]["vocab"], key=state["model"]["vocab"].get)
    special = {t["content"] for t in state["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_bos_token_id(tok.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(w, heads):  # llama.cpp's convert_hf_to_gguf.py permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, p in model.state_dict().items():
        x = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            x = permute(x, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = permute(x, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_as_model_loads_the_same_model(model_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models import load_model, load_tokenizer, resolve

    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(model_dir, tmp_path / "tiny.gguf")
    base, adapters = resolve(str(gguf_file))  # before: "model path ... does not exist"
    assert adapters == [] and Path(base).parent == tmp_path / "cache" / "gguf"
    assert resolve(str(gguf_file))[0] == base  # converted once
    model, tokenizer = load_model(str(gguf_file)), load_tokenizer(str(gguf_file))
    reference, reference_tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    text = "Classify the sentiment of the review as positive or negative. Text: great!"
    assert tokenizer(text)["input_ids"] == reference_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == reference_tok.apply_chat_template(chat,
                                                                                                  tokenize=False)
    ids = torch.tensor([reference_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    # The scripts take it as --model.
    code, line = exit_line(score_prompts.main, ["--model", str(gguf_file), "--task", "sentiment", "--instances", "2",
                                                "--max-candidates", "2", "--no-cache", "--no-progress",
                                                "--max-length", "4096"], capsys)
    assert code == 2 and "--max-length = 4096 tokens is beyond the model's context (max_position_embeddings 2048" \
        in line  # the GGUF's context_length, read through the converted config


def test_another_file_as_model_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    code, line = exit_line(score_prompts.main, ["--model", str(weights), "--task", "sentiment", "--instances", "2"],
                           capsys)
    assert (code, line) == (2, f"error: --model {weights} is a file; give a model directory (save_pretrained), a hub "
                               "id, an adapter or adapter-stack directory, or a .gguf file")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    code, line = exit_line(score_prompts.main, ["--model", str(broken), "--task", "sentiment", "--instances", "2"],
                           capsys)
    assert code == 2 and line.startswith(f"error: cannot load the GGUF file {broken} (")
