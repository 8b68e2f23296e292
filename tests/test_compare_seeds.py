"""compare_seeds.py: SAPO vs the original over seeds, on hand-made run directories (R.json), against hand-computed
paired differences and Student-t intervals."""
import json
import math

import pytest

import compare_seeds
import evaluate


def write_run(path, R, seed):
    path.mkdir(parents=True)
    (path / "R.json").write_text(json.dumps({"tasks": ["a", "b"], "rows": evaluate.row_labels(["a", "b"]),
                                             "rougeL": R}))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return str(path)


def test_paired_differences_and_t_intervals_by_hand(tmp_path, capsys):
    # Two tasks; AP = mean of the last row. SAPO's AP per seed: 31, 33, 35; the original's: 30, 30, 31.
    sapo = [write_run(tmp_path / f"sapo-{s}", [[10, 10], [40, 12], [30 + 2 * s, 32 + 2 * s]], s) for s in range(3)]
    orig = [write_run(tmp_path / f"orig-{s}", [[10, 10], [40, 12], [29 + (s == 2), 31 + (s == 2)]], s)
            for s in range(3)]
    rows = {r.metric: r for r in compare_seeds.main(["--sapo", *sapo, "--original", *orig, "--json",
                                                     str(tmp_path / "c.json")])}
    ap = rows["AP"]
    diffs = [31 - 30, 33 - 30, 35 - 31]  # 1, 3, 4: mean 8/3, sd sqrt(7/3)
    assert ap.sapo == [31, 33, 35] and ap.original == [30, 30, 31]
    assert ap.difference == pytest.approx(8 / 3) and ap.seeds == 3 and ap.sapo_ahead == 3
    half = 4.3026527 * math.sqrt(7 / 3) / math.sqrt(3)
    assert (ap.low, ap.high) == pytest.approx((8 / 3 - half, 8 / 3 + half), abs=1e-6)
    # BWT = R[2][1] - R[1][1]: SAPO -10 + 2s, the original -11, -11, -10.
    bwt = rows["BWT"]
    assert bwt.difference == pytest.approx(((-10 + 11) + (-8 + 11) + (-6 + 10)) / 3)
    printed = capsys.readouterr().out
    assert "| AP | 33.00 | 30.33 | +2.67 |" in printed and "3/3" in printed
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["comparison"][0]["metric"] == "AP" and saved["comparison"][0]["difference"] == pytest.approx(8 / 3)


def test_mismatched_runs_fail_in_one_line(tmp_path, capsys):
    a = write_run(tmp_path / "a", [[1, 1], [2, 2], [3, 3]], 1)
    b = write_run(tmp_path / "b", [[1, 1], [2, 2], [3, 3]], 2)
    for argv, message in ((["--sapo", a, "--original", b], "is paired with"),
                          (["--sapo", a, a, "--original", b], "one of each per seed"),
                          (["--sapo", a, "--original", str(tmp_path / "missing")], "missing")):
        with pytest.raises(SystemExit) as e:
            compare_seeds.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
