"""The analysis library behind ``kdray report`` (docs/protocol.md §5).

    runs     MLflow runs -> one typed pandas row per trial
    stats    paired Wilcoxon tests, BH FDR, transfer/marginal/asymmetry decisions
    effects  ties at a stated tolerance, exact tied null, Hodges-Lehmann with CI, rank-biserial
    corrections  BH, BY and Holm over each comparison's metrics, smallest attainable p
    power    power to support transfer at n seeds (smoothed bootstrap of a pilot)
    pooled   one statement per setup and condition over teacher seeds
    tables   the paper's tables (Markdown, CSV, LaTeX, HTML)
    figures  asymmetry bars, metric-vs-alpha, width and planted-error figures
    report   build_report / run_report: everything into one folder and MLflow

Submodules are imported on use, so ``kdray plan`` (which needs only
``stats.significance_warning``) does not load matplotlib or MLflow.
"""
