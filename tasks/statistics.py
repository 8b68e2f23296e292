"""The statistics of the prompt-effect study (probe_prompts.py): relative change, Pearson and Spearman correlation,
percentile-bootstrap intervals, and the Flesch-Kincaid grade of an instruction.

Plain numpy, float64. Undefined values are NaN, never an exception: a correlation with a constant vector, a relative
change against a zero score. Callers average with the NaNs left out and say how many values they averaged.
"""
from __future__ import annotations

import math
import re

import numpy as np


def relative_change(score: float, reference: float) -> float:
    """The paper's "normalized relative performance change": (score - reference) / reference; NaN when reference = 0."""
    return (score - reference) / reference if reference else float("nan")


def pearson(x, y) -> float:
    """Pearson's r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2); NaN when either
    vector is constant or has fewer than 2 values (nothing to correlate)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson: shapes differ, {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else float("nan")


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of `x`; tied values get the mean of the ranks they occupy ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # positions i..j (0-based) hold ranks i+1..j+1: their mean
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks (so ties are handled exactly, not by the n^3 formula)."""
    return pearson(average_ranks(x), average_ranks(y))


def nanmean(values) -> float:
    """Mean of the finite values; NaN when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else float("nan")


def percentile_interval(samples, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the finite samples (linear
    interpolation, numpy's default); NaNs when there are none."""
    finite = np.asarray([s for s in samples if s is not None and math.isfinite(s)], dtype=np.float64)
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_interval(statistic, sizes: list[int], resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic(indices)`, where `indices` holds one array per group: group g's
    n = sizes[g] items drawn with replacement (e.g. the candidates of each training pair, resampled within the pair).
    Resamples whose statistic is NaN (a constant vector drawn) are left out of the quantiles."""
    rng = np.random.default_rng(seed)
    samples = [statistic([rng.integers(0, n, size=n) for n in sizes]) for _ in range(resamples)]
    return percentile_interval(samples, confidence)


# ----------------------------------------------------------------------------------------------------------------------
# Readability

_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")


def syllables(word: str) -> int:
    """Syllables of an English word by a heuristic: the groups of consecutive vowels (a e i o u y), minus one for a
    silent final "e" (but not "-le" after a consonant, as in "table"), at least 1. "cat" 1, "table" 2, "make" 1,
    "instruction" 3, "classify" 3."""
    w = word.lower()
    count = len(_VOWEL_GROUPS.findall(w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and count > 1:
        count -= 1
    elif w.endswith("le") and len(w) > 2 and w[-3] in "aeiouy" and count > 1:  # "whole", "male": silent e
        count -= 1
    return max(count, 1)


def flesch_kincaid_grade(text: str) -> float:
    """Flesch-Kincaid grade level = 0.39 * words / sentences + 11.8 * syllables / words - 15.59.

    Words: runs of letters (with an inner apostrophe); numbers and symbols are not words. Sentences: the pieces
    between runs of . ! ? followed by a space or the end that hold a word (a last sentence without a period counts).
    Syllables: `syllables` above. NaN for a text without words.
    """
    words = _WORD.findall(text)
    if not words:
        return float("nan")
    sentences = sum(1 for piece in _SENTENCE_END.split(text) if _WORD.search(piece))
    return 0.39 * len(words) / sentences + 11.8 * sum(syllables(w) for w in words) / len(words) - 15.59
