"""bench/gpu_suite.sh and bench/suite_report.py without a GPU: what comes back from the lent machine is at most 8
files in one folder (the device tool brings back no more), without adapters or weights; the parts' timeouts fit
the 600 s command; a bad part name is one line."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parts_table():
    text = (ROOT / "bench" / "gpu_suite.sh").read_text()
    table = text.split('PARTS="', 1)[1].split('"', 1)[0]
    return [(line.split()[0], int(line.split()[1]), line.split()[2]) for line in table.splitlines() if line.strip()]


def test_each_group_of_parts_fits_one_command():
    parts = parts_table()
    groups = {g for _, _, g in parts}
    assert {"default", "8b"} <= groups
    assert sum(t for _, t, g in parts if g == "default") <= 480  # <= 8 min: the margin in a 600 s command
    for group in groups:
        assert sum(t for _, t, g in parts if g == group) <= 560, group  # + installing wheels, the report


def test_an_unknown_part_is_one_line_and_exit_2():
    run = subprocess.run(["bash", "bench/gpu_suite.sh", "no_such_part"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "SAPO_SUITE_DRYRUN": "1", "PYTHON": sys.executable})
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no part or group named 'no_such_part'" in run.stderr


def test_report_brings_back_at_most_8_flat_files_without_weights(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    rows = ["part\tstatus\tseconds\ttimeout\theadline"]
    for k in range(6):  # more CSVs than fit
        part = work / f"p{k}"
        (part / "run" / "1-task" / "adapter").mkdir(parents=True)
        (part / "run" / "1-task" / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 100)
        (part / "run" / "1-task" / "checkpoint").mkdir()
        (part / "run" / "1-task" / "checkpoint" / "optimizer.bin").write_bytes(b"x")
        (part / "run" / "1-task" / "training.json").write_text("{}")
        (part / "grads.pt").write_bytes(b"x")
        (part / f"p{k}.csv").write_text("a,b\n1,2\n")
        status = "ok" if k != 2 else "timed out after 60 s"
        rows.append(f"p{k}\t{status}\t{10 + k}\t60\tfigure {k}")
    (work / "status.tsv").write_text("\n".join(rows) + "\n")
    (out / "gpu_suite.log").write_text("log\n")  # written by the suite itself
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "suite_report.py"), "--work", str(work), "--out",
                          str(out), "--device", "cpu", "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 1  # one part timed out
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files)
    assert files == sorted(["gpu_suite.log", "summary.md", "summary.json", "runs.tar.gz",
                            "p0.csv", "p1.csv", "p2.csv", "p3.csv"])
    summary = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == [f"p{k}" for k in range(6)]
    assert summary["csvs_only_in_tarball"] == ["p4", "p5"]
    assert summary["parts"][2]["status"] == "timed out after 60 s"
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "p0/run/1-task/training.json" in names and "p5/p5.csv" in names
    assert not [n for n in names if "adapter" in n or "checkpoint" in n or n.endswith((".pt", ".safetensors"))]
    md = (out / "summary.md").read_text()
    assert "| p2 | timed out after 60 s | 12 (60) | figure 2 |" in md
    assert run.stdout.strip().endswith(md.strip().splitlines()[-1])  # the summary is printed last
