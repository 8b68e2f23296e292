"""The learning-rate schedule of a task's training: a factor of --lr per optimizer step, a function of the step alone
(so a resumed run replays it exactly, and it does not depend on the number of processes).

`--schedule warmup-log` is what the authors' runs did (their DeepSpeed config's WarmupLR replaced the cosine decay
their scripts asked for; README "Reproducing the paper"); cosine is what the scripts asked for.
"""
from __future__ import annotations

import math

import torch


def warmup_steps_of(config, total_steps: int) -> int:
    """Warmup steps of a task: round(ratio x steps); warmup-log takes the authors' rule, ceil(ratio x steps)
    (transformers' TrainingArguments.get_warmup_steps, which filled their WarmupLR's warmup_num_steps), at least 1."""
    if config.schedule == "warmup-log":
        return max(1, math.ceil(config.warmup_ratio * total_steps))
    return max(1, round(config.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate of 0-based optimizer step `step`, as a fraction of --lr.

    cosine / linear / constant: linear warmup from 1/warmup_steps to the peak over warmup_steps, then cosine (or
    linear) decay to 0 at total_steps, or the peak.
    warmup-log: DeepSpeed's WarmupLR (deepspeed/runtime/lr_schedules.py, warmup_type "log", its default) with
    warmup_min_lr 0, warmup_max_lr = --lr and warmup_num_steps = warmup_steps, as the authors' DeepSpeed config
    ("auto" values, filled by transformers' Trainer) ran it. WarmupLR sets warmup_min_lr when it is built and the
    engine steps it after every optimizer step, so optimizer step s uses its value at iteration s - 1:
    0 for s = 0, then log(s) / log(W) for s <= W (W = max(2, warmup_steps), DeepSpeed's floor), then 1, constant:
    the first two steps run at 0 (AdamW's moments still advance)."""
    if schedule == "warmup-log":
        iteration, w = step - 1, max(2, warmup_steps)
        if iteration < 0:
            return 0.0
        return math.log(iteration + 1) / math.log(w) if iteration < w else 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_schedule(trainable, config, total_steps: int, warmup_steps: int):
    """AdamW on the adapter's weights, and its learning-rate schedule (tasks/schedule.py) as a LambdaLR stepped by
    hand once per optimizer step: accelerate's prepared scheduler steps once per process, which would make the
    schedule depend on the number of processes."""
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.schedule))
    return optimizer, scheduler
