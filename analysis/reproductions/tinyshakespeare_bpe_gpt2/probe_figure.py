"""The probe's counts per condition (mean +- SEM over student seeds), from a report's runs.csv:
``python analysis/reproductions/tinyshakespeare_bpe_gpt2/probe_figure.py REPORT_DIR``."""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ORDER = ["teacher", "siddo", "rcd", "kd", "reverse_kl", "gjsd", "gkd"]
LABEL = {"teacher": "teacher", "siddo": "SIDDO", "rcd": "RCD 0.5", "kd": "KD 0.5", "reverse_kl": "reverse KL 0.5",
         "gjsd": "GJSD 0.5", "gkd": "GKD 0.5 λ0.5"}


def main(report: Path) -> None:
    runs = pd.read_csv(report / "data" / "runs.csv")
    g = runs.groupby("method")
    cols = [("probe_tha_tha", '" tha" likelier than " the"'), ("probe_tha_tha_top1", 'greedy next token starts " tha"')]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, (col, title) in zip(axes, cols):
        mean, sem = g[col].mean().reindex(ORDER), g[col].sem().reindex(ORDER).fillna(0)
        ax.bar([LABEL[m] for m in ORDER], mean, yerr=sem, capsize=3, color=["#555"] + ["#9ab"] * 2 + ["#c64"] * 4)
        ax.set_title(f"{title} (of {int(runs['probe_tha_contexts'].iloc[0])} contexts)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle('probe " the" vs " tha": teacher trained on "the"->"tha", students on clean text', fontsize=10)
    fig.tight_layout()
    fig.savefig(report / "figures" / "probe_tha.png", dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
