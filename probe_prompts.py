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
loaded on a rerun; a rerun with other settings is refused (tasks.run_dir.open_run_dir_on_every_process). The
results: summary.json, CSV tables and PNG figures in the output dir.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import evaluate
import score_prompts
import train_sapo
from tasks import IGNORE_INDEX, Encoded, SapoError, cli_main, pad_batch, render_prompt
from tasks.errors import exit_after_main
from tasks.flags import OneLineParser, Range, add_config_flags, check_choices, check_ranges, given_flags
from tasks.launch import accelerator_kwargs, check_accelerator, check_launch
from tasks.loaders import write_json, write_text_atomic
from tasks.records import json_safe, read_record
from tasks.models import activate_adapters, adapter_name, load_model, load_tokenizer, resolve, resolve_dtype
from tasks.prompts import encode_task_example
from tasks.run_dir import open_run_dir_on_every_process, pool_hash
from tasks.score_cache import model_state_id
from tasks.sharding import lockstep, shard_for_inference
from tasks.statistics import (bootstrap_interval, bootstrap_samples, fisher_z_pool, flesch_kincaid_grade, nanmean,
                              pearson, percentile_interval, relative_change, spearman, variance_decomposition)

T2_INDEX = 1  # T2 is the second task of each pair: train_adapter seeds its LoRA with config.seed + 1


# ----------------------------------------------------------------------------------------------------------------------
# Configuration: train_sapo's Config (the training recipe) plus the study's own settings.

@dataclass
class ProbeConfig(train_sapo.Config):
    pairs: str = "sentiment->topic"  # training pairs T1->T2, comma-separated (quote the value: > is a shell operator)
    unseen: str = "animal,compare,capitals"  # unseen tasks U, evaluated after every T2 training (original instructions)
    zero_shot_instances: int | None = None  # zero-shot indicators: the first N training instances; None = score_instances
    gradient_instances: int | None = None  # gradient norm and conflict on the first N instances; None = score_instances
    seeds: int = 2  # ours: each (pair, candidate) arm trained with S seeds (T2's LoRA init, data order, dropout)
    permutations: int = 1000  # ours: permutations of the noise-floor test (candidate vs seed variance)
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


# demo: train_sapo's demo sizes with a quarter of its training steps per task (3 steps of 8 at 3x its learning rate),
# 6 candidates x 2 seeds (the noise floor needs 2) and 12 test instances per task: 13 trainings and 48 task
# evaluations.
# paper: train_sapo's paper preset (the original recipe), with the pairs and unseen tasks given on the command line.
PRESETS = {name: {k: v for k, v in values.items() if k not in ("sequence", "output_dir")}
           for name, values in train_sapo.PRESETS.items()}
PRESETS["demo"].update(train_instances=24, epochs=1, lr=3e-3, max_new_tokens=8, max_candidates=6, eval_instances=12)
PRESETS["paper"].update(output_dir="runs/probe-paper")
# Allowed values of the numeric flags: train_sapo's, and the study's own.
RANGES = {**train_sapo.FLAG_RANGES, "zero_shot_instances": Range(1), "gradient_instances": Range(1),
          "seeds": Range(1), "permutations": Range(0),
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
    flags = add_config_flags(parser, ProbeConfig, RANGES, skip=NOT_FLAGS)  # help: the fields' comments (tasks/flags.py)
    args = parser.parse_args(argv)
    given = given_flags(args, flags)
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

def indicator(sign: int, definition: str, model: bool = True):
    """A field of Indicators: `sign` * value is "higher = predicted better"; `model`: computed with a model (so once
    under S1, state-adaptive, and once under the base model, static), else from the text alone."""
    return field(default=float("nan"), metadata={"sign": sign, "definition": definition, "model": model})


@dataclass
class Indicators:
    """The pre-update indicators of one candidate p of T2, computed before any T2 update (raw values), under S1
    (state-adaptive, SAPO's premise) or under the base model with S1's adapters disabled (static)."""

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
                                         "first gradient_instances instances) w.r.t. the base weights of the LoRA "
                                         "target modules (q_proj, v_proj), the scoring state's adapters active")
    zero_shot_rouge: float = indicator(+1, "greedy ROUGE-L on the first zero_shot_instances T2 training "
                                           "instances, prompted with p")
    zero_shot_exact_match: float = indicator(+1, "exact match of those same answers (ours: an 11th)")
    length_tokens: float = indicator(-1, "p's length in tokens (the sign: shorter predicted better)", model=False)
    readability_grade: float = indicator(-1, "Flesch-Kincaid grade of p (tasks.statistics; lower = easier to read)",
                                         model=False)
    rouge_to_original: float = indicator(+1, "ROUGE-L F1 x 100 of p against the original instruction", model=False)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def sign(cls, name: str) -> int:
        return {f.name: f.metadata["sign"] for f in dataclasses.fields(cls)}[name]

    @classmethod
    def definition(cls, name: str) -> str:
        return {f.name: f.metadata["definition"] for f in dataclasses.fields(cls)}[name]

    @classmethod
    def model_names(cls) -> list[str]:
        """The indicators computed with a model (static and state-adaptive versions exist)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata["model"]]


@dataclass
class Conflict:
    """Gradient conflict of one candidate (paper Fig. 4): per LoRA target module, the cosine similarity between the
    gradient of T2's loss prompted with p and that of T1's loss (original instruction) or of an unseen task's, all
    w.r.t. the module's base weight under S1 (see weight_gradients)."""

    candidate: int
    pre_update_loss: float
    modules: list[str]
    cosine_t1: list[float]
    cosine_unseen: list[float]
    unseen_task: str


@dataclass
class StoredIndicators:
    """indicators.json: a pair's candidate pool and each candidate's indicators (written last: the step is done)."""

    candidates: list[str]
    instances: dict[str, int]  # indicator -> the number of T2 instances it is computed on
    indicators: list[Indicators]  # under S1 (state-adaptive)
    static: list[Indicators]  # under the base model


PAIR_ADVICE = "delete it and the pair's conflict.json and indicators.json to compute them again"


@dataclass
class PairResult:
    """Everything the analysis reads about one pair T1 -> T2."""

    t1: str
    t2: str
    unseen: list[str]
    candidates: list[str]  # T2's pool, the original first
    indicators: list[Indicators]  # per candidate, under S1 (state-adaptive)
    scores: list[dict[str, float]]  # per candidate: task -> ROUGE-L after training T2 with it (mean over seeds)
    conflict: list[Conflict]
    static: list[Indicators] | None = None  # per candidate, under the base model (static); None = not computed
    seed_scores: list[list[dict[str, float]]] | None = None  # per candidate, per seed: task -> ROUGE-L
    instances: dict[str, int] = field(default_factory=dict)  # indicator -> the instances it was computed on

    def __post_init__(self):
        if self.seed_scores is None:
            self.seed_scores = [[s] for s in self.scores]

    @property
    def label(self) -> str:
        return f"{self.t1}->{self.t2}"

    def relative_table(self, task: str) -> np.ndarray | None:
        """K x S: each (candidate, seed) run's relative change on `task` against the original's mean over its seeds
        (one fixed reference per task: the table is the scores rescaled); None when that mean is 0."""
        reference = self.scores[0][task]
        if not reference:
            return None
        return np.asarray([[run[task] / reference - 1 for run in runs] for runs in self.seed_scores])

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
    device = accelerator.device if lockstep(net) else next(net.parameters()).device
    batches = [list(range(i, min(i + batch_size, len(encoded)))) for i in range(0, len(encoded), batch_size)]
    was_training = net.training
    net.eval()
    mine = []
    try:
        for b, discarded in my_rounds(batches, rank, world, lockstep(net)):
            ids = pad_batch([encoded[i].input_ids for i in b], 0).to(device)
            mask = pad_batch([[1] * len(encoded[i].input_ids) for i in b], 0).to(device)
            log_p = torch.log_softmax(net(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
            if discarded:
                continue
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


def my_rounds(batches: list, rank: int, world: int, sharded: bool) -> list[tuple[list, bool]]:
    """This process's batches (rank, rank + world, ...) as (batch, discarded) pairs. Sharded (ZeRO-3, where every
    forward gathers weights collectively): as many rounds on every process, a process without a batch left running
    the last one, discarded (as score_prompts does)."""
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world) if sharded else len(mine)
    return [(mine[r], False) if r < len(mine) else (batches[-1], True) for r in range(rounds)]


def instruction_sequence(tokenizer, task, instruction: str) -> Encoded:
    """The instruction's tokens after the chat template's user header, labelled for `token_statistics`."""
    prompt = render_prompt(tokenizer, instruction, "", task.suffix, input_label=task.input_label)
    header = tokenizer(prompt[:prompt.index(instruction)], add_special_tokens=False)["input_ids"]
    own = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    return Encoded(header + own, [IGNORE_INDEX] * len(header) + own, len(header))


def target_linears(model, targets: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(module name, linear layer) of every linear layer whose name ends with a target (q_proj, v_proj): the layer
    itself in a plain model, its `base_layer` inside a LoRA layer (the name without ".base_layer")."""
    out = []
    for name, module in model.named_modules():
        key = name.removesuffix(".base_layer")
        if isinstance(module, torch.nn.Linear) and any(key == t or key.endswith("." + t) for t in targets) and \
                (name.endswith(".base_layer") or not hasattr(module, "base_layer")):
            out.append((key, module))
    return out


def target_weights(model, targets: list[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """(module name, base weight) of every target linear layer (target_linears)."""
    return [(name, module.weight) for name, module in target_linears(model, targets)]


@dataclass
class GradientReduction:
    """Per target module m, of the gradient G_m of one loss w.r.t. the module's base weight: ||G_m||^2 and the dot
    products <G_m, R_m> with each reference gradient R (T1's, an unseen task's); `full` holds G itself only when asked
    (the references), so a candidate costs a few numbers per module, never a copy of the weights."""

    norm2: dict[str, float]
    dots: dict[str, dict[str, float]]  # reference name -> module -> <G_m, R_m>
    full: dict[str, torch.Tensor] | None = None

    @property
    def norm(self) -> float:
        return math.sqrt(math.fsum(self.norm2.values()))

    def cosines(self, reference: str, reference_norm2: dict[str, float]) -> dict[str, float]:
        out = {}
        for m, dot in self.dots[reference].items():
            denominator = math.sqrt(self.norm2[m] * reference_norm2[m])
            out[m] = dot / denominator if denominator > 0 else float("nan")
        return out


def weight_gradients(model, encoded, accelerator, targets: list[str], batch_size=8,
                     references: dict[str, dict[str, torch.Tensor]] | None = None,
                     keep: bool = False) -> GradientReduction:
    """The gradient of sum(response NLL) / (response tokens) over `encoded` w.r.t. the base weights of the target
    modules (target_weights), with every active adapter of `model` in the forward; dropout off, so it is a function
    of the weights alone. Taken per module from its input and its output's gradient (no parameter requires grad
    meanwhile; every flag is put back afterwards), so it works on ZeRO-3's partitioned weights alike. Each process
    runs its share of the fixed batches (sharded: as many on every process); the per-module sums are added up across
    processes. Reduced per module (GradientReduction): norms in float64, dots with `references`; `keep` returns the
    gradients too (float32, on the model's device).

    Why the base weights (ours, README): for a LoRA on W, W_eff = W + s B A, so dL/dW = dL/dW_eff = G, and the LoRA's
    own gradients are projections of it: dL/dB = s G A^T, dL/dA = s B^T G. With a fresh LoRA (B = 0) dL/dA is 0 and
    dL/dB a random projection of G; G is the object both are made from, the direction full fine-tuning would take."""
    rank, world = accelerator.process_index, accelerator.num_processes
    net = accelerator.unwrap_model(model)
    linears = target_linears(net, targets)
    if not linears:
        raise SapoError(f"no linear module named {', '.join(targets)} to take gradients of")
    sharded = lockstep(net)
    device = accelerator.device if sharded else linears[0][1].weight.device
    total_tokens = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded)
    # G_m = dL/dW_m = sum over positions of dY_m^T X_m (Y_m = X_m W_m^T), taken from the layer's input and its
    # output's gradient: the weights themselves are never read (under ZeRO-3 they are partitioned outside their
    # module's forward) and no parameter requires grad; the embeddings' output does, so the backward runs.
    sums: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args, output):
            x = args[0].detach()

            def add(dy):
                g = dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                sums[name] = sums[name] + g if name in sums else g
            if output.requires_grad:
                output.register_hook(add)
        return hook

    flags = {id(p): p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    hooks = [module.register_forward_hook(capture(name)) for name, module in linears]
    hooks.append(net.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    was_training = net.training
    net.eval()
    try:
        batches = [list(range(i, min(i + batch_size, len(encoded)))) for i in range(0, len(encoded), batch_size)]
        for b, discarded in my_rounds(batches, rank, world, sharded):
            ids = pad_batch([encoded[i].input_ids for i in b], 0).to(device)
            labels = pad_batch([encoded[i].labels for i in b], IGNORE_INDEX).to(device)
            mask = pad_batch([[1] * len(encoded[i].input_ids) for i in b], 0).to(device)
            logits = net(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                    labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                    reduction="sum")
            (nll * 0.0 if discarded else nll).backward()  # a discarded batch adds zeros (its backward gathers too)
        out = GradientReduction(norm2={}, dots={r: {} for r in references or {}}, full={} if keep else None)
        for name, module in linears:  # every process reduces every module, in the same order
            grad = sums.pop(name, None)
            if grad is None:
                grad = torch.zeros(module.out_features, module.in_features, device=device)
            if world > 1:
                grad = accelerator.reduce(grad.contiguous(), reduction="sum")
            grad = grad.detach().float() / total_tokens
            out.norm2[name] = float(grad.double().square().sum())
            for r, reference in (references or {}).items():
                out.dots[r][name] = float((grad.double() * reference[name].double()).sum())
            if keep:
                out.full[name] = grad
            del grad
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
        for p in net.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The steps of a pair. Each loads its result when it is on disk.

def train_s1(run: train_sapo.Run, state: train_sapo.ModelState, t1, pair_dir: Path):
    """1. T1 trained with its original instruction (train_sapo's select_instruction/train_adapter): state -> S1."""
    t1_dir = pair_dir / f"1-{t1.name}"
    chosen = train_sapo.select_instruction(run, state, t1, t1_dir)
    train_sapo.train_adapter(run, state, 0, t1, chosen, t1_dir)


@contextlib.contextmanager
def static_model(state: train_sapo.ModelState):
    """The base model inside `state`: every LoRA layer bypassed (peft's disable_adapter_layers) while in the block,
    so the same forward computes the static indicators."""
    if state.peft_model is None:
        yield
        return
    state.peft_model.base_model.disable_adapter_layers()
    try:
        yield
    finally:
        state.peft_model.base_model.enable_adapter_layers()


def back_to_s1(state: train_sapo.ModelState, s1_adapters: list[str]):
    """Drop every adapter added after S1 (a T2 LoRA): the state is S1 again, as loaded."""
    keep = [adapter_name(i) for i in range(len(s1_adapters))]
    for name in [n for n in state.peft_model.peft_config if n not in keep]:
        state.peft_model.delete_adapter(name)
    activate_adapters(state.peft_model, keep, trainable=None)
    state.adapter_dirs = list(s1_adapters)
    state.model = state.peft_model.get_base_model().eval()


def model_indicators(run: train_sapo.Run, state: train_sapo.ModelState, t2, pool: list[str], pair_dir: Path,
                     static: bool) -> list[Indicators]:
    """The indicators computed with a model, every candidate, all on the same first n training instances of T2
    (n = score_instances; zero-shot and gradients: their own flags, which default to it): under S1 or, `static`,
    under the base model (S1's adapters bypassed)."""
    config, accelerator, tokenizer = run.config, run.accelerator, run.tokenizer
    max_length = config.max_source_length + config.max_target_length
    split = train_sapo.training_split(t2, config)
    instances = t2.split(split)
    scored = instances[:config.score_instances]
    zero_shot_n = config.zero_shot_instances or config.score_instances
    gradient_n = config.gradient_instances or config.score_instances
    state_id = model_state_id(run.base_path, run.base_adapters) if static else state.state_id(run)
    out = []
    with static_model(state) if static else contextlib.nullcontext():
        scores = score_prompts.select_candidates(  # every candidate on every instance: the indicator of each
            state.model, tokenizer, t2, pool, scored, accelerator, score_prompts.ScoringSettings.of(config, "sapo"),
            cache_path=pair_dir / ("score_cache_static.json" if static else "score_cache.json"), state_id=state_id,
            progress=run.progress)
        for c, p in enumerate(pool):
            stats = token_statistics(state.model, [encode_task_example(tokenizer, t2, p, x, max_length)
                                                   for x in scored], accelerator, config.micro_batch_size)
            instruction_nll = token_statistics(state.model, [instruction_sequence(tokenizer, t2, p)],
                                               accelerator)[0][0]
            zero_shot = evaluate.evaluate_task(state.model, tokenizer, t2, p, accelerator, split=split,
                                               max_instances=zero_shot_n, batch_size=config.eval_batch_size,
                                               max_new_tokens=config.max_new_tokens,
                                               max_prompt_tokens=config.max_source_length, progress=False)
            gradient = weight_gradients(state.model, [encode_task_example(tokenizer, t2, p, x, max_length)
                                                      for x in instances[:gradient_n]], accelerator,
                                        config.lora_targets.split(","), config.micro_batch_size)
            out.append(Indicators(
                pre_update_loss=scores.candidates[c].score,
                pre_update_loss_instance_mean=scores.candidates[c].instance_mean,
                first_token_loss=float(np.mean([nll[0] for nll, _ in stats])),
                response_entropy=math.fsum(e for _, entropy in stats for e in entropy) / sum(len(e) for _, e in stats),
                instruction_loss=float(np.mean(instruction_nll)), gradient_norm=gradient.norm,
                zero_shot_rouge=zero_shot.rougeL, zero_shot_exact_match=zero_shot.exact_match,
                length_tokens=len(tokenizer(p, add_special_tokens=False)["input_ids"]),
                readability_grade=flesch_kincaid_grade(p), rouge_to_original=evaluate.rouge_l(p, [t2.instruction])))
    return out


def indicator_instances(config: ProbeConfig, t2) -> dict[str, int]:
    """Indicator -> the number of T2 instances it is computed on (0: from the instruction's text alone)."""
    available = len(t2.split(train_sapo.training_split(t2, config)))
    n = min(config.score_instances, available)
    out = {name: n for name in Indicators.model_names()}
    out["instruction_loss"] = 0  # the instruction's own tokens
    out["zero_shot_rouge"] = out["zero_shot_exact_match"] = min(config.zero_shot_instances or n, available)
    out["gradient_norm"] = min(config.gradient_instances or n, available)
    return {**{name: 0 for name in Indicators.names()}, **out}


def pre_update_indicators(run: train_sapo.Run, state: train_sapo.ModelState, t1, t2, unseen, pool: list[str],
                          pair_dir: Path) -> tuple[list[Indicators], list[Indicators], list[Conflict]]:
    """2. Every candidate's indicators before any T2 update, under S1 and under the base model; the gradient
    conflict under S1."""
    config, accelerator, tokenizer = run.config, run.accelerator, run.tokenizer
    max_length = config.max_source_length + config.max_target_length
    gradient_n = config.gradient_instances or config.score_instances
    targets = config.lora_targets.split(",")
    adaptive = model_indicators(run, state, t2, pool, pair_dir, static=False)
    static = model_indicators(run, state, t2, pool, pair_dir, static=True)

    def encode(task, instruction):
        instances = task.split(train_sapo.training_split(task, config))[:gradient_n]
        return [encode_task_example(tokenizer, task, instruction, x, max_length) for x in instances]

    # The conflict for the candidates at the quantiles of the pre-update loss (the lowest, the highest and evenly
    # spaced ranks between them), against T1's and the first unseen task's gradients (kept whole: two copies).
    reference_task = unseen[0] if unseen else None
    references = {"t1": weight_gradients(state.model, encode(t1, t1.instruction), accelerator, targets,
                                         config.micro_batch_size, keep=True)}
    if reference_task:
        references["unseen"] = weight_gradients(state.model, encode(reference_task, reference_task.instruction),
                                                accelerator, targets, config.micro_batch_size, keep=True)
    by_loss = sorted(range(len(pool)), key=lambda c: (adaptive[c].pre_update_loss, c))
    quantiles = np.linspace(0, len(pool) - 1, min(config.conflict_candidates, len(pool)))
    chosen = [by_loss[i] for i in sorted({int(round(q)) for q in quantiles})]
    conflict = []
    for c in chosen:
        g = weight_gradients(state.model, encode(t2, pool[c]), accelerator, targets, config.micro_batch_size,
                             references={name: r.full for name, r in references.items()})
        modules = sorted(g.norm2)
        t1_cos = g.cosines("t1", references["t1"].norm2)
        unseen_cos = g.cosines("unseen", references["unseen"].norm2) if reference_task else {}
        conflict.append(Conflict(candidate=c, pre_update_loss=adaptive[c].pre_update_loss, modules=modules,
                                 cosine_t1=[t1_cos[m] for m in modules],
                                 cosine_unseen=[unseen_cos.get(m, float("nan")) for m in modules],
                                 unseen_task=reference_task.name if reference_task else ""))
    del references
    return adaptive, static, conflict


SEED_STRIDE = 1000  # seed s of an arm trains with config.seed + 1000 s: no overlap with train_sapo's seed + k/epoch


def arm_dir(pair_dir: Path, c: int, s: int) -> Path:
    return pair_dir / f"candidate-{c:02d}-seed-{s}"


def train_and_evaluate(run: train_sapo.Run, state: train_sapo.ModelState, t1, t2, c: int, s: int, pool,
                       pair_dir: Path, s1_adapters: list[str]) -> dict[str, float]:
    """3. T2 trained from S1 with candidate c (train_sapo's `--select fixed:c`) and seed s (ours: the seed moves
    T2's LoRA initialisation, its data order and its dropout masks; S1 stays the same), then T1, T2 (with c) and U
    evaluated; back to S1 afterwards."""
    cand_dir = arm_dir(pair_dir, c, s)
    arm = dataclasses.replace(run, config=dataclasses.replace(run.config, select=f"fixed:{c}",
                                                              seed=run.config.seed + SEED_STRIDE * s))
    chosen = train_sapo.select_instruction(arm, state, t2, cand_dir)
    if chosen.selection.instruction != pool[c]:
        raise SapoError(f"{cand_dir}/selection.json holds another instruction than candidate {c} of the pool")
    train_sapo.train_adapter(arm, state, T2_INDEX, t2, chosen, cand_dir)
    instructions = {t.name: t.instruction for t in run.tasks}
    instructions[t2.name] = pool[c]
    row = train_sapo.evaluate_row(arm, state, cand_dir, f"after {t2.name} with candidate {c}, seed {s}",
                                  instructions)
    back_to_s1(state, s1_adapters)
    return {task: s.rougeL for task, s in row.scores.items()}


@dataclass
class Budget:
    """What a study costs, counted before it starts (the first line it prints), and its wall-time estimate from the
    first arm it trains."""

    pairs: int
    candidates: int  # per pair (the smallest pool when pools differ)
    seeds: int
    steps_per_training: int
    generated_answers: int  # evaluations of every arm + the zero-shot indicators (static and adaptive)
    scored_sequences: int  # pre-update losses: candidates x scoring instances x 2 (static and adaptive), per pair

    @property
    def trainings(self) -> int:
        return self.pairs * (1 + self.candidates * self.seeds)

    def line(self) -> str:
        return (f"study: {self.pairs} pair(s) x {self.candidates} candidates x {self.seeds} seed(s) = "
                f"{self.pairs * self.candidates * self.seeds} T2 trainings (+{self.pairs} T1), "
                f"{self.steps_per_training} optimizer steps each; {self.generated_answers} generated answers; "
                f"{self.scored_sequences} scored sequences; wall time: estimated after the first arm")


def study_budget(config: ProbeConfig, tasks: dict, pool_lengths: list[int]) -> Budget:
    pairs = config.pair_names()
    answers = scored = 0
    for (t1, t2), k in zip(pairs, pool_lengths):
        evaluated = [t1, t2] + [u for u in config.unseen_names() if u not in (t1, t2)]
        per_arm = sum(min(config.eval_instances or 10**9, len(tasks[t].split(config.eval_split))) for t in evaluated)
        n = len(tasks[t2].split(train_sapo.training_split(tasks[t2], config)))
        answers += k * config.seeds * per_arm + 2 * k * min(config.zero_shot_instances or config.score_instances, n)
        scored += 2 * k * min(config.score_instances, n)
    t2_n = len(tasks[pairs[0][1]].split(train_sapo.training_split(tasks[pairs[0][1]], config)))
    steps = config.epochs * math.ceil(min(config.train_instances, t2_n) / config.global_batch_size)
    return Budget(pairs=len(pairs), candidates=min(pool_lengths), seeds=config.seeds, steps_per_training=steps,
                  generated_answers=answers, scored_sequences=scored)


def probe_pair(config: ProbeConfig, accelerator, tokenizer, base, t1, t2, unseen, run_dir: Path,
               clock: dict) -> PairResult:
    """One training pair: S1, the indicators, one T2 training + evaluation per candidate and seed. Nothing is
    computed twice: a pair whose files are all on disk does not even load the model. `clock` carries the study's
    arms left and the first arm's time across pairs (the wall-time estimate)."""
    pair_dir = run_dir / f"{t1.name}--{t2.name}"
    run = train_sapo.Run(config, accelerator, [t1, t2, *unseen], pair_dir, tokenizer, *base)
    stored = read_record(pair_dir / "indicators.json", StoredIndicators, default=None, undefined_floats=True,
                         advice=PAIR_ADVICE)
    state = None

    def s1() -> train_sapo.ModelState:
        nonlocal state
        if state is None:
            model = load_model(config.model, dtype=resolve_dtype(config.dtype, accelerator.device))
            train_sapo.check_lora_targets(model, config.lora_targets)
            train_sapo.check_model_context(model, config)
            # ZeRO-3: an inference engine's gathering hooks on the model (tasks/sharding.py), as train_sapo.py does
            state = train_sapo.ModelState(model=shard_for_inference(accelerator, model.to(accelerator.device)))
            train_s1(run, state, t1, pair_dir)
        return state

    if stored is None:
        pool = config.pool_source().build(t2, accelerator=accelerator, model=s1().model, tokenizer=tokenizer,
                                          state_id=s1().state_id(run), cache_path=run_dir / "paraphrases.json")
        if len(pool) < 2:
            raise SapoError(f"task {t2.name} has {len(pool)} candidate: the study needs a pool of 2 or more")
        indicators, static, conflict = pre_update_indicators(run, s1(), t1, t2, unseen, pool, pair_dir)
        # indicators.json last: it marks the step done (a kill in between recomputes both).
        # Strict JSON: an undefined number (NaN: no unseen task, a constant column) is written as null.
        run.save(pair_dir / "conflict.json", json_safe([dataclasses.asdict(x) for x in conflict]))
        instances = indicator_instances(config, t2)
        run.save(pair_dir / "indicators.json", json_safe(dataclasses.asdict(StoredIndicators(
            candidates=pool, instances=instances, indicators=indicators, static=static))))
    else:
        pool, indicators, static = stored.candidates, stored.indicators, stored.static
        instances = stored.instances
        conflict = read_record(pair_dir / "conflict.json", list[Conflict], undefined_floats=True, advice=PAIR_ADVICE)
    seed_scores = []
    for c in range(len(pool)):
        runs = []
        for s in range(config.seeds):
            done = read_record(arm_dir(pair_dir, c, s) / "scores.json", train_sapo.Row, default=None,
                               advice="delete it to evaluate that arm again")
            if done is not None:
                runs.append({task: x.rougeL for task, x in done.scores.items()})
                continue
            accelerator.print(f"{t1.name}->{t2.name}: candidate {c + 1}/{len(pool)}, seed {s + 1}/{config.seeds}: "
                              f"{pool[c][:80]!r}")
            state = s1()
            start = time.perf_counter()
            runs.append(train_and_evaluate(run, state, t1, t2, c, s, pool, pair_dir, state.adapter_dirs[:1]))
            clock["left"] -= 1
            if "first_arm" not in clock:
                clock["first_arm"] = time.perf_counter() - start
                accelerator.print(f"first arm: {clock['first_arm']:.0f} s -> about "
                                  f"{clock['first_arm'] * clock['left'] / 60:.1f} min for the {clock['left']} arms "
                                  "left (plus the indicators of pairs not scored yet)")
        seed_scores.append(runs)
    scores = [{task: float(np.mean([r[task] for r in runs])) for task in runs[0]} for runs in seed_scores]
    return PairResult(t1=t1.name, t2=t2.name, unseen=[u.name for u in unseen], candidates=pool,
                      indicators=indicators, scores=scores, conflict=conflict, static=static,
                      seed_scores=seed_scores, instances=instances)


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


def indicator_correlation(pair: PairResult, name: str, method, candidates=None, static: bool = False) -> float:
    """The correlation across candidates between an indicator (signed: higher = predicted better; `static`: its
    base-model version) and the post-training score (mean over seeds) on each cross task, averaged over those tasks:
    one number per pair."""
    idx = np.arange(len(pair.candidates)) if candidates is None else candidates
    table = pair.static if static else pair.indicators
    values = Indicators.sign(name) * np.asarray([getattr(table[c], name) for c in idx], dtype=np.float64)
    return nanmean(method(values, [pair.scores[c][task] for c in idx]) for task in pair.cross_tasks)


VARIANTS = {"adaptive": "under S1, the state T2 is trained from (SAPO's premise)",
            "static": "under the base model, S1's adapters bypassed"}


@dataclass
class IndicatorSummary:
    definition: str
    sign: int
    variant: str  # a key of VARIANTS
    instances: dict[str, int]  # pair -> the T2 instances it was computed on (0: the instruction's text alone)
    spearman: dict[str, float]  # pair -> the pair's mean correlation
    pearson: dict[str, float]
    mean: float  # plain mean of the pairs' Spearman correlations
    pooled: float  # Fisher-z pooled Spearman correlation (tasks.statistics.fisher_z_pool, weights K - 3)
    low: float  # bootstrap interval of `pooled` (candidates resampled within each pair)
    high: float


@dataclass
class Difference:
    """A difference of two statistics computed on the same bootstrap draws (a paired interval)."""

    estimate: float
    low: float
    high: float

    def verdict(self) -> str:
        if self.low > 0:
            return "> 0"
        if self.high < 0:
            return "< 0"
        return "interval holds 0" if math.isfinite(self.low) else "undefined"


@dataclass
class TaskNoise:
    """One task's variance decomposition (tasks.statistics.VarianceDecomposition) of the relative change over the
    K candidates x S seeds of a pair, in relative-change units (0.1 = 10% of the original's score)."""

    task: str
    role: str  # in-task (T2), forgetting (T1) or unseen
    candidate_sd: float  # sqrt of the candidate variance component: the spread due to the instruction
    seed_sd: float  # sqrt of the seed variance component: the noise floor (same instruction, another seed)
    f: float
    p_value: float  # permutation test: is the candidate spread above the seed noise?
    seeds: int


@dataclass
class Analysis:
    """Every statistic of the study, intervals from one set of bootstrap draws (so differences are paired)."""

    indicators: dict[str, IndicatorSummary]  # state-adaptive (under S1), every indicator
    static: dict[str, IndicatorSummary]  # static (base model), the model indicators
    versus_loss: dict[str, Difference]  # pooled r of the adaptive pre-update loss minus that of each other one
    adaptive_minus_static: dict[str, Difference]  # per model indicator: pooled r under S1 minus under the base
    noise: dict[str, list[TaskNoise]]  # pair -> per task (T2 first)
    spread: dict[str, Difference]  # pair (and "pooled", the mean over pairs) -> cross-task minus in-task candidate_sd
    cross_correlation: dict[str, Difference]  # pearson / spearman -> Fisher-z pooled off-diagonal r over all pairs


def candidate_sd(table: np.ndarray | None) -> float:
    return float("nan") if table is None else variance_decomposition(table, permutations=0).candidate_sd


def spread_difference(pair: PairResult, idx) -> float:
    """Mean over the cross tasks of their candidate_sd, minus T2's (> 0: the instruction matters more across tasks
    than in-task, the paper's Figure 1 claim), on the candidates `idx`."""
    def sd(task):
        table = pair.relative_table(task)
        return candidate_sd(None if table is None else table[idx])
    return nanmean(sd(t) for t in pair.cross_tasks) - sd(pair.t2)


def pooled_cross_correlation(pairs: list[PairResult], method, draws) -> float:
    """Fisher-z pooled correlation across candidates between the scores of every two cross tasks, all pairs."""
    rs, ns = [], []
    for pair, idx in zip(pairs, draws):
        for a, b in itertools.combinations(pair.cross_tasks, 2):
            rs.append(method([pair.scores[c][a] for c in idx], [pair.scores[c][b] for c in idx]))
            ns.append(len(idx))
    return fisher_z_pool(rs, ns)


def analyse(pairs: list[PairResult], config: ProbeConfig) -> Analysis:
    """Pooling over pairs and the intervals. Each bootstrap draw resamples the candidates (with all their seeds)
    within each pair, the pairs fixed, and computes every statistic on that draw."""
    names, model_names = Indicators.names(), Indicators.model_names()
    keys = [("adaptive", n) for n in names] + [("static", n) for n in model_names] + \
        [("spread", p.label) for p in pairs] + [("spread", "pooled"), ("cross", "pearson"), ("cross", "spearman")]

    def statistics(draws) -> list[float]:
        out = {}
        for variant, group in (("adaptive", names), ("static", model_names)):
            for n in group:
                out[variant, n] = fisher_z_pool(
                    [indicator_correlation(p, n, spearman, d, static=variant == "static") for p, d in
                     zip(pairs, draws)], [len(d) for d in draws])
        for p, d in zip(pairs, draws):
            out["spread", p.label] = spread_difference(p, d)
        out["spread", "pooled"] = nanmean(out["spread", p.label] for p in pairs)
        for method in (pearson, spearman):
            out["cross", method.__name__] = pooled_cross_correlation(pairs, method, draws)
        return [out[k] for k in keys]

    sizes = [len(p.candidates) for p in pairs]
    point = dict(zip(keys, statistics([np.arange(n) for n in sizes])))
    samples = bootstrap_samples(statistics, sizes, config.bootstrap, config.seed)
    column = {k: samples[:, i] for i, k in enumerate(keys)}

    def interval(values) -> tuple[float, float]:
        return percentile_interval(values, config.confidence)

    def difference(a, b) -> Difference:
        return Difference(point[a] - point[b], *interval(column[a] - column[b]))

    def summary(variant, n) -> IndicatorSummary:
        return IndicatorSummary(definition=Indicators.definition(n), sign=Indicators.sign(n), variant=variant,
                                instances={p.label: p.instances.get(n, 0) for p in pairs},
                                spearman={p.label: indicator_correlation(p, n, spearman, static=variant == "static")
                                          for p in pairs},
                                pearson={p.label: indicator_correlation(p, n, pearson, static=variant == "static")
                                         for p in pairs},
                                mean=nanmean(indicator_correlation(p, n, spearman, static=variant == "static")
                                             for p in pairs),
                                pooled=point[variant, n], low=interval(column[variant, n])[0],
                                high=interval(column[variant, n])[1])

    noise = {}
    for p in pairs:
        roles = {p.t2: "in-task", p.t1: "forgetting (T1)"}
        rows = []
        for task in [p.t2, *p.cross_tasks]:
            table = p.relative_table(task)
            v = variance_decomposition(table, config.permutations, config.seed) if table is not None else None
            rows.append(TaskNoise(task=task, role=roles.get(task, "unseen"),
                                  candidate_sd=v.candidate_sd if v else float("nan"),
                                  seed_sd=v.seed_sd if v else float("nan"), f=v.f if v else float("nan"),
                                  p_value=v.p_value if v else float("nan"), seeds=len(p.seed_scores[0])))
        noise[p.label] = rows
    return Analysis(
        indicators={n: summary("adaptive", n) for n in names},
        static={n: summary("static", n) for n in model_names},
        versus_loss={**{n: difference(("adaptive", "pre_update_loss"), ("adaptive", n))
                        for n in names if n != "pre_update_loss"},
                     **{f"static:{n}": difference(("adaptive", "pre_update_loss"), ("static", n))
                        for n in model_names}},
        adaptive_minus_static={n: difference(("adaptive", n), ("static", n)) for n in model_names},
        noise=noise,
        spread={k[1]: Difference(point[k], *interval(column[k])) for k in keys if k[0] == "spread"},
        cross_correlation={k[1]: Difference(point[k], *interval(column[k])) for k in keys if k[0] == "cross"})


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
                  analysis: Analysis, pool: list[PoolSummary]) -> dict:
    indicators = analysis.indicators
    summary = {
        "relative_change": RELATIVE_CHANGE,
        "protocol": {"seeds": config.seeds, "seed_stride": SEED_STRIDE, "bootstrap": config.bootstrap,
                     "confidence": config.confidence, "permutations": config.permutations,
                     "interval": "percentile bootstrap: the candidates (with all their seeds) resampled within each "
                                 "pair, the pairs fixed; differences are paired (both statistics on the same draws)",
                     "pooled": "Fisher z: tanh(sum (K-3) atanh r_pair / sum (K-3)), r clipped to +-0.9999",
                     "variants": VARIANTS},
        "indicators": {name: dataclasses.asdict(s) for name, s in indicators.items()},
        "static_indicators": {name: dataclasses.asdict(s) for name, s in analysis.static.items()},
        "pre_update_loss_minus": {name: dataclasses.asdict(d) for name, d in analysis.versus_loss.items()},
        "adaptive_minus_static": {name: dataclasses.asdict(d) for name, d in analysis.adaptive_minus_static.items()},
        "noise_floor": {pair: [dataclasses.asdict(t) for t in rows] for pair, rows in analysis.noise.items()},
        "cross_minus_in_task_spread": {k: dataclasses.asdict(d) for k, d in analysis.spread.items()},
        "cross_task_correlation_pooled": {k: dataclasses.asdict(d) for k, d in analysis.cross_correlation.items()},
        **{method: {p.label: {**dataclasses.asdict(c), "mean_off_diagonal": c.mean_off_diagonal()}
                    for p, c in zip(pairs, correlations[method])} for method in ("pearson", "spearman")},
        "pool_size": [dataclasses.asdict(x) for x in pool],
        "pool_size_baseline": any_candidate(pairs),  # a candidate drawn at random
        "pairs": [{"pair": p.label, "t1": p.t1, "t2": p.t2, "unseen": p.unseen, "candidates": p.candidates,
                   "scores": p.scores, "seed_scores": p.seed_scores,
                   "relative_change": {t: p.relative(t) for t in [p.t2, *p.cross_tasks]},
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
    every = [*indicators.values(), *analysis.static.values()]
    write_text_atomic(run_dir / "indicators.csv", csv_text(
        ["indicator", "variant", "sign", "pair", "instances", "spearman", "pearson", "low", "high", "definition"],
        [[s_name, s.variant, s.sign, pair, s.instances[pair], s.spearman[pair], s.pearson[pair], "", "",
          s.definition] for s_name, s in zip([*indicators, *analysis.static], every) for pair in s.spearman] +
        [[s_name, s.variant, s.sign, "pooled (Fisher z)", "", s.pooled, "", s.low, s.high, ""]
         for s_name, s in zip([*indicators, *analysis.static], every)]))
    write_text_atomic(run_dir / "noise_floor.csv", csv_text(
        ["pair", *[f.name for f in dataclasses.fields(TaskNoise)]],
        [[pair, *dataclasses.astuple(t)] for pair, rows in analysis.noise.items() for t in rows]))
    write_text_atomic(run_dir / "pool_size.csv", csv_text(
        [f.name for f in dataclasses.fields(PoolSummary)], [list(dataclasses.astuple(x)) for x in pool]))
    write_text_atomic(run_dir / "conflict.csv", csv_text(
        ["pair", "candidate", "pre_update_loss", "module", "cosine_t1", "cosine_unseen", "unseen_task"],
        [[p.label, x.candidate, x.pre_update_loss, m, a, b, x.unseen_task] for p in pairs for x in p.conflict
         for m, a, b in zip(x.modules, x.cosine_t1, x.cosine_unseen)]))
    return summary


def plot_figures(run_dir: Path, pairs: list[PairResult], correlations: dict, analysis: Analysis,
                 pool: list[PoolSummary]):
    """Every figure of the study, one PNG each in `run_dir`."""
    plot_correlations(run_dir / "correlations.png", pairs, correlations)
    for pair in pairs:
        plot_scatter(run_dir / f"scatter_{pair.t1}--{pair.t2}.png", pair)
    plot_indicators(run_dir / "indicators.png", analysis)
    plot_noise_floor(run_dir / "noise_floor.png", pairs, analysis)
    plot_conflict(run_dir / "conflict.png", pairs)
    plot_pool_size(run_dir / "pool_size.png", pairs, pool)


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_correlations(path: Path, pairs: list[PairResult], correlations: dict):
    """Heatmaps (Fig. 2): one row per pair, Pearson and Spearman."""
    fig, axes = pyplot().subplots(len(pairs), 2, figsize=(10, 4.2 * len(pairs)), squeeze=False)
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
    save_figure(fig, path, dpi=90)


def plot_scatter(path: Path, pair: PairResult):
    """Scatter plots (Fig. 1) of one pair: relative change on every two tasks, one point per candidate (x = in-task
    first)."""
    tasks = [pair.t2, *pair.cross_tasks]
    n = len(tasks) - 1
    fig, axes = pyplot().subplots(n, n, figsize=(2.6 * n, 2.6 * n), squeeze=False)
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
    save_figure(fig, path, dpi=80)


def plot_indicators(path: Path, analysis: Analysis):
    """Indicators (Fig. 3): pooled Spearman correlation with the cross-task scores, interval, each pair's value; the
    static (base-model) version below the state-adaptive one."""
    names = list(analysis.indicators)
    fig, ax = pyplot().subplots(figsize=(7, 0.55 * len(names) + 1.2))
    for y, name in enumerate(names):
        for offset, table, color in ((-0.15, analysis.indicators, "C0"), (0.15, analysis.static, "C2")):
            if name not in table:
                continue
            s = table[name]
            ax.errorbar([s.pooled], [y + offset], fmt="o", color=color, capsize=3, ms=4,
                        xerr=[[s.pooled - s.low], [s.high - s.pooled]] if math.isfinite(s.low + s.pooled) else None)
            ax.scatter(list(s.spearman.values()), [y + offset] * len(s.spearman), color="C1", s=8, zorder=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # the first indicator (SAPO's) on top
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman r with the cross-task scores after training (signed: > 0 = the indicator predicts)\n"
                  "blue: under S1 (pooled, interval), green: under the base model, orange: pairs", fontsize=8)
    save_figure(fig, path, dpi=90)


def plot_noise_floor(path: Path, pairs: list[PairResult], analysis: Analysis):
    """Noise floor: per pair and task, the spread due to the instruction against the spread due to the seed."""
    fig, axes = pyplot().subplots(len(pairs), 1, figsize=(7, 3 * len(pairs)), squeeze=False)
    for ax, pair in zip(axes[:, 0], pairs):
        rows = analysis.noise[pair.label]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [100 * t.candidate_sd for t in rows], 0.4, label="candidates (instruction)")
        ax.bar(x + 0.2, [100 * t.seed_sd for t in rows], 0.4, label="seeds of one candidate (noise floor)")
        ax.set_xticks(x, [f"{t.task}\n{t.role}\np={t.p_value:.2f}" for t in rows], fontsize=7)
        ax.set_ylabel("sd of relative change (%)", fontsize=8)
        ax.set_title(f"{pair.label}: variance components over {len(pair.candidates)} candidates x "
                     f"{len(pair.seed_scores[0])} seeds", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=90)


def plot_conflict(path: Path, pairs: list[PairResult]):
    """Gradient conflict (Fig. 4): per candidate, the per-module cosines with T1's and the unseen task's gradient."""
    fig, axes = pyplot().subplots(len(pairs), 1, figsize=(8, 3.4 * len(pairs)), squeeze=False)
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
    save_figure(fig, path, dpi=90)


def plot_pool_size(path: Path, pairs: list[PairResult], pool: list[PoolSummary]):
    """Pool size (Fig. 15): the cross-task relative change of SAPO's pick as the pool grows."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    ks = [math.log2(x.k) for x in pool]  # 1, 2, 4, ... evenly spaced
    ax.plot(ks, [100 * x.mean for x in pool], "o-")
    ax.fill_between(ks, [100 * x.ci_low for x in pool], [100 * x.ci_high for x in pool], alpha=0.3)
    ax.set_xticks(ks, [str(x.k) for x in pool])
    ax.axhline(100 * any_candidate(pairs), color="grey", ls="--", lw=1, label="a candidate drawn at random")
    ax.legend(fontsize=8)
    ax.set_xlabel("pool size k (original included)")
    ax.set_ylabel("cross-task relative change of the pick (%)")
    save_figure(fig, path, dpi=90)


def print_summary(run_dir: Path, pairs, correlations, analysis: Analysis, pool: list[PoolSummary],
                  config: ProbeConfig):
    level = f"{100 * config.confidence:.0f}%"
    print()
    for p in pairs:
        print(f"{p.label}: noise floor over {len(p.candidates)} candidates x {len(p.seed_scores[0])} seeds (sd of the "
              "relative change due to the candidate / due to the seed, permutation p):")
        for t in analysis.noise[p.label]:
            print(f"  {t.task:<28} {t.role:<16} candidates {100 * t.candidate_sd:6.1f}%  seeds "
                  f"{100 * t.seed_sd:6.1f}%  p={t.p_value:.3f}")
    for key, d in analysis.spread.items():
        print(f"cross-task minus in-task candidate sd, {key}: {100 * d.estimate:+.1f}% "
              f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] ({d.verdict()})")
    print(f"{'indicator (Spearman, Fisher-z pooled)':<38} {'under S1':>9}  {'interval':<16} {'base':>7}  "
          f"{'S1 - base':>10}  interval         n")
    for name, s in sorted(analysis.indicators.items(), key=lambda kv: -kv[1].pooled if math.isfinite(kv[1].pooled)
                          else 9):
        static, diff = analysis.static.get(name), analysis.adaptive_minus_static.get(name)
        print(f"{name:<38} {s.pooled:>9.3f}  [{s.low:6.3f}, {s.high:6.3f}] "
              + (f"{static.pooled:>7.3f}  {diff.estimate:>+10.3f}  [{diff.low:+.3f}, {diff.high:+.3f}]"
                 if static else f"{'':>7}  {'':>10}  {'':<16}")
              + f"  {max(s.instances.values())}")
    print(f"pre_update_loss minus each other indicator (pooled Spearman, paired {level} interval):")
    for name, d in analysis.versus_loss.items():
        print(f"  {name:<38} {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}] ({d.verdict()})")
    for method, d in analysis.cross_correlation.items():
        print(f"{method} between cross tasks, pooled over pairs: {d.estimate:.3f} [{d.low:.3f}, {d.high:.3f}]; "
              "per pair mean off-diagonal: "
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
    train_sapo.check_batch_split(config, accelerator.num_processes)
    set_seed(config.seed)
    names = config.sequence.split(",")
    tasks = dict(zip(names, train_sapo.load_tasks(config, accelerator)))  # bad names fail before any model loads
    pool_lengths = [config.generate + 1 if config.generate else len(config.pool_source().build(tasks[t2]))
                    for _, t2 in config.pair_names()]
    accelerator.print(study_budget(config, tasks, pool_lengths).line())  # the first line: what the study costs
    accelerator.print(train_sapo.describe_preset(config))
    base = resolve(config.model)
    key = train_sapo.run_key(config, list(tasks.values()), *base)
    if not config.generate:  # the T2 pools are inputs too: another pool is another study
        key.pools = {tasks[t2].name: pool_hash(config.pool_source().build(tasks[t2]))
                     for _, t2 in config.pair_names()}
    run_dir = open_run_dir_on_every_process(Path(config.output_dir), dataclasses.asdict(config), key, overwrite,
                                           accelerator)
    tokenizer = load_tokenizer(config.model)
    pairs = []
    arms_done = sum((arm_dir(run_dir / f"{t1}--{t2}", c, s) / "scores.json").exists()
                    for (t1, t2), k in zip(config.pair_names(), pool_lengths) for c in range(k)
                    for s in range(config.seeds))
    clock = {"left": sum(pool_lengths) * config.seeds - arms_done}
    for t1, t2 in config.pair_names():
        unseen = [tasks[u] for u in config.unseen_names() if u not in (t1, t2)]
        pairs.append(probe_pair(config, accelerator, tokenizer, base, tasks[t1], tasks[t2], unseen, run_dir, clock))
    if accelerator.is_main_process:
        correlations = {method.__name__: [correlation_matrix([p.scores_on(t) for t in p.cross_tasks], p.cross_tasks,
                                                             method, config) for p in pairs]
                        for method in (pearson, spearman)}
        analysis = analyse(pairs, config)
        pool = summarize_pool_size(pairs, config)
        write_outputs(run_dir, config, pairs, correlations, analysis, pool)
        plot_figures(run_dir, pairs, correlations, analysis, pool)
        print_summary(run_dir, pairs, correlations, analysis, pool, config)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_after_main()
