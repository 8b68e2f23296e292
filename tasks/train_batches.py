"""Training micro-batches: one global batch of sequences -> micro-batches -> rows -> tensors.

A global batch (64 sequences per optimizer step in the paper) is cut into micro-batches, one forward + backward
each, whose gradients add up before the optimizer step. How the sequences are grouped does not change that sum
(dropout off), so the grouping is chosen for speed and memory:

- a micro-batch is filled up to a token budget (rows x row width, padding included), so that the longest task cannot
  run out of memory and short sequences share one forward;
- sequences are packed into rows ("padding-free"): several sequences per row, each seeing only itself (position ids
  restart at 0 for every sequence; a block-diagonal causal mask, or the flash-attention varlen kernel).

Three layouts, chosen by the model's attention kind (`tasks.train_step.training_layout`):

    packed  rows of at most `longest sequence of the global batch` tokens, filled first-fit longest first, with an
            explicit 4-D block-diagonal mask (sdpa / eager attention)
    varlen  one row per micro-batch, the sequences laid end to end, no mask (flash-attention's varlen kernel finds
            the sequences from the restarting position ids): no padding at all
    padded  one sequence per row, right padding and a 2-D mask (attention kinds that cannot take our mask)

The plan is a pure function of the sequence lengths, the budget and the layout, never of the number of processes:
processes take micro-batches round-robin, and a process left without one runs a zero-weight micro-batch so that
every process does the same number of backward passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tasks.errors import SapoError
from tasks.prompts import IGNORE_INDEX

LAYOUTS = ("packed", "varlen", "padded")


@dataclass
class MicroBatch:
    """Sequences of one forward: `rows[r]` lists positions in the global batch, laid end to end in row r."""

    rows: list[list[int]]
    width: int  # tokens per row, padding included (varlen: the one row's length)

    @property
    def tokens(self) -> int:
        """Tokens the forward runs on, padding included (what memory scales with)."""
        return len(self.rows) * self.width

    @property
    def num_sequences(self) -> int:
        return sum(len(r) for r in self.rows)


def pack_rows(lengths: dict[int, int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: each sequence (longest first, ties by position) goes into the first row that still has
    room for it, else opens a new row. A sequence longer than `capacity` gets a row of its own."""
    rows, fill = [], []
    for pos in sorted(lengths, key=lambda p: (-lengths[p], p)):
        n = lengths[pos]
        for r, used in enumerate(fill):
            if used + n <= capacity:
                rows[r].append(pos)
                fill[r] += n
                break
        else:
            rows.append([pos])
            fill.append(n)
    return rows


def plan_micro_batches(lengths: list[int], token_budget: int, max_sequences: int, layout: str) -> list[MicroBatch]:
    """Micro-batches of one global batch (`lengths[p]` = tokens of its p-th sequence), largest first.

    token_budget > 0: packed rows (capacity: the longest sequence of the global batch; padded: one sequence a row)
    are taken widest first and cut greedily into micro-batches of at most `token_budget` tokens, rows x widest row
    (a row wider than the budget is a micro-batch alone); varlen rows are filled up to the budget directly.
    token_budget == 0 (the fixed-count behaviour): the sequences, longest first, are cut into micro-batches of
    `max_sequences` each, then laid out in rows as above.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda p: (-lengths[p], p))
    if token_budget <= 0:
        groups = [order[i:i + max_sequences] for i in range(0, len(order), max(1, max_sequences))]
        return [_lay_out({p: lengths[p] for p in g}, layout, math.inf)[0] for g in groups]
    if layout == "varlen":
        return _lay_out({p: lengths[p] for p in order}, layout, token_budget)
    rows = pack_rows({p: lengths[p] for p in order}, lengths[order[0]]) if layout == "packed" else [[p] for p in order]
    widths = [sum(lengths[p] for p in row) for row in rows]
    rows = [row for _, row in sorted(zip(widths, rows), key=lambda x: -x[0])]  # stable: ties keep their order
    widths.sort(reverse=True)
    micro, current, width = [], [], 0
    for row, w in zip(rows, widths):
        if current and (len(current) + 1) * width > token_budget:
            micro.append(MicroBatch(current, width))
            current = []
        if not current:
            width = w
        current.append(row)
    micro.append(MicroBatch(current, width))
    return micro


def _lay_out(lengths: dict[int, int], layout: str, varlen_capacity) -> list[MicroBatch]:
    """Rows of a group of sequences: varlen rows of up to `varlen_capacity` tokens (each a micro-batch of its own),
    or ONE micro-batch of packed rows (capacity: the group's longest sequence) or of single sequences."""
    if layout == "varlen":
        rows = pack_rows(lengths, varlen_capacity) if varlen_capacity != math.inf else [sorted(lengths)]
        return [MicroBatch([row], sum(lengths[p] for p in row)) for row in rows]
    rows = pack_rows(lengths, max(lengths.values())) if layout == "packed" else \
        [[p] for p in sorted(lengths, key=lambda p: (-lengths[p], p))]
    return [MicroBatch(rows, max(sum(lengths[p] for p in row) for row in rows))]


def my_micro_batches(plan: list[MicroBatch], rank: int, world: int) -> list[tuple[int, MicroBatch | None]]:
    """This process's share of a plan, as (index in the plan, micro-batch) pairs: micro-batches rank, rank + world,
    ...; every process gets ceil(len(plan) / world) pairs, the missing ones as (index, None): a zero-weight step."""
    per_process = max(1, math.ceil(len(plan) / world))
    indices = [rank + j * world for j in range(per_process)]
    return [(i, plan[i] if i < len(plan) else None) for i in indices]


# ----------------------------------------------------------------------------------------------------------------------
# A micro-batch as tensors.

@dataclass
class TrainingBatch:
    """The tensors of one micro-batch. Row r of `input_ids` holds its sequences end to end, then padding."""

    input_ids: torch.Tensor  # [B, W]
    position_ids: torch.Tensor  # [B, W], from 0 in every sequence
    segment_ids: torch.Tensor  # [B, W]: k >= 1 = k-th sequence of the row, -1 = padding
    head_rows: torch.Tensor  # [R] flat indices into B*W: the positions whose hidden state predicts a response token
    targets: torch.Tensor  # [R] the response tokens they predict
    seq_lens: list[int]  # lengths of the sequences in row-major order (varlen: cumulative lengths for the kernel)

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.segment_ids,
                                                       self.head_rows, self.targets)), self.seq_lens)


def build_batch(encoded, rows: list[list[int]], pad_id: int) -> TrainingBatch:
    """Tensors of the rows `rows` (indices into `encoded`: tasks.prompts.Encoded). Token j of a sequence (a response
    token, label != IGNORE_INDEX, j > 0) is predicted by the hidden state at j - 1, as in HF's shifted loss."""
    width = max(sum(len(encoded[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    head_rows, targets, seq_lens = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for k, i in enumerate(row):
            e = encoded[i]
            n = len(e.input_ids)
            ids[r, col:col + n] = torch.tensor(e.input_ids, dtype=torch.long)
            pos[r, col:col + n] = torch.arange(n)
            seg[r, col:col + n] = k + 1
            for j, label in enumerate(e.labels):
                if label != IGNORE_INDEX and j > 0:
                    head_rows.append(r * width + col + j - 1)
                    targets.append(label)
            seq_lens.append(n)
            col += n
        pos[r, col:] = torch.arange(width - col)  # padding: any positions; it sees only itself
    return TrainingBatch(ids, pos, seg, torch.tensor(head_rows, dtype=torch.long),
                         torch.tensor(targets, dtype=torch.long), seq_lens)


def supervised_tokens(encoded, indices) -> int:
    """Response tokens of these sequences that the loss counts (label != IGNORE_INDEX at positions j > 0)."""
    return sum(sum(t != IGNORE_INDEX for t in encoded[i].labels[1:]) for i in indices)


def global_batches(num_instances: int, global_batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Instance indices of every optimizer step: a seeded shuffle per epoch cut into global batches.

    The batches depend only on the data and the seed, never on the number of processes (the original code's subsets
    shrank with the GPU count); the last batch of an epoch may be smaller and is kept.
    """
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(num_instances, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        steps += [order[i:i + global_batch_size] for i in range(0, num_instances, global_batch_size)]
    return steps


def check_batch_split(config, world: int):
    """The global batch (`config.global_batch_size`) is dealt to `world` processes in micro-batches of
    `config.micro_batch_size`: it must split evenly (checked as soon as the process count is known, before any data
    or model is loaded)."""
    if config.micro_batch_tokens:  # filled to a token budget: any global batch splits (zero-weight micro-batches pad)
        return
    per_step = config.micro_batch_size * world
    if config.global_batch_size % per_step:
        raise SapoError(f"--global-batch-size {config.global_batch_size} cannot be split into --micro-batch-size "
                        f"{config.micro_batch_size} x {world} process(es): it must be a multiple of {per_step}")
