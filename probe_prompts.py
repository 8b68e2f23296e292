"""The paper's analysis of training prompts: paraphrases of a training instruction give similar in-task results but
different forgetting and generalization; those cross-task effects correlate across tasks; indicators computed before
the update (first of all the pre-update loss) predict them. Paper Figures 1-4 and 15.

    accelerate launch probe_prompts.py                     # offline default: one pair, 8 candidates, 3 unseen tasks
    accelerate launch probe_prompts.py --pairs "sentiment->topic,animal->compare" --unseen capitals,arithmetic
    accelerate launch probe_prompts.py --preset paper --model Qwen/Qwen3-8B --data-dir ../shared/data/superni \
        --pairs "task195->task1310" --unseen task273,task224,task002 --candidates cands.json
    accelerate launch --num_processes 8 probe_prompts.py ...                     # several GPUs: the same numbers
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 probe_prompts.py ...   # 2 processes on CPU

The protocol, per training pair T1 -> T2, with a pool of K instructions for T2 (candidate 0 = the original) and a set
U of unseen tasks:
1. Train T1 with its original instruction: a LoRA exactly as train_sapo trains one -> state S1 (saved, then loaded).
2. Under S1, before any T2 update, compute every candidate's pre-update indicators (`Indicators`), and the gradient
   conflict of a few candidates (`Conflict`).
3. For each candidate p: train T2 from S1 with p (a new LoRA; the same recipe, seed and data order for every p), then
   evaluate T1 (forgetting), T2 (in-task, prompted with p) and every task of U (generalization, original instructions).
4. Analysis (no model): the relative change of each candidate's score against the original instruction's run,
   correlations across candidates between the tasks' scores, each indicator's correlation with the post-training
   scores, and the pool-size curve (what SAPO's pick gains as the pool grows).

Everything a pair computes is stored once under `<output dir>/<T1>--<T2>/` (`1-<T1>/` = S1, `indicators.json`,
`conflict.json`, `candidate-<k>/` = train_sapo's task folder: selection.json, adapter/, training.json, scores.json) and
loaded on a rerun; a rerun with other settings is refused (train_sapo.prepare_run_dir). The results: summary.json,
CSV tables and PNG figures in the output dir.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import io
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import evaluate
import score_prompts
import train_sapo
from tasks import IGNORE_INDEX, Encoded, SapoError, cli_main, pad_batch, render_prompt
from tasks.errors import exit_after_main
from tasks.flags import OneLineParser, Range, check_choices, check_ranges
from tasks.launch import accelerator_kwargs, check_accelerator, check_launch
from tasks.loaders import read_json, write_json, write_text_atomic
from tasks.models import activate_adapters, adapter_name, load_model, load_tokenizer, resolve, resolve_dtype
from tasks.prompts import encode_task_example
from tasks.run_dir import pool_hash
from tasks.statistics import (bootstrap_interval, flesch_kincaid_grade, nanmean, pearson, percentile_interval,
                              relative_change, spearman)

T2_INDEX = 1  # T2 is the second task of each pair: train_adapter seeds its LoRA with config.seed + 1


# ----------------------------------------------------------------------------------------------------------------------
# Configuration: train_sapo's Config (the training recipe) plus the study's own settings.

@dataclass
class ProbeConfig(train_sapo.Config):
    pairs: str = "sentiment->topic"  # training pairs T1->T2, comma-separated (quote the value: > is a shell operator)
    unseen: str = "animal,compare,capitals"  # unseen tasks U, evaluated after every T2 training (original instructions)
    zero_shot_instances: int = 4  # the zero-shot indicator: greedy ROUGE-L on the first N T2 training instances
    gradient_instances: int = 8  # gradient norm and conflict: the first N training instances of each task
    conflict_candidates: int = 5  # gradient conflict of the candidates at these many quantiles of the pre-update loss
    bootstrap: int = 1000  # bootstrap resamples of every interval
    confidence: float = 0.95  # level of every interval
    pool_subsets: int = 200  # pool-size curve: random pools per size (every pool when there are fewer)
    output_dir: str = "runs/probe"

    def pair_names(self) -> list[tuple[str, str]]:
        pairs = []
        for item in self.pairs.split(","):
            t1, arrow, t2 = item.strip().partition("->")
            if not arrow or not t1.strip() or not t2.strip() or t1.strip() == t2.strip():
                raise SapoError(f"--pairs: {item.strip()!r} is not T1->T2 with two different tasks")
            pairs.append((t1.strip(), t2.strip()))
        return pairs

    def unseen_names(self) -> list[str]:
        return [t.strip() for t in self.unseen.split(",") if t.strip()]


# demo: train_sapo's demo sizes with a quarter of its training steps per task (3 steps of 8 at 3x its learning rate)
# and 16 test instances per task: nine trainings and 45 task evaluations in about 15 minutes on a shared 2-core CPU.
# paper: train_sapo's paper preset (the original recipe), with the pairs and unseen tasks given on the command line.
PRESETS = {name: {k: v for k, v in values.items() if k not in ("sequence", "output_dir")}
           for name, values in train_sapo.PRESETS.items()}
PRESETS["demo"].update(train_instances=24, epochs=1, lr=3e-3, max_new_tokens=8, gradient_instances=4)
PRESETS["paper"].update(output_dir="runs/probe-paper")
# Allowed values of the numeric flags: train_sapo's, and the study's own.
RANGES = {**train_sapo.FLAG_RANGES, "zero_shot_instances": Range(1), "gradient_instances": Range(1),
          "conflict_candidates": Range(1), "bootstrap": Range(1), "confidence": Range(0, 1, True, True),
          "pool_subsets": Range(1)}
# train_sapo settings that do not apply here: the study picks the training instruction itself (every candidate).
NOT_FLAGS = {"preset", "sequence", "select", "race_first", "race_confidence", "reselect_every", "reselect_top",
             "eval_prompt", "report_to"}


def parse_config(argv=None) -> tuple[ProbeConfig, bool]:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="demo = small sizes (the default with the default model and the built-in tasks); "
                             "paper = the original recipe")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh when the output dir holds a study with other settings (moved aside)")
    source = inspect.getsource(train_sapo.Config) + inspect.getsource(ProbeConfig)
    comments = dict(re.findall(r"^    (\w+):[^#\n]*#\s*(.+)$", source, re.M))
    fields = [f for f in dataclasses.fields(ProbeConfig) if f.name not in NOT_FLAGS]
    for f in fields:
        base_type = f.type.split("|")[0].strip()
        allowed = f"; {RANGES[f.name]}" if f.name in RANGES else ""
        help_text = (comments.get(f.name, "") + f" (default: {f.default}{allowed})").strip().replace("%", "%%")
        kind = {"int": int, "float": float}.get(base_type, str)
        if base_type == "bool":
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=help_text)
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    preset = train_sapo.choose_preset(args.preset, given)  # demo on the offline setup, as train_sapo
    config = ProbeConfig(**{**PRESETS.get(preset, {}), **given, "preset": preset})
    names = list(dict.fromkeys([t for pair in config.pair_names() for t in pair] + config.unseen_names()))
    config.sequence = ",".join(names)  # every task of the study, loaded and checked by train_sapo.load_tasks
    config.select = "original"  # T1 trains with its original instruction; each T2 candidate is a fixed:K arm
    check_ranges(dataclasses.asdict(config), RANGES)
    # The study trains a new LoRA for T2 on top of S1's: lora-inc or o-lora.
    check_choices(dataclasses.asdict(config), {**train_sapo.CHOICES, "method": ("lora-inc", "o-lora")})
    config.pool_source().check()
    return config, args.overwrite


# ----------------------------------------------------------------------------------------------------------------------
# Per-candidate records.

def indicator(sign: int, definition: str):
    """A field of Indicators: `sign` * value is "higher = predicted better"."""
    return field(default=float("nan"), metadata={"sign": sign, "definition": definition})


@dataclass
class Indicators:
    """The pre-update indicators of one candidate p of T2, computed under S1 before any T2 update (raw values)."""

    pre_update_loss: float = indicator(-1, "token-weighted mean NLL of T2's response tokens, prompted with p, over "
                                           "its first score_instances training instances (SAPO's score)")
    pre_update_loss_instance_mean: float = indicator(-1, "the same NLL averaged per instance first, then over "
                                                         "instances")
    first_token_loss: float = indicator(-1, "NLL of the first response token, mean over the same instances")
    response_entropy: float = indicator(-1, "entropy (nats) of the predicted distribution at every response "
                                            "position, token-weighted mean over the same instances")
    instruction_loss: float = indicator(-1, "mean NLL of p's own tokens, read after the chat template's user "
                                            "header (how expected the instruction text is)")
    gradient_norm: float = indicator(-1, "L2 norm of the gradient of T2's token-weighted NLL (prompted with p, "
                                         "first gradient_instances instances) w.r.t. T2's freshly initialised LoRA")
    zero_shot_rouge: float = indicator(+1, "greedy ROUGE-L of S1 on the first zero_shot_instances T2 training "
                                           "instances, prompted with p")
    zero_shot_exact_match: float = indicator(+1, "exact match of those same answers (ours: an 11th)")
    length_tokens: float = indicator(-1, "p's length in tokens (the sign: shorter predicted better)")
    readability_grade: float = indicator(-1, "Flesch-Kincaid grade of p (tasks.statistics; lower = easier to read)")
    rouge_to_original: float = indicator(+1, "ROUGE-L F1 x 100 of p against the original instruction")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def sign(cls, name: str) -> int:
        return {f.name: f.metadata["sign"] for f in dataclasses.fields(cls)}[name]

    @classmethod
    def definition(cls, name: str) -> str:
        return {f.name: f.metadata["definition"] for f in dataclasses.fields(cls)}[name]


@dataclass
class Conflict:
    """Gradient conflict of one candidate (paper Fig. 4): per LoRA module, the cosine similarity between the gradient
    of T2's loss prompted with p and that of T1's loss (original instruction) or of an unseen task's, all w.r.t. T2's
    freshly initialised LoRA under S1."""

    candidate: int
    pre_update_loss: float
    modules: list[str]
    cosine_t1: list[float]
    cosine_unseen: list[float]
    unseen_task: str


@dataclass
class PairResult:
    """Everything the analysis reads about one pair T1 -> T2."""

    t1: str
    t2: str
    unseen: list[str]
    candidates: list[str]  # T2's pool, the original first
    indicators: list[Indicators]  # per candidate
    scores: list[dict[str, float]]  # per candidate: task -> ROUGE-L after training T2 with it
    conflict: list[Conflict]

    @property
    def label(self) -> str:
        return f"{self.t1}->{self.t2}"

    @property
    def cross_tasks(self) -> list[str]:
        """The tasks not being trained: T1 (forgetting) and U (generalization)."""
        return [self.t1, *self.unseen]

    def scores_on(self, task: str) -> list[float]:
        return [s[task] for s in self.scores]

    def relative(self, task: str) -> list[float]:
        """Each candidate's relative change on `task` against the original instruction's run (candidate 0)."""
        return [relative_change(s[task], self.scores[0][task]) for s in self.scores]

    def spread(self) -> dict[str, float]:
        """Per task (T2 first): the standard deviation over the paraphrases (candidates 1..K-1) of their relative
        change, the paper's first claim in one number per task (small in-task, large on the cross tasks)."""
        out = {}
        for task in [self.t2, *self.cross_tasks]:
            finite = [x for x in self.relative(task)[1:] if math.isfinite(x)]
            out[task] = float(np.std(finite)) if len(finite) > 1 else float("nan")
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Forward and backward passes of the indicators. Batches are fixed slices of the instance list, dealt round-robin to
# the processes and gathered (as score_prompts does), so the numbers do not depend on the number of processes.

@torch.no_grad()
def token_statistics(model, encoded, accelerator, batch_size=8) -> list[tuple[list[float], list[float]]]:
    """Per sequence: the NLL and the entropy (nats) of the prediction at every labelled position, in order.

    One plain forward per batch of right-padded sequences; position j's label is predicted from position j - 1.
    """
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    net = accelerator.unwrap_model(model)
    device = next(net.parameters()).device
    batches = [list(range(i, min(i + batch_size, len(encoded)))) for i in range(0, len(encoded), batch_size)]
    was_training = net.training
    net.eval()
    mine = []
    try:
        for b in batches[rank::world]:
            ids = pad_batch([encoded[i].input_ids for i in b], 0).to(device)
            mask = pad_batch([[1] * len(encoded[i].input_ids) for i in b], 0).to(device)
            log_p = torch.log_softmax(net(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
            for row, i in enumerate(b):
                positions = [j for j, t in enumerate(encoded[i].labels) if t != IGNORE_INDEX and j > 0]
                at = torch.tensor([j - 1 for j in positions], device=device)
                targets = torch.tensor([encoded[i].labels[j] for j in positions], device=device)
                lp = log_p[row, at]
                nll = (-lp.gather(1, targets[:, None])[:, 0]).tolist()
                entropy = (-(lp.exp() * lp).sum(-1)).tolist()
                mine.append((i, nll, entropy))
    finally:
        net.train(was_training)
    gathered = sorted(gather_object(mine) if world > 1 else mine)
    return [(nll, entropy) for _, nll, entropy in gathered]


def instruction_sequence(tokenizer, task, instruction: str) -> Encoded:
    """The instruction's tokens after the chat template's user header, labelled for `token_statistics`."""
    prompt = render_prompt(tokenizer, instruction, "", task.suffix, input_label=task.input_label)
    header = tokenizer(prompt[:prompt.index(instruction)], add_special_tokens=False)["input_ids"]
    own = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    return Encoded(header + own, [IGNORE_INDEX] * len(header) + own, len(header))


def lora_gradients(peft_model, encoded, accelerator, batch_size=8) -> dict[str, torch.Tensor]:
    """The gradient of sum(response NLL) / (response tokens) over `encoded` w.r.t. the trainable (LoRA) parameters,
    flattened per LoRA module (A and B together), float64 on the CPU. Dropout off: a function of the weights alone.
    Each process runs its share of the fixed batches; the sums are added up across processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    device = params[0][1].device
    total_tokens = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded)
    for _, p in params:
        p.grad = None
    was_training = peft_model.training
    peft_model.eval()
    try:
        batches = [list(range(i, min(i + batch_size, len(encoded)))) for i in range(0, len(encoded), batch_size)]
        for b in batches[rank::world]:
            ids = pad_batch([encoded[i].input_ids for i in b], 0).to(device)
            labels = pad_batch([encoded[i].labels for i in b], IGNORE_INDEX).to(device)
            mask = pad_batch([[1] * len(encoded[i].input_ids) for i in b], 0).to(device)
            logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                    labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                    reduction="sum")
            nll.backward()
    finally:
        peft_model.train(was_training)
    modules: dict[str, list[torch.Tensor]] = {}
    for name, p in params:  # every process reduces every parameter, in the same order
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if world > 1:
            grad = accelerator.reduce(grad.contiguous(), reduction="sum")
        modules.setdefault(name.split(".lora_")[0], []).append(grad.detach().double().cpu().flatten() / total_tokens)
        p.grad = None
    return {m: torch.cat(parts) for m, parts in modules.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------------
# The steps of a pair. Each loads its result when it is on disk.

def train_s1(run: train_sapo.Run, state: train_sapo.ModelState, t1, pair_dir: Path):
    """1. T1 trained with its original instruction (train_sapo's select_instruction/train_adapter): state -> S1."""
    t1_dir = pair_dir / f"1-{t1.name}"
    chosen = train_sapo.select_instruction(run, state, t1, t1_dir)
    train_sapo.train_adapter(run, state, 0, t1, chosen, t1_dir)


def fresh_t2_lora(run: train_sapo.Run, state: train_sapo.ModelState) -> str:
    """T2's LoRA as train_adapter initialises it (same seed, name and config), trainable; S1's adapters frozen."""
    from accelerate.utils import set_seed
    from peft import LoraConfig

    config = run.config
    name = adapter_name(len(state.adapter_dirs))
    set_seed(config.seed + T2_INDEX)
    state.peft_model.add_adapter(name, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                  lora_dropout=config.lora_dropout,
                                                  target_modules=config.lora_targets.split(","),
                                                  task_type="CAUSAL_LM"))
    activate_adapters(state.peft_model, [adapter_name(i) for i in range(len(state.adapter_dirs))] + [name],
                      trainable=name)
    return name


def back_to_s1(state: train_sapo.ModelState, s1_adapters: list[str]):
    """Drop every adapter added after S1 (a T2 LoRA): the state is S1 again, as loaded."""
    keep = [adapter_name(i) for i in range(len(s1_adapters))]
    for name in [n for n in state.peft_model.peft_config if n not in keep]:
        state.peft_model.delete_adapter(name)
    activate_adapters(state.peft_model, keep, trainable=None)
    state.adapter_dirs = list(s1_adapters)
    state.model = state.peft_model.get_base_model().eval()


def pre_update_indicators(run: train_sapo.Run, state: train_sapo.ModelState, t1, t2, unseen, pool: list[str],
                          pair_dir: Path) -> tuple[list[Indicators], list[Conflict]]:
    """2. Every candidate's indicators and the gradient conflict, under S1, before any T2 update."""
    config, accelerator, tokenizer = run.config, run.accelerator, run.tokenizer
    max_length = config.max_source_length + config.max_target_length
    split = train_sapo.training_split(t2, config)
    scored = t2.split(split)[:config.score_instances]
    progress = run.progress

    def encode(task, instruction, n):
        instances = task.split(train_sapo.training_split(task, config))[:n]
        return [encode_task_example(tokenizer, task, instruction, x, max_length) for x in instances]

    scores = score_prompts.score_candidates(
        state.model, tokenizer, t2, pool, scored, accelerator, token_budget=config.score_token_budget,
        max_length=max_length, cache_path=pair_dir / "score_cache.json", state_id=state.state_id(run),
        progress=progress)
    indicators = []
    for c, p in enumerate(pool):
        stats = token_statistics(state.model, encode(t2, p, config.score_instances), accelerator,
                                 config.micro_batch_size)
        instruction_nll = token_statistics(state.model, [instruction_sequence(tokenizer, t2, p)],
                                           accelerator)[0][0]
        zero_shot = evaluate.evaluate_task(state.model, tokenizer, t2, p, accelerator, split=split,
                                           max_instances=config.zero_shot_instances,
                                           batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens,
                                           max_prompt_tokens=config.max_source_length, progress=False)
        indicators.append(Indicators(
            pre_update_loss=scores.candidates[c].score,
            pre_update_loss_instance_mean=scores.candidates[c].instance_mean,
            first_token_loss=float(np.mean([nll[0] for nll, _ in stats])),
            response_entropy=math.fsum(e for _, entropy in stats for e in entropy) / sum(len(e) for _, e in stats),
            instruction_loss=float(np.mean(instruction_nll)),
            zero_shot_rouge=zero_shot["rougeL"], zero_shot_exact_match=zero_shot["exact_match"],
            length_tokens=len(tokenizer(p, add_special_tokens=False)["input_ids"]),
            readability_grade=flesch_kincaid_grade(p), rouge_to_original=evaluate.rouge_l(p, [t2.instruction])))

    # Gradients w.r.t. T2's fresh LoRA: every candidate's norm; the conflict for the candidates at the quantiles of
    # the pre-update loss (the lowest, the highest and evenly spaced ranks between them).
    fresh_t2_lora(run, state)
    reference_task = unseen[0] if unseen else None
    g_t1 = lora_gradients(state.peft_model, encode(t1, t1.instruction, config.gradient_instances), accelerator,
                          config.micro_batch_size)
    g_unseen = (lora_gradients(state.peft_model, encode(reference_task, reference_task.instruction,
                                                        config.gradient_instances), accelerator,
                               config.micro_batch_size) if reference_task else None)
    by_loss = sorted(range(len(pool)), key=lambda c: (indicators[c].pre_update_loss, c))
    quantiles = np.linspace(0, len(pool) - 1, min(config.conflict_candidates, len(pool)))
    chosen = sorted({by_loss[int(round(q))] for q in quantiles}, key=by_loss.index)
    conflict = []
    for c, p in enumerate(pool):
        g = lora_gradients(state.peft_model, encode(t2, p, config.gradient_instances), accelerator,
                           config.micro_batch_size)
        indicators[c].gradient_norm = math.sqrt(sum(float(v @ v) for v in g.values()))
        if c in chosen:
            modules = sorted(g)
            conflict.append(Conflict(candidate=c, pre_update_loss=indicators[c].pre_update_loss, modules=modules,
                                     cosine_t1=[cosine(g[m], g_t1[m]) for m in modules],
                                     cosine_unseen=[cosine(g[m], g_unseen[m]) if g_unseen else float("nan")
                                                    for m in modules],
                                     unseen_task=reference_task.name if reference_task else ""))
    conflict.sort(key=lambda x: chosen.index(x.candidate))
    back_to_s1(state, state.adapter_dirs)  # drop the fresh LoRA
    return indicators, conflict


def train_and_evaluate(run: train_sapo.Run, state: train_sapo.ModelState, t1, t2, c: int, pool, pair_dir: Path,
                       s1_adapters: list[str]) -> dict[str, float]:
    """3. T2 trained from S1 with candidate c (train_sapo's `--select fixed:c`), then T1, T2 (with c) and U
    evaluated; back to S1 afterwards."""
    cand_dir = pair_dir / f"candidate-{c:02d}"
    arm = dataclasses.replace(run, config=dataclasses.replace(run.config, select=f"fixed:{c}"))
    chosen = train_sapo.select_instruction(arm, state, t2, cand_dir)
    if chosen.selection.instruction != pool[c]:
        raise SapoError(f"{cand_dir}/selection.json holds another instruction than candidate {c} of the pool")
    train_sapo.train_adapter(run, state, T2_INDEX, t2, chosen, cand_dir)
    instructions = {t.name: t.instruction for t in run.tasks}
    instructions[t2.name] = pool[c]
    row = train_sapo.evaluate_row(run, state, cand_dir, f"after {t2.name} with candidate {c}", instructions)
    back_to_s1(state, s1_adapters)
    return {task: s["rougeL"] for task, s in row.scores.items()}


def probe_pair(config: ProbeConfig, accelerator, tokenizer, base, t1, t2, unseen, run_dir: Path) -> PairResult:
    """One training pair: S1, the indicators, one T2 training + evaluation per candidate. Nothing is computed twice:
    a pair whose files are all on disk does not even load the model."""
    pair_dir = run_dir / f"{t1.name}--{t2.name}"
    run = train_sapo.Run(config, accelerator, [t1, t2, *unseen], pair_dir, tokenizer, *base)
    stored = read_json(pair_dir / "indicators.json", default=None)
    state = None

    def s1() -> train_sapo.ModelState:
        nonlocal state
        if state is None:
            model = load_model(config.model, dtype=resolve_dtype(config.dtype, accelerator.device))
            train_sapo.check_lora_targets(model, config.lora_targets)
            state = train_sapo.ModelState(model=model.to(accelerator.device))
            train_s1(run, state, t1, pair_dir)
        return state

    if stored is None:
        pool = config.pool_source().build(t2, accelerator=accelerator, model=s1().model, tokenizer=tokenizer,
                                          state_id=s1().state_id(run), cache_path=run_dir / "paraphrases.json")
        if len(pool) < 2:
            raise SapoError(f"task {t2.name} has {len(pool)} candidate: the study needs a pool of 2 or more")
        indicators, conflict = pre_update_indicators(run, s1(), t1, t2, unseen, pool, pair_dir)
        # indicators.json last: it marks the step done (a kill in between recomputes both).
        run.save(pair_dir / "conflict.json", [dataclasses.asdict(x) for x in conflict])
        run.save(pair_dir / "indicators.json", {"candidates": pool,
                                                "indicators": [dataclasses.asdict(i) for i in indicators]})
    else:
        pool = stored["candidates"]
        indicators = [Indicators(**i) for i in stored["indicators"]]
        conflict = [Conflict(**x) for x in read_json(pair_dir / "conflict.json")]
    scores = []
    for c in range(len(pool)):
        done = read_json(pair_dir / f"candidate-{c:02d}" / "scores.json", default=None)
        if done is not None:
            scores.append({task: s["rougeL"] for task, s in done["scores"].items()})
            continue
        accelerator.print(f"{t1.name}->{t2.name}: candidate {c + 1}/{len(pool)}: {pool[c][:80]!r}")
        state = s1()
        scores.append(train_and_evaluate(run, state, t1, t2, c, pool, pair_dir, state.adapter_dirs[:1]))
    return PairResult(t1=t1.name, t2=t2.name, unseen=[u.name for u in unseen], candidates=pool,
                      indicators=indicators, scores=scores, conflict=conflict)


# ----------------------------------------------------------------------------------------------------------------------
# Analysis: pure functions of the pairs' results.

@dataclass
class Correlations:
    """Pairwise correlations across candidates between the scores on `tasks`, with bootstrap intervals."""

    tasks: list[str]
    matrix: list[list[float]]
    low: list[list[float]]
    high: list[list[float]]

    def mean_off_diagonal(self) -> float:
        n = len(self.tasks)
        return nanmean(self.matrix[i][j] for i in range(n) for j in range(n) if i != j)


def correlation_matrix(columns: list[list[float]], tasks: list[str], method, config: ProbeConfig) -> Correlations:
    """`method` (pearson or spearman) between every two columns (a task's scores over the candidates); intervals by
    resampling the candidates."""
    data = np.asarray(columns, dtype=np.float64)
    n = len(tasks)
    matrix = [[method(data[i], data[j]) for j in range(n)] for i in range(n)]
    low = [[float("nan")] * n for _ in range(n)]
    high = [[float("nan")] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        interval = bootstrap_interval(lambda idx: method(data[i][idx[0]], data[j][idx[0]]), [data.shape[1]],
                                      config.bootstrap, config.confidence, config.seed)
        low[i][j] = low[j][i] = interval[0]
        high[i][j] = high[j][i] = interval[1]
    return Correlations(tasks, matrix, low, high)


def indicator_correlation(pair: PairResult, name: str, method, candidates=None) -> float:
    """The correlation across candidates between an indicator (signed: higher = predicted better) and the post-training
    score on each cross task, averaged over those tasks: one number per pair."""
    idx = np.arange(len(pair.candidates)) if candidates is None else candidates
    values = Indicators.sign(name) * np.asarray([getattr(pair.indicators[c], name) for c in idx], dtype=np.float64)
    return nanmean(method(values, [pair.scores[c][task] for c in idx]) for task in pair.cross_tasks)


@dataclass
class IndicatorSummary:
    definition: str
    sign: int
    spearman: dict[str, float]  # pair -> the pair's mean correlation
    pearson: dict[str, float]
    mean: float  # of the pairs' Spearman correlations
    low: float
    high: float


def summarize_indicators(pairs: list[PairResult], config: ProbeConfig) -> dict[str, IndicatorSummary]:
    """Per indicator: each pair's mean correlation, their mean, and a bootstrap interval resampling the candidates
    within each pair (and the pairs, when there are several)."""
    out = {}
    for name in Indicators.names():
        per_pair = [indicator_correlation(p, name, spearman) for p in pairs]

        def statistic(idx):
            chosen = idx[0] if len(pairs) > 1 else [0]
            return nanmean(indicator_correlation(pairs[int(k)], name, spearman, idx[1 + int(k)]) for k in chosen)

        sizes = [len(pairs)] + [len(p.candidates) for p in pairs]
        low, high = bootstrap_interval(statistic, sizes, config.bootstrap, config.confidence, config.seed)
        out[name] = IndicatorSummary(definition=Indicators.definition(name), sign=Indicators.sign(name),
                                     spearman={p.label: r for p, r in zip(pairs, per_pair)},
                                     pearson={p.label: indicator_correlation(p, name, pearson) for p in pairs},
                                     mean=nanmean(per_pair), low=low, high=high)
    return out


def cross_task_performance(pair: PairResult) -> list[float]:
    """Per candidate: its relative change averaged over the cross tasks (those where the original scored > 0)."""
    changes = [pair.relative(task) for task in pair.cross_tasks]
    return [nanmean(change[c] for change in changes) for c in range(len(pair.candidates))]


@dataclass
class PoolPoint:
    k: int  # pool size (the original included)
    pools: int  # pools drawn (all of them when there are at most pool_subsets)
    picks: list[float]  # the picked candidate's cross-task performance, one per pool (every pair's pools together)


def pool_size_curve(losses: list[float], performance: list[float], sizes: list[int], subsets: int,
                    seed: int) -> list[PoolPoint]:
    """For each pool size k: pools of k candidates that hold the original (candidate 0) and k - 1 others, every such
    pool when there are at most `subsets` of them, else `subsets` random ones; in each, the lowest pre-update loss is
    picked (ties: the lower index, the original first), and the pick's performance recorded."""
    rng = np.random.default_rng(seed)
    others = list(range(1, len(losses)))
    points = []
    for k in sizes:
        if math.comb(len(others), k - 1) <= subsets:
            pools = [[0, *rest] for rest in itertools.combinations(others, k - 1)]
        else:
            pools = [[0, *rng.choice(others, size=k - 1, replace=False).tolist()] for _ in range(subsets)]
        picks = [performance[min(pool, key=lambda c: (losses[c], c))] for pool in pools]
        points.append(PoolPoint(k=k, pools=len(pools), picks=picks))
    return points


def pool_sizes(num_candidates: int) -> list[int]:
    """1, 2, 4, ... below K, then K."""
    return [2 ** i for i in range(num_candidates.bit_length()) if 2 ** i < num_candidates] + [num_candidates]


def any_candidate(pairs: list[PairResult]) -> float:
    """The pool-size curve's baseline: the cross-task performance of a candidate drawn at random (mean over all)."""
    return nanmean(x for p in pairs for x in cross_task_performance(p))


@dataclass
class PoolSummary:
    k: int
    mean: float  # mean over pools (and pairs) of the pick's cross-task relative change
    ci_low: float  # bootstrap interval of that mean (resampling the pools)
    ci_high: float
    spread_low: float  # the central `confidence` range of the picks themselves
    spread_high: float
    pools: int


def summarize_pool_size(pairs: list[PairResult], config: ProbeConfig) -> list[PoolSummary]:
    sizes = pool_sizes(min(len(p.candidates) for p in pairs))
    curves = [pool_size_curve([i.pre_update_loss for i in p.indicators], cross_task_performance(p), sizes,
                              config.pool_subsets, config.seed) for p in pairs]
    out = []
    for points in zip(*curves):
        picks = np.asarray([x for point in points for x in point.picks], dtype=np.float64)
        ci = bootstrap_interval(lambda idx: nanmean(picks[idx[0]]), [len(picks)], config.bootstrap, config.confidence,
                                config.seed)
        spread = percentile_interval(picks, config.confidence)
        out.append(PoolSummary(k=points[0].k, mean=nanmean(picks), ci_low=ci[0], ci_high=ci[1],
                               spread_low=spread[0], spread_high=spread[1], pools=len(picks)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: summary.json, CSV tables, figures, the printed summary.

RELATIVE_CHANGE = ("relative change of a candidate p on a task = (score_p - score_orig) / score_orig, where score_p is "
                   "the task's ROUGE-L after training T2 from S1 with p and score_orig the same with the original "
                   "instruction (candidate 0); undefined (null) when score_orig = 0. Correlations across candidates "
                   "are computed on the scores: the relative change is an increasing affine function of the score "
                   "for a fixed task, so its Pearson and Spearman correlations are the same")


def csv_text(header: list[str], rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def json_number(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def clean(obj):
    """NaN -> null, for strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return json_number(obj)


def write_outputs(run_dir: Path, config: ProbeConfig, pairs: list[PairResult], correlations: dict,
                  indicators: dict[str, IndicatorSummary], pool: list[PoolSummary]) -> dict:
    summary = {
        "relative_change": RELATIVE_CHANGE,
        "indicators": {name: dataclasses.asdict(s) for name, s in indicators.items()},
        **{method: {p.label: {**dataclasses.asdict(c), "mean_off_diagonal": c.mean_off_diagonal()}
                    for p, c in zip(pairs, correlations[method])} for method in ("pearson", "spearman")},
        "pool_size": [dataclasses.asdict(x) for x in pool],
        "pool_size_baseline": any_candidate(pairs),  # a candidate drawn at random
        "pairs": [{"pair": p.label, "t1": p.t1, "t2": p.t2, "unseen": p.unseen, "candidates": p.candidates,
                   "scores": p.scores, "relative_change": {t: p.relative(t) for t in [p.t2, *p.cross_tasks]},
                   "cross_task_performance": cross_task_performance(p), "relative_change_spread": p.spread(),
                   "conflict": [dataclasses.asdict(x) for x in p.conflict]} for p in pairs],
    }
    write_json(run_dir / "summary.json", clean(summary))
    names = Indicators.names()
    write_text_atomic(run_dir / "candidates.csv", csv_text(
        ["pair", "candidate", "instruction", *names, "task", "score", "relative_change"],
        [[p.label, c, p.candidates[c], *[getattr(p.indicators[c], n) for n in names], task, p.scores[c][task],
          p.relative(task)[c]] for p in pairs for c in range(len(p.candidates)) for task in [p.t2, *p.cross_tasks]]))
    write_text_atomic(run_dir / "correlations.csv", csv_text(
        ["pair", "method", "task_a", "task_b", "r", "low", "high"],
        [[p.label, method, a, b, c.matrix[i][j], c.low[i][j], c.high[i][j]]
         for method in ("pearson", "spearman") for p, c in zip(pairs, correlations[method])
         for (i, a), (j, b) in itertools.combinations(enumerate(c.tasks), 2)]))
    write_text_atomic(run_dir / "indicators.csv", csv_text(
        ["indicator", "sign", "pair", "spearman", "pearson", "definition"],
        [[n, s.sign, pair, s.spearman[pair], s.pearson[pair], s.definition] for n, s in indicators.items()
         for pair in s.spearman] + [[n, s.sign, "mean", s.mean, "", f"interval {s.low:.3f}..{s.high:.3f}"]
                                    for n, s in indicators.items()]))
    write_text_atomic(run_dir / "pool_size.csv", csv_text(
        [f.name for f in dataclasses.fields(PoolSummary)], [list(dataclasses.astuple(x)) for x in pool]))
    write_text_atomic(run_dir / "conflict.csv", csv_text(
        ["pair", "candidate", "pre_update_loss", "module", "cosine_t1", "cosine_unseen", "unseen_task"],
        [[p.label, x.candidate, x.pre_update_loss, m, a, b, x.unseen_task] for p in pairs for x in p.conflict
         for m, a, b in zip(x.modules, x.cosine_t1, x.cosine_unseen)]))
    return summary


def plot_figures(run_dir: Path, pairs: list[PairResult], correlations: dict, indicators: dict[str, IndicatorSummary],
                 pool: list[PoolSummary]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Heatmaps (Fig. 2): one row per pair, Pearson and Spearman.
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 4.2 * len(pairs)), squeeze=False)
    for row, pair in enumerate(pairs):
        for col, method in enumerate(("pearson", "spearman")):
            c, ax = correlations[method][row], axes[row][col]
            image = ax.imshow(np.asarray(c.matrix, dtype=float), vmin=-1, vmax=1, cmap="RdBu_r")
            labels = [f"{t} (T1)" if t == pair.t1 else t for t in c.tasks]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_yticks(range(len(labels)), labels)
            for i, j in itertools.product(range(len(labels)), repeat=2):
                ax.text(j, i, "n/a" if not math.isfinite(c.matrix[i][j]) else f"{c.matrix[i][j]:.2f}",
                        ha="center", va="center", fontsize=8)
            ax.set_title(f"{pair.label}: {method} (mean off-diag {c.mean_off_diagonal():.2f})", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(run_dir / "correlations.png", dpi=90)
    plt.close(fig)

    # Scatter plots (Fig. 1): relative change on every two tasks, one point per candidate (x = in-task first).
    for pair in pairs:
        tasks = [pair.t2, *pair.cross_tasks]
        n = len(tasks) - 1
        fig, axes = plt.subplots(n, n, figsize=(2.6 * n, 2.6 * n), squeeze=False)
        for i, j in itertools.product(range(n), repeat=2):
            ax = axes[i][j]
            if j > i:
                ax.axis("off")
                continue
            x, y = pair.relative(tasks[j]), pair.relative(tasks[i + 1])
            ax.scatter(x, y, s=14, c=["red"] + ["C0"] * (len(x) - 1))
            finite = [(a, b) for a, b in zip(x, y) if math.isfinite(a + b)]
            r = pearson(*zip(*finite)) if len(finite) > 1 else float("nan")
            ax.set_title(f"Pearson r={r:.2f}", fontsize=8)
            if i == n - 1:
                ax.set_xlabel(tasks[j] + (" (in-task)" if j == 0 else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel(tasks[i + 1] + (" (T1)" if i == 0 else ""), fontsize=8)
        fig.suptitle(f"{pair.label}: relative change (score_p - score_orig) / score_orig, one point per candidate "
                     "(red = the original)", fontsize=9)
        fig.tight_layout()
        fig.savefig(run_dir / f"scatter_{pair.t1}--{pair.t2}.png", dpi=80)
        plt.close(fig)

    # Indicators (Fig. 3): mean Spearman correlation with the cross-task scores, interval, and each pair's value.
    names = list(indicators)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    for y, name in enumerate(names):
        s = indicators[name]
        ax.errorbar([s.mean], [y], xerr=[[s.mean - s.low], [s.high - s.mean]] if math.isfinite(s.low) else None,
                    fmt="o", color="C0", capsize=3)
        ax.scatter(list(s.spearman.values()), [y] * len(s.spearman), color="C1", s=10, zorder=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # the first indicator (SAPO's) on top
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman r with the cross-task scores after training\n(signed: > 0 = the indicator predicts; "
                  "blue: mean and interval, orange: pairs)", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "indicators.png", dpi=90)
    plt.close(fig)

    # Gradient conflict (Fig. 4): per candidate, the per-module cosines with T1's and the unseen task's gradient.
    fig, axes = plt.subplots(len(pairs), 1, figsize=(8, 3.4 * len(pairs)), squeeze=False)
    for ax, pair in zip(axes[:, 0], pairs):
        unseen = pair.conflict[0].unseen_task if pair.conflict else ""
        for offset, key, color, label in ((-0.18, "cosine_t1", "C0", f"vs T1 ({pair.t1})"),
                                          (0.18, "cosine_unseen", "C1", f"vs unseen ({unseen})")):
            data = [[v for v in getattr(x, key) if math.isfinite(v)] for x in pair.conflict]
            spots = [k + offset for k, d in enumerate(data) if d]
            if spots:
                parts = ax.violinplot([d for d in data if d], positions=spots, widths=0.32, showmedians=True)
                for body in parts["bodies"]:
                    body.set_color(color)
                parts["bodies"][0].set_label(label)
        ax.set_xticks(range(len(pair.conflict)),
                      [f"c{x.candidate}\nloss {x.pre_update_loss:.3f}" for x in pair.conflict], fontsize=8)
        ax.set_title(f"{pair.label}: per-module cosine of the gradient of T2's loss with candidate p", fontsize=9)
        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "conflict.png", dpi=90)
    plt.close(fig)

    # Pool size (Fig. 15).
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [math.log2(x.k) for x in pool]  # 1, 2, 4, ... evenly spaced
    ax.plot(ks, [100 * x.mean for x in pool], "o-")
    ax.fill_between(ks, [100 * x.ci_low for x in pool], [100 * x.ci_high for x in pool], alpha=0.3)
    ax.set_xticks(ks, [str(x.k) for x in pool])
    ax.axhline(100 * any_candidate(pairs), color="grey", ls="--", lw=1, label="a candidate drawn at random")
    ax.legend(fontsize=8)
    ax.set_xlabel("pool size k (original included)")
    ax.set_ylabel("cross-task relative change of the pick (%)")
    fig.tight_layout()
    fig.savefig(run_dir / "pool_size.png", dpi=90)
    plt.close(fig)


def print_summary(run_dir: Path, pairs, correlations, indicators: dict[str, IndicatorSummary],
                  pool: list[PoolSummary]):
    print()
    for p in pairs:
        print(f"{p.label}: spread (std over paraphrases) of the relative change: "
              + ", ".join(f"{task}{' (in-task)' if task == p.t2 else ''} {100 * x:.1f}%"
                          for task, x in p.spread().items()))
    print(f"{'indicator':<31} {'mean Spearman':>13}  interval")
    for name, s in sorted(indicators.items(), key=lambda kv: -kv[1].mean if math.isfinite(kv[1].mean) else 9):
        print(f"{name:<31} {s.mean:>13.3f}  [{s.low:.3f}, {s.high:.3f}]")
    for method in ("pearson", "spearman"):
        print(f"{method} heatmap, mean off-diagonal: "
              + ", ".join(f"{p.label} {c.mean_off_diagonal():.3f}" for p, c in zip(pairs, correlations[method])))
    print("pool size k -> mean cross-task relative change of SAPO's pick: "
          + ", ".join(f"{x.k}: {100 * x.mean:+.1f}%" for x in pool) + f" (a random candidate: "
          f"{100 * any_candidate(pairs):+.1f}%)")
    print(f"results: {run_dir.resolve()}  (summary.json, *.csv, *.png, one folder per pair)")


# ----------------------------------------------------------------------------------------------------------------------
# The study.

@cli_main
def main(argv=None):
    config, overwrite = parse_config(argv)
    launch = check_launch("probe_prompts.py", training=train_sapo.training_recipe(config))
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(**accelerator_kwargs(launch))
    check_accelerator(accelerator, "probe_prompts.py", train_sapo.training_recipe(config),
                      resolve_dtype(config.dtype, accelerator.device))  # the launch as built, before any model loads
    accelerator.print(train_sapo.describe_preset(config))
    train_sapo.check_batch_split(config, accelerator.num_processes)
    set_seed(config.seed)
    names = config.sequence.split(",")
    tasks = dict(zip(names, train_sapo.load_tasks(config, accelerator)))  # bad names fail before any model loads
    base = resolve(config.model)
    key = train_sapo.run_key(config, list(tasks.values()), *base)
    if not config.generate:  # the T2 pools are inputs too: another pool is another study
        key.pools = {tasks[t2].name: pool_hash(config.pool_source().build(tasks[t2]))
                     for _, t2 in config.pair_names()}
    run_dir = train_sapo.prepare_run_dir(config, key, overwrite, accelerator)
    tokenizer = load_tokenizer(config.model)
    pairs = []
    for t1, t2 in config.pair_names():
        unseen = [tasks[u] for u in config.unseen_names() if u not in (t1, t2)]
        pairs.append(probe_pair(config, accelerator, tokenizer, base, tasks[t1], tasks[t2], unseen, run_dir))
    if accelerator.is_main_process:
        correlations = {method.__name__: [correlation_matrix([p.scores_on(t) for t in p.cross_tasks], p.cross_tasks,
                                                             method, config) for p in pairs]
                        for method in (pearson, spearman)}
        indicators = summarize_indicators(pairs, config)
        pool = summarize_pool_size(pairs, config)
        write_outputs(run_dir, config, pairs, correlations, indicators, pool)
        plot_figures(run_dir, pairs, correlations, indicators, pool)
        print_summary(run_dir, pairs, correlations, indicators, pool)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_after_main()
