"""Benchmark: score_prompts.score_candidates against the naive scoring of the original code.

Naive = what the original's Trainer.evaluate does: padded batches of 8 (instance order, no sorting), a plain HF forward
that builds full-vocabulary logits for every position, cross-entropy on the response tokens. Its score is the mean of
the batch means; for the comparison we also recompute our token-weighted mean from its per-token losses (the batch
mean HF computes from `labels` is sum/count of the same per-token losses, so one cross-entropy serves both).

    python bench/bench_scoring.py                                   # SmolLM2-135M-Instruct, 21 x 32, CPU
    python bench/bench_scoring.py --task sentiment --candidates 21 --instances 16 --repeats 3

Writes bench/results/scoring_<device>.json and .md. Timings are figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import score_prompts  # noqa: E402
from tasks import IGNORE_INDEX, encode_example, pad_batch  # noqa: E402
from tasks.candidates import candidate_pool  # noqa: E402
from tasks.loaders import load_task  # noqa: E402
from tasks.models import load_model, load_tokenizer  # noqa: E402


def naive_scores(model, tokenizer, task, candidates, instances, batch_size=8, max_length=2048):
    """Per candidate: (mean of batch means, token-weighted mean, per-instance mean losses)."""
    pad = tokenizer.pad_token_id
    out = []
    naive_scores.tokens_forwarded = 0
    with torch.no_grad():
        for c in candidates:
            enc = [encode_example(tokenizer, c, x.input, task.suffix, x.label, max_length) for x in instances]
            batch_means, sums, counts = [], [], []
            for b in range(0, len(enc), batch_size):
                chunk = enc[b:b + batch_size]
                ids = pad_batch([e.input_ids for e in chunk], pad)
                labels = pad_batch([e.labels for e in chunk], IGNORE_INDEX)
                mask = pad_batch([[1] * len(e.input_ids) for e in chunk], 0)
                naive_scores.tokens_forwarded += ids.numel()
                ids, labels, mask = ids.to(model.device), labels.to(model.device), mask.to(model.device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                # HF's shift: logits at p predict the token at p + 1.
                tok_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="none").view(len(chunk), -1)
                n = (labels[:, 1:] != IGNORE_INDEX).sum(1)
                s = tok_loss.sum(1)
                batch_means.append((s.sum() / n.sum()).item())  # = model(..., labels=labels).loss
                sums += s.tolist()
                counts += n.tolist()
            out.append((sum(batch_means) / len(batch_means), sum(sums) / sum(counts),
                        [s / n for s, n in zip(sums, counts)]))
    return out


def check_naive_matches_hf(model, tokenizer, task, candidate, instances):
    """The recomputed batch mean equals HF's own labels= loss (so the naive baseline is the original method)."""
    chunk = [encode_example(tokenizer, candidate, x.input, task.suffix, x.label) for x in instances[:8]]
    ids = pad_batch([e.input_ids for e in chunk], tokenizer.pad_token_id)
    labels = pad_batch([e.labels for e in chunk], IGNORE_INDEX)
    mask = pad_batch([[1] * len(e.input_ids) for e in chunk], 0)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    ours = naive_scores(model, tokenizer, task, [candidate], instances[:8])[0][0]
    return abs(hf - ours)


def single_losses(model, tokenizer, task, candidate, instances):
    """Per-instance losses from one unpadded forward each (score_prompts.reference_score): the fp32 noise floor of
    the batched naive method."""
    return score_prompts.reference_score(model, tokenizer, task, candidate, instances).instance_losses


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    p.add_argument("--task", default="sentiment", help="a built-in task")
    p.add_argument("--candidates", type=int, default=21)
    p.add_argument("--instances", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=16384)
    p.add_argument("--row-tokens", type=int, default=None, help="default: score_prompts chooses from the model")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each method (the best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring_cpu"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = load_task(args.task)
    candidates = candidate_pool(task)[:args.candidates]
    instances = task.split("train")[:args.instances]
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    print(f"model {model.config._name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"{model.config._attn_implementation}), task {task.name}: {len(candidates)} candidates x "
          f"{len(instances)} instances, {torch.get_num_threads()} threads")
    hf_gap = check_naive_matches_hf(model, tokenizer, task, candidates[0], instances)

    # Warm-up (first-call allocations, oneDNN kernel selection), then best of `repeats`.
    naive_scores(model, tokenizer, task, candidates[:1], instances[:8])
    score_prompts.score_candidates(model, tokenizer, task, candidates[:1], instances[:8], progress=False)
    naive_t, ours_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        naive = naive_scores(model, tokenizer, task, candidates, instances)
        naive_t.append(time.perf_counter() - t)
        naive_tokens = naive_scores.tokens_forwarded
        t = time.perf_counter()
        ours = score_prompts.score_candidates(model, tokenizer, task, candidates, instances, progress=False,
                                              token_budget=args.token_budget, row_tokens=args.row_tokens)
        ours_t.append(time.perf_counter() - t)

    # Tokenization alone (both methods do the same encode_example calls): how much of each time it is.
    t = time.perf_counter()
    for c in candidates:
        for x in instances:
            encode_example(tokenizer, c, x.input, task.suffix, x.label, 2048)
    encode_t = time.perf_counter() - t

    ours_scores = [r.score for r in ours.candidates]
    naive_token = [n[1] for n in naive]
    naive_batch = [n[0] for n in naive]
    max_diff = max(abs(a - b) for a, b in zip(ours_scores, naive_token))
    max_inst_diff = max(abs(a - b) for r, n in zip(ours.candidates, naive)
                        for a, b in zip(r.instance_losses, n[2]))
    # How far the naive method is from itself (padded batch of 8 vs one unpadded sequence at a time): differences of
    # that size are fp32 rounding of differently shaped matmuls, not a different loss.
    floor = max(abs(a - b) for c in range(min(2, len(candidates)))
                for a, b in zip(single_losses(model, tokenizer, task, candidates[c], instances), naive[c][2]))
    argmin_ours = score_prompts.select_index(ours_scores)
    result = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": model.config._name_or_path, "task": task.name,
        "candidates": len(candidates), "instances": len(instances), "token_budget": args.token_budget,
        "row_tokens": args.row_tokens, "packing": ours.packing, "batches": ours.num_batches,
        "naive_tokens_forwarded": naive_tokens, "ours_tokens_forwarded": ours.tokens_forwarded,
        "naive_seconds": min(naive_t), "ours_seconds": min(ours_t), "encode_seconds": encode_t,
        "speedup": min(naive_t) / min(ours_t),
        "speedup_excluding_encoding": (min(naive_t) - encode_t) / (min(ours_t) - encode_t),
        "max_abs_score_diff": max_diff, "max_abs_instance_loss_diff": max_inst_diff,
        "naive_batch_mean_vs_hf_labels_loss": hf_gap, "naive_padded_vs_unpadded_instance_loss_diff": floor,
        "argmin_ours": argmin_ours, "argmin_naive_token_weighted": score_prompts.select_index(naive_token),
        "argmin_naive_batch_means": score_prompts.select_index(naive_batch),
        "all_naive_seconds": naive_t, "all_ours_seconds": ours_t,
    }
    result["argmin_agrees"] = result["argmin_ours"] == result["argmin_naive_token_weighted"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Scoring benchmark ({result['device']}, {result['threads']} threads, torch {result['torch']})", "",
          f"{result['model']}, built-in task `{task.name}`, {len(candidates)} candidates x {len(instances)} "
          f"instances ({len(candidates) * len(instances)} sequences); ours: {result['packing']} packing, "
          f"{result['batches']} batches of <= {args.token_budget} tokens, rows of "
          f"{args.row_tokens or 'auto'} tokens.", "",
          "| method | seconds (best of %d) | tokens through the model (with padding) |" % args.repeats,
          "|---|---|---|",
          f"| naive (HF forward, padded batches of 8) | {result['naive_seconds']:.2f} | {naive_tokens} |",
          f"| score_prompts | {result['ours_seconds']:.2f} | {ours.tokens_forwarded} |",
          f"| (tokenization, in both) | {encode_t:.2f} | |", "",
          f"Speed-up: **{result['speedup']:.2f}x** ({result['speedup_excluding_encoding']:.2f}x excluding "
          "tokenization).", "",
          f"Max |score difference| (token-weighted): {max_diff:.2e}; max |per-instance loss difference|: "
          f"{max_inst_diff:.2e} (the naive method differs from itself by up to {floor:.2e} between a padded batch "
          "and one unpadded sequence at a time: fp32 rounding). Argmin: ours "
          f"{argmin_ours}, naive token-weighted "
          f"{result['argmin_naive_token_weighted']}, naive mean of batch means {result['argmin_naive_batch_means']}"
          f" (agree: {result['argmin_agrees']}).", "",
          "Timings on a CPU shared with other jobs are noisy: the best of the repeats is reported (all of them are in "
          "the .json).", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
