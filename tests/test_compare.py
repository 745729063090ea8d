"""analysis/compare.py on a committed reproduction's report: the side-by-side table, its flags
(checked against signs computed here from the CSVs), a planted disagreement, and a bad folder."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "analysis" / "reproductions" / "tinyshakespeare_selfdistill" / "report"
PAPER = ROOT / "analysis" / "paper"
COMPARE = [sys.executable, str(ROOT / "analysis" / "compare.py")]
KD09 = "KD α=0.9"


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def compare(report: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(COMPARE + [str(report), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=120)


def md_rows(text: str, section: str) -> list[list[str]]:
    """The body rows of one Markdown table of compare.md, split into cells."""
    block = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def sign(x: float) -> int:
    return (x > 1e-9) - (x < -1e-9)


def test_side_by_side_flags_match_signs_computed_from_the_csvs(tmp_path):
    p = compare(REPORT, tmp_path)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "compare.md").read_text()
    assert text in p.stdout and (tmp_path / "compare.png").stat().st_size > 10_000
    mine = {(r["teacher_seed"], r["condition"], r["metric"]): float(r["mean"]) for r in rows(REPORT / "data" / "summary.csv")}
    paper = {(r["teacher_seed"], r["condition"], r["alpha"], r["metric"]): float(r["mean"])
             for r in rows(PAPER / "metric_means.csv") if r["setup"] == "tinyshakespeare-nanogpt"}
    kd_names = {"accuracy": "test_acc", "loss": "test_loss"}
    table = md_rows(text, "Direction of KD - SIDDO per metric")
    assert table, "no direction rows"
    flagged = 0
    for setup, seed, metric, alpha, k_eff, k_word, p_eff, p_word, flag, source in table:
        km = kd_names.get(metric, metric)
        k = mine[(seed, f"KD α={float(alpha):g}", km)] - mine[(seed, "SIDDO", km)]
        pp = paper[(seed, "kd", alpha, metric)] - paper[(seed, "siddo", "", metric)]
        assert float(k_eff) == pytest.approx(k, rel=1e-3, abs=1e-6)
        assert float(p_eff) == pytest.approx(pp, abs=1e-9)
        want = sign(pp) != 0 and sign(k) != sign(pp)
        assert (flag == "**DISAGREE**") == want, (metric, alpha, seed, k, pp)
        assert source.startswith("Table ")
        flagged += want
    assert f"{text.count('**DISAGREE**') - 1} disagreement(s)" in text       # the headline counts them
    decisions = md_rows(text, "Transfer decisions per teacher seed and KD alpha")
    assert {(r[1], r[2]) for r in decisions} == {(s, a) for s in ("0", "1") for a in ("0.5", "0.9")}
    assert flagged + sum("DISAGREE" in r[-2] for r in decisions) == text.count("**DISAGREE**") - 1


def test_a_planted_disagreement_is_flagged_and_strict_fails(tmp_path):
    report = tmp_path / "report"
    shutil.copytree(REPORT, report)
    summary = rows(report / "data" / "summary.csv")
    for r in summary:   # make the KD student farther from the teacher than SIDDO, against the paper
        if r["teacher_seed"] == "0" and r["condition"] == KD09 and r["metric"] == "activation_distance":
            base = next(float(s["mean"]) for s in summary if s["teacher_seed"] == "0" and s["condition"] == "SIDDO"
                        and s["metric"] == "activation_distance")
            r["mean"] = str(base + 0.5)
    with open(report / "data" / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    p = compare(report, tmp_path / "out", "--strict")
    assert p.returncode == 1
    table = md_rows((tmp_path / "out" / "compare.md").read_text(), "Direction of KD - SIDDO per metric")
    row = next(r for r in table if r[1:4] == ["0", "activation_distance", "0.9"])
    assert row[5] == "worse" and row[7] == "better" and row[8] == "**DISAGREE**"


def test_a_folder_that_is_no_report_is_one_line_and_exit_2(tmp_path):
    p = compare(tmp_path, tmp_path / "out")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"compare: error: {tmp_path / 'data' / 'summary.csv'}: missing (per-condition means); "
        "give the folder `kdray report` wrote"]
