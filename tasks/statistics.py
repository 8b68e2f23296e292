"""The statistics of the prompt-effect study (probe_prompts.py) and of seed comparisons (compare_seeds.py): relative
change, Pearson and Spearman correlation, percentile-bootstrap intervals, Student-t intervals, Fisher-z pooling of
correlations, the seed / candidate variance decomposition with its permutation test, and the Flesch-Kincaid grade of
an instruction.

Plain numpy, float64. Undefined values are NaN, never an exception: a correlation with a constant vector, a relative
change against a zero score. Callers average with the NaNs left out and say how many values they averaged.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

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


def bootstrap_samples(statistic, sizes: list[int], resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Like bootstrap_interval, but `statistic(indices)` returns a vector (several statistics of the SAME draw) and
    every resample's vector is returned, one row each: intervals of differences between two of the statistics are
    then paired (both computed on the same resampled candidates). The draws are bootstrap_interval's."""
    rng = np.random.default_rng(seed)
    return np.asarray([statistic([rng.integers(0, n, size=n) for n in sizes]) for _ in range(resamples)],
                      dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Pooling correlations across training pairs

FISHER_CLIP = 0.9999  # |r| is clipped here before atanh: r = +-1 (8 candidates, a resample with ties) is not infinite


def fisher_z_pool(rs, ns) -> float:
    """Fixed-effect pooled correlation: tanh(sum_i w_i atanh(r_i) / sum_i w_i) with w_i = max(n_i - 3, 1) (n_i - 3
    is the inverse variance of atanh(r) for n_i points; at least 1 so pools of 2 or 3 candidates still count), r_i
    clipped to +-FISHER_CLIP. NaN r_i are left out; NaN when none is left."""
    pairs = [(float(r), n) for r, n in zip(rs, ns) if r is not None and math.isfinite(r)]
    if not pairs:
        return float("nan")
    weights = [max(n - 3, 1) for _, n in pairs]
    z = sum(w * math.atanh(max(-FISHER_CLIP, min(FISHER_CLIP, r))) for (r, _), w in zip(pairs, weights))
    return math.tanh(z / sum(weights))


# ----------------------------------------------------------------------------------------------------------------------
# Seed noise: how much of the spread across candidates is the spread across seeds of the same candidate


@dataclass
class VarianceDecomposition:
    """One-way random-effects analysis of a table y[c][s] (candidate c trained with seed s), K candidates x S seeds:

    MS_candidates = S * sum_c (mean_c - grand mean)^2 / (K - 1)
    MS_seeds      = sum_c sum_s (y_cs - mean_c)^2 / (K (S - 1))          (the noise floor: same candidate, other seed)
    seed_variance = MS_seeds;  candidate_variance = max(0, (MS_candidates - MS_seeds) / S)
    F = MS_candidates / MS_seeds; p_value: permutation test of F (the K*S values shuffled across the cells).
    With S = 1 there is no noise floor: seed_variance, F and p are NaN and candidate_variance is the plain variance
    across candidates (ddof 1), training noise included."""

    candidates: int
    seeds: int
    ms_candidates: float
    ms_seeds: float
    candidate_variance: float
    seed_variance: float
    f: float
    p_value: float
    permutations: int

    @property
    def candidate_sd(self) -> float:
        return math.sqrt(self.candidate_variance) if math.isfinite(self.candidate_variance) else float("nan")

    @property
    def seed_sd(self) -> float:
        return math.sqrt(self.seed_variance) if math.isfinite(self.seed_variance) else float("nan")


def _mean_squares(y: np.ndarray) -> tuple[float, float]:
    k, s = y.shape
    means = y.mean(axis=1)
    ms_c = s * float(((means - y.mean()) ** 2).sum()) / (k - 1) if k > 1 else float("nan")
    ms_s = float(((y - means[:, None]) ** 2).sum()) / (k * (s - 1)) if s > 1 else float("nan")
    return ms_c, ms_s


def variance_decomposition(table, permutations: int = 1000, seed: int = 0) -> VarianceDecomposition:
    """See VarianceDecomposition; `table` is K x S (finite values). The permutation p-value is
    (1 + #{F_perm >= F}) / (1 + permutations)."""
    y = np.asarray(table, dtype=np.float64)
    if y.ndim != 2 or not np.isfinite(y).all():
        raise ValueError(f"variance_decomposition: a K x S table of finite values, got shape {y.shape}")
    k, s = y.shape
    ms_c, ms_s = _mean_squares(y)
    nan = float("nan")
    if s < 2:
        return VarianceDecomposition(k, s, ms_c, nan, float(np.var(y[:, 0], ddof=1)) if k > 1 else nan, nan, nan, nan,
                                     0)
    f = ms_c / ms_s if ms_s > 0 else (nan if ms_c == 0 else math.inf)
    p = nan
    if math.isfinite(f) or f == math.inf:
        rng = np.random.default_rng(seed)
        flat = y.ravel()
        hits = 0
        for _ in range(permutations):
            c_perm, s_perm = _mean_squares(rng.permutation(flat).reshape(k, s))
            f_perm = c_perm / s_perm if s_perm > 0 else math.inf
            hits += f_perm >= f
        p = (1 + hits) / (1 + permutations)
    return VarianceDecomposition(k, s, ms_c, ms_s, max(0.0, (ms_c - ms_s) / s), ms_s, f, p, permutations)


# ----------------------------------------------------------------------------------------------------------------------
# Student-t intervals (few seeds: a bootstrap of 3 values has only 10 distinct resamples)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    tail = 0.5 * regularized_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on student_t_cdf to 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"student_t_quantile: p must be in (0, 1), got {p}")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > p:
        low *= 2
    while student_t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, abs(high)):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n) of the finite values (sd with ddof 1); NaNs for n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) < 2:
        return float("nan"), float("nan")
    half = student_t_quantile((1 + confidence) / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()) - half, float(x.mean()) + half


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
