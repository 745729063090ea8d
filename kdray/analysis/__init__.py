"""The analysis library behind ``kdray report`` (docs/protocol.md §5).

    runs     MLflow runs -> one typed pandas row per trial
    stats    paired Wilcoxon tests, BH FDR, transfer/marginal/asymmetry decisions
    tables   the paper's tables (Markdown, CSV, LaTeX, HTML)
    figures  asymmetry bars, metric-vs-alpha, width and planted-error figures
    report   build_report / run_report: everything into one folder and MLflow

Submodules are imported on use, so ``kdray plan`` (which needs only
``stats.significance_warning``) does not load matplotlib or MLflow.
"""
