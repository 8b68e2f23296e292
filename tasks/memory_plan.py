"""Ours: the peak memory of a training step, estimated before training, and `--gradient-checkpointing auto`.

    peak(off) = static + a * T + a / L * T * TRANSIENT + head
    peak(on)  = static + h * L * T + a / L * T * (1 + TRANSIENT) + head

- static: every parameter (in its dtype) + for each trainable one an fp32 gradient and AdamW's two fp32 moments;
- a: bytes that autograd keeps for the backward pass per token of a micro-batch, all L decoder layers together.
  Measured, not guessed: one forward of a probe row (the real row width, the real attention kind, LoRA dropout and
  dtype) under torch.autograd.graph.saved_tensors_hooks, counting each saved storage once (parameters excluded);
- T: tokens of the largest micro-batch (the --micro-batch-tokens budget, padding included);
- h: one layer input per token (hidden x dtype bytes): what a checkpointed layer keeps; with checkpointing on, the
  layer being recomputed in the backward holds its own a / L per token again;
- TRANSIENT: the gradients and temporaries in flight while one layer is back-propagated, as a share of that layer's
  saved activations (0.5: fitted on tiny models on CPU, where the estimate lands within 10% of the measured peak;
  the GPU suite records the estimate beside the peak reached);
- head: the LM head's fp32 logits of one chunk (tasks.train_step.HEAD_CHUNK_ELEMENTS), their log-softmax and their
  gradient.

auto turns checkpointing off when peak(off) <= MARGIN x the device's memory (CUDA: the card's total; CPU: physical
memory), else on. The chosen mode, both estimates and the peak actually reached go into training.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TRANSIENT = 0.5
MARGIN = 0.85  # of the device's memory: allocator fragmentation, cuBLAS workspaces, the CUDA context
CHECKPOINTING_MODES = ("on", "off", "auto")


@dataclass
class MemoryEstimate:
    static_bytes: int  # parameters + LoRA gradients + AdamW moments
    activation_bytes_per_token: float  # a: saved for backward per token, all layers (measured on a probe row)
    layer_input_bytes_per_token: int  # h: what one checkpointed layer keeps per token
    layers: int
    tokens: int  # T: tokens of the largest micro-batch
    head_bytes: int
    device_bytes: int  # memory of the device the estimate is compared with

    def peak(self, checkpointing: bool) -> int:
        a, T, L = self.activation_bytes_per_token, self.tokens, self.layers
        one_layer = a / L * T
        if checkpointing:
            kept = self.layer_input_bytes_per_token * L * T + one_layer
        else:
            kept = a * T
        return int(self.static_bytes + kept + one_layer * TRANSIENT + self.head_bytes)

    def fits(self, checkpointing: bool) -> bool:
        return self.peak(checkpointing) <= MARGIN * self.device_bytes

    def describe(self) -> str:
        gb = 1e9
        return (f"estimated peak memory at {self.tokens} tokens per forward: {self.peak(False) / gb:.1f} GB without "
                f"gradient checkpointing, {self.peak(True) / gb:.1f} GB with it (device {self.device_bytes / gb:.1f} "
                f"GB, margin {MARGIN:.0%}; static {self.static_bytes / gb:.2f} GB, activations "
                f"{self.activation_bytes_per_token / 1e6:.3f} MB per token)")


def device_memory_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def static_bytes(model) -> int:
    """Every parameter in its dtype, plus fp32 gradient + two AdamW moments for each trainable one."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * 4 * 3
    return total


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs (storages in `exclude`, the
    parameters, are not counted: they exist anyway). The graph is dropped afterwards: nothing is back-propagated."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in exclude and key not in seen:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def estimate_training_memory(step_module, net, tokens: int, probe_width: int, device,
                             head_rows: int | None = None) -> MemoryEstimate:
    """The estimate for micro-batches of `tokens` tokens. `step_module`: tasks.train_step.SupervisedNLL; `net`: the
    transformers model (LoRA layers inside, trainable ones with requires_grad); `probe_width`: the widest row a
    micro-batch will have (its longest sequence, capped at `tokens`); `head_rows`: the most supervised tokens of one
    micro-batch (default: all `tokens`). Run with checkpointing OFF."""
    from tasks.prompts import IGNORE_INDEX, Encoded
    from tasks.train_batches import build_batch

    config = net.config.get_text_config() if hasattr(net.config, "get_text_config") else net.config
    width = max(2, min(probe_width, tokens))
    ids = [(7 * i + 3) % max(config.vocab_size - 1, 1) + 1 for i in range(width)]
    probe = Encoded(ids, [IGNORE_INDEX] * (width - 1) + ids[-1:], width - 1)  # one supervised token: no head cost
    batch = build_batch([probe], [[0]], 0).to(device)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    was_training = step_module.training
    step_module.train()
    try:
        saved = saved_bytes(lambda: step_module(batch), params)
    finally:
        step_module.train(was_training)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    weight = net.get_output_embeddings().weight
    from tasks.train_step import HEAD_CHUNK_ELEMENTS

    head_rows = max(1, min(tokens if head_rows is None else head_rows, HEAD_CHUNK_ELEMENTS // weight.shape[0]))
    return MemoryEstimate(static_bytes=static_bytes(net), activation_bytes_per_token=saved / width,
                          layer_input_bytes_per_token=config.hidden_size * weight.element_size(),
                          layers=config.num_hidden_layers, tokens=tokens,
                          head_bytes=head_rows * weight.shape[0] * 4 * 3, device_bytes=device_memory_bytes(device))


def choose_checkpointing(mode: str, estimate: MemoryEstimate | None) -> bool:
    """on/off as asked; auto: off when the estimated peak without it fits the device with the margin."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return not estimate.fits(False)


def peak_memory_reached(device) -> tuple[int, str]:
    """(bytes, what they are): CUDA: torch.cuda.max_memory_allocated since the last reset; CPU: the process's max
    resident set (everything the process ever held, not the step alone)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated during training"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS (CPU)"


def largest_micro_batch(plans, encoded, steps) -> tuple[int, int, int]:
    """(tokens, row width, supervised tokens), each the largest over every micro-batch of a task's training:
    `plans[s]` = the (index, tasks.train_batches.MicroBatch) pairs of step s (positions into `steps[s]`)."""
    from tasks.train_batches import supervised_tokens

    tokens = width = head_rows = 1
    for batch, plan in zip(steps, plans):
        for _, micro in plan:
            if micro is None:
                continue
            tokens, width = max(tokens, micro.tokens), max(width, micro.width)
            head_rows = max(head_rows, supervised_tokens(encoded, [batch[p] for row in micro.rows for p in row]))
    return tokens, width, head_rows


def plan_training_memory(accelerator, step_module, net, plans, encoded, steps, mode: str):
    """A task's training memory, before its first step: the peak estimated from its largest micro-batch (`plans[s]`:
    this process's (index, MicroBatch) pairs of step s, planned for one process), printed; gradient checkpointing
    chosen from it (`mode` on | off | auto) and switched on; the CUDA peak counter reset, for training.json's peak.
    Returns (the estimate, or None when the model is sharded, and whether checkpointing is on)."""
    from tasks.sharding import lockstep, shards_per_task
    from tasks.train_step import set_gradient_checkpointing

    tokens, width, head_rows = largest_micro_batch(plans, encoded, steps)
    if lockstep(net) or shards_per_task(accelerator):  # sharded (tasks/sharding.py): no probe forward; auto = on
        estimate, checkpointing = None, mode != "off"
    else:
        estimate = estimate_training_memory(step_module, net, tokens, width, accelerator.device, head_rows)
        checkpointing = choose_checkpointing(mode, estimate)
    accelerator.print(f"{estimate.describe() if estimate else 'sharded: no memory estimate'}: gradient "
                      f"checkpointing {'on' if checkpointing else 'off'} (--gradient-checkpointing {mode})")
    if checkpointing:
        set_gradient_checkpointing(net, True)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    return estimate, checkpointing
