"""Benchmark: what selection costs as a share of training, and how often racing picks the exhaustive argmin.

Part 1, overhead. For one model and task: the time of selection over C candidates x N instances by
  - naive: HF forward over padded batches of 8, full-vocabulary logits (bench_scoring.naive_scores: the original),
  - ours, exhaustive: score_prompts.score_candidates (shared-prefix packing, LM head on response rows only),
  - ours, racing: score_prompts.race_candidates (--select sapo-race),
against the training of the same task, E epochs x M instances, with train_sapo's own training code
(train_sapo.train_task on a LoRA with the paper's settings: r=8, alpha=32, q_proj/v_proj, global batch 64, micro
batch 8, lengths 1536 + 128). Training is timed for --train-epochs-timed epoch(s) after one untimed warm-up step and
extrapolated linearly to E epochs (every epoch is the same work). The paper's proportions are 21 x 250 scored against
10 x 1000 trained; the CPU default keeps them at 21 x 25 against 10 x 100.

Part 2, agreement. Over many cases (the 10 built-in tasks x several --builtin-seeds with their built-in pools, and
real SuperNI tasks from --superni-dir with a small deterministic rule-based pool: the offline SmolLM2 does not produce
valid tagged paraphrases), exhaustive scores of every candidate on the first --agree-instances training instances,
then racing with the default settings. Racing is replayed from the exhaustive per-instance sums through the same
race_rounds code as race_candidates uses (its live scores differ only by fp32 rounding of a different packing; part 1
checks that replay and live runs choose the same); --live-race runs race_candidates instead. Per case: same argmin,
the exhaustive-score gap of racing's pick to the exhaustive best (%), tokens scored by racing / exhaustive.

    python bench/bench_selection.py                                    # CPU defaults (~1 h on one busy core)
    python bench/bench_selection.py --skip-agreement                   # part 1 only (~6 min)
    python bench/bench_selection.py --score-instances 250 --train-instances 1000 --model Qwen/Qwen3-8B  # GPU

Writes bench/results/selection_<device>.json and .md. Timings are figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import score_prompts  # noqa: E402
import train_sapo  # noqa: E402
from bench_scoring import naive_scores  # noqa: E402
from tasks.builtin import BUILTIN_TASK_NAMES  # noqa: E402
from tasks.candidates import candidate_pool, filter_candidates, select_index  # noqa: E402
from tasks.racing import race_rounds  # noqa: E402
from tasks.loaders import load_task  # noqa: E402
from tasks.models import load_model, load_tokenizer, resolve_dtype  # noqa: E402

SUPERNI_TASKS = "task195,task1310,task273,task224,task363,task163,task488,task1510,task1355,task292"
MAX_LENGTH = 1536 + 128  # the paper's max source + max target


def rule_based_pool(task, k: int) -> list[str]:
    """The original instruction and up to k-1 deterministic rewrites that keep its whole text (so every label word
    stays verbatim) and change its framing, structure or tone. Validated like any pool (tasks.candidates)."""
    text = task.instruction.strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    core = re.sub(r"^In this task,?\s*", "", text)
    core = core[:1].upper() + core[1:]
    rewrites = [
        "Task: " + text,
        "You are a careful annotator. " + text,
        "Instructions:\n- " + "\n- ".join(sentences),
        " ".join(sentences[1:] + sentences[:1]) if len(sentences) > 1 else text + " Follow this instruction exactly.",
        "Read the text below. " + text + " Think about the whole text before answering.",
        core if core != text else "Here is your task. " + text,
        "Please help with the following. " + text,
        text + " Be precise and answer in the expected format.",
        "### Instruction\n" + text,
        "Goal: " + core + " Keep your answer short.",
    ]
    pool, _ = filter_candidates(task, rewrites)
    return pool[:k]


def time_training(model, tokenizer, task, instruction, instances, args):
    """Seconds of `args.epochs` epochs of train_sapo's training over `instances`, from a timed run of
    `args.train_epochs_timed` epoch(s) after an untimed one-step warm-up (first-call allocations)."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    config = train_sapo.Config(epochs=args.train_epochs_timed, global_batch_size=64, micro_batch_size=8,
                               max_source_length=1536, max_target_length=128, lr=1e-4, seed=0)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets.split(","), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora, adapter_name="a0")
    accelerator = Accelerator()
    encoded = train_sapo.encode_training_set(tokenizer, task, instruction, instances, config)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warm").mkdir()
        (Path(tmp) / "timed").mkdir()
        warm = train_sapo.Config(**{**config.__dict__, "epochs": 1, "global_batch_size": 8})
        peft_model, _ = train_sapo.train_task(accelerator, peft_model, "a0", [], encoded[:8], warm,
                                              Path(tmp) / "warm", False)
        t = time.perf_counter()
        peft_model, info = train_sapo.train_task(accelerator, peft_model, "a0", [], encoded, config,
                                                 Path(tmp) / "timed", False)
        seconds = time.perf_counter() - t
    peft_model.unload()  # the plain model again (the LoRA layers removed)
    return {"timed_epochs": args.train_epochs_timed, "timed_seconds": seconds, "optimizer_steps": info.steps,
            "seconds_extrapolated": seconds * args.epochs / args.train_epochs_timed}


def replay_race(exhaustive, first, growth, confidence):
    """race_rounds fed with the exhaustive per-instance sums: what racing would have scored and chosen."""
    cands = exhaustive.candidates

    def score_slice(subset, lo, hi):
        return {c: (cands[c].instance_sums[lo:hi], cands[c].instance_counts[lo:hi]) for c in subset}

    return race_rounds(score_slice, len(cands), exhaustive.num_instances, first=first, growth=growth,
                       confidence=confidence)


def tokens_scored(race) -> int:
    """Response tokens a race scored, from its rounds (a replayed Race or a live Selection alike)."""
    return sum(r.tokens_scored for r in race.rounds)


def same_race(a, b) -> bool:
    """Two races made the same choices: the same pick, the same eliminations in every round."""
    return a.selected == b.selected and [r.eliminated for r in a.rounds] == [r.eliminated for r in b.rounds]


def part_overhead(model, tokenizer, args):
    task = load_task(args.task, args.data_dir, seed=0, n_train=max(args.train_instances, args.score_instances))
    candidates = (candidate_pool(task)[:args.candidates] if task.paraphrases
                  else rule_based_pool(task, args.candidates))
    scored = task.split("train")[:args.score_instances]
    trained = task.split("train")[:args.train_instances]
    print(f"[overhead] {task.name}: {len(candidates)} candidates x {len(scored)} instances scored, "
          f"{args.epochs} epochs x {len(trained)} instances trained")
    # Warm-up of both scoring paths (allocations, oneDNN kernel choice).
    naive_scores(model, tokenizer, task, candidates[:1], scored[:8], max_length=MAX_LENGTH)
    score_prompts.score_candidates(model, tokenizer, task, candidates[:1], scored[:8], progress=False,
                                   max_length=MAX_LENGTH)
    t = time.perf_counter()
    naive = naive_scores(model, tokenizer, task, candidates, scored, batch_size=8, max_length=MAX_LENGTH)
    naive_seconds = time.perf_counter() - t
    naive_tokens = naive_scores.tokens_forwarded
    t = time.perf_counter()
    exhaustive = score_prompts.score_candidates(model, tokenizer, task, candidates, scored, progress=False,
                                                max_length=MAX_LENGTH)
    ours_seconds = time.perf_counter() - t
    t = time.perf_counter()
    race = score_prompts.race_candidates(model, tokenizer, task, candidates, scored, progress=False,
                                         max_length=MAX_LENGTH, first=args.race_first, growth=args.race_growth,
                                         confidence=args.race_confidence)
    race_seconds = time.perf_counter() - t
    replay = replay_race(exhaustive, args.race_first, args.race_growth, args.race_confidence)
    print(f"[overhead] scoring: naive {naive_seconds:.1f}s, ours {ours_seconds:.1f}s, racing {race_seconds:.1f}s; "
          "training ...")
    training = time_training(model, tokenizer, task, candidates[exhaustive.selected], trained, args)
    train_s = training["seconds_extrapolated"]
    ex_scores = [c.score for c in exhaustive.candidates]
    result = {
        "task": task.name, "candidates": len(candidates), "score_instances": len(scored),
        "train_instances": len(trained), "epochs": args.epochs, "training": training,
        "naive": {"seconds": naive_seconds, "pct_of_training": 100 * naive_seconds / train_s,
                  "tokens_forwarded": naive_tokens,
                  "argmin_token_weighted": select_index([n[1] for n in naive])},
        "exhaustive": {"seconds": ours_seconds, "pct_of_training": 100 * ours_seconds / train_s,
                       "tokens_forwarded": exhaustive.tokens_forwarded, "argmin": exhaustive.selected,
                       "tokens_scored": sum(c.num_tokens for c in exhaustive.candidates)},
        "racing": {"seconds": race_seconds, "pct_of_training": 100 * race_seconds / train_s,
                   "tokens_forwarded": race.tokens_forwarded, "argmin": race.selected,
                   "tokens_scored": tokens_scored(race), "exhaustive_tokens": race.exhaustive_tokens,
                   "rounds": [{k: getattr(r, k) for k in ("round", "num_instances", "eliminated", "tokens_scored",
                                                     "seconds")} for r in race.rounds],
                   "gap_pct": 100 * (ex_scores[race.selected] - min(ex_scores)) / min(ex_scores),
                   "replay_selected": replay.selected,
                   "replay_matches_live": same_race(replay, race)},
        "speedup_exhaustive_vs_naive": naive_seconds / ours_seconds,
        "max_abs_score_diff_naive_vs_ours": max(abs(n[1] - s) for n, s in zip(naive, ex_scores)),
    }
    result["same_argmin_naive_ours"] = result["naive"]["argmin_token_weighted"] == exhaustive.selected
    print(f"[overhead] training {training['timed_seconds']:.1f}s for {args.train_epochs_timed} epoch(s) -> "
          f"{train_s:.1f}s for {args.epochs}; selection: naive {result['naive']['pct_of_training']:.1f}%, "
          f"ours {result['exhaustive']['pct_of_training']:.1f}%, racing {result['racing']['pct_of_training']:.1f}%")
    return result


def agreement_cases(args):
    """(source, task, builtin seed, instances) of every agreement case."""
    for seed in args.builtin_seeds:
        for name in (args.builtin_tasks or BUILTIN_TASK_NAMES):
            yield "builtin", name, seed, args.agree_instances
    if args.superni_dir and Path(args.superni_dir).is_dir():
        for name in args.superni_tasks:
            yield "superni", name, None, args.agree_instances
    for name in args.large_tasks:  # the paper's number of scored instances: racing has more rounds to save in
        yield "builtin", name, 0, args.large_instances


def part_agreement(model, tokenizer, args):
    cases = []
    for source, name, seed, n in agreement_cases(args):
        t = time.perf_counter()
        if source == "builtin":
            task = load_task(name, seed=seed, n_train=n)
            candidates = candidate_pool(task)[:args.candidates]
        else:
            task = load_task(name, args.superni_dir)
            candidates = rule_based_pool(task, args.superni_candidates)
        instances = task.split("train")[:n]
        exhaustive = score_prompts.score_candidates(
            model, tokenizer, task, candidates, instances, progress=False, max_length=args.agree_max_length,
            cache_path=args.cache, state_id="bench-selection:" + str(args.model or "default"))
        race = replay = replay_race(exhaustive, args.race_first, args.race_growth, args.race_confidence)
        live = None
        if args.live_race or n >= args.large_instances:  # large cases: also the real race, for its seconds
            race = score_prompts.race_candidates(model, tokenizer, task, candidates, instances, progress=False,
                                                 max_length=args.agree_max_length, first=args.race_first,
                                                 growth=args.race_growth, confidence=args.race_confidence)
            # Forward-pass seconds (batches only, as stored per candidate), exhaustive vs racing.
            live = {"exhaustive_seconds": sum(c.seconds for c in exhaustive.candidates),
                    "racing_seconds": sum(c.seconds for c in race.candidates),
                    "exhaustive_tokens_forwarded": exhaustive.tokens_forwarded,
                    "racing_tokens_forwarded": race.tokens_forwarded,
                    "replay_matches_live": same_race(replay, race)}
        scores = [c.score for c in exhaustive.candidates]
        best = exhaustive.selected
        ranked = sorted(scores)
        exhaustive_tokens = sum(c.num_tokens for c in exhaustive.candidates)
        case = {"source": source, "task": task.name, "seed": seed, "candidates": len(candidates),
                "instances": len(instances), "exhaustive_argmin": best, "racing_pick": race.selected,
                "same_argmin": race.selected == best,
                "gap_pct": 100 * (scores[race.selected] - scores[best]) / scores[best],
                "runner_up_gap_pct": 100 * (ranked[1] - ranked[0]) / ranked[0] if len(ranked) > 1 else None,
                "tokens_scored": tokens_scored(race), "exhaustive_tokens": exhaustive_tokens,
                "token_ratio": tokens_scored(race) / exhaustive_tokens,
                "rounds": len(race.rounds), "final_survivors": len(race.rounds[-1].survivors),
                "eliminated_per_round": [[r.num_instances, len(r.eliminated)] for r in race.rounds],
                "live": live, "seconds": time.perf_counter() - t}
        cases.append(case)
        print(f"[agree] {source:7} {task.name[:40]:40} seed={seed} K={len(candidates)} N={len(instances)} "
              f"same={case['same_argmin']} gap={case['gap_pct']:.3f}% tokens={100 * case['token_ratio']:.0f}% "
              f"({case['seconds']:.0f}s)", flush=True)
    return cases


def summarize(cases):
    if not cases:
        return {}
    differ = [c for c in cases if not c["same_argmin"]]
    return {"cases": len(cases), "same_argmin": sum(c["same_argmin"] for c in cases),
            "same_argmin_pct": 100 * sum(c["same_argmin"] for c in cases) / len(cases),
            "max_gap_pct": max(c["gap_pct"] for c in cases),
            "mean_token_ratio_pct": 100 * sum(c["token_ratio"] for c in cases) / len(cases),
            "differ": [{k: c[k] for k in ("source", "task", "seed", "instances", "exhaustive_argmin", "racing_pick",
                                          "gap_pct", "runner_up_gap_pct")} for c in differ]}


def write_markdown(result, out: Path):
    o, agree = result.get("overhead"), result.get("agreement_summary")
    md = [f"# Selection overhead and racing agreement ({result['device']}, {result['threads']} threads, "
          f"torch {result['torch']})", "", f"Model: {result['model']}. Racing: first {result['race']['first']}, "
          f"growth {result['race']['growth']}, confidence {result['race']['confidence']}.", ""]
    if o:
        tr = o["training"]
        md += [f"## Overhead: `{o['task']}`, {o['candidates']} candidates x {o['score_instances']} instances scored "
               f"vs {o['epochs']} epochs x {o['train_instances']} instances trained", "",
               f"Training (train_sapo.train_task, LoRA r=8 on q/v, global batch 64, micro batch 8): "
               f"{tr['timed_seconds']:.1f} s for {tr['timed_epochs']} epoch ({tr['optimizer_steps']} optimizer steps),"
               f" extrapolated to **{tr['seconds_extrapolated']:.0f} s** for {o['epochs']} epochs.", "",
               "| selection | seconds | % of training | tokens through the model | response tokens scored | pick |",
               "|---|---|---|---|---|---|",
               f"| naive (HF forward, padded batches of 8) | {o['naive']['seconds']:.1f} | "
               f"{o['naive']['pct_of_training']:.1f}% | {o['naive']['tokens_forwarded']} | "
               f"{o['exhaustive']['tokens_scored']} | {o['naive']['argmin_token_weighted']} |",
               f"| ours, exhaustive (`--select sapo`) | {o['exhaustive']['seconds']:.1f} | "
               f"{o['exhaustive']['pct_of_training']:.1f}% | {o['exhaustive']['tokens_forwarded']} | "
               f"{o['exhaustive']['tokens_scored']} | {o['exhaustive']['argmin']} |",
               f"| ours, racing (`--select sapo-race`) | {o['racing']['seconds']:.1f} | "
               f"{o['racing']['pct_of_training']:.1f}% | {o['racing']['tokens_forwarded']} | "
               f"{o['racing']['tokens_scored']} | {o['racing']['argmin']} |", "",
               f"Exhaustive ours vs naive: {o['speedup_exhaustive_vs_naive']:.2f}x faster, same argmin: "
               f"{o['same_argmin_naive_ours']} (max |score difference| {o['max_abs_score_diff_naive_vs_ours']:.1e}). "
               f"Racing's pick is {o['racing']['gap_pct']:.3f}% above the exhaustive best; it scored "
               f"{100 * o['racing']['tokens_scored'] / o['racing']['exhaustive_tokens']:.0f}% of the exhaustive "
               f"response tokens in {len(o['racing']['rounds'])} rounds (eliminated per round: "
               + "; ".join(f"{r['num_instances']} inst.: {len(r['eliminated'])}" for r in o['racing']['rounds'])
               + f"). Replayed race = live race: {o['racing']['replay_matches_live']}.", ""]
    if agree:
        cases = result["agreement"]
        md += [f"## Racing vs exhaustive: {agree['cases']} cases", "",
               "Exhaustive scores of every candidate on the first N training instances (sequences of at most "
               f"{result['agreement_max_length']} tokens: longer inputs are shortened); racing: "
               f"{result['agreement_method']} (cases marked live below were also raced for real, and those "
               "figures are shown). Built-in tasks use their hand-written pools, SuperNI tasks a "
               "deterministic rule-based pool (bench_selection.rule_based_pool).", "",
               "| source | cases | K x N | same argmin | max gap of racing's pick | mean tokens racing/exhaustive |",
               "|---|---|---|---|---|---|"]
        for source, n in sorted({(c["source"], c["instances"]) for c in cases}):
            group = [c for c in cases if c["source"] == source and c["instances"] == n]
            if group:
                shapes = sorted({f"{c['candidates']} x {c['instances']}" for c in group})
                md.append(f"| {source} | {len(group)} | {', '.join(shapes)} | "
                          f"{sum(c['same_argmin'] for c in group)}/{len(group)} | "
                          f"{max(c['gap_pct'] for c in group):.3f}% | "
                          f"{100 * sum(c['token_ratio'] for c in group) / len(group):.0f}% |")
        md.append(f"| all | {agree['cases']} | | {agree['same_argmin']}/{agree['cases']} "
                  f"({agree['same_argmin_pct']:.1f}%) | {agree['max_gap_pct']:.3f}% | "
                  f"{agree['mean_token_ratio_pct']:.0f}% |")
        for c in cases:
            if c["live"]:
                lv = c["live"]
                md += ["", f"Live race, `{c['task']}` seed {c['seed']}, {c['candidates']} x {c['instances']}: "
                       f"racing scored {100 * c['token_ratio']:.0f}% of the response tokens, forwarded "
                       f"{100 * lv['racing_tokens_forwarded'] / lv['exhaustive_tokens_forwarded']:.0f}% of the "
                       f"tokens, in {100 * lv['racing_seconds'] / lv['exhaustive_seconds']:.0f}% of the forward "
                       f"time ({lv['racing_seconds']:.0f} s vs {lv['exhaustive_seconds']:.0f} s exhaustive); "
                       "eliminated per round (instances: candidates): "
                       + ", ".join(f"{m}: {e}" for m, e in c["eliminated_per_round"])
                       + f"; replayed race = live race: {lv['replay_matches_live']}."]
        md += ["", "Cases where racing picked another candidate than exhaustive scoring:", ""]
        if agree["differ"]:
            md += ["| task | seed | N | exhaustive | racing | gap of racing's pick | exhaustive runner-up gap |",
                   "|---|---|---|---|---|---|---|"]
            md += [f"| {d['task']} | {d['seed']} | {d['instances']} | {d['exhaustive_argmin']} | {d['racing_pick']} | "
                   f"{d['gap_pct']:.3f}% | {d['runner_up_gap_pct']:.3f}% |" for d in agree["differ"]]
        else:
            md.append("none.")
        md += ["", "Per case:", "", "| source | task | seed | K x N | same | gap | tokens | rounds | survivors |",
               "|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {c['source']} | {c['task']} | {c['seed']} | {c['candidates']} x {c['instances']} | "
               f"{'yes' if c['same_argmin'] else 'NO'} | {c['gap_pct']:.3f}% | {100 * c['token_ratio']:.0f}% | "
               f"{c['rounds']} | {c['final_survivors']} |" for c in cases]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    p.add_argument("--task", default="sentiment", help="overhead part: a built-in task, or a task of --data-dir")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--candidates", type=int, default=21)
    p.add_argument("--score-instances", type=int, default=25, help="paper: 250")
    p.add_argument("--train-instances", type=int, default=100, help="paper: 1000")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-epochs-timed", type=int, default=1, help="epochs actually run; the rest extrapolated")
    p.add_argument("--race-first", type=int, default=8)
    p.add_argument("--race-growth", type=float, default=2.0)
    p.add_argument("--race-confidence", type=float, default=0.95)
    p.add_argument("--agree-instances", type=int, default=32, help="instances per agreement case")
    p.add_argument("--agree-max-length", type=int, default=512,
                   help="agreement: longer sequences shorten their input text (keeps long SuperNI tasks affordable)")
    p.add_argument("--builtin-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--builtin-tasks", nargs="*", default=None, help="default: all 10")
    p.add_argument("--superni-dir", default=str(ROOT.parent / "shared" / "data" / "superni"))
    p.add_argument("--superni-tasks", type=lambda s: [x for x in s.split(",") if x],
                   default=SUPERNI_TASKS.split(","))
    p.add_argument("--superni-candidates", type=int, default=8)
    p.add_argument("--large-tasks", type=lambda s: [x for x in s.split(",") if x], default=["sentiment"],
                   help="built-in tasks (seed 0) also raced at --large-instances (comma-separated; '' for none)")
    p.add_argument("--large-instances", type=int, default=250, help="paper: 250")
    p.add_argument("--live-race", action="store_true", help="agreement: run race_candidates, not a replay")
    p.add_argument("--cache", default=None, help="score cache for the agreement part (reruns skip done cases)")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: on a shared CPU, OpenMP threads that spin-wait for each other "
                        "slow down many times over")
    p.add_argument("--dtype", default="auto", help="base weights: auto (bf16 on a CUDA GPU, else fp32), bf16, fp16, fp32")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "selection_cpu"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, dtype=resolve_dtype(args.dtype, device)).to(device).eval()
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "dtype": str(model.dtype), "cpu": platform.processor() or
              platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": model.config._name_or_path,
              "race": {"first": args.race_first, "growth": args.race_growth, "confidence": args.race_confidence},
              "agreement_max_length": args.agree_max_length,
              "agreement_method": "live race_candidates" if args.live_race else "replay of race_rounds on the "
                                                                                "exhaustive per-instance sums"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_agreement:  # first: it does not touch the model's weights (part 1 adds and removes a LoRA)
        result["agreement"] = part_agreement(model, tokenizer, args)
        result["agreement_summary"] = summarize(result["agreement"])
    if not args.skip_overhead:
        result["overhead"] = part_overhead(model, tokenizer, args)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(write_markdown(result, out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
