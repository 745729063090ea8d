"""Sweep validation (one-line errors naming file and field) and plan expansion."""
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.cli import main
from kdray.plan import build_plan
from kdray.sweep import SweepError, load_sweep, parse_sweep
from sweeps import sweep_dict, write_sweep

ROOT = Path(__file__).resolve().parents[1]


def base(**setup_over):
    return sweep_dict("t", **setup_over)


def write(tmp_path, data) -> str:
    return str(write_sweep(tmp_path / "sweep.yaml", data))


BAD = [
    (lambda d: d.update(bogus=1), "bogus: unknown key; valid: name, description, storage"),
    (lambda d: d["setups"][0].update(nope=1), "setups[0].nope: unknown key; valid: name, dataset, teacher"),
    (lambda d: d["setups"][0].update(conditions={"kd": {"alpha": [0.5]}}),
     "setups[0].conditions.kd.alpha: unknown key; valid: alphas, temperatures"),
    (lambda d: d["setups"][0].update(conditions={"dkd": {}}), "setups[0].conditions.dkd: unknown key; valid: siddo, kd, rcd"),
    (lambda d: d["setups"][0].update(student_recipe={"lrr": 1}), "student_recipe: lrr: unknown key; valid: optimizer, lr"),
    (lambda d: d["setups"][0].update(conditions={"fm": True}), "setups[0].conditions.fm.blocks: required field missing"),
    (lambda d: d["setups"][0]["recipe"].update(lr="fast"), "setups[0].recipe.lr"),
    (lambda d: d["setups"][0].update(conditions={"kd": {"alphas": [0.1, 1.5]}}), "setups[0].conditions.kd.alphas: alpha must be in [0, 1], got 1.5"),
    (lambda d: d["setups"][0].update(conditions={"kd": {"temperatures": [0]}}), "setups[0].conditions.kd.temperatures: temperature must be > 0"),
    (lambda d: d["setups"][0].update(teacher={"arch": "resnet9000"}), "setups[0].teacher.arch: unknown architecture 'resnet9000'; valid:"),
    (lambda d: d["setups"][0].update(dataset={"name": "mnist9"}), "setups[0].dataset.name: unknown dataset 'mnist9'; valid:"),
    (lambda d: d.update(setups=[]), "setups: List should have at least 1 item"),
    (lambda d: d["setups"][0].update(conditions={"siddo": False, "kd": None, "rcd": None}), "the grid is empty"),
    (lambda d: d["setups"][0].update(teacher_seeds=[0, 1], student_seeds=[1, 2]), "student_seeds overlap teacher_seeds at [1]"),
    (lambda d: d["setups"][0].update(recipe={"epochs": 1, "iterations": 5}), "exactly one of epochs"),
    (lambda d: d["setups"][0].update(student_recipe={"lr": -1}), "student_recipe: lr"),
    (lambda d: d["setups"][0].update(widths=[0]), "widths must be"),
]


@pytest.mark.parametrize("mutate,expected", BAD)
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, mutate, expected, capsys):
    d = base()
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert msg.startswith(path + ": ") and "\n" not in msg
    assert expected in msg
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error: ") and expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("conds,expected", [
    ({"kd": False}, {"siddo", "rcd"}),                       # false switches a default-on condition off
    ({"kd": None, "rcd": False}, {"siddo"}),                 # null too
    ({"siddo": False, "rcd": False, "tfkd": True}, {"kd", "tfkd"}),   # true: on at its default grid
    ({"siddo": None, "rcd": None}, {"kd"}),                              # null is off for SIDDO's switch too
])
def test_a_condition_is_switched_with_true_and_false(tmp_path, conds, expected):
    plan = build_plan(load_sweep(write(tmp_path, base(conditions=conds))))
    assert {s.method for s in plan.students} == expected


def test_missing_data_root_is_rejected(tmp_path, monkeypatch):
    monkeypatch.delenv("KDRAY_DATA", raising=False)
    d = base(dataset={"name": "tinyshakespeare"}, teacher={"arch": "nano_gpt"}, recipe={"iterations": 1})
    with pytest.raises(SweepError, match=r"setups\[0\].dataset: 'tinyshakespeare' reads files; set data_root"):
        load_sweep(write(tmp_path, d))
    d["data_root"] = str(tmp_path / "nowhere")
    with pytest.raises(SweepError, match="data_root: .*nowhere is not a directory"):
        load_sweep(write(tmp_path, d))


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(SweepError, match=r"sweep.yaml: line \d+ not valid YAML"):
        load_sweep(write(tmp_path, "name: x\nsetups: [\n  - {"))
    with pytest.raises(SweepError, match="no such sweep file"):
        load_sweep(tmp_path / "absent.yaml")


def test_cli_error_has_no_traceback_and_exit_2(tmp_path):
    storage = tmp_path / "results"           # where this sweep would write, were it valid
    path = write(tmp_path, {**base(), "storage": str(storage), "bogus": 1})
    p = subprocess.run([sys.executable, "-m", "kdray.cli", "sweep", path], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"kdray: error: {path}: bogus: unknown key; valid: name, description, storage, "
                                               f"tracking_uri, data_root, max_concurrent_trials, max_failures, report_every_s, "
                                               f"progress_every_s, plugins, setups"]
    assert not storage.exists()  # nothing started


def test_self_distillation_counts_213():
    plan = build_plan(parse_sweep(base()))
    assert len(plan.teachers) == 3 and len(plan.students) == 210
    counts = plan.counts()
    assert counts[("s", "siddo")] == 30 and counts[("s", "kd")] == 90 and counts[("s", "rcd")] == 90


def test_plan_dedupes_siddo_and_keys_are_stable_and_unique():
    d = base(conditions={"kd": {"alphas": [0.1, 0.5], "temperatures": [1, 2]}, "rcd": {"alphas": [0.1]}})
    p1, p2 = build_plan(parse_sweep(d)), build_plan(parse_sweep(d))
    keys = [s.trial_key for s in p1.all]
    assert keys == [s.trial_key for s in p2.all]
    assert len(set(keys)) == len(keys)
    siddo = [s for s in p1.students if s.method == "siddo"]
    assert len(siddo) == 3 * 10
    assert len([s for s in p1.students if s.method == "kd"]) == 3 * 10 * 4


def test_seeds_follow_the_protocol():
    plan = build_plan(parse_sweep(base(teacher_seeds=[0, 1], student_seeds=[10, 11])))
    for t in plan.teachers:
        assert t.init_seed == t.teacher_seed == t.data_seed
    for s in plan.students:
        assert s.init_seed == s.teacher_seed  # self-distillation: the teacher's M0
        assert s.data_seed == s.student_seed
        assert s.teacher.trial_key == s.teacher_key and s.teacher.teacher_seed == s.teacher_seed


def test_standard_kd_and_width_students_init_from_student_seed():
    d = base(student={"arch": "small_cnn"}, teacher_seeds=[0], student_seeds=[10, 11])
    plan = build_plan(parse_sweep(d))
    assert {s.init_seed for s in plan.students if s.student_seed == 10} == {10}
    d = base(widths=[1.0, 0.5], teacher_seeds=[0], student_seeds=[10])
    plan = build_plan(parse_sweep(d))
    full = [s for s in plan.students if s.width == 1.0]
    half = [s for s in plan.students if s.width == 0.5]
    assert {s.init_seed for s in full} == {0} and {s.init_seed for s in half} == {10}
    assert all(s.arch_args.get("width") == 0.5 for s in half)


def test_resources_do_not_change_the_key():
    a = next(s for s in build_plan(parse_sweep(base())).students if s.method == "kd")
    b = a.with_(resources={"cpu": 4, "gpu": 0.25})
    assert a.trial_key == b.trial_key
    assert a.trial_key != a.with_(params={**a.params, "alpha": 0.3}).trial_key


def test_spec_round_trips_through_dict():
    from kdray.spec import TrialSpec
    s = build_plan(parse_sweep(base())).students[5]
    assert TrialSpec.from_dict(s.to_dict()) == s


def test_every_search_space_validates_and_plans(capsys):
    files = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert files, "search_spaces/ is empty"
    for f in files:
        assert main(["plan", str(f)]) == 0, f
    assert "quickstart" in capsys.readouterr().out


def test_quickstart_plan_counts(capsys):
    assert main(["plan", str(ROOT / "search_spaces/quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "86 trials (2 teachers in stage 1, 84 students in stage 2)" in out


def test_plan_estimates_gpu_hours_and_packing(capsys):
    assert main(["plan", str(ROOT / "search_spaces/svhn_resnet18.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"~{213 * 0.53:,.0f} GPU-hours at 0.53 per model; teachers: 4 per GPU; students: 4 per GPU" in out


def test_ui_runs_this_pythons_mlflow_on_the_sweeps_store(monkeypatch, tmp_path, capsys):
    """`kdray ui` must work without the venv on PATH: it runs `python -m mlflow ui` itself, and prints the
    sweep's runs view (MLflow 3 opens a fresh browser on its GenAI overview, where the runs are not)."""
    import socket
    seen = {}
    monkeypatch.setattr("os.execvp", lambda prog, cmd: seen.update(cmd=cmd))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write(tmp_path, {**base(), "storage": str(tmp_path / "res")})
    from mlflow.tracking import MlflowClient
    (tmp_path / "res").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}")
    client.create_experiment("other")
    exp = client.create_experiment("t")                              # a sweep's store exists
    with socket.socket() as s:                                       # a port free now (released before the UI binds)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ui", path, "--port", str(port), "--no-browser"]) == 0
    assert seen["cmd"][:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert seen["cmd"][seen["cmd"].index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}"
    assert f"kdray ui: the runs are at http://127.0.0.1:{port}/#/experiments/{exp}/runs" in capsys.readouterr().out

def test_ui_opens_the_runs_view_once_the_ui_listens():
    """What the child `kdray ui` forks on a terminal does: wait for the server, then open the URL (the
    browser is stubbed: the test must not open one); nothing listening, nothing opened."""
    import socket

    from kdray.cli import open_when_listening
    opened = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert open_when_listening("http://127.0.0.1/#/experiments/1/runs", "0.0.0.0", port, timeout=10,
                                   opener=opened.append)
    assert opened == ["http://127.0.0.1/#/experiments/1/runs"]
    assert not open_when_listening("http://x", "127.0.0.1", port, timeout=1.0, opener=opened.append)
    assert len(opened) == 1
