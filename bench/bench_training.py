"""Benchmark: one optimizer step at the paper's batch shape (64 sequences), today's training path against ours.

Variants, each on the same 64 sequences (the first global batch of train_sapo.global_batches for the task):
  - today: the training loop before issue 13: micro-batches of 8 sequences (slot s = batch[s::8]), right padding to
    the longest of the 8, `model(...).logits.float()` over every position, summed cross-entropy;
  - ours: tasks.train_batches (packed rows filled to --micro-batch-tokens) + tasks.train_step.SupervisedNLL (the LM
    head on supervised rows only);
  - ours-ckpt: the same with gradient checkpointing (the paper preset).
Ours, beyond those (issue 24), composable in one name: `ours[-ckpt][-flex][-liger][@BUDGET]`:
  - -flex: FlexAttention with a document mask over the packed rows (tasks.attention: masked-off tiles skipped; CUDA);
  - -liger: Liger-Kernel's fused RMSNorm / SwiGLU / RoPE (tasks.fused_ops; CUDA, the package importable). Liger
    patches the model for good, so liger variants run after all others of the process;
  - @BUDGET: --micro-batch-tokens of this variant (default: the flag's value), e.g. ours-ckpt@4096.
Each row reports tokens/s, TF/s effective (6 x the backbone's matmul parameters, embeddings excluded, x real
tokens/s: the usual training-FLOPs convention, although the frozen base computes no weight gradients), the peak
memory, and tasks.memory_plan's estimate of it.
Each runs forward + backward over all micro-batches of the step and one AdamW step on a LoRA (r=8, alpha 32, q_proj
and v_proj, dropout 0 so that the gradients are comparable). Training tokens/s counts the sequences' real tokens
(padding excluded). The LoRA gradient of every variant is compared with today's (max |diff| / max |today|).

Lengths are real: each task's sequences are encoded with the model's tokenizer (the chat prompt, the answer) at
--max-length, and their (prompt, response) token counts saved as a profile (bench/results/training_profiles_*.json).
The token ids are random (seeded): speed and memory depend on the lengths only, and the workers then need neither
the data nor a tokenizer, so the same profile runs on a machine without the data.

    python bench/bench_training.py --data-dir ../shared/data/superni          # CPU: SmolLM2-135M fp32, max 512
    python bench/bench_training.py --sequences 16 ...    # what fits a shared 2-core CPU in 40 min (2 of today's
                                                          # micro-batches; the 64-sequence step is ~1 h of CPU time)
    python bench/bench_training.py --qwen3-8b --profiles P --in-process \\
        --variants today,ours-ckpt --max-length 1664 --micro-batch-tokens 16384   # GPU: Qwen3-8B-shaped, bf16

On CPU each variant runs in its own subprocess (clean peak RSS: the child's ru_maxrss, minus its RSS once the model
is loaded = the step's own memory). On a GPU, variants run one after the other in one process, with the peak of
torch.cuda.max_memory_allocated reset in between. Writes bench/results/training_<device>.{json,md}. Figures, never
pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from tasks.prompts import IGNORE_INDEX, Encoded, pad_batch  # noqa: E402
from tasks.train_batches import build_batch, plan_micro_batches, supervised_tokens  # noqa: E402
from tasks.train_step import SupervisedNLL, set_gradient_checkpointing, training_layout  # noqa: E402

VARIANTS = ("today", "ours", "ours-ckpt")  # + "ours-ckpt-flash": flash_attention_2 (varlen layout), when installed


# ----------------------------------------------------------------------------------------------------------------------
# Profiles: the (prompt, response) token counts of each task's first global batch.

def build_profiles(args) -> dict:
    import train_sapo
    from tasks.loaders import load_task
    from tasks.models import load_tokenizer

    tokenizer = load_tokenizer(None)  # SmolLM2's: also the GPU's proxy for Qwen3's (no tokenizer download there)
    config = train_sapo.Config(max_source_length=args.max_length - 128, max_target_length=128)
    profiles = {}
    for name in args.tasks:
        builtin = not name.startswith("task")
        task = load_task(name, None if builtin else args.data_dir, n_train=1000)
        split = "train" if "train" not in task.missing_splits else "dev"
        instances = task.split(split)[:1000]
        batch = train_sapo.global_batches(len(instances), args.sequences, 1, seed=42)[0]
        encoded = train_sapo.encode_training_set(tokenizer, task, task.instruction, [instances[i] for i in batch],
                                                 config)
        profiles[task.name] = [[e.num_prompt_tokens, len(e.input_ids) - e.num_prompt_tokens] for e in encoded]
    return profiles


def random_sequences(profile, vocab_size: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for prompt, response in profile:
        ids = [rng.randrange(vocab_size) for _ in range(prompt + response)]
        out.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# One variant: one optimizer step.

def load_bench_model(args):
    from peft import LoraConfig, get_peft_model

    arch = "qwen3-8b" if args.qwen3_8b else args.arch
    if arch:  # a real architecture's sizes (bench/random_model.py), random weights, built where it runs
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

        from random_model import ARCHS

        kind, sizes = ARCHS[arch]
        cuda = torch.cuda.is_available()
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            net = AutoModelForCausalLM.from_config((Qwen3Config if kind == "qwen3" else LlamaConfig)(**sizes),
                                                   dtype=torch.bfloat16 if cuda else torch.float32)
    else:
        from tasks.models import load_model

        net = load_model(args.model)
    net.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = get_peft_model(net, lora)
    with torch.no_grad():  # B = 0 at init would make every LoRA A gradient zero: nothing to compare
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model


def today_loss(model, encoded, micro, device):
    """The loop before issue 13 (train_sapo.train_task at d10c8bb), forward of one micro-batch."""
    input_ids = pad_batch([encoded[i].input_ids for i in micro], 0).to(device)
    labels = pad_batch([encoded[i].labels for i in micro], IGNORE_INDEX).to(device)
    attention_mask = pad_batch([[1] * len(encoded[i].input_ids) for i in micro], 0).to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def parse_variant(name: str, default_budget: int) -> tuple[str, int]:
    """'ours-ckpt-flex@8192' -> ('ours-ckpt-flex', 8192)."""
    base, _, budget = name.partition("@")
    return base, int(budget) if budget else default_budget


def run_variant(peft_model, encoded, variant: str, args) -> dict:
    from tasks.attention import set_training_attention
    from tasks.fused_ops import apply_fused_ops

    name = variant
    variant, budget = parse_variant(variant, args.micro_batch_tokens)
    device = next(peft_model.parameters()).device
    net = peft_model.get_base_model()
    batch = list(range(len(encoded)))
    total_tokens = supervised_tokens(encoded, batch)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    initial = [p.detach().clone() for p in trainable]  # put back afterwards: the next variant starts from the same
    if variant == "today":
        slots = -(-len(batch) // 8)  # train_sapo.micro_batches on one process: global batch / 8 slots, s::slots
        micro = [batch[s::slots] for s in range(slots)]
        forward_tokens = sum(len(m) * max(len(encoded[i].input_ids) for i in m) for m in micro)
        steps = [lambda m=m: today_loss(peft_model, encoded, m, device) for m in micro]
        layout = "padded"
    else:
        if "-liger" in variant and not getattr(net, "_sapo_liger", False):
            apply_fused_ops(net, "liger")
            net._sapo_liger = True
        elif "-liger" not in variant and getattr(net, "_sapo_liger", False):
            raise RuntimeError(f"{name}: the model was patched by an earlier liger variant")
        if variant.endswith("-flash"):
            net.set_attn_implementation("flash_attention_2")
        else:
            set_training_attention(net, "flex" if "-flex" in variant else "sdpa")
        layout = training_layout(net)
        step_module = SupervisedNLL(peft_model, layout)
        plan = plan_micro_batches([len(e.input_ids) for e in encoded], budget, 8, layout)
        forward_tokens = sum(m.tokens for m in plan)
        steps = [lambda m=m: step_module(build_batch(encoded, m.rows, 0).to(device)) for m in plan]
    estimated = None  # tasks.memory_plan's estimate of the peak, from a probe forward without checkpointing
    if variant != "today":
        from tasks.memory_plan import estimate_training_memory

        head_rows = max(supervised_tokens(encoded, [i for row in m.rows for i in row]) for m in plan)
        estimated = estimate_training_memory(step_module, net, max(m.tokens for m in plan),
                                             max(m.width for m in plan), device, head_rows
                                             ).peak(variant.startswith("ours-ckpt"))
    set_gradient_checkpointing(net, variant.startswith("ours-ckpt"))
    peft_model.train()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss_sum = 0.0
    try:
        for step in steps:
            loss = step()
            (loss / total_tokens).backward()
            loss_sum += loss.item()
        grads = torch.cat([p.grad.float().flatten() for p in trainable]).cpu()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        optimizer.zero_grad(set_to_none=True)
        result = {"variant": name, "budget": budget, "oom": str(e).split("\n")[0][:200],
                  "micro_batches": len(steps), "estimated_peak_bytes": estimated}
        steps.clear()  # the closures hold the batches
        if cuda:
            torch.cuda.empty_cache()
        set_gradient_checkpointing(net, False)
        return result
    seconds = time.perf_counter() - start
    # On a shared CPU the wall time includes waiting for the cores; the process CPU time does not (one thread, so
    # it is the work itself). On a GPU the host's CPU time says nothing: wall time.
    timed = seconds if cuda else time.process_time() - cpu_start
    with torch.no_grad():
        for p, p0 in zip(trainable, initial):
            p.copy_(p0)
    optimizer.zero_grad(set_to_none=True)
    set_gradient_checkpointing(net, False)
    real_tokens = sum(len(e.input_ids) for e in encoded)
    backbone = getattr(net, net.base_model_prefix)
    matmul_params = sum(p.numel() for p in backbone.parameters() if not p.requires_grad) - \
        backbone.get_input_embeddings().weight.numel()
    result = {"variant": name, "budget": budget, "layout": layout, "micro_batches": len(steps), "seconds": timed,
              "wall_seconds": seconds, "real_tokens": real_tokens, "forward_tokens": forward_tokens,
              "tokens_per_s": real_tokens / timed, "tf_per_s_effective": 6 * matmul_params * real_tokens / timed / 1e12,
              "estimated_peak_bytes": estimated,
              "loss": loss_sum / total_tokens, "grads": grads}
    if cuda:
        result.update(peak_bytes=torch.cuda.max_memory_allocated(), model_bytes=before,
                      step_peak_bytes=torch.cuda.max_memory_allocated() - before)
    else:
        result.update(peak_bytes=peak_rss_bytes(), model_bytes=before, step_peak_bytes=peak_rss_bytes() - before)
    return result


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def worker(args):
    """Run args.variants on every task of the profile file; JSON lines on stdout, gradients into args.grads_dir."""
    torch.set_num_threads(args.threads)
    profiles = json.loads(Path(args.profiles).read_text())
    peft_model = load_bench_model(args)
    vocab = peft_model.get_base_model().config.vocab_size
    if args.warmup:  # first-call costs (CUDA context, cuBLAS handles, kernel selection) outside the timed step
        run_variant(peft_model, random_sequences([[30, 4]] * 2, vocab), "ours", args)
    for task in args.tasks or profiles:
        encoded = random_sequences(profiles[task], vocab)
        for variant in sorted(args.variants, key=lambda v: "-liger" in v):  # liger patches for good: last
            try:
                result = run_variant(peft_model, encoded, variant, args)
            except Exception as e:  # noqa: BLE001 - one variant failing (a missing package, a compile error) is
                result = {"variant": variant, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          "micro_batches": 0}  # recorded, the next one runs
                print(f"variant {variant} failed: {result['failed']}", file=sys.stderr, flush=True)
            grads = result.pop("grads", None)
            if grads is not None:
                torch.save(grads, Path(args.grads_dir) / f"{task}.{variant}.pt")
            print("RESULT " + json.dumps({"task": task, **result}), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The parent: profiles, one subprocess per variant (CPU), the comparison, the files.

def device_name(args) -> str:
    if args.qwen3_8b or torch.cuda.is_available():
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    return f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread)"


def compare(results: list[dict], grads_dir: Path) -> list[dict]:
    """Gradients and speed of every variant against today's path of its task, or, where today's was not run, the
    first variant run for the task (the GPU suite's 8B part skips today's: it runs out of memory at task224)."""
    for r in results:
        same_task = [x for x in results if x["task"] == r["task"]]
        ref = next((x for x in same_task if x["variant"] == "today"), same_task[0])
        r["reference"] = ref["variant"]
        ref_path, path = grads_dir / f"{r['task']}.{ref['variant']}.pt", grads_dir / f"{r['task']}.{r['variant']}.pt"
        if r is not ref and ref_path.exists() and path.exists():
            got, expected = torch.load(path), torch.load(ref_path)
            r["grad_rel_diff_vs_today"] = ((got - expected).abs().max() / expected.abs().max()).item()
        if "seconds" in ref and "seconds" in r and r is not ref:
            r["speedup_vs_today"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["peak_ratio_vs_today"] = r["peak_bytes"] / ref["peak_bytes"]
            r["step_peak_ratio_vs_today"] = r["step_peak_bytes"] / ref["step_peak_bytes"]
    return results


def write_markdown(result: dict, out: Path) -> str:
    gb = 1e9
    md = [f"# Training step benchmark: {result['device']}", "",
          f"Model: {result['model']}; one optimizer step of {result['sequences']} sequences (max length "
          f"{result['max_length']}); ours: --micro-batch-tokens {result['micro_batch_tokens']}. Tokens/s count real "
          "tokens (padding excluded) per second of process CPU time on CPU (one thread: the work, not the waits of "
          "a shared machine; wall seconds in the JSON), of wall time on a GPU. Peak = process peak (CPU: max RSS; GPU: max allocated); step = peak minus the "
          "memory held once the model is loaded.", "",
          "x ref and the gradient difference compare with today's path, or without it with the task's first variant; "
          "est GB: tasks.memory_plan's estimate of the peak.", "",
          "| task | variant | budget | layout | micro-batches | forward tokens / real | s | tokens/s | TF/s eff | x ref "
          "| peak GB | est GB | step GB | step x ref | grad rel diff |", "|" + "---|" * 15]
    for r in result["results"]:
        if "oom" in r or "failed" in r:
            what = "out of memory" if "oom" in r else r["failed"]
            md.append(f"| {r['task']} | {r['variant']} | {r.get('budget', '')} | | {r['micro_batches']} | | {what} "
                      f"| | | | | {gb_or_blank(r.get('estimated_peak_bytes'))} | | | |")
            continue
        today = r["variant"] == r.get("reference", "today")  # its own row: 1 and 0; nothing to compare with: -

        def vs(key, fmt):
            return format(r[key], fmt) if key in r else ("1.00" if today else "-")
        md.append(f"| {r['task']} | {r['variant']} | {r.get('budget', '')} | {r['layout']} | {r['micro_batches']} | "
                  f"{r['forward_tokens'] / r['real_tokens']:.2f} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                  f"{r.get('tf_per_s_effective', 0):.3g} | {vs('speedup_vs_today', '.2f')} | "
                  f"{r['peak_bytes'] / gb:.2f} | {gb_or_blank(r.get('estimated_peak_bytes'))} | "
                  f"{r['step_peak_bytes'] / gb:.2f} | "
                  f"{vs('step_peak_ratio_vs_today', '.2f')} | "
                  f"{'0' if today else vs('grad_rel_diff_vs_today', '.1e')} |")
    text = "\n".join(md) + "\n"
    out.with_suffix(".md").write_text(text)
    write_csv(result, out.with_suffix(".csv"))
    return text


def gb_or_blank(value) -> str:
    return f"{value / 1e9:.2f}" if value else ""


CSV_FIELDS = ("task", "variant", "budget", "layout", "micro_batches", "seconds", "tokens_per_s", "tf_per_s_effective",
              "peak_bytes", "estimated_peak_bytes", "step_peak_bytes", "grad_rel_diff_vs_today", "reference", "oom",
              "failed")


def write_csv(result: dict, path: Path):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", *CSV_FIELDS], extrasaction="ignore")
        w.writeheader()
        for r in result["results"]:
            w.writerow({"device": result["device"], **r})


def headline(results: list[dict]) -> str:
    done = [r for r in results if "tokens_per_s" in r]
    if not done:
        return "HEADLINE: training: no variant finished"
    best = max(done, key=lambda r: r["tf_per_s_effective"])
    return (f"HEADLINE: training best {best['variant']} on {best['task'][:8]}: "
            f"{best['tokens_per_s']:.0f} tok/s, {best['tf_per_s_effective']:.3g} TF/s effective, peak "
            f"{best['peak_bytes'] / 1e9:.1f} GB (est {gb_or_blank(best.get('estimated_peak_bytes'))}); "
            f"{sum('oom' in r for r in results)} out of memory, {sum('failed' in r for r in results)} failed")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct (fp32)")
    p.add_argument("--qwen3-8b", action="store_true", help="a Qwen3-8B-shaped model, random weights, bf16, on CUDA")
    p.add_argument("--arch", default=None, help="a bench/random_model.py architecture (random weights; bf16 on CUDA, "
                                                 "else fp32 on CPU), e.g. tiny for a dry run")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "superni"))
    p.add_argument("--tasks", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="SuperNI tasks (task...) of --data-dir and built-in tasks (default: task224 and sentiment, "
                        "or every task of --profiles)")
    p.add_argument("--sequences", type=int, default=64, help="global batch (the paper: 64)")
    p.add_argument("--max-length", type=int, default=512, help="paper: 1664 (1536 + 128)")
    p.add_argument("--micro-batch-tokens", type=int, default=4096, help="ours: tokens per forward")
    p.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x], default=list(VARIANTS))
    p.add_argument("--profiles", default=None, help="a profile file to reuse (default: built from the data)")
    p.add_argument("--in-process", action="store_true", help="all variants in this process (GPU)")
    p.add_argument("--warmup", action="store_true", help="an untimed tiny step first (GPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: bench/results/training_<cpu|gpu>")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--grads-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    kind = "gpu" if args.qwen3_8b else "cpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"training_{kind}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profiles is None:
        args.tasks = args.tasks or ["task224_scruples_anecdotes_ethical_judgment", "sentiment"]
        args.profiles = str(out.with_name(out.name + "_profiles.json"))
        Path(args.profiles).write_text(json.dumps(build_profiles(args)) + "\n")
    profiled = list(json.loads(Path(args.profiles).read_text()))
    args.tasks = [t for t in profiled if not args.tasks or t in args.tasks]
    grads_dir = Path(args.grads_dir or tempfile.mkdtemp(prefix="bench_training_grads_"))
    command = [sys.executable, __file__, "--worker", "--profiles", args.profiles, "--grads-dir", str(grads_dir),
               "--max-length", str(args.max_length), "--micro-batch-tokens", str(args.micro_batch_tokens),
               "--threads", str(args.threads)] + (["--qwen3-8b"] if args.qwen3_8b else []) + \
        (["--model", args.model] if args.model else []) + (["--warmup"] if args.warmup else []) + \
        (["--arch", args.arch] if args.arch else [])
    # One task at a time, its variants side by side (each in its own process unless --in-process); the files are
    # rewritten after each, so an interrupted run keeps what it measured.
    jobs = [(args.tasks, args.variants)] if args.in_process else [([t], [v]) for t in args.tasks for v in args.variants]
    results = []
    for tasks, variants in jobs:
        run = subprocess.run(command + ["--variants", ",".join(variants), "--tasks", ",".join(tasks)],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        lines = [json.loads(x[7:]) for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        if run.returncode != 0 and not lines:
            print(run.stderr[-3000:])
            lines = [{"task": t, "variant": v, "failed": f"worker exit {run.returncode}", "micro_batches": 0}
                     for t in tasks for v in variants]
        for line in lines:
            print(json.dumps(line), flush=True)
        results += lines
        result = {"device": device_name(args), "model": "Qwen3-8B-shaped, random weights, bf16" if args.qwen3_8b
                  else f"{args.arch}-shaped, random weights" if args.arch
                  else (args.model or "SmolLM2-135M-Instruct fp32"), "sequences": args.sequences,
                  "max_length": args.max_length, "micro_batch_tokens": args.micro_batch_tokens,
                  "torch": torch.__version__, "results": compare(results, grads_dir)}
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        text = write_markdown(result, out)
    print(text)
    print(headline(results))


if __name__ == "__main__":
    main()
