"""The scripts' flags: built from a config dataclass (add_config_flags: one flag per field, help from its comment),
and their allowed ranges, checked as soon as the command line is parsed: a value that cannot work (0 epochs, a batch
of 0, a confidence of 2) is one error line naming the flag and its range, before any data or model is loaded, never a
run that "succeeds" after 0 optimizer steps or a traceback half an hour in."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
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


def add_config_flags(parser, config_cls, ranges: dict[str, Range], *, skip=(), bare_values: dict | None = None,
                     with_defaults: bool = False) -> list[str]:
    """One flag per field of the config dataclass `config_cls` (--field-name), added to `parser` (or an argument
    group); returns the names of the fields that became flags. Its help is the field's trailing comment in the class
    source (the classes it derives from included), then its default and its range in `ranges`. A bool field is
    --x / --no-x; a field in `bare_values` may be given without a value (that value then); an int or float field
    parses as one, anything else as a string. The flags default to None (the caller merges what was given over its
    presets) unless `with_defaults`: then to the field's default."""
    comments = {}
    for cls in reversed(config_cls.__mro__):  # a derived class's comment wins
        if dataclasses.is_dataclass(cls):
            comments.update(re.findall(r"^    (\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))
    bare_values = bare_values or {}
    names = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        base_type = annotation.split("|")[0].strip()  # "int | None" -> int (annotations are strings in the scripts)
        allowed = f"; {ranges[f.name]}" if f.name in ranges else ""
        help_text = (comments.get(f.name, "") + f" (default: {f.default}{allowed})").strip().replace("%", "%%")
        default = f.default if with_defaults else None
        if f.name in bare_values:
            parser.add_argument(flag, nargs="?", const=bare_values[f.name], default=default, help=help_text)
        elif base_type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(base_type, str), default=default,
                                help=help_text)
        names.append(f.name)
    return names


def given_flags(args, names: list[str]) -> dict:
    """The flags of `names` given on the command line (None: not given), by field name."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
