"""The training forward: summed cross-entropy of the response tokens of one micro-batch (tasks.train_batches).

    hidden = backbone(input_ids, position ids restarting per sequence, block-diagonal mask)   # [B, W, H], no logits
    z_r    = logit_scale * (hidden[head_rows[r]] @ W_head.T + b)                             # only supervised rows
    z_r    = softcap * tanh(z_r / softcap)                                                    # when the model has one
    loss   = sum_r  logsumexp(z_r) - z_r[target_r]                                           # fp32, summed

Full-sequence logits ([B, W, V] in fp32: 8 x 1,664 x 151,936 x 4 bytes = 8 GB for Qwen3) are never materialised:
the head runs on the rows that predict a response token, in chunks of at most HEAD_CHUNK_ELEMENTS logits, each chunk
recomputed in the backward pass instead of kept (torch.utils.checkpoint), so the head's memory is bounded whatever
the number of supervised tokens. The loss and its gradient are those of HF's `model(...).logits.float()` followed by
a summed cross-entropy on the shifted labels.

`SupervisedNLL` is an nn.Module so that accelerate/DDP wraps the whole computation: DDP only reduces gradients of a
backward that follows a forward through its wrapper.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from tasks.attention import FLEX_ATTENTION, document_block_mask
from tasks.packing import attention_mask, scoring_setup
from tasks.train_batches import TrainingBatch

# Logits alive at once in the head: 2^26 fp32 = 256 MiB (441 rows of Qwen3's 151,936 vocabulary, 1,365 of SmolLM2's).
HEAD_CHUNK_ELEMENTS = 1 << 26


def training_layout(model) -> str:
    """train_batches layout for this model: flash-attention kernels take varlen rows (no mask, no padding); sdpa and
    eager take packed rows with our block-diagonal 4-D mask; anything else (flex attention, linear-attention or
    recurrent layers, which cannot see such a mask) gets one right-padded sequence per row."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return "padded"
    if "flash" in impl:  # flash_attention_2/3, or a hub kernel such as kernels-community/flash-attn2
        return "varlen"
    if impl == FLEX_ATTENTION:  # ours: packed rows, the mask as a BlockMask (tasks.attention)
        return "packed"
    return "packed" if impl in ("sdpa", "eager") else "padded"


def head_nll(hidden, weight, bias, targets, logit_scale=1.0, softcap=None):
    """Summed fp32 cross-entropy of the head's logits on `hidden` [R, H] against `targets` [R] (see module doc).
    The matmul runs in the model's dtype and is then upcast, as HF's `.logits.float()` does."""
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.nn.functional.cross_entropy(z, targets, reduction="sum")


class InForward:
    """`fn(model)` to run inside the training module's forward (SupervisedNLL.forward(InForward(fn)) returns its
    result): a sharded engine has then gathered what that module's forward reads; ZeRO-3 gathers the module's
    external parameters (deepspeed.zero.register_external_parameter). O-LoRA's penalty (tasks.olora) reads the LoRA A
    matrices this way under ZeRO-3."""

    def __init__(self, fn):
        self.fn = fn


class SupervisedNLL(torch.nn.Module):
    """forward(TrainingBatch) -> summed NLL of its response tokens (fp32 scalar). `model` is the transformers model
    (LoRA layers inside) or its peft wrapper; its parameters are this module's. forward(InForward(fn)) -> fn(model)."""

    def __init__(self, model, layout: str):
        super().__init__()
        self.model = model
        self.layout = layout

    def transformers_model(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, batch: TrainingBatch | InForward):
        if isinstance(batch, InForward):
            return batch.fn(self.model)
        net = self.transformers_model()
        setup = scoring_setup(net)  # attention kind, sliding windows, the LM head and its scale/softcap
        backbone = getattr(net, net.base_model_prefix)
        kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
        if self.layout == "packed" and setup.impl == FLEX_ATTENTION:
            if any(setup.windows.values()):
                raise ValueError("flex attention (tasks.attention) takes no sliding windows")
            kwargs["attention_mask"] = document_block_mask(batch.segment_ids)
        elif self.layout == "packed":
            masks = {name: attention_mask(batch.segment_ids, batch.position_ids, w, setup.impl, setup.weight.dtype)
                     for name, w in setup.windows.items()}
            kwargs["attention_mask"] = masks["all"] if "all" in masks else masks
        elif self.layout == "varlen":
            # One row, sequences end to end: flash-attention's varlen kernel, told where each sequence starts
            # (else transformers infers it from the restarting position ids, with a device sync in every layer).
            cu = torch.tensor([0] + batch.seq_lens, dtype=torch.int32, device=batch.input_ids.device).cumsum(0)
            longest = max(batch.seq_lens)
            kwargs.update(cu_seq_lens_q=cu.int(), cu_seq_lens_k=cu.int(), max_length_q=longest, max_length_k=longest)
        else:
            kwargs["attention_mask"] = (batch.segment_ids >= 0).long()  # one sequence per row, right padding
        hidden = backbone(**kwargs).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])[batch.head_rows]
        chunk = max(1, HEAD_CHUNK_ELEMENTS // setup.weight.shape[0])
        if rows.shape[0] <= chunk:
            return head_nll(rows, setup.weight, setup.bias, batch.targets, setup.logit_scale, setup.softcap)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for r0 in range(0, rows.shape[0], chunk):
            total = total + checkpoint(head_nll, rows[r0:r0 + chunk], setup.weight, setup.bias,
                                       batch.targets[r0:r0 + chunk], setup.logit_scale, setup.softcap,
                                       use_reentrant=False)
        return total


def set_gradient_checkpointing(model, enabled: bool):
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (non-reentrant
    torch.utils.checkpoint: works with peft's frozen base, keeps dropout masks, needs no inputs with grad). `model`:
    the transformers model. transformers >= 5.2x names it activation checkpointing; older versions only have the
    gradient_checkpointing_* names."""
    kwargs = {"use_reentrant": False}
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        # enable() also hooked the embeddings (needed by reentrant checkpointing only): take that hook off again
        model.disable_input_require_grads()
