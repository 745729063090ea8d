"""``kdray audit``: the paired study written from a teacher, student, data set and method, run, and
answered in plain words; the worked example package (examples/kdray-dkd) installed and audited."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "kdray-dkd"


def kdray(*args, pythonpath=(), timeout=600, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "kdray.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def test_dry_run_prints_the_paired_study_as_a_sweep_file(tmp_path):
    p = kdray("audit", "--dataset", "digits", "--teacher", "small_cnn", "--teacher-args", "{channels: 8}",
              "--recipe", "{epochs: 3, lr: 0.01}", "--alphas", "0.3", "0.7", "--seeds", "7",
              "--storage", tmp_path / "r", "--dry-run", timeout=120)
    assert p.returncode == 0, p.stderr
    path = tmp_path / "audit.yaml"
    path.write_text(p.stdout)
    assert not (tmp_path / "r").exists()                     # nothing run, nothing written
    p = kdray("plan", path, timeout=120)
    assert p.returncode == 0, p.stderr
    # 1 teacher; per seed SIDDO + KD and RCD at each alpha: 7 * (1 + 2 + 2) students.
    assert "36 trials (1 teachers in stage 1, 35 students in stage 2)" in p.stdout
    setup = yaml.safe_load(path.read_text())["setups"][0]
    assert setup["conditions"]["kd"]["alphas"] == setup["conditions"]["rcd"]["alphas"] == [0.3, 0.7]
    assert setup["student_seeds"] == list(range(10, 17)) and setup["recipe"]["epochs"] == 3


def test_dry_run_runs_the_audits_preflight(tmp_path):
    """--dry-run checks what the audit would check: a checkpoint that does not fit, storage that cannot be made."""
    import torch
    torch.save({"weight": torch.zeros(3)}, tmp_path / "teacher.pt")
    (tmp_path / "a_file").write_text("")
    for args, words in [(["--checkpoint", tmp_path / "teacher.pt"], "does not fit architecture 'small_cnn'"),
                        (["--checkpoint", tmp_path / "nope.pt"], "nope.pt does not exist"),
                        (["--storage", tmp_path / "a_file" / "r"], "cannot be created")]:
        p = kdray("audit", "--dataset", "digits", "--teacher", "small_cnn", "--dry-run",
                  *(["--storage", tmp_path / "r"] if "--storage" not in args else []), *args, timeout=120)
        assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()


def test_a_relative_checkpoint_is_written_absolute(tmp_path):
    """The study file is run from wherever: a checkpoint given relative to here is written absolute."""
    import torch
    from kdray.models import build_model
    torch.save(build_model("small_cnn", 10, (1, 8, 8), channels=4).state_dict(), tmp_path / "teacher.pt")
    p = kdray("audit", "--dataset", "digits", "--teacher", "small_cnn", "--teacher-args", "{channels: 4}",
              "--checkpoint", "teacher.pt", "--storage", tmp_path / "r", "--dry-run", timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout)["setups"][0]["teacher"]["checkpoint"] == str(tmp_path / "teacher.pt")


@pytest.mark.parametrize("args, words", [
    (["--method", "nope"], "--method: 'nope' is not a distillation method"),
    (["--recipe", "[1, 2]"], "--recipe: expected a mapping"),
    (["--seeds", "0"], "--seeds: expected at least 1"),
    (["--seeds", "4"], "--seeds 4: 4 paired student seeds: the smallest one-sided Wilcoxon p is 2^-4 = 0.0625 > 0.05, "
                       "so none of the 4 metric tests can be significant; use at least 5 student seeds"),
    (["--seeds", "6", "--correction", "holm"], "use at least 7 student seeds (--correction holm"),
    (["--checkpoint", "/no/such/teacher.pt"], "teacher.checkpoint: /no/such/teacher.pt does not exist"),
])
def test_bad_audit_arguments_are_one_line(tmp_path, args, words):
    p = kdray("audit", "--dataset", "digits", "--teacher", "small_cnn", "--storage", tmp_path / "r", *args, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
    assert not (tmp_path / "r" / "mlflow.db").exists()


@pytest.mark.slow
def test_the_example_package_installs_and_its_dkd_is_audited_end_to_end(tmp_path):
    """pip-installed (its entry point registers DKD, its model and data set: no --plugin), audited with
    6 seeds; the report tests DKD against SIDDO and RCD like a built-in method and answers in words."""
    src = tmp_path / "kdray-dkd"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    storage = tmp_path / "results"
    p = kdray("audit", "--dataset", "dkd_blobs", "--teacher", "dkd_mlp", "--method", "dkd", "--alphas", "0.5",
              "--seeds", "6", "--recipe", "{epochs: 5, lr: 0.01, batch_size: 128}", "--storage", storage, "--quiet",
              pythonpath=[target], cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "19 trials finished now" in p.stdout
    answer = p.stdout.split("kdray audit: the answer", 1)[1]
    assert answer.strip().startswith("DKD α=0.5: "), answer
    assert "how much: prediction agreement" in answer and "what:" in answer
    report = storage / "audit" / "report"
    with open(report / "data" / "tests.csv") as f:
        rows = list(csv.DictReader(f))
    functional = ("activation_distance", "rank_disagreement", "prediction_disagreement", "js_divergence")
    for control in ("SIDDO", "RCD α=0.5"):
        got = {r["metric"] for r in rows if r["condition"] == "DKD α=0.5" and r["control"] == control}
        assert set(functional) <= got, (control, got)
    with open(report / "data" / "decisions.csv") as f:
        decided = [r for r in csv.DictReader(f) if r["condition"] == "DKD α=0.5"]
    assert len(decided) == 1
    # The answer says what the decision table says.
    supported = decided[0]["supported"] == "True"
    assert ("function transferred" in answer) == supported
    assert "| DKD α=0.5 |" in (report / "tables" / "ticks_audit.md").read_text()
    assert (storage / "audit" / "audit.yaml").exists()
