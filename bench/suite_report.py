"""The GPU suite's last step (bench/gpu_suite.sh): what comes back from the lent machine, at most 8 files, no folders.

    summary.md, summary.json   one table across the parts (part, status, seconds, timeout, headline), the device,
                               the versions the figures were made with (the image's, not requirements.txt's), commit
    <part>.csv                 the CSV of each of the first MAX_CSVS parts that wrote one ($PART_DIR/<part>.csv)
    runs.tar.gz                every part's folder: outputs, JSON, Markdown, run directories, without adapters,
                               checkpoints, weights or files over MAX_TAR_FILE_BYTES
    gpu_suite.log              (written by the suite itself)

The summary is printed last, short enough for a 12,000-character output tail. Exit status 1 when a part did not
finish ok.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_FILES = 8  # what the device tool brings back from $OUT
FIXED_FILES = ("gpu_suite.log", "summary.md", "summary.json", "runs.tar.gz")
MAX_CSVS = MAX_FILES - len(FIXED_FILES)
MAX_TAR_FILE_BYTES = 4 << 20
LEFT_OUT_DIRS = {"adapter", "adapter.tmp", "checkpoint", "checkpoint.tmp", "checkpoint.old", "models", "site",
                 "__pycache__"}
LEFT_OUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".gguf")


@dataclass
class PartResult:
    part: str
    status: str  # ok | failed (exit N) | timed out after T s
    seconds: int
    timeout: int
    headline: str


def read_status(path: Path) -> list[PartResult]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [PartResult(r["part"], r["status"], int(r["seconds"]), int(r["timeout"]), r["headline"] or "")
            for r in rows]


def versions() -> dict:
    found = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "triton", "transformers", "accelerate", "peft", "liger-kernel", "cut-cross-entropy",
                 "rouge-score", "nltk"):
        try:
            found[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            found[name.replace("-", "_")] = "absent"
    try:
        import torch

        found["cuda"] = torch.version.cuda or "none"
        found["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        found["device"] = "unknown"
    return found


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def keep_in_tar(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if any(p in LEFT_OUT_DIRS for p in parts) or info.name.endswith(LEFT_OUT_SUFFIXES):
        return None
    if info.isfile() and info.size > MAX_TAR_FILE_BYTES:
        return None
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the suite's scratch folder (status.tsv, one folder per part)")
    p.add_argument("--out", required=True, help="where the files go ($OUT)")
    p.add_argument("--device", required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    parts = read_status(work / "status.tsv")

    csvs, csv_left = [], []
    for r in parts:
        source = work / r.part / f"{r.part}.csv"
        if source.exists() and len(csvs) < MAX_CSVS:
            shutil.copyfile(source, out / f"{r.part}.csv")
            csvs.append(r.part)
        elif source.exists():
            csv_left.append(r.part)
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for r in parts:
            if (work / r.part).exists():
                tar.add(work / r.part, arcname=r.part, filter=keep_in_tar)

    info = {"device": args.device, "dry_run": args.dry_run, "commit": commit(), "versions": versions(),
            "parts": [asdict(r) for r in parts], "csvs": [f"{c}.csv" for c in csvs],
            "csvs_only_in_tarball": csv_left}
    (out / "summary.json").write_text(json.dumps(info, indent=1) + "\n")
    v = info["versions"]
    lines = [f"# GPU suite: {v.get('device', args.device)}{' (CPU dry run: tiny sizes, not figures)' if args.dry_run else ''}",
             "",
             f"commit {info['commit']}; torch {v['torch']} (CUDA {v.get('cuda', '?')}), triton {v['triton']}, "
             f"transformers {v['transformers']}, accelerate {v['accelerate']}, peft {v['peft']}, liger-kernel "
             f"{v['liger_kernel']}, cut-cross-entropy {v['cut_cross_entropy']}, Python {v['python']}",
             "", "| part | status | s (timeout) | headline |", "|---|---|---|---|"]
    lines += [f"| {r.part} | {r.status} | {r.seconds} ({r.timeout}) | {r.headline.replace('|', '/')[:260]} |"
              for r in parts]
    lines += ["", f"total {sum(r.seconds for r in parts)} s; files: {', '.join(FIXED_FILES)}"
              + "".join(f", {c}.csv" for c in csvs)
              + (f"; CSVs only in runs.tar.gz: {', '.join(csv_left)}" if csv_left else "")]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print()
    print(text, end="")
    raise SystemExit(0 if all(r.status == "ok" for r in parts) else 1)


if __name__ == "__main__":
    main()
