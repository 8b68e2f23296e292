"""Ours: greedy generation in batches cut by a token budget, with finished sequences dropped from the batch.

Batches. Prompts are sorted longest first (an out-of-memory shows at once) and cut into batches whose padded size,
sequences x (longest prompt + max new tokens), stays within a budget of tokens: the KV cache of a batch is at most
that many positions, so one budget fits every prompt length (a batch of short prompts holds more sequences). The
batches are cut from the GLOBAL order and dealt round-robin to the processes, so their composition, hence padding
and numerics, does not depend on the number of processes.

Decoding. `greedy_decode` is HF generate's greedy loop written out (prefill, then one token per step on a
DynamicCache) with one difference: a sequence that has emitted a stop token leaves the batch at once (its rows are
dropped from the cache, the attention mask and the inputs), so the remaining steps run on the sequences still
generating instead of the whole batch waiting for its longest answer. The static-cache path (`static_generate`, for
--eval-compile on CUDA) is HF generate with cache_implementation="static": fixed shapes are what lets torch.compile
capture the decode step, and they rule out dropping rows, so it pays for the longest answer of each batch instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPU_TOKEN_BUDGET = 8192  # about today's 16 prompts of ~400 tokens + 128 new: a 2-core CPU gains nothing from more
MAX_SEQUENCES = 256  # per batch, whatever the budget
STATIC_PAD_MULTIPLE = 64  # static path: prompts left-padded to a multiple of this, so batches share compiled shapes


@dataclass(frozen=True)
class GenerationPlan:
    """How one call's prompts are batched."""

    batches: list[list[int]]  # prompt indices per batch, longest prompt first, in global order
    token_budget: int | None  # None: fixed batches of `max_sequences`
    max_sequences: int


def default_token_budget(model, device) -> int:
    """Tokens of prompt + answer per batch: on CUDA, what a third of the free memory holds as KV cache (bounded to
    [8192, 262144]); elsewhere CPU_TOKEN_BUDGET."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return CPU_TOKEN_BUDGET
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes  # keys and values, every layer
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(min(max(free // 3 // per_token, 8192), 262144))


def plan_batches(prompt_lengths: list[int], max_new_tokens: int, *, token_budget: int | None = None,
                 max_sequences: int | None = None) -> GenerationPlan:
    """Longest first; each batch grows while sequences x (its longest prompt + max_new_tokens) <= token_budget (a
    prompt longer than the budget still gets a batch of its own) and it has at most max_sequences."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    cap = max_sequences or MAX_SEQUENCES
    if token_budget is None:
        return GenerationPlan([order[k:k + cap] for k in range(0, len(order), cap)], None, cap)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < cap and \
                (len(batches[-1]) + 1) * (prompt_lengths[batches[-1][0]] + max_new_tokens) <= token_budget:
            batches[-1].append(i)  # batches[-1][0] is the batch's longest prompt
        else:
            batches.append([i])
    return GenerationPlan(batches, token_budget, cap)


def _left_padded(prompts: list[list[int]], pad_id: int, device, multiple: int = 1):
    import torch

    width = max(len(p) for p in prompts)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention_mask[row, width - len(p):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_stop(tokens: list[int], stops) -> list[int]:
    """The generated tokens before the first stop token (the answer proper)."""
    return tokens[:next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]


@dataclass
class DecodeStats:
    """Decode steps run and the sequence-steps they computed (the batch's rows summed over steps)."""

    steps: int = 0
    sequence_steps: int = 0


def greedy_decode(net, prompts: list[list[int]], pad_id: int, stops: list[int], max_new_tokens: int,
                  stats: DecodeStats | None = None, answer_lengths: list[int] | None = None) -> list[list[int]]:
    """Greedy tokens generated for each prompt (stop token included when one came), finished sequences dropped from
    the batch as they finish. The same tokens as HF generate(do_sample=False) on the same batch, up to the float
    differences a smaller batch may bring. answer_lengths (benchmarks: random weights never stop): sequence i also
    finishes after answer_lengths[i] tokens."""
    import torch
    from transformers import DynamicCache

    device = next(net.parameters()).device
    input_ids, attention_mask = _left_padded(prompts, pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=net.config)
    stop_ids = torch.tensor(sorted(set(stops)), device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    alive = torch.arange(len(prompts), device=device)  # original row of each batch row
    out = net(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    next_pos = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        next_tokens = out.logits[:, -1, :].float().argmax(-1)
        for row, token in zip(alive.tolist(), next_tokens.tolist()):
            generated[row].append(token)
        if stats is not None:
            stats.steps += 1
            stats.sequence_steps += len(alive)
        if step == max_new_tokens - 1:
            break
        keep = ~torch.isin(next_tokens, stop_ids)
        if answer_lengths is not None:
            keep &= torch.tensor([len(generated[row]) < answer_lengths[row] for row in alive.tolist()], device=device)
        if not bool(keep.all()):
            if not bool(keep.any()):
                break
            index = keep.nonzero().squeeze(1)
            cache.batch_select_indices(index)
            attention_mask, next_pos, next_tokens, alive = (attention_mask[index], next_pos[index],
                                                           next_tokens[index], alive[index])
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=1)
        out = net(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=next_pos,
                  past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    return generated


def hf_generate(net, prompts: list[list[int]], pad_id: int, stops: list[int], max_new_tokens: int, *,
                static: bool = False, compile: bool = False, stats: DecodeStats | None = None,
                answer_lengths: list[int] | None = None, synced_gpus: bool = False) -> list[list[int]]:
    """HF generate (greedy) on one batch: every row runs until the batch's last sequence stops. static: the static
    KV cache (prompts left-padded to a multiple of STATIC_PAD_MULTIPLE so batches share shapes), with
    torch.compile of the decode step when `compile` (HF compiles it on CUDA only). answer_lengths: as in
    greedy_decode (a row is done after that many tokens). synced_gpus: HF's, for sharded weights (tasks/sharding.py):
    every process steps until all are done."""
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = next(net.parameters()).device
    input_ids, attention_mask = _left_padded(prompts, pad_id, device, STATIC_PAD_MULTIPLE if static else 1)
    extra = {"cache_implementation": "static", "disable_compile": not compile} if static else {}
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops,
                              pad_token_id=pad_id, use_cache=True, **extra)
    criteria = None
    if answer_lengths is not None:
        width, lengths = input_ids.shape[1], torch.tensor(answer_lengths, device=device)

        class AnswerLength(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                return torch.full_like(lengths, ids.shape[1] - width) >= lengths

        criteria = StoppingCriteriaList([AnswerLength()])
    out = net.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                       stopping_criteria=criteria, synced_gpus=synced_gpus)
    rows = out[:, input_ids.shape[1]:].tolist()
    if stats is not None:
        stats.steps += len(rows[0]) if rows else 0
        stats.sequence_steps += len(rows) * (len(rows[0]) if rows else 0)
    return rows
