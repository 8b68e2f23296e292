"""Generation speed of evaluation, side by side in one process on the same prompts: today's path (HF generate, 16
sequences per batch, the k adapters unmerged, dynamic cache, each batch waiting for its longest answer) against the
folded adapter, token-budget batches that drop finished sequences, and the static-cache path (+ torch.compile on
CUDA), at k = 0, 1, 5 adapters, on a random-weight model of a real architecture.

Prompts: the test inputs of NI-Seq-C1's tasks (--data-dir; the built-in tasks when it is absent) with their original
instructions, encoded with --tokenizer (default: SmolLM2's real tokenizer when installed, else the random model's
small one; its ids fit every architecture here). Answer lengths: random weights never emit a stop token, so each
sequence is stopped after its reference's token count plus the end-of-turn ("real"), or runs the full 128 tokens
("128", the worst case: zero-shot rows, generation tasks).

    python bench/bench_generation.py --arch smollm2-135m --instances 8 --out bench/results/generation_cpu
    python bench/bench_generation.py --arch qwen3-8b --dtype bf16 --instances 650 --out bench/results/generation_h100

Part "step" times one decode step alone (after a --step-prompt-token prompt; --step-rounds rounds of --step-tokens
steps, unmerged and folded interleaved) for the k adapters unmerged against folded, at several batch sizes.
Results: OUT.json and OUT.md, with the device's name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NI_SEQ_C1 = ["task195_sentiment140_classification", "task1310_amazonreview_rating_classification",
             "task273_europarl_classification", "task611_mutual_multi_turn_dialogue",
             "task224_scruples_anecdotes_ethical_judgment"]
# The README's complete generation/mixed sequence: answers of very different lengths (titles, lists, summaries)
GENERATION_MIX = ["task163_count_words_ending_with_letter",
                  "task488_extract_all_alphabetical_elements_from_list_in_order",
                  "task1510_evalution_relation_extraction", "task1355_sent_comp_summarization",
                  "task292_storycommonsense_character_text_generation"]
SEQUENCES = {"ni_seq_c1": NI_SEQ_C1, "generation_mix": GENERATION_MIX}
PATHS = ("today", "folded", "budget_nodrop", "budget", "static")


@dataclass
class PathResult:
    path: str  # today | folded | budget_nodrop | budget | static
    k: int  # adapters in the stack
    lengths: str  # real | 128
    seconds: float  # wall
    cpu_seconds: float  # this process's CPU time (on a shared CPU: the work itself, without waiting for the cores)
    batches: int
    decode_steps: int  # forward passes after the prefill, summed over batches
    sequence_steps: int  # rows computed, summed over decode steps (padding rows of finished sequences included)
    answer_tokens: int  # tokens the answers need (what a perfect scheduler computes)
    tokens_per_s: float  # answer_tokens / seconds (prefill included: what an evaluation row costs)
    peak_gib: float | None  # CUDA only
    same_as_today: bool  # every answer's tokens equal today's


@dataclass
class StepResult:
    k: int
    batch: int
    unmerged_ms: float  # wall
    folded_ms: float
    unmerged_cpu_ms: float  # this process's CPU time per step
    folded_cpu_ms: float


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def random_model(arch: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from random_model import ARCHS
    from tiny import tiny_tokenizer

    kind, sizes = ARCHS[arch]
    tokenizer = tiny_tokenizer()
    config = (Qwen3Config if kind == "qwen3" else LlamaConfig)(
        **sizes, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (an 8B model initialised on a CPU takes minutes)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer


def add_adapters(model, k: int):
    """k LoRAs as train_sapo makes them (r 8, alpha 32, q_proj/v_proj, fp32), all active, random non-zero B."""
    from peft import LoraConfig, get_peft_model

    from tasks.models import activate_adapters, adapter_name

    if k == 0:
        return model, None
    peft_model = None
    for i in range(k):
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                            init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name(i))
        else:
            peft_model.add_adapter(adapter_name(i), config)
    activate_adapters(peft_model, [adapter_name(i) for i in range(k)], trainable=None)
    return peft_model.get_base_model().eval(), peft_model


def load_prompts(tokenizer, data_dir, instances: int, max_prompt_tokens: int, sequence: list[str] = NI_SEQ_C1):
    """(prompt token ids, answer length in tokens incl. the end-of-turn, task names) of the first `instances` test
    inputs per task."""
    from tasks.loaders import load_task
    from tasks.prompts import encode_generation_prompt

    from tasks.builtin import BUILTIN_TASK_NAMES

    if data_dir and Path(data_dir).is_dir():
        tasks = [load_task(name, data_dir) for name in sequence]
    else:  # five built-in tasks stand in for the five of the sequence
        tasks = [load_task(name, None) for name in BUILTIN_TASK_NAMES[:len(sequence)]]
    prompts, lengths = [], []
    for task in tasks:
        test = task.split("test")
        for j in range(instances):  # a split shorter than `instances` is cycled (timings only)
            inst = test[j % len(test)]
            prompts.append(encode_generation_prompt(tokenizer, task.instruction, inst.input, task.suffix,
                                                    max_prompt_tokens, input_label=task.input_label).input_ids)
            lengths.append(len(tokenizer(inst.outputs[0], add_special_tokens=False)["input_ids"]) + 1)
    return prompts, lengths, [t.name for t in tasks]


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(path, net, prompts, answer_lengths, max_new, pad_id, token_budget, device):
    """(seconds, batches, stats, tokens per prompt) of one generation path over every prompt."""
    import contextlib

    import torch

    from tasks.fold import folded_adapter
    from tasks.generation import DecodeStats, greedy_decode, hf_generate, plan_batches

    if path in ("today", "folded"):
        plan = plan_batches([len(p) for p in prompts], max_new, token_budget=None, max_sequences=16)
    else:
        plan = plan_batches([len(p) for p in prompts], max_new, token_budget=token_budget)
    stats, out = DecodeStats(), {}
    stops = [len(net.get_input_embeddings().weight)]  # never produced: only the answer lengths stop a sequence
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad(), folded_adapter(net) if path != "today" else contextlib.nullcontext():
        for batch in plan.batches:
            batch_prompts, lengths = [prompts[i] for i in batch], [answer_lengths[i] for i in batch]
            if path == "budget":
                rows = greedy_decode(net, batch_prompts, pad_id, stops, max_new, stats, answer_lengths=lengths)
            else:
                rows = hf_generate(net, batch_prompts, pad_id, stops, max_new, static=path == "static",
                                   compile=path == "static" and device.type == "cuda", stats=stats,
                                   answer_lengths=lengths)
            for i, row, n in zip(batch, rows, lengths):
                out[i] = row[:n]
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, cpu_seconds, len(plan.batches), stats, [out[i] for i in range(len(prompts))], peak


def time_steps(net, batch: int, steps: int, prompt_tokens: int, rounds: int, device) -> tuple[float, ...]:
    """ms per decode step (one token for each of `batch` sequences after a `prompt_tokens` prompt) with the adapters
    unmerged and folded: one prefill, then rounds of `steps` steps alternating unmerged and folded on the same cache
    (interleaved, so that a noisy shared machine slows both alike); the median round of each, wall and CPU time:
    (unmerged wall, folded wall, unmerged cpu, folded cpu)."""
    import statistics

    import torch
    from transformers import DynamicCache

    from tasks.fold import folded_adapter

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, 400, (batch, prompt_tokens), generator=g).to(device)
    cache = DynamicCache(config=net.config)
    with torch.no_grad():
        out = net(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)

        def run(n):
            nonlocal token
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(n):
                token = net(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1,
                                                                                                     keepdim=True)
            sync(device)
            return 1000 * (time.perf_counter() - start) / n, 1000 * (time.process_time() - cpu_start) / n

        run(1)  # warm-up
        unmerged, folded = [], []
        for _ in range(rounds):
            unmerged.append(run(steps))
            with folded_adapter(net):
                folded.append(run(steps))
    median = statistics.median
    return (median(t for t, _ in unmerged), median(t for t, _ in folded), median(c for _, c in unmerged),
            median(c for _, c in folded))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="smollm2-135m", help="smollm2-135m | qwen3-0.6b | qwen3-8b (random weights)")
    p.add_argument("--dtype", default="fp32", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "superni"))
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for prompts and label lengths")
    p.add_argument("--instances", type=int, default=8, help="test inputs per task")
    p.add_argument("--sequence", default="ni_seq_c1", choices=sorted(SEQUENCES),
                   help="whose test inputs and label lengths (with --data-dir)")
    p.add_argument("--k", default="0,1,5")
    p.add_argument("--lengths", default="real,128")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--token-budget", type=int, default=None, help="default: tasks.generation's per-device default")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=1536)
    p.add_argument("--step-batches", default="1,4,16,64", help="part step: batch sizes ('' skips the part)")
    p.add_argument("--step-tokens", type=int, default=16, help="part step: decode steps per round")
    p.add_argument("--step-prompt", type=int, default=256, help="part step: prompt tokens before the steps")
    p.add_argument("--step-rounds", type=int, default=3, help="part step: interleaved rounds (median)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="results prefix: OUT.json and OUT.md")
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tasks.generation import default_token_budget

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    base, model_tokenizer = random_model(args.arch, dtype, device)
    tokenizer, tokenizer_name = model_tokenizer, "the random model's small BPE (tests/tiny.py)"
    if args.tokenizer or (Path.home() / ".cache" / "sapo" / "SmolLM2-135M-Instruct").is_dir():
        path = args.tokenizer or str(Path.home() / ".cache" / "sapo" / "SmolLM2-135M-Instruct")
        tokenizer, tokenizer_name = AutoTokenizer.from_pretrained(path), path
    prompts, real_lengths, task_names = load_prompts(tokenizer, args.data_dir, args.instances, args.max_prompt_tokens,
                                                     SEQUENCES[args.sequence])
    budget = args.token_budget or default_token_budget(base, device)
    name = device_name(device)
    print(f"device: {name}; {args.arch} random weights in {args.dtype}; {len(prompts)} prompts from "
          f"{', '.join(task_names)} (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens, tokenizer "
          f"{tokenizer_name}); real answer lengths mean {sum(real_lengths) / len(real_lengths):.1f} tokens; "
          f"token budget {budget}", flush=True)

    ks = [int(k) for k in args.k.split(",")]
    results, steps = [], []
    for k in ks:  # one model, adapters added as k grows (the same prompts and base weights for every row)
        net, peft_model = add_adapters(base, k) if k else (base, None)
        for lengths_name in args.lengths.split(","):
            lengths = real_lengths if lengths_name == "real" else [args.max_new_tokens] * len(prompts)
            lengths = [min(n, args.max_new_tokens) for n in lengths]
            today_tokens = None
            for path in args.paths.split(","):
                seconds, cpu_seconds, batches, stats, tokens, peak = run_path(
                    path, net, prompts, lengths, args.max_new_tokens, tokenizer.pad_token_id or 0, budget, device)
                today_tokens = tokens if path == "today" else today_tokens
                r = PathResult(path=path, k=k, lengths=lengths_name, seconds=seconds, cpu_seconds=cpu_seconds,
                               batches=batches,
                               decode_steps=stats.steps, sequence_steps=stats.sequence_steps,
                               answer_tokens=sum(lengths), tokens_per_s=sum(lengths) / seconds, peak_gib=peak,
                               same_as_today=today_tokens is not None and tokens == today_tokens)
                results.append(r)
                print(f"k={k} {lengths_name:>4} {path:>13}: {seconds:7.2f} s (cpu {cpu_seconds:7.2f} s)  "
                      f"{r.tokens_per_s:8.1f} tok/s  "
                      f"{batches:3d} batches  {stats.steps:5d} steps  "
                      f"rows {stats.sequence_steps} for {sum(lengths)} tokens  same as today: {r.same_as_today}",
                      flush=True)
        if k and args.step_batches:
            for batch in [int(b) for b in args.step_batches.split(",")]:
                unmerged, folded, unmerged_cpu, folded_cpu = time_steps(net, batch, args.step_tokens,
                                                                        args.step_prompt, args.step_rounds, device)
                steps.append(StepResult(k=k, batch=batch, unmerged_ms=unmerged, folded_ms=folded,
                                        unmerged_cpu_ms=unmerged_cpu, folded_cpu_ms=folded_cpu))
                print(f"step k={k} batch {batch:3d}: unmerged {unmerged:7.1f} ms (cpu {unmerged_cpu:7.1f})  folded "
                      f"{folded:7.1f} ms (cpu {folded_cpu:7.1f})  {unmerged / folded:.2f}x wall, "
                      f"{unmerged_cpu / folded_cpu:.2f}x cpu", flush=True)
        if peft_model is not None:
            base = peft_model.unload()  # the next k starts from the bare base again

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "arch": args.arch, "dtype": args.dtype, "prompts": len(prompts), "tasks": task_names,
            "tokenizer": tokenizer_name, "token_budget": budget, "max_new_tokens": args.max_new_tokens,
            "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "mean_real_answer_tokens": sum(real_lengths) / len(real_lengths),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({**meta, "paths": [asdict(r) for r in results],
                                                    "steps": [asdict(s) for s in steps]}, indent=2) + "\n")
    lines = [f"# Generation benchmark on {name}", "",
             f"{args.arch} (random weights, {args.dtype}), {len(prompts)} prompts of {', '.join(task_names)} "
             f"(mean {meta['mean_prompt_tokens']:.0f} prompt tokens; real answers mean "
             f"{meta['mean_real_answer_tokens']:.1f} tokens), token budget {budget}, {meta['date']}", "",
             "| k | answers | path | wall s | cpu s | tokens/s (wall) | batches | decode steps "
             "| rows computed / answer tokens | peak GiB | same tokens as today |", "|---" * 11 + "|"]
    for r in results:
        lines.append(f"| {r.k} | {r.lengths} | {r.path} | {r.seconds:.2f} | {r.cpu_seconds:.2f} | "
                     f"{r.tokens_per_s:.1f} | {r.batches} | "
                     f"{r.decode_steps} | {r.sequence_steps / r.answer_tokens:.2f} | "
                     f"{'-' if r.peak_gib is None else f'{r.peak_gib:.1f}'} | {r.same_as_today} |")
    if steps:
        lines += ["", f"One decode step after a {args.step_prompt}-token prompt (median of {args.step_rounds} "
                  f"interleaved rounds of {args.step_tokens} steps):", "",
                  "| k | batch | unmerged ms (wall) | folded ms (wall) | wall speed-up | unmerged cpu ms "
                  "| folded cpu ms | cpu speed-up |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s.k} | {s.batch} | {s.unmerged_ms:.1f} | {s.folded_ms:.1f} | "
                  f"{s.unmerged_ms / s.folded_ms:.2f}x | {s.unmerged_cpu_ms:.1f} | {s.folded_cpu_ms:.1f} | "
                  f"{s.unmerged_cpu_ms / s.folded_cpu_ms:.2f}x |"
                  for s in steps]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
