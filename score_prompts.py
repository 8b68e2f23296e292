"""Pre-update-loss scoring of candidate instructions: the selection step of SAPO.

For every candidate instruction c of a task and each of the first n training instances x (no shuffle), the current
model state reads the chat prompt built with c and is teacher-forced on the answer; the loss counts the response
tokens only (answer + end-of-turn), prompt tokens are masked. A candidate's score is the token-weighted mean NLL over
all scored tokens of all instances; the lowest score wins, ties keep the original instruction (candidate 0).

    python score_prompts.py --task sentiment --output runs/scores.json               # built-in task + pool
    python score_prompts.py --model DIR --data-dir ../shared/data/superni --task task195 \
        --candidates cands.json --instances 250 --output runs/task195_scores.json
    python score_prompts.py --task sentiment --generate 20 --output runs/scores.json  # paraphrases by the model
    python score_prompts.py --task sentiment --select sapo-race --output runs/race.json  # racing: fewer tokens
    accelerate launch --num_processes 8 score_prompts.py ...                          # several GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 score_prompts.py ...

How it is fast, and exact:
- Packing with a shared prefix. All sequences of one candidate start with the same tokens (chat markup, system
  message, the instruction itself). That common prefix is laid down once per row, followed by the remaining tokens of
  as many (candidate, instance) sequences as fit; an explicit 4-D attention mask lets each sequence see the prefix and
  its own earlier tokens only, and position ids continue the prefix's positions in every sequence. Every token
  therefore sees exactly the context (and positions) it has in a separate forward pass: the loss is the same function.
- The LM head runs only on the rows that predict response tokens (kernels.segment_nll); full-vocabulary logits for the
  whole sequence are never built.
- Batches are formed globally and deterministically from the full (candidate, instance) list, then whole batches go
  to processes round-robin, so the numbers are bitwise the same with 1 or N processes (given the same kernels).
- Scores are cached per (model state, task content, candidate text, instance set, length limit): a rerun (or a run
  interrupted half way) recomputes only what is not stored yet.
- Racing (--select sapo-race, race_candidates) scores every candidate on a few instances first, then only those that
  are not yet confidently worse than the leader (paired per-instance differences, a Student-t bound) on growing
  prefixes of the instances. It picks the exhaustive argmin with high probability for a fraction of the tokens.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import IGNORE_INDEX, SapoError, cli_main, encode_example, instances_hash
from tasks.errors import exit_after_main
from tasks.candidates import candidate_pool, filter_candidates, load_candidates_file
from tasks.loaders import write_json

SCORE_VERSION = "sapo-score-v1"  # part of every cache key: bump it when the score's definition changes

# ----------------------------------------------------------------------------------------------------------------------
# Selection and cache keys
# ----------------------------------------------------------------------------------------------------------------------


def select_index(scores) -> int:
    """Index of the lowest score; ties keep the lowest index (candidate 0 = the original instruction). A NaN score
    never wins (NaN compares false)."""
    scores = [float(s) for s in scores]
    best = 0
    for i, s in enumerate(scores):
        if s < scores[best] or math.isnan(scores[best]) and not math.isnan(s):
            best = i
    return best


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


HASH_CONTENT_BELOW = 64 << 20  # files of the base model smaller than this are hashed by content, larger ones by stat


def model_state_id(model_arg_or_path, adapter_dirs=()) -> str:
    """Content hash of a model state (base + adapters in order), for cache keys.

    The base is identified by its hub id, or for a local directory by its path and its files: configs, tokenizer and
    chat template by content (they change the score), multi-GB weight shards by name, size and mtime (hashing 16 GB
    per run would cost more than the scoring). Adapters are small, their files are hashed by content, so retraining an
    adapter in place gives a new state id.
    """
    h = hashlib.sha256()
    base = Path(str(model_arg_or_path))
    if base.is_dir():
        h.update(b"dir:" + str(base.resolve()).encode())
        for f in sorted(p for p in base.rglob("*") if p.is_file() and ".cache" not in p.parts):
            st = f.stat()
            rel = str(f.relative_to(base)).encode()
            if st.st_size < HASH_CONTENT_BELOW:
                h.update(rel + b":" + _sha256_file(f).encode())
            else:
                h.update(rel + f":{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(b"hub:" + str(model_arg_or_path).encode())
    for adapter in adapter_dirs:
        h.update(b"|adapter")
        adapter = Path(adapter)
        for f in sorted(p for p in adapter.rglob("*") if p.is_file()):
            if f.suffix in (".safetensors", ".bin", ".json", ".pt"):
                h.update(str(f.relative_to(adapter)).encode() + b":" + _sha256_file(f).encode())
    return h.hexdigest()[:16]


def _score_key(state_id, task_hash, instruction, inst_hash, max_length) -> str:
    text = json.dumps([SCORE_VERSION, state_id, task_hash, instruction, inst_hash, max_length])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_cache(path) -> dict:
    """A JSON cache file as a dict; a missing file is empty, a damaged one is reported and ignored (recomputed)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        print(f"warning: ignoring unreadable cache {path} ({e})", file=sys.stderr)
        return {}


# ----------------------------------------------------------------------------------------------------------------------
# Packing plan: (candidate, instance) sequences -> rows -> batches
# ----------------------------------------------------------------------------------------------------------------------


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


def _shared_prefix(encoded) -> int:
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


def scoring_setup(model) -> dict:
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
    layer_params = (sum(p.numel() for p in backbone.parameters())
                    - backbone.get_input_embeddings().weight.numel()) / max(layers, 1)
    attn_width = getattr(config, "num_attention_heads", 1) * (getattr(config, "head_dim", None) or
                                                                config.hidden_size // config.num_attention_heads)
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere multiplies the logits
    if getattr(config, "logits_scaling", None):  # Granite divides them
        scale = scale / config.logits_scaling
    return {"packed": packed, "impl": impl, "windows": windows, "weight": head.weight,
            "bias": getattr(head, "bias", None), "logit_scale": float(scale),
            "softcap": getattr(config, "final_logit_softcapping", None),
            "attention_ratio": max(layer_params / (2 * attn_width), 1.0)}


def _attention_mask(seg, pos, window, impl, dtype):
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


def score_batch(model, setup, rows: list[Row], encoded, pad_id) -> dict[int, tuple[float, int]]:
    """Sum of response-token NLLs and their count for every sequence of the batch: {sequence id: (sum, count)}."""
    from kernels import segment_nll

    device = setup["weight"].device
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
    if setup["packed"]:
        dtype = setup["weight"].dtype
        seg_d, pos_d = seg.to(device), pos.to(device)
        masks = {name: _attention_mask(seg_d, pos_d, w, setup["impl"], dtype) for name, w in setup["windows"].items()}
        kwargs["attention_mask"] = masks["all"] if "all" in masks else masks
    else:
        kwargs["attention_mask"] = (seg >= 0).long().to(device)  # one sequence per row, right padding
    hidden = backbone(**kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    sums, counts = segment_nll(hidden, setup["weight"], torch.tensor(targets, device=device),
                               torch.tensor(segments, device=device), len(seq_of_segment),
                               row_index=torch.tensor(row_index, device=device), bias=setup["bias"],
                               logit_scale=setup["logit_scale"], softcap=setup["softcap"], ignore_index=IGNORE_INDEX)
    sums, counts = sums.tolist(), counts.tolist()
    return {sid: (sums[s], counts[s]) for s, sid in enumerate(seq_of_segment)}


# ----------------------------------------------------------------------------------------------------------------------
# Scoring candidates
# ----------------------------------------------------------------------------------------------------------------------


def _candidate_result(index, instruction, sums, counts, seconds, cached) -> dict:
    total = sum(counts)
    losses = [s / n if n else float("nan") for s, n in zip(sums, counts)]
    return {"index": index, "instruction": instruction,
            "score": math.fsum(sums) / total if total else float("nan"),
            "instance_mean": math.fsum(losses) / len(losses) if losses else float("nan"),
            "instance_losses": losses, "num_tokens": total, "seconds": seconds, "cached": cached,
            "instance_sums": list(sums), "instance_counts": list(counts)}


def score_candidates(model, tokenizer, task, candidates: list[str], instances, accelerator=None, *,
                     token_budget=16384, max_length=2048, cache_path=None, state_id="", progress=True,
                     row_tokens=None) -> dict:
    """Score every candidate instruction on `instances` with `model` (a plain causal LM, adapters merged).

    Returns {"task", "num_instances", "state_id", "selected", "seconds", "candidates": [{"index", "instruction",
    "score", "instance_mean", "instance_losses", "num_tokens", "seconds", "cached", ...}]}; candidate 0 should be
    the original instruction (ties keep it). Under accelerate every process must call this with the same arguments;
    every process gets the full result, only the main process writes the cache.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not candidates:
        raise SapoError("no candidates to score")
    if not instances:
        raise SapoError(f"task {task.name}: no instances to score on")
    if cache_path and not state_id:
        raise SapoError("a score cache needs the model's state id (model_state_id); pass state_id=")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    if accelerator is not None:
        model = accelerator.unwrap_model(model)  # a DDP/compiled wrapper adds nothing to a forward-only pass

    task_hash, inst_hash = task.content_hash(), instances_hash(list(instances))
    keys = [_score_key(state_id, task_hash, c, inst_hash, max_length) for c in candidates]
    cache = read_cache(cache_path) if cache_path and is_main else {}
    if world > 1:  # every process must skip the same candidates: the main process's view of the cache decides
        from accelerate.utils import broadcast_object_list

        shared = [{k: cache[k] for k in keys if k in cache}]
        broadcast_object_list(shared)
        cache = shared[0]
    results: dict[int, dict] = {}
    for c, key in enumerate(keys):
        entry = cache.get(key)
        if entry and len(entry.get("instance_sums", ())) == len(instances):
            results[c] = _candidate_result(c, candidates[c], entry["instance_sums"], entry["instance_counts"],
                                           entry.get("seconds", 0.0), True)
    todo = [c for c in range(len(candidates)) if c not in results]

    # Encode every (candidate, instance) sequence (each process does the same, deterministic work: the plan needs
    # every length) and plan the batches globally.
    setup = scoring_setup(model)
    encoded, where = [], []  # global sequence id -> Encoded, (candidate, instance)
    lengths, prefixes = {}, {}
    for c in todo:
        first = len(encoded)
        for i, inst in enumerate(instances):
            encoded.append(encode_example(tokenizer, candidates[c], inst.input, task.suffix, inst.label, max_length))
            where.append((c, i))
        lengths[c] = [(sid, len(encoded[sid].input_ids)) for sid in range(first, len(encoded))]
        prefixes[c] = _shared_prefix(encoded[first:])
    batches = plan_batches(lengths, prefixes, token_budget, row_tokens, setup["attention_ratio"], setup["packed"])
    last_batch = {rows[0].candidate: b for b, rows in enumerate(batches)}

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = {c: [0.0] * len(instances) for c in todo}
    counts = {c: [0] * len(instances) for c in todo}
    seconds = {c: 0.0 for c in todo}
    seen = set()
    was_training = model.training
    model.eval()
    # Whole batches go to processes round-robin: step s runs batch s*world + rank on each process, then every process
    # gathers that step's results (so all processes call gather_object equally often).
    steps = math.ceil(len(batches) / world)
    bar = tqdm(total=len(batches), desc=f"scoring {task.name}", disable=not (progress and is_main), leave=False)
    try:
        with torch.inference_mode():
            for step in range(steps):
                b = step * world + rank
                mine = []
                if b < len(batches):
                    tb = time.perf_counter()
                    out = score_batch(model, setup, batches[b], encoded, pad_id)
                    mine = [(b, time.perf_counter() - tb, [(sid, s, n) for sid, (s, n) in out.items()])]
                gathered = gather_object(mine) if world > 1 else mine
                done_now = []
                for gb, sec, items in sorted(gathered, key=lambda x: x[0]):
                    for sid, s, n in items:
                        if sid in seen:
                            raise RuntimeError(f"sequence {where[sid]} was scored twice")
                        seen.add(sid)
                        c, i = where[sid]
                        sums[c][i], counts[c][i] = s, n
                    c = batches[gb][0].candidate
                    seconds[c] += sec
                    if last_batch[c] == gb:
                        done_now.append(c)
                for c in done_now:
                    results[c] = _candidate_result(c, candidates[c], sums[c], counts[c], seconds[c], False)
                if done_now and cache_path and is_main:
                    # Merge into what is on disk now (another run may have added entries) and replace atomically.
                    cache = read_cache(cache_path)
                    for c in done_now:
                        cache[keys[c]] = {"task": task.name, "instruction": candidates[c], "state_id": state_id,
                                          "instance_sums": sums[c], "instance_counts": counts[c],
                                          "seconds": seconds[c]}
                    write_json(cache_path, cache)
                bar.update(len(gathered))
    finally:
        bar.close()
        model.train(was_training)
    if len(seen) != len(encoded):
        raise RuntimeError(f"{len(encoded) - len(seen)} sequences were not scored")

    ordered = [results[c] for c in range(len(candidates))]
    return {"task": task.name, "num_instances": len(instances), "state_id": state_id,
            "instances_hash": inst_hash, "task_hash": task_hash, "max_length": max_length,
            "packing": "shared-prefix" if setup["packed"] else "padded", "num_batches": len(batches),
            "tokens_forwarded": sum(len(rows) * rows[0].length for rows in batches),  # incl. padding and prefixes
            "num_processes": world,
            "selected": select_index([r["score"] for r in ordered]), "seconds": time.perf_counter() - t0,
            "candidates": ordered}


# ----------------------------------------------------------------------------------------------------------------------
# Racing: score only the candidates that can still be the best
# ----------------------------------------------------------------------------------------------------------------------


def student_t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom (closed form, Abramowitz & Stegun
    26.7.3-4). With theta = atan(t / sqrt(dof)), A = P(|T| < |t|) is
      odd dof:  (2/pi) (theta + sin(theta) (cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ... up to cos^(dof-2)))
      even dof: sin(theta) (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(dof-2))
    and the CDF is (1 + A) / 2 (A is odd in t, so this holds for negative t too)."""
    theta = math.atan(t / math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:
        term, series = math.cos(theta), 0.0
        for k in range(1, (dof - 1) // 2 + 1):  # powers cos^1, cos^3, ..., cos^(dof-2)
            series += term
            term *= (2 * k) / (2 * k + 1) * c2
        a = 2 / math.pi * (theta + s * series)
    else:
        term, series = 1.0, 0.0
        for k in range(dof // 2):  # powers cos^0, cos^2, ..., cos^(dof-2)
            series += term
            term *= (2 * k + 1) / (2 * k + 2) * c2
        a = s * series
    return 0.5 * (1.0 + a)


def student_t_quantile(p: float, dof: int) -> float:
    """The t with P(T <= t) = p, 0.5 <= p < 1, by bisection on student_t_cdf (exact to ~1e-12)."""
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, dof) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, dof) < p else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def race_sizes(num_instances: int, first: int, growth: float) -> list[int]:
    """Prefix lengths of the rounds: first, first*growth, first*growth^2, ... (strictly growing), ending at
    num_instances."""
    if first < 1 or growth <= 1.0:
        raise SapoError(f"racing needs first >= 1 and growth > 1 (got first={first}, growth={growth})")
    sizes, n = [], float(first)
    while round(n) < num_instances:
        if not sizes or round(n) > sizes[-1]:
            sizes.append(round(n))
        n *= growth
    return sizes + [num_instances]


def race_z(confidence, num_instances: int, num_rounds: int) -> float:
    """The multiplier of the standard error in the elimination rule at a round with `num_instances` paired
    differences: a one-sided Student-t quantile with num_instances - 1 degrees of freedom at level
    1 - (1 - confidence) / num_rounds. The best candidate faces one test per round, so (union bound over the rounds)
    it is wrongly eliminated with probability at most 1 - confidence, under the t approximation.
    confidence None or >= 1: z = infinity, nothing is ever eliminated (= exhaustive scoring)."""
    if confidence is None or confidence >= 1.0 or num_instances < 2:
        return math.inf
    if not 0.0 < confidence < 1.0:
        raise SapoError(f"racing confidence must be in (0, 1], got {confidence}")
    return student_t_quantile(1.0 - (1.0 - confidence) / num_rounds, num_instances - 1)


def race_rounds(score_slice, num_candidates: int, num_instances: int, *, first=8, growth=2.0,
                confidence=0.95) -> dict:
    """The racing procedure, given `score_slice(candidates, lo, hi)` -> {candidate: (sums, counts)} for instances
    lo..hi-1 (per-instance summed NLL and response-token counts). race_candidates passes the model scorer; a
    benchmark can replay the race from sums it already has.

    Round r scores the survivors on the new instances of prefix n_r. The leader L is the survivor with the lowest
    token-weighted mean on the n_r instances (ties: lowest index). A survivor c is eliminated when its paired
    per-instance differences to the leader, in per-token units,
        d_i = (sum_c,i - sum_L,i) / (mean response tokens per instance),  i < n_r,
    have a lower confidence bound above zero:  mean(d) - z * sd(d) / sqrt(n_r) > 0  (z: race_z). The race ends when
    one candidate remains or the instances are spent; the winner is the last leader (argmin over the survivors).
    """
    sizes = race_sizes(num_instances, first, growth)
    sums = {c: [] for c in range(num_candidates)}
    counts = {c: [] for c in range(num_candidates)}
    survivors, eliminated_in, rounds = list(range(num_candidates)), {}, []
    for r, n in enumerate(sizes, 1):
        start = sizes[r - 2] if r > 1 else 0
        for c, (s, k) in score_slice(list(survivors), start, n).items():
            sums[c] += list(s)
            counts[c] += list(k)
        scores = [math.fsum(sums[c]) / sum(counts[c]) if sum(counts[c]) else float("nan") for c in survivors]
        leader = survivors[select_index(scores)]
        z = race_z(confidence, n, len(sizes))
        tokens_per_instance = sum(counts[leader]) / n
        out = []
        if math.isfinite(z) and tokens_per_instance > 0:
            for c in survivors:
                d = [(a - b) / tokens_per_instance for a, b in zip(sums[c], sums[leader])]
                mean = math.fsum(d) / n
                sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
                if mean - z * sd / math.sqrt(n) > 0:
                    out.append(c)
        scored = survivors
        survivors = [c for c in survivors if c not in out]
        eliminated_in.update({c: r for c in out})
        rounds.append({"round": r, "num_instances": n, "new_instances": n - start, "scored": scored,
                       "leader": leader, "z": z if math.isfinite(z) else None, "eliminated": out,
                       "survivors": survivors, "tokens_scored": sum(sum(counts[c][start:n]) for c in scored)})
        if len(survivors) == 1:
            break
    return {"selected": rounds[-1]["leader"], "sizes": sizes, "rounds": rounds, "sums": sums, "counts": counts,
            "eliminated_round": eliminated_in}


def race_candidates(model, tokenizer, task, candidates: list[str], instances, accelerator=None, *, first=8,
                    growth=2.0, confidence=0.95, token_budget=16384, max_length=2048, cache_path=None, state_id="",
                    progress=True, row_tokens=None) -> dict:
    """Select like score_candidates, scoring only the candidates that can still be the best (race_rounds).

    Each round calls score_candidates for the survivors on the new slice of `instances` (exact, the same with any
    number of processes; cached per slice, so an interrupted race resumes). With confidence None or 1.0 nothing is
    eliminated and the result is the exhaustive argmin. The result has score_candidates' keys ("selected",
    "candidates" with "score" etc. over the instances each was scored on, plus "num_instances_scored" and
    "eliminated_round"), and "rounds" (per round: instances, candidates scored, leader, z, eliminated, survivors,
    tokens scored and forwarded, seconds), "tokens_scored" (response tokens of the scored (candidate, instance)
    pairs), "exhaustive_tokens" (what scoring every candidate on every instance would have scored).
    """
    t0 = time.perf_counter()
    if not candidates:
        raise SapoError("no candidates to score")
    if not instances:
        raise SapoError(f"task {task.name}: no instances to score on")
    instances = list(instances)
    calls = []
    seconds = [0.0] * len(candidates)
    cached = [True] * len(candidates)

    def score_slice(subset, lo, hi):
        result = score_candidates(model, tokenizer, task, [candidates[c] for c in subset], instances[lo:hi],
                                  accelerator, token_budget=token_budget, max_length=max_length,
                                  cache_path=cache_path, state_id=state_id, progress=progress, row_tokens=row_tokens)
        calls.append(result)
        out = {}
        for c, r in zip(subset, result["candidates"]):
            seconds[c] += r["seconds"]
            cached[c] = cached[c] and r["cached"]
            out[c] = (r["instance_sums"], r["instance_counts"])
        return out

    race = race_rounds(score_slice, len(candidates), len(instances), first=first, growth=growth,
                       confidence=confidence)
    for record, result in zip(race["rounds"], calls):
        record.update(tokens_forwarded=result["tokens_forwarded"], seconds=result["seconds"])
    ordered = []
    for c, text in enumerate(candidates):
        r = _candidate_result(c, text, race["sums"][c], race["counts"][c], seconds[c], cached[c])
        r.update(num_instances_scored=len(race["sums"][c]), eliminated_round=race["eliminated_round"].get(c))
        ordered.append(r)
    # Response-token counts do not depend on the instruction (the response is the assistant turn), so the counts of
    # the candidate scored furthest stand for every candidate; instances nobody reached are encoded to count them.
    counts = list(race["counts"][race["selected"]])
    for inst in instances[len(counts):]:
        e = encode_example(tokenizer, candidates[race["selected"]], inst.input, task.suffix, inst.label, max_length)
        counts.append(sum(1 for j, t in enumerate(e.labels) if t != IGNORE_INDEX and j > 0))
    tokens_scored = sum(r["num_tokens"] for r in ordered)
    first_call = calls[0]
    return {"task": task.name, "num_instances": len(instances), "state_id": state_id,
            "instances_hash": instances_hash(instances), "task_hash": task.content_hash(), "max_length": max_length,
            "packing": first_call["packing"], "num_processes": first_call["num_processes"],
            "method": "sapo-race", "race_first": first, "race_growth": growth, "race_confidence": confidence,
            "selected": race["selected"], "seconds": time.perf_counter() - t0,
            "tokens_scored": tokens_scored, "exhaustive_tokens": len(candidates) * sum(counts),
            "tokens_forwarded": sum(r["tokens_forwarded"] for r in calls),
            "rounds": race["rounds"], "candidates": ordered}


def print_rounds(result, out=None):
    """The rounds of a race: instances, candidates scored, eliminated, and the tokens scored."""
    out = out or sys.stdout
    print(f"{'round':>5} {'inst.':>5} {'scored':>6} {'leader':>6} {'z':>6} {'tokens':>7}  eliminated", file=out)
    for r in result["rounds"]:
        z = "inf" if r["z"] is None else f"{r['z']:.2f}"
        print(f"{r['round']:>5} {r['num_instances']:>5} {len(r['scored']):>6} {r['leader']:>6} {z:>6} "
              f"{r['tokens_scored']:>7}  {', '.join(map(str, r['eliminated'])) or '-'}", file=out)
    print(f"racing scored {result['tokens_scored']} of {result['exhaustive_tokens']} response tokens "
          f"({100.0 * result['tokens_scored'] / max(result['exhaustive_tokens'], 1):.1f}% of exhaustive scoring)",
          file=out)


# ----------------------------------------------------------------------------------------------------------------------
# Paraphrase generation
# ----------------------------------------------------------------------------------------------------------------------

PARAPHRASE_VERSION = "sapo-paraphrase-v1"


def meta_prompt(task) -> str:
    """Our request for one rewrite of the ORIGINAL instruction (built by concatenation: it may hold braces)."""
    labels = [w for w in task.label_words if re.search(r"(?<!\w)" + re.escape(w) + r"(?!\w)", task.instruction)]
    keep = ""
    if labels:
        keep = ("It must keep these label words exactly as written, with the same spelling and the same upper and "
                "lower case: " + ", ".join('"' + w + '"' for w in labels) + ". ")
    return ("Here is the instruction of a task given to an assistant:\n\n" + task.instruction + "\n\n"
            "Write a new instruction that asks for exactly the same task and the same kind of answer, but in a "
            "different style, structure or tone. " + keep +
            "Do not add examples, do not answer the task, and do not say that the text was rewritten or "
            "reworded. Put the new instruction, and nothing else, between <START> and </START>.")


_TAGGED = re.compile(r"<START>(.*?)</START>", re.DOTALL)
_META_WORDS = re.compile(r"paraphras|rewrit|reword|rephras|<START>|</START>", re.IGNORECASE)


def parse_paraphrase(text: str, task=None) -> tuple[str | None, str | None]:
    """(candidate, None) from one model reply, or (None, why it was rejected). The reply must hold <START>...</START>;
    a candidate that talks about being a paraphrase is rejected; with a task, it must also be a valid candidate
    (label words kept verbatim, sane length: tasks.candidates)."""
    from tasks.candidates import candidate_problem

    match = _TAGGED.search(text or "")
    if match is None:
        return None, "has no <START>...</START>"
    candidate = match.group(1).strip()
    if not candidate:
        return None, "is empty"
    if _META_WORDS.search(candidate) and not _META_WORDS.search(task.instruction if task else ""):
        return None, "mentions paraphrasing"
    if task is not None:
        problem = candidate_problem(task, candidate)
        if problem:
            return None, problem
    return candidate, None


def _sample_local(model, tokenizer, prompt: str, n: int, temperature: float, seed: int) -> list[str]:
    from tasks.prompts import render_chat

    text = render_chat(tokenizer, [{"role": "user", "content": prompt}], True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.inference_mode():  # plain sampling at `temperature`, as from the original's API (no top-k/top-p)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_p=1.0, top_k=0, num_return_sequences=n,
                             max_new_tokens=_max_new_tokens(tokenizer, prompt), pad_token_id=pad_id)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def _max_new_tokens(tokenizer, prompt) -> int:
    # A valid candidate has at most 4x the original's characters (tasks.candidates); the prompt holds it once.
    return min(1024, 4 * len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) // 3 + 64)


def chat_api(url: str, model_name: str, prompt: str, temperature: float, timeout: float = 120.0) -> str:
    """One reply from an OpenAI-compatible /v1/chat/completions endpoint (standard library only).
    The key comes from SAPO_API_KEY or OPENAI_API_KEY (none is sent when neither is set: local servers)."""
    import urllib.error
    import urllib.request

    if not url.rstrip("/").endswith("/chat/completions"):
        url = url.rstrip("/") + ("/chat/completions" if url.rstrip("/").endswith("/v1") else "/v1/chat/completions")
    body = json.dumps({"model": model_name, "temperature": temperature,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("SAPO_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
        raise SapoError(f"paraphrase API {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise SapoError(f"paraphrase API {url} unreachable: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError:
        raise SapoError(f"paraphrase API {url} did not answer JSON") from None
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise SapoError(f"paraphrase API {url} answered without choices[0].message.content") from None


def generate_paraphrases(task, k, model, tokenizer, *, temperature=0.6, max_tries=5, seed=0, cache_path=None,
                         api_url=None, api_model=None, paraphraser_id=None) -> list[str]:
    """`k` valid, distinct paraphrases of the task's ORIGINAL instruction (the original itself not included).

    Each round asks for the missing number of rewrites (all from the original, never from an earlier rewrite),
    parses and validates them (tasks.candidates.filter_candidates: label words kept, distinct, sane length); after
    `max_tries` rounds without k valid ones it raises a SapoError (a failed generation never becomes a candidate).
    With `api_url` the replies come from an OpenAI-compatible chat API (`api_model`), else from the local `model`.
    Results are cached in `cache_path` (JSON) under the task's content and the paraphraser; a rerun reuses them.
    """
    if k <= 0:
        return []
    who = paraphraser_id or api_model or getattr(getattr(model, "config", None), "_name_or_path", "") or "local"
    key = hashlib.sha256(json.dumps([PARAPHRASE_VERSION, task.name, task.instruction, list(task.label_words),
                                     who, temperature, seed]).encode()).hexdigest()[:24]
    cache = read_cache(cache_path) if cache_path else {}
    stored = cache.get(key, {}).get("paraphrases", [])
    pool, _ = filter_candidates(task, list(stored))
    prompt = meta_prompt(task)
    rejected: list[tuple[str, str]] = []
    for attempt in range(max_tries):
        if len(pool) - 1 >= k:
            break
        need = k - (len(pool) - 1)
        if api_url:
            replies = [chat_api(api_url, api_model, prompt, temperature) for _ in range(need)]
        else:
            replies = _sample_local(model, tokenizer, prompt, need, temperature, seed * 1000 + attempt)
        parsed = []
        for reply in replies:
            candidate, problem = parse_paraphrase(reply, task)
            if problem:
                rejected.append((reply, problem))
            else:
                parsed.append(candidate)
        pool, bad = filter_candidates(task, pool[1:] + parsed)  # duplicates of the original or of each other
        rejected += bad
    paraphrases = pool[1:k + 1]
    if cache_path and paraphrases:
        cache = read_cache(cache_path)
        cache[key] = {"task": task.name, "paraphraser": who, "temperature": temperature, "seed": seed,
                      "paraphrases": pool[1:]}
        write_json(cache_path, cache)
    if len(paraphrases) < k:
        reasons = sorted({p for _, p in rejected})
        raise SapoError(f"paraphrase generation for task {task.name} gave {len(paraphrases)} valid of {k} after "
                        f"{max_tries} rounds (rejected replies: {'; '.join(reasons)[:200] or 'none'}); use a "
                        "stronger --paraphraser, --paraphrase-api, or --candidates FILE")
    return paraphrases


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir, hub id, adapter (stack) dir; default: offline SmolLM2")
    p.add_argument("--data-dir", default=None, help="SAPO-layout data directory; default: built-in tasks")
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="train", choices=["train", "dev"], help="instances to score on")
    p.add_argument("--instances", type=int, default=250, help="the first N instances of the split (no shuffle)")
    p.add_argument("--candidates", default=None, help="JSON list of instructions, or task -> list")
    p.add_argument("--generate", type=int, default=0, metavar="K", help="add K paraphrases generated by a model")
    p.add_argument("--paraphraser", default=None, help="local chat model for --generate (default: the scored "
                                                       "model), or the model name for --paraphrase-api")
    p.add_argument("--paraphrase-api", default=None, metavar="URL", help="OpenAI-compatible chat endpoint")
    p.add_argument("--paraphrase-cache", default=None, help="default: paraphrases.json next to --output")
    p.add_argument("--output", default=None, help="scores JSON (written atomically by the main process)")
    p.add_argument("--cache", default=None, help="score cache JSON; default: score_cache.json next to --output")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--token-budget", type=int, default=16384, help="padded tokens per forward batch")
    p.add_argument("--max-length", type=int, default=2048, help="longer sequences shorten their input text")
    p.add_argument("--row-tokens", type=int, default=None, help="width of a packed row (default: from the model)")
    p.add_argument("--seed", type=int, default=0, help="built-in task data and paraphrase sampling")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--select", default="sapo", choices=["sapo", "sapo-race"],
                   help="sapo: score every candidate on every instance; sapo-race: stop scoring the candidates that "
                        "are confidently worse than the leader (race_candidates)")
    p.add_argument("--race-first", type=int, default=8, help="sapo-race: instances of the first round")
    p.add_argument("--race-confidence", type=float, default=0.95,
                   help="sapo-race: confidence that the best candidate is never eliminated; 1.0 = never eliminate")
    return p.parse_args(argv)


def print_table(result, out=sys.stdout):
    rows = sorted(result["candidates"], key=lambda r: (r["score"], r["index"]))
    print(f"{'rank':>4} {'index':>5} {'score':>9} {'inst.mean':>9} {'tokens':>7}  instruction", file=out)
    for rank, r in enumerate(rows, 1):
        mark = ("*" if r["index"] == result["selected"] else " ") + ("o" if r["index"] == 0 else " ")
        text = r["instruction"].replace("\n", " ")
        text = text[:60] + ("..." if len(text) > 60 else "")
        print(f"{rank:>4} {r['index']:>5} {r['score']:>9.5f} {r['instance_mean']:>9.5f} {r['num_tokens']:>7} "
              f"{mark} {text}", file=out)
    print(f"* selected (index {result['selected']}), o original; {result['num_instances']} instances, "
          f"{result['seconds']:.1f}s", file=out)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    for name in ("instances", "token_budget", "max_length", "row_tokens", "race_first"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SapoError(f"--{name.replace('_', '-')} must be positive")
    if args.generate < 0:
        raise SapoError("--generate must be >= 0")
    if not 0.0 < args.race_confidence <= 1.0:
        raise SapoError("--race-confidence must be in (0, 1]")
    if args.paraphrase_api and not args.paraphraser:
        raise SapoError("--paraphrase-api needs --paraphraser MODEL_NAME (the API's model)")
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from tasks.loaders import load_task
    from tasks.models import load_model, load_tokenizer, resolve

    # Data and candidates first: bad input fails in a second, before any model is loaded.
    task = load_task(args.task, args.data_dir, seed=args.seed, n_train=max(1000, args.instances))
    if args.split == "train" and "train" in task.missing_splits:
        raise SapoError(f"task {task.name} has no train split in {task.source or 'its source'}; "
                        "use --split dev to score on dev explicitly")
    instances = task.split(args.split)[:args.instances]
    if args.candidates:
        candidates = load_candidates_file(args.candidates, task)
    elif args.generate:
        candidates = [task.instruction]
    else:
        candidates = candidate_pool(task)
    out_dir = Path(args.output).parent if args.output else None
    cache_path = None if args.no_cache else (args.cache or (str(out_dir / "score_cache.json") if out_dir else None))

    accelerator = Accelerator()
    base, adapters = resolve(args.model)
    state_id = model_state_id(base, adapters)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).to(accelerator.device).eval()
    if len(instances) < args.instances:
        accelerator.print(f"note: task {task.name} has {len(instances)} {args.split} instances (< {args.instances})")

    if args.generate:
        # Generated once on the main process (sampling on several devices could differ), then broadcast.
        found = [None]
        if accelerator.is_main_process:
            if args.paraphrase_api:
                gen_model, gen_tok, who = None, None, "api:" + args.paraphraser
            elif args.paraphraser:
                gen_model, gen_tok = load_model(args.paraphraser).to(accelerator.device).eval(), \
                    load_tokenizer(args.paraphraser)
                who = args.paraphraser
            else:
                gen_model, gen_tok, who = model, tokenizer, "scored:" + state_id
            par_cache = args.paraphrase_cache or (str(out_dir / "paraphrases.json") if out_dir else None)
            try:
                found = [generate_paraphrases(task, args.generate, gen_model, gen_tok, temperature=args.temperature,
                                              seed=args.seed, cache_path=par_cache, api_url=args.paraphrase_api,
                                              api_model=args.paraphraser, paraphraser_id=who)]
            except SapoError as e:
                found = [str(e)]
        if accelerator.num_processes > 1:
            broadcast_object_list(found)
        if isinstance(found[0], str):
            raise SapoError(found[0])
        candidates, _ = filter_candidates(task, candidates[1:] + found[0])

    score = score_candidates
    if args.select == "sapo-race":
        score = functools.partial(race_candidates, first=args.race_first, confidence=args.race_confidence)
    result = score(model, tokenizer, task, candidates, instances, accelerator,
                   token_budget=args.token_budget, max_length=args.max_length, cache_path=cache_path,
                   state_id=state_id, progress=not args.no_progress, row_tokens=args.row_tokens)
    result.update(model=args.model or "default", split=args.split)
    if accelerator.is_main_process:
        if args.output:
            write_json(args.output, result)
        print_table(result)
        if "rounds" in result:
            print_rounds(result)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears down the process group cleanly under accelerate launch


if __name__ == "__main__":
    main()
    exit_after_main()
