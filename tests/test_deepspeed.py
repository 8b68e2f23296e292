"""DeepSpeed through accelerate trains exactly what DDP trains: real 2-process launches on CPU (DeepSpeed's CPU
accelerator, gloo) of train_sapo.py on a tiny model, compared adapter by adapter with a 2-process DDP run of the same
global batch, accumulation (token-budget micro-batches, 4 per process per step), clipping, schedule and O-LoRA penalty.

The settings make each part matter: --max-grad-norm 0.05 clips every step (measured here: the DDP run without
clipping ends with adapters 5e-3 and 2.5e-2 away, relative, from the clipped one), the warmup-log schedule runs its
first two steps at 0, and O-LoRA's penalty acts on task 2. An engine that stepped after every micro-batch, skipped
the clipping or the penalty would be orders of magnitude off the 1e-4 tolerance (seen: 2e-7 to 5e-7).

Under ZeRO-3 the LoRA weights are partitioned outside their module's forward, and O-LoRA's penalty reads them from
outside: it runs inside a forward of the training module with them registered as external parameters (tasks/olora.py);
the ZeRO-3 run below partitions every parameter (no persistence threshold) and trains what DDP trains.

DeepSpeed is optional (requirements-deepspeed.txt; CI installs it). Its first CPU run compiles a comm module with
g++ (about 75 s, then cached)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_evaluate import free_port
from test_launch import AUTHORS_STAGE2
from tiny import save_tiny_model_dir

pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install -r requirements-deepspeed.txt")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--sequence", "sentiment,count_words", "--select", "original", "--method", "o-lora",
        "--train-instances", "12", "--epochs", "2", "--global-batch-size", "8", "--micro-batch-tokens", "64",
        "--eval-instances", "2", "--max-new-tokens", "2", "--eval-batch-size", "4", "--lr", "5e-3",
        "--max-grad-norm", "0.05", "--schedule", "warmup-log", "--warmup-ratio", "0.5"]
TASKS = ["1-sentiment", "2-count_words"]


def launch(out: Path, model: str, *launcher_args, cpu_ddp=False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_ddp:
        env["ACCELERATE_USE_CPU"] = "1"  # DDP on CPU; DeepSpeed needs it unset (accelerate skips DeepSpeed on "cpu")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", *launcher_args,
                           "--num_processes", "2", "--main_process_port", str(free_port()), "train_sapo.py",
                           "--model", model, *ARGS, "--output-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def adapter(out: Path, task: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / task / "adapter" / "adapter_model.safetensors"))


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    model = save_tiny_model_dir(root / "model")
    launch(root / "ddp", model, "--multi_gpu", cpu_ddp=True)
    return root, model


def assert_same_training(ours: Path, ddp: Path):
    for task in TASKS:
        assert relative_difference(adapter(ours, task), adapter(ddp, task)) < 1e-4, task
        log = [json.loads(x) for x in (ours / task / "train_log.jsonl").read_text().splitlines()]
        reference = [json.loads(x) for x in (ddp / task / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == len(reference) == 4  # one optimizer step per global batch
        assert [r["lr"] for r in log] == [r["lr"] for r in reference]
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
        assert [r.get("olora_orth") for r in log] == pytest.approx([r.get("olora_orth") for r in reference],
                                                                   rel=1e-5)
        training = json.loads((ours / task / "training.json").read_text())
        assert training["accumulation"] == 4  # micro-batches per process per step: the script's own accumulation
    assert json.loads((ours / "R.json").read_text())["rougeL"] == json.loads((ddp / "R.json").read_text())["rougeL"]


def test_zero2_from_launcher_flags_trains_what_ddp_trains(ddp_run):
    root, model = ddp_run
    proc = launch(root / "zero2", model, "--use_deepspeed", "--zero_stage", "2")
    assert "launch: deepspeed ZeRO-2, mixed precision no" in proc.stdout
    assert_same_training(root / "zero2", root / "ddp")


def test_authors_style_config_file_with_offload_trains_what_ddp_trains(ddp_run):
    # Their stage2_llama.config as written (AdamW and WarmupLR sections with "auto" values: what the script builds
    # itself, so accepted), optimizer offloaded to the CPU; bf16 left to the launcher (fp32 here: the tolerance).
    root, model = ddp_run
    config = {k: v for k, v in AUTHORS_STAGE2.items() if k != "bfloat16"}
    config["bf16"] = {"enabled": "auto"}
    path = root / "stage2_offload.json"
    path.write_text(json.dumps(config))
    proc = launch(root / "offload", model, "--use_deepspeed", "--deepspeed_config_file", str(path),
                  "--mixed_precision", "no")
    assert f"launch: deepspeed ZeRO-2, optimizer offloaded to cpu, mixed precision no ({path})" in proc.stdout
    assert_same_training(root / "offload", root / "ddp")


def test_zero3_olora_trains_what_ddp_trains(ddp_run):
    # Every parameter partitioned (the tiny LoRA matrices would otherwise stay whole: the default persistence
    # threshold is 10 x hidden = 640 elements), so the penalty's A matrices are shape (0,) outside a forward.
    root, model = ddp_run
    config = {"bf16": {"enabled": "auto"}, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 4096}}
    path = root / "zero3.json"
    path.write_text(json.dumps(config))
    proc = launch(root / "zero3", model, "--use_deepspeed", "--deepspeed_config_file", str(path),
                  "--mixed_precision", "no")
    assert "sharded launch: zero3" in proc.stdout
    assert_same_training(root / "zero3", root / "ddp")
    orth = [json.loads(x)["olora_orth"] for x in (root / "zero3" / TASKS[1] / "train_log.jsonl").read_text()
            .splitlines()]
    assert all(o > 0 for o in orth)  # task 2's penalty acted (task 1 has no earlier adapter: 0)
