"""Benchmark: how long a whole paper run (NI-Seq-C1 on Qwen3-8B) takes, from a few timed pieces of one.

On a random-weight model of the real architecture, built directly on the device (no CPU init, no download), with
synthetic token ids whose lengths are drawn from the real NI-Seq-C1 length table (bench/ni_seq_c1_lengths.json,
written by bench/ni_lengths.py from the SuperNI data with the SmolLM2 tokenizer: the data does not travel):

  1. selection of one task: 21 candidates x 250 instances through the scorer's own code (tasks.packing: shared-prefix
     packing, the fused head), timed whole;
  2. training: --train-steps optimizer steps of the paper's batch (64 sequences, LoRA r=8 alpha 32 on q/v, dropout 0.1,
     AdamW, --micro-batch-tokens 16384, --gradient-checkpointing auto as in the paper preset), through train_sapo's
     own planning and tasks.train_step.SupervisedNLL; the first step is a warm-up, the rest are timed;
  3. evaluation: --eval-batches batches of 16 test prompts per task (evaluate.py's batching: longest first), greedy
     generation stopped at the reference answer's token count + the end-of-turn token (a batch runs until its
     longest answer ends), and the worst case of 128 new tokens for every answer.

Then the extrapolation to the full run, 5 tasks x (selection, 10 epochs x 1000 instances, task611: its 650 dev
instances) and 6 rows of R (zero-shot + after each task), each over all 5 test sets:
  - selection of task t = measured seconds x (tokens task t's plan forwards / tokens the measured plan forwarded);
  - training of task t = measured seconds per forwarded token x the tokens of its steps (plans of sampled batches);
  - a row = sum over tasks of (batches of its test set) x (mean measured seconds of its batches).
Linear in tokens: attention's quadratic share is small at these lengths (mean 111-520 tokens). Writes
<out>/paper_run.json and <out>/paper_run.csv; the last line starts with HEADLINE.

    python bench/bench_paper_run.py --arch qwen3-8b --out bench/results/paper_run_h100      # GPU
    python bench/bench_paper_run.py --arch tiny --device cpu --dtype fp32 --candidates 3 --score-instances 8 \\
        --global-batch 8 --train-steps 2 --eval-batches 1 --eval-batch-size 4 --worst-case-tokens 8   # CPU dry run
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from random_model import ARCHS  # noqa: E402
from tasks.memory_plan import choose_checkpointing, estimate_training_memory, largest_micro_batch  # noqa: E402
from tasks.prompts import IGNORE_INDEX, Encoded  # noqa: E402
from tasks.train_batches import build_batch, plan_micro_batches, supervised_tokens  # noqa: E402
from tasks.train_step import SupervisedNLL, set_gradient_checkpointing, training_layout  # noqa: E402

EPOCHS, TRAIN_INSTANCES, SCORE_INSTANCES, CANDIDATES, GLOBAL_BATCH = 10, 1000, 250, 21, 64


@dataclass
class Piece:
    """One line of the breakdown: what was measured and what it extrapolates to for the whole run."""

    component: str
    measured: str
    measured_seconds: float
    full_run_seconds: float


class Lengths:
    """Draws (prompt, response) token counts of one task from the table."""

    def __init__(self, entry: dict, key: str, seed: int):
        self.pairs = [(p, r) for p, r, _ in entry[key]]
        self.weights = [n for _, _, n in entry[key]]
        self.rng = random.Random(seed)

    def draw(self, k: int) -> list[tuple[int, int]]:
        return self.rng.choices(self.pairs, self.weights, k=k)


def synthetic(pairs, vocab: int, rng: random.Random, prefix: list[int] | None = None) -> list[Encoded]:
    out = []
    for prompt, response in pairs:
        head = list(prefix or [])[:prompt]
        ids = head + [rng.randrange(3, vocab) for _ in range(prompt + response - len(head))]
        out.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    kind, sizes = ARCHS[args.arch]
    config = (Qwen3Config if kind == "qwen3" else LlamaConfig)(**sizes, pad_token_id=0, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: an 8B model's CPU init takes minutes
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    net.config.use_cache = False
    return net


# ----------------------------------------------------------------------------------------------------------------------
# 1. Selection

def selection_plan(entry, setup, vocab, args, seed):
    from tasks import packing

    rng = random.Random(seed)
    pairs = Lengths(entry, "train", seed).draw(args.score_instances)
    prefix = entry["shared_prefix"]
    encoded, lengths, prefixes = [], {}, {}
    for c in range(args.candidates):  # every candidate: its own instruction tokens, the same instances
        start = len(encoded)
        encoded += synthetic(pairs, vocab, rng, prefix=[rng.randrange(3, vocab) for _ in range(prefix)])
        lengths[c] = [(sid, len(encoded[sid].input_ids)) for sid in range(start, len(encoded))]
        prefixes[c] = packing.shared_prefix(encoded[start:])
    batches = packing.plan_batches(lengths, prefixes, args.score_token_budget, None, setup.attention_ratio,
                                   setup.packed)
    return encoded, batches, sum(len(rows) * rows[0].length for rows in batches)


def time_selection(net, entry, args, device):
    from tasks import packing

    setup = packing.scoring_setup(net)
    encoded, batches, tokens = selection_plan(entry, setup, net.config.vocab_size, args, seed=1)
    net.eval()
    with torch.inference_mode():
        packing.score_batch(net, setup, batches[-1], encoded, 0)  # warm-up: kernel compilation, allocator
        sync(device)
        start = time.perf_counter()
        for rows in batches:
            packing.score_batch(net, setup, rows, encoded, 0)
        sync(device)
    return time.perf_counter() - start, tokens, setup


# ----------------------------------------------------------------------------------------------------------------------
# 2. Training

def training_batches(entry, vocab, args, seed, steps):
    rng = random.Random(seed)
    draw = Lengths(entry, "train", seed)
    return [synthetic(draw.draw(args.global_batch), vocab, rng) for _ in range(steps)]


def forward_tokens(batches, layout, budget):
    return sum(m.tokens for b in batches for m in plan_micro_batches([len(e.input_ids) for e in b], budget, 8, layout))


def time_training(peft_model, net, entry, args, device):
    layout = training_layout(net)
    batches = training_batches(entry, net.config.vocab_size, args, 2, args.train_steps)
    step_module = SupervisedNLL(peft_model, layout)
    plans = [[(i, m) for i, m in enumerate(plan_micro_batches([len(e.input_ids) for e in b], args.micro_batch_tokens,
                                                               8, layout))] for b in batches]
    flat = [e for b in batches for e in b]  # largest_micro_batch indexes one list of sequences
    offsets = [sum(len(b) for b in batches[:s]) for s in range(len(batches))]
    steps = [[offsets[s] + p for p in range(len(b))] for s, b in enumerate(batches)]
    tokens, width, head_rows = largest_micro_batch(plans, flat, steps)
    estimate = estimate_training_memory(step_module, net, tokens, width, device, head_rows)
    checkpointing = choose_checkpointing(args.gradient_checkpointing, estimate)
    print(f"{estimate.describe()}: gradient checkpointing {'on' if checkpointing else 'off'} "
          f"(--gradient-checkpointing {args.gradient_checkpointing})", flush=True)
    set_gradient_checkpointing(net, checkpointing)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    peft_model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for s, encoded in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        total = supervised_tokens(encoded, range(len(encoded)))
        for _, micro in plans[s]:
            loss = step_module(build_batch(encoded, micro.rows, 0).to(device))
            (loss / total).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
    set_gradient_checkpointing(net, False)
    peft_model.eval()
    timed = seconds[1:] or seconds  # the first step compiles and allocates
    timed_batches = batches[1:] if len(seconds) > 1 else batches
    real = sum(len(e.input_ids) for b in timed_batches for e in b)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return dict(seconds_per_step=sum(timed) / len(timed), steps_timed=len(timed),
                forward_tokens=forward_tokens(timed_batches, layout, args.micro_batch_tokens), real_tokens=real,
                seconds=sum(timed), checkpointing="on" if checkpointing else "off",
                estimated_peak_bytes=estimate.peak(checkpointing), peak_bytes=peak, layout=layout)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Evaluation

def eval_batches(entry, vocab, args, seed):
    """Every batch of a task's test set, as evaluate.generate_answers cuts them (longest prompt first)."""
    rng = random.Random(seed)
    pairs = Lengths(entry, "test", seed).draw(entry["test_instances"])
    pairs.sort(key=lambda x: -x[0])
    prompts = [([rng.randrange(3, vocab) for _ in range(p)], a) for p, a in pairs]
    return [prompts[k:k + args.eval_batch_size] for k in range(0, len(prompts), args.eval_batch_size)]


def time_generation(net, batch, new_tokens, device):
    from transformers import GenerationConfig

    from tasks.prompts import pad_batch

    ids = pad_batch([p for p, _ in batch], 0, side="left").to(device)
    mask = pad_batch([[1] * len(p) for p, _ in batch], 0, side="left").to(device)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0, eos_token_id=None, use_cache=True)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = net.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    sync(device)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return time.perf_counter() - start


def time_evaluation(net, table, args, device, on_task=None):
    net.eval()
    net.config.use_cache = True
    per_task = {}
    warm = False
    for t, (name, entry) in enumerate(table["tasks"].items()):
        batches = eval_batches(entry, net.config.vocab_size, args, 10 + t)
        if args.eval_batches == 0:  # the whole row
            picks = list(range(len(batches)))
        else:  # spread over the test set, longest prompts to shortest
            picks = sorted({round(i * (len(batches) - 1) / max(args.eval_batches - 1, 1))
                            for i in range(min(args.eval_batches, len(batches)))})
        worst_picks = [picks[round(i * (len(picks) - 1) / max(args.worst_batches - 1, 1))]
                       for i in range(min(args.worst_batches, len(picks)))]
        if not warm:  # first-call costs outside the timings
            time_generation(net, batches[picks[0]][:2], 2, device)
            warm = True
        ref = [time_generation(net, batches[i], max(a for _, a in batches[i]) + 1, device) for i in picks]
        worst = [time_generation(net, batches[i], args.worst_case_tokens, device) for i in worst_picks]
        per_task[name] = dict(batches=len(batches), timed_batches=len(picks), reference_seconds=sum(ref),
                              worst_seconds=sum(worst), worst_timed_batches=len(worst),
                              row_reference_seconds=len(batches) * sum(ref) / len(ref),
                              row_worst_seconds=len(batches) * sum(worst) / len(worst))
        if on_task is not None:
            on_task(per_task)
    net.config.use_cache = False
    return per_task


# ----------------------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lengths", default=str(ROOT / "bench" / "ni_seq_c1_lengths.json"))
    p.add_argument("--task", default=None, help="the task whose selection and training are timed (default: first)")
    p.add_argument("--candidates", type=int, default=CANDIDATES)
    p.add_argument("--score-instances", type=int, default=SCORE_INSTANCES)
    p.add_argument("--score-token-budget", type=int, default=16384)
    p.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    p.add_argument("--train-steps", type=int, default=4, help="optimizer steps run (the first is a warm-up)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--gradient-checkpointing", choices=["on", "off", "auto"], default="auto")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="batches timed per task, spread over its test set; 0: all of them (a whole row of R)")
    p.add_argument("--worst-batches", type=int, default=1, help="of those, batches also timed at 128 new tokens")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--worst-case-tokens", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "paper_run"))
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    table = json.loads(Path(args.lengths).read_text())
    names = list(table["tasks"])
    measured_task = args.task or names[0]
    entry = table["tasks"][measured_task]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    net = build_model(args, device, dtype)
    sync(device)
    build_seconds = time.perf_counter() - start
    print(f"{args.arch}: {sum(p.numel() for p in net.parameters()) / 1e9:.2f}B parameters built on {device} in "
          f"{build_seconds:.1f} s", flush=True)

    partial = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arch": args.arch,
               "measured_task": measured_task, "build_seconds": build_seconds, "complete": False}

    def save_partial(**kwargs):  # after each piece: a part stopped by its timeout keeps what it measured
        partial.update(kwargs)
        (out / "paper_run.json").write_text(json.dumps(partial, indent=1) + "\n")

    # 1. Selection, before any adapter (as the first task's is).
    sel_seconds, sel_tokens, setup = time_selection(net, entry, args, device)
    save_partial(selection_seconds=sel_seconds, selection_tokens_forwarded=sel_tokens)
    print(f"selection of {measured_task}: {args.candidates} x {args.score_instances} in {sel_seconds:.1f} s "
          f"({sel_tokens} tokens forwarded)", flush=True)

    # 2. Training.
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(net, lora)
    train = time_training(peft_model, net, entry, args, device)
    backbone = getattr(net, net.base_model_prefix)
    matmul_params = sum(p.numel() for p in backbone.parameters()) - backbone.get_input_embeddings().weight.numel()
    tokens_per_s = train["real_tokens"] / train["seconds"]
    train["tokens_per_s"], train["tf_per_s_effective"] = tokens_per_s, 6 * matmul_params * tokens_per_s / 1e12
    save_partial(training=train)
    print(f"training: {train['seconds_per_step']:.2f} s per step of {args.global_batch} ({train['steps_timed']} timed, "
          f"checkpointing {train['checkpointing']}), {tokens_per_s:.0f} tokens/s, "
          f"{train['tf_per_s_effective']:.0f} TF/s effective", flush=True)

    # 3. Evaluation (the adapter active, as in every row after the first).
    evaluation = time_evaluation(peft_model.get_base_model(), table, args, device,
                                 on_task=lambda done: save_partial(evaluation=done))
    row_ref = sum(e["row_reference_seconds"] for e in evaluation.values())
    row_worst = sum(e["row_worst_seconds"] for e in evaluation.values())
    print(f"one row of R: {row_ref:.1f} s (answers stopped at the reference length + end-of-turn), {row_worst:.1f} s "
          f"({args.worst_case_tokens} new tokens each)", flush=True)

    # Extrapolation to the whole run: plans of every task at the paper's sizes (no model run needed).
    full_args = argparse.Namespace(**{**vars(args), "candidates": CANDIDATES, "score_instances": SCORE_INSTANCES,
                                      "global_batch": GLOBAL_BATCH})
    measured_sel_tokens = selection_plan(entry, setup, net.config.vocab_size, args, seed=1)[2]
    selection_full, training_full = 0.0, 0.0
    per_forward_token = train["seconds"] / train["forward_tokens"]
    tasks = {}
    for t, name in enumerate(names):
        e = table["tasks"][name]
        sel_t = sel_seconds * selection_plan(e, setup, net.config.vocab_size, full_args, seed=1)[2] / measured_sel_tokens
        n_train = min(TRAIN_INSTANCES, e["train_instances"])
        steps = EPOCHS * math.ceil(n_train / GLOBAL_BATCH)
        sample = training_batches(e, net.config.vocab_size, full_args, 20 + t, 16)
        train_t = per_forward_token * forward_tokens(sample, train["layout"], args.micro_batch_tokens) / 16 * steps
        tasks[name] = dict(selection_seconds=sel_t, training_steps=steps, training_seconds=train_t)
        selection_full += sel_t
        training_full += train_t
    rows = len(names) + 1
    pieces = [
        Piece("selection", f"{measured_task}: {args.candidates} x {args.score_instances}", sel_seconds, selection_full),
        Piece("training", f"{measured_task}: {train['steps_timed']} steps of {args.global_batch}", train["seconds"],
              training_full),
        Piece("evaluation (reference length)", f"{sum(e['timed_batches'] for e in evaluation.values())} batches",
              sum(e["reference_seconds"] for e in evaluation.values()), rows * row_ref),
        Piece(f"evaluation ({args.worst_case_tokens} tokens)",
              f"{sum(e['worst_timed_batches'] for e in evaluation.values())} batches",
              sum(e["worst_seconds"] for e in evaluation.values()), rows * row_worst),
    ]
    total_ref = selection_full + training_full + rows * row_ref
    total_worst = selection_full + training_full + rows * row_worst
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arch": args.arch,
              "dtype": args.dtype, "torch": torch.__version__, "lengths": table["tokenizer"],
              "build_seconds": build_seconds, "training": train, "evaluation": evaluation, "tasks": tasks,
              "pieces": [asdict(x) for x in pieces], "rows": rows, "total_seconds_reference": total_ref,
              "total_seconds_worst_case": total_worst, "args": vars(args), "measured_task": measured_task,
              "complete": True}
    (out / "paper_run.json").write_text(json.dumps(result, indent=1) + "\n")
    with open(out / "paper_run.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["component", "measured", "measured_seconds", "full_run_seconds"])
        for x in pieces:
            w.writerow([x.component, x.measured, f"{x.measured_seconds:.3f}", f"{x.full_run_seconds:.1f}"])
        w.writerow(["total (reference-length answers)", "", "", f"{total_ref:.1f}"])
        w.writerow([f"total ({args.worst_case_tokens}-token answers)", "", "", f"{total_worst:.1f}"])
    print("\n| component | measured | s | full run, min |\n|---|---|---|---|")
    for x in pieces:
        print(f"| {x.component} | {x.measured} | {x.measured_seconds:.1f} | {x.full_run_seconds / 60:.1f} |")
    print(f"| total | reference-length answers | | {total_ref / 60:.1f} |")
    print(f"| total | {args.worst_case_tokens}-token answers | | {total_worst / 60:.1f} |")
    print(f"HEADLINE: full NI-Seq-C1 run ({args.arch}) {total_ref / 60:.1f} min: selection {selection_full / 60:.1f}, "
          f"training {training_full / 60:.1f}, evaluation {rows * row_ref / 60:.1f} ({total_worst / 60:.1f} min with "
          f"{args.worst_case_tokens}-token answers); training {train['tf_per_s_effective']:.3g} TF/s effective")


if __name__ == "__main__":
    main()
