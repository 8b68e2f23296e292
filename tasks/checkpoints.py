"""A task's adapter and its training checkpoints on disk (train_sapo.py's plumbing, beside tasks/run_dir.py).

- `save_adapter`: one adapter as stock `PeftModel.from_pretrained(base, dir)` loads it, swapped in whole.
- `save_checkpoint` / `resume_training`: accelerate's save_state / load_state of the weights being trained (the new
  adapter, not the frozen base: `keep_trainable_weights`), the optimizer and RNG states, plus `sapo_step.json` (the
  steps done, the training seconds so far, re-selection's state). A checkpoint folder is always complete or absent:
  written beside it, then renamed in; `recover_checkpoint` finishes a swap a kill interrupted.
- `TrainLog`: train_log.jsonl, each optimizer step once (a resumed segment drops what its predecessor wrote after
  the checkpoint it resumes from).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import SapoError, writing
from tasks.loaders import strict_json
from tasks.records import read_record
from tasks.reselection import ReselectorState
from tasks.sharding import FSDP2_OPTIMIZER, load_state, save_state, shards_per_task


@dataclass
class CheckpointStep:
    """A training checkpoint's sapo_step.json: the optimizer steps done, and what the resumed segment needs."""

    step: int
    seconds: float = 0.0  # training seconds of the segments before
    reselector: ReselectorState | None = None  # ours: re-selection's state (tasks.reselection.Reselector.state)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_adapter(peft_model, name: str, adapter_dir: Path, state_dict=None):
    """Save one adapter so that stock `PeftModel.from_pretrained(base, adapter_dir)` loads it, and drop the task's
    training checkpoint (the adapter supersedes it). Sharded weights: pass their gathered tensors
    (tasks.sharding.adapter_state_dict)."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        peft_model.save_pretrained(str(tmp), selected_adapters=[name], state_dict=state_dict)
    saved = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp  # peft nests non-default names
    os.replace(saved, adapter_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(adapter_dir.parent / "checkpoint", ignore_errors=True)


def keep_trainable_weights(models, weights, output_dir):
    """save_state hook: checkpoint only the parameters being trained (the new adapter), not the frozen base model;
    load_state(strict=False) puts them back. A checkpoint of an 8B model is then megabytes, not 16 GB. (DeepSpeed saves
    its engines itself and passes no weights: save_checkpoint asks it to leave out the frozen ones.)"""
    for i, model in enumerate(models[:len(weights)]):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


def save_checkpoint(accelerator, checkpoint: Path, step: int, extra=None):
    """save_state into a fresh folder, then swap it in: a crash mid-save keeps the previous checkpoint. Under
    DeepSpeed every process writes its own partition, the frozen base left out."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with writing(tmp):  # a full disk: one line naming the folder (torch's own message names neither)
        save_state(accelerator, str(tmp), **({"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        step_file = tmp / "sapo_step.json"  # written last: tmp is complete
        step_file.write_text(strict_json({"step": step, **(extra or {})}, step_file))
        # Renames only: `checkpoint` is always complete or absent (deleting it first left a window with neither).
        old = checkpoint.with_name(checkpoint.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if checkpoint.exists():
            os.replace(checkpoint, old)
        os.replace(tmp, checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def recover_checkpoint(accelerator, checkpoint: Path):
    """After a kill inside save_checkpoint's swap: no `checkpoint`, but a complete new one (.tmp) or the previous one
    (.old) next to it. Put the newest complete one back."""
    if accelerator.is_main_process and not checkpoint.exists():
        for suffix in (".tmp", ".old"):
            candidate = checkpoint.with_name(checkpoint.name + suffix)
            if (candidate / "sapo_step.json").exists():
                os.replace(candidate, checkpoint)
                break
    accelerator.wait_for_everyone()


def launch_kind(accelerator) -> str:
    """The kind of checkpoint a launch writes: DeepSpeed (the engine's own: a pytorch_model/ folder of per-process
    partitions), FSDP2 (tasks.sharding.save_state: whole tensors and FSDP2_OPTIMIZER) or plain (accelerate's
    model.safetensors + optimizer.bin: one process, DDP)."""
    if is_deepspeed(accelerator):
        return "DeepSpeed"
    return "FSDP2" if shards_per_task(accelerator) else "plain"


def check_checkpoint_format(checkpoint: Path, kind: str, task: str):
    """A checkpoint is resumed only by the kind of launch that wrote it (launch_kind): under another kind the loader
    would fail inside accelerate or DeepSpeed."""
    if (checkpoint / "pytorch_model").is_dir():
        written = "DeepSpeed"
    else:
        written = "FSDP2" if (checkpoint / FSDP2_OPTIMIZER).exists() else "plain"
    if written != kind:
        described = {"DeepSpeed": "a DeepSpeed", "FSDP2": "an FSDP2", "plain": "a one-process or DDP"}
        raise SapoError(f"{checkpoint} was written by {described[written]} launch, this is {described[kind]} one: "
                        f"resume with the same launch, or delete it to train {task} again from its start")


def check_checkpoint_keys(model, checkpoint: Path):
    """load_state(strict=False) skips every key it does not know: a checkpoint whose weights are named otherwise (one
    written before the training forward became tasks.train_step.SupervisedNLL, whose names start with "model.") would
    resume at its step with untrained adapter weights. Refuse it instead."""
    saved_file = checkpoint / "model.safetensors"
    if not saved_file.exists():
        return
    from safetensors import safe_open

    with safe_open(str(saved_file), framework="pt") as f:
        saved = set(f.keys())
    net = getattr(model, "module", model)  # under DDP the names gain "module.", which the saved ones do not have
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    if trainable and not trainable & saved:
        raise SapoError(f"{saved_file} holds none of the weights being trained (written by another version of "
                        f"train_sapo.py?); delete {checkpoint} to train this task again from its start")


def resume_training(accelerator, model, scheduler, checkpoint: Path, task: str) -> CheckpointStep | None:
    """The checkpoint an interrupted segment left, loaded into the prepared `model` and optimizer (weights, optimizer
    and RNG states), the learning-rate `scheduler` brought to its step; None when there is none. Refused in one line
    when another kind of launch wrote it or its weights are not the ones being trained."""
    recover_checkpoint(accelerator, checkpoint)
    if not (checkpoint / "sapo_step.json").exists():
        return None
    deepspeed = is_deepspeed(accelerator)
    check_checkpoint_format(checkpoint, launch_kind(accelerator), task)
    saved = read_record(checkpoint / "sapo_step.json", CheckpointStep,
                        advice=f"delete {checkpoint} to train the task again from its start")
    check_checkpoint_keys(model, checkpoint)
    load_state(accelerator, str(checkpoint), **({"load_module_strict": False} if deepspeed else {"strict": False}))
    for _ in range(saved.step):  # the schedule is a function of the step alone: replay it
        scheduler.step()
    return saved


class TrainLog:
    """train_log.jsonl: one JSON line per optimizer step, written by the main process."""

    def __init__(self, path: Path, start_step: int, is_main: bool):
        """Keep the first `start_step` lines (the steps the resumed checkpoint holds), drop the rest."""
        self.path, self.is_main = path, is_main
        if is_main:
            kept = path.read_text().splitlines()[:start_step] if path.exists() else []
            path.write_text("".join(line + "\n" for line in kept))

    def append(self, record: dict):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(strict_json(record, self.path) + "\n")
