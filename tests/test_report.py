"""kdray report end to end on a planted MLflow sweep: files, bold, ticks, HTML, MLflow logging."""
from pathlib import Path

import numpy as np
import pytest

from kdray.analysis import figures
from kdray.analysis.report import build_report, log_report_to_mlflow, run_report
from kdray.analysis.pipeline import analyse
from synthetic_runs import SEEDS, as_frame, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(planted_mlflow):
    return planted_mlflow


@pytest.fixture(scope="module")
def report(sweep):
    from kdray.analysis.runs import load_runs

    d, uri = sweep
    return build_report(load_runs(uri, "planted"), d / "out")


@pytest.mark.slow      # starts a process pool: ~6 s
def test_worker_processes_load_and_draw_what_one_process_does(sweep, report, tmp_path):
    """kdray report's process pool: runs read in run-id ranges (sqlruns.PARTS), per-setup tables made
    and figures drawn by workers give the same frame and the same files as the serial path."""
    import pandas as pd

    from kdray.analysis.report import report_pool
    from kdray.analysis.runs import load_runs

    d, uri = sweep
    serial = load_runs(uri, "planted")
    assert serial["start_time"].nunique() > 8           # more than one slice really holds runs
    with report_pool(2) as pool:
        assert pool is not None
        parallel = load_runs(uri, "planted", pool)
        pd.testing.assert_frame_equal(parallel, serial)
        drawn = build_report(parallel, tmp_path / "out", pool=pool)
    for name in ("summary", "tests", "decisions", "best_accuracy", "excluded"):   # setups analysed by workers
        pd.testing.assert_frame_equal(getattr(drawn.analysis, name), getattr(report.analysis, name))
    names = lambda out: sorted(p.name for p in (out / "figures").iterdir())  # noqa: E731
    assert names(drawn.out_dir) == names(report.out_dir) and len(names(report.out_dir)) >= 6
    tables = lambda out: {p.name: p.read_bytes() for p in (out / "tables").iterdir()}  # noqa: E731
    assert tables(drawn.out_dir) == tables(report.out_dir)      # per-setup tables made and written by the workers
    assert sorted(drawn.files) == sorted(p for p in drawn.out_dir.rglob("*") if p.is_file())
    assert (drawn.out_dir / "summary.txt").read_text() == (report.out_dir / "summary.txt").read_text().replace(
        str(report.out_dir), str(drawn.out_dir))
    with report_pool(1) as none:
        assert none is None


def md_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_writes_every_format(report):
    out = report.out_dir
    for stem in ("decisions", "ticks_errors", "metrics_errors_t0", "metrics_broken_t0", "teachers", "excluded"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{stem}.{ext}").stat().st_size > 0, (stem, ext)
    for stem in ("asymmetry_errors", "metrics_errors", "counts_errors"):
        png, svg = out / "figures" / f"{stem}.png", out / "figures" / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip().startswith("<?xml")
    assert not (out / "figures" / "counts_same.png").exists()          # no tha counts in that setup
    assert not (out / "figures" / "width_errors.png").exists()         # one width only
    for name in ("runs", "summary", "tests", "decisions", "excluded"):
        assert (out / "data" / f"{name}.csv").is_file()
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((out / "figures").glob("*.png")))
    assert "<table>" in page and "href='tables/decisions.csv'" in page and "href='figures/asymmetry_errors.svg'" in page
    assert "<td><b>" in page


def test_best_mean_is_bold(report):
    a = report.analysis
    text = (report.out_dir / "tables" / "metrics_errors_t0.md").read_text()
    rows = md_rows(text)
    header, body = rows[0], rows[1:]
    s = a.summary[(a.summary["setup"] == "errors") & (a.summary["teacher_seed"] == 0)]
    for metric, best in (("activation_distance", min), ("incorrect_agreement", max), ("test_acc", max)):
        j = next(i for i, h in enumerate(header) if h.split(" ")[0] == metric)
        bold = [r[0] for r in body if r[j].startswith("**")]
        sub = s[s["metric"] == metric]
        want = sub.loc[sub["mean"] == best(sub["mean"]), "condition"].iloc[0].label
        assert bold == [want], (metric, bold, want)
    assert header[2].startswith("test_acc ↑") and any(h.startswith("activation_distance ↓") for h in header)
    tex = (report.out_dir / "tables" / "metrics_errors_t0.tex").read_text()
    assert "\\textbf{" in tex and "$\\pm$" in tex and "$\\alpha$" in tex


def test_tick_table(report):
    rows = md_rows((report.out_dir / "tables" / "ticks_errors.md").read_text())
    header = [h.split(" ")[0] for h in rows[0]]
    assert header == ["condition", "activation_distance", "rank_disagreement", "prediction_disagreement",
                      "js_divergence", "test_acc", "test_loss"]
    body = {r[0]: r[1:] for r in rows[1:]}
    assert body["KD α=0.9"] == ["✓✓–", "✓✓✓", "✓✓✓", "✓✓✓", "–––", "–––"]
    assert body["KD α=0.1"] == ["–––"] * 6
    csv = (report.out_dir / "tables" / "ticks_errors.csv").read_text()
    assert "KD α=0.9,✓✓–,✓✓✓" in csv


def test_decision_table_and_summary(report):
    rows = md_rows((report.out_dir / "tables" / "decisions.md").read_text())
    h = rows[0]
    got = {(r[0], r[1], r[2]): dict(zip(h, r)) for r in rows[1:]}
    r = got[("errors", "1", "KD α=0.9")]
    assert (r["supported"], r["marginal"], r["asymmetry"], r["best control"]) == ("yes", "yes", "negative", "RCD α=0.1")
    assert r["best accuracy"] == "RCD α=0.1"
    assert got[("errors", "0", "KD α=0.9")]["marginal"] == "no"
    assert got[("same", "0", "KD α=0.5")]["supported"] == "no"
    text = report.summary_text()
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    assert lines["errors"] == ("errors: transfer KD α=0.9 [t0 t1(m) t2; negative asymmetry ×3]; "
                               "no transfer larger than the SESOI shown: KD α=0.1 [t0 t1 t2] | "
                               "best accuracy RCD α=0.1 ×3 (an RCD control in 3/3)")
    assert lines["same"].startswith("same: no supported transfer; no transfer larger than the SESOI shown: KD α=0.5 [t0] |")
    assert lines["broken"].startswith("broken: transfer KD α=0.5 [t0; t0 no asymmetry observed (p 1; ")
    assert "| best accuracy KD α=0.5 " in lines["broken"]
    assert "broken t0 KD α=0.5 seed 12: status FAILED" in text and "seed 15: NaN activation_distance" in text
    assert len(text.splitlines()) < 40
    assert (report.out_dir / "summary.txt").read_text().strip() == text


def test_log_report_to_mlflow(sweep, report):
    from mlflow import MlflowClient

    _, uri = sweep
    run_id = log_report_to_mlflow(uri, "planted", report.out_dir)
    c = MlflowClient(uri)
    r = c.get_run(run_id)
    parent = c.search_runs([r.info.experiment_id], "tags.`kdray.kind` = 'sweep'")[0]
    assert r.data.tags["kdray.kind"] == "report" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert r.info.status == "FINISHED"
    top = {f.path for f in c.list_artifacts(run_id)}
    assert {"index.html", "summary.txt", "tables", "figures", "data"} <= top
    assert "tables/decisions.tex" in {f.path for f in c.list_artifacts(run_id, "tables")}


def test_run_report_from_a_sweep_file_and_errors(sweep, tmp_path, capsys):
    _, uri = sweep
    f = tmp_path / "small.yaml"
    f.write_text(f"name: small\ntracking_uri: '{uri}'\nsetups: []\n")
    # A file's report is its plan's (issue 25): a file that plans nothing is one line, which says
    # how to report the experiment's runs instead.
    assert run_report(str(f), str(tmp_path / "rep"), None, 0.01, None) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "setups" in err and "name the experiment instead of the file" in err
    assert run_report("small", str(tmp_path / "rep"), uri, 0.01, None) == 0
    out = capsys.readouterr().out
    assert "broken: transfer KD α=0.5 [t0; t0 no asymmetry observed (p 1; " in out
    assert "logged to MLflow: experiment 'small'" in out
    assert (tmp_path / "rep" / "index.html").is_file()

    assert run_report("nope", None, uri, 0.01, None) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdray: error: no MLflow experiment 'nope' at {uri}; run `kdray sweep` first"
    missing = f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}"
    assert run_report("planted", None, missing, 0.01, None) == 2
    assert "no MLflow experiment 'planted'" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()                          # nothing created on a miss


def test_width_and_temperature_figures(tmp_path):
    m = lambda s: {"activation_distance": 0.2, "correct_agreement": 0.9 + s / 1000, "incorrect_agreement": 0.3,
                   "test_acc": 0.8 + s / 1000, "js_divergence": 0.1}
    runs = []
    for w in (1.0, 0.5):
        runs += [run("w", "siddo", 0, s, width=w, metrics=m(s)) for s in SEEDS[:3]]
        for t in (1.0, 2.0):
            for method in ("kd", "rcd"):
                runs += [run("w", method, 0, s, alpha=0.5, temperature=t, width=w, metrics=m(s)) for s in SEEDS[:3]]
    a = analyse(as_frame(runs))
    fig = figures.width_figure(a, "w")
    assert fig is not None and len(fig.axes) == 1
    assert len(figures.asymmetry_figure(a, "w").axes) == 2                # one row of panels per temperature
    paths = figures.save(fig, tmp_path, "width_w")
    assert all(p.stat().st_size > 0 for p in paths)
    assert np.isfinite(a.decisions["delta_correct"]).all()


def test_resolve_experiment(tmp_path, monkeypatch):
    from kdray.analysis.report import default_out
    from kdray.analysis.runs import ReportError, resolve_experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_experiment(None, "quick") == (f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", "quick", "./results")
    (tmp_path / "q.yaml").write_text("name: quick\nstorage: out/store\nsetups: []\n")
    uri, name, storage = resolve_experiment(None, "q.yaml")
    assert (uri, name) == (f"sqlite:///{tmp_path / 'out' / 'store' / 'mlflow.db'}", "quick")
    assert default_out(storage, name) == tmp_path.joinpath("out/store/quick/report").relative_to(tmp_path)
    assert resolve_experiment("http://x:5000", "q.yaml")[0] == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_experiment(None, "q.yaml")[0] == "http://env:5000"
    with pytest.raises(ReportError, match="no such sweep file"):
        resolve_experiment(None, "missing.yaml")


def test_effect_sizes_power_and_the_correction_family_are_reported(report):
    import pandas as pd

    out, a = report.out_dir, report.analysis
    tests = pd.read_csv(out / "data" / "tests.csv")
    assert {"null", "hl", "ci_low", "ci_high", "ci_level", "rank_biserial", "superiority"} <= set(tests.columns)
    assert set(tests["null"]) <= {"exact", "exact-ties", "normal"}
    ok = tests.dropna(subset=["hl"])
    assert ((ok["ci_low"] <= ok["hl"]) & (ok["hl"] <= ok["ci_high"])).all()
    eff = md_rows((out / "tables" / "effects_errors.md").read_text())
    assert eff[0][:3] == ["teacher seed", "condition", "control"] and len(eff) - 1 == 3 * 2 * 2   # seeds x KD x controls
    assert all("[" in c and "r=" in c and "P=" in c for c in eff[1][3:])
    dec = md_rows((out / "tables" / "decisions.md").read_text())
    h = dec[0]
    rows = {(r[0], r[1], r[2]): dict(zip(h, r)) for r in dec[1:]}
    assert rows[("errors", "0", "KD α=0.9")]["power"] == "1 (1-1)"
    assert rows[("errors", "0", "KD α=0.9")]["seeds for 80%"] == "5 (5)"
    assert rows[("same", "0", "KD α=0.5")]["supported"] == "no"
    assert "under-powered" not in (out / "tables" / "decisions.md").read_text()
    assert (out / "tables" / "power.md").is_file() and (out / "tables" / "pooled.md").is_file()
    pooled = md_rows((out / "tables" / "pooled.md").read_text())
    assert ["errors", "KD α=0.9", "3/3"] == pooled[[r[1] for r in pooled].index("KD α=0.9")][:3]
    assert (out / "figures" / "effects_errors.png").is_file()
    page = (out / "index.html").read_text()
    family = "Benjamini-Hochberg (false discovery rate) over the 4 functional metrics of one comparison"
    assert family in page and "id='effects_errors'" in page and "id='power'" in page
    text = report.summary_text()
    assert f"statistics: {family}" in text and "seeds for 80% power to support transfer at the SESOI" in text
    assert "pooled over teacher seeds" in text
    assert a.statements["ci_low"].le(a.statements["pa_gain"]).all()


def test_correction_option_and_power_and_plan_commands(sweep, tmp_path, capsys):
    from kdray.cli import main

    _, uri = sweep
    assert main(["report", "small", "--tracking-uri", uri, "--out", str(tmp_path / "holm"), "--correction", "holm",
                 "--jobs", "1"]) == 0
    capsys.readouterr()
    import pandas as pd

    t = pd.read_csv(tmp_path / "holm" / "data" / "tests.csv")
    fam = t[t["family"] == "holm"]
    assert len(fam) == 8 and set(t.loc[t["family"] != "holm", "metric"]) == {"test_acc", "test_loss"}
    assert "Holm (family-wise error rate) over the 4 functional metrics" in (tmp_path / "holm" / "index.html").read_text()
    assert main(["power", "small", "--tracking-uri", uri, "--draws", "200", "--correction", "by"]) == 0
    out = capsys.readouterr().out
    assert "Power to support transfer at the SESOI (BY)" in out
    assert "broken: student seeds for 80% power at the SESOI on every teacher seed (noise at its upper 95% limit): KD α=0.5" in out
    assert main(["power", "nope", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == f"kdray: error: no MLflow experiment 'nope' at {uri}; run `kdray sweep` first"
    assert main(["plan", str(ROOT / "search_spaces/quickstart.yaml"), "--correction", "holm"]) == 0
    out = capsys.readouterr().out
    assert "digits-cnn: 6 student seeds: smallest one-sided p 2^-6 = 0.01562, Holm-adjusted over 4 metrics 0.0625" in out
    assert "use at least 7 student seeds" in out


def _client_and_direct(uri, name):
    from kdray.analysis.runs import load_runs
    return load_runs(uri, name, direct=False), load_runs(uri, name)


def test_runs_read_from_mlflows_tables_equal_the_clients(sweep):
    """kdray/analysis/sqlruns.py reads the SQL store's tables itself: the frame equals the one
    built from MLflow's own client on the planted sweep."""
    import pandas as pd

    from mlflow import MlflowClient

    from kdray.analysis import sqlruns

    d, uri = sweep
    exp_id = MlflowClient(uri).get_experiment_by_name("planted").experiment_id
    assert len(sqlruns.trial_runs(uri, exp_id)) > 100          # the tables were read, not the client
    by_client, direct = _client_and_direct(uri, "planted")
    pd.testing.assert_frame_equal(direct, by_client)


def test_direct_read_skips_deleted_and_non_trial_runs_and_keeps_nan(tmp_path):
    """A deleted trial run and the sweep's own run stay out; a NaN metric stays NaN; the answer
    still equals the client's."""
    import math

    import pandas as pd
    from mlflow import MlflowClient

    from synthetic_runs import broken_setup, write_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_experiment(uri, "small", broken_setup(), tmp_path / "artifacts")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("small")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    client.log_metric(runs[0].info.run_id, "test_acc", float("nan"), step=10 ** 6)
    client.delete_run(runs[1].info.run_id)
    client.create_run(exp.experiment_id, tags={"kdray.kind": "sweep"})
    by_client, direct = _client_and_direct(uri, "small")
    assert len(direct) == len(runs) - 1 and runs[1].info.run_id not in set(direct["run_id"])
    assert math.isnan(direct.set_index("run_id").loc[runs[0].info.run_id, "test_acc"])
    pd.testing.assert_frame_equal(direct, by_client)


def test_direct_reads_of_parts_experiment_and_sweep_tag_equal_mlflows(tmp_path):
    """The run-id ranges the report's workers read are disjoint and cover every trial run; the
    experiment (a name with a quote in it) and the sweep run's plug-in tag read from the tables
    are what MLflow's client says, newest sweep run first."""
    from mlflow import MlflowClient

    from kdray.analysis import sqlruns
    from kdray.analysis.runs import get_experiment, sweep_plugins
    from synthetic_runs import broken_setup, write_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "it's small"
    exp_id = write_experiment(uri, name, broken_setup(), tmp_path / "artifacts")
    client = MlflowClient(uri)
    every = {r.info.run_id for r in client.search_runs([exp_id], "tags.`kdray.kind` = 'trial'")}
    parts = [{r.info.run_id for r in sqlruns.trial_runs(uri, exp_id, lo, hi)} for lo, hi in sqlruns.PARTS]
    assert set.union(*parts) == every and sum(map(len, parts)) == len(every) and all(parts)
    exp = get_experiment(uri, name)
    assert (exp.experiment_id, exp.name) == (client.get_experiment_by_name(name).experiment_id, name)
    assert sqlruns.experiment(uri, "no such") is False
    client.create_run(exp_id, tags={"kdray.kind": "sweep", "kdray.plugins": "newest_mod,other"}, start_time=10 ** 13)
    client.create_run(exp_id, tags={"kdray.kind": "sweep", "kdray.plugins": "older_mod"}, start_time=10 ** 12)
    assert sweep_plugins(uri, exp_id) == ("newest_mod", "other")
    newest = client.search_runs([exp_id], "tags.`kdray.kind` = 'sweep'", max_results=1)[0]
    assert sweep_plugins(uri, exp_id) == tuple(newest.data.tags["kdray.plugins"].split(","))


def test_figures_are_drawn_up_to_a_number_of_setups_unless_asked(sweep, tmp_path, monkeypatch):
    """--figures auto draws every setup's figures up to FIGURE_SETUPS setups and none above (the
    summary says how to ask for them); all and none do what they say."""
    from kdray.analysis import report as report_mod
    from kdray.analysis.runs import load_runs

    d, uri = sweep
    df = load_runs(uri, "planted")
    monkeypatch.setattr(report_mod, "FIGURE_SETUPS", 1)          # the planted sweep has more setups
    assert df["setup"].nunique() > 1
    auto = build_report(df, tmp_path / "auto")
    assert not (tmp_path / "auto" / "figures").exists()
    assert "--figures all" in auto.summary_text() and "<img" not in auto.index.read_text()
    drawn = build_report(df, tmp_path / "all", figures_for="all")
    assert len(list((tmp_path / "all" / "figures").glob("*.png"))) >= 6 and "<img" in drawn.index.read_text()
    monkeypatch.setattr(report_mod, "FIGURE_SETUPS", 24)
    build_report(df, tmp_path / "none", figures_for="none")
    assert not (tmp_path / "none" / "figures").exists()
