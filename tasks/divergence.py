"""A diverging training run stops at the first non-finite step instead of saving a NaN adapter.

With a learning rate far too high the loss turns NaN (or the update overflows the adapter's weights to inf/NaN) and
training would go on: the saved adapter is entirely NaN, every answer is empty, the summary reports AP = 0.00 as a
result and the next tasks are scored and trained on top of the NaN model. Ours (the paper's code has no such check):
after every optimizer step the step's loss, the O-LoRA penalty and the updated trainable weights are checked on every
process, and the verdict is all-reduced, so that every process stops at the same step with the same line. Nothing of
the task is saved after that (no adapter, no row); the last checkpoint, written at an earlier finite step, stays.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from tasks.errors import SapoError


def check_finite_step(accelerator, task: str, step: int, total_steps: int, nll_sum, total_tokens: int, penalty,
                      lr: float, trainable, checkpoint: Path):
    """Raise a one-line SapoError, on every process alike, when step `step` (1-based) diverged: this process's
    summed NLL `nll_sum` (the step's loss is their sum over processes / `total_tokens`), the O-LoRA penalty
    `penalty` (0 without O-LoRA) or any of the `trainable` weights after the update is not finite."""
    device = nll_sum.device
    # FSDP2 (DTensor) weights: this process's shard; the reduction below counts over every process anyway
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainable]
    broken_here = sum((~torch.isfinite(p.detach())).any().to(device, torch.float64) for p in local)  # no sync
    values = torch.stack([nll_sum.detach().to(torch.float64).reshape(()),
                          torch.as_tensor(penalty).detach().to(device, torch.float64).reshape(()),
                          torch.as_tensor(broken_here, dtype=torch.float64, device=device).reshape(())])
    # One reduction carries all three: a NaN or inf on any process makes the sum non-finite on every process, and
    # a process whose weights broke adds 1 to the count.
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    nll, orth, broken = (float(v) for v in values)
    loss, orth = nll / total_tokens, orth / accelerator.num_processes
    if math.isfinite(loss) and math.isfinite(orth) and broken == 0:
        return
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    elif not math.isfinite(orth):
        what = f"the O-LoRA penalty is {orth} (loss {loss:.4g})"
    else:
        what = f"the update made the adapter's weights non-finite (loss {loss:.4g})"
    kept = last_checkpoint_step(checkpoint)
    kept = (f"its last finite checkpoint (step {kept}) is kept in {checkpoint}" if kept is not None
            else "no checkpoint was written yet")
    raise SapoError(f"task {task}: training diverged at step {step}/{total_steps}: {what} at learning rate "
                    f"{lr:.3g}; no adapter and no row were saved for it, {kept}; try a lower --lr (or a smaller "
                    "--max-grad-norm, a longer --warmup-ratio, --dtype fp32) and rerun with --overwrite or another "
                    "--output-dir")


def last_checkpoint_step(checkpoint: Path) -> int | None:
    from tasks.loaders import read_json

    try:
        saved = read_json(Path(checkpoint) / "sapo_step.json", default=None)
    except SapoError:
        return None
    return saved.get("step") if isinstance(saved, dict) else None
