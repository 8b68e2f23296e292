"""Reliability of the scripts: bad numbers are refused before anything loads, a run directory resumes only with the
same config, data, pools and model (wherever it lives), one run at a time, environment errors are one line, and a
resumed training logs each step once and sums its seconds over the segments."""
import contextlib
import dataclasses
import errno
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import probe_prompts
import score_prompts
import train_sapo
from tasks.errors import SapoError, cli_main, release_main_resources, writing, writing_under
from tasks.flags import OneLineParser, Range, add_config_flags, given_flags
from tasks.run_dir import CONFIG_FILE, KEY_FIELD, RunKey, RunLock, check_writable_file, open_run_dir
from test_tasks import write_sapo_dir
from tiny import save_tiny_model_dir, tiny_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TASK = "task900_toy_sentiment"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def toy_args(model_dir, data_dir, out, *extra):
    """One toy task of 6 instances per split, original instruction, 1 epoch of 2 optimizer steps."""
    return ["--model", model_dir, "--data-dir", str(data_dir), "--sequence", "toy_seq", "--select", "original",
            "--train-instances", "6", "--epochs", "1", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--eval-instances", "2", "--max-new-tokens", "2", "--eval-batch-size", "2", "--output-dir", str(out),
            *extra]


def exit_line(fn, argv, capsys) -> tuple[int, str]:
    """Run a cli_main-wrapped main; its exit code and the last line of stderr (the one error line)."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ""


# ----------------------------------------------------------------------------------------------------------------------
# 1. Numbers that cannot work are refused when the command line is parsed.

def test_every_numeric_config_field_has_a_range():
    numeric = {f.name for f in dataclasses.fields(train_sapo.Config)
               if f.type.split("|")[0].strip() in ("int", "float")}
    assert numeric - set(train_sapo.FLAG_RANGES) == set()
    assert str(train_sapo.FLAG_RANGES["race_confidence"]) == "in (0, 1]"


@pytest.mark.parametrize("flag,value,message", [
    ("--train-instances", "0", "--train-instances 0: must be >= 1"),
    ("--train-instances", "-5", "--train-instances -5: must be >= 1"),
    ("--epochs", "0", "--epochs 0: must be >= 1"),
    ("--epochs", "-1", "--epochs -1: must be >= 1"),
    ("--global-batch-size", "-8", "--global-batch-size -8: must be >= 1"),
    ("--global-batch-size", "0", "--global-batch-size 0: must be >= 1"),
    ("--micro-batch-size", "0", "--micro-batch-size 0: must be >= 1"),
    ("--eval-batch-size", "0", "--eval-batch-size 0: must be >= 1"),
    ("--max-candidates", "0", "--max-candidates 0: must be >= 1"),
    ("--score-instances", "0", "--score-instances 0: must be >= 1"),
    ("--eval-instances", "0", "--eval-instances 0: must be >= 1"),
    ("--lr", "0", "--lr 0.0: must be > 0"),
    ("--lr", "nan", "--lr nan: must be > 0"),
    ("--warmup-ratio", "1.5", "--warmup-ratio 1.5: must be in [0, 1]"),
    ("--lora-dropout", "1", "--lora-dropout 1.0: must be in [0, 1)"),
    ("--seed", "-1", "--seed -1: must be in [0, 4294967295]"),
    ("--method", "lora", "--method lora: must be one of lora-inc, o-lora, seq-lora"),
    ("--select", "best", "--select best: must be sapo, sapo-race, original or fixed:K"),
    ("--epochs", "two", "argument --epochs: invalid int value: 'two'"),
    ("--report-to", "tensorbored", "--report-to tensorbored: must be one of all, aim, tensorboard, wandb, trackio, "
                                   "comet_ml, mlflow, clearml, dvclive, swanlab"),
])
def test_train_sapo_refuses_bad_values_at_parse_time(flag, value, message):
    with pytest.raises(SapoError) as e:
        train_sapo.parse_config([flag, value])
    assert str(e.value) == message


@pytest.mark.parametrize("flag,value,message", [
    ("--instances", "0", "--instances 0: must be >= 1"),
    ("--max-candidates", "0", "--max-candidates 0: must be >= 1"),
    ("--temperature", "0", "--temperature 0.0: must be > 0"),
    ("--race-confidence", "0", "--race-confidence 0.0: must be in (0, 1]"),
    ("--split", "test", "argument --split: invalid choice: 'test' (choose from 'train', 'dev')"),
])
def test_score_prompts_refuses_bad_values_at_parse_time(flag, value, message):
    with pytest.raises(SapoError) as e:
        score_prompts.parse_args(["--task", "sentiment", flag, value])
    assert str(e.value) == message


@pytest.mark.parametrize("flag,value,message", [
    ("--max-instances", "0", "--max-instances 0: must be >= 1"),
    ("--batch-size", "0", "--batch-size 0: must be >= 1"),
    ("--eval-token-budget", "-1", "--eval-token-budget -1: must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens 0: must be >= 1"),
    ("--max-prompt-tokens", "0", "--max-prompt-tokens 0: must be >= 1"),
    ("--api-timeout", "0", "--api-timeout 0.0: must be > 0"),
])
def test_evaluate_refuses_bad_values_at_parse_time(flag, value, message, capsys):
    """evaluate.py's numeric flags go through the same Range checks as the other scripts': one line, exit 2."""
    argv = ["--model", "m", "--tasks", "a", flag, value]
    with pytest.raises(SapoError) as e:
        evaluate.parse_args(argv)
    assert str(e.value) == message
    assert exit_line(evaluate.main, argv, capsys) == (2, f"error: {message}")


def test_every_numeric_evaluate_flag_has_a_range_and_keeps_its_default():
    numeric = {f.name for f in dataclasses.fields(evaluate.GenerationFlags)
               if f.type.split("|")[0].strip() in ("int", "float")}
    assert numeric and numeric - set(evaluate.GENERATION_RANGES) == set()
    args = evaluate.parse_args(["--model", "m", "--tasks", "a"])
    assert (args.max_instances, args.batch_size, args.eval_token_budget, args.max_new_tokens, args.api_timeout) == \
        (None, None, None, 128, 600.0)
    assert evaluate.parse_args(["--model", "m", "--tasks", "a", "--max-new-tokens", "7"]).max_new_tokens == 7


@dataclasses.dataclass
class FlagsBase:
    count: int = 3  # how many things
    ratio: float | None = None  # a share of them
    mode: str = "off"  # on | off | auto
    loud: bool = False


@dataclasses.dataclass
class FlagsDerived(FlagsBase):
    ratio: float | None = 0.5
    extra: str = "x"  # ours: the derived class's own


def test_config_flags_take_type_help_and_bare_values_from_the_dataclass():
    parser = OneLineParser()
    names = add_config_flags(parser, FlagsDerived, {"count": Range(1)}, skip={"extra"}, bare_values={"mode": "on"})
    assert names == ["count", "ratio", "mode", "loud"]
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["count"] == "how many things (default: 3; >= 1)"
    assert helps["ratio"] == "a share of them (default: 0.5)"  # the base's comment, the derived default
    assert helps["loud"] == "(default: False)"
    args = parser.parse_args(["--count", "4", "--ratio", "0.25", "--mode", "--no-loud"])
    assert given_flags(args, names) == {"count": 4, "ratio": 0.25, "mode": "on", "loud": False}
    assert given_flags(parser.parse_args([]), names) == {}
    with pytest.raises(SapoError, match="argument --count: invalid int value: 'x'"):
        parser.parse_args(["--count", "x"])
    # the probe's flags: train_sapo's fields with their comments, and its own
    probe_parser = OneLineParser()
    add_config_flags(probe_parser, probe_prompts.ProbeConfig, probe_prompts.RANGES, skip=probe_prompts.NOT_FLAGS)
    probe = {a.dest: a.help for a in probe_parser._actions}
    assert probe["seeds"].startswith("ours: each (pair, candidate) arm trained with S seeds") and \
        probe["score_instances"] == "candidates are scored on the first N training instances (default: 250; >= 1)"


def test_lora_targets_are_checked_against_the_model():
    model = tiny_model(64)
    train_sapo.check_lora_targets(model, "q_proj,v_proj")
    train_sapo.check_lora_targets(model, "self_attn.q_proj")  # peft matches the last dotted parts too
    with pytest.raises(SapoError) as e:
        train_sapo.check_lora_targets(model, "q_proj,qkv")
    assert str(e.value) == ("--lora-targets: the model has no module named qkv (its linear layers: down_proj, "
                            "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)")


def test_bad_value_exits_2_with_one_line_before_anything_is_written(tmp_path, capsys):
    code, line = exit_line(train_sapo.main, ["--epochs", "0", "--output-dir", str(tmp_path / "run")], capsys)
    assert (code, line) == (2, "error: --epochs 0: must be >= 1")
    assert not (tmp_path / "run").exists()


def test_global_batch_that_does_not_split_over_the_processes_is_refused_before_the_data(tmp_path, capsys,
                                                                                        monkeypatch):
    config, _ = train_sapo.parse_config(["--global-batch-size", "8", "--micro-batch-size", "8"])
    train_sapo.check_batch_split(config, 1)
    with pytest.raises(SapoError, match="cannot be split into --micro-batch-size 8 x 2 process"):
        train_sapo.check_batch_split(config, 2)  # what a 2-process launch checks right after its Accelerator
    monkeypatch.setattr(train_sapo, "load_tasks", lambda *a: pytest.fail("data loaded before the check"))
    code, line = exit_line(train_sapo.main, ["--global-batch-size", "6", "--micro-batch-size", "4",
                                             "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and line.endswith("it must be a multiple of 4")


# ----------------------------------------------------------------------------------------------------------------------
# 10. The preset: the demo on the built-in offline setup whatever else is given, none with another model or data.

def test_preset_follows_the_setup_not_the_number_of_flags(model_dir, tmp_path):
    demo = train_sapo.PRESETS["demo"]
    for argv in ([], ["--seed", "1"], ["--output-dir", str(tmp_path / "x")]):
        config, _ = train_sapo.parse_config(argv)
        assert config.preset == "demo" and config.train_instances == demo["train_instances"]
        assert config.epochs == demo["epochs"] and config.max_source_length == demo["max_source_length"]
    assert train_sapo.parse_config(["--seed", "1"])[0].seed == 1
    defaults = train_sapo.Config()
    for argv in (["--model", model_dir], ["--data-dir", str(tmp_path)]):
        config, _ = train_sapo.parse_config(argv)
        assert config.preset is None and config.train_instances == defaults.train_instances
        assert config.max_source_length == defaults.max_source_length
    config, _ = train_sapo.parse_config(["--preset", "paper", "--epochs", "3"])
    assert (config.preset, config.sequence, config.epochs) == ("paper", train_sapo.PRESETS["paper"]["sequence"], 3)
    assert "preset demo:" in train_sapo.describe_preset(train_sapo.parse_config([])[0])


# ----------------------------------------------------------------------------------------------------------------------
# 2, 3, 9. A run resumes only from results made with the same config, data, pools and model, wherever it lives.

def test_resume_is_keyed_on_content_not_on_the_path(model_dir, tmp_path, capsys, monkeypatch):
    data = write_sapo_dir(tmp_path / "data")
    out = tmp_path / "run"

    def stop_before_training(*args, **kwargs):
        raise KeyboardInterrupt

    real_train = train_sapo.train_task
    monkeypatch.setattr(train_sapo, "train_task", stop_before_training)
    code, _ = exit_line(train_sapo.main, toy_args(model_dir, data, out), capsys)
    monkeypatch.setattr(train_sapo, "train_task", real_train)
    assert code == 130
    zero_shot = (out / "0-zero-shot" / "scores.json").read_text()
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["preset"] is None and saved[KEY_FIELD]["tasks"][0][0] == TASK

    # The data changed between the kill and the rerun: refused, naming the task; nothing rewritten.
    test_file = data / TASK / "test.json"
    original = test_file.read_text()
    test_file.write_text(original.replace('"negative"', '"neutral"', 1))
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, out), capsys)
    assert code == 2 and f"holds a run with other data for task {TASK}; use another --output-dir" in line
    assert json.loads((out / CONFIG_FILE).read_text()) == saved
    test_file.write_text(original)

    # The same data, the run moved and named by a relative path: it resumes (row 0 is not recomputed).
    out.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    train_sapo.main(toy_args(model_dir, data, "moved"))
    moved = tmp_path / "moved"
    assert (moved / "0-zero-shot" / "scores.json").read_text() == zero_shot
    assert json.loads((moved / "R.json").read_text())["rows"] == ["zero-shot", f"after {TASK}"]
    assert json.loads((moved / CONFIG_FILE).read_text())["output_dir"] == "moved"

    # 9. A deleted selection.json of a trained task: one line, nothing recomputed over it.
    selection = Path("moved") / f"1-{TASK}" / "selection.json"  # as the user named the run
    selection.unlink()
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, "moved"), capsys)
    assert code == 2 and line == (f"error: {selection} is missing but the task's adapter is trained: restore the "
                                  f"file, or delete {selection.parent} and every later task folder to redo them")

    # config.json deleted: another learning rate must not adopt the results (nor write a config over them).
    (moved / CONFIG_FILE).unlink()
    code, line = exit_line(train_sapo.main, toy_args(model_dir, data, "moved", "--lr", "1e-3"), capsys)
    assert code == 2 and "holds results but no config.json" in line
    assert not (moved / CONFIG_FILE).exists()


def test_a_directory_without_results_is_not_another_run(tmp_path):
    key = RunKey(config={"lr": 1e-4}, tasks=[["a", "h1"]], pools={}, model="m")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(json.dumps({"lr": 5.0, "model": "typo"}))  # a start that failed at the model
    assert open_run_dir(run_dir, {"lr": 1e-4}, key, overwrite=False) is None
    assert json.loads((run_dir / CONFIG_FILE).read_text())["lr"] == 1e-4
    release_main_resources()  # main's exit releases the lock; here by hand
    other = dataclasses.replace(key, tasks=[["a", "h2"]], pools={"a": "p"}, model="m2", config={"lr": 1e-3},
                                model_name="dir")
    saved = {"tasks": [["a", "h1"]], "pools": {}, "model": "m", "model_name": "dir"}
    assert other.differences({"lr": 1e-4}, saved) == [
        "another config (lr differ)", "other data for task a", "another candidate pool for task a",
        "another model (the files or adapters of dir changed)"]
    assert dataclasses.replace(other, model_name="hub/x").differences({"lr": 1e-3}, saved)[-1] == \
        "another model (dir -> hub/x)"
    assert dataclasses.replace(key, tasks=[["b", "h1"]]).differences({"lr": 1e-4}, saved) == [
        "another task sequence (a -> b)"]


# ----------------------------------------------------------------------------------------------------------------------
# 7. One run per directory.

def test_second_run_on_a_locked_directory_is_refused_and_a_dead_holder_releases_it(model_dir, tmp_path, capsys):
    data = write_sapo_dir(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'pid %d on test' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"), str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, line = exit_line(train_sapo.main, toy_args(model_dir, data, out), capsys)
        assert code == 2 and line == (f"error: {out} is in use by another run (pid {holder.pid} on test); wait for "
                                      "it to end, or use another --output-dir")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused run
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process
        holder.wait()
    lock = RunLock(out)
    with pytest.raises(SapoError, match="is in use by another run"):
        RunLock(out)  # a second descriptor, even in the same process
    lock.release()
    RunLock(out).release()


# ----------------------------------------------------------------------------------------------------------------------
# 8. Environment errors: one line naming the path; finished work kept.

@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail in this process (EFBIG, the per-process cousin of a full disk), without root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("writer,message", [
    ("torch", "write failed ("),  # torch.save's own message names neither the file nor the cause
    ("safetensors", "File too large"),
    ("python", "File too large"),
])
def test_failed_write_is_one_line_naming_the_path(tmp_path, capsys, writer, message):
    target = tmp_path / "checkpoint.tmp"
    target.mkdir()

    @cli_main
    def save(argv):
        with writing(target), file_size_limit(64 << 10):
            if writer == "torch":
                torch.save({"w": torch.zeros(1 << 16)}, target / "optimizer.bin")
            elif writer == "safetensors":
                from safetensors.torch import save_file

                save_file({"w": torch.zeros(1 << 16)}, str(target / "model.safetensors"))
            else:
                with open(target / "log.txt", "w") as f:
                    f.write("x" * (1 << 17))

    code, line = exit_line(save, [], capsys)
    assert code == 2 and line.startswith(f"error: {target}: {message}")


def test_failed_write_without_a_file_name_names_the_run_directory(tmp_path, capsys):
    @cli_main
    def write(argv):
        writing_under(tmp_path)  # what open_run_dir registers
        with file_size_limit(1024), open(tmp_path / "predictions.jsonl", "w") as f:
            f.write("x" * 4096)  # the OSError of a plain write names no file
            f.flush()

    assert exit_line(write, [], capsys) == (2, f"error: {tmp_path}: File too large")


def test_output_paths_that_cannot_be_written_fail_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, line = exit_line(train_sapo.main, toy_args(model_dir, write_sapo_dir(tmp_path / "data"), a_file), capsys)
    assert (code, line) == (2, f"error: --output-dir {a_file} is a file, not a directory")
    monkeypatch.setattr(score_prompts, "select_candidates", lambda *a, **k: pytest.fail("scored anyway"))
    code, line = exit_line(score_prompts.main, ["--model", model_dir, "--task", "sentiment", "--instances", "2",
                                                "--output", str(a_file / "scores.json")], capsys)
    assert (code, line) == (2, f"error: --output {a_file / 'scores.json'}: {a_file} is a file, not a directory")
    with pytest.raises(SapoError, match="is a directory"):
        check_writable_file(tmp_path, "--output")


def test_score_prompts_failed_final_write_keeps_the_scores_in_the_cache(model_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "scores.json"

    real_write = score_prompts.write_json

    def disk_full_for_the_output(path, obj, indent=2):
        if Path(path) == output:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, obj, indent)

    monkeypatch.setattr(score_prompts, "write_json", disk_full_for_the_output)
    code, line = exit_line(score_prompts.main, ["--model", model_dir, "--task", "sentiment", "--instances", "2",
                                                "--max-candidates", "2", "--output", str(output), "--no-progress"],
                           capsys)
    cache = tmp_path / "score_cache.json"
    assert code == 2 and line == (f"error: could not write --output: {output}: No space left on device; the scores "
                                  f"are kept in the cache {cache}: rerun with a writable --output and --cache {cache} "
                                  "to write them without scoring again")
    assert len(json.loads(cache.read_text())) == 2  # both candidates' scores


# ----------------------------------------------------------------------------------------------------------------------
# 4. Kill and resume: the log holds each step once, and training seconds add up over the segments.

def test_resumed_training_logs_each_step_once_and_sums_its_seconds(model_dir, tmp_path, capsys, monkeypatch):
    data = write_sapo_dir(tmp_path / "data")
    out = tmp_path / "run"
    args = toy_args(model_dir, data, out, "--global-batch-size", "2", "--epochs", "2", "--checkpoint-every", "2")
    task_dir = out / f"1-{TASK}"
    real_save, real_micro = train_sapo.save_checkpoint, train_sapo.micro_batches

    calls = []

    def slow_micro(*a):  # steps 1 and 2 take >= 1 s each: the first segment outweighs the resumed one
        calls.append(1)
        if len(calls) <= 2:
            time.sleep(1.0)
        return real_micro(*a)

    def killed_at_step_4(accelerator, checkpoint, step, extra=None):
        if step == 4:  # steps 3 and 4 are logged, but the last checkpoint is step 2's: as after a kill
            raise KeyboardInterrupt
        real_save(accelerator, checkpoint, step, extra)

    monkeypatch.setattr(train_sapo, "micro_batches", slow_micro)
    monkeypatch.setattr(train_sapo, "save_checkpoint", killed_at_step_4)
    assert exit_line(train_sapo.main, args, capsys)[0] == 130
    assert [json.loads(x)["step"] for x in (task_dir / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    first_segment = json.loads((task_dir / "checkpoint" / "sapo_step.json").read_text())["seconds"]
    assert first_segment >= 2.0  # steps 1 and 2
    # A kill inside the checkpoint's swap: the complete new checkpoint is still under its temporary name.
    (task_dir / "checkpoint").rename(task_dir / "checkpoint.tmp")

    monkeypatch.setattr(train_sapo, "micro_batches", real_micro)
    monkeypatch.setattr(train_sapo, "save_checkpoint", real_save)
    real_train = train_sapo.train_task
    outer = {}

    def timed_train(*a, **k):
        start = time.perf_counter()
        result = real_train(*a, **k)
        outer["seconds"] = time.perf_counter() - start
        return result

    monkeypatch.setattr(train_sapo, "train_task", timed_train)
    train_sapo.main(args)
    assert f"resuming training of 1-{TASK} at step 2/6" in capsys.readouterr().out
    log = [json.loads(x)["step"] for x in (task_dir / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    training = json.loads((task_dir / "training.json").read_text())
    timings = json.loads((out / "timings.json").read_text())[TASK]
    assert timings["training_seconds"] == training["seconds"]
    # The resumed segment alone (well under the 2 s of steps 1 and 2 here) would fail the lower bound.
    assert first_segment < training["seconds"] <= first_segment + outer["seconds"]
