"""Sharded launches on 2 CPU processes (gloo) against one process without sharding (tasks/sharding.py).

tests/sharded_worker.py runs the scenario under torch FSDP2 (`fully_shard` driven directly: accelerate builds no FSDP
Accelerator on a CPU) and under DeepSpeed ZeRO-3 through accelerate (DS_ACCELERATOR=cpu); `sharded_worker.reference`
runs it on one process, nothing sharded. Tolerances: candidate scores within 1e-6 relative, greedy answers identical,
the saved adapter bit-identical, and each training step's update (SGD, clipped) within 1e-3 of the reference update
(seen here: 5e-5, float32 sums in another order).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharded_worker as scenario
from tasks import sharding
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

WORKER = Path(__file__).with_name("sharded_worker.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("sharded") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    return scenario.reference(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, model_dir: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(WORKER), mode, model_dir, str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def check_against_reference(got: dict, ref: dict, trained: tuple[str, ...]):
    for key in ("scores", "scores_after"):
        if key not in got:
            continue
        assert got[key].num_batches % 2 == 1  # one process ran a discarded batch to keep the forwards in step
        for c, r in zip(got[key].candidates, ref[key].candidates):
            assert c.score == pytest.approx(r.score, rel=1e-6)
            assert c.instance_counts == r.instance_counts
    for key in ("answers", "answers_after"):
        if key in got:
            assert got[key] == ref[key]
    assert set(got["t0"]) == set(ref["t0"])
    for n in ref["t0"]:
        assert torch.equal(got["t0"][n], ref["t0"][n])
    for name in trained:
        init, want, have = ref[name + "_init"], ref[name], got[name]
        assert set(have) == set(want)
        update = max((want[n] - init[n]).abs().max().item() for n in want)
        assert update > 1e-3  # the step moved the weights
        error = max((have[n] - want[n]).abs().max().item() for n in want)
        assert error <= 1e-3 * update, (name, error, update)


def check_saved_adapter(adapter_dir: Path, model_dir: str, ref: dict):
    """Stock peft loads the adapter the main process saved from sharded weights, with the reference's values."""
    from peft import PeftModel

    from tasks.models import load_model

    loaded = PeftModel.from_pretrained(load_model(model_dir, dtype=torch.float32), str(adapter_dir))
    weights = {n.replace(".default.", ".t0."): p for n, p in loaded.named_parameters() if ".default." in n}
    assert set(weights) == set(ref["t0"])
    for n, p in weights.items():
        assert torch.equal(p.detach(), ref["t0"][n])


def test_fsdp2_two_processes_match_one_process(model_dir, reference, tmp_path):
    ranks = launch("fsdp2", model_dir, tmp_path)
    for got in ranks:
        assert got["engine"] == sharding.FSDP2
        assert got["generate_refused"].startswith("--generate with a local model is not supported under a sharded")
        check_against_reference(got, reference, trained=("t1",))
    check_saved_adapter(tmp_path / "adapter-t0", model_dir, reference)


def test_zero3_two_processes_match_one_process(model_dir, reference, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (requirements-deepspeed.txt)")
    ranks = launch("zero3", model_dir, tmp_path)  # offload: the train_sapo launch below (and "zero3-offload")
    for got in ranks:
        assert got["partitioned_at_load"] == sharding.ZERO3  # accelerate's zero3_init partitioned it at load
        assert got["engine"] == sharding.ZERO3
        check_against_reference(got, reference, trained=("t1", "t2"))
    check_saved_adapter(tmp_path / "adapter-t0", model_dir, reference)


def test_unsharded_model_is_left_as_it_is():
    model = tiny_model(len(tiny_tokenizer()))
    assert sharding.engine_of(model) == sharding.NONE and not sharding.lockstep(model)
    head = model.get_output_embeddings().weight
    with sharding.weights_for_forward(model), sharding.gathered(head, None):
        assert model.get_output_embeddings().weight is head
    assert sharding.numel(head) == head.numel()


def test_inference_config_keeps_zero_and_precision_and_drops_auto():
    launch_config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
                     "optimizer": {"type": "AdamW"}, "bf16": {"enabled": "auto"},
                     "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                           "offload_param": {"device": "cpu"}}}
    assert sharding.inference_config(launch_config) == {
        "bf16": {}, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


# ----------------------------------------------------------------------------------------------------------------------
# train_sapo.py under `accelerate launch --use_deepspeed` ZeRO-3, killed after a checkpoint and resumed

ROOT = Path(__file__).resolve().parent.parent
# README's ZeRO-3 config, as users write them: the sizes left auto (tasks.sharding fills them from the model),
# parameters and optimizer states offloaded to the CPU.
USER_ZERO3_JSON = {"bf16": {"enabled": "auto"}, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                   "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                   "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                                         "stage3_prefetch_bucket_size": "auto",
                                         "stage3_param_persistence_threshold": "auto",
                                         "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}}
STOP_AFTER_CHECKPOINT = f'''import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_sapo
save = train_sapo.save_checkpoint
def save_then_stop(accelerator, checkpoint, step, extra=None):  # a kill right after task 2's first checkpoint
    save(accelerator, checkpoint, step, extra)
    if checkpoint.parent.name.startswith("2-"):
        accelerator.wait_for_everyone()
        os._exit(3)
train_sapo.save_checkpoint = save_then_stop
train_sapo.main(sys.argv[1:])
'''


def launch_interrupted_then_resumed(launcher: list[str], env: dict, args: list[str], tmp_path: Path, out: Path,
                                    check_checkpoint=None):
    """train_sapo.py through `launcher` (accelerate launch ...), killed right after task 2's first checkpoint (handed
    to `check_checkpoint`), then the same command again: it resumes there."""
    (tmp_path / "stop.py").write_text(STOP_AFTER_CHECKPOINT)
    killed = subprocess.run([*launcher, str(tmp_path / "stop.py"), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    checkpoint = out / "2-count_words" / "checkpoint"
    assert killed.returncode != 0 and (checkpoint / "sapo_step.json").exists(), \
        killed.stdout[-2000:] + killed.stderr[-3000:]
    if check_checkpoint is not None:
        check_checkpoint(checkpoint)
    resumed = subprocess.run([*launcher, "train_sapo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming training of 2-count_words" in resumed.stdout
    return resumed


def assert_runs_match(one: Path, out: Path, rows=("1-sentiment", "2-count_words")):
    """Per task: the same picks, candidate scores (1e-5 relative), losses (1e-4 relative), adapters (1e-4 of the
    largest weight) and greedy predictions of every task in the row (identical)."""
    import json

    from safetensors.torch import load_file

    for task_dir in rows:
        s1, s2 = [json.loads((d / task_dir / "selection.json").read_text()) for d in (one, out)]
        assert s1["selected"] == s2["selected"]
        assert [c["score"] for c in s2["candidates"]] == pytest.approx([c["score"] for c in s1["candidates"]],
                                                                       rel=1e-5)
        l1, l2 = [[json.loads(x)["loss"] for x in (d / task_dir / "train_log.jsonl").read_text().splitlines()]
                  for d in (one, out)]
        assert len(l2) == len(l1) and l2 == pytest.approx(l1, rel=1e-4)
        w1, w2 = [load_file(str(d / task_dir / "adapter" / "adapter_model.safetensors")) for d in (one, out)]
        assert set(w1) == set(w2)
        for n in w1:
            assert (w2[n] - w1[n]).abs().max() <= 1e-4 * w1[n].abs().max()
        assert predictions(out, task_dir) == predictions(one, task_dir)


def predictions(run: Path, row: str) -> dict[str, list[str]]:
    import json

    return {task: [json.loads(x)["prediction"] for x in (run / row / "predictions" / f"{task}.jsonl")
                   .read_text().splitlines()] for task in ("sentiment", "count_words")}


def test_train_sapo_under_zero3_resumes_and_matches_one_process(model_dir, tmp_path):
    """Two tasks (selection, training, evaluation rows) on 2 processes under ZeRO-3, interrupted after task 2's
    first checkpoint and rerun: the same picks, scores, losses, adapters and greedy predictions as one process."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (requirements-deepspeed.txt)")
    import json

    import train_sapo
    from test_train_sapo import SMALL

    # --lr 3e-4 and --max-grad-norm 0.05, as the FSDP2 test below: answers that training changes (5e-3 makes every
    # answer empty), and DeepSpeed's clipping acting on every step.
    small = [*SMALL, "--lr", "3e-4", "--max-grad-norm", "0.05"]
    train_sapo.main(["--model", model_dir, "--output-dir", str(tmp_path / "one"), *small])
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(USER_ZERO3_JSON))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would quietly build DDP
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    out = tmp_path / "zero3"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--use_deepspeed",
               "--deepspeed_config_file", str(config), "--num_processes", "2", "--main_process_port", str(free_port())]
    resumed = launch_interrupted_then_resumed(command, env, ["--model", model_dir, "--output-dir", str(out), *small],
                                              tmp_path, out)
    assert "sharded launch: zero3" in resumed.stdout
    assert_runs_match(tmp_path / "one", out)
    after = [p for row in ("1-sentiment", "2-count_words") for ps in predictions(out, row).values() for p in ps]
    before = [p for ps in predictions(out, "0-zero-shot").values() for p in ps]
    assert any(after) and after != before * 2  # the answers compared are answers, and training changed some


def test_train_sapo_under_fsdp2_resumes_and_matches_one_process(model_dir, tmp_path):
    """train_sapo.py's FSDP2 path (a fresh tree per task, sharded once; tasks/sharding.py) on 2 CPU processes, with
    torch's fully_shard applied directly (the test seam: accelerate builds no FSDP Accelerator without a GPU):
    selection on the sharded state, each task's adapter trained, the rows' greedy answers, killed after task 2's
    first checkpoint and resumed, equal to one process without sharding; each saved adapter loads with stock peft."""
    import json

    import train_sapo
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_train_sapo import SMALL

    from tasks.models import load_model

    # --lr 3e-4: the trained adapters change some greedy answers (5e-3 makes every answer empty here: nothing to
    # compare); --max-grad-norm 0.05: the clipping over the sharded gradient acts (seen on one process: without it the
    # adapters end 0.12 away, relative)
    small = [*SMALL, "--lr", "3e-4", "--max-grad-norm", "0.05"]
    one = tmp_path / "one"
    train_sapo.main(["--model", model_dir, "--output-dir", str(one), *small])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", sharding.CPU_FULLY_SHARD_ENV: "1"}
    out = tmp_path / "fsdp2"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port())]

    def trainable_only(checkpoint: Path):  # the new adapter's weights and their optimizer state, not the base
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert weights and all(".task2." in n for n in weights), sorted(weights)[:4]
        state = torch.load(checkpoint / sharding.FSDP2_OPTIMIZER, weights_only=True)["state"]
        assert set(state) == set(weights) and all(int(v["step"]) == 2 for v in state.values())
        assert all(v["exp_avg"].shape == weights[n].shape for n, v in state.items())  # whole, not one shard

    resumed = launch_interrupted_then_resumed(command, env, ["--model", model_dir, "--output-dir", str(out), *small],
                                              tmp_path, out, check_checkpoint=trainable_only)
    assert "sharded launch: fsdp2" in resumed.stdout
    assert_runs_match(one, out, rows=("1-sentiment", "2-count_words"))
    assert predictions(out, "0-zero-shot") == predictions(one, "0-zero-shot")
    after = [p for row in ("1-sentiment", "2-count_words") for ps in predictions(out, row).values() for p in ps]
    before = [p for ps in predictions(out, "0-zero-shot").values() for p in ps]
    assert any(after) and after != before * 2  # the answers compared are answers, and training changed some
    for k, task_dir in enumerate(("1-sentiment", "2-count_words")):  # stock peft loads what the sharded run saved
        adapter = out / task_dir / "adapter"
        loaded = PeftModel.from_pretrained(load_model(model_dir), str(adapter))
        want = load_file(str(one / task_dir / "adapter" / "adapter_model.safetensors"))
        got = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
        assert len(got) == len(want) > 0
        for n, w in want.items():
            g = got[n.replace(".weight", ".default.weight")]
            assert (g - w).abs().max() <= 1e-4 * w.abs().max()
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8


def test_train_sapo_olora_under_fsdp2_matches_one_process(model_dir, tmp_path):
    """--method o-lora on FSDP2's code path (the seam above): the penalty gathers the A matrices (DTensor shards)
    whole and its gradient reaches each shard beside the forward's; losses, penalties and adapters equal to one
    process. The penalty matters here (lambda2 makes it act on task 1 too): with the gathered weights detached, the
    losses left the tolerance (seen)."""
    import json

    import train_sapo
    from test_train_sapo import SMALL

    small = [*SMALL, "--lr", "3e-4", "--method", "o-lora", "--olora-lambda2", "0.1"]
    one, out = tmp_path / "one", tmp_path / "fsdp2"
    train_sapo.main(["--model", model_dir, "--output-dir", str(one), *small])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", sharding.CPU_FULLY_SHARD_ENV: "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                           "2", "--main_process_port", str(free_port()), "train_sapo.py", "--model", model_dir,
                           "--output-dir", str(out), *small], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "sharded launch: fsdp2" in proc.stdout, proc.stderr[-3000:]
    assert_runs_match(one, out)
    o1, o2 = [[json.loads(x)["olora_orth"] for x in (d / "2-count_words" / "train_log.jsonl").read_text()
               .splitlines()] for d in (one, out)]
    assert all(o > 0 for o in o1) and o2 == pytest.approx(o1, rel=1e-5)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_probe_prompts_under_zero3_matches_one_process(model_dir, tmp_path):
    """probe_prompts.py under ZeRO-3 (every parameter partitioned) on 2 processes against one process: S1 trained,
    every candidate's indicators under S1 and under the base model (pre-update loss, token statistics, base-weight
    gradient norms: from each layer's input and output gradient, never the partitioned weights), the gradient
    conflicts, and every arm (a T2 LoRA from S1, dropped again afterwards: back to S1) with its greedy answers."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (requirements-deepspeed.txt)")
    import json

    import probe_prompts
    from safetensors.torch import load_file

    args = ["--model", model_dir, "--pairs", "sentiment->topic", "--unseen", "animal", "--max-candidates", "3",
            "--score-instances", "4", "--train-instances", "8", "--epochs", "1", "--global-batch-size", "4",
            "--micro-batch-size", "2", "--eval-instances", "4", "--max-new-tokens", "4", "--seeds", "1",
            "--permutations", "50", "--bootstrap", "50", "--pool-subsets", "10", "--max-source-length", "256",
            "--max-target-length", "16", "--lr", "3e-4", "--eval-batch-size", "4"]
    one, out = tmp_path / "one", tmp_path / "zero3"
    probe_prompts.main([*args, "--output-dir", str(one)])
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({**USER_ZERO3_JSON, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 4096,
        "stage3_prefetch_bucket_size": 4096}}))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--use_deepspeed",
                           "--deepspeed_config_file", str(config), "--num_processes", "2", "--main_process_port",
                           str(free_port()), "probe_prompts.py", *args, "--output-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "sharded launch: zero3" in proc.stdout, proc.stderr[-3000:]
    pair1, pair2 = one / "sentiment--topic", out / "sentiment--topic"
    i1, i2 = [json.loads((p / "indicators.json").read_text()) for p in (pair1, pair2)]
    assert i1["candidates"] == i2["candidates"] and len(i1["candidates"]) == 3
    for kind in ("indicators", "static"):
        for a, b in zip(i1[kind], i2[kind], strict=True):
            assert set(a) == set(b)
            for name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, nan_ok=True), (kind, name)
            assert a["gradient_norm"] > 0
    c1, c2 = [json.loads((p / "conflict.json").read_text()) for p in (pair1, pair2)]
    for a, b in zip(c1, c2, strict=True):
        assert b["cosine_t1"] == pytest.approx(a["cosine_t1"], abs=1e-5)
        assert b["cosine_unseen"] == pytest.approx(a["cosine_unseen"], abs=1e-5)
    answered = 0
    for arm in ["1-sentiment"] + [probe_prompts.arm_dir(pair1, c, 0).name for c in range(3)]:
        w1, w2 = [load_file(str(p / arm / "adapter" / "adapter_model.safetensors")) for p in (pair1, pair2)]
        assert set(w1) == set(w2)
        for n in w1:
            assert (w2[n] - w1[n]).abs().max() <= 1e-4 * w1[n].abs().max()
        if arm != "1-sentiment":  # the arms' rows (S1's own row is not part of the study)
            p1, p2 = [{f.name: [json.loads(x)["prediction"] for x in f.read_text().splitlines()]
                       for f in sorted((p / arm / "predictions").glob("*.jsonl"))} for p in (pair1, pair2)]
            assert p1 == p2 and len(p1) == 3
            answered += sum(1 for ps in p1.values() for x in ps if x)
    assert answered > 0  # the answers compared are answers
