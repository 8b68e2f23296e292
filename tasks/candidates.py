"""Candidate pools: the instructions SAPO chooses from. The original instruction is always candidate 0.

A candidate is valid when it is non-empty, distinct from the others, of a sane length (a quarter to four times the
original's characters), and keeps every label word verbatim (whole word, same spelling and case) that the original
instruction names: a paraphrase that drops "positive" would train the model to answer something else.
"""
from __future__ import annotations

import math
import re

from tasks.core import Task
from tasks.errors import SapoError

MIN_RATIO, MAX_RATIO = 0.25, 4.0


def _has_word(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text) is not None


def required_label_words(task: Task) -> list[str]:
    """The label words a paraphrase must keep: those the original instruction itself names."""
    return [w for w in task.label_words if _has_word(task.instruction, w)]


def candidate_problem(task: Task, text: str) -> str | None:
    """Why `text` is not a valid candidate for `task`, or None when it is."""
    if not isinstance(text, str) or not text.strip():
        return "is empty"
    n, n0 = len(text), len(task.instruction)
    if not MIN_RATIO * n0 <= n <= max(MAX_RATIO * n0, 200):
        return f"has {n} characters, outside {int(MIN_RATIO * n0)}..{int(max(MAX_RATIO * n0, 200))} for this task"
    missing = [w for w in required_label_words(task) if not _has_word(text, w)]
    if missing:
        return "drops the label word(s) " + ", ".join(repr(w) for w in missing)
    return None


# The validity filters a generated paraphrase passes, named by the start of their rejection message (here and in
# tasks.paraphrases.parse_paraphrase); paraphrases.json counts the rejections of each.
REJECTION_FILTERS = {"has no <START>": "no_tags", "is empty": "empty", "mentions paraphrasing": "mentions_paraphrasing",
                     "has ": "length", "drops the label word": "label_words", "is a duplicate": "duplicate"}


def rejection_filter(problem: str) -> str:
    """The name of the filter a rejection message comes from (REJECTION_FILTERS; "other" for none)."""
    return next((name for start, name in REJECTION_FILTERS.items() if problem.startswith(start)), "other")


def validate_candidates(task: Task, candidates: list[str], where: str = "candidates") -> list[str]:
    """Check a user-given pool; the original instruction is put first (added if absent). One-line error if invalid."""
    pool = [task.instruction]
    for i, text in enumerate(candidates):
        problem = candidate_problem(task, text)
        if problem:
            raise SapoError(f"{where}: candidate {i} for task {task.name} {problem}: {str(text)[:60]!r}")
        text = text.strip()
        if text in pool:
            if text != task.instruction:
                raise SapoError(f"{where}: candidate {i} for task {task.name} repeats an earlier candidate")
            continue
        pool.append(text)
    return pool


def filter_candidates(task: Task, candidates: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """For generated paraphrases: keep the valid, distinct ones; return (pool with the original first, rejected)."""
    pool, rejected = [task.instruction], []
    for text in candidates:
        problem = candidate_problem(task, text)
        if problem is None and text.strip() in pool:
            problem = "is a duplicate"
        if problem:
            rejected.append((text, problem))
        else:
            pool.append(text.strip())
    return pool, rejected


def load_candidates_file(path, task: Task) -> list[str]:
    """A JSON file with a list of instructions, or a mapping task name -> list (short SuperNI ids match too)."""
    from tasks.loaders import read_json

    data = read_json(path)
    if isinstance(data, dict):
        key = task.name if task.name in data else next(
            (k for k in data if task.name.startswith(k + "_") or k.startswith(task.name + "_")), None)
        if key is None:
            raise SapoError(f"{path} has no candidates for task {task.name}")
        data = data[key]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise SapoError(f"{path} must hold a JSON list of instruction strings (or task -> list)")
    return validate_candidates(task, data, where=str(path))


def candidate_pool(task: Task) -> list[str]:
    """The task's built-in pool, validated, original first (tasks.pools.PoolSource builds pools from any source)."""
    if not task.paraphrases:
        raise SapoError(f"task {task.name} has no built-in paraphrase pool: give --candidates FILE or --generate K")
    return validate_candidates(task, list(task.paraphrases), where=f"built-in pool of {task.name}")


def select_index(scores) -> int:
    """Index of the lowest score; ties keep the lowest index (candidate 0 = the original instruction). A NaN score
    never wins (NaN compares false)."""
    scores = [float(s) for s in scores]
    best = 0
    for i, s in enumerate(scores):
        if s < scores[best] or math.isnan(scores[best]) and not math.isnan(s):
            best = i
    return best
