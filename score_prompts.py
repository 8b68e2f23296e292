"""Pre-update-loss scoring of candidate instructions: the selection step of SAPO.

The score (the paper's "pre-update loss"). For every candidate instruction c of a task and each of the first n
training instances x (no shuffle), the current model state (base + every adapter trained so far, at training scale)
reads the chat prompt built with c and is teacher-forced on the answer:

    score(c) = sum_x sum_{t in response(x)} -log p(y_t | prompt(c, x), y_<t)  /  sum_x |response(x)|

Only response tokens count (answer + the chat template's end-of-turn tokens); prompt tokens are masked. The score is
the token-weighted mean over all scored tokens (the per-instance mean is reported too). The lowest score wins; ties
keep the original instruction (candidate 0).

    python score_prompts.py --task sentiment --output runs/scores.json               # built-in task + pool
    python score_prompts.py --model DIR --data-dir ../shared/data/superni --task task195 \
        --candidates cands.json --instances 250 --output runs/task195_scores.json
    python score_prompts.py --task sentiment --generate 20 --output runs/scores.json  # paraphrases by the model
    python score_prompts.py --task sentiment --select sapo-race --output runs/race.json  # racing (ours): fewer tokens
    accelerate launch --num_processes 8 score_prompts.py ...                          # several GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 score_prompts.py ...

`reference_score` below is that definition in its plainest form, one HF forward with labels per instance: the oracle
the tests and benchmarks compare with. `score_candidates` computes the same numbers fast and exactly:
- shared-prefix packing (tasks/packing.py): a candidate's common prompt prefix is laid down once per row, and an
  explicit attention mask gives every token exactly the context it has in a separate forward pass;
- the LM head runs only on the rows that predict response tokens (kernels.segment_nll);
- batches are planned globally and dealt to processes, so the numbers are the same with 1 or N processes;
- scores are cached per (model state, task content, candidate, instance set, length limit) (tasks/score_cache.py).
Racing (`--select sapo-race`, beyond the paper; tasks/racing.py) scores only the candidates that can still be the best.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks import IGNORE_INDEX, SapoError, cli_main, instances_hash
from tasks import packing
from tasks.candidates import select_index
from tasks.errors import describe_os_error, exit_after_main, writing
from tasks.flags import POOL_RANGES, OneLineParser, Range, check_ranges
from tasks.launch import accelerator_kwargs, check_accelerator, check_launch
from tasks.loaders import write_json
from tasks.pools import PoolSource
from tasks.prompts import MAX_LENGTH, encode_task_example
from tasks.racing import RaceRound, race_rounds
from tasks.run_dir import check_writable_file
from tasks.score_cache import CacheEntry, cached_entries, merge_into_cache, model_state_id, score_key
from tasks.sharding import load_device, lockstep, shard_for_inference, weights_for_forward

SELECT_METHODS = ("sapo", "sapo-race")  # sapo: the paper's exhaustive scoring; sapo-race: ours, racing
# Allowed values of the CLI's numeric flags, checked at parse time (tasks/flags.py).
SCORE_RANGES = {**POOL_RANGES, "instances": Range(1), "token_budget": Range(1), "max_length": Range(1),
                "row_tokens": Range(1), "temperature": Range(0, low_open=True)}


# ----------------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CandidateScore:
    """One candidate's pre-update loss, with the per-instance numbers it is made of."""

    index: int
    instruction: str
    score: float | None  # token-weighted mean NLL over the scored instances; None when not scored
    instance_mean: float | None  # mean over instances of each instance's mean NLL
    instance_losses: list[float]
    num_tokens: int  # response tokens scored
    seconds: float
    cached: bool
    instance_sums: list[float]  # per instance: summed NLL of its response tokens
    instance_counts: list[int]  # per instance: its response tokens
    num_instances_scored: int
    eliminated_round: int | None = None  # racing: the round that dropped it

    @classmethod
    def from_sums(cls, index, instruction, sums, counts, seconds=0.0, cached=False, eliminated_round=None):
        total = sum(counts)
        losses = [s / n if n else float("nan") for s, n in zip(sums, counts)]
        return cls(index=index, instruction=instruction,
                   score=math.fsum(sums) / total if total else float("nan"),
                   instance_mean=math.fsum(losses) / len(losses) if losses else float("nan"),
                   instance_losses=losses, num_tokens=total, seconds=seconds, cached=cached,
                   instance_sums=list(sums), instance_counts=list(counts), num_instances_scored=len(sums),
                   eliminated_round=eliminated_round)

    @classmethod
    def unscored(cls, index, instruction):
        return cls(index, instruction, None, None, [], 0, 0.0, False, [], [], 0)


@dataclass
class Selection:
    """The scores of a pool and the pick: what score_candidates, race_candidates and select_candidates return."""

    task: str
    method: str  # sapo | sapo-race | a name for a pick made without scoring (original, fixed:K, ...)
    selected: int
    instruction: str  # the selected candidate
    candidates: list[CandidateScore]
    num_instances: int = 0
    seconds: float = 0.0
    tokens_scored: int = 0  # response tokens of the (candidate, instance) pairs scored
    exhaustive_tokens: int = 0  # what scoring every candidate on every instance scores
    tokens_forwarded: int = 0  # tokens through the model, padding and shared prefixes included
    num_batches: int = 0
    packing: str = ""
    num_processes: int = 1
    state_id: str = ""
    task_hash: str = ""
    instances_hash: str = ""
    max_length: int = 0
    rounds: list[RaceRound] = field(default_factory=list)  # racing only
    race_first: int | None = None
    race_growth: float | None = None
    race_confidence: float | None = None

    @classmethod
    def unscored(cls, task_name: str, method: str, candidates: list[str], selected: int) -> "Selection":
        """A pick made without scoring (the original instruction, a fixed candidate, an empty instruction)."""
        return cls(task=task_name, method=method, selected=selected, instruction=candidates[selected],
                   candidates=[CandidateScore.unscored(i, c) for i, c in enumerate(candidates)])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where="the selection") -> "Selection":
        """The Selection's fields of `data` (a record may hold more, as selection.json does), checked for shape by
        tasks.records: a damaged one is one line naming `where`."""
        from tasks.records import from_record

        names = {f.name for f in dataclasses.fields(cls)}
        return from_record(cls, {k: v for k, v in data.items() if k in names} if isinstance(data, dict) else data,
                           where)


# ----------------------------------------------------------------------------------------------------------------------
# The definition, plainly: the oracle
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_score(model, tokenizer, task, instruction: str, instances, max_length=MAX_LENGTH) -> CandidateScore:
    """The score of one candidate by the plainest route: one unpadded HF forward with `labels` per instance (HF
    shifts the labels and averages the NLL of the unmasked ones), times that instance's response-token count. Slow;
    for tests and benchmarks, which compare score_candidates with it."""
    sums, counts = [], []
    for x in instances:
        e = encode_task_example(tokenizer, task, instruction, x, max_length)
        n = sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)
        loss = model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
        sums.append(loss * n)
        counts.append(n)
    return CandidateScore.from_sums(0, instruction, sums, counts)


# ----------------------------------------------------------------------------------------------------------------------
# The scoring loop
# ----------------------------------------------------------------------------------------------------------------------


def score_candidates(model, tokenizer, task, candidates: list[str], instances, accelerator=None, *,
                     token_budget=16384, max_length=MAX_LENGTH, cache_path=None, state_id="", progress=True,
                     row_tokens=None) -> Selection:
    """Score every candidate instruction on every one of `instances` with `model` (a causal LM, adapters inside).

    Candidate 0 should be the original instruction (ties keep it). Under accelerate every process must call this with
    the same arguments; every process gets the full result, only the main process writes the cache.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not candidates:
        raise SapoError("no candidates to score")
    if not instances:
        raise SapoError(f"task {task.name}: no instances to score on")
    if cache_path and not state_id:
        raise SapoError("a score cache needs the model's state id (model_state_id); pass state_id=")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    if accelerator is not None:
        model = accelerator.unwrap_model(model)  # a DDP/compiled wrapper adds nothing to a forward-only pass

    # 1. What is cached already. Every process must skip the same candidates: the main process's view decides.
    task_hash, inst_hash = task.content_hash(), instances_hash(list(instances))
    keys = [score_key(state_id, task_hash, c, inst_hash, max_length) for c in candidates]
    results: dict[int, CandidateScore] = {
        c: CandidateScore.from_sums(c, candidates[c], entry["instance_sums"], entry["instance_counts"],
                                    entry.get("seconds", 0.0), cached=True)
        for c, entry in cached_entries(cache_path, keys, len(instances), is_main, world).items()}
    todo = [c for c in range(len(candidates)) if c not in results]

    # 2. Encode every (candidate, instance) sequence and plan the batches globally (every process does the same
    #    deterministic work: the plan needs every length).
    sharded = lockstep(model)  # FSDP2 / ZeRO-3 (tasks/sharding.py)
    setup = packing.scoring_setup(model)
    encoded, where, lengths, prefixes = encode_sequences(tokenizer, task, candidates, todo, instances, max_length)
    batches = packing.plan_batches(lengths, prefixes, token_budget, row_tokens, setup.attention_ratio, setup.packed)
    last_batch = {rows[0].candidate: b for b, rows in enumerate(batches)}

    # 3. Run the batches. Whole batches go to processes round-robin: step s runs batch s*world + rank on each
    #    process, then every process gathers that step's results (so all call gather_object equally often).
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = {c: [0.0] * len(instances) for c in todo}
    counts = {c: [0] * len(instances) for c in todo}
    seconds = {c: 0.0 for c in todo}
    seen = set()
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(batches), desc=f"scoring {task.name}", disable=not (progress and is_main), leave=False)
    try:
        # Sharded: no_grad, as FSDP2's unsharded buffers made under inference_mode refuse a later training step
        with torch.no_grad() if sharded else torch.inference_mode(), weights_for_forward(model):
            setup = packing.scoring_setup(model)  # FSDP2: the head as unsharded now
            for step in range(math.ceil(len(batches) / world)):
                b = step * world + rank
                mine = []
                if b < len(batches):
                    tb = time.perf_counter()
                    out = packing.score_batch(model, setup, batches[b], encoded, pad_id)
                    mine = [(b, time.perf_counter() - tb, [(sid, s, n) for sid, (s, n) in out.items()])]
                elif sharded:  # every process runs as many forwards (their gathers are collective): one discarded
                    packing.score_batch(model, setup, batches[-1], encoded, pad_id)
                gathered = gather_object(mine) if world > 1 else mine
                finished = []
                for gb, sec, items in sorted(gathered, key=lambda x: x[0]):
                    for sid, s, n in items:
                        if sid in seen:
                            raise RuntimeError(f"sequence {where[sid]} was scored twice")
                        seen.add(sid)
                        c, i = where[sid]
                        sums[c][i], counts[c][i] = s, n
                    c = batches[gb][0].candidate
                    seconds[c] += sec
                    if last_batch[c] == gb:
                        finished.append(c)
                for c in finished:
                    results[c] = CandidateScore.from_sums(c, candidates[c], sums[c], counts[c], seconds[c])
                if finished and cache_path and is_main:
                    merge_into_cache(cache_path, {keys[c]: CacheEntry(
                        task=task.name, instruction=candidates[c], state_id=state_id, instance_sums=sums[c],
                        instance_counts=counts[c], seconds=seconds[c]) for c in finished})
                bar.update(len(gathered))
    finally:
        bar.close()
        model.train(was_training)
    if len(seen) != len(encoded):
        raise RuntimeError(f"{len(encoded) - len(seen)} sequences were not scored")

    ordered = [results[c] for c in range(len(candidates))]
    selected = select_index([r.score for r in ordered], task.name)
    tokens = sum(r.num_tokens for r in ordered)
    return Selection(task=task.name, method="sapo", selected=selected, instruction=candidates[selected],
                     candidates=ordered, num_instances=len(instances), seconds=time.perf_counter() - t0,
                     tokens_scored=tokens, exhaustive_tokens=tokens,
                     tokens_forwarded=sum(len(rows) * rows[0].length for rows in batches),
                     num_batches=len(batches), packing="shared-prefix" if setup.packed else "padded",
                     num_processes=world, state_id=state_id, task_hash=task_hash, instances_hash=inst_hash,
                     max_length=max_length)


def encode_sequences(tokenizer, task, candidates: list[str], todo: list[int], instances, max_length: int):
    """Every (candidate, instance) sequence of the candidates `todo`, numbered globally (the sequence id): the
    encoded sequences and the (candidate, instance) of each, and per candidate the (sequence id, length) pairs and
    the prompt prefix its sequences share (tasks/packing.py plans the batches from those)."""
    encoded, where = [], []  # sequence id -> Encoded, (candidate, instance)
    lengths, prefixes = {}, {}
    for c in todo:
        first = len(encoded)
        for i, inst in enumerate(instances):
            encoded.append(encode_task_example(tokenizer, task, candidates[c], inst, max_length))
            where.append((c, i))
        lengths[c] = [(sid, len(encoded[sid].input_ids)) for sid in range(first, len(encoded))]
        prefixes[c] = packing.shared_prefix(encoded[first:])
    return encoded, where, lengths, prefixes


# ----------------------------------------------------------------------------------------------------------------------
# Racing (ours, beyond the paper): score only the candidates that can still be the best
# ----------------------------------------------------------------------------------------------------------------------


def race_candidates(model, tokenizer, task, candidates: list[str], instances, accelerator=None, *, first=8,
                    growth=2.0, confidence=0.95, token_budget=16384, max_length=MAX_LENGTH, cache_path=None,
                    state_id="", progress=True, row_tokens=None) -> Selection:
    """Select like score_candidates, scoring only the candidates that can still be the best (tasks.racing).

    Each round calls score_candidates for the survivors on the new slice of `instances` (exact, the same with any
    number of processes; cached per slice, so an interrupted race resumes). With confidence None or 1.0 nothing is
    eliminated and the result is the exhaustive argmin. Candidates carry the scores of the instances each was scored
    on; `rounds` says what each round scored and dropped.
    """
    t0 = time.perf_counter()
    if not candidates:
        raise SapoError("no candidates to score")
    if not instances:
        raise SapoError(f"task {task.name}: no instances to score on")
    instances = list(instances)
    calls: list[Selection] = []
    seconds = [0.0] * len(candidates)
    cached = [True] * len(candidates)

    def score_slice(subset, lo, hi):
        result = score_candidates(model, tokenizer, task, [candidates[c] for c in subset], instances[lo:hi],
                                  accelerator, token_budget=token_budget, max_length=max_length,
                                  cache_path=cache_path, state_id=state_id, progress=progress, row_tokens=row_tokens)
        calls.append(result)
        out = {}
        for c, r in zip(subset, result.candidates):
            seconds[c] += r.seconds
            cached[c] = cached[c] and r.cached
            out[c] = (r.instance_sums, r.instance_counts)
        return out

    race = race_rounds(score_slice, len(candidates), len(instances), first=first, growth=growth,
                       confidence=confidence)
    for record, result in zip(race.rounds, calls):
        record.tokens_forwarded, record.seconds = result.tokens_forwarded, result.seconds
    ordered = [CandidateScore.from_sums(c, text, race.sums[c], race.counts[c], seconds[c], cached[c],
                                        race.eliminated_round.get(c)) for c, text in enumerate(candidates)]
    # Response-token counts do not depend on the instruction (the response is the assistant turn), so the counts of
    # the candidate scored furthest stand for every candidate; instances nobody reached are encoded to count them.
    counts = list(race.counts[race.selected])
    for inst in instances[len(counts):]:
        e = encode_task_example(tokenizer, task, candidates[race.selected], inst, max_length)
        counts.append(sum(1 for j, t in enumerate(e.labels) if t != IGNORE_INDEX and j > 0))
    return Selection(task=task.name, method="sapo-race", selected=race.selected,
                     instruction=candidates[race.selected], candidates=ordered, num_instances=len(instances),
                     seconds=time.perf_counter() - t0, tokens_scored=sum(r.num_tokens for r in ordered),
                     exhaustive_tokens=len(candidates) * sum(counts),
                     tokens_forwarded=sum(r.tokens_forwarded for r in calls),
                     num_batches=sum(r.num_batches for r in calls), packing=calls[0].packing,
                     num_processes=calls[0].num_processes, state_id=state_id, task_hash=task.content_hash(),
                     instances_hash=instances_hash(instances), max_length=max_length, rounds=race.rounds,
                     race_first=first, race_growth=growth, race_confidence=confidence)


# ----------------------------------------------------------------------------------------------------------------------
# Selection: the one entry point both scripts call
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringSettings:
    """How a selection scores: the method and its racing settings, the forward batches' token budget, the length
    limit of a sequence. The same for every selection of a run (train_sapo's first selection and its re-selections)."""

    method: str = "sapo"  # sapo: every candidate on every instance (the paper) | sapo-race (ours): racing
    race_first: int = 8  # sapo-race: instances of the first round
    race_confidence: float = 0.95  # sapo-race: confidence that the best candidate is never eliminated
    token_budget: int = 16384  # padded tokens per forward batch
    max_length: int = MAX_LENGTH  # tokens of a sequence (prompt + answer); longer ones shorten their input text

    @classmethod
    def of(cls, config, method: str | None = None) -> "ScoringSettings":
        """From train_sapo's Config (or a config derived from it): --select (or `method`), --race-first,
        --race-confidence, --score-token-budget, --max-source-length + --max-target-length."""
        return cls(method=method or config.select, race_first=config.race_first,
                   race_confidence=config.race_confidence, token_budget=config.score_token_budget,
                   max_length=config.max_source_length + config.max_target_length)


def select_candidates(model, tokenizer, task, candidates: list[str], instances, accelerator=None,
                      settings: ScoringSettings = ScoringSettings(), **scoring) -> Selection:
    """The lowest pre-update loss among `candidates` (original first). settings.method "sapo" scores every candidate
    on every instance (the paper); "sapo-race" races them (ours). `scoring`: score_candidates' other keyword arguments
    (cache_path, state_id, progress, row_tokens)."""
    scoring.update(token_budget=settings.token_budget, max_length=settings.max_length)
    if settings.method == "sapo":
        return score_candidates(model, tokenizer, task, candidates, instances, accelerator, **scoring)
    if settings.method == "sapo-race":
        return race_candidates(model, tokenizer, task, candidates, instances, accelerator, first=settings.race_first,
                               confidence=settings.race_confidence, **scoring)
    raise SapoError(f"unknown selection method {settings.method!r} (expected one of {', '.join(SELECT_METHODS)})")


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir, hub id, adapter (stack) dir; default: offline SmolLM2")
    p.add_argument("--data-dir", default=None, help="SAPO-layout data directory; default: built-in tasks")
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="train", choices=["train", "dev"], help="instances to score on")
    p.add_argument("--instances", type=int, default=250, help="the first N instances of the split (no shuffle)")
    p.add_argument("--candidates", default=None, help="JSON list of instructions, or task -> list")
    p.add_argument("--max-candidates", type=int, default=None, help="the first N candidates (original included)")
    p.add_argument("--generate", type=int, default=0, metavar="K", help="add K paraphrases generated by a model")
    p.add_argument("--paraphraser", default=None, help="local chat model for --generate (default: the scored "
                                                       "model), or the model name for --paraphrase-api")
    p.add_argument("--paraphrase-api", default=None, metavar="URL", help="OpenAI-compatible chat endpoint")
    p.add_argument("--paraphrase-cache", default=None, help="default: paraphrases.json next to --output")
    p.add_argument("--meta-prompt", default=None, metavar="FILE",
                   help="the request for a --generate rewrite: UTF-8 text with {instruction} once (and optionally "
                        "{label_words}); default: built-in, Chinese for a Chinese instruction, else English")
    p.add_argument("--output", default=None, help="scores JSON (written atomically by the main process)")
    p.add_argument("--cache", default=None, help="score cache JSON; default: score_cache.json next to --output")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--token-budget", type=int, default=16384, help="padded tokens per forward batch")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help="longer sequences shorten their input text (default: %(default)s, training's max source + "
                        "max target length)")
    p.add_argument("--allow-beyond-context", action="store_true",
                   help="allow --max-length beyond the model's max_position_embeddings (a model with context "
                        "extension)")
    p.add_argument("--row-tokens", type=int, default=None, help="width of a packed row (default: from the model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="base weights (LoRA weights stay fp32; the NLL is summed in fp32): auto = bf16 on a CUDA GPU "
                        "that supports it, else fp32")
    p.add_argument("--seed", type=int, default=0, help="built-in task data and paraphrase sampling")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--select", default="sapo", choices=SELECT_METHODS,
                   help="sapo: score every candidate on every instance (the paper); sapo-race (ours, beyond the "
                        "paper): stop scoring the candidates that are confidently worse than the leader")
    p.add_argument("--race-first", type=int, default=8, help="sapo-race (ours): instances of the first round")
    p.add_argument("--race-confidence", type=float, default=0.95,
                   help="sapo-race (ours): confidence that the best candidate is never eliminated; 1.0 = never "
                        "eliminate")
    args = p.parse_args(argv)
    check_ranges(vars(args), SCORE_RANGES)
    return args


def print_table(result: Selection, out=sys.stdout):
    rows = sorted(result.candidates, key=lambda r: (r.score, r.index))
    print(f"{'rank':>4} {'index':>5} {'score':>9} {'inst.mean':>9} {'tokens':>7}  instruction", file=out)
    for rank, r in enumerate(rows, 1):
        mark = ("*" if r.index == result.selected else " ") + ("o" if r.index == 0 else " ")
        text = r.instruction.replace("\n", " ")
        text = text[:60] + ("..." if len(text) > 60 else "")
        print(f"{rank:>4} {r.index:>5} {r.score:>9.5f} {r.instance_mean:>9.5f} {r.num_tokens:>7} {mark} {text}",
              file=out)
    print(f"* selected (index {result.selected}), o original; {result.num_instances} instances, "
          f"{result.seconds:.1f}s", file=out)


def print_rounds(result: Selection, out=None):
    """The rounds of a race: instances, candidates scored, eliminated, and the tokens scored."""
    out = out or sys.stdout
    print(f"{'round':>5} {'inst.':>5} {'scored':>6} {'leader':>6} {'z':>6} {'tokens':>7}  eliminated", file=out)
    for r in result.rounds:
        z = "inf" if r.z is None else f"{r.z:.2f}"
        print(f"{r.round:>5} {r.num_instances:>5} {len(r.scored):>6} {r.leader:>6} {z:>6} "
              f"{r.tokens_scored:>7}  {', '.join(map(str, r.eliminated)) or '-'}", file=out)
    print(f"racing scored {result.tokens_scored} of {result.exhaustive_tokens} response tokens "
          f"({100.0 * result.tokens_scored / max(result.exhaustive_tokens, 1):.1f}% of exhaustive scoring)",
          file=out)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    launch = check_launch("score_prompts.py")
    source = PoolSource(candidates_file=args.candidates, max_candidates=args.max_candidates, generate=args.generate,
                        paraphraser=args.paraphraser, paraphrase_api=args.paraphrase_api,
                        temperature=args.temperature, seed=args.seed, meta_prompt=args.meta_prompt)
    source.check()
    from accelerate import Accelerator

    from tasks.loaders import load_task
    from tasks.models import check_context, load_model, load_tokenizer, resolve, resolve_dtype

    # Data and candidates first: bad input fails in a second, before any model is loaded.
    task = load_task(args.task, args.data_dir, seed=args.seed, n_train=max(1000, args.instances))
    if args.split == "train" and "train" in task.missing_splits:
        raise SapoError(f"task {task.name} has no train split in {task.source or 'its source'}; "
                        "use --split dev to score on dev explicitly")
    if not task.instruction.strip():
        raise SapoError(f"task {task.name} has an empty instruction: there is nothing to paraphrase or select "
                        "(train_sapo.py trains such a task as it is)")
    instances = task.split(args.split)[:args.instances]
    source.check_task(task)
    out_dir = Path(args.output).parent if args.output else None
    cache_path = None if args.no_cache else (args.cache or (str(out_dir / "score_cache.json") if out_dir else None))
    # Where the results go must be writable before any scoring: a read-only place would lose the finished scores.
    for flag, path in (("--output", args.output), ("--cache", cache_path)):
        if path:
            check_writable_file(path, flag)

    accelerator = Accelerator(**accelerator_kwargs(launch))
    check_accelerator(accelerator, "score_prompts.py")
    base, adapters = resolve(args.model)
    dtype = resolve_dtype(args.dtype, accelerator.device)
    # Scores in another dtype are other numbers: the cache key carries it (fp32 keys stay as they were).
    state_id = model_state_id(base, adapters) + ("" if dtype == torch.float32 else f"|{dtype}")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype).to(load_device(accelerator)).eval()  # FSDP2: the CPU until sharded
    check_context(model, [("--max-length", args.max_length)], args.allow_beyond_context, args.model or "")
    model = shard_for_inference(accelerator, model)  # FSDP2 / ZeRO-3 launches (tasks/sharding.py)
    if len(instances) < args.instances:
        accelerator.print(f"note: task {task.name} has {len(instances)} {args.split} instances (< {args.instances})")
    paraphrase_cache = args.paraphrase_cache or (str(out_dir / "paraphrases.json") if out_dir else None)
    candidates = source.build(task, accelerator=accelerator, model=model, tokenizer=tokenizer, state_id=state_id,
                              cache_path=paraphrase_cache)

    settings = ScoringSettings(method=args.select, race_first=args.race_first, race_confidence=args.race_confidence,
                               token_budget=args.token_budget, max_length=args.max_length)
    result = select_candidates(model, tokenizer, task, candidates, instances, accelerator, settings,
                               cache_path=cache_path, state_id=state_id, progress=not args.no_progress,
                               row_tokens=args.row_tokens)
    failed = None
    if accelerator.is_main_process:
        print_table(result)  # first: the scores are on screen even when the file cannot be written
        if result.rounds:
            print_rounds(result)
        if args.output:
            try:
                with writing(args.output):
                    write_json(args.output, {**result.to_json(), "model": args.model or "default",
                                             "split": args.split, "dtype": str(model.dtype)})
            except OSError as e:
                kept = (f"the scores are kept in the cache {cache_path}: rerun with a writable --output and --cache "
                        f"{cache_path} to write them without scoring again") if cache_path else "the scores are above"
                failed = f"could not write --output: {describe_os_error(e)}; {kept}"
    accelerator.wait_for_everyone()
    if failed:
        raise SapoError(failed)
    accelerator.end_training()  # tears down the process group cleanly under accelerate launch


if __name__ == "__main__":
    main()
    exit_after_main()
