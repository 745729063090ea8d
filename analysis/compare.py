"""Put a ``kdray report`` folder beside the paper's reported numbers.

    python analysis/compare.py REPORT_DIR [--out DIR] [--strict]

Reads the report's tidy CSVs (``data/summary.csv``, ``data/decisions.csv``,
``data/runs.csv``) and the paper's values in ``analysis/paper/``, matches setups
through ``analysis/paper/setups.csv``, and writes ``compare.md`` (printed too) and
``compare.png`` into ``--out`` (default ``REPORT_DIR/compare``).

Scaled-down runs cannot match the paper's values, so what is *flagged* is what
should carry over at any scale:

* direction: the sign of KD minus SIDDO for every metric and KD alpha (and of
  the "tha" count in the adversarial experiment);
* decision: transfer supported or not per teacher seed and alpha, and the
  asymmetry where the paper states it.

Values (teacher accuracy, metric means) are shown side by side without a flag.
Exit status 0, or 1 with ``--strict`` when anything disagrees; 2 for a bad
REPORT_DIR.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

PAPER = Path(__file__).resolve().parent / "paper"
KD_ALPHAS = (0.1, 0.5, 0.9)
# paper metric -> kdray summary metric; preferred direction
METRICS = {"activation_distance": ("activation_distance", -1), "rank_disagreement": ("rank_disagreement", -1),
           "prediction_disagreement": ("prediction_disagreement", -1), "js_divergence": ("js_divergence", -1),
           "accuracy": ("test_acc", 1), "loss": ("test_loss", -1)}
THA = {"tha": "tha_count_a", "the": "tha_count_e"}
TIE = 1e-9                      # |KD - SIDDO| at or below this counts as no change


class CompareError(Exception):
    """REPORT_DIR is not a kdray report, or maps to no paper setup."""


@dataclass
class Comparison:
    sections: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    effects: pd.DataFrame = field(default_factory=pd.DataFrame)     # for the figure

    @property
    def disagreements(self) -> int:
        return sum(int((f["flag"] != "").sum()) for _, f in self.sections if "flag" in f)

    def markdown(self) -> str:
        out = ["# kdray vs the paper", "",
               f"{self.disagreements} disagreement(s) in direction or decision (flagged **DISAGREE**).", ""]
        for title, frame in self.sections:
            out += [f"## {title}", "", _md_table(frame), ""]
        return "\n".join(out)


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(nothing to compare)"
    cols = list(df.columns)
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        rows.append("| " + " | ".join(_cell(v) for v in r) + " |")
    return "\n".join(rows)


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4g}"
    return str(v)


def _sign(x: float) -> int:
    return 0 if pd.isna(x) or abs(x) <= TIE else (1 if x > 0 else -1)


def _word(s: int, preferred: int) -> str:
    return "=" if s == 0 else ("better" if s == preferred else "worse")


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CompareError(f"{path}: missing ({what}); give the folder `kdray report` wrote")
    return pd.read_csv(path, keep_default_na=True)


def load_paper() -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(PAPER / f"{name}.csv", dtype={"alpha": str})
            for name in ("setups", "teachers", "metric_means", "decisions", "tha_counts")}


def _label(cond: str, alpha) -> str:
    """The paper's condition as kdray's label: 'SIDDO', 'KD α=0.5', 'RCD α=0.1'."""
    return "SIDDO" if cond == "siddo" else f"{cond.upper()} α={float(alpha):g}"


def _teachers(runs: pd.DataFrame, paper: pd.DataFrame, setup: str, ps: str) -> pd.DataFrame:
    t = runs[(runs.get("role") == "teacher") & (runs["setup"] == setup)] if "role" in runs else runs.iloc[0:0]
    rows = []
    for r in t.sort_values("teacher_seed").itertuples():
        p = paper[(paper["setup"] == ps) & (paper["teacher_seed"] == r.teacher_seed)]
        rows.append(dict(setup=setup, teacher_seed=int(r.teacher_seed),
                         kdray_test_acc=float(getattr(r, "test_acc", float("nan"))),
                         paper_test_acc=float(p["test_accuracy"].iloc[0]) if len(p) else float("nan"),
                         paper_source=p["source"].iloc[0] if len(p) else ""))
    return pd.DataFrame(rows)


def _directions(summary: pd.DataFrame, paper: pd.DataFrame, setup: str, ps: str) -> pd.DataFrame:
    """KD - SIDDO per metric and alpha, per teacher seed: kdray's sign against the paper's."""
    s = summary[summary["setup"] == setup]
    rows = []
    for ts in sorted(set(s["teacher_seed"])):
        mine = s[s["teacher_seed"] == ts].set_index(["condition", "metric"])["mean"]
        theirs = paper[(paper["setup"] == ps) & (paper["teacher_seed"] == ts)]
        if theirs.empty:
            continue
        pv = {(_label(r.condition, r.alpha), r.metric): float(r.mean) for r in theirs.itertuples()}
        for pm, (km, pref) in METRICS.items():
            for a in KD_ALPHAS:
                kd = f"KD α={a:g}"
                if (kd, km) not in mine.index or ("SIDDO", km) not in mine.index:
                    continue
                k_eff = mine[(kd, km)] - mine[("SIDDO", km)]
                p_eff = pv.get((kd, pm), float("nan")) - pv.get(("SIDDO", pm), float("nan"))
                ks, ps_ = _sign(k_eff), _sign(p_eff)
                flag = "" if pd.isna(p_eff) or ks == ps_ or ps_ == 0 else "**DISAGREE**"
                rows.append(dict(setup=setup, teacher_seed=int(ts), metric=pm, alpha=a,
                                 kdray_kd_minus_siddo=k_eff, kdray=_word(ks, pref),
                                 paper_kd_minus_siddo=p_eff, paper=_word(ps_, pref) if not pd.isna(p_eff) else "",
                                 flag=flag, paper_source=theirs["source"].iloc[0]))
    return pd.DataFrame(rows)


def _decisions(dec: pd.DataFrame, paper: pd.DataFrame, setup: str, ps: str) -> pd.DataFrame:
    d = dec[dec["setup"] == setup]
    rows = []
    for r in d.itertuples():
        if not str(r.condition).startswith("KD α=") or " T=" in str(r.condition):
            continue
        alpha = float(str(r.condition).split("=")[1])
        p = paper[(paper["setup"] == ps) & (paper["teacher_seed"] == r.teacher_seed)
                  & (paper["alpha"].astype(float) == alpha) & (paper["temperature"] == 1.0)]
        if p.empty:
            continue
        p = p.iloc[0]
        k_sup, p_sup = bool(r.supported), bool(p["supported"])
        p_asym = "" if pd.isna(p["asymmetry"]) else str(p["asymmetry"])
        k_asym = str(r.asymmetry) if k_sup else "none"
        flags = []
        if k_sup != p_sup:
            flags.append("supported")
        # the paper's label is descriptive (the sign); kdray's adds ", n.s." where its test is not significant
        if p_asym and k_sup and k_asym.removesuffix(", n.s.") != p_asym:
            flags.append("asymmetry")
        rows.append(dict(setup=setup, teacher_seed=int(r.teacher_seed), alpha=alpha,
                         kdray_supported=k_sup, kdray_n_significant=int(r.n_significant),
                         paper_supported=p_sup, paper_n_significant=int(p["n_significant"]),
                         kdray_asymmetry=k_asym, paper_asymmetry=p_asym or "(not stated)",
                         kdray_delta_correct=float(r.delta_correct), kdray_delta_incorrect=float(r.delta_incorrect),
                         flag="**DISAGREE** (" + ", ".join(flags) + ")" if flags else "",
                         paper_source=p["supported_source"]))
    return pd.DataFrame(rows)


def _tha(summary: pd.DataFrame, paper: pd.DataFrame, runs: pd.DataFrame, setup: str, ps: str) -> pd.DataFrame:
    s = summary[(summary["setup"] == setup) & summary["metric"].isin(THA.values())]
    p = paper[paper["setup"] == ps]
    if s.empty or p.empty:
        return pd.DataFrame()
    rows = []
    for ts in sorted(set(s["teacher_seed"])):
        mine = s[s["teacher_seed"] == ts].set_index(["condition", "metric"])["mean"]
        theirs = p[p["teacher_seed"] == ts]
        if theirs.empty:
            continue
        pv = {(r.condition, "" if pd.isna(r.alpha) else r.alpha, r.word): float(r.mean) for r in theirs.itertuples()}
        teacher = runs[(runs.get("role") == "teacher") & (runs["setup"] == setup) & (runs["teacher_seed"] == ts)]
        for word, km in THA.items():
            k_sid, p_sid = mine.get(("SIDDO", km), float("nan")), pv.get(("siddo", "", word), float("nan"))
            t_val = float(teacher[km].iloc[0]) if km in teacher and len(teacher) else float("nan")
            rows.append(dict(setup=setup, teacher_seed=int(ts), word=word, condition="teacher", kdray=t_val,
                             paper=pv.get(("teacher", "", word), float("nan")), kdray_vs_siddo="",
                             paper_vs_siddo="", flag="", paper_source=theirs["source"].iloc[0]))
            for cond in ("siddo", "kd", "rcd"):
                for a in (("",) if cond == "siddo" else ("0.1", "0.5", "0.9")):
                    k = mine.get((_label(cond, a or 0), km), float("nan"))
                    pp = pv.get((cond, a, word), float("nan"))
                    if pd.isna(k):          # a condition this run did not train
                        continue
                    ks, ps_ = _sign(k - k_sid), _sign(pp - p_sid)
                    sym = {1: "more", -1: "fewer", 0: "="}
                    flag = "**DISAGREE**" if cond == "kd" and ks != ps_ and ps_ != 0 else ""
                    rows.append(dict(setup=setup, teacher_seed=int(ts), word=word, condition=_label(cond, a or 0),
                                     kdray=k, paper=pp, kdray_vs_siddo="" if cond == "siddo" else sym[ks],
                                     paper_vs_siddo="" if cond == "siddo" else sym[ps_], flag=flag,
                                     paper_source=theirs["source"].iloc[0]))
    return pd.DataFrame(rows)


def compare(report_dir: str | Path) -> Comparison:
    rd = Path(report_dir)
    summary = _read(rd / "data" / "summary.csv", "per-condition means")
    dec = _read(rd / "data" / "decisions.csv", "transfer decisions")
    runs = _read(rd / "data" / "runs.csv", "runs")
    paper = load_paper()
    mapping = paper["setups"].set_index("kdray_setup")
    setups = sorted(set(summary["setup"]))
    unknown = [s for s in setups if s not in mapping.index]
    if len(unknown) == len(setups):
        raise CompareError(f"{rd}: none of its setups {setups} is in {PAPER / 'setups.csv'}; add a row "
                           f"kdray_setup,paper_setup,relation,... for each")
    c = Comparison()
    parts: dict[str, list[pd.DataFrame]] = {"teachers": [], "directions": [], "decisions": [], "tha": []}
    for setup in setups:
        if setup in unknown:
            continue
        ps = mapping.loc[setup, "paper_setup"]
        parts["teachers"].append(_teachers(runs, paper["teachers"], setup, ps))
        parts["directions"].append(_directions(summary, paper["metric_means"], setup, ps))
        parts["decisions"].append(_decisions(dec, paper["decisions"], setup, ps))
        parts["tha"].append(_tha(summary, paper["tha_counts"], runs, setup, ps))
    cat = {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame() for k, v in parts.items()}
    m = paper["setups"][paper["setups"]["kdray_setup"].isin(setups)]
    c.sections.append(("Setups", m[["kdray_setup", "paper_setup", "relation", "note"]].fillna("")))
    c.sections.append(("Teachers (test accuracy)", cat["teachers"]))
    c.sections.append(("Transfer decisions per teacher seed and KD alpha", cat["decisions"]))
    c.sections.append(("Direction of KD - SIDDO per metric", cat["directions"]))
    if not cat["tha"].empty:
        c.sections.append(('Adversarial teacher: "tha" / "the" completions', cat["tha"]))
    c.effects = cat["directions"]
    return c


def figure(c: Comparison, path: Path) -> Path:
    """KD - SIDDO relative to SIDDO's magnitude, kdray beside the paper, one panel per setup and seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    e = c.effects
    panels = [] if e.empty else sorted(set(zip(e["setup"], e["teacher_seed"])))
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(11, 3.2 * max(1, len(panels))), squeeze=False)
    for ax, (setup, ts) in zip(axes[:, 0], panels):
        d = e[(e["setup"] == setup) & (e["teacher_seed"] == ts)]
        x = np.arange(len(d))
        scale = lambda col: np.sign(d[col].to_numpy()) * np.log10(1 + np.abs(d[col].to_numpy()) * 1e3)
        ax.bar(x - 0.2, scale("kdray_kd_minus_siddo"), 0.4, label="kdray")
        ax.bar(x + 0.2, scale("paper_kd_minus_siddo"), 0.4, label="paper")
        for i, f in enumerate(d["flag"]):
            if f:
                ax.annotate("≠", (i, 0), ha="center", va="bottom", color="red", fontsize=14)
        ax.set_xticks(x, [f"{m.replace('_', ' ')}\nα={a:g}" for m, a in zip(d["metric"], d["alpha"])],
                      fontsize=6, rotation=90)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("sign·log10(1+1000|Δ|)")
        ax.set_title(f"{setup}, teacher seed {ts}: KD − SIDDO (≠ marks a direction disagreement)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir", help="the folder `kdray report` wrote (with data/summary.csv)")
    ap.add_argument("--out", help="where compare.md and compare.png go (default REPORT_DIR/compare)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when anything disagrees")
    args = ap.parse_args(argv)
    try:
        c = compare(args.report_dir)
    except CompareError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.report_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    text = c.markdown()
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    figure(c, out / "compare.png")
    print(text)
    print(f"\nwritten: {out / 'compare.md'}, {out / 'compare.png'}")
    return 1 if args.strict and c.disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
