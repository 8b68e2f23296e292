"""Continual SAPO fine-tuning: for each task of a sequence, select the training instruction with the current model's
pre-update loss, train a new LoRA with it, evaluate every task of the sequence.

    accelerate launch train_sapo.py                                   # the offline demo (SmolLM2-135M, CPU is fine)
    accelerate launch train_sapo.py --preset paper --model Qwen/Qwen3-8B --data-dir ../shared/data/superni
    accelerate launch train_sapo.py --select sapo-race ...     # racing selection: a fraction of the scoring tokens
    accelerate launch --num_processes 8 train_sapo.py --preset paper ...        # several GPUs (DDP)
    accelerate launch --config_file fsdp.yaml train_sapo.py ...                 # FSDP / DeepSpeed via accelerate configs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_sapo.py ...   # 2 processes on CPU

The run directory holds config.json, zero-shot and per-task folders (`<k>-<task>/`: adapter, selection.json,
predictions, scores.json), R.json, metrics.json and timings.json. Rerunning the same command resumes: finished tasks
are skipped, training continues from its last checkpoint, selection from its score cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import IGNORE_INDEX, SapoError, cli_main, encode_example, pad_batch
from tasks.candidates import candidate_pool
from tasks.errors import exit_after_main
from tasks.loaders import load_sequence, load_task, read_json, write_json
from tasks.models import DEFAULT_MODEL, STACK_FILE, activate_adapters, adapter_name, load_model, load_tokenizer, \
    resolve, stack_adapters


# ----------------------------------------------------------------------------------------------------------------------
# Configuration: every flag, its default (the paper's recipe), and the presets.

@dataclass
class Config:
    model: str = DEFAULT_MODEL  # hub id, local dir, or the offline default
    sequence: str = "demo"  # built-in name, real-data name (ni_seq_c1, ...), or comma-separated task names
    data_dir: str | None = None  # SAPO-layout directory; None = built-in tasks
    method: str = "lora-inc"  # lora-inc | o-lora | seq-lora
    select: str = "sapo"  # sapo | sapo-race (racing: score_prompts.race_candidates) | original
    candidates: str | None = None  # JSON file of candidate instructions (task -> list); None = built-in pools
    generate: int = 0  # paraphrases to generate with a local chat model instead of a pool (see score_prompts.py)
    max_candidates: int | None = None  # use only the first N candidates of a pool (original included)
    score_instances: int = 250  # candidates are scored on the first N training instances
    race_first: int = 8  # sapo-race: instances of the first round (then x2 per round up to score_instances)
    race_confidence: float = 0.95  # sapo-race: confidence that the best candidate survives; 1.0 = never eliminate
    train_instances: int = 1000  # train on the first N training instances
    train_on_dev_if_missing: bool = False  # a task without a train split trains (and is scored) on dev, logged
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    global_batch_size: int = 64  # sequences per optimizer step, whatever the number of processes
    micro_batch_size: int = 8  # sequences per forward on one process; accumulation fills the rest
    max_grad_norm: float = 1.0
    max_source_length: int = 1536
    max_target_length: int = 128
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,v_proj"
    olora_lambda1: float = 0.5
    olora_lambda2: float = 0.0
    eval_prompt: str = "selected"  # selected | original: instruction for already-trained tasks at evaluation
    eval_split: str = "test"
    eval_instances: int | None = None  # None = the whole split
    eval_batch_size: int = 16
    max_new_tokens: int = 128
    score_token_budget: int = 16384
    reselect_every: int = 0  # optimizer steps between mid-task re-selections against the current weights; 0 = off
    reselect_top: int | None = None  # re-score only the best K candidates of the first selection (None = all)
    checkpoint_every: int = 0  # optimizer steps between training checkpoints; 0 = once per epoch
    seed: int = 42
    builtin_seed: int = 0  # seed of the built-in task generator
    output_dir: str = "runs/demo"
    report_to: str | None = None  # an accelerate tracker (tensorboard, wandb) when installed


PRESETS = {
    "paper": dict(sequence="ni_seq_c1", model="Qwen/Qwen3-8B", output_dir="runs/paper"),
    # Small enough to finish in minutes on a 2-core CPU with SmolLM2-135M; still the whole algorithm.
    "demo": dict(sequence="demo", model=DEFAULT_MODEL, score_instances=8, max_candidates=8, train_instances=48,
                 epochs=2, lr=1e-3, global_batch_size=8, micro_batch_size=8, eval_instances=16, max_new_tokens=12,
                 max_source_length=384, max_target_length=32, output_dir="runs/demo"),
}
# Fields that do not change results: a rerun may change them without being refused.
RESUME_FREE = {"report_to", "eval_batch_size", "score_token_budget", "checkpoint_every"}


def parse_config(argv=None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper = the original recipe; demo = small sizes (the default without any flag)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh when the output dir holds a run with another config (the old one is "
                             "moved aside, not deleted)")
    # --help text: each field's trailing comment in the Config source, plus its default.
    comments = dict(re.findall(r"^    (\w+):[^#\n]*#\s*(.+)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        base_type = f.type.split("|")[0].strip()  # annotations are strings here ("int | None")
        help_text = (comments.get(f.name, "") + f" (default: {f.default})").strip().replace("%", "%%")
        if base_type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(base_type, str), default=None,
                                help=help_text)
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    # No flags at all -> the demo preset; explicit flags override any preset value.
    preset = args.preset or ("demo" if not given else None)
    values = dict(PRESETS.get(preset, {}))
    values.update(given)
    config = Config(**values)
    checks = [(config.method in ("lora-inc", "o-lora", "seq-lora"), f"--method {config.method}"),
              (config.select in ("sapo", "sapo-race", "original"), f"--select {config.select}"),
              (config.race_first >= 1, f"--race-first {config.race_first}"),
              (0.0 < config.race_confidence <= 1.0, f"--race-confidence {config.race_confidence}"),
              (config.eval_prompt in ("selected", "original"), f"--eval-prompt {config.eval_prompt}"),
              (config.schedule in ("cosine", "linear", "constant"), f"--schedule {config.schedule}")]
    for ok, what in checks:
        if not ok:
            raise SapoError(f"unknown value {what}")
    return config, args.overwrite


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers: run files, the learning-rate schedule, batches that do not depend on the process count.

def read_json_if(path):
    """A run's own JSON file, or None before it is written (a damaged one is a one-line error naming it)."""
    return read_json(path) if Path(path).exists() else None


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup from 0 to the peak over warmup_steps, then cosine (or linear) decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batches(num_instances: int, global_batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Instance indices of every optimizer step: a seeded shuffle per epoch cut into global batches.

    The batches depend only on the data and the seed, never on the number of processes (the original code's subsets
    shrank with the GPU count); the last batch of an epoch may be smaller and is kept.
    """
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(num_instances, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        steps += [order[i:i + global_batch_size] for i in range(0, num_instances, global_batch_size)]
    return steps


def micro_batches(batch: list[int], num_slots: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """This process's share of one global batch, as (slot, instances) pairs.

    The global batch is dealt into num_slots = global batch / micro batch slots (slot s gets every num_slots-th
    instance), a number that does not depend on the process count; process r takes slots r, r + world, ... An empty
    slot (short last batch) stays empty and is run as a zero-weight step so every process does the same backward passes.
    """
    slots = [(s, batch[s::num_slots]) for s in range(num_slots)]
    return slots[rank::world]


# ----------------------------------------------------------------------------------------------------------------------
# O-LoRA: orthogonality between the new adapter's A and the earlier tasks' A matrices.

def olora_penalty(peft_model, new: str, previous: list[str], lambda1: float, lambda2: float):
    """lambda1 * sum over LoRA modules of sum |A_prev A_new^T|  +  lambda2 * sum over new LoRA tensors of ||p||_2.

    A_prev stacks the earlier tasks' A matrices of the module (r_prev x d_in), A_new is (r x d_in); the L1 norm of
    their product is zero when the new adapter reads a subspace orthogonal to every earlier one. The L2 term follows
    the O-LoRA code: the sum of the 2-norms of each new LoRA parameter tensor.
    """
    orth = torch.zeros(())
    l2 = torch.zeros(())
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or new not in lora_a:
            continue
        a_new = lora_a[new].weight
        orth = orth.to(a_new.device)
        if previous:
            a_prev = torch.cat([lora_a[p].weight for p in previous], dim=0).detach()
            orth = orth + (a_prev @ a_new.T).abs().sum()
        if lambda2:
            l2 = l2.to(a_new.device) + a_new.norm(p=2) + module.lora_B[new].weight.norm(p=2)
    return lambda1 * orth + lambda2 * l2.to(orth.device), orth


# ----------------------------------------------------------------------------------------------------------------------
# Training one task.

def encode_training_set(tokenizer, task, instruction, instances, config):
    max_length = config.max_source_length + config.max_target_length
    return [encode_example(tokenizer, instruction, inst.input, task.suffix, inst.label, max_length=max_length)
            for inst in instances]


class Reselector:
    """State-adaptive re-selection during training: every `reselect_every` steps, re-score a shortlist of candidates
    against the weights being trained and switch the training instruction when another one has the lowest loss.
    Every re-scoring is logged (step, scores, choice, seconds) and its time counts as selection overhead."""

    def __init__(self, accelerator, tokenizer, task, shortlist, instances, instruction, config, encode):
        self.accelerator, self.tokenizer, self.task = accelerator, tokenizer, task
        self.shortlist, self.instances, self.config, self.encode = shortlist, instances, config, encode
        self.current, self.events, self.seconds = instruction, [], 0.0

    def __call__(self, model, step):
        """Re-score with `model` (the transformers model, LoRA layers inside); new encoded data if switching."""
        import score_prompts

        start = time.perf_counter()
        score = score_prompts.score_candidates
        if self.config.select == "sapo-race":
            score = functools.partial(score_prompts.race_candidates, first=self.config.race_first,
                                      confidence=self.config.race_confidence)
        result = score(
            model, self.tokenizer, self.task, self.shortlist, self.instances, self.accelerator,
            token_budget=self.config.score_token_budget,
            max_length=self.config.max_source_length + self.config.max_target_length, progress=False)
        best = self.shortlist[result["selected"]]
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.events.append({"step": step, "selected_instruction": best, "switched": best != self.current,
                            "scores": [c["score"] for c in result["candidates"]], "seconds": seconds})
        if best == self.current:
            return None
        self.accelerator.print(f"  step {step}: switching the training instruction to {best[:80]!r}")
        self.current = best
        return self.encode(best)


def train_task(accelerator, peft_model, name, previous, encoded, config, task_dir, progress, reselect=None):
    """Train adapter `name` of `peft_model` on the encoded instances; resumable from task_dir/checkpoint."""
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = config.micro_batch_size * world
    if config.global_batch_size % per_step:
        raise SapoError(f"--global-batch-size {config.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{config.micro_batch_size} x {world} processes")
    accumulation = config.global_batch_size // per_step
    accelerator.gradient_accumulation_steps = accumulation
    steps = global_batches(len(encoded), config.global_batch_size, config.epochs, config.seed)
    total_steps = len(steps)
    warmup_steps = max(1, round(config.warmup_ratio * total_steps))
    steps_per_epoch = math.ceil(len(encoded) / config.global_batch_size)
    checkpoint_every = config.checkpoint_every or steps_per_epoch

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # The scheduler is stepped by hand once per optimizer step: accelerate's prepared scheduler steps once per process,
    # which would make the schedule depend on the number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.schedule))
    model, optimizer = accelerator.prepare(peft_model, optimizer)

    checkpoint = task_dir / "checkpoint"
    start_step = 0
    if (checkpoint / "sapo_step.json").exists():
        accelerator.load_state(str(checkpoint), strict=False)
        saved = read_json(checkpoint / "sapo_step.json")
        start_step = saved["step"]
        if reselect is not None and saved.get("instruction", reselect.current) != reselect.current:
            reselect.current, reselect.events = saved["instruction"], saved["reselections"]
            encoded = reselect.encode(reselect.current)
        for _ in range(start_step):  # the schedule is a function of the step alone: replay it
            scheduler.step()
        accelerator.print(f"resuming training of {task_dir.name} at step {start_step}/{total_steps}")

    pad_id = 0
    log_path = task_dir / "train_log.jsonl"
    model.train()
    bar = tqdm(range(start_step, total_steps), desc=f"train {task_dir.name}", disable=not progress,
               initial=start_step, total=total_steps)
    for step in bar:
        batch = steps[step]
        # Token-weighted mean over the whole global batch: every micro-batch's summed NLL is divided by the number
        # of response tokens of the global batch (all processes, all micro-steps), known before the step.
        total_tokens = sum(sum(t != IGNORE_INDEX for t in encoded[i].labels[1:]) for i in batch)
        step_nll = torch.zeros((), device=accelerator.device)
        penalty_value = torch.zeros((), device=accelerator.device)
        for slot, micro in micro_batches(batch, accumulation * world, rank, world):
            weight = 1.0 if micro else 0.0
            micro = micro or batch[:1]  # an empty slot runs a real sequence at zero weight to keep processes in step
            # Dropout masks seeded by (seed, step, slot): the same masks on any number of processes, and after a resume.
            torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + slot)
            with accelerator.accumulate(model):
                input_ids = pad_batch([encoded[i].input_ids for i in micro], pad_id).to(accelerator.device)
                labels = pad_batch([encoded[i].labels for i in micro], IGNORE_INDEX).to(accelerator.device)
                attention_mask = pad_batch([[1] * len(encoded[i].input_ids) for i in micro], 0).to(accelerator.device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                nll_sum = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum") * weight
                # accelerate divides by the accumulation steps and DDP averages over processes: undo both so the
                # gradient is exactly that of sum(NLL) / total_tokens.
                loss = nll_sum / total_tokens * accumulation * world
                if config.method == "o-lora":
                    penalty, orth = olora_penalty(accelerator.unwrap_model(model), name, previous,
                                                  config.olora_lambda1, config.olora_lambda2)
                    loss = loss + penalty
                    penalty_value = orth.detach()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                step_nll += nll_sum.detach()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        step_loss = accelerator.reduce(step_nll, reduction="sum").item() / total_tokens
        record = {"step": step + 1, "loss": step_loss, "lr": lr}
        if config.method == "o-lora":
            record["olora_orth"] = penalty_value.item()
        accelerator.log({f"{task_dir.name}/{k}": v for k, v in record.items() if k != "step"}, step=step + 1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if reselect is not None and config.reselect_every and (step + 1) % config.reselect_every == 0 \
                and step + 1 < total_steps:
            encoded = reselect(accelerator.unwrap_model(model).get_base_model(), step + 1) or encoded
        if (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            extra = {"instruction": reselect.current, "reselections": reselect.events} if reselect else {}
            save_checkpoint(accelerator, checkpoint, step + 1, extra)
    bar.close()
    model.eval()
    accelerator.wait_for_everyone()
    peft_model = accelerator.unwrap_model(model)
    accelerator.free_memory()  # drop accelerate's references so the next task prepares a fresh wrapper
    return peft_model, {"steps": total_steps, "accumulation": accumulation, "warmup_steps": warmup_steps}


def next_stack(adapter_dirs: list[str], adapter_dir: Path, config) -> list[str]:
    """The adapters of the state after this task: all so far plus this one (seq-lora: only the latest)."""
    return [str(adapter_dir)] if config.method == "seq-lora" else adapter_dirs + [str(adapter_dir)]


def save_adapter(peft_model, name: str, adapter_dir: Path):
    """Save one adapter so that stock `PeftModel.from_pretrained(base, adapter_dir)` loads it."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), selected_adapters=[name])
    saved = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp  # peft nests non-default names
    os.replace(saved, adapter_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(adapter_dir.parent / "checkpoint", ignore_errors=True)


def keep_trainable_weights(models, weights, output_dir):
    """save_state hook: checkpoint only the parameters being trained (the new adapter), not the frozen base model;
    load_state(strict=False) puts them back. A checkpoint of an 8B model is then megabytes, not 16 GB."""
    for i, model in enumerate(models):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


def save_checkpoint(accelerator, checkpoint: Path, step: int, extra=None):
    """save_state into a fresh folder, then swap it in: a crash mid-save keeps the previous checkpoint."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "sapo_step.json").write_text(json.dumps({"step": step, **(extra or {})}))
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        os.replace(tmp, checkpoint)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------------
# The run.

def prepare_run_dir(config: Config, overwrite: bool, accelerator) -> Path:
    """Create the run dir, or check that an existing one was made with the same config (then the run resumes)."""
    run_dir = Path(config.output_dir)
    saved = read_json_if(run_dir / "config.json")
    current = dataclasses.asdict(config)
    if saved is not None:
        changed = sorted(k for k in set(saved) | set(current)
                         if k not in RESUME_FREE and saved.get(k) != current.get(k))
        if changed and not overwrite:
            raise SapoError(f"{run_dir} holds a run with another config ({', '.join(changed)} differ); use another "
                            "--output-dir, or --overwrite to move the old run aside and start afresh")
        if changed and accelerator.is_main_process:
            backup = run_dir.with_name(run_dir.name + time.strftime(".old-%Y%m%d-%H%M%S"))
            os.replace(run_dir, backup)
            print(f"moved the earlier run to {backup}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", current)
    accelerator.wait_for_everyone()
    return run_dir


def training_split(task, config):
    if "train" in task.missing_splits and config.train_on_dev_if_missing:
        return "dev"
    return "train"


@cli_main
def main(argv=None):
    config, overwrite = parse_config(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    import evaluate
    import score_prompts

    accelerator = Accelerator(log_with=config.report_to, project_dir=config.output_dir)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    progress = accelerator.is_local_main_process
    set_seed(config.seed)

    # Data first: a bad task name or data dir fails before any model is loaded.
    sequence = load_sequence(config.sequence, config.data_dir)
    tasks = [load_task(name, sequence.data_dir, seed=config.builtin_seed,
                       n_train=max(config.train_instances, config.score_instances)) for name in sequence.task_names]
    for task in tasks:
        split = training_split(task, config)
        if split == "dev":
            accelerator.print(f"note: {task.name} has no train split; training and scoring on its dev split")
        task.split(split)  # raises a clear error for a missing or empty split
        task.split(config.eval_split)
        if config.select != "original" and not config.generate:
            candidate_pool(task, config.candidates, config.max_candidates)  # a bad pool fails now, not hours later
    run_dir = prepare_run_dir(config, overwrite, accelerator)
    if config.report_to:
        accelerator.init_trackers("sapo", config={k: v for k, v in dataclasses.asdict(config).items()
                                                  if isinstance(v, (int, float, str, bool))})

    base_path, base_adapters = resolve(config.model)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)  # the base (plus any adapters --model already names)
    names = [t.name for t in tasks]
    selected = {}  # task name -> the instruction it was trained with
    adapter_dirs = []  # this run's adapters, in training order
    timings = read_json_if(run_dir / "timings.json") or {}
    R = {"tasks": names, "rows": [], "rougeL": [], "exact_match": []}

    def eval_row(row_name, row_dir, instruction_of):
        """Evaluate every task of the sequence; the scores of one row of R (resumed from scores.json if done)."""
        done = read_json_if(row_dir / "scores.json")
        if done is not None:
            return done
        start = time.perf_counter()
        scores = {}
        for task in tasks:
            result = evaluate.evaluate_task(
                model, tokenizer, task, instruction_of(task), accelerator, split=config.eval_split,
                max_instances=config.eval_instances, batch_size=config.eval_batch_size,
                max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_source_length,
                predictions_path=row_dir / "predictions" / f"{task.name}.jsonl", lang="auto", progress=progress)
            scores[task.name] = result
        seconds = time.perf_counter() - start
        record = {"row": row_name, "scores": scores, "seconds": seconds}
        if accelerator.is_main_process:
            write_json(row_dir / "scores.json", record)
        accelerator.wait_for_everyone()
        return record

    def add_row(record):
        R["rows"].append(record["row"])
        for metric in ("rougeL", "exact_match"):
            R[metric].append([record["scores"][n][metric] for n in names])
        if accelerator.is_main_process:
            write_json(run_dir / "R.json", R)
            evaluate.write_report(run_dir)

    # Row 0 of R: the base model, zero-shot, original instructions (the original code never computed it: FWT needs it).
    add_row(eval_row("zero-shot", run_dir / "0-zero-shot", lambda t: t.instruction))

    peft_model = None  # the peft wrapper once the first adapter exists
    for k, task in enumerate(tasks):
        task_dir = run_dir / f"{k + 1}-{task.name}"
        adapter_dir = task_dir / "adapter"
        split = training_split(task, config)
        record = timings.get(task.name, {})

        def instruction_of(t):
            """Trained tasks: their selected instruction (or the original, by choice); untrained: the original."""
            return selected.get(t.name, t.instruction) if config.eval_prompt == "selected" else t.instruction

        finished = read_json_if(task_dir / "scores.json")
        if finished is not None:  # resumed run: this task is done, take its results as they are
            done_selection = read_json_if(task_dir / "selection.json")
            selected[task.name] = done_selection.get("final_instruction", done_selection["instruction"])
            adapter_dirs = next_stack(adapter_dirs, adapter_dir, config)
            add_row(finished)
            continue
        if adapter_dirs and peft_model is None:  # resumed run: rebuild the state from the saved adapters
            peft_model = stack_adapters(model, adapter_dirs)
            model = peft_model.get_base_model()

        # 1. Select the training instruction against the CURRENT state: base + every adapter so far, as trained.
        selection = read_json_if(task_dir / "selection.json")
        if selection is None:
            pool = [task.instruction]
            if config.select in ("sapo", "sapo-race") and config.generate:
                pool = score_prompts.generate_paraphrases(task, config.generate, model, tokenizer, seed=config.seed,
                                                          cache_path=task_dir / "paraphrases.json")
            elif config.select in ("sapo", "sapo-race"):
                pool = candidate_pool(task, config.candidates, config.max_candidates)
            start = time.perf_counter()
            score = score_prompts.score_candidates
            if config.select == "sapo-race":  # the same pool, scored by racing
                score = functools.partial(score_prompts.race_candidates, first=config.race_first,
                                          confidence=config.race_confidence)
            if len(pool) > 1:
                result = score(
                    model, tokenizer, task, pool, task.split(split)[:config.score_instances], accelerator,
                    token_budget=config.score_token_budget,
                    max_length=config.max_source_length + config.max_target_length,
                    cache_path=task_dir / "score_cache.json",
                    state_id=score_prompts.model_state_id(base_path, base_adapters + adapter_dirs), progress=progress)
            else:
                result = {"selected": 0, "candidates": [{"index": 0, "instruction": task.instruction}]}
            selection = {"task": task.name, "select": config.select, "selected": result["selected"],
                         "instruction": pool[result["selected"]], "original": task.instruction, "split": split,
                         "seconds": time.perf_counter() - start, "candidates": result["candidates"]}
            if "rounds" in result:  # racing: what was scored in each round, and what it saved
                selection.update({k: result[k] for k in ("rounds", "tokens_scored", "exhaustive_tokens")})
            if accelerator.is_main_process:
                write_json(task_dir / "selection.json", selection)
            accelerator.wait_for_everyone()
        selected[task.name] = selection["instruction"]
        accelerator.print(f"[{k + 1}/{len(tasks)}] {task.name}: training with candidate {selection['selected']} of "
                          f"{len(selection['candidates'])}: {selection['instruction'][:90]!r}")

        # 2. Train: a new LoRA for this task (seq-lora: the one LoRA, continued), earlier adapters frozen and active.
        previous = [] if config.method == "seq-lora" else [adapter_name(i) for i in range(len(adapter_dirs))]
        name = adapter_name(0) if config.method == "seq-lora" else adapter_name(len(adapter_dirs))
        if not (adapter_dir / "adapter_config.json").exists():
            # Seeded per task, so a run resumed at any task initialises and drops out exactly as an uninterrupted one.
            set_seed(config.seed + k)
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=config.lora_targets.split(","), task_type="CAUSAL_LM")
            if peft_model is None:
                peft_model = get_peft_model(model, lora, adapter_name=name)
            elif name not in peft_model.peft_config:
                peft_model.add_adapter(name, lora)
            activate_adapters(peft_model, previous + [name], trainable=name)
            train_instances = task.split(split)[:config.train_instances]
            encoded = encode_training_set(tokenizer, task, selection["instruction"], train_instances, config)
            reselect = None
            if config.reselect_every and config.select in ("sapo", "sapo-race") and len(selection["candidates"]) > 1:
                # Racing: the candidates that lasted longest first (their scores cover more instances).
                ranked = sorted(selection["candidates"],
                                key=lambda c: (-c.get("num_instances_scored", 0), c["score"], c["index"]))
                shortlist = [c["instruction"] for c in ranked[:config.reselect_top or len(ranked)]]
                reselect = Reselector(accelerator, tokenizer, task, shortlist,
                                      task.split(split)[:config.score_instances], selection["instruction"], config,
                                      lambda text: encode_training_set(tokenizer, task, text, train_instances, config))
            start = time.perf_counter()
            peft_model, info = train_task(accelerator, peft_model, name, previous, encoded, config, task_dir, progress,
                                          reselect)
            # Re-selection time is selection overhead, not training time.
            reselect_seconds = reselect.seconds if reselect else 0.0
            record.update(info, training_seconds=time.perf_counter() - start - reselect_seconds
                          + record.get("training_seconds", 0.0))
            if reselect is not None:
                record["reselection_seconds"] = reselect_seconds
                selection.update(reselections=reselect.events, final_instruction=reselect.current)
                if accelerator.is_main_process:
                    write_json(task_dir / "selection.json", selection)
            if accelerator.is_main_process:
                save_adapter(peft_model, name, adapter_dir)
            accelerator.wait_for_everyone()
        elif peft_model is None or name not in peft_model.peft_config or config.method == "seq-lora":
            # Trained in an earlier process, interrupted before its evaluation finished: load it as saved.
            peft_model = stack_adapters(peft_model.unload() if peft_model else model,
                                        next_stack(adapter_dirs, adapter_dir, config))
        adapter_dirs = next_stack(adapter_dirs, adapter_dir, config)
        activate_adapters(peft_model, previous + [name], trainable=None)
        model = peft_model.get_base_model().eval()  # the transformers model with every LoRA layer inside
        if accelerator.is_main_process:
            # An adapter stack that `--model <task dir>` (tasks.models.load_model) loads as the state after task k.
            write_json(task_dir / STACK_FILE, {"base_model": base_path, "adapters": base_adapters + [
                os.path.relpath(a, task_dir) for a in adapter_dirs]})

        # 3. Evaluate every task of the sequence: row k+1 of R.
        # Evaluation uses the instruction training ended with (re-selection may have switched it).
        selected[task.name] = selection.get("final_instruction", selection["instruction"])
        row = eval_row(f"after {task.name}", task_dir, instruction_of)
        record["evaluation_seconds"] = row["seconds"]
        record["selection_seconds"] = selection["seconds"] + sum(e["seconds"] for e in selection.get("reselections", []))
        if record.get("training_seconds"):
            record["selection_overhead_pct"] = 100.0 * record["selection_seconds"] / record["training_seconds"]
        timings[task.name] = record
        if accelerator.is_main_process:
            write_json(run_dir / "timings.json", timings)
        add_row(row)

    # Summary.
    if accelerator.is_main_process:
        metrics = evaluate.write_report(run_dir)
        print()
        print(evaluate.markdown_table(R["rougeL"], names))
        print()
        print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float))))
        overhead = [t.get("selection_overhead_pct") for t in timings.values() if t.get("selection_overhead_pct")]
        if overhead:
            print(f"selection overhead: {sum(overhead) / len(overhead):.1f}% of training time (mean over tasks)")
        print(f"results: {run_dir.resolve()}  (R.json, metrics.json, timings.json, per-task folders)")
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_after_main()
