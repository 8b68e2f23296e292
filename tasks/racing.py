"""Racing statistics (beyond the paper: `--select sapo-race`): score only the candidates that can still be the best.

Round r scores the surviving candidates on a growing prefix of the instances; a candidate whose paired per-instance
loss differences to the current leader have a one-sided Student-t lower confidence bound above zero is dropped. The
paper scores every candidate on every instance; racing picks the same argmin with high probability for a fraction of
the tokens (README, "Selection overhead"). This module is the statistics only: the scorer is passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from tasks.candidates import select_index
from tasks.errors import SapoError

def student_t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom (closed form, Abramowitz & Stegun
    26.7.3-4). With theta = atan(t / sqrt(dof)), A = P(|T| < |t|) is
      odd dof:  (2/pi) (theta + sin(theta) (cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ... up to cos^(dof-2)))
      even dof: sin(theta) (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(dof-2))
    and the CDF is (1 + A) / 2 (A is odd in t, so this holds for negative t too)."""
    theta = math.atan(t / math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:
        term, series = math.cos(theta), 0.0
        for k in range(1, (dof - 1) // 2 + 1):  # powers cos^1, cos^3, ..., cos^(dof-2)
            series += term
            term *= (2 * k) / (2 * k + 1) * c2
        a = 2 / math.pi * (theta + s * series)
    else:
        term, series = 1.0, 0.0
        for k in range(dof // 2):  # powers cos^0, cos^2, ..., cos^(dof-2)
            series += term
            term *= (2 * k + 1) / (2 * k + 2) * c2
        a = s * series
    return 0.5 * (1.0 + a)


def student_t_quantile(p: float, dof: int) -> float:
    """The t with P(T <= t) = p, 0.5 <= p < 1, by bisection on student_t_cdf (exact to ~1e-12)."""
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, dof) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, dof) < p else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass
class RaceRound:
    """What one round of a race scored and decided."""

    round: int
    num_instances: int  # the prefix of instances every survivor has been scored on after this round
    new_instances: int
    scored: list[int]  # candidates scored this round
    leader: int
    z: float | None  # the standard-error multiplier of the elimination bound; None = nothing can be eliminated
    eliminated: list[int]
    survivors: list[int]
    tokens_scored: int  # response tokens of the (candidate, instance) pairs scored this round
    tokens_forwarded: int = 0  # tokens through the model this round (filled by the scorer)
    seconds: float = 0.0


@dataclass
class Race:
    """A finished race: the winner, every round, and each candidate's per-instance sums and counts."""

    selected: int
    sizes: list[int]
    rounds: list[RaceRound]
    sums: dict[int, list[float]]
    counts: dict[int, list[int]]
    eliminated_round: dict[int, int] = field(default_factory=dict)


# The scorer a race calls: (candidates, lo, hi) -> {candidate: (per-instance NLL sums, response-token counts)} for
# instances lo..hi-1.
SliceScorer = Callable[[list[int], int, int], dict[int, tuple[list[float], list[int]]]]


def race_sizes(num_instances: int, first: int, growth: float) -> list[int]:
    """Prefix lengths of the rounds: first, first*growth, first*growth^2, ... (strictly growing), ending at
    num_instances."""
    if first < 1 or growth <= 1.0:
        raise SapoError(f"racing needs first >= 1 and growth > 1 (got first={first}, growth={growth})")
    sizes, n = [], float(first)
    while round(n) < num_instances:
        if not sizes or round(n) > sizes[-1]:
            sizes.append(round(n))
        n *= growth
    return sizes + [num_instances]


def race_z(confidence, num_instances: int, num_rounds: int) -> float:
    """The multiplier of the standard error in the elimination rule at a round with `num_instances` paired
    differences: a one-sided Student-t quantile with num_instances - 1 degrees of freedom at level
    1 - (1 - confidence) / num_rounds. The best candidate faces one test per round, so (union bound over the rounds)
    it is wrongly eliminated with probability at most 1 - confidence, under the t approximation.
    confidence None or >= 1: z = infinity, nothing is ever eliminated (= exhaustive scoring)."""
    if confidence is None or confidence >= 1.0 or num_instances < 2:
        return math.inf
    if not 0.0 < confidence < 1.0:
        raise SapoError(f"racing confidence must be in (0, 1], got {confidence}")
    return student_t_quantile(1.0 - (1.0 - confidence) / num_rounds, num_instances - 1)


def paired_lower_bound(sums_a: list[float], sums_b: list[float], tokens_per_instance: float, z: float) -> float:
    """Lower confidence bound of how much worse a is than b, in per-token units, from paired per-instance NLL sums:
        d_i = (sum_a,i - sum_b,i) / tokens_per_instance,   bound = mean(d) - z * sd(d) / sqrt(n)
    (sd with n - 1 degrees of freedom). A bound above zero says a is worse than b at the level z was chosen for."""
    n = len(sums_a)
    if n != len(sums_b) or n < 2:
        raise SapoError(f"a paired bound needs the same instances, at least 2 (got {len(sums_a)} and {len(sums_b)})")
    d = [(a - b) / tokens_per_instance for a, b in zip(sums_a, sums_b)]
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    return mean - z * sd / math.sqrt(n)


def race_rounds(score_slice: SliceScorer, num_candidates: int, num_instances: int, *, first=8, growth=2.0,
                confidence=0.95) -> Race:
    """The racing procedure, given `score_slice(candidates, lo, hi)` -> {candidate: (sums, counts)} for instances
    lo..hi-1 (per-instance summed NLL and response-token counts). score_prompts.race_candidates passes the model scorer; a
    benchmark can replay the race from sums it already has.

    Round r scores the survivors on the new instances of prefix n_r. The leader L is the survivor with the lowest
    token-weighted mean on the n_r instances (ties: lowest index). A survivor c is eliminated when its paired
    per-instance differences to the leader, in per-token units,
        d_i = (sum_c,i - sum_L,i) / (mean response tokens per instance),  i < n_r,
    have a lower confidence bound above zero:  mean(d) - z * sd(d) / sqrt(n_r) > 0  (z: race_z). The race ends when
    one candidate remains or the instances are spent; the winner is the last leader (argmin over the survivors).
    """
    sizes = race_sizes(num_instances, first, growth)
    sums = {c: [] for c in range(num_candidates)}
    counts = {c: [] for c in range(num_candidates)}
    survivors, eliminated_in, rounds = list(range(num_candidates)), {}, []
    for r, n in enumerate(sizes, 1):
        start = sizes[r - 2] if r > 1 else 0
        for c, (s, k) in score_slice(list(survivors), start, n).items():
            sums[c] += list(s)
            counts[c] += list(k)
        scores = [math.fsum(sums[c]) / sum(counts[c]) if sum(counts[c]) else float("nan") for c in survivors]
        leader = survivors[select_index(scores, candidates=survivors)]
        z = race_z(confidence, n, len(sizes))
        tokens_per_instance = sum(counts[leader]) / n
        out = []
        if math.isfinite(z) and tokens_per_instance > 0:
            out = [c for c in survivors if paired_lower_bound(sums[c], sums[leader], tokens_per_instance, z) > 0]
        scored = survivors
        survivors = [c for c in survivors if c not in out]
        eliminated_in.update({c: r for c in out})
        rounds.append(RaceRound(round=r, num_instances=n, new_instances=n - start, scored=scored, leader=leader,
                                z=z if math.isfinite(z) else None, eliminated=out, survivors=survivors,
                                tokens_scored=sum(sum(counts[c][start:n]) for c in scored)))
        if len(survivors) == 1:
            break
    return Race(selected=rounds[-1].leader, sizes=sizes, rounds=rounds, sums=sums, counts=counts,
                eliminated_round=eliminated_in)
