"""The analysis library behind ``kdray report`` (docs/protocol.md §5).

A one-way pipeline of pure modules: no module imports one listed after it (even inside a
function; tests/test_stats_round2.py checks the import graph has no cycle).

    corrections  BH, BY and Holm over each comparison's metrics, smallest attainable p
    effects  ties at a stated tolerance, exact tied null, test-inverting intervals, Hodges-Lehmann,
             rank-biserial, pooled Welch and random-effects intervals
    sizing   smallest effects of interest (SESOI), signed-rank power at a stated effect, support_rate
    operating  the decision rule's error rates and the pooled intervals' coverage, by simulation
    runs     MLflow runs -> one typed pandas row per trial
    stats    paired Wilcoxon tests, equivalence, transfer/marginal/asymmetry decisions, ``Analysis``
    power    power to support transfer at the SESOI with a pilot's noise
    pooled   one statement per setup and condition over teacher seeds
    pipeline analyse(): the steps above put together
    tables   the paper's tables (Markdown, CSV, LaTeX, HTML)
    figures  asymmetry bars, metric-vs-alpha, width and planted-error figures
    report   build_report / run_report: everything into one folder and MLflow
    planning kdray power, and the seed counts of kdray plan/audit --pilot

Submodules are imported on use, so ``kdray plan`` (which needs only
``stats.significance_warning``) does not load matplotlib or MLflow.
"""
