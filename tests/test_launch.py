"""The launch check (tasks/launch.py): the topology derived from what accelerate hands the process (its
environment, the DeepSpeed JSON that environment names, the built Accelerator), and every launch the scripts cannot
honour refused in one line before anything loads. Sharded launches run in the scripts of tasks.launch.SHARDED_SCRIPTS
(tests/test_sharding.py runs them); the other sharded launches are refused. accelerate 1.15 cannot build an FSDP
Accelerator on CPU ("There are currently no available devices found"; with ACCELERATE_USE_CPU=1 it builds a DDP one
instead, refused once built), so for FSDP the refusals are what can be tested here: in-process for every script, and
through real 2-process launches."""
import dataclasses
import json

import pytest

import evaluate
import probe_prompts
import score_prompts
import train_sapo
from tasks import SapoError
from tasks import checkpoints
from tasks.launch import TrainingRecipe, check_launch, read_launch

RECIPE = TrainingRecipe(max_grad_norm=1.0, schedule="warmup-log", micro_batch_size=8)
# The authors' configs/ds_configs/stage2_llama.config (github.com/Eric8932/SAPO), as they wrote it.
AUTHORS_STAGE2 = {
    "bfloat16": {"enabled": "true"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": False,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 1e5,
}


def deepspeed_env(tmp_path, config: dict | None, **extra) -> dict:
    """The environment `accelerate launch --use_deepspeed [--deepspeed_config_file F]` gives its processes."""
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no", **extra}
    if config is not None:
        path = tmp_path / "ds_config.json"
        path.write_text(json.dumps(config))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(path)
    return env


def test_check_launch_reads_accelerates_environment():
    check_launch("x.py", {})  # DDP / one process: fine
    check_launch("x.py", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    with pytest.raises(SapoError, match="x.py does not support FSDP"):
        check_launch("x.py", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(SapoError, match="does not support DeepSpeed ZeRO-3"):
        check_launch("x.py", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    # The sharded launches tasks/sharding.py runs: ZeRO-3 for the four scripts, FSDP2 for three.
    check_launch("probe_prompts.py", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                 RECIPE)
    for script in ("train_sapo.py", "score_prompts.py", "evaluate.py"):
        check_launch(script, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                     RECIPE if script == "train_sapo.py" else None)
        check_launch(script, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                     RECIPE if script == "train_sapo.py" else None)
    with pytest.raises(SapoError, match="evaluate.py does not support FSDP version 1: use torch FSDP2"):
        check_launch("evaluate.py", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(SapoError, match="probe_prompts.py does not support FSDP: its passes need the full weights"):
        check_launch("probe_prompts.py", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    olora = dataclasses.replace(RECIPE, method="o-lora")  # its penalty on sharded weights: tasks/olora.py
    check_launch("train_sapo.py", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, olora)
    check_launch("train_sapo.py", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, olora)


def test_topology_is_read_from_the_deepspeed_json_the_environment_names(tmp_path):
    stage3 = {**AUTHORS_STAGE2, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    # ZeRO-3 given only in the JSON (no ACCELERATE_DEEPSPEED_ZERO_STAGE): seen, refused in one line naming the file.
    with pytest.raises(SapoError, match=r"does not support DeepSpeed ZeRO-3 \(zero_optimization.stage 3 in .*ds_con"):
        check_launch("x.py", deepspeed_env(tmp_path, stage3))
    for stage in (0, 1, 2):  # ZeRO 0-2: accepted (tests/test_deepspeed.py trains ZeRO-2 against DDP)
        config = {**AUTHORS_STAGE2, "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage}}
        assert check_launch("x.py", deepspeed_env(tmp_path, config), RECIPE).zero_stage == stage
    # A JSON "auto" stage takes the launcher's --zero_stage; a JSON number wins over it (accelerate's precedence).
    auto_stage = {"zero_optimization": {"stage": "auto"}}
    assert read_launch(deepspeed_env(tmp_path, auto_stage, ACCELERATE_DEEPSPEED_ZERO_STAGE="3")).zero_stage == 3
    assert read_launch(deepspeed_env(tmp_path, {"zero_optimization": {"stage": 1}},
                                     ACCELERATE_DEEPSPEED_ZERO_STAGE="3")).zero_stage == 1
    # The authors' ZeRO-2 config with offload, launched with --mixed_precision bf16: accepted, every field typed.
    launch = check_launch("x.py", deepspeed_env(tmp_path, AUTHORS_STAGE2, ACCELERATE_MIXED_PRECISION="bf16"), RECIPE)
    assert (launch.engine, launch.zero_stage, launch.offload_optimizer, launch.offload_param) == \
        ("deepspeed", 2, "cpu", "none")
    assert (launch.mixed_precision, launch.micro_batch_size, launch.gradient_clipping,
            launch.gradient_accumulation_steps) == ("bf16", "auto", "auto", "auto")
    assert launch.optimizer["type"] == "AdamW" and launch.scheduler["type"] == "WarmupLR"
    # Flags only (--use_deepspeed --zero_stage 1 --gradient_clipping 0.5 --offload_optimizer_device cpu).
    flags = read_launch({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
                         "ACCELERATE_GRADIENT_CLIPPING": "0.5", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
                         "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert (flags.zero_stage, flags.gradient_clipping, flags.offload_optimizer, flags.mixed_precision, flags.source) \
        == (1, 0.5, "cpu", "bf16", "environment")
    assert read_launch({}).engine == "ddp"
    assert read_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}).fsdp_version == 2


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(gradient_accumulation_steps=8), "gradient_accumulation_steps 8 in .* must be 1 or auto"),
    (lambda c: c.update(gradient_clipping=0.3), "gradient_clipping 0.3 in .* differs from --max-grad-norm 1.0"),
    (lambda c: c.update(train_micro_batch_size_per_gpu="four"), "train_micro_batch_size_per_gpu 'four'"),
    (lambda c: c["optimizer"].update(type="Lamb"), "optimizer section in .* must be AdamW with every parameter auto"),
    (lambda c: c["optimizer"]["params"].update(lr=3e-4), "must be AdamW with every parameter auto"),
    (lambda c: c["scheduler"].update(type="WarmupDecayLR"), "must be WarmupLR with auto parameters"),
    (lambda c: c["scheduler"]["params"].update(warmup_type="linear"), "must be WarmupLR with auto parameters"),
    (lambda c: c.update(fp16={"enabled": True}), "fp16 in .* skips optimizer steps"),
    (lambda c: c["zero_optimization"].update(offload_param={"device": "cpu"}), "offload_param \\(cpu\\) in"),
    (lambda c: c["zero_optimization"].update(stage=5), "zero_optimization.stage 5 in .* is not a ZeRO stage"),
    (lambda c: c.update(bfloat16={"enabled": "true"}), '"bfloat16" section in .* is ignored under accelerate'),
])
def test_every_deepspeed_setting_the_script_cannot_honour_is_refused_in_one_line(tmp_path, change, message):
    config = json.loads(json.dumps(AUTHORS_STAGE2))
    del config["bfloat16"]  # accepted as is with --mixed_precision bf16 (below); the cases change one thing
    change(config)
    with pytest.raises(SapoError, match=message) as e:
        check_launch("x.py", deepspeed_env(tmp_path, config), RECIPE)
    assert "\n" not in str(e.value)


def test_schedule_and_accumulation_must_agree_with_the_launch(tmp_path):
    env = deepspeed_env(tmp_path, AUTHORS_STAGE2, ACCELERATE_MIXED_PRECISION="bf16")
    cosine = TrainingRecipe(max_grad_norm=1.0, schedule="cosine", micro_batch_size=8)
    with pytest.raises(SapoError, match="asks for WarmupLR but --schedule is cosine"):
        check_launch("x.py", env, cosine)
    check_launch("score_prompts.py", env)  # a script that does not train needs only the full weights
    with pytest.raises(SapoError, match="launch without --gradient_accumulation_steps \\(4 given\\)"):
        check_launch("x.py", {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, RECIPE)  # DDP ignores it silently
    for bad, says in (("{not json", "cannot be read as JSON"), (None, "does not exist")):
        path = tmp_path / "bad.json"
        if bad is None:
            path.unlink()
        else:
            path.write_text(bad)
        with pytest.raises(SapoError, match=f"DeepSpeed config {path} {says}"):
            read_launch({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


@pytest.mark.parametrize("script,argv", [
    (train_sapo, ["--model", "/nonexistent/model", "--output-dir", "{tmp}/run"]),
    (score_prompts, ["--model", "/nonexistent/model", "--task", "sentiment"]),
    (evaluate, ["--model", "/nonexistent/model", "--tasks", "sentiment"]),
])
def test_every_script_refuses_fsdp_in_one_line_before_loading(script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit) as e:
        script.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "does not support FSDP" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("script,argv,zero,says", [
    (probe_prompts, ["--model", "/nonexistent/model", "--output-dir", "{tmp}/run"],
     {"offload_optimizer": {"device": "nvme"}},
     "probe_prompts.py: DeepSpeed ZeRO-3 with offload_optimizer on NVMe in {json} is not supported"),
    (score_prompts, ["--model", "/nonexistent/model", "--task", "sentiment"], {"offload_param": {"device": "nvme"}},
     "score_prompts.py: DeepSpeed ZeRO-3 with offload_param on NVMe in {json} is not supported"),
])
def test_zero3_launches_not_supported_are_refused_in_one_line_before_loading(script, argv, zero, says, tmp_path,
                                                                             monkeypatch, capsys):
    for key, value in deepspeed_env(tmp_path, {"zero_optimization": {"stage": 3, **zero}}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        script.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says.format(json=tmp_path / "ds_config.json") in err[0]
    assert not (tmp_path / "run").exists()


def test_real_two_process_fsdp_launch_is_refused(tmp_path):
    # Through the launcher itself, so the environment it really sets is what is checked (2 CPU processes, gloo).
    import os
    import subprocess
    import sys

    from test_evaluate import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--use_fsdp", "--num_processes",
                           "2", "--main_process_port", str(free_port()), "train_sapo.py",
                           "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0
    assert ours and all("train_sapo.py does not support FSDP" in line for line in ours)  # one line per process
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("engine,says", [(["--use_fsdp", "--fsdp_version", "2"], "fsdp"),
                                         (["--use_deepspeed", "--zero_stage", "3"], "deepspeed")])
def test_real_two_process_sharded_launch_built_as_ddp_on_cpu_is_refused(engine, says, tmp_path):
    if says == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is optional (requirements-deepspeed.txt)")
    # evaluate.py accepts FSDP2 and ZeRO-3 from the environment; with ACCELERATE_USE_CPU=1 accelerate then builds a
    # DDP Accelerator (seen: MULTI_CPU), which would run unsharded: refused once built, before any model loads.
    import os
    import subprocess
    import sys

    from test_evaluate import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", *engine,
                           "--num_processes", "2", "--main_process_port", str(free_port()), "evaluate.py",
                           "--model", "/nonexistent/model", "--tasks", "sentiment"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0
    assert ours and all(f"evaluate.py: the launch asks for {says} but accelerate built a MULTI_CPU one" in line
                        for line in ours), proc.stderr[-2000:]
    hint = "on GPUs only: on a CPU, use DeepSpeed ZeRO-3" if says == "fsdp" else "makes accelerate skip DeepSpeed"
    assert all(hint in line for line in ours), ours


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_deepspeed_launch_that_accelerate_quietly_builds_as_ddp_is_refused(tmp_path, monkeypatch, capsys):
    # ACCELERATE_USE_CPU=1 with --use_deepspeed: accelerate skips DeepSpeed and builds a plain launch. The check
    # compares what the launch asked for with what the built Accelerator is, before any model loads.
    for key, value in {**deepspeed_env(tmp_path, None), "ACCELERATE_USE_CPU": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        train_sapo.main(["--model", "/nonexistent/model", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "asks for deepspeed but accelerate built a NO one (ACCELERATE_USE_CPU=1 makes accelerate skip" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_resumed_only_by_the_kind_of_launch_that_wrote_it(tmp_path):
    from tasks.sharding import FSDP2_OPTIMIZER

    deepspeed_checkpoint = tmp_path / "ds" / "checkpoint"
    (deepspeed_checkpoint / "pytorch_model").mkdir(parents=True)  # DeepSpeed's engine checkpoint (per process)
    plain_checkpoint = tmp_path / "ddp" / "checkpoint"
    plain_checkpoint.mkdir(parents=True)
    (plain_checkpoint / "model.safetensors").write_bytes(b"")
    fsdp2_checkpoint = tmp_path / "fsdp2" / "checkpoint"
    fsdp2_checkpoint.mkdir(parents=True)
    (fsdp2_checkpoint / "model.safetensors").write_bytes(b"")
    (fsdp2_checkpoint / FSDP2_OPTIMIZER).write_bytes(b"")  # tasks.sharding.save_state's whole optimizer state
    for checkpoint, kind in ((deepspeed_checkpoint, "DeepSpeed"), (plain_checkpoint, "plain"),
                             (fsdp2_checkpoint, "FSDP2")):
        checkpoints.check_checkpoint_format(checkpoint, kind, "1-sentiment")
    with pytest.raises(SapoError, match=f"{deepspeed_checkpoint} was written by a DeepSpeed launch, this is a "
                                        "one-process or DDP one: resume with the same launch, or delete it to train "
                                        "1-sentiment again"):
        checkpoints.check_checkpoint_format(deepspeed_checkpoint, "plain", "1-sentiment")
    with pytest.raises(SapoError, match="was written by a one-process or DDP launch, this is a DeepSpeed one"):
        checkpoints.check_checkpoint_format(plain_checkpoint, "DeepSpeed", "1-sentiment")
    with pytest.raises(SapoError, match="was written by an FSDP2 launch, this is a one-process or DDP one"):
        checkpoints.check_checkpoint_format(fsdp2_checkpoint, "plain", "1-sentiment")
    with pytest.raises(SapoError, match="was written by a one-process or DDP launch, this is an FSDP2 one"):
        checkpoints.check_checkpoint_format(plain_checkpoint, "FSDP2", "1-sentiment")
