"""Trials whose test logits are too large to hold (kdray/streamed.py): real teacher and student
trials of the char-level Nano-GPT, run once as always and once with the limit forced to 0 bytes
(``$KDRAY_METRICS_MEMORY_BYTES``), so that every logits array is "too large"."""
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray import provenance, recipe, streamed
from kdray.contracts import TAG_METRICS_STREAMED, provenance_tags
from kdray.functional import STREAMED_METRICS
from kdray.plan import build_plan
from kdray.storage import Store, npz_bytes
from kdray.sweep import parse_sweep
from conftest import require_data

BLOCK = 4096          # elements per block in the streamed runs: 3 windows of 16 x 65 logits
EVAL_BATCH = 2        # windows per test batch in both runs, so both test passes compute the same logits


def _plan(tmp_path, student_seeds=(10,)):
    setup = {"name": "c", "dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 60000}},
             "teacher": {"arch": "nano_gpt", "args": {"n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.0}},
             "recipe": {"iterations": 6, "log_every": 3, "batch_size": 8, "lr": 3e-3, "eval_batch_size": EVAL_BATCH,
                        "eval_every": 1},
             "teacher_seeds": [0], "student_seeds": list(student_seeds),
             "conditions": {"siddo": None, "kd": {"alphas": [0.5]}, "rcd": None}}
    return build_plan(parse_sweep({"name": "st", "storage": str(tmp_path), "setups": [setup]}, "sweep.yaml"))


def _run(plan, store, peaks):
    """Teacher then student; each trial's finish (evaluation, metrics, artefacts) under tracemalloc,
    which sees numpy's allocations (not torch's: the hook records the largest test-pass output)."""
    real = recipe.finish_trial

    def traced(spec, store, model, bundle, *a, **k):
        provenance.data_checksum(bundle)       # the data set's hash and the libraries' versions: cached
        provenance.fingerprint()               # after a first call, and not the outputs' memory
        biggest = []
        hook = model.register_forward_hook(lambda m, i, out: biggest.append(out.numel()))
        tracemalloc.start()
        try:
            return real(spec, store, model, bundle, *a, **k)
        finally:
            peaks[spec.role] = (tracemalloc.get_traced_memory()[1], max(biggest))
            tracemalloc.stop()
            hook.remove()

    recipe.finish_trial, original = traced, recipe.finish_trial
    try:
        return recipe.run_trial(plan.teachers[0], store), recipe.run_trial(plan.students[0], store)
    finally:
        recipe.finish_trial = original


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(plan, in-memory store, results, peaks), (streamed store, results, peaks)."""
    require_data(Path(os.environ["KDRAY_DATA"]) / "tinyshakespeare" / "input.txt", "TinyShakespeare")
    tmp = tmp_path_factory.mktemp("streamed")
    plan = _plan(tmp)
    assert [s.method for s in plan.students] == ["kd"]
    mp = pytest.MonkeyPatch()
    try:
        plain, plain_peaks = Store(str(tmp / "plain"), "st"), {}
        plain_out = _run(plan, plain, plain_peaks)
        mp.setenv(streamed.ENV, "0")
        mp.setattr(streamed, "BLOCK_ELEMENTS", BLOCK)
        # The whole-array paths must not run: evaluating into one tensor, the in-memory metrics,
        # reading the teacher's logits whole.
        mp.setattr(recipe, "evaluate", lambda *a, **k: pytest.fail("the streamed trial evaluated in memory"))
        mp.setattr("kdray.functional.functional_metrics_many",
                   lambda *a, **k: pytest.fail("the streamed trial computed the in-memory metrics"))
        load_npy = Store.load_npy
        mp.setattr(Store, "load_npy", lambda self, key, name: pytest.fail(f"{name} read whole")
                   if name == "test_logits.npy" else load_npy(self, key, name))
        big, big_peaks = Store(str(tmp / "big"), "st"), {}
        big_out = _run(plan, big, big_peaks)
    finally:
        mp.undo()
    return plan, (plain, plain_out, plain_peaks), (big, big_out, big_peaks)


def test_a_streamed_student_records_the_in_memory_metrics_without_procrustes_and_says_why(both):
    plan, (plain, (_, a), _), (big, (_, b), _) = both
    for key in STREAMED_METRICS + ("test_acc",):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(b["test_loss"], a["test_loss"], rtol=1e-6)
    assert 0 < a["rank_disagreement"] < 1 and 0 < a["js_divergence"]       # not a degenerate comparison
    assert np.isfinite(a["procrustes_distance"]) and "procrustes_distance" not in b
    for trial in (plan.teachers[0], plan.students[0]):      # the test pass during training (eval_every)
        ha, hb = (s.load_json(trial.trial_key, "result.json")["history"][0] for s in (plain, big))
        np.testing.assert_allclose(hb["test_loss"], ha["test_loss"], rtol=1e-6)
        assert hb["test_acc"] == ha["test_acc"]
    key = plan.students[0].trial_key
    assert "procrustes_distance" not in big.load_json(key, "result.json")["final"]
    note = big.load_run(key)["metrics_streamed"]
    assert "procrustes_distance not computed" in note and streamed.ENV in note
    assert provenance_tags(big.load_run(key))[TAG_METRICS_STREAMED] == note
    assert "metrics_streamed" not in plain.load_run(key) and TAG_METRICS_STREAMED not in provenance_tags(plain.load_run(key))


def test_a_streamed_trial_stores_the_same_logits_and_leaves_no_temporary_file(both):
    plan, (plain, _, _), (big, _, _) = both
    teacher, student = plan.teachers[0].trial_key, plan.students[0].trial_key
    assert big.read_bytes(teacher, "test_logits.npy") == plain.read_bytes(teacher, "test_logits.npy")
    for key in (teacher, student):
        assert big.read_bytes(key, "test_outputs.npz") == plain.read_bytes(key, "test_outputs.npz")
        assert not [p.name for p in big.local_dir(key).iterdir() if p.name.startswith(".")]
    # the teacher's stored logits are memory-mapped when they stream, read whole when they do not
    assert isinstance(streamed.teacher_test_logits(big, teacher), np.ndarray)
    assert not isinstance(streamed.teacher_test_logits(big, teacher), np.memmap)


def test_a_streamed_trial_never_holds_its_test_logits_whole(both):
    """The in-memory finish allocates at least N x K float16 values in numpy (the archive's logits);
    the streamed one stays under that, and no test batch's output is larger than a block."""
    plan, (_, _, plain_peaks), (big, _, big_peaks) = both
    n, k = np.load(big.local_dir(plan.teachers[0].trial_key) / "test_logits.npy", mmap_mode="r").shape
    assert n * k > 50 * BLOCK
    for role in ("teacher", "student"):
        assert plain_peaks[role][0] > n * k * 2, role       # the check can fail
        assert big_peaks[role][0] < n * k * 2, (role, big_peaks[role][0], n * k * 2)
        assert big_peaks[role][1] <= BLOCK


def test_a_packed_trial_above_the_limit_streams_its_students_metrics_against_the_mapped_teacher(both, tmp_path,
                                                                                                monkeypatch):
    """Packed students (two seeds) against the teacher stored above: with the limit forced to 0 the
    pack evaluates into one file per student, the teacher's logits are memory-mapped and each
    student's metrics streamed, equal to the pack's in-memory metrics, with the same archives."""
    from kdray.packing import run_pack
    plan, (plain, _, _), _ = both
    students = _plan(tmp_path / "p", (10, 11)).students
    teacher = plan.teachers[0].trial_key
    assert students[0].teacher.trial_key == teacher and len(students) == 2
    stores = {}
    for name, limit in (("plain", None), ("big", "0")):
        store = Store(str(tmp_path / name), "st")
        for f in ("model.pt", "test_logits.npy"):
            store.write_bytes(teacher, f, plain.read_bytes(teacher, f))
        if limit is not None:
            monkeypatch.setenv(streamed.ENV, limit)
            monkeypatch.setattr(streamed, "BLOCK_ELEMENTS", 8 * 2 * 16 * 65)   # the in-memory pack's 8 windows x 2
            monkeypatch.setattr("kdray.functional.functional_metrics_many",
                                lambda *a, **k: pytest.fail("the streamed pack computed the in-memory metrics"))
        stores[name] = (store, run_pack(students, store))
    (_, a), (big, b) = stores["plain"], stores["big"]
    for s in students:
        for key in STREAMED_METRICS:
            np.testing.assert_allclose(b[s.trial_key][key], a[s.trial_key][key], rtol=1e-6, atol=1e-12, err_msg=key)
        assert "procrustes_distance" in a[s.trial_key] and "procrustes_distance" not in b[s.trial_key]
        ha, hb = (st.load_json(s.trial_key, "result.json")["history"][0] for st in (stores["plain"][0], big))
        np.testing.assert_allclose(hb["test_loss"], ha["test_loss"], rtol=1e-6)
        assert "procrustes_distance not computed" in big.load_run(s.trial_key)["metrics_streamed"]
        assert big.read_bytes(s.trial_key, "test_outputs.npz") == stores["plain"][0].read_bytes(s.trial_key,
                                                                                               "test_outputs.npz")
        assert not [p.name for p in big.local_dir(s.trial_key).iterdir() if p.name.startswith(".")]


class _Bundle:
    """What evaluate_to_file reads of a data bundle: windows of 5 positions, 7 classes."""
    num_classes = 7

    def __init__(self, m=40):
        g = torch.Generator().manual_seed(0)
        self.test_x, self.test_y = torch.randn(m, 5, 3, generator=g), torch.randint(0, 7, (m, 5), generator=g)

    def test_batches(self, batch_size):
        for i in range(0, len(self.test_x), batch_size):
            yield self.test_x[i:i + batch_size], self.test_y[i:i + batch_size]

    def preprocess(self, x, train, gen):
        return x


def test_the_test_pass_writes_batches_of_at_most_a_block_and_removes_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(streamed, "BLOCK_ELEMENTS", 3 * 5 * 7 + 1)          # 3 windows of 5 x 7 logits
    model, bundle, sizes = torch.nn.Linear(3, 7), _Bundle(), []
    model.register_forward_hook(lambda m, i, out: sizes.append(out.numel()))
    with streamed.evaluate_to_file(model, bundle, "cpu", 10 ** 6, tmp_path) as (logits, y):
        largest, [path] = max(sizes), tmp_path.iterdir()
        assert path.name.startswith(".") and path.name.endswith(".tmp.npy")
        with torch.no_grad():
            want = model(bundle.test_x).reshape(-1, 7).numpy()
        np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-7)
        assert torch.equal(y, bundle.test_y.reshape(-1)) and not logits.flags.writeable
    assert largest == 3 * 5 * 7 and not list(tmp_path.iterdir())
    stale = tmp_path / ".test_logits.0.killed.tmp.npy"             # a killed attempt's file
    stale.write_bytes(b"x")
    with streamed.evaluate_to_file(model, bundle, "cpu", 4, tmp_path):
        assert not stale.exists() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(RuntimeError, match="boom"):
        with streamed.evaluate_to_file(model, bundle, "cpu", 4, tmp_path):
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())                     # removed on an error too


def test_the_streamed_archive_is_npz_bytes(tmp_path):
    g = np.random.default_rng(0)
    logits, y = g.normal(size=(37, 11)).astype(np.float32), torch.from_numpy(g.integers(0, 11, 37))
    path = tmp_path / "o.npz"
    streamed.write_outputs_npz(str(path), logits, y)
    assert path.read_bytes() == npz_bytes(logits=logits.astype(np.float16), labels=y.numpy())


@pytest.mark.parametrize("raw", ["-1", "1GB", "1.5"])
def test_a_bad_limit_is_one_line_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(streamed.ENV, raw)
    with pytest.raises(ValueError, match=streamed.ENV) as e:
        streamed.streams(10, 10)
    assert "\n" not in str(e.value)


def test_kdray_validate_refuses_a_bad_limit_in_one_line_before_anything_starts(tmp_path):
    """What a sweep's user sees: exit 2 and one line naming the variable (not every trial failing)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, streamed.ENV: "1GB", "KDRAY_DATA": str(root / "data")}
    r = subprocess.run([sys.executable, "-m", "kdray.cli", "validate", str(root / "search_spaces" / "quickstart.yaml")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and streamed.ENV in lines[0] and "'1GB'" in lines[0], lines


def test_the_limit_reaches_trials_on_every_node():
    from kdray.objectstore import CARRIED_ENV
    assert streamed.ENV in CARRIED_ENV


def test_the_limit_counts_the_logits_and_procrustes_matrix(monkeypatch):
    monkeypatch.delenv(streamed.ENV, raising=False)
    assert not streamed.streams(111_540, 65) and not streamed.streams(50_000, 1000)   # char LM, ImageNet
    assert streamed.streams(1024, 50_257)                    # GPT-2's vocabulary: a 50,257^2 float64 matrix
    assert streamed.streams(300_000, 1000) and not streamed.streams(200_000, 1000)   # 1.2 GB vs 0.8 GB of float32


def test_a_teacher_off_this_machine_is_copied_and_mapped_and_its_copy_unlinked(tmp_path, monkeypatch):
    """Storage without a local folder (s3://, gs://): the stored logits are copied in blocks to a
    local file, mapped, and the file unlinked (the mapping keeps it); below the limit, read whole."""
    store, a = Store(str(tmp_path), "s"), np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    store.save_npy("k", "test_logits.npy", a)
    monkeypatch.setattr(Store, "local_dir", lambda self, key: None)
    monkeypatch.setattr(streamed, "BLOCK_ELEMENTS", 7)               # copied 28 bytes at a time
    small = streamed.teacher_test_logits(store, "k")
    assert type(small) is np.ndarray and np.array_equal(small, a)
    monkeypatch.setenv(streamed.ENV, "0")
    mapped = streamed.teacher_test_logits(store, "k")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, a)
    assert not os.path.exists(mapped.filename)


def test_the_report_says_which_runs_streamed_and_why():
    import pandas as pd

    from kdray.analysis import provenance as report_provenance
    from kdray.analysis.runs import runs_frame
    note = streamed.reason(1024, 50257)
    rows = [{"run_id": str(i), "status": "FINISHED", "role": "student", "setup": "lm", "teacher_seed": 0,
             "student_seed": i, "method": "kd", "metrics_streamed": note if i < 2 else None,
             "js_divergence": 0.1} for i in range(3)]
    lines = report_provenance.summary_lines(runs_frame(rows), pd.DataFrame())
    [line] = [x for x in lines if "STREAMED" in x]
    assert "2 runs" in line and note in line and "procrustes_distance" in line
    rows = [{**r, "metrics_streamed": None} for r in rows]
    assert not [x for x in report_provenance.summary_lines(runs_frame(rows), pd.DataFrame()) if "STREAMED" in x]
