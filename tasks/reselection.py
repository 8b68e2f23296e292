"""Mid-task re-selection (ours, beyond the paper: `train_sapo.py --reselect-every N`).

The paper selects a task's training instruction once, before training. Here, every N optimizer steps, a shortlist of
the pool is scored again with the weights being trained, on HELD-OUT instances (the training split's instances after
the first --train-instances, which the adapter never fits), and training switches to the lowest-loss candidate only
when it is confidently better than the current one: racing's paired test (tasks.racing.paired_lower_bound: per-instance
NLL differences, one-sided Student-t lower bound above zero) at --race-confidence, split (union bound) over every
comparison the task can make, (shortlist - 1) per re-scoring times the re-scorings planned. A difference below the
noise (4.829 vs 4.832 on 8 instances) keeps the current instruction.

The test leans toward the incumbent. The adapter being trained has seen the incumbent instruction on every step and
the other candidates never: the incumbent's held-out loss includes what the adapter learned about that wording, the
others' only what carries over to theirs. So this is not a pre-update loss for the incumbent (it is one for the
others), and a switch needs a candidate to beat that advantage: re-selection switches less often than an unbiased
test would. We document it rather than correct it; there is no pre-update state to score the incumbent against once
training has started.

train_sapo.train_task calls the Reselector after every optimizer step (one hook); it returns the re-encoded training
set when it switches. The scorer is passed in (score_prompts.select_candidates, bound to the run's settings), so this
module holds the decision only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, TypedDict

from tasks.errors import SapoError
from tasks.racing import paired_lower_bound, race_z


@dataclass
class Reselection:
    """One mid-task re-scoring of the shortlist on held-out instances."""

    step: int
    candidates: list[int]  # pool indices of the shortlist, in scoring order
    scores: list[float]  # their scores on the held-out instances, same order (racing: on the instances each reached)
    current: int  # pool index of the instruction training used until this step
    best: int  # pool index of the lowest score
    lower_bound: float | None  # paired lower bound of (current - best) in NLL per token; None when best is current
    z: float | None  # its standard-error multiplier; None = no switch possible (too few instances, confidence 1.0)
    switched: bool  # lower_bound > 0: the best is confidently better, training goes on with it
    selected_instruction: str  # the training instruction after this step
    seconds: float


class ReselectorState(TypedDict):
    """A training checkpoint's re-selection state (Reselector.state)."""

    instruction: str
    events: list[Reselection]


def reselection_instances(task, split: str, config):
    """The held-out instances re-selection scores on: up to --score-instances of the training split after the first
    --train-instances (the ones training never sees)."""
    held_out = task.split(split)[config.train_instances:config.train_instances + config.score_instances]
    if len(held_out) < 2:
        raise SapoError(f"--reselect-every scores on the {split} instances after the first --train-instances "
                        f"{config.train_instances}; task {task.name} has {len(task.split(split))}, leaving "
                        f"{len(held_out)} (2 or more needed): lower --train-instances")
    return held_out


def shortlist_of(selection, top: int | None) -> list:
    """The candidates re-selection re-scores: racing's longest-lasting first (their scores cover more instances),
    then by score; the best `top` of them (None: all)."""
    ranked = sorted(selection.candidates, key=lambda c: (-c.num_instances_scored, c.score, c.index))
    return ranked[:top or None]


class Reselector:
    """Every `config.reselect_every` optimizer steps (not after the last), re-score the shortlist with the weights
    being trained and switch the training instruction when the best is confidently better (module docstring).

    `score(model, instructions, instances)` returns a score_prompts.Selection of `instructions` on `instances`;
    `encode(instruction)` the training set encoded with an instruction. Every re-scoring is recorded in `events`;
    their seconds count as selection time, not training time."""

    def __init__(self, score: Callable, shortlist: list[str], shortlist_indices: list[int], instances,
                 instruction: str, config, encode: Callable, rescorings: int, print_fn: Callable = print):
        self.score, self.shortlist, self.indices, self.instances = score, shortlist, list(shortlist_indices), instances
        self.config, self.encode, self.print = config, encode, print_fn
        self.comparisons = max(1, (len(shortlist) - 1) * rescorings)
        self.current, self.events = instruction, []

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.events)

    def after_step(self, model, step: int, total_steps: int):
        """The training loop's hook, after optimizer step `step` (1-based): the new encoded training set when this
        step re-scores and switches, else None."""
        if step % self.config.reselect_every or step >= total_steps:
            return None
        return self(model, step)

    def __call__(self, model, step: int):
        """Re-score with `model` (the transformers model, LoRA layers inside); new encoded data if switching."""
        confidence = self.config.race_confidence
        result = self.score(model, self.shortlist, self.instances)
        current, best = result.candidates[self.shortlist.index(self.current)], result.candidates[result.selected]
        bound = z = None
        n = min(current.num_instances_scored, best.num_instances_scored)  # racing: the instances both reached
        if best is not current:
            z = race_z(confidence, n, self.comparisons)
            tokens_per_instance = sum(best.instance_counts[:n]) / n
            if math.isfinite(z) and tokens_per_instance > 0:
                bound = paired_lower_bound(current.instance_sums[:n], best.instance_sums[:n], tokens_per_instance, z)
            else:
                z = None
        switched = bound is not None and bound > 0
        if switched:
            self.print(f"  step {step}: switching the training instruction to {best.instruction[:80]!r} "
                       f"({current.score:.4f} -> {best.score:.4f}, lower bound {bound:.4f})")
            self.current = best.instruction
        self.events.append(Reselection(step=step, candidates=self.indices, scores=[c.score for c in result.candidates],
                                       current=self.indices[current.index], best=self.indices[best.index],
                                       lower_bound=bound, z=z, switched=switched, selected_instruction=self.current,
                                       seconds=result.seconds))
        return self.encode(self.current) if switched else None

    def state(self) -> ReselectorState:
        return {"instruction": self.current, "events": [dataclasses.asdict(e) for e in self.events]}

    def restore(self, state: ReselectorState | None):
        """Back to a checkpoint's state; the re-encoded training set when the instruction had been switched."""
        if not state:
            return None
        self.events = list(state["events"])  # Reselection records (tasks.records built them)
        if state["instruction"] == self.current:
            return None
        self.current = state["instruction"]
        return self.encode(self.current)
