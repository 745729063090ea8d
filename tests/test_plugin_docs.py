"""docs/plugins.md's complete treatment (reverse-KL KD, a two-layer MLP, make_classification) is run
exactly as written: the module and the sweep file are cut from the page, so the docs cannot drift
from what works.  Each command runs in a fresh process, as a user's would."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"


def blocks() -> dict[str, str]:
    """{file name: text} of every fenced block that follows a ``<!-- test: NAME -->`` marker."""
    found = re.findall(r"<!-- test: (\S+) -->\n```\w*\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(found)


def study(tmp_path, **setup_over) -> Path:
    files = blocks()
    (tmp_path / "my_kd.py").write_text(files["my_kd.py"])
    data = yaml.safe_load(files["sweep.yaml"])
    data["setups"][0].update(setup_over)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path / "sweep.yaml"


def kdray(tmp_path, *args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}     # as the page says: PYTHONPATH=. from the study folder
    return subprocess.run([sys.executable, "-m", "kdray.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)


def test_the_page_holds_the_example():
    assert set(blocks()) == {"my_kd.py", "sweep.yaml"}


def test_the_docs_treatment_validates_and_plans_as_the_page_says(tmp_path):
    path = study(tmp_path)
    p = kdray(tmp_path, "validate", path)
    assert p.returncode == 0, p.stderr
    assert "ok (1 setups, 19 trials)" in p.stdout and "ok (1 setups, 19 trials)" in DOC.read_text()
    p = kdray(tmp_path, "plan", path, "--list")
    assert p.returncode == 0, p.stderr
    assert "rkd 6" in p.stdout and "kd 6" not in p.stdout.replace("rkd 6", ""), p.stdout
    p = kdray(tmp_path, "audit", "--dataset", "tabular", "--teacher", "mlp2", "--method", "rkd", "--plugin", "my_kd",
              "--storage", tmp_path / "audit", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout)["setups"][0]["conditions"]["rkd"] == {"alphas": [0.5, 0.9]}


@pytest.mark.parametrize("over,words", [
    ({"teacher": {"arch": "mlp2", "args": {"hidden": 0}}}, "setups[0].teacher.args.hidden: architecture 'mlp2': "
                                                            "hidden must be >= 1, got 0"),
    ({"dataset": {"name": "tabular", "args": {"test_size": 1.0}}}, "test_size must be in (0, 1), got 1.0"),
    ({"conditions": {"rkd": {"alpha": [0.5]}}}, "setups[0].conditions.rkd.alpha: unknown key; valid: alphas, temperatures"),
])
def test_the_docs_declarations_refuse_nonsense_in_one_line(tmp_path, over, words):
    p = kdray(tmp_path, "validate", study(tmp_path, **over))
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.slow
def test_the_docs_treatment_is_tested_against_siddo_and_rcd(tmp_path):
    path = study(tmp_path)
    p = kdray(tmp_path, "sweep", path, "--quiet", timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "19 trials finished now" in p.stdout
    p = kdray(tmp_path, "report", path, "--out", tmp_path / "report", "--jobs", "1", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "report" / "data" / "tests.csv") as f:
        pairs = {(r["condition"], r["control"]) for r in csv.DictReader(f)}
    assert ("RevKD α=0.5", "SIDDO") in pairs and ("RevKD α=0.5", "RCD α=0.5") in pairs, pairs
