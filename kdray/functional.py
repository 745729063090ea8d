"""Functional similarity between a teacher and a comparator (docs/protocol.md §4).

Whether distillation transfers anything beyond accuracy is judged from these
numbers, so they are computed in float64, vectorised, and in blocks of rows: a
test set of ~111,000 x 65 or 50,000 x 1000 logits never needs an N x N array or
a full-size float64 copy.

Choices the protocol leaves open:

* p, q are softmax probabilities at T = 1.  A row with a +inf logit puts its
  mass uniformly on the +inf classes; an all -inf row is uniform.  Ranks,
  argmaxes and the Procrustes matrices are all taken on p and q (not logits).
* Ties: argmax and ranking break ties by the lower class index.
* correct/incorrect agreement over an empty subset is ``nan``.
* Procrustes uses the N x K probability matrices.  If a centred matrix has
  (numerically) zero norm, i.e. constant outputs, its normalised matrix is taken
  as zero and the distance is 2, the value for "nothing in common".
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kdray.metric_names import METRIC_DIRECTIONS, TRANSFER_METRICS  # noqa: F401 - re-exported

_BLOCK_ELEMENTS = 1 << 18   # cap on rows x K per block, whatever `chunk` says (2 MB per float64 array: cache-sized)
_ZERO_NORM_RTOL = 1e-10     # centred norm below this fraction of the raw norm counts as zero
_LN2 = math.log(2.0)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).detach()


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis in float64; a row with +inf logits or only -inf logits still
    gets probabilities."""
    x = logits.to(torch.float64)
    top = x.amax(dim=-1, keepdim=True)
    pos, neg = torch.isposinf(top), torch.isneginf(top)
    if bool(pos.any()) or bool(neg.any()):
        x = torch.where(pos, torch.where(torch.isposinf(x), 0.0, -math.inf), x)
        x = torch.where(neg, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return torch.log_softmax(x, dim=-1)


def rank_order(p: torch.Tensor) -> torch.Tensor:
    """Class indices by descending value along the last axis, ties by the lower index (a stable
    descending sort).  On the CPU, numpy's vectorised sort orders the rows 2-3x faster than
    torch's; its order is arbitrary only among equal values, so rows with a tie are sorted
    again, stably (tests/test_functional.py checks ties against the stable sort)."""
    if p.device.type != "cpu" or bool(torch.isnan(p).any()):
        return torch.sort(p, dim=-1, descending=True, stable=True).indices
    a = p.numpy()
    order = np.argsort(-a, axis=-1)
    ranked = np.take_along_axis(a, order, -1)
    tied = (ranked[..., 1:] == ranked[..., :-1]).any(-1)
    if tied.any():
        order[tied] = np.argsort(-a[tied], axis=-1, kind="stable")
    return torch.from_numpy(order)


def _xlogx_sum(x: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of x log x, with 0 log 0 = 0."""
    return torch.special.xlogy(x, x).sum(-1)


def _entropy(counts: torch.Tensor, n: int) -> float:
    f = counts.to(torch.float64) / n
    return float(-(f * torch.log(f)).sum())


def functional_metrics(teacher_logits, comparator_logits, labels, chunk: int = 65536) -> dict[str, float]:
    """All docs/protocol.md §4 similarity metrics between teacher and comparator logits.

    ``teacher_logits``, ``comparator_logits``: [N, K] (or [..., K], flattened to
    rows) torch tensors or numpy arrays of any float dtype; ``labels``: [N] ints.
    ``chunk`` is the most rows processed at once (further capped so a block holds
    about 2^18 elements, but at least 64 rows); the result does not depend on it.  Raises ValueError
    on mismatched shapes or N == 0.
    """
    t, c = _as_tensor(teacher_logits), _as_tensor(comparator_logits)
    if t.shape != c.shape or t.dim() < 2:
        raise ValueError(f"logit shapes differ or are not [N, K]: {tuple(t.shape)} vs {tuple(c.shape)}")
    return functional_metrics_many(t, c.unsqueeze(0), labels, chunk)[0]


def functional_metrics_many(teacher_logits, comparator_logits, labels, chunk: int = 65536) -> list[dict[str, float]]:
    """``functional_metrics`` of one teacher against S comparators at once (a packed trial's
    students): ``comparator_logits`` is [S, *teacher shape]; the teacher's softmax and ranks
    are computed once, the comparators' as one batch.  Returns S dicts."""
    t, c, y = _as_tensor(teacher_logits), _as_tensor(comparator_logits), _as_tensor(labels)
    if t.dim() < 2 or c.dim() != t.dim() + 1 or c.shape[1:] != t.shape:
        raise ValueError(f"logit shapes differ or are not [N, K] and [S, N, K]: {tuple(t.shape)} vs {tuple(c.shape)}")
    k, m = t.shape[-1], c.shape[0]
    t, c = t.reshape(-1, k), c.reshape(m, -1, k)
    y = y.reshape(-1).to(device=t.device, dtype=torch.long)
    n = t.shape[0]
    if n == 0 or k == 0 or m == 0:
        raise ValueError("functional_metrics needs at least one input, one class and one comparator")
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} inputs")
    rows = max(1, min(int(chunk), max(64, _BLOCK_ELEMENTS // (k * m))))   # >= 64: few blocks for many classes

    dev, f64 = t.device, torch.float64
    act = torch.zeros(m, dtype=f64, device=dev)
    js = torch.zeros(m, dtype=f64, device=dev)
    rank_diff = torch.zeros(m, dtype=torch.long, device=dev)
    # Procrustes by the shifted-data method: cross-products of (p - sp), (q - sq)
    # with sp, sq the first block's column means, corrected by the final means.
    sp = sq = None
    sum_p = torch.zeros(k, dtype=f64, device=dev)
    sum_q = torch.zeros(m, k, dtype=f64, device=dev)
    cross = torch.zeros(m, k, k, dtype=f64, device=dev)
    ss_p = torch.zeros((), dtype=f64, device=dev)
    ss_q = torch.zeros(m, dtype=f64, device=dev)
    raw_p = torch.zeros((), dtype=f64, device=dev)
    raw_q = torch.zeros(m, dtype=f64, device=dev)
    arg_p, arg_q = [], []

    with torch.no_grad():
        for s in range(0, n, rows):
            log_p, log_q = log_softmax64(t[s:s + rows]), log_softmax64(c[:, s:s + rows])   # [r, K], [S, r, K]
            p, q = torch.exp(log_p), torch.exp(log_q)
            act += torch.linalg.vector_norm(p - q, dim=-1).sum(-1)

            # JS = H(m) - (H(p) + H(q)) / 2 per row, H(x) = -sum x log x with 0 log 0 = 0: the same
            # sum as 0.5 KL(p||m) + 0.5 KL(q||m), in three passes over the rows instead of ten
            js_rows = 0.5 * (_xlogx_sum(p) + _xlogx_sum(q)) - _xlogx_sum(0.5 * (p + q))
            js += js_rows.clamp(0.0, _LN2).sum(-1)

            rp, rq = rank_order(p), rank_order(q)
            rank_diff += (rp != rq).sum((-2, -1))
            arg_p.append(rp[:, 0])
            arg_q.append(rq[:, :, 0])

            if sp is None:
                sp, sq = p.mean(0), q.mean(1, keepdim=True)
            dp, dq = p - sp, q - sq
            cross += dp.T @ dq
            sum_p += p.sum(0)
            sum_q += q.sum(1)
            ss_p += (dp * dp).sum()
            ss_q += (dq * dq).sum((-2, -1))
            raw_p += (p * p).sum()
            raw_q += (q * q).sum((-2, -1))

        a, bs = torch.cat(arg_p), torch.cat(arg_q, dim=1)
        right = a == y
        n_right = int(right.sum())
        n_wrong = n - n_right
        _, c_a = torch.unique(a, return_counts=True)
        h_a = _entropy(c_a, n)
        ep = sum_p / n - sp                             # mean minus shift
        norm_p = float((ss_p - n * ep.dot(ep)).clamp_min(0.0).sqrt())
        eqs = sum_q / n - sq[:, 0]
        crosses = cross - n * ep[None, :, None] * eqs[:, None, :]
        flat_p = norm_p <= _ZERO_NORM_RTOL * math.sqrt(float(raw_p))
        out = []
        for i in range(m):
            b = bs[i]
            agree = a == b
            agree_right = int((agree & right).sum())
            agree_all = int(agree.sum())
            _, c_ab = torch.unique(a * k + b, return_counts=True)
            _, c_b = torch.unique(b, return_counts=True)
            vi = max(0.0, 2.0 * _entropy(c_ab, n) - h_a - _entropy(c_b, n))
            eq = eqs[i]
            norm_q = float((ss_q[i] - n * eq.dot(eq)).clamp_min(0.0).sqrt())
            if flat_p or norm_q <= _ZERO_NORM_RTOL * math.sqrt(float(raw_q[i])):
                procrustes = 2.0
            else:
                nuclear = float(torch.linalg.svdvals(crosses[i]).sum())
                procrustes = min(2.0, max(0.0, 2.0 - 2.0 * nuclear / (norm_p * norm_q)))
            disagreement = (n - agree_all) / n
            out.append({
                "activation_distance": float(act[i]) / n,
                "js_divergence": float(js[i]) / n,
                "rank_disagreement": float(rank_diff[i]) / (n * k),
                "prediction_disagreement": disagreement,
                "prediction_agreement": agree_all / n,          # k/n exactly, not 1 - (n - k)/n
                "correct_agreement": agree_right / n_right if n_right else float("nan"),
                "incorrect_agreement": (agree_all - agree_right) / n_wrong if n_wrong else float("nan"),
                "variation_of_information": vi,
                "procrustes_distance": procrustes,
            })
    return out


STREAMED_METRICS = ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement",
                    "prediction_agreement", "correct_agreement", "incorrect_agreement", "variation_of_information")


def _row_block_log_softmax(x, rows: slice) -> np.ndarray:
    """Log-softmax (float64) of the rows ``x[rows]`` of a [N, K] array (e.g. a numpy memmap, read
    once), infinite logits as ``log_softmax64`` takes them.  Numpy, not torch: its exp is ~5x
    faster on one CPU thread, which is what a trial has."""
    a = np.array(x[rows], dtype=np.float64)
    if np.isnan(a).any():
        raise ValueError("streamed functional metrics need logits without NaN (functional_metrics gives nan metrics)")
    top = a.max(-1, keepdims=True)
    pos, neg = np.isposinf(top), np.isneginf(top)
    if pos.any() or neg.any():
        a = np.where(pos, np.where(np.isposinf(a), 0.0, -np.inf), a)
        a = np.where(neg, 0.0, a)
        top = a.max(-1, keepdims=True)
    a -= top
    a -= np.log(np.exp(a).sum(-1, keepdims=True))
    return a


def _ranks(p: np.ndarray) -> np.ndarray:
    """``rank_order`` on a numpy array: argsort of the probabilities (ascending, reversed: no negated
    copy), rows with a tie sorted again stably so ties go to the lower index."""
    order = np.argsort(p, axis=-1)[:, ::-1]
    ranked = np.take_along_axis(p, order, -1)
    tied = (ranked[:, 1:] == ranked[:, :-1]).any(-1)
    if tied.any():
        order[tied] = np.argsort(-p[tied], axis=-1, kind="stable")
    return order


def functional_metrics_streamed(teacher_logits, comparator_logits, labels, max_elements: int = 1 << 20) -> dict[str, float]:
    """The next-token similarity metrics (``STREAMED_METRICS``: docs/protocol.md §4, without
    Procrustes, whose K x K cross-product is what a vocabulary-size K cannot afford) in memory
    bounded by a few ``max_elements`` float64 arrays, whatever N is.

    ``teacher_logits``, ``comparator_logits``: [N, K] arrays, e.g. ``np.load(path,
    mmap_mode="r")`` of a stored ``test_logits.npy``, so neither is read whole; no NaN (a
    ValueError).  Rows are read ``max(1, max_elements // K)`` at a time (ranks need every class
    of a row, so a row is the smallest unit).  Exact: equal to ``functional_metrics`` to float64
    rounding (tests/test_functional.py checks 1e-6); the cost is the two exact argsorts of every
    row's K probabilities (docs/plugins.md, "Metrics at vocabulary size")."""
    t, c = teacher_logits, comparator_logits
    if tuple(t.shape) != tuple(c.shape) or len(t.shape) != 2:
        raise ValueError(f"logit shapes differ or are not [N, K]: {tuple(t.shape)} vs {tuple(c.shape)}")
    n, k = t.shape
    y = _as_tensor(labels).reshape(-1).to(torch.long)
    if n == 0 or k == 0:
        raise ValueError("functional_metrics needs at least one input and one class")
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} inputs")
    rows = max(1, int(max_elements) // k)
    act = js = 0.0
    rank_diff = 0
    arg_p, arg_q = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for s in range(0, n, rows):
        r = slice(s, min(n, s + rows))
        p, q = np.exp(_row_block_log_softmax(t, r)), np.exp(_row_block_log_softmax(c, r))
        act += float(np.sqrt(np.square(p - q).sum(-1)).sum())
        tp, tq = torch.from_numpy(p), torch.from_numpy(q)
        js_rows = 0.5 * (_xlogx_sum(tp) + _xlogx_sum(tq)) - _xlogx_sum(0.5 * (tp + tq))
        js += float(js_rows.clamp(0.0, _LN2).sum())
        rp, rq = _ranks(p), _ranks(q)               # argmax: rank 1, ties to the lower index
        rank_diff += int((rp != rq).sum())
        arg_p[r], arg_q[r] = rp[:, 0], rq[:, 0]
    arg_p, arg_q = torch.from_numpy(arg_p), torch.from_numpy(arg_q)
    agree, right = arg_p == arg_q, arg_p == y
    n_right, agree_all = int(right.sum()), int(agree.sum())
    agree_right, n_wrong = int((agree & right).sum()), n - int(right.sum())
    _, c_ab = torch.unique(arg_p * k + arg_q, return_counts=True)
    _, c_a = torch.unique(arg_p, return_counts=True)
    _, c_b = torch.unique(arg_q, return_counts=True)
    return {
        "activation_distance": act / n,
        "js_divergence": js / n,
        "rank_disagreement": rank_diff / (n * k),
        "prediction_disagreement": (n - agree_all) / n,
        "prediction_agreement": agree_all / n,
        "correct_agreement": agree_right / n_right if n_right else float("nan"),
        "incorrect_agreement": (agree_all - agree_right) / n_wrong if n_wrong else float("nan"),
        "variation_of_information": max(0.0, 2.0 * _entropy(c_ab, n) - _entropy(c_a, n) - _entropy(c_b, n)),
    }
