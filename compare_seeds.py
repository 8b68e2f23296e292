"""Claim (c) as a measured statement: SAPO against the original instruction, over several seeds, with intervals.

    accelerate launch train_sapo.py --seed 1 --select sapo --output-dir runs/sapo-1        # ... seeds 2, 3
    accelerate launch train_sapo.py --seed 1 --select original --output-dir runs/orig-1    # ... seeds 2, 3
    python compare_seeds.py --sapo runs/sapo-1 runs/sapo-2 runs/sapo-3 --original runs/orig-1 runs/orig-2 runs/orig-3

It only reads the runs (their R.json, through evaluate.report_metrics) and pairs them in the order given: the i-th
--sapo run with the i-th --original run, which should share their seed (their config.json is checked when present).
Per continual-learning metric (evaluate.py: AP, BWT, FWT, BWT_last, OP, on --metric): each arm's mean over seeds, the
mean paired difference SAPO - original, its Student-t interval (n - 1 degrees of freedom, tasks.statistics.t_interval)
and in how many seeds SAPO was ahead. An interval above 0 says "SAPO beats the original" at that confidence; one
holding 0 says the seeds cannot tell. Ours: the paper reports single runs.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import evaluate
from tasks.errors import SapoError, cli_main, exit_after_main
from tasks.flags import OneLineParser
from tasks.loaders import write_text_atomic
from tasks.statistics import nanmean, t_interval


@dataclass
class MetricComparison:
    metric: str
    sapo: list[float | None]  # per seed, in the order given
    original: list[float | None]
    sapo_mean: float
    original_mean: float
    difference: float  # mean over seeds of sapo - original (the seeds where both are defined)
    low: float  # Student-t interval of that mean
    high: float
    seeds: int  # seeds where both are defined
    sapo_ahead: int  # seeds where sapo > original


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sapo", nargs="+", required=True, metavar="RUN_DIR", help="SAPO runs, one per seed")
    p.add_argument("--original", nargs="+", required=True, metavar="RUN_DIR",
                   help="runs with the original instructions, the same seeds in the same order")
    p.add_argument("--metric", default="rougeL", choices=evaluate.SCORES)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    if len(args.sapo) != len(args.original):
        raise SapoError(f"--sapo gives {len(args.sapo)} runs and --original {len(args.original)}: one of each per "
                        "seed, in the same order")
    if not 0 < args.confidence < 1:
        raise SapoError(f"--confidence {args.confidence}: must be in (0, 1)")
    return args


def run_seed(run_dir: str) -> int | None:
    config = Path(run_dir) / "config.json"
    if not config.exists():
        return None
    try:
        return json.loads(config.read_text()).get("seed")
    except (OSError, ValueError) as e:
        raise SapoError(f"{config}: not readable JSON ({e})") from None


def compare(sapo: list[dict], original: list[dict], confidence: float) -> list[MetricComparison]:
    """Per metric of evaluate.METRICS: the paired comparison of the reports (evaluate.report_metrics results)."""
    out = []
    for m in evaluate.METRICS:
        a, b = [r[m] for r in sapo], [r[m] for r in original]
        both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        diffs = [x - y for x, y in both]
        low, high = t_interval(diffs, confidence)
        out.append(MetricComparison(metric=m, sapo=a, original=b, sapo_mean=nanmean(a), original_mean=nanmean(b),
                                    difference=nanmean(diffs), low=low, high=high, seeds=len(both),
                                    sapo_ahead=sum(x > y for x, y in both)))
    return out


@cli_main
def main(argv=None):
    args = parse_args(argv)
    sapo = [evaluate.report_metrics(d, args.metric) for d in args.sapo]
    original = [evaluate.report_metrics(d, args.metric) for d in args.original]
    for d, r in zip(args.sapo + args.original, sapo + original):
        if r["tasks"] != sapo[0]["tasks"]:
            raise SapoError(f"{d} has the task sequence {r['tasks']}, {args.sapo[0]} has {sapo[0]['tasks']}")
        if not r["progress"]["complete"]:
            print(f"note: {d}: {r['progress']['note']}")
    for a, b in zip(args.sapo, args.original):
        if run_seed(a) != run_seed(b):
            raise SapoError(f"{a} (seed {run_seed(a)}) is paired with {b} (seed {run_seed(b)}): give the runs of "
                            "the same seeds in the same order")
    rows = compare(sapo, original, args.confidence)
    level = f"{100 * args.confidence:g}%"
    print(f"SAPO vs the original instruction on {args.metric}, {len(sapo)} seed(s), paired by seed; "
          f"{level} Student-t interval of the mean difference")
    print(f"| metric | SAPO | original | SAPO - original | {level} interval | SAPO ahead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.metric} | {r.sapo_mean:.2f} | {r.original_mean:.2f} | {r.difference:+.2f} | "
              f"[{r.low:+.2f}, {r.high:+.2f}] | {r.sapo_ahead}/{r.seeds} |")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps({"metric": args.metric, "confidence": args.confidence,
                                                       "sapo": args.sapo, "original": args.original,
                                                       "comparison": [asdict(r) for r in rows]}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
    exit_after_main()
