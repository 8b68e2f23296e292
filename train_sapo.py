"""Continual SAPO fine-tuning: for each task of a sequence, select the training instruction with the current model's
pre-update loss, train a new LoRA with it, evaluate every task of the sequence.

    accelerate launch train_sapo.py                                   # the offline demo (SmolLM2-135M, CPU is fine)
    accelerate launch train_sapo.py --preset paper --model Qwen/Qwen3-8B --data-dir ../shared/data/superni
    accelerate launch train_sapo.py --select sapo-race ...     # racing selection (ours): a fraction of the tokens
    accelerate launch --num_processes 8 train_sapo.py --preset paper ...        # several GPUs (DDP)
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 8 train_sapo.py --preset paper ...  # DeepSpeed
    accelerate launch --config_file fsdp2.yaml train_sapo.py ...        # sharded: torch FSDP2 (or DeepSpeed ZeRO-3)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_sapo.py ...   # 2 processes on CPU

The loop (`main`): the zero-shot row of R, then per task select_instruction -> train_adapter -> evaluate_row. Each
step writes its result into the task's folder (`<k>-<task>/`: selection.json, adapter/ + training.json, scores.json)
and, when that result is already there, loads it instead of computing it: rerunning the same command resumes.
Training continues from its last checkpoint (tasks/checkpoints.py), selection from its score cache.

The launch check (tasks/launch.py) reads the launch from what accelerate hands the process before the Accelerator is
built, and checks the built one again, before any model loads. One process and DDP run as they are. DeepSpeed ZeRO
0-2 is set up to train what DDP trains (the script's own accumulation and AdamW, one optimizer step per global batch,
DeepSpeed's clipping at --max-grad-norm). DeepSpeed ZeRO-3 and torch FSDP2 run sharded (tasks/sharding.py; under
FSDP2 each task trains on a fresh model tree, sharded once). Refused in one line: FSDP version 1, NVMe offload, and
any DeepSpeed setting the script cannot honour (an optimizer or scheduler section, its own accumulation, a clipping
other than --max-grad-norm, fp16 loss scaling; the full list: README "Launching").
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import evaluate
import score_prompts
from tasks import SapoError, cli_main
from tasks.attention import ATTENTION_CHOICES, training_attention
from tasks.checkpoints import TrainLog, keep_trainable_weights, resume_training, save_adapter, save_checkpoint
from tasks.core import Task
from tasks.divergence import check_finite_step
from tasks.errors import exit_after_main, writing
from tasks.flags import (MAX_SEED, POOL_RANGES, OneLineParser, Range, add_config_flags, check_choices, check_ranges,
                         given_flags)
from tasks.fused_ops import FUSED_OPS_CHOICES, apply_fused_ops
from tasks.launch import TrainingRecipe, accelerator_kwargs, check_accelerator, check_launch
from tasks.loaders import load_sequence, load_task, read_json, write_json
from tasks.memory_plan import CHECKPOINTING_MODES, peak_memory_reached, plan_training_memory
from tasks.olora import olora_step_penalty
from tasks.models import (DEFAULT_MODEL, STACK_FILE, activate_adapters, adapter_name, check_context, check_lora_targets,
                          load_model, load_tokenizer, resolve, resolve_dtype, stack_adapters)
from tasks.pools import PoolSource
from tasks.prompts import MAX_SOURCE_LENGTH, MAX_TARGET_LENGTH, encode_task_example
from tasks.records import from_record, read_record
from tasks.reselection import Reselection, Reselector, reselection_instances, shortlist_of
from tasks.run_dir import RunKey, check_task_folders, open_run_dir_on_every_process, pool_hash
from tasks.schedule import adamw_with_schedule, warmup_steps_of
from tasks.score_cache import model_state_id
from tasks.sharding import (adapter_state_dict, end_training, load_device, lockstep, prepare_for_training,
                             shard_for_inference, shards_per_task, unsharded_stack)
from tasks.timings import TaskTimings, TrainingClock
from tasks.train_batches import (build_batch, check_batch_split, global_batches, my_micro_batches, plan_micro_batches,
                                 supervised_tokens)
from tasks.train_step import SupervisedNLL, set_gradient_checkpointing, training_layout


# ----------------------------------------------------------------------------------------------------------------------
# Configuration: every flag, its default (the paper's recipe), and the presets.

@dataclass
class Config:
    preset: str | None = None  # the preset the other values started from (recorded in config.json); None = none
    model: str = DEFAULT_MODEL  # hub id, local dir, or the offline default
    sequence: str = "demo"  # built-in name, real-data name (ni_seq_c1, ...), or comma-separated task names
    data_dir: str | None = None  # SAPO-layout directory; None = built-in tasks
    method: str = "lora-inc"  # lora-inc | o-lora | seq-lora
    select: str = "sapo"  # sapo (the paper) | sapo-race (ours: racing) | original | fixed:K (train with candidate K)
    candidates: str | None = None  # JSON file of candidate instructions (task -> list); None = built-in pools
    generate: int = 0  # paraphrases to generate with a chat model instead of a pool (original stays candidate 0)
    paraphraser: str | None = None  # local chat model for --generate (default: the current model), or the API's model
    paraphrase_api: str | None = None  # OpenAI-compatible chat endpoint for --generate
    meta_prompt: str | None = None  # file: the request for a --generate rewrite, {instruction} in it (None: built-in)
    max_candidates: int | None = None  # use only the first N candidates of a pool (original included)
    pool_sample: int | None = None  # ours: --max-candidates N drawn at random with this seed (the original always in)
    score_instances: int = 250  # candidates are scored on the first N training instances
    race_first: int = 8  # sapo-race (ours): instances of the first round (then x2 per round up to score_instances)
    race_confidence: float = 0.95  # racing and re-selection (ours): confidence of a drop or a switch; 1.0 = never
    train_instances: int = 1000  # train on the first N training instances
    train_on_dev_if_missing: bool = False  # a task without a train split trains (and is scored) on dev, logged
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant (after linear warmup) | warmup-log (DeepSpeed WarmupLR)
    global_batch_size: int = 64  # sequences per optimizer step, whatever the number of processes
    micro_batch_size: int = 8  # sequences per forward without --micro-batch-tokens; accumulation fills the rest
    max_grad_norm: float = 1.0
    max_source_length: int = MAX_SOURCE_LENGTH  # tokens of a prompt (tasks.prompts: shared with the other scripts)
    max_target_length: int = MAX_TARGET_LENGTH  # tokens of an answer; an example holds at most the sum
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,v_proj"
    olora_lambda1: float = 0.5  # O-LoRA weight per step; paper preset 4.0 = authors' 0.5 x 8 undivided micro-batches
    olora_lambda2: float = 0.0  # O-LoRA weight of the new adapter's L2 norms, per optimizer step
    eval_prompt: str = "selected"  # selected | original: instruction for already-trained tasks at evaluation
    eval_split: str = "test"
    eval_instances: int | None = None  # None = the whole split
    eval_batch_size: int | None = None  # at most N sequences per generation batch (None: up to 256)
    eval_token_budget: int | None = None  # ours: prompt + new tokens per generation batch (None: per device)
    eval_compile: bool = False  # ours: CUDA: static KV cache + torch.compile of the decode step
    max_new_tokens: int = 128
    score_token_budget: int = 16384
    # Ours: re-score every N steps on the train instances after --train-instances (held out); switch only when the
    # best is better than the current one by racing's paired test at --race-confidence. 0 = off (the paper).
    reselect_every: int = 0  # ours: steps between re-selections on the train instances after --train-instances; 0=off
    reselect_top: int | None = None  # ours: re-score only the best K candidates of the first selection (None = all)
    checkpoint_every: int = 0  # optimizer steps between training checkpoints; 0 = once per epoch
    seed: int = 42
    builtin_seed: int = 0  # seed of the built-in task generator
    output_dir: str = "runs/demo"
    report_to: str | None = None  # an accelerate tracker (tensorboard, wandb) when installed
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 of the base weights (LoRA weights stay fp32; scoring sums in fp32)
    gradient_checkpointing: str = "off"  # on | off | auto (ours: off when the estimated peak fits the device's memory)
    attention: str = "sdpa"  # training attention: sdpa (dense 4-D mask) | flex (ours: FlexAttention, skips masked tiles)
    fused_ops: str = "none"  # none | liger (ours: Liger-Kernel's fused RMSNorm, SwiGLU and RoPE; needs a GPU)
    allow_beyond_context: bool = False  # allow length limits beyond the model's max_position_embeddings (extended)
    micro_batch_tokens: int | None = None  # fill each forward up to N tokens, padding included (None: by count)

    def pool_source(self) -> PoolSource:
        return PoolSource(candidates_file=self.candidates, max_candidates=self.max_candidates,
                          pool_sample=self.pool_sample, generate=self.generate, paraphraser=self.paraphraser,
                          paraphrase_api=self.paraphrase_api, seed=self.seed, meta_prompt=self.meta_prompt)

    def fixed_candidate(self) -> int | None:
        """K of --select fixed:K (train with candidate K of the pool, unscored), else None."""
        return int(self.select.split(":", 1)[1]) if self.select.startswith("fixed:") else None


PRESETS = {
    # The authors' O-LoRA strength: their trainer adds 0.5 * orth to the loss of each of the 8 micro-batches of an
    # optimizer step and never divides it by the 8 accumulation steps (transformers 4.51 skips that division for models
    # that take loss kwargs, as Qwen3 does, and tells DeepSpeed scale_wrt_gas=False), while the cross-entropy is a
    # token mean over each GPU's 8 micro-batches (num_items_in_batch), averaged over the GPUs (README: "Reproducing
    # the paper"). Per step the gradient is that of CE + 8 * 0.5 * orth; ours counts the penalty once per step, so the
    # same strength is olora_lambda1 = 4.0.
    # The authors' schedule as it ran: their scripts ask for cosine, but their DeepSpeed config's WarmupLR replaces it
    # (a log-shaped warmup, then constant; lr_factor). `--schedule cosine` is the one the scripts asked for.
    "paper": dict(sequence="ni_seq_c1", model="Qwen/Qwen3-8B", output_dir="runs/paper", dtype="bf16",
                  olora_lambda1=4.0, gradient_checkpointing="auto", micro_batch_tokens=16384, schedule="warmup-log"),
    # Small enough to finish in minutes on a 2-core CPU with SmolLM2-135M; still the whole algorithm. Its sequence
    # (tasks/builtin.py) has tasks SmolLM2-135M learns in 12 steps: `animal` was dropped, as it ended every
    # prediction "yes" (below its zero-shot score).
    "demo": dict(sequence="demo", model=DEFAULT_MODEL, score_instances=8, max_candidates=8, train_instances=48,
                 epochs=2, lr=1e-3, global_batch_size=8, micro_batch_size=8, eval_instances=16, max_new_tokens=12,
                 max_source_length=384, max_target_length=32, output_dir="runs/demo"),
}
# Fields that do not change results: a rerun may change them without being refused. The run directory's own path is
# one of them: a moved or copied run resumes.
RESUME_FREE = {"report_to", "eval_batch_size", "eval_token_budget", "eval_compile", "score_token_budget",
               "checkpoint_every", "output_dir", "preset",
               "gradient_checkpointing",  # recomputes the same activations (RNG state kept): same gradients
               "allow_beyond_context"}  # only lets a run start: a run that started has the same results
# Paths of the inputs: compared by what they hold (tasks.run_dir.RunKey: each task's data, each pool, the model's
# files), not by how they are spelled, so a relative path, a moved data dir or a copied candidates file resume.
INPUT_PATHS = {"model", "sequence", "data_dir", "candidates"}
# Allowed values of every numeric field (None, where a field allows it, means "all" or "off" and always passes);
# checked at parse time. tests/test_reliability.py fails for a numeric field missing here.
FLAG_RANGES = {
    **POOL_RANGES, "builtin_seed": Range(0, MAX_SEED),
    "score_instances": Range(1), "train_instances": Range(1), "epochs": Range(1), "eval_instances": Range(1),
    "lr": Range(0, low_open=True), "weight_decay": Range(0), "warmup_ratio": Range(0, 1),
    "global_batch_size": Range(1), "micro_batch_size": Range(1), "micro_batch_tokens": Range(1),
    "max_grad_norm": Range(0, low_open=True), "max_source_length": Range(1), "max_target_length": Range(1),
    "lora_r": Range(1), "lora_alpha": Range(0, low_open=True), "lora_dropout": Range(0, 1, high_open=True),
    "olora_lambda1": Range(0), "olora_lambda2": Range(0), "eval_batch_size": Range(1), "max_new_tokens": Range(1),
    "eval_token_budget": Range(1),
    "score_token_budget": Range(1), "reselect_every": Range(0), "reselect_top": Range(1), "checkpoint_every": Range(0),
}
CHOICES = {"method": ("lora-inc", "o-lora", "seq-lora"), "eval_prompt": ("selected", "original"),
           "schedule": ("cosine", "linear", "constant", "warmup-log"), "eval_split": ("train", "dev", "test"),
           "dtype": ("auto", "bf16", "fp16", "fp32"), "gradient_checkpointing": CHECKPOINTING_MODES,
           "attention": ATTENTION_CHOICES, "fused_ops": FUSED_OPS_CHOICES}
# Flags whose value may be left out: `--gradient-checkpointing` alone means on (as when it was a switch).
BARE_FLAG_VALUES = {"gradient_checkpointing": "on"}


# ----------------------------------------------------------------------------------------------------------------------
# The loop.

@cli_main
def main(argv=None):
    config, overwrite = parse_config(argv)
    launch = check_launch("train_sapo.py", training=training_recipe(config))  # before the Accelerator is built
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(log_with=config.report_to, project_dir=config.output_dir, **accelerator_kwargs(launch))
    launch = check_accelerator(accelerator, "train_sapo.py", training_recipe(config),
                               resolve_dtype(config.dtype, accelerator.device))  # as built, before any model loads
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    accelerator.print(describe_preset(config))
    if launch.engine == "deepspeed":
        accelerator.print(f"launch: {launch.describe()}")
    check_batch_split(config, accelerator.num_processes)
    set_seed(config.seed)
    tasks = load_tasks(config, accelerator)  # data first: a bad task name or pool fails before any model loads
    base_path, base_adapters = resolve(config.model)
    run_dir = open_run_dir_on_every_process(Path(config.output_dir), dataclasses.asdict(config),
                                           run_key(config, tasks, base_path, base_adapters), overwrite, accelerator)
    if config.report_to:
        accelerator.init_trackers("sapo", config={k: v for k, v in dataclasses.asdict(config).items()
                                                  if isinstance(v, (int, float, str, bool))})
    run = Run(config, accelerator, tasks, run_dir, load_tokenizer(config.model), base_path, base_adapters)
    check_task_folders([run.task_dir(k, task) for k, task in enumerate(tasks)])
    # The base (plus any adapters --model already names) in --dtype; peft keeps every LoRA weight in fp32.
    # Selection and the zero-shot row run before accelerate.prepare would move it (FSDP2: its sharding does).
    state = ModelState(model=load_model(config.model, dtype=resolve_dtype(config.dtype, accelerator.device)).to(
        load_device(accelerator)))
    state.model = shard_for_inference(accelerator, state.model)  # ZeRO-3: gathering hooks (tasks/sharding.py)
    check_lora_targets(state.model, config.lora_targets)
    check_model_context(state.model, config)
    if config.fused_ops != "none":  # ours: for selection, training and generation alike
        applied = apply_fused_ops(state.model, config.fused_ops)
        accelerator.print(f"--fused-ops {config.fused_ops}: " + ", ".join(applied))

    # Row 0 of R: the base model, zero-shot, original instructions (the original code never computed it: FWT needs it).
    originals = {t.name: t.instruction for t in tasks}
    rows = [evaluate_row(run, state, run_dir / "0-zero-shot", "zero-shot", originals)]
    metrics = write_results(run, rows, {})
    trained_with, timings = {}, {}  # task name -> the instruction its adapter was trained with
    for k, task in enumerate(tasks):
        task_dir = run.task_dir(k, task)
        chosen = select_instruction(run, state, task, task_dir)
        accelerator.print(f"[{k + 1}/{len(tasks)}] {task.name}: training with candidate {chosen.selection.selected} "
                          f"of {len(chosen.selection.candidates)}: {chosen.selection.instruction[:90]!r}"
                          + (f" ({chosen.note})" if chosen.note else ""))
        training = train_adapter(run, state, k, task, chosen, task_dir)
        trained_with[task.name] = chosen.trained_with
        save_stack(run, state, task_dir, trained_with)
        # Trained tasks are evaluated with their training instruction (or the original, by choice); untrained ones
        # with the original.
        instructions = {**originals, **(trained_with if config.eval_prompt == "selected" else {})}
        rows.append(evaluate_row(run, state, task_dir, f"after {task.name}", instructions))
        timings[task.name] = task_timings(chosen, training, rows[-1])
        metrics = write_results(run, rows, timings)
    print_summary(run, rows, timings, metrics)
    accelerator.end_training()


# ----------------------------------------------------------------------------------------------------------------------
# The three steps of a task. Each loads its result when it is already on disk, else computes and saves it.

def select_instruction(run: Run, state: ModelState, task: Task, task_dir: Path) -> TaskSelection:
    """1. The training instruction of `task`, chosen against the CURRENT state (base + every adapter so far, as
    trained): the candidate with the lowest pre-update loss on the first score_instances training instances."""
    done = read_json(task_dir / "selection.json", default=None, advice=redo_advice(task_dir))
    # Every process looks before the main one may write: an unscored pick (original, fixed:K) is written at once, and
    # a process that found it already written would skip the barrier the others wait in (a hang with 2 processes).
    run.accelerator.wait_for_everyone()
    if done is not None:
        return TaskSelection.from_json(done, task_dir / "selection.json")
    config, split = run.config, training_split(task, run.config)
    note = ""
    if not task.instruction.strip():  # e.g. TRACE's Py150: nothing to paraphrase, trained as is (as the authors do)
        selection = score_prompts.Selection.unscored(task.name, "none", [task.instruction], 0)
        note = "empty instruction: nothing to paraphrase, trained without selection"
    elif config.select == "original":
        selection = score_prompts.Selection.unscored(task.name, "original", [task.instruction], 0)
    else:
        state_id = state.state_id(run)
        pool = config.pool_source().build(task, accelerator=run.accelerator, model=state.model,
                                          tokenizer=run.tokenizer, state_id=state_id,
                                          cache_path=run.run_dir / "paraphrases.json")
        fixed = config.fixed_candidate()
        if fixed is not None:  # one arm of the paper's analysis: train with candidate K, whatever its score
            if fixed >= len(pool):
                raise SapoError(f"--select {config.select}: task {task.name} has {len(pool)} candidates")
            selection = score_prompts.Selection.unscored(task.name, config.select, pool, fixed)
        elif len(pool) == 1:
            selection = score_prompts.Selection.unscored(task.name, config.select, pool, 0)
        else:
            selection = score_prompts.select_candidates(
                state.model, run.tokenizer, task, pool, task.split(split)[:config.score_instances], run.accelerator,
                score_prompts.ScoringSettings.of(config), cache_path=task_dir / "score_cache.json", state_id=state_id,
                progress=run.progress)
    chosen = TaskSelection(select=config.select, split=split, original=task.instruction, selection=selection,
                           note=note, dtype=str(state.model.dtype))
    run.save(task_dir / "selection.json", chosen.to_json())
    return chosen


def train_adapter(run: Run, state: ModelState, k: int, task: Task, chosen: TaskSelection, task_dir: Path) -> Training:
    """2. A new LoRA for `task` trained with the chosen instruction (seq-lora: the one LoRA, continued), earlier
    adapters frozen and active. Advances `state` to base + every adapter up to this task."""
    from peft import LoraConfig, get_peft_model

    config, accelerator = run.config, run.accelerator
    adapter_dir = task_dir / "adapter"
    seq = config.method == "seq-lora"
    previous = [] if seq else [adapter_name(i) for i in range(len(state.adapter_dirs))]
    name = adapter_name(0) if seq else adapter_name(len(state.adapter_dirs))
    if (adapter_dir / "adapter_config.json").exists():  # trained by an earlier process: load it as saved
        training = read_record(task_dir / "training.json", Training, advice=redo_advice(task_dir))
        if shards_per_task(accelerator):  # FSDP2: a fresh tree with every adapter so far, sharded (tasks/sharding.py)
            state.model, state.peft_model = unsharded_stack(
                config.model, resolve_dtype(config.dtype, accelerator.device),
                [str(adapter_dir)] if seq else state.adapter_dirs + [str(adapter_dir)], config.fused_ops)
            shard_for_inference(accelerator, state.model, announce=False)
        elif state.peft_model is None or seq:
            base = state.peft_model.unload() if state.peft_model is not None else state.model
            state.peft_model = stack_adapters(base, [str(adapter_dir)])
        else:
            state.peft_model.load_adapter(str(adapter_dir), adapter_name=name)
    else:
        # Seeded per task, so a run resumed at any task initialises and drops out exactly as an uninterrupted one.
        from accelerate.utils import set_seed

        if shards_per_task(accelerator):  # FSDP2: this task trains on a fresh tree, sharded once (tasks/sharding.py)
            state.model, state.peft_model = unsharded_stack(
                config.model, resolve_dtype(config.dtype, accelerator.device), state.adapter_dirs, config.fused_ops)
        set_seed(config.seed + k)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_targets.split(","), task_type="CAUSAL_LM")
        if state.peft_model is None:
            state.peft_model = get_peft_model(state.model, lora, adapter_name=name)
        elif name not in state.peft_model.peft_config:
            state.peft_model.add_adapter(name, lora)
        activate_adapters(state.peft_model, previous + [name], trainable=name)
        train_instances = task.split(chosen.split)[:config.train_instances]

        def encode(instruction):
            return encode_training_set(run.tokenizer, task, instruction, train_instances, config)

        reselect = make_reselector(run, task, chosen, len(train_instances), encode)  # ours; None unless asked
        state.peft_model, training = train_task(accelerator, state.peft_model, name, previous,
                                                encode(chosen.selection.instruction), config, task_dir, run.progress,
                                                reselect)
        if reselect is not None:
            chosen.reselections, chosen.final_instruction = reselect.events, reselect.current
            run.save(task_dir / "selection.json", chosen.to_json())
        # training.json first: an adapter on disk always has its record (a kill in between retrains the task).
        run.save(task_dir / "training.json", dataclasses.asdict(training))
        # Sharded weights are gathered first, by every process (tasks/sharding.py)
        weights = adapter_state_dict(state.peft_model, name) if lockstep(state.model) else None
        if accelerator.is_main_process:
            save_adapter(state.peft_model, name, adapter_dir, state_dict=weights)
        accelerator.wait_for_everyone()
    state.adapter_dirs = [str(adapter_dir)] if seq else state.adapter_dirs + [str(adapter_dir)]
    activate_adapters(state.peft_model, previous + [name], trainable=None)
    state.model = state.peft_model.get_base_model().eval()  # the transformers model with every LoRA layer inside
    return training


def evaluate_row(run: Run, state: ModelState, row_dir: Path, label: str, instructions: dict[str, str]) -> Row:
    """3. One row of R: every task of the sequence evaluated with the current state (greedy generation), each with
    its instruction in `instructions`."""
    done = read_record(row_dir / "scores.json", Row, default=None, advice="delete it to evaluate that row again")
    if done is not None:
        return done
    config = run.config
    start = time.perf_counter()
    scores = {}
    for task in run.tasks:
        scores[task.name] = evaluate.evaluate_task(
            state.model, run.tokenizer, task, instructions[task.name], run.accelerator, split=config.eval_split,
            max_instances=config.eval_instances, batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_source_length,
            predictions_path=row_dir / "predictions" / f"{task.name}.jsonl", lang="auto", progress=run.progress,
            token_budget=config.eval_token_budget or "auto", compile=config.eval_compile)  # adapters folded into one
    row = Row(row=label, scores=scores, seconds=time.perf_counter() - start)
    run.save(row_dir / "scores.json", row.to_json())
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Training one task: the optimizer loop, and one optimizer step's micro-batches.

def train_task(accelerator, peft_model, name, previous, encoded, config, task_dir, progress, reselect=None):
    """Train adapter `name` of `peft_model` on the encoded instances; resumable from task_dir/checkpoint.
    Returns the trained peft model and a Training record (its seconds add up over resumed segments)."""
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm

    clock = TrainingClock()
    net = peft_model.get_base_model()  # the transformers model, LoRA layers inside
    attention_before = training_attention(accelerator, net, config.attention)  # ours: --attention flex
    layout = training_layout(net)
    # Our own accumulation (accumulate_step): a step's micro-batch count varies with its lengths.
    accelerator.gradient_accumulation_steps = 1
    steps = global_batches(len(encoded), config.global_batch_size, config.epochs, config.seed)
    total_steps, warmup_steps = len(steps), warmup_steps_of(config, len(steps))
    accumulation = max(len(micro_batches(encoded, b, config, layout, accelerator.process_index,
                                         accelerator.num_processes)) for b in steps)  # the most in one step
    checkpoint_every = config.checkpoint_every or math.ceil(len(encoded) / config.global_batch_size)  # or per epoch
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw_with_schedule(trainable, config, total_steps, warmup_steps)
    step_module = SupervisedNLL(peft_model, layout)  # the whole loss is one module, so that DDP sees its backward
    estimate, checkpointing = plan_training_memory(  # ours: --gradient-checkpointing auto, the peak in training.json
        accelerator, step_module, net, [micro_batches(encoded, b, config, layout, 0, 1) for b in steps], encoded, steps,
        config.gradient_checkpointing)
    model, optimizer = prepare_for_training(accelerator, step_module, optimizer, net)  # tasks/sharding.py
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 put sharded parameters in their place

    checkpoint = task_dir / "checkpoint"
    saved = resume_training(accelerator, model, scheduler, checkpoint, task_dir.name)
    start_step = saved.step if saved else 0
    if saved:
        clock.earlier = saved.seconds
        encoded = (reselect.restore(saved.reselector) if reselect else None) or encoded
        accelerator.print(f"resuming training of {task_dir.name} at step {start_step}/{total_steps}")
    log = TrainLog(task_dir / "train_log.jsonl", start_step, accelerator.is_main_process)

    model.train()
    bar = tqdm(range(start_step, total_steps), desc=f"train {task_dir.name}", disable=not progress,
               initial=start_step, total=total_steps)
    for step in bar:
        batch = steps[step]
        total_tokens = supervised_tokens(encoded, batch)  # of the whole global batch, known before the step
        step_nll, orth = accumulate_step(accelerator, model, encoded, batch, step, total_tokens, config, layout,
                                         name, previous)
        if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed clips and steps in its backward
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        check_finite_step(accelerator, task_dir.name, step + 1, total_steps, step_nll, total_tokens, orth, lr,
                          trainable, checkpoint)  # a diverged step stops here, on every process: nothing saved
        scheduler.step()
        log_line = {"step": step + 1, "loss": accelerator.reduce(step_nll, reduction="sum").item() / total_tokens,
                    "lr": lr, **({"olora_orth": orth.item()} if config.method == "o-lora" else {})}
        accelerator.log({f"{task_dir.name}/{k}": v for k, v in log_line.items() if k != "step"}, step=step + 1)
        bar.set_postfix(loss=f"{log_line['loss']:.4f}")
        log.append(log_line)
        if reselect is not None:  # ours (tasks/reselection.py): re-scoring is selection time, not training time
            with clock.paused():
                encoded = reselect.after_step(net, step + 1, total_steps) or encoded
        if (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            save_checkpoint(accelerator, checkpoint, step + 1,
                            {"seconds": clock.seconds, "reselector": reselect.state() if reselect else None})
    bar.close()
    peak, peak_kind = finish_training(accelerator, model, net, checkpointing, attention_before)
    return peft_model, Training(
        steps=total_steps, accumulation=accumulation, warmup_steps=warmup_steps, seconds=clock.seconds,
        reselection_seconds=reselect.seconds if reselect else 0.0,
        gradient_checkpointing="on" if checkpointing else "off",
        estimated_peak_bytes=estimate.peak(checkpointing) if estimate else 0, peak_memory_bytes=peak,
        peak_memory=peak_kind)


def finish_training(accelerator, model, net, checkpointing: bool, attention_before: str | None) -> tuple[int, str]:
    """Back to evaluation: checkpointing off, the attention scoring and generation use, the engine's references
    dropped (ZeRO-3: inference hooks back on `net`). Returns the peak memory training reached (tasks.memory_plan)."""
    model.eval()
    if checkpointing:
        set_gradient_checkpointing(net, False)
    if attention_before is not None:
        net.set_attn_implementation(attention_before)
    peak = peak_memory_reached(accelerator.device)
    accelerator.wait_for_everyone()
    end_training(accelerator, net)
    return peak


def accumulate_step(accelerator, model, encoded, batch, step, total_tokens, config, layout, name, previous):
    """Forward and backward of this process's micro-batches of one global batch (tasks.train_batches: packed rows,
    filled up to --micro-batch-tokens; a function of the batch and the budget, never of the process count); each
    micro-batch's summed response-token NLL comes from tasks.train_step.SupervisedNLL (the LM head on supervised rows
    only). The gradient is exactly that of sum(NLL) / total_tokens (+ the O-LoRA penalty), synchronized once, after
    the last micro-batch (no_sync before). Returns this process's summed NLL and the O-LoRA orth term (0 without)."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    world = accelerator.num_processes
    step_nll = torch.zeros((), device=accelerator.device)
    orth = torch.zeros((), device=accelerator.device)
    # The O-LoRA penalty goes into this process's first micro-batch only (tasks/olora.py).
    penalty = olora_step_penalty(accelerator, model, name, previous, config) if config.method == "o-lora" else None
    mine = micro_batches(encoded, batch, config, layout, accelerator.process_index, world)
    for j, (index, micro) in enumerate(mine):
        weight = 1.0 if micro else 0.0
        # A process without a micro-batch left runs one real sequence at zero weight: the same backward passes.
        rows = [[batch[p] for p in row] for row in micro.rows] if micro else [[batch[0]]]
        # Dropout masks seeded by (seed, step, micro-batch): the same masks on any number of processes, and after a
        # resume.
        torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + index)
        last = j == len(mine) - 1
        if deepspeed:  # the engine reduces, clips and steps after this backward only when sync_gradients is True
            accelerator.sync_gradients = last
        with nullcontext() if last or deepspeed else accelerator.no_sync(model):
            nll_sum = model(build_batch(encoded, rows, 0).to(accelerator.device)) * weight  # pad id: never a target
            # DDP averages over processes: undo it so the gradient is exactly that of sum(NLL) / total_tokens.
            loss = nll_sum / total_tokens * world
            if penalty is not None:
                loss = loss + penalty[0]
                orth, penalty = penalty[1].detach(), None
            accelerator.backward(loss)
        step_nll += nll_sum.detach()
    return step_nll, orth


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: flags, checks, batches, memory, O-LoRA, run records.

def choose_preset(preset: str | None, given: dict) -> str | None:
    """--preset when given; else the demo preset on the built-in offline setup (the default model and the built-in
    tasks, whatever other flags are given: `--output-dir runs/x` or `--seed 1` stay a demo run); else none: the
    Config defaults (the paper's sizes) with the given model and data."""
    if preset is not None:
        return preset
    offline = given.get("data_dir") is None and given.get("model", DEFAULT_MODEL) == DEFAULT_MODEL
    return "demo" if offline else None


def describe_preset(config: Config) -> str:
    """One line: the preset and the sizes that decide how long the run takes."""
    return (f"preset {config.preset or 'none (the paper sizes)'}: model {config.model}, sequence {config.sequence}, "
            f"{config.max_candidates or 'all'} candidates x {config.score_instances} scoring instances, "
            f"{config.train_instances} training instances x {config.epochs} epochs, global batch "
            f"{config.global_batch_size}, {config.eval_instances or 'all'} {config.eval_split} instances per task "
            f"-> {config.output_dir}")


def check_model_context(model, config: Config):
    """The length limits against the model's context (tasks.models.check_context), as soon as its config is read."""
    check_context(model, [("--max-source-length + --max-target-length",
                           config.max_source_length + config.max_target_length),
                          ("--max-source-length + --max-new-tokens", config.max_source_length + config.max_new_tokens)],
                  config.allow_beyond_context, config.model)


def training_recipe(config: Config) -> TrainingRecipe:
    """What a DeepSpeed launch must agree with (tasks.launch)."""
    return TrainingRecipe(max_grad_norm=config.max_grad_norm, schedule=config.schedule,
                          micro_batch_size=config.micro_batch_size, method=config.method)


def parse_config(argv=None) -> tuple[Config, bool]:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper = the original recipe; demo = small sizes (the default with the default model "
                             "and the built-in tasks, whatever other flags are given)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh when the output dir holds a run with another config or other data (the "
                             "old one is moved aside, not deleted)")
    # One flag per Config field, its --help text the field's trailing comment, its default and its range.
    flags = add_config_flags(parser, Config, FLAG_RANGES, skip={"preset"}, bare_values=BARE_FLAG_VALUES)
    args = parser.parse_args(argv)
    given = given_flags(args, flags)
    # Explicit flags override any preset value.
    preset = choose_preset(args.preset, given)
    config = Config(**{**PRESETS.get(preset, {}), **given, "preset": preset})
    check_ranges(dataclasses.asdict(config), FLAG_RANGES)
    check_choices(dataclasses.asdict(config), CHOICES)
    if not (config.select in ("sapo", "sapo-race", "original") or re.fullmatch(r"fixed:\d+", config.select)):
        raise SapoError(f"--select {config.select}: must be sapo, sapo-race, original or fixed:K")
    if not config.lora_targets.strip(","):
        raise SapoError("--lora-targets is empty: name the modules to adapt (e.g. q_proj,v_proj)")
    if config.report_to:
        from accelerate.utils import LoggerType

        check_choices(dataclasses.asdict(config), {"report_to": tuple(t.value for t in LoggerType)})
    config.pool_source().check()
    return config, args.overwrite


def micro_batches(encoded, batch: list[int], config, layout: str, rank: int, world: int):
    """This process's share of one global batch, as (index, tasks.train_batches.MicroBatch or None) pairs.

    The plan (tasks.train_batches.plan_micro_batches: rows filled up to --micro-batch-tokens, or --micro-batch-size
    sequences each without it) depends on the lengths and the budget only, never on the process count; process r
    takes micro-batches r, r + world, ... and every process gets as many, None standing for a zero-weight step."""
    plan = plan_micro_batches([len(encoded[i].input_ids) for i in batch], config.micro_batch_tokens or 0,
                              config.micro_batch_size, layout)
    return my_micro_batches(plan, rank, world)


def encode_training_set(tokenizer, task, instruction, instances, config):
    max_length = config.max_source_length + config.max_target_length
    return [encode_task_example(tokenizer, task, instruction, inst, max_length)
            for inst in instances]


def make_reselector(run: Run, task: Task, chosen: TaskSelection, num_train: int, encode) -> Reselector | None:
    """Ours, beyond the paper (--reselect-every, tasks/reselection.py): the task's re-selector, which re-scores the
    shortlist of its first selection on held-out training instances with the run's scoring settings; None when off
    or when there is nothing to choose from."""
    config = run.config
    if not (config.reselect_every and len(chosen.selection.candidates) > 1
            and chosen.selection.method in ("sapo", "sapo-race")):
        return None
    shortlist = shortlist_of(chosen.selection, config.reselect_top)
    held_out = reselection_instances(task, chosen.split, config)
    chosen.reselect_instances = f"{chosen.split}[{config.train_instances}:{config.train_instances + len(held_out)}]"
    total_steps = config.epochs * math.ceil(num_train / config.global_batch_size)

    def score(model, instructions, instances):
        return score_prompts.select_candidates(model, run.tokenizer, task, instructions, instances, run.accelerator,
                                               score_prompts.ScoringSettings.of(config), progress=False)

    return Reselector(score, [c.instruction for c in shortlist], [c.index for c in shortlist], held_out,
                      chosen.selection.instruction, config, encode, (total_steps - 1) // config.reselect_every,
                      print_fn=run.accelerator.print)


@dataclass
class Training:
    """training.json: what training a task's adapter did (seconds summed over resumed segments)."""

    steps: int
    accumulation: int
    warmup_steps: int
    seconds: float  # training alone; re-selection time is selection overhead
    reselection_seconds: float = 0.0
    gradient_checkpointing: str = ""  # on | off as used (--gradient-checkpointing auto chooses; ours)
    estimated_peak_bytes: int = 0  # tasks.memory_plan's estimate for the mode used
    peak_memory_bytes: int = 0  # the peak actually reached (see peak_memory)
    peak_memory: str = ""  # what peak_memory_bytes measures


@dataclass
class Run:
    """What every step of the loop reads: the config, the launch, the data, the run directory, the tokenizer."""

    config: Config
    accelerator: object
    tasks: list[Task]
    run_dir: Path
    tokenizer: object
    base_path: str  # the base model (what --model resolves to)
    base_adapters: list[str]  # adapters --model already names (a saved stack)

    def task_dir(self, k: int, task: Task) -> Path:
        return self.run_dir / f"{k + 1}-{task.name}"

    @property
    def progress(self) -> bool:
        return self.accelerator.is_local_main_process

    def save(self, path: Path, obj):
        """A run file, written atomically by the main process; every process waits for it."""
        if self.accelerator.is_main_process:
            with writing(path):
                write_json(path, obj)
        self.accelerator.wait_for_everyone()


@dataclass
class ModelState:
    """The current model: base + every adapter trained so far, all active at their training scale."""

    model: object  # the transformers model (LoRA layers inside once there is an adapter)
    peft_model: object = None  # the peft wrapper once the first adapter exists
    adapter_dirs: list[str] = field(default_factory=list)  # this run's adapters, in training order

    def state_id(self, run: Run) -> str:
        return model_state_id(run.base_path, run.base_adapters + self.adapter_dirs)


@dataclass
class TaskSelection:
    """selection.json: how a task's training instruction was chosen. Written flat: the Selection's fields (scores of
    every candidate, the pick, racing rounds) plus these."""

    select: str  # the --select mode
    split: str  # the split the candidates were scored (and the adapter trained) on
    original: str
    selection: score_prompts.Selection
    note: str = ""
    reselections: list[Reselection] = field(default_factory=list)  # ours: mid-task re-scorings
    final_instruction: str | None = None  # the instruction training ended with (re-selection may switch it)
    dtype: str = ""  # the base weights' dtype of the model that scored the candidates (torch.bfloat16, ...)
    reselect_instances: str | None = None  # ours: the held-out instances re-selection scored on, e.g. train[1000:1250]

    @property
    def trained_with(self) -> str:
        return self.final_instruction or self.selection.instruction

    def to_json(self) -> dict:
        return {"select": self.select, "split": self.split, "original": self.original, "note": self.note,
                **self.selection.to_json(), "reselections": [dataclasses.asdict(r) for r in self.reselections],
                "final_instruction": self.final_instruction, "dtype": self.dtype,
                "reselect_instances": self.reselect_instances}

    @classmethod
    def from_json(cls, data: dict, where="selection.json") -> "TaskSelection":
        """The record as to_json wrote it (flat), checked for shape by tasks.records: one line naming `where`."""
        advice = redo_advice(Path(where).parent)
        if not isinstance(data, dict):
            return from_record(cls, data, where, advice=advice)  # raises: not an object
        names = {f.name for f in dataclasses.fields(score_prompts.Selection)}
        selection = from_record(score_prompts.Selection, {k: v for k, v in data.items() if k in names}, where,
                                advice=advice)
        return from_record(cls, {**{k: v for k, v in data.items() if k not in names}, "selection": selection}, where,
                           advice=advice)


@dataclass
class Row:
    """scores.json: one row of R, every task of the sequence evaluated with one model state."""

    row: str  # the row's label: zero-shot, or "after <task>"
    scores: dict[str, evaluate.TaskScores]  # task name -> evaluate.evaluate_task's result
    seconds: float

    def to_json(self) -> dict:
        return {"row": self.row, "scores": {name: s.to_json() for name, s in self.scores.items()},
                "seconds": self.seconds}


def redo_advice(task_dir: Path) -> str:
    """What to do about a damaged record of a task (its selection or training)."""
    return f"restore it, or delete {task_dir} and every later task folder to redo them"


def run_key(config: Config, tasks: list[Task], base_path: str, base_adapters: list[str]) -> RunKey:
    """What this run's results are made from: config values, each task's data and candidate pool, the model."""
    pools = ({} if config.select == "original" or config.generate else
             {t.name: pool_hash(config.pool_source().build(t)) for t in tasks if t.instruction.strip()})
    return RunKey(config={k: v for k, v in dataclasses.asdict(config).items()
                          if k not in RESUME_FREE and k not in INPUT_PATHS},
                  tasks=[[t.name, t.content_hash()] for t in tasks], pools=pools,
                  model=model_state_id(base_path, base_adapters), model_name=config.model)


def training_split(task, config) -> str:
    if "train" in task.missing_splits and config.train_on_dev_if_missing:
        return "dev"
    return "train"


def load_tasks(config: Config, accelerator) -> list[Task]:
    """The sequence's tasks, every split and candidate pool checked, before any model is loaded."""
    sequence = load_sequence(config.sequence, config.data_dir)
    n_train = max(config.train_instances, config.score_instances)
    if config.reselect_every:  # ours: built-in tasks also generate the held-out instances re-selection scores on
        n_train = config.train_instances + config.score_instances
    tasks = [load_task(name, sequence.data_dir, seed=config.builtin_seed, n_train=n_train)
             for name in sequence.task_names]
    for task in tasks:
        split = training_split(task, config)
        if split == "dev":
            accelerator.print(f"note: {task.name} has no train split; training and scoring on its dev split")
        task.split(split)  # raises a clear error for a missing or empty split
        task.split(config.eval_split)
        if config.select != "original" and task.instruction.strip():
            config.pool_source().check_task(task)  # a bad pool fails now, not hours later
        if config.reselect_every and config.select in ("sapo", "sapo-race"):
            reselection_instances(task, split, config)  # enough held-out instances, checked now
    return tasks


def write_results(run: Run, rows: list[Row], timings: dict[str, TaskTimings]) -> dict | None:
    """R.json (+ the report: metrics.json, R.csv, R.png) and timings.json, rewritten after every row. Returns the
    report's metrics (evaluate.write_report; None on the other processes)."""
    if not run.accelerator.is_main_process:
        return None
    metrics = evaluate.write_matrix(run.run_dir, [t.name for t in run.tasks], [(r.row, r.scores) for r in rows])
    if timings:
        write_json(run.run_dir / "timings.json", {name: t.to_json() for name, t in timings.items()})
    return metrics


def task_timings(chosen: TaskSelection, training: Training, row: Row) -> TaskTimings:
    """timings.json's entry of one task: selection (re-selection included) against training seconds."""
    selection_seconds = chosen.selection.seconds + sum(r.seconds for r in chosen.reselections)
    return TaskTimings.of(training, selection_seconds, row.seconds)


def save_stack(run: Run, state: ModelState, task_dir: Path, trained_with: dict[str, str]):
    """An adapter stack that `--model <task dir>` (tasks.models) loads as the state after this task, with the
    instructions its tasks were trained with."""
    run.save(task_dir / STACK_FILE, {"base_model": run.base_path, "instructions": dict(trained_with),
                                     "adapters": [os.path.abspath(a) for a in run.base_adapters]  # as given
                                     + [os.path.relpath(a, task_dir) for a in state.adapter_dirs]})  # beside it


def print_summary(run: Run, rows: list[Row], timings: dict[str, TaskTimings], metrics: dict | None):
    """The last row's report (write_results' metrics: on TRACE's own scores when R has them, else ROUGE-L)."""
    if not run.accelerator.is_main_process:
        return
    names = [t.name for t in run.tasks]
    print(f"\n{metrics['metric']}:")
    print(evaluate.markdown_table([[r.scores[n].score(metrics["metric"]) for n in names] for r in rows], names))
    print()
    print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float))))
    overhead = [t.selection_overhead_pct for t in timings.values() if t.selection_overhead_pct]
    if overhead:
        print(f"selection overhead: {sum(overhead) / len(overhead):.1f}% of training time (mean over tasks)")
    print(f"results: {run.run_dir.resolve()}  (R.json, metrics.json, timings.json, per-task folders)")


if __name__ == "__main__":
    main()
    exit_after_main()
