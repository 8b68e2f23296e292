"""Ours: attention over packed training rows that skips the masked-off blocks (`--attention flex`).

With sdpa, a packed row of width W gets a dense [W, W] boolean mask: the kernel reads it whole and computes every
(query, key) tile, also the ones where the query's sequence and the key's sequence differ. FlexAttention takes the
same mask as a function (`document_causal`: same sequence of the row and key not later than the query) compiled
into a BlockMask, a per-tile map of which 128 x 128 tiles are empty, full or partial: empty tiles are skipped, full
tiles need no mask reads. A row of k sequences of equal length then computes about 1/k of the causal tiles.

The function is registered with transformers' AttentionInterface under FLEX_ATTENTION; a model switched to it with
`set_attn_implementation(FLEX_ATTENTION)` gets the BlockMask as its attention mask (tasks.train_step.SupervisedNLL
builds it; transformers' mask code returns a 4-D mask it is given unchanged). On CUDA flex_attention is compiled once
(torch.compile, as the FlexAttention docs prescribe); on CPU it runs eagerly (forward only: torch has no FlexAttention
backward on CPU, so training with it needs a GPU).
"""
from __future__ import annotations

import functools

import torch

from tasks.errors import SapoError

FLEX_ATTENTION = "sapo_flex"  # the name registered with transformers' AttentionInterface
ATTENTION_CHOICES = ("sdpa", "flex")


def document_block_mask(segment_ids: torch.Tensor, block_size: int = 128):
    """BlockMask of a packed batch: query q sees key k when both lie in the same sequence of the row (segment ids
    of tasks.train_batches: k >= 1 the k-th sequence, -1 padding, which so sees only padding) and k <= q."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids

    def document_causal(b, h, q, k):
        return (seg[b, q] == seg[b, k]) & (k <= q)

    rows, width = seg.shape
    return create_block_mask(document_causal, rows, None, width, width, device=seg.device, BLOCK_SIZE=block_size)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query [B, Hq, W, D], key/value [B, Hkv, W, D], attention_mask
    the BlockMask; returns ([B, W, Hq, D], None)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if not isinstance(attention_mask, BlockMask):
        raise ValueError(f"{FLEX_ATTENTION} attention needs a BlockMask (tasks.attention.document_block_mask), got "
                         f"{type(attention_mask).__name__}")
    if dropout:
        raise ValueError(f"{FLEX_ATTENTION} attention has no attention dropout")
    fn = _compiled_flex() if query.is_cuda else flex_attention
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling,
             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_flex_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_ATTENTION, flex_attention_forward)


def set_training_attention(net, attention: str) -> str:
    """Switch the transformers model `net` to `attention` (sdpa | flex) for training; returns the implementation it
    had, for switching back (scoring and generation keep their own paths)."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    before = getattr(net.config, "_attn_implementation", None) or "eager"
    if attention == "flex":
        register_flex_attention()
        net.set_attn_implementation(FLEX_ATTENTION)
    else:
        net.set_attn_implementation("sdpa")
    return before


def training_attention(accelerator, net, attention: str) -> str | None:
    """Ours: --attention flex switches the model to FlexAttention for training; returns the implementation to put
    back after it (None: nothing changed)."""
    if attention == "sdpa":
        return None
    if attention == "flex" and accelerator.device.type != "cuda":
        raise SapoError("--attention flex trains on a CUDA GPU only: torch's FlexAttention has no backward on CPU")
    return set_training_attention(net, attention)
