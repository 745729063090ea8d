"""Answers bound to the question asked (issue 25): a report of a file analyses exactly the trials
the file plans now, an experiment's report never pools different teachers or student variants,
every run records what it ran on, stored results do not depend on how trials were scheduled
(killed, resumed, packed), ``kdray verify`` re-trains a sample bit for bit, and a teacher that
cannot teach is refused before anything trains."""
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.analysis.runs import runs_frame
from kdray.analysis.scope import OTHER_STUDENTS, OTHER_TEACHER, OTHER_TEACHERS_STUDENTS, scope_to_plan, split_cohorts
from kdray.plan import build_plan
from kdray.storage import RUN_FILE, npz_bytes
from kdray.sweep import load_sweep
from sweeps import SMALL_GRID, sweep_dict, write_sweep
from test_reliability import EXIT_STATUS, KDRAY, crash_driver_at, exit_at, kill_own_group, trial_runs

TINY = {"teacher": {"arch": "mlp", "args": {"hidden": 16}}, "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}}


def _row(key, role="student", teacher_key="T1", setup="s", variant="v1", seed=10, method="kd", ts=0, fp="fpA"):
    return dict(run_id=key, status="FINISHED", start_time=0, trial_key=key, teacher_key=teacher_key, setup=setup,
                role=role, method=method if role != "teacher" else "teacher", params={"alpha": 0.5} if method == "kd" else {},
                width=1.0, teacher_seed=ts, student_seed=seed if role != "teacher" else None, variant=variant,
                fingerprint=fp, test_acc=0.9)


# ------------------------------------------------------------------ scope (no Ray)

class _Spec:
    def __init__(self, key, setup="s"):
        self.trial_key, self.setup = key, setup


class _Plan:
    def __init__(self, teachers, students):
        self.teachers, self.students = [_Spec(k) for k in teachers], [_Spec(k) for k in students]
        self.all = self.teachers + self.students


def test_a_files_report_keeps_exactly_its_planned_keys_and_says_why_it_left_the_others_out():
    df = runs_frame([_row("T1", role="teacher", setup="old-name"), _row("T2", role="teacher"),
                     _row("a", teacher_key="T1"), _row("b", teacher_key="T1", seed=11),
                     _row("c", teacher_key="T2"), _row("d", teacher_key="T2", seed=11),
                     _row("e", teacher_key="T1", variant="v2")])
    kept, scope = scope_to_plan(df, _Plan(["T1"], ["a", "b", "zz"]), "f.yaml", "ab" * 32)
    assert sorted(kept["trial_key"]) == ["T1", "a", "b"]
    assert set(kept["setup"]) == {"s"}                     # the teacher under the setup the plan gives it
    assert scope.ignored == {OTHER_TEACHER: 1, OTHER_TEACHERS_STUDENTS: 2, OTHER_STUDENTS: 1}
    assert (scope.planned, scope.found) == (4, 3)
    text = "\n".join(scope.lines())
    assert "the 4 trials f.yaml (sha256 abababababab) plans now; 3 of them have a run" in text
    assert "ignored 2 student runs of a teacher this file does not plan" in text


def test_an_experiments_report_keeps_each_teacher_and_student_variant_apart():
    rows = [_row("T1", role="teacher"), _row("T2", role="teacher"), _row("T3", role="teacher", ts=1)]
    rows += [_row(f"a{s}", teacher_key="T1", seed=s) for s in (10, 11)]
    rows += [_row(f"b{s}", teacher_key="T2", seed=s) for s in (10, 11)]       # another teacher at seed 0
    rows += [_row(f"c{s}", teacher_key="T3", seed=s, ts=1) for s in (10, 11)]
    out, scope = split_cohorts(runs_frame(rows), "experiment 'x'")
    by_key = dict(zip(out["trial_key"], out["setup"]))
    assert by_key["a10"] == by_key["a11"] == by_key["T1"] == "s [teacher T1]"
    assert by_key["b10"] == by_key["T2"] == "s [teacher T2]" and by_key["c10"] == "s [teacher T3]"
    assert len(scope.split) == 1 and "more than one teacher" in scope.split[0]
    # one teacher, two student variants (a student recipe changed): split by variant only
    rows = [_row("T1", role="teacher")] + [_row(f"{v}{s}", teacher_key="T1", seed=s, variant=v)
                                           for v in ("v1", "v2") for s in (10, 11)]
    out, scope = split_cohorts(runs_frame(rows), "experiment 'x'")
    assert set(out.loc[out["role"] != "teacher", "setup"]) == {"s [students v1]", "s [students v2]"}
    assert out.loc[out["role"] == "teacher", "setup"].item() == "s"   # serves both: stays under its setup
    # nothing ambiguous: nothing renamed
    out, scope = split_cohorts(runs_frame([_row("T1", role="teacher"), _row("a", teacher_key="T1")]), "e")
    assert set(out["setup"]) == {"s"} and scope.split == []


def test_paired_runs_with_different_fingerprints_are_counted_per_test():
    from kdray.analysis import provenance
    from kdray.analysis.pipeline import analyse

    rows = [_row("T1", role="teacher")]
    for s in range(10, 16):
        rows.append(_row(f"kd{s}", seed=s, fp="fpB" if s in (10, 11) else "fpA") | {"prediction_disagreement": 0.1})
        rows.append(_row(f"si{s}", seed=s, method="siddo") | {"prediction_disagreement": 0.2})
    a = analyse(runs_frame(rows), power_draws=0)
    counts = provenance.mismatches(a.students, a.tests)
    assert len(counts) == len(a.tests) and set(counts) == {2}     # seeds 10 and 11 of every KD-vs-SIDDO test
    a.tests["fingerprint_mismatches"] = counts
    text = "\n".join(provenance.summary_lines(a.runs, a.tests))
    assert "runs from 2 fingerprints" in text and "fingerprint fpA (11 runs)" in text
    assert f"{len(a.tests)} paired tests compare runs with different fingerprints ({2 * len(a.tests)} seed pairs" in text


def test_archives_are_written_without_a_clock():
    a, y = np.arange(12, dtype=np.float16).reshape(3, 4), np.array([1, 2, 3])
    first = npz_bytes(logits=a, labels=y)
    import time
    time.sleep(2.1)     # zip dates have 2 s resolution: np.savez would now write other bytes
    assert npz_bytes(logits=a, labels=y) == first
    import io
    back = np.load(io.BytesIO(first))
    assert np.array_equal(back["logits"], a) and np.array_equal(back["labels"], y)


def test_the_fingerprint_names_code_libraries_device_and_threads():
    from kdray import provenance

    fp = provenance.fingerprint("cpu", ())
    for field in ("kdray", "git", "git_dirty", "python", "torch", "cuda", "cudnn", "numpy", "torch_blas",
                  "device", "device_model", "isa", "threads", "plugins"):
        assert field in fp, field
    assert fp["threads"] == torch.get_num_threads() and fp["device"] == "cpu"
    assert provenance.fingerprint_id(fp) == provenance.fingerprint_id(dict(reversed(fp.items())))
    other = dict(fp, threads=fp["threads"] + 1)
    assert provenance.fingerprint_id(other) != provenance.fingerprint_id(fp)
    assert f"{fp['threads']} threads" in provenance.describe(fp)


# ------------------------------------------------------------------ teachers that cannot teach

def _checkpoint_sweep(tmp_path, ckpt: Path) -> Path:
    data = sweep_dict("ck", tmp_path / "r", **SMALL_GRID, teacher={"arch": "mlp", "args": {"hidden": 16},
                                                                  "checkpoint": str(ckpt)}, recipe={"epochs": 1})
    return write_sweep(tmp_path / "ck.yaml", data)


def _mlp_state(seed=0) -> dict:
    from kdray.data import load_dataset
    from kdray.models import build_model

    b = load_dataset("digits")
    torch.manual_seed(seed)
    return build_model("mlp", b.num_classes, b.input_shape, hidden=16).state_dict()


@pytest.mark.parametrize("make, words", [
    (lambda sd: {**sd, next(iter(sd)): sd[next(iter(sd))].clone().fill_(float("nan"))}, "has NaN or infinite weights"),
    (lambda sd: {**sd, next(iter(sd)): sd[next(iter(sd))].clone().fill_(float("inf"))}, "has NaN or infinite weights"),
])
def test_a_checkpoint_with_nan_or_infinite_weights_is_one_line_before_anything_starts(tmp_path, make, words):
    ckpt = tmp_path / "teacher.pt"
    torch.save(make(_mlp_state()), ckpt)
    path = _checkpoint_sweep(tmp_path, ckpt)
    for cmd in ("validate", "sweep"):
        p = subprocess.run(KDRAY + [cmd, str(path)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, p.stdout + p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr and str(ckpt) in p.stderr, p.stderr
    assert not (tmp_path / "r" / "mlflow.db").exists()


def test_a_whole_pickled_model_is_told_to_save_its_state_dict(tmp_path):
    from kdray.data import load_dataset
    from kdray.models import build_model

    b = load_dataset("digits")
    ckpt = tmp_path / "teacher.pt"
    torch.save(build_model("mlp", b.num_classes, b.input_shape, hidden=16), ckpt)
    p = subprocess.run(KDRAY + ["validate", str(_checkpoint_sweep(tmp_path, ckpt))], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "holds a whole pickled object" in p.stderr and "torch.save(model.state_dict(), PATH)" in p.stderr
    assert "\x1b[" not in p.stderr                       # no terminal escape codes in the message


# ------------------------------------------------------------------ end to end (Ray, MLflow)

def _stored_files(root: Path) -> dict[str, bytes]:
    """Every stored trial file but run.json (how it ran: timings, fingerprint), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "trials").rglob("*"))
            if p.is_file() and p.name != RUN_FILE}


def _sweep_file(tmp_path, name, pack=1):
    data = sweep_dict(name, tmp_path / name, top={"report_every_s": 0},
                      **{**SMALL_GRID, **TINY, "student_seeds": [10, 11, 12], "name": "d",
                         "conditions": {"siddo": True, "kd": {"alphas": [0.5, 0.9]}, "rcd": {"alphas": [0.5]}},
                         "resources": {"student": {"pack": pack}}})
    return write_sweep(tmp_path / f"{name}.yaml", data)


def _sweep(path, env=None):
    r = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _one_finished_run_each(path):
    keys = [r.data.tags["kdray.trial_key"] for r in trial_runs(path)]
    plan = build_plan(load_sweep(path))
    assert sorted(keys) == sorted(s.trial_key for s in plan.all)     # exactly one run per planned trial
    assert all(r.info.status == "FINISHED" for r in trial_runs(path))


@pytest.mark.slow
def test_a_packed_sweep_killed_mid_pack_and_resumed_stores_the_same_bytes_as_one_run_straight(tmp_path):
    straight, killed = _sweep_file(tmp_path, "straight", pack=8), _sweep_file(tmp_path, "killed", pack=8)
    _sweep(straight)
    plan = build_plan(load_sweep(killed))
    first = next(s for s in plan.students if s.method == "rcd")   # stored first: its pack dies right after
    fired = tmp_path / "worker-exited"
    env = exit_at("worker", first.label, 2, fired)
    r = subprocess.run(KDRAY + ["sweep", str(killed), "--quiet"], capture_output=True, text=True, timeout=600,
                       env=env, start_new_session=True)
    assert fired.exists(), "the pack's worker was not killed mid-pack"
    if r.returncode != 0:         # Tune gave up on the pack: the same command resumes it
        _sweep(killed)
    _one_finished_run_each(killed)
    a, b = _stored_files(tmp_path / "straight"), _stored_files(tmp_path / "killed")
    assert sorted(a) == sorted(b) and len(a) == 2 * len(plan.students) + 5     # a teacher stores 5 files
    assert [k for k in a if a[k] != b[k]] == []                       # byte for byte
    runs = {s.trial_key: (tmp_path / "killed" / "trials" / s.trial_key / RUN_FILE) for s in plan.students}
    import json
    packs = {tuple(json.loads(p.read_text())["pack_keys"]) for p in runs.values()}
    assert sorted(map(len, packs)) == [6, 6]                  # 12 students, at most 8 a pack: cut evenly
    assert sorted(k for p in packs for k in p) == sorted(s.trial_key for s in plan.students)


@pytest.mark.slow
def test_an_unpacked_sweep_whose_driver_dies_resumes_to_the_same_bytes_and_verify_reproduces_it(tmp_path):
    straight, killed = _sweep_file(tmp_path, "straight"), _sweep_file(tmp_path, "killed")
    _sweep(straight)
    plan = build_plan(load_sweep(killed))
    crash_driver_at(killed, next(s for s in plan.students if s.method == "kd").label, 2)
    _sweep(killed)
    _one_finished_run_each(killed)
    a, b = _stored_files(tmp_path / "straight"), _stored_files(tmp_path / "killed")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []

    v = subprocess.run(KDRAY + ["verify", str(straight), "--sample", "100", "--seed", "3"], capture_output=True,
                       text=True, timeout=600)
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"re-training {len(plan.all)} of {len(plan.all)} finished trials" in v.stdout and "seed 3" in v.stdout
    assert v.stdout.count("identical") == len(plan.all), v.stdout
    # a stored result that no longer matches what the trial computes is caught
    victim = next(s for s in plan.students if s.method == "siddo")
    f = tmp_path / "straight" / "trials" / victim.trial_key / "test_outputs.npz"
    z = dict(np.load(f))
    z["logits"] = (z["logits"].astype(np.float32) + 1e-2).astype(np.float16)
    f.write_bytes(npz_bytes(**z))
    v = subprocess.run(KDRAY + ["verify", str(straight), "--sample", "100"], capture_output=True, text=True,
                       timeout=600)
    assert v.returncode == 1, v.stdout + v.stderr
    bad = [ln for ln in v.stdout.splitlines() if "DIFFERS" in ln]
    assert len(bad) == 1 and victim.trial_key in bad[0] and "test_outputs.npz" in bad[0], v.stdout


def _trained_teacher(path: Path, seed: int) -> str:
    """A small MLP trained on digits for a few epochs, saved as a state dict; its SHA-256."""
    from kdray.data import load_dataset
    from kdray.models import build_model

    b = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model("mlp", b.num_classes, b.input_shape, hidden=16)
    opt = torch.optim.Adam(model.parameters(), 0.01)
    x, y = b.preprocess(b.train_x, False, None), b.train_y
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_an_audit_answers_about_the_checkpoint_it_was_given_each_time(tmp_path):
    """The issue's sequence: audit teacher A, overwrite the file with teacher B and audit again, put
    A back and audit a third time: nothing trains, and the answer is about A, not B."""
    from test_audit import kdray

    ckpt = tmp_path / "teacher.pt"
    shas = {}
    for name, seed in (("a", 0), ("b", 1)):
        shas[name] = _trained_teacher(tmp_path / f"{name}.pt", seed)

    def audit(which: str) -> str:
        shutil.copyfile(tmp_path / f"{which}.pt", ckpt)
        p = kdray("audit", "--dataset", "digits", "--teacher", "mlp", "--teacher-args", "{hidden: 16}",
                  "--checkpoint", ckpt, "--recipe", "{epochs: 2, batch_size: 128, lr: 0.01}", "--alphas", "0.5",
                  "--seeds", "5", "--storage", tmp_path / "r", "--name", "x", "--quiet")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    outs = [audit(which) for which in ("a", "b", "a")]
    third = outs[2]
    assert "0 trials finished now, 16 already done" in third
    assert "scope: the 16 trials" in third and "16 of them have a run" in third
    assert "ignored 1 teacher runs this file does not plan" in third
    assert "ignored 15 student runs of a teacher this file does not plan" in third
    assert f"checkpoint sha256 {shas['a'][:16]}" in third and shas["b"][:16] not in third
    assert f"checkpoint sha256 {shas['b'][:16]}" in outs[1]
    assert "kdray audit: the answer" in third and "fingerprint " in third


@pytest.mark.slow
def test_a_report_of_an_edited_file_and_of_its_experiment(tmp_path):
    """Version 1 and version 2 (student recipe changed) of one sweep file in one experiment: the file
    reports its own version's runs, the old copy its own, the experiment both apart."""
    from kdray.analysis.report import build_report, load_target

    v1 = sweep_dict("edit", tmp_path / "results", **{**SMALL_GRID, **TINY, "name": "d"})
    old = write_sweep(tmp_path / "edit-v1.yaml", v1)
    path = write_sweep(tmp_path / "edit.yaml", v1)
    _sweep(path)
    v2 = {**v1, "setups": [{**v1["setups"][0], "student_recipe": {"lr": 0.02}}]}
    write_sweep(path, v2)
    _sweep(path)
    plans = {p: build_plan(load_sweep(p)) for p in (old, path)}
    for p, plan in plans.items():
        df = load_target(str(p), None)[0]
        assert sorted(set(df["trial_key"])) == sorted(s.trial_key for s in plan.all), p
        scope = df.attrs["scope"]
        assert scope.ignored == {OTHER_STUDENTS: len(plan.students)} and scope.found == len(plan.all)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    df = load_target("edit", uri)[0]
    assert len(df) == 1 + 2 * len(plans[path].students)              # one shared teacher, both versions' students
    setups = set(df.loc[df["role"] != "teacher", "setup"])
    assert len(setups) == 2 and all(s.startswith("d [students ") for s in setups)
    result = build_report(df, tmp_path / "out")
    assert set(result.analysis.decisions["setup"]) == setups          # each version analysed on its own
    text = result.summary_text()
    assert "setup d: runs of more than one student variant for a teacher seed; each is reported on its own" in text
    assert "fingerprint " in text and "paired comparison's two runs share a fingerprint" in text
    tests = (tmp_path / "out" / "data" / "tests.csv").read_text()
    assert "fingerprint_mismatches" in tests.splitlines()[0]
