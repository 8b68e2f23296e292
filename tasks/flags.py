"""Allowed ranges of the scripts' numeric flags, checked as soon as the command line is parsed: a value that cannot
work (0 epochs, a batch of 0, a confidence of 2) is one error line naming the flag and its range, before any data or
model is loaded, never a run that "succeeds" after 0 optimizer steps or a traceback half an hour in."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from tasks.errors import SapoError

MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


@dataclass(frozen=True)
class Range:
    """low <= value <= high; an open end excludes the bound itself; None: no bound on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def check_ranges(values: dict, ranges: dict[str, Range]):
    """Every value whose name has a range must lie in it; None (a flag's "all"/"off" value) always passes."""
    for name, allowed in ranges.items():
        value = values.get(name)
        if value is not None and value not in allowed:
            raise SapoError(f"--{name.replace('_', '-')} {value}: must be {allowed}")


# Flags both scripts have, with the same meaning.
POOL_RANGES = {"generate": Range(0), "max_candidates": Range(1), "pool_sample": Range(0, MAX_SEED), "race_first": Range(1),
               "race_confidence": Range(0, 1, low_open=True), "seed": Range(0, MAX_SEED)}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors (a bad number, an unknown flag, a missing one) as one SapoError line, not a usage
    dump of every flag."""

    def error(self, message):
        raise SapoError(message)


def check_choices(values: dict, choices: dict[str, tuple]):
    for name, allowed in choices.items():
        if values.get(name) not in allowed:
            raise SapoError(f"--{name.replace('_', '-')} {values.get(name)}: must be one of {', '.join(allowed)}")
