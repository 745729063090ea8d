"""Multiple-comparison corrections, vectorised over families (the last axis).

Benjamini-Hochberg is the protocol's (and the paper's) default; Benjamini-
Yekutieli (FDR under any dependence between the metrics) and Holm (family-wise
error) are the options.  One implementation serves the report (one family at a
time) and the power simulation (thousands of simulated families at once).
Adjusted values are computed as statsmodels' multipletests does (p / (i/m)),
so a default report's BH values are unchanged.
"""
from __future__ import annotations

import numpy as np

CORRECTIONS = {
    "bh": "Benjamini-Hochberg (false discovery rate)",
    "by": "Benjamini-Yekutieli (false discovery rate under any dependence)",
    "holm": "Holm (family-wise error rate)",
}
SHORT = {"bh": "BH", "by": "BY", "holm": "Holm"}
DEFAULT = "bh"
FAMILY = ("the {m} functional metrics of one comparison (one treated condition against one control, "
          "within one setup and teacher seed)")


def _step_up(p_sorted: np.ndarray, m: int, factor: float) -> np.ndarray:
    i = np.arange(1, m + 1)
    raw = p_sorted * factor / (i / m)
    return np.minimum.accumulate(raw[..., ::-1], axis=-1)[..., ::-1]


def _holm(p_sorted: np.ndarray, m: int) -> np.ndarray:
    raw = p_sorted * (m - np.arange(m))
    return np.maximum.accumulate(raw, axis=-1)


def adjust(p, method: str = DEFAULT) -> np.ndarray:
    """Adjusted p-values along the last axis (each row one family); nan stays nan and out of the family
    (rows with nans are adjusted one at a time)."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; valid: {', '.join(CORRECTIONS)}")
    p = np.asarray(p, float)
    if np.isnan(p).any():
        flat = p.reshape(-1, p.shape[-1]) if p.ndim else p.reshape(1, 1)
        out = np.full(flat.shape, np.nan)
        for row, o in zip(flat, out):
            ok = ~np.isnan(row)
            if ok.any():
                o[ok] = adjust(row[ok], method)
        return out.reshape(p.shape)
    m = p.shape[-1] if p.ndim else 1
    if m == 0:
        return p.copy()
    order = np.argsort(p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, axis=-1)
    if method == "holm":
        adj_sorted = _holm(ps, m)
    else:
        adj_sorted = _step_up(ps, m, 1.0 if method == "bh" else float(np.sum(1.0 / np.arange(1, m + 1))))
    out = np.empty_like(ps)
    np.put_along_axis(out, order, np.minimum(adj_sorted, 1.0), axis=-1)
    return out


def rejected(p, method: str = DEFAULT, level: float = 0.05) -> np.ndarray:
    """``adjust(p, method) <= level``, without putting adjusted values back in place (the power simulation
    asks it of a million families).  Step-up (BH, BY): every p up to the largest sorted p whose raw adjusted
    value is <= level; Holm: every p below the first sorted p whose raw value exceeds it (equal p share a
    fate either way).  The raw values are adjust's own floats, so the answers are the same booleans."""
    p = np.asarray(p, float)
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; valid: {', '.join(CORRECTIONS)}")
    if p.ndim == 0 or p.shape[-1] == 0 or not level < 1 or np.isnan(p).any():
        return adjust(p, method) <= level
    m = p.shape[-1]
    ps = _sorted_columns(p)
    if method == "holm":
        first = np.full(p.shape[:-1], np.inf)
        for j in reversed(range(m)):            # the smallest j whose raw value exceeds level
            first = np.where(ps[j] * (m - j) > level, ps[j], first)
        return p < first[..., None]
    factor = 1.0 if method == "bh" else float(np.sum(1.0 / np.arange(1, m + 1)))
    last = np.full(p.shape[:-1], -np.inf)
    for j in range(m):                          # the largest j whose raw value is <= level
        last = np.where(ps[j] * factor / ((j + 1) / m) <= level, ps[j], last)
    return p <= last[..., None]


def _sorted_columns(p: np.ndarray) -> list[np.ndarray]:
    """The columns of p sorted along the last axis; four (the functional metrics) by a five-comparator
    network of elementwise minima and maxima, several times faster than sorting many short rows."""
    if p.shape[-1] != 4:
        s = np.sort(p, axis=-1)
        return [s[..., j] for j in range(p.shape[-1])]
    a, b, c, d = (p[..., j] for j in range(4))
    a, b = np.minimum(a, b), np.maximum(a, b)
    c, d = np.minimum(c, d), np.maximum(c, d)
    a, c = np.minimum(a, c), np.maximum(a, c)
    b, d = np.minimum(b, d), np.maximum(b, d)
    b, c = np.minimum(b, c), np.maximum(b, c)
    return [a, b, c, d]


def min_adjusted_p(n_pairs: int, method: str = DEFAULT, m: int = 4) -> float:
    """The smallest adjusted p a family of m one-sided signed-rank tests on n_pairs pairs can reach:
    every test at its own minimum 2^-n (all signs agree), then corrected."""
    return float(adjust(np.full(m, 2.0 ** -n_pairs), method).min())


def seeds_needed(level: float, method: str = DEFAULT, m: int = 4, most: int = 64) -> int:
    """The fewest pairs with which min_adjusted_p can reach level."""
    return next(n for n in range(1, most + 1) if min_adjusted_p(n, method, m) <= level)


def family_text(method: str, m: int = 4) -> str:
    """What a report says about its correction and the family it runs over."""
    return f"{CORRECTIONS[method]} over {FAMILY.format(m=m)}; test accuracy and loss uncorrected"
