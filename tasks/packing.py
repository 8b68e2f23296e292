"""Packed scoring batches: (candidate, instance) sequences -> rows -> batches -> one forward each.

All sequences of one candidate start with the same tokens (chat markup, the instruction itself). That common prefix
is laid down once per row, followed by the remaining tokens of as many sequences as fit; an explicit 4-D attention
mask lets each sequence see the prefix and its own earlier tokens only, and position ids continue the prefix's
positions in every sequence. Every token therefore sees exactly the context (and positions) it has in a separate
forward pass: the loss is the same function, computed with fewer tokens. The LM head runs only on the rows that
predict response tokens (kernels.segment_nll). Plans are pure functions of the sequence lengths, never of the number
of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tasks.prompts import IGNORE_INDEX
from tasks.sharding import gathered, numel

@dataclass
class Row:
    """One row of a batch: `prefix` shared tokens, then the rest of each sequence in `seqs` (global sequence ids)."""

    candidate: int
    prefix: int
    seqs: list[int]
    length: int


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix(encoded) -> int:
    """Length of the token prefix shared by all sequences of one candidate, stopping one token before the first
    response token of the shortest prompt, so that every scored position (the one BEFORE each response token) lies in
    the sequence's own part of the row."""
    prefix = min(e.num_prompt_tokens for e in encoded) - 1
    first = encoded[0].input_ids
    for e in encoded[1:]:
        prefix = min(prefix, _common_prefix(first, e.input_ids))
    return max(prefix, 0)


def row_width(prefix: int, attention_ratio: float) -> int:
    """The packed-row width that minimizes the model's FLOPs per scored sequence.

    A row of width W holding (W - P) / s sequences of s own tokens after a shared prefix of P tokens costs about
    F*W (linear layers, F per token) + a*W^2 (attention scores and mixing; masked blocks are computed too), i.e.
    per sequence  s * (F*W + a*W^2) / (W - P). Setting the derivative to zero: W* = P + sqrt(P^2 + (F/a)*P), with
    F/a = attention_ratio (~ 6*hidden for a dense transformer: 3072 for SmolLM2-135M, ~23k for Qwen3-8B). Wider rows
    amortize the prefix better, narrower ones waste less on attention; the cost is flat near W*.
    """
    return int(prefix + math.sqrt(prefix * prefix + attention_ratio * prefix)) if prefix else 0


def plan_batches(lengths_by_candidate, prefix_by_candidate, token_budget, row_tokens=None, attention_ratio=3072.0,
                 packed=True):
    """Rows and batches, as a pure function of the sequence lengths (never of the number of processes).

    lengths_by_candidate: {candidate: [(sequence id, length), ...]}. A packed row holds sequences of one candidate
    (they share its prefix). Each candidate gets r rows of about `row_tokens` (default: row_width) tokens, and its
    sequences are dealt longest first to the currently shortest row, so its rows come out nearly equally long and a
    batch pads little. Without packing (`packed=False`, for attention kinds that cannot take our mask) each sequence
    is its own row, rows sorted longest first.
    A candidate's rows, longest first, are cut greedily into batches of at most `token_budget` padded tokens (rows x
    widest row; a row wider than the budget is a batch alone). Batches never mix candidates: a candidate's numbers
    then depend only on its own sequences (bitwise the same whether the others are scored with it, cached or not),
    and it is finished, and cached, as soon as its last batch is.
    """
    batches = []
    for c in sorted(lengths_by_candidate):
        items = sorted(lengths_by_candidate[c], key=lambda x: (-x[1], x[0]))
        if packed:
            prefix = prefix_by_candidate[c]
            own = sum(n - prefix for _, n in items)
            width = row_tokens or max(row_width(prefix, attention_ratio), 2 * prefix, 64)
            n_rows = max(1, min(len(items), round(own / max(width - prefix, 1))))
            rows = [Row(c, prefix, [], prefix) for _ in range(n_rows)]
            for sid, n in items:
                row = min(rows, key=lambda r: r.length)  # the first of the shortest rows: deterministic
                row.seqs.append(sid)
                row.length += n - prefix
            rows.sort(key=lambda r: -r.length)  # stable
        else:
            rows = [Row(c, 0, [sid], n) for sid, n in items]
        current = []
        for row in rows:
            if current and (len(current) + 1) * current[0].length > token_budget:
                batches.append(current)
                current = []
            current.append(row)
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------------------------------
# One batch through the model
# ----------------------------------------------------------------------------------------------------------------------


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class ScoringSetup:
    """How to run one architecture: packed rows or padded ones, its sliding windows, and the LM head."""

    packed: bool  # shared-prefix packing with our 4-D mask (sdpa/eager); else one right-padded sequence per row
    impl: str  # attention implementation
    windows: dict  # mask name ("all", or per layer type) -> sliding window or None
    weight: torch.Tensor  # LM head [V, H]
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    attention_ratio: float  # F/a of row_width()


def scoring_setup(model) -> ScoringSetup:
    """How to run this architecture: packing or not, sliding windows, and the LM head's scale and softcap."""
    config = _text_config(model)
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    layer_types = getattr(config, "layer_types", None)
    kinds = set(layer_types or ["full_attention"])
    # Our explicit mask is honoured by the sdpa and eager attention functions; flash/flex kernels take other mask
    # formats, and linear-attention/recurrent layers cannot see a mask at all. Those get one sequence per row,
    # right padding and a 2-D mask (rows sorted by length, so little padding), which every model supports.
    packed = impl in ("sdpa", "eager") and kinds <= {"full_attention", "sliding_attention"}
    window = getattr(config, "sliding_window", None)
    if layer_types is None:  # Mistral-style configs: a sliding_window (when set) applies to every layer
        windows = {"all": window}
    elif "sliding_attention" in kinds:  # Gemma-style alternating layers: one mask per layer type
        windows = {"full_attention": None, "sliding_attention": window}
    else:
        windows = {"all": None}
    head = model.get_output_embeddings()
    # F/a of row_width(): linear FLOPs per token over attention FLOPs per (query, key) pair, from the layer sizes.
    layers = getattr(config, "num_hidden_layers", 1)
    backbone = getattr(model, model.base_model_prefix)
    layer_params = (sum(numel(p) for p in backbone.parameters())  # whole sizes, also of ZeRO-3 partitions
                    - numel(backbone.get_input_embeddings().weight)) / max(layers, 1)
    attn_width = getattr(config, "num_attention_heads", 1) * (getattr(config, "head_dim", None) or
                                                                config.hidden_size // config.num_attention_heads)
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere multiplies the logits
    if getattr(config, "logits_scaling", None):  # Granite divides them
        scale = scale / config.logits_scaling
    return ScoringSetup(packed=packed, impl=impl, windows=windows, weight=head.weight,
                        bias=getattr(head, "bias", None), logit_scale=float(scale),
                        softcap=getattr(config, "final_logit_softcapping", None),
                        attention_ratio=max(layer_params / (2 * attn_width), 1.0))


def attention_mask(seg, pos, window, impl, dtype):
    """[B, 1, W, W] mask of a packed batch. seg: 0 = shared prefix, k >= 1 = k-th sequence of the row, -1 = padding;
    pos: position ids. Query q may see key k when k is not later (pos_k <= pos_q; within one sequence positions grow
    with the column) and k is in q's own sequence, or k is in the prefix and q in a sequence; with a sliding window
    also pos_q - pos_k < window. Padding sees only padding, so no softmax row is empty (no NaN)."""
    sq, sk = seg[:, :, None], seg[:, None, :]
    pq, pk = pos[:, :, None], pos[:, None, :]
    allowed = (pk <= pq) & ((sk == sq) | ((sk == 0) & (sq > 0)))
    if window:
        allowed &= (pq - pk) < window
    allowed = allowed[:, None]
    if impl == "sdpa":  # boolean: True = attend
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # eager: 0 = attend, min = masked
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def score_batch(model, setup: ScoringSetup, rows: list[Row], encoded, pad_id) -> dict[int, tuple[float, int]]:
    """Sum of response-token NLLs and their count for every sequence of the batch: {sequence id: (sum, count)}."""
    from kernels import segment_nll

    device = setup.weight.device
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    row_index, targets, segments, seq_of_segment = [], [], [], []
    for r, row in enumerate(rows):
        p = row.prefix
        first = encoded[row.seqs[0]].input_ids
        ids[r, :p] = torch.tensor(first[:p], dtype=torch.long)
        pos[r, :p] = torch.arange(p)
        seg[r, :p] = 0
        col = p
        for k, sid in enumerate(row.seqs):
            e = encoded[sid]
            n = len(e.input_ids) - p
            ids[r, col:col + n] = torch.tensor(e.input_ids[p:], dtype=torch.long)
            pos[r, col:col + n] = torch.arange(p, p + n)
            seg[r, col:col + n] = k + 1
            # Token j (a response token, label != IGNORE_INDEX) is predicted by the hidden state at j - 1, which
            # sits at column col + (j - 1 - p) of this row (j - 1 >= p by the choice of the prefix). As in HF's
            # shifted loss, a label at j = 0 has no prediction and is not scored.
            for j, label in enumerate(e.labels):
                if label != IGNORE_INDEX and j > 0:
                    row_index.append(r * width + col + j - 1 - p)
                    targets.append(label)
                    segments.append(len(seq_of_segment))
            seq_of_segment.append(sid)
            col += n
        pos[r, col:] = torch.arange(width - col)  # padding: any positions; it only sees itself
    backbone = getattr(model, model.base_model_prefix)
    kwargs = {"input_ids": ids.to(device), "position_ids": pos.to(device), "use_cache": False}
    if setup.packed:
        dtype = setup.weight.dtype
        seg_d, pos_d = seg.to(device), pos.to(device)
        masks = {name: attention_mask(seg_d, pos_d, w, setup.impl, dtype) for name, w in setup.windows.items()}
        kwargs["attention_mask"] = masks["all"] if "all" in masks else masks
    else:
        kwargs["attention_mask"] = (seg >= 0).long().to(device)  # one sequence per row, right padding
    hidden = backbone(**kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    with gathered(setup.weight, setup.bias):  # ZeRO-3: the head is read outside its module's forward
        sums, counts = segment_nll(hidden, setup.weight, torch.tensor(targets, device=device),
                                   torch.tensor(segments, device=device), len(seq_of_segment),
                                   row_index=torch.tensor(row_index, device=device), bias=setup.bias,
                                   logit_scale=setup.logit_scale, softcap=setup.softcap, ignore_index=IGNORE_INDEX)
    sums, counts = sums.tolist(), counts.tolist()
    return {sid: (sums[s], counts[s]) for s, sid in enumerate(seq_of_segment)}
