"""timings.json: where a task's time went, one record per task (train_sapo.py writes it after every row of R)."""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class TaskTimings:
    """One task's entry of timings.json: its training record (train_sapo.Training, whose `seconds` is named
    training_seconds here) and the seconds of selection and evaluation; selection_overhead_pct when training took
    time."""

    steps: int
    accumulation: int
    warmup_steps: int
    reselection_seconds: float
    gradient_checkpointing: str
    estimated_peak_bytes: int
    peak_memory_bytes: int
    peak_memory: str
    training_seconds: float  # training alone; re-selection time is selection overhead
    selection_seconds: float  # the first selection plus every mid-task re-selection (ours)
    evaluation_seconds: float  # the row of R after the task

    @classmethod
    def of(cls, training, selection_seconds: float, evaluation_seconds: float) -> "TaskTimings":
        """From a training record (a dataclass with `seconds` and the fields above; train_sapo.Training)."""
        record = dataclasses.asdict(training)
        return cls(**{k: v for k, v in record.items() if k != "seconds"}, training_seconds=training.seconds,
                   selection_seconds=selection_seconds, evaluation_seconds=evaluation_seconds)

    @property
    def selection_overhead_pct(self) -> float | None:
        """Selection time as a percentage of training time; None when training took no time (nothing to compare)."""
        return 100.0 * self.selection_seconds / self.training_seconds if self.training_seconds else None

    def to_json(self) -> dict:
        """timings.json's entry: the fields in order, then selection_overhead_pct when it is defined."""
        overhead = self.selection_overhead_pct
        return {**dataclasses.asdict(self), **({"selection_overhead_pct": overhead} if overhead is not None else {})}


class TrainingClock:
    """A task's training seconds: this segment's wall time, plus `earlier` (the resumed segments'), minus the time
    spent `paused` (re-selection, which is selection time)."""

    def __init__(self):
        self.start, self.earlier, self.excluded = time.perf_counter(), 0.0, 0.0

    @property
    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.start - self.excluded

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start
