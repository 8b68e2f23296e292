"""Evaluation for SAPO: greedy generation, ROUGE-L / exact match per task, and the continual-learning metrics of the
score matrix R.

Two ways to run it:

    # report: recompute the metrics of a run from its R.json and print them and R as a markdown table. Reporting
    # only reads (an archived, read-only run works); --write also writes metrics.json, R.csv (+ R_exact_match.csv)
    # and an R.png heatmap into the run directory, as train_sapo.py does at the end of a run
    python evaluate.py runs/my_run
    python evaluate.py runs/my_run --write
    python evaluate.py --compare runs/original runs/sapo        # several runs side by side (one column per run)

    # run: evaluate a model (a hub id, an HF directory, a peft adapter or an adapter stack) on named tasks, e.g. the
    # zero-shot row; the same command runs on CPU, one GPU or many (the topology lives in `accelerate launch`)
    python evaluate.py --model DIR --tasks task195,task1310 --data-dir ../shared/data/superni --output-dir out/
    python evaluate.py --model runs/my_run/2-task1310 --tasks task195,task1310 --data-dir ...   # reproduces row 2 of R
    accelerate launch --num_processes 8 evaluate.py --model runs/my_run/5-task224 --tasks ... --output-dir out/
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 evaluate.py --model DIR --tasks ...
    python evaluate.py --model runs/my_run/5-task224 --tasks ... --engine openai --api-base http://127.0.0.1:8000/v1 \
        --served-model NAME                      # a served model (vLLM, SGLang) answers: tasks/served.py

    # export: the adapter stack of a task folder folded into one stock peft LoRA (rank = sum of ranks), for vLLM
    python evaluate.py --export-adapter runs/my_run/3-task273 out/fold3

    Instructions: a run's task folder (an adapter stack) stores the instruction each of its tasks was trained with;
    those are used for the tasks it names (--original-instructions: the originals for all). --instructions FILE
    (JSON {task: instruction} or {task: {"instruction": ...}}) overrides both for the tasks it names. --dtype
    auto|bf16|fp16|fp32 is the base weights' dtype (auto: bf16 on a GPU that supports it, else fp32). The run mode
    writes OUTPUT_DIR/predictions/<task>.jsonl and OUTPUT_DIR/scores.json.

Scores (x100, averaged over instances):
- ROUGE-L F1 from rouge-score with the Porter stemmer, max over an instance's references. rouge-score's default
  tokenizer keeps only [a-z0-9], so Chinese would score 0: for lang != "en" every CJK character is one token and other
  words are runs of letters/digits (lang="auto" picks "zh" when the references hold CJK characters).
- Exact match: lower-cased, punctuation removed, whitespace collapsed, then equal to any reference.
- trace: TRACE's own score of a TRACE task (tasks/trace_metrics.py): accuracy for C-STANCE, FOMC, ScienceQA (its
  answer letter) and NumGLUE, Py150's edit similarity (fuzzywuzzy's ratio after TRACE's post-processing), MeetingBank's
  ROUGE-L (the `rouge` package, as TRACE calls it). A task without a TRACE definition has none; R.json holds a
  "trace" matrix when every task of the run has one, and the reports then use it by default (--metric picks another).

The score matrix R has N+1 rows and N columns: row 0 = zero-shot, row i = scores on every task after training task i
(1-based task numbers below; R[i][j] is row i, task j). n = the last row given (a partial run has fewer rows):
- AP       = mean_j R[n][j]                                           (all N tasks, last row given)
- BWT      = mean_{i=2..n} mean_{j<i} (R[i][j] - R[j][j])             (forgetting averaged over stages; None if n < 2)
- FWT      = mean_{i=1..min(n,N-1)} mean_{j>i} (R[i][j] - R[0][j])   (gain on unseen tasks; None if n < 1 or N < 2)
- BWT_last = mean_{j<n} (R[n][j] - R[j][j])                           (GEM's BWT: last row only; None if n < 2)
- OP       = mean_{j<=n} R[n][j]                                      (TRACE's overall performance over seen tasks)

Generation: prompts are built by tasks.prompts.encode_generation_prompt with the task's input label (the input text
is shortened when too long, and a note says for how many inputs of a task), batched
with left padding, greedy, stopped at EOS or the chat template's end-of-turn token; the answer is the decoded generated
tokens only. Batches are formed from the globally length-sorted prompts and dealt round-robin to the processes, so every
batch (and its padding) is the same whatever the number of processes: 1 and 8 processes give the same answers.
Ours: batches hold up to --eval-token-budget tokens of prompt + answer, finished sequences leave the batch at once,
and an adapter stack runs as one folded adapter (tasks/generation.py, tasks/fold.py).
ZeRO-3 and FSDP2 launches shard the weights (tasks/sharding.py): every process then joins every forward (see
generate_answers).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import re
import shutil
import string
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.errors import SapoError, cli_main, exit_after_main
from tasks.flags import Range, add_config_flags, check_ranges
from tasks.loaders import strict_json, write_json, write_text_atomic
from tasks.prompts import HAN_CHARACTERS, MAX_SOURCE_LENGTH, encode_generation_prompt, pad_batch, render_prompt, \
    render_response
from tasks.sharding import load_device, lockstep, shard_for_inference, weights_for_forward
from tasks.trace_metrics import trace_metric, trace_score

METRICS = ("AP", "BWT", "FWT", "BWT_last", "OP")
SCORES = ("rougeL", "exact_match", "trace")


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS, the model's generation EOS ids, and the chat end-of-turn token (the first special token the template puts
    after an assistant answer: <|im_end|>, <|eot_id|>, <end_of_turn>, ...)."""
    ids = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    try:
        answer = "Answer 42."
        prompt = render_prompt(tokenizer, "", "", "")
        response = render_response(tokenizer, prompt, "", "", "", answer)
        after = response[response.index(answer) + len(answer):]  # what the template puts after the answer
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        ids += [next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)]
    except (SapoError, ValueError):  # no chat template (encode_prompt will say so), or the answer is not rendered as is
        pass
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()  # not inference_mode: buffers a module creates lazily here must stay usable when training resumes
def generate_answers(model, tokenizer, task, instruction, instances, accelerator, *, batch_size=None,
                     max_new_tokens=128, max_prompt_tokens=MAX_SOURCE_LENGTH, progress=True, token_budget="auto",
                     compile=False, engine=None, fold=True) -> list[str]:
    """Greedy answers to `instances` (same order), prompted with `instruction` and the task's suffix.

    Batches hold up to `token_budget` tokens of prompt + answer ("auto": per device, tasks.generation; None: fixed
    batches of `batch_size`), at most `batch_size` sequences (None: up to 256). The active adapters are folded into
    one (tasks.fold; `fold=False`: run them unmerged, for comparison). compile: HF's static cache and torch.compile of
    the decode step (CUDA only; elsewhere a note and the plain path). engine: a tasks.served.ServedEngine that answers
    instead of the model (the same prompts, token for token)."""
    from tqdm.auto import tqdm

    from tasks.fold import folded_adapter
    from tasks.generation import cut_at_stop, default_token_budget, greedy_decode, hf_generate, plan_batches

    net = accelerator.unwrap_model(model) if model is not None else None
    stops = list(engine.stop_ids) if engine is not None and engine.stop_ids else stop_token_ids(tokenizer, net)
    if not stops:
        raise SapoError("the tokenizer has no EOS token and its chat template no end-of-turn token: cannot stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    encoded = [encode_generation_prompt(tokenizer, instruction, inst.input, task.suffix, max_prompt_tokens,
                                        input_label=task.input_label) for inst in instances]
    prompts = [e.input_ids for e in encoded]
    shortened = sum(e.truncated for e in encoded)
    if shortened:
        accelerator.print(f"note: {shortened} of {len(instances)} inputs of task {task.name} were shortened to fit "
                          f"the prompt limit of {max_prompt_tokens} tokens")
    if engine is not None:  # the server batches; every prompt goes as its token ids
        return engine.generate(prompts, stops, max_new_tokens, what=f"task {task.name}")

    device = next(net.parameters()).device
    if token_budget == "auto":
        token_budget = default_token_budget(net, device)
        if accelerator.num_processes > 1:  # free memory differs per GPU: every process must cut the same plan
            token_budget = int(accelerator.gather(torch.tensor([token_budget], device=accelerator.device)).min())
    static = bool(compile) and device.type == "cuda"
    if compile and not static:
        accelerator.print(f"note: --eval-compile is for CUDA; generating on {device.type} with the plain path")
    # Cut from the GLOBAL longest-first order and dealt round-robin, so every batch (and its padding) is the same
    # whatever the number of processes (tasks.generation)
    plan = plan_batches([len(p) for p in prompts], max_new_tokens, token_budget=token_budget,
                        max_sequences=batch_size)
    my_batches = plan.batches[accelerator.process_index::accelerator.num_processes]
    # Sharded (FSDP2 / ZeRO-3, tasks/sharding.py): every forward gathers weights collectively, so every process runs
    # as many generate calls (a discarded batch beyond its own), each with HF's synced_gpus (a process that is done
    # steps on until every one is), and the adapters unfolded (the fold reads the LoRA weights directly).
    sharded = lockstep(net)
    rounds = math.ceil(len(plan.batches) / accelerator.num_processes) if sharded else len(my_batches)

    was_training = net.training
    net.eval()
    mine = []  # (instance index, answer)
    try:
        with folded_adapter(net) if fold and not sharded else contextlib.nullcontext():
            bar = tqdm(range(rounds), desc=f"generate {task.name}",
                       disable=not (progress and accelerator.is_main_process))
            for r in bar:
                batch = my_batches[r] if r < len(my_batches) else plan.batches[-1]
                batch_prompts = [prompts[i] for i in batch]
                if sharded:
                    with weights_for_forward(net):
                        rows = hf_generate(net, batch_prompts, pad_id, stops, max_new_tokens, synced_gpus=True)
                elif static:
                    rows = hf_generate(net, batch_prompts, pad_id, stops, max_new_tokens, static=True, compile=True)
                else:
                    rows = greedy_decode(net, batch_prompts, pad_id, stops, max_new_tokens)
                if r >= len(my_batches):  # the discarded batch
                    continue
                for i, row in zip(batch, rows):  # drop the stop token (+ padding)
                    mine.append((i, tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True).strip()))
    finally:
        net.train(was_training)

    # gather_object (not gather_for_metrics: that would trim "duplicates" if called inside another dataloader's loop)
    from accelerate.utils import gather_object

    gathered = sorted(gather_object(mine)) if accelerator.num_processes > 1 else sorted(mine)
    if [i for i, _ in gathered] != list(range(len(instances))):
        raise RuntimeError(f"gathered {len(gathered)} answers for {len(instances)} instances")
    return [answer for _, answer in gathered]


# ----------------------------------------------------------------------------------------------------------------------
# Scores of one answer

_CJK = "\u3040-\u30ff" + HAN_CHARACTERS  # kana and Han: written without spaces
_CJK_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class MultilingualTokenizer:
    """rouge-score tokenizer for lang != "en": each CJK character is a token, other tokens are runs of letters and
    digits (any script), lower-cased; ASCII words longer than 3 characters are Porter-stemmed as rouge-score does."""

    def __init__(self):
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text):
        tokens = _TOKEN_RE.findall(text.lower())
        return [self.stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


@functools.lru_cache(maxsize=None)
def _rouge_scorer(lang: str):
    from rouge_score import rouge_scorer

    if lang == "en":
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=MultilingualTokenizer())


def rouge_l(prediction: str, references: list[str], lang="en") -> float:
    """ROUGE-L F1 x 100, max over references."""
    if isinstance(references, str):
        references = [references]
    scorer = _rouge_scorer(lang)
    return float(max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)) * 100


def normalize_answer(text: str) -> str:
    """Lower-case, every punctuation character (ASCII or Unicode) removed, whitespace collapsed."""
    # string.punctuation also holds ASCII symbols ($ + < = > ^ ` | ~) that Unicode files under S*, not P*
    text = "".join(c for c in text.lower()
                   if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    """100 if the normalized prediction equals any normalized reference, else 0."""
    if isinstance(references, str):
        references = [references]
    return 100.0 * any(normalize_answer(prediction) == normalize_answer(ref) for ref in references)


def score_lang(instances) -> str:
    """'zh' when any reference holds CJK characters, else 'en' (what lang="auto" means)."""
    return "zh" if any(_CJK_RE.search(ref) for inst in instances for ref in inst.outputs) else "en"


# ----------------------------------------------------------------------------------------------------------------------
# One task


@dataclass
class TaskScores:
    """What evaluate_task returns for one task (a row's entry in scores.json); TRACE's own score for its tasks."""

    rougeL: float
    exact_match: float
    num_instances: int
    trace: float | None = None  # TRACE's own score (tasks/trace_metrics.py); None for a task TRACE does not define
    trace_metric: str | None = None  # its name (accuracy, edit_similarity, rouge-L, ...)

    def score(self, name: str) -> float | None:
        """The score named `name`, one of SCORES (None: this task has no such score, e.g. trace of a non-TRACE
        task)."""
        if name not in SCORES:
            raise ValueError(f"unknown score {name!r} (expected one of {', '.join(SCORES)})")
        return getattr(self, name)

    def to_json(self) -> dict:
        """scores.json's entry, as it has always been written: the trace keys only for a task that has them."""
        trace = {"trace": self.trace, "trace_metric": self.trace_metric} if self.trace is not None else {}
        return {"rougeL": self.rougeL, "exact_match": self.exact_match, **trace, "num_instances": self.num_instances}


def evaluate_task(model, tokenizer, task, instruction, accelerator, *, split="test", max_instances=None, batch_size=16,
                  max_new_tokens=128, max_prompt_tokens=MAX_SOURCE_LENGTH, predictions_path=None, lang="en",
                  progress=True, **generation) -> TaskScores:
    """The scores (ROUGE-L, exact match) of greedy answers on the first `max_instances` of `split`, plus TRACE's own
    for a task TRACE scores its own way. Every process returns the same scores; the predictions JSONL is written by
    the main process. `generation`: generate_answers' token_budget, compile, engine,
    fold."""
    instances = task.split(split)
    if max_instances is not None:
        if max_instances < 1:
            raise SapoError(f"max_instances must be at least 1, got {max_instances}")
        instances = instances[:max_instances]  # the first ones, whatever the number of processes
    if lang == "auto":
        lang = score_lang(instances)
    answers = generate_answers(model, tokenizer, task, instruction, instances, accelerator, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, progress=progress,
                               **generation)
    records = [{"input": inst.input, "references": list(inst.outputs), "prediction": answer,
                "rougeL": rouge_l(answer, inst.outputs, lang), "exact_match": exact_match(answer, inst.outputs)}
               for inst, answer in zip(instances, answers)]
    metric = trace_metric(task.name)
    if metric is not None:
        for record in records:
            record["trace"] = trace_score(task.name, record["prediction"], record["references"])
    if predictions_path is not None and accelerator.is_main_process:
        write_text_atomic(predictions_path, "".join(strict_json(r, predictions_path) + "\n" for r in records))
    scores = {score: sum(r[score] for r in records) / len(records) for score in SCORES if score in records[0]}
    return TaskScores(**scores, trace_metric=metric, num_instances=len(records))


# ----------------------------------------------------------------------------------------------------------------------
# The score matrix R


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def check_matrix(R, num_tasks=None, where="R") -> list[list[float]]:
    """R as floats; a SapoError unless it has 1..N+1 rows of N finite numbers each."""
    if not isinstance(R, list) or not R or not all(isinstance(row, list) for row in R):
        raise SapoError(f"{where} must be a non-empty list of rows")
    N = num_tasks if num_tasks is not None else len(R[0])
    if N < 1 or len(R) > N + 1:
        raise SapoError(f"{where} has {len(R)} rows for {N} tasks (expected 1 to {N + 1})")
    out = []
    for i, row in enumerate(R):
        if len(row) != N:
            raise SapoError(f"{where} row {i} has {len(row)} scores, expected {N}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
            raise SapoError(f"{where} row {i} holds a value that is not a finite number: {row}")
        out.append([float(v) for v in row])
    return out


def cl_metrics(R: list[list[float]], num_tasks: int | None = None) -> dict:
    """AP, BWT, FWT, BWT_last, OP of the rows given (see the module docstring); None where a metric is undefined on
    them. `rows_used` names the rows of R each metric read; `progress` says how many tasks the rows cover."""
    R = check_matrix(R, num_tasks)
    N, n = len(R[0]), len(R) - 1  # tasks; last trained task (row n)
    c = lambda i, j: R[i][j - 1]  # noqa: E731 -- R[i][j] with 1-based task j, as in the formulas
    fwt_stages = range(1, min(n, N - 1) + 1)
    metrics = {
        "AP": _mean(c(n, j) for j in range(1, N + 1)),
        "BWT": _mean(_mean(c(i, j) - c(j, j) for j in range(1, i)) for i in range(2, n + 1)),
        "FWT": _mean(_mean(c(i, j) - c(0, j) for j in range(i + 1, N + 1)) for i in fwt_stages),
        "BWT_last": _mean(c(n, j) - c(j, j) for j in range(1, n)),
        "OP": _mean(c(n, j) for j in range(1, n + 1)) if n >= 1 else None,
    }
    stages = list(range(1, n + 1)) if n >= 2 else []  # BWT and BWT_last read rows 1..n (the diagonal and row n)
    rows_used = {"AP": [n], "BWT": stages, "FWT": [0, *fwt_stages] if len(fwt_stages) else [], "BWT_last": stages,
                 "OP": [n] if n >= 1 else []}
    note = (f"complete run: {N} of {N} tasks trained" if n == N else
            f"partial run: {n} of {N} tasks trained (rows 0..{n} of 0..{N}); AP, OP and BWT_last use row {n}")
    # Only the five metrics are numbers at the top level: a caller can print every number it finds.
    return {**metrics, "rows_used": rows_used,
            "progress": {"num_tasks": N, "num_rows": n + 1, "complete": n == N, "note": note}}


def row_labels(task_names) -> list[str]:
    return ["zero-shot"] + [f"after {t}" for t in task_names]


def _fmt(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_table(R, task_names) -> str:
    """R as a markdown table: one row per stage, one column per task, plus the row mean."""
    lines = ["| | " + " | ".join(task_names) + " | mean |", "|---" * (len(task_names) + 2) + "|"]
    for label, row in zip(row_labels(task_names), R):
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(_mean(row))} |")
    return "\n".join(lines)


def read_run(run_dir) -> dict:
    """R.json of a run directory, checked: {"tasks", "rows", "rougeL", "exact_match"} (the scores present)."""
    path = Path(run_dir) / "R.json"
    if not Path(run_dir).is_dir():
        raise SapoError(f"run directory not found: {run_dir}")
    if not path.exists():
        raise SapoError(f"{path} not found (a run writes it after its zero-shot evaluation)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SapoError(f"malformed JSON in {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise SapoError(f"{path} must be an object with a non-empty \"tasks\" list")
    tasks = [str(t) for t in data["tasks"]]
    scores = {s: check_matrix(data[s], len(tasks), where=f"{path} \"{s}\"") for s in SCORES if s in data}
    if not scores:
        raise SapoError(f"{path} holds no score matrix (expected one of {', '.join(SCORES)})")
    if len({len(R) for R in scores.values()}) > 1:
        raise SapoError(f"{path}: the score matrices have different numbers of rows")
    num_rows = len(next(iter(scores.values())))
    rows = data.get("rows") or row_labels(tasks)[:num_rows]
    if not isinstance(rows, list) or len(rows) != num_rows:
        raise SapoError(f"{path}: \"rows\" must list one label per row of R ({num_rows})")
    return {"tasks": tasks, "rows": [str(r) for r in rows], **scores}


def _csv(labels, tasks, R) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", *tasks])
    writer.writerows([label, *(f"{v:.4f}" for v in row)] for label, row in zip(labels, R))
    return buf.getvalue()


def plot_heatmap(R, tasks, labels, path, title):
    """Heatmap of R with task names on the axes and every value written in its cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(tasks), 1.5 + 0.55 * len(R)))
    image = ax.imshow(R, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(R)), labels)
    ax.set_xlabel("evaluated task (outlined: the task just trained)")
    ax.set_ylabel("model state")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="black" if v > 60 else "white", fontsize=9)
        if 1 <= i <= len(row):
            ax.add_patch(plt.Rectangle((i - 1.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def default_metric(run: dict) -> str:
    """The score a run is reported on when none is asked for: TRACE's own when R.json has it (every task of the run
    has a TRACE definition), else ROUGE-L."""
    return "trace" if "trace" in run else "rougeL"


def _run_and_metrics(run_dir, metric) -> tuple[dict, dict]:
    run = read_run(run_dir)
    metric = metric or default_metric(run)
    if metric not in run:
        present = ", ".join(s for s in SCORES if s in run)
        why = "; TRACE's own scores are kept when every task of the run is a TRACE task" if metric == "trace" else ""
        raise SapoError(f"{Path(run_dir) / 'R.json'} has no {metric!r} matrix (it has {present}){why}")
    metrics = {"metric": metric, **cl_metrics(run[metric]), "tasks": run["tasks"],
               "other": {s: cl_metrics(run[s]) for s in SCORES if s in run and s != metric}}
    return run, metrics


def report_metrics(run_dir, metric=None) -> dict:
    """The metrics of run_dir/R.json on `metric` (None: default_metric), plus the tasks and the other scores' metrics
    under "other", as write_report returns them. Reads only: a run that is reported on or compared is never modified."""
    return _run_and_metrics(run_dir, metric)[1]


def write_report(run_dir, metric=None) -> dict:
    """Read run_dir/R.json; write metrics.json, R.csv (`metric`, None: default_metric), R_<score>.csv (other scores)
    and R.png.
    Returns the metrics of `metric` (plus the tasks and the other scores' metrics under "other")."""
    run, metrics = _run_and_metrics(run_dir, metric)
    metric = metrics["metric"]
    R, tasks, labels = run[metric], run["tasks"], run["rows"]
    run_dir = Path(run_dir)
    try:
        write_text_atomic(run_dir / "metrics.json", strict_json(metrics, run_dir / "metrics.json", 2) + "\n")
        write_text_atomic(run_dir / "R.csv", _csv(labels, tasks, R))
        for s in metrics["other"]:
            write_text_atomic(run_dir / f"R_{s}.csv", _csv(labels, tasks, run[s]))
        try:
            plot_heatmap(R, tasks, labels, run_dir / "R.png", f"{run_dir.name}: {metric}")
        except ImportError:
            print(f"note: matplotlib is not installed, so {run_dir / 'R.png'} was not drawn (pip install matplotlib)")
    except OSError as e:
        raise SapoError(f"cannot write the report into {run_dir}: {e.strerror or e}") from None
    return metrics


def write_matrix(run_dir, task_names: list[str], rows: list[tuple[str, dict[str, TaskScores]]]) -> dict:
    """R.json of a run from its rows, (label, task name -> TaskScores) in order: one matrix per score every task of
    every row has (TRACE's own, "trace", in a run of TRACE tasks, with each task's metric name), then the report
    (write_report: metrics.json, R.csv, R.png), whose metrics it returns."""
    present = [s for s in SCORES if all(scores[n].score(s) is not None for _, scores in rows for n in task_names)]
    R = {"tasks": task_names, "rows": [label for label, _ in rows],
         **{s: [[scores[n].score(s) for n in task_names] for _, scores in rows] for s in present}}
    if "trace" in present:
        R["trace_metrics"] = {n: rows[0][1][n].trace_metric for n in task_names}
    write_json(Path(run_dir) / "R.json", R)
    return write_report(run_dir)


def compare_table(reports: dict) -> str:
    """Metrics of several runs side by side: one row per metric, one column per run."""
    names = list(reports)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(_fmt(reports[r][m], 2) for r in names) + " |")
    rows = [reports[r]["progress"] for r in names]
    lines.append("| rows | " + " | ".join(f"{p['num_rows']}/{p['num_tasks'] + 1}" for p in rows) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class GenerationFlags:
    """The run mode's numeric flags: tasks.flags.add_config_flags builds them (help: these comments), checked against
    GENERATION_RANGES when the command line is parsed."""

    max_instances: int | None = None  # evaluate the first N instances of the split (None: all)
    batch_size: int | None = None  # at most N sequences per generation batch (None: up to 256, the budget decides)
    eval_token_budget: int | None = None  # prompt + new tokens per batch (None: 8192 on CPU, 1/3 of free GPU memory)
    max_new_tokens: int = 128
    max_prompt_tokens: int = MAX_SOURCE_LENGTH  # longer prompts have their input text shortened (as training)
    api_timeout: float = 600.0  # --engine openai: seconds per request


GENERATION_RANGES = {"max_instances": Range(1), "batch_size": Range(1), "eval_token_budget": Range(1),
                     "max_new_tokens": Range(1), "max_prompt_tokens": Range(1), "api_timeout": Range(0, low_open=True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `python -c 'import evaluate; help(evaluate)'` for the metric definitions.")
    report = p.add_argument_group("report a run (reads RUN_DIR/R.json)")
    report.add_argument("run_dir", nargs="?", help="a run directory holding R.json")
    report.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="several runs side by side")
    report.add_argument("--metric", default=None, choices=SCORES,
                        help="the score the metrics are computed on (default: trace when R.json has it, i.e. "
                             "every task is a TRACE task, else rougeL)")
    report.add_argument("--write", action="store_true",
                        help="also write metrics.json, R.csv, R_<score>.csv and R.png into each run directory "
                             "(without it, reporting and comparing only read)")
    run = p.add_argument_group("evaluate a model on tasks")
    run.add_argument("--model", help="hub id, HF directory, peft adapter dir or adapter stack (default: offline model)")
    run.add_argument("--tasks", help="comma-separated task names")
    run.add_argument("--data-dir", help="SAPO-layout data directory (default: the built-in tasks)")
    run.add_argument("--split", default="test", choices=("train", "dev", "test"))
    add_config_flags(run, GenerationFlags, GENERATION_RANGES, with_defaults=True)
    run.add_argument("--instructions", help="JSON {task: instruction} to prompt with instead of the original")
    run.add_argument("--original-instructions", action="store_true",
                     help="prompt with the original instructions even when --model is a run's task folder whose "
                          "sapo_stack.json stores the instructions its tasks were trained with (the default uses those)")
    run.add_argument("--output-dir", help="write predictions/<task>.jsonl and scores.json here")
    run.add_argument("--eval-compile", action="store_true",
                     help="CUDA: HF static KV cache + torch.compile of the decode step (elsewhere: the plain path)")
    run.add_argument("--no-fold", action="store_true",
                     help="run the adapters of a stack unmerged instead of folded into one (slower; for comparison)")
    run.add_argument("--engine", default="local", choices=("local", "openai"),
                     help="local: generate in this process; openai: ask a served model (vLLM, SGLang) through its "
                          "OpenAI-compatible completions endpoint (--api-base, --served-model)")
    run.add_argument("--api-base", help="--engine openai: the server's base URL, e.g. http://127.0.0.1:8000/v1")
    run.add_argument("--served-model", help="--engine openai: the model or LoRA name the server serves")
    run.add_argument("--lang", default="auto", choices=("auto", "en", "zh"), help="ROUGE tokenization per task")
    run.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                     help="base weights' dtype; auto: bf16 on a GPU that supports it, else fp32 (LoRA weights stay fp32)")
    run.add_argument("--allow-beyond-context", action="store_true",
                     help="allow --max-prompt-tokens + --max-new-tokens beyond the model's max_position_embeddings (a "
                          "model with context extension)")
    run.add_argument("--no-progress", action="store_true")
    p.add_argument("--export-adapter", nargs=2, metavar=("TASK_DIR", "OUT_DIR"),
                   help="write the adapter stack of a run's task folder (RUN_DIR/<k>-<task>) folded into one stock "
                        "peft LoRA directory OUT_DIR (rank = the sum of the adapters' ranks)")
    args = p.parse_args(argv)
    modes = [name for name, on in (("RUN_DIR", args.run_dir), ("--compare", args.compare), ("--tasks", args.tasks),
                                   ("--export-adapter", args.export_adapter)) if on]
    if args.model and not args.tasks:
        p.error("--model needs --tasks (the tasks to evaluate it on)")
    if len(modes) != 1:
        p.error("give exactly one of RUN_DIR, --compare RUN_DIR ..., --model M --tasks a,b, or --export-adapter"
                + (f" (got {' and '.join(modes)})" if modes else ""))
    if args.engine == "openai" and not (args.api_base and args.served_model):
        p.error("--engine openai needs --api-base URL and --served-model NAME")
    if args.write and args.tasks:
        p.error("--write writes a run's report; it goes with RUN_DIR or --compare, not --tasks (see --output-dir)")
    check_ranges(vars(args), GENERATION_RANGES)  # one line naming the flag and its range (tasks/flags.py)
    return args


def report_main(args):
    """Print a run's R and metrics, or several runs' metrics side by side; write report files only with --write."""
    report = write_report if args.write else report_metrics
    if args.compare:
        reports, names = {}, [Path(d).resolve().name for d in args.compare]
        for d, name in zip(args.compare, names):
            reports[name if names.count(name) == 1 else d] = report(d, args.metric)
        if len({tuple(r["tasks"]) for r in reports.values()}) > 1:
            print("note: the runs do not have the same task sequence")
        used = list(dict.fromkeys(r["metric"] for r in reports.values()))
        if len(used) > 1:
            which = ", ".join(f"{name}: {r['metric']}" for name, r in reports.items())
            print(f"note: the runs are reported on different scores ({which}); --metric picks one for all")
        print(f"metrics on {', '.join(used)}\n\n{compare_table(reports)}")
        if args.write:
            print(f"\nwrote the report files of {', '.join(used)} into {', '.join(args.compare)}")
        return reports
    run = read_run(args.run_dir)
    metrics = report(args.run_dir, args.metric)
    print(f"{args.run_dir}: {metrics['metric']}, {metrics['progress']['note']}\n")
    print(markdown_table(run[metrics["metric"]], run["tasks"]) + "\n")
    for m in METRICS:
        print(f"{m:9s}{_fmt(metrics[m], 2):>8s}   rows {metrics['rows_used'][m]}")
    if args.write:
        print(f"\nwrote metrics.json, R.csv{''.join(f', R_{s}.csv' for s in metrics['other'])}, R.png in {args.run_dir}")
    return metrics


def read_instructions(path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SapoError(f"instructions file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SapoError(f"malformed JSON in {path}: {e}") from None
    if not isinstance(data, dict):
        raise SapoError(f"{path} must map task names to instructions")
    out = {}
    for task, v in data.items():
        instruction = v.get("instruction") if isinstance(v, dict) else v
        if not isinstance(instruction, str) or not instruction.strip():
            raise SapoError(f"{path}: task {task!r} has no instruction string")
        out[task] = instruction
    return out


@dataclass
class TaskResult:
    """One task of the run mode: its scores and the instruction it was prompted with (an entry of "results" in
    OUTPUT_DIR/scores.json)."""

    task: str
    instruction: str
    instruction_source: str  # file (--instructions), stack (the one it was trained with) or original
    scores: TaskScores

    def to_json(self) -> dict:
        return {"task": self.task, "instruction": self.instruction, "instruction_source": self.instruction_source,
                **self.scores.to_json()}


def run_main(args):
    from accelerate import Accelerator

    from tasks.launch import accelerator_kwargs, check_accelerator, check_launch

    launch = check_launch("evaluate.py")

    from tasks.loaders import load_task
    from tasks.models import STACK_FILE, check_context, load_model, load_tokenizer, read_stack, resolve_dtype

    accelerator = Accelerator(**accelerator_kwargs(launch))
    check_accelerator(accelerator, "evaluate.py")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise SapoError("--tasks names no task")
    tasks = [load_task(name, args.data_dir) for name in names]  # bad names fail before the model loads
    given = read_instructions(args.instructions) if args.instructions else {}
    unknown = set(given) - {t.name for t in tasks} - set(names)
    if unknown:
        accelerator.print(f"note: {args.instructions} names tasks not evaluated here: {', '.join(sorted(unknown))}")
    # A run's task folder stores the instructions its tasks were trained with: prompting with those reproduces R.
    stack_file = Path(args.model) / STACK_FILE if args.model else None
    stored = {}
    if stack_file is not None and stack_file.exists() and not args.original_instructions:
        stored = read_stack(stack_file).instructions

    def instruction_for(name, task) -> tuple[str, str]:
        """(instruction, where it comes from): --instructions, else the stack's stored one, else the original."""
        for source, table in (("file", given), ("stack", stored)):
            for key in (task.name, name):
                if key in table:
                    return table[key], source
        return task.instruction, "original"

    chosen = [instruction_for(name, task) for name, task in zip(names, tasks)]
    from_stack = [task.name for task, (_, source) in zip(tasks, chosen) if source == "stack"]
    if from_stack:
        accelerator.print(f"note: {', '.join(from_stack)} prompted with the instructions stored in {stack_file} (the "
                          "ones they were trained with); --original-instructions prompts with the original ones")
    tokenizer = load_tokenizer(args.model)
    engine = served_engine(args, tokenizer, accelerator) if args.engine == "openai" else None
    model = None
    if engine is None:
        model = load_model(args.model, dtype=resolve_dtype(args.dtype, accelerator.device)).to(
            load_device(accelerator))  # FSDP2: on the CPU until sharding moves each process's shards
        check_context(model, [("--max-prompt-tokens + --max-new-tokens", args.max_prompt_tokens + args.max_new_tokens)],
                      args.allow_beyond_context, args.model or "")  # before any answer is generated or written
        model = shard_for_inference(accelerator, model)  # FSDP2 / ZeRO-3 launches (tasks/sharding.py)
    # Served: predictions are staged outside the output directory and moved there only when every task has its
    # answers, so a server failing half-way writes nothing.
    staging = Path(tempfile.mkdtemp(prefix="sapo-served-")) if engine is not None and args.output_dir else None
    predictions_dir = (staging or Path(args.output_dir or ".")) / "predictions"

    results = []
    for task, (instruction, source) in zip(tasks, chosen):
        predictions = predictions_dir / f"{task.name}.jsonl" if args.output_dir else None
        try:
            scores = evaluate_task(model, tokenizer, task, instruction, accelerator, split=args.split,
                                   max_instances=args.max_instances, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                   predictions_path=predictions, lang=args.lang, progress=not args.no_progress,
                                   token_budget=args.eval_token_budget or "auto", compile=args.eval_compile,
                                   engine=engine, fold=not args.no_fold)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        results.append(TaskResult(task.name, instruction, source, scores))
        trace = f"  trace {scores.trace:.2f} ({scores.trace_metric})" if scores.trace is not None else ""
        accelerator.print(f"{task.name}: rougeL {scores.rougeL:.2f}  exact_match {scores.exact_match:.2f}"
                          f"{trace}  ({scores.num_instances} instances)")

    # A score is a column (and a list in scores.json) when every task has it: TRACE's only for TRACE tasks.
    columns = [score for score in SCORES if all(r.scores.score(score) is not None for r in results)]
    accelerator.print("\n| task | " + " | ".join(columns) + " | instances |\n" + "|---" * (len(columns) + 2) + "|")
    for r in results:
        cells = " | ".join(f"{r.scores.score(c):.2f}" for c in columns)
        accelerator.print(f"| {r.task} | {cells} | {r.scores.num_instances} |")
    if staging is not None:
        for file in sorted((staging / "predictions").iterdir()):
            write_text_atomic(Path(args.output_dir) / "predictions" / file.name, file.read_text(encoding="utf-8"))
        shutil.rmtree(staging, ignore_errors=True)
    if args.output_dir and accelerator.is_main_process:
        summary = {"model": args.model, "split": args.split,
                   **({"engine": "openai", "api_base": args.api_base, "served_model": args.served_model}
                      if engine is not None else {}), "max_instances": args.max_instances,
                   "tasks": [r.task for r in results], **{c: [r.scores.score(c) for r in results] for c in columns},
                   "results": [r.to_json() for r in results]}
        summary_path = Path(args.output_dir) / "scores.json"
        write_text_atomic(summary_path, strict_json(summary, summary_path, 2) + "\n")
        accelerator.print(f"wrote {args.output_dir}/scores.json and predictions/")
    accelerator.wait_for_everyone()
    return results


def served_engine(args, tokenizer, accelerator):
    """--engine openai: the served model, checked with one short request before any work."""
    from tasks.served import ServedEngine

    if accelerator.num_processes > 1:
        raise SapoError("--engine openai runs in one process (the server batches): run it without accelerate launch")
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from tasks.models import resolve

    try:  # the model's generation EOS ids, as in-process (no weights loaded)
        generation_config = GenerationConfig.from_pretrained(resolve(args.model)[0])
    except (OSError, ValueError):
        generation_config = None
    stops = stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation_config))
    strings = tuple(dict.fromkeys(t for t in (tokenizer.decode([i]) for i in stops) if t.strip()))
    engine = ServedEngine(args.api_base, args.served_model, stop_strings=strings, timeout_s=args.api_timeout,
                          stop_ids=tuple(stops))
    engine.check(tokenizer("Hello", add_special_tokens=False)["input_ids"] or stops[:1], stops)
    return engine


def export_main(args) -> Path:
    """--export-adapter TASK_DIR OUT_DIR: the task folder's adapter stack folded into one stock peft LoRA."""
    import torch

    from tasks.fold import covering_all_targets, export_folded, fold_active_adapters
    from tasks.models import load_model, resolve

    source, out_dir = args.export_adapter
    if Path(out_dir).exists() and (not Path(out_dir).is_dir() or any(Path(out_dir).iterdir())):
        raise SapoError(f"{out_dir} exists and is not an empty directory; export into a new directory")
    base, adapters = resolve(source)
    if not adapters:
        raise SapoError(f"{source} holds no adapter to export (expected a run's task folder with sapo_stack.json, "
                        "or a peft adapter directory)")
    # The base weights do not enter the fold: bf16 halves the memory of loading them (the adapters stay fp32)
    net = load_model(source, dtype=torch.bfloat16)
    folded = covering_all_targets(net, fold_active_adapters(net))
    export_folded(folded, base, out_dir)
    vllm_rank = next((r for r in VLLM_LORA_RANKS if r >= folded.rank), folded.rank)
    print(f"wrote {out_dir}: one LoRA of rank {folded.rank} folded from {len(adapters)} adapter(s) on "
          f"{', '.join(folded.target_suffixes)} ({len(folded.modules)} modules); base model {base}")
    print(f"serve it: vllm serve {base} --enable-lora --max-lora-rank {vllm_rank} --lora-modules "
          f"sapo={Path(out_dir).resolve()}")
    return Path(out_dir)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts (MaxLoRARanks)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.export_adapter:
        return export_main(args)
    return run_main(args) if args.tasks else report_main(args)


if __name__ == "__main__":
    main()
    exit_after_main()
