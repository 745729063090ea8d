"""A pretrained teacher (``teacher: {checkpoint: ...}``): no teacher is trained, its run records the
checkpoint's SHA-256, students distil its weights; bad checkpoints are one line before anything starts."""
import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(__file__).parent / "plugin_demo"
ARCH = {"arch": "small_cnn", "args": {"channels": 8}}


def kdray(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DEMO), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "kdray.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A teacher trained outside kdray's sweep (plain torch, 3 epochs on digits), saved as a state dict."""
    from kdray.data import load_dataset
    from kdray.models import build_model

    torch.manual_seed(0)
    b = load_dataset("digits")
    model = build_model("small_cnn", b.num_classes, b.input_shape, channels=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for xb, yb in b.train_batches(64, 3 * b.steps_per_epoch(64), g):
        loss = torch.nn.functional.cross_entropy(model(b.preprocess(xb, True, g)), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


def _accuracy(path: Path) -> float:
    """The checkpoint's test accuracy, computed here without kdray's trial code."""
    from kdray.data import load_dataset
    from kdray.models import build_model

    b = load_dataset("digits")
    model = build_model("small_cnn", b.num_classes, b.input_shape, channels=8)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    right = n = 0
    with torch.no_grad():
        for xb, yb in b.test_batches(512):
            right += int((model(b.preprocess(xb, False, None)).argmax(-1) == yb).sum())
            n += len(yb)
    return right / n


def sweep_file(tmp_path, teacher, name="ckpt", **over) -> Path:
    setup = {"name": "c", "dataset": {"name": "digits"}, "teacher": teacher,
             "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}, "student_seeds": [10, 11, 12],
             "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": {"alphas": [0.5]}}, **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "results"), "setups": [setup]}))
    return path


def _runs(db: Path) -> list[tuple]:
    q = ("select r.status, role.value, ck.value, r.run_uuid from runs r "
         "join tags role on role.run_uuid = r.run_uuid and role.key = 'kdray.role' "
         "left join tags ck on ck.run_uuid = r.run_uuid and ck.key = 'kdray.checkpoint_sha256'")
    with sqlite3.connect(db) as c:
        return c.execute(q).fetchall()


def test_a_checkpoint_teacher_is_loaded_not_trained(tmp_path, checkpoint):
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    path = sweep_file(tmp_path, {**ARCH, "checkpoint": str(checkpoint)})
    p = kdray("sweep", path, "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "10 trials finished now" in p.stdout, p.stdout
    db = tmp_path / "results" / "mlflow.db"
    runs = _runs(db)
    teachers = [r for r in runs if r[1] == "teacher"]
    assert len(teachers) == 1 and teachers[0][0] == "FINISHED" and teachers[0][2] == sha
    assert sum(r[1] == "student" and r[0] == "FINISHED" for r in runs) == 9
    with sqlite3.connect(db) as c:
        metrics = dict(c.execute("select key, value from latest_metrics where run_uuid = ?", (teachers[0][3],)).fetchall())
    assert "train_loss" not in metrics                      # no epoch was trained
    assert metrics["test_acc"] == pytest.approx(_accuracy(checkpoint), abs=1e-6)
    assert metrics["test_acc"] > 0.5                        # the checkpoint's weights, not a fresh init
    # The stored teacher is the checkpoint, tensor for tensor.
    (key,) = [d.name for d in (tmp_path / "results" / "trials").iterdir() if (d / "model.pt").exists()]
    stored, given = torch.load(tmp_path / "results" / "trials" / key / "model.pt"), torch.load(checkpoint)
    assert stored.keys() == given.keys() and all(torch.equal(stored[k], given[k]) for k in given)
    # Resubmitted: everything is done.
    p = kdray("sweep", path, "--quiet")
    assert p.returncode == 0 and "0 trials finished now, 10 already done" in p.stdout, p.stdout + p.stderr[-2000:]


def test_the_checkpoint_hash_is_the_teachers_identity(tmp_path, checkpoint):
    """The same bytes under another name are the same teacher; changed weights are another one."""
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    state = torch.load(checkpoint)
    state[next(iter(state))] += 1.0
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)

    def teacher_key(ckpt, name):
        p = kdray("plan", sweep_file(tmp_path, {**ARCH, "checkpoint": str(ckpt)}, name=name), "--list", timeout=120)
        assert p.returncode == 0, p.stderr
        return next(line.split()[0] for line in p.stdout.splitlines() if line.split()[-1:] and "-teacher-" in line)
    same, again, other = teacher_key(checkpoint, "a"), teacher_key(copy, "b"), teacher_key(changed, "c")
    assert same == again != other
    assert teacher_key(f"file://{copy}", "d") == same        # a storage URI names the same bytes


BAD = [
    ("missing", lambda d, ck: {**ARCH, "checkpoint": str(d / "nope.pt")}, {}, "setups[0].teacher.checkpoint:", "does not exist"),
    ("not_torch", lambda d, ck: {**ARCH, "checkpoint": str(_write(d / "notes.pt", b"hello"))}, {},
     "setups[0].teacher.checkpoint:", "not a PyTorch file"),
    ("not_state_dict", lambda d, ck: {**ARCH, "checkpoint": str(_save(d / "list.pt", [torch.zeros(2)]))}, {},
     "setups[0].teacher.checkpoint:", "is not a state dict"),
    ("wrong_arch", lambda d, ck: {"arch": "small_cnn", "args": {"channels": 16}, "checkpoint": str(ck)}, {},
     "setups[0].teacher.checkpoint:", "does not fit architecture 'small_cnn'"),
    ("two_seeds", lambda d, ck: {**ARCH, "checkpoint": str(ck)}, {"teacher_seeds": [0, 1]},
     "setups[0]:", "a checkpoint is one teacher"),
    ("wrong_classes", lambda d, ck: {"arch": "kdray_plugin_demo:wrong_classes"}, {},
     "setups[0].teacher.arch:", "has 10 classes"),
]


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _save(p: Path, obj) -> Path:
    torch.save(obj, p)
    return p


def test_a_relative_checkpoint_is_read_from_the_sweep_files_folder(tmp_path, checkpoint, monkeypatch):
    from kdray.sweep import load_sweep

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "teacher.pt").write_bytes(checkpoint.read_bytes())
    path = sweep_file(tmp_path / "study", {**ARCH, "checkpoint": "teacher.pt"})
    monkeypatch.chdir(tmp_path)          # another folder: teacher.pt is not here
    assert load_sweep(path).setups[0].teacher.checkpoint == str(tmp_path / "study" / "teacher.pt")
    p = kdray("validate", path, timeout=120)       # from the repository's folder
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_checkpoint_or_model_is_one_line_before_anything_starts(tmp_path, checkpoint, case):
    _, teacher, over, field, words = case
    path = sweep_file(tmp_path, teacher(tmp_path, checkpoint), **over)
    for cmd in ("validate", "sweep"):
        p = kdray(cmd, path, timeout=120)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert f"{path}: {field}" in lines[0] and words in lines[0], lines[0]
        assert not (tmp_path / "results" / "mlflow.db").exists()      # nothing started
