"""kdray.functional against per-sample reference implementations and hand-worked cases."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import mutual_info_score

from kdray.functional import METRIC_DIRECTIONS, TRANSFER_METRICS, functional_metrics, functional_metrics_many

KEYS = ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement",
        "prediction_agreement", "correct_agreement", "incorrect_agreement", "variation_of_information",
        "procrustes_distance")
DISTANCES = ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement",
             "variation_of_information", "procrustes_distance")


def reference(t, c, y):
    """Straightforward per-sample loops (scipy / sklearn where they exist)."""
    t, c, y = np.asarray(t, np.float64), np.asarray(c, np.float64), np.asarray(y)
    n, k = t.shape
    act, js, rank, a, b = [], [], [], [], []
    for i in range(n):
        p, q = scipy.special.softmax(t[i]), scipy.special.softmax(c[i])
        act.append(np.linalg.norm(p - q))
        js.append(jensenshannon(p, q) ** 2)         # natural log: sqrt(JS) by default
        rp, rq = np.argsort(-p, kind="stable"), np.argsort(-q, kind="stable")
        rank.append(np.mean(rp != rq))
        a.append(int(np.argmax(p)))
        b.append(int(np.argmax(q)))
    a, b = np.array(a), np.array(b)
    agree = a == b
    right = a == y
    h = lambda v: scipy.stats.entropy(np.unique(v, return_counts=True)[1])
    P, Q = scipy.special.softmax(t, axis=1), scipy.special.softmax(c, axis=1)
    P, Q = P - P.mean(0), Q - Q.mean(0)
    P, Q = P / np.linalg.norm(P), Q / np.linalg.norm(Q)
    R, _ = scipy.linalg.orthogonal_procrustes(P, Q)
    return {
        "activation_distance": np.mean(act),
        "js_divergence": np.mean(js),
        "rank_disagreement": np.mean(rank),
        "prediction_disagreement": np.mean(~agree),
        "prediction_agreement": np.mean(agree),
        "correct_agreement": agree[right].mean() if right.any() else float("nan"),
        "incorrect_agreement": agree[~right].mean() if (~right).any() else float("nan"),
        "variation_of_information": h(a) + h(b) - 2 * mutual_info_score(a, b),
        "procrustes_distance": np.linalg.norm(P @ R - Q) ** 2,
    }


def random_case(seed, n, k, scale=3.0):
    g = np.random.default_rng(seed)
    t = g.normal(size=(n, k)) * scale
    c = 0.6 * t + g.normal(size=(n, k)) * scale    # related, so agreements are not trivial
    y = np.where(g.random(n) < 0.6, t.argmax(1), g.integers(0, k, n))
    return t, c, y


def assert_metrics(got, want, rtol=1e-6, atol=1e-9):
    assert tuple(got) == KEYS
    for key in KEYS:
        assert isinstance(got[key], float), key
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("seed,n,k", [(0, 300, 2), (1, 257, 10), (2, 400, 65), (3, 150, 65), (4, 200, 10)])
def test_matches_reference(seed, n, k):
    t, c, y = random_case(seed, n, k)
    want = reference(t, c, y)
    assert_metrics(functional_metrics(torch.tensor(t), torch.tensor(c), torch.tensor(y)), want)
    assert_metrics(functional_metrics(t.astype(np.float32), c.astype(np.float32), y),  # numpy, float32
                   reference(t.astype(np.float32), c.astype(np.float32), y), rtol=1e-5, atol=1e-7)


def test_chunking_does_not_change_result():
    t, c, y = random_case(5, 123, 10)
    one = functional_metrics(t, c, y, chunk=10_000)
    for chunk in (1, 7, 64):
        assert_metrics(functional_metrics(t, c, y, chunk=chunk), one, rtol=1e-10, atol=1e-12)


def test_many_comparators_at_once_match_the_reference_each():
    """A packed trial's students against one teacher in one call (functional_metrics_many): each
    comparator's metrics equal the per-sample reference, across blocks (chunk 7) and with one
    comparator that is the teacher itself and one with constant outputs."""
    t, c0, y = random_case(11, 130, 10)
    comps = np.stack([c0, t, np.zeros_like(t), random_case(12, 130, 10)[1]])
    got = functional_metrics_many(torch.tensor(t), torch.tensor(comps), torch.tensor(y), chunk=7)
    assert len(got) == 4
    for comp, g in zip(comps, got):
        assert_metrics(g, reference(t, comp, y))
    assert got[1]["prediction_agreement"] == 1.0 and got[2]["procrustes_distance"] == 2.0
    with pytest.raises(ValueError, match="S, N, K"):
        functional_metrics_many(t, c0, y)


def test_float16_input():
    t, c, y = random_case(6, 200, 65)
    t16, c16 = torch.tensor(t, dtype=torch.float16), torch.tensor(c, dtype=torch.float16)
    got = functional_metrics(t16, c16, torch.tensor(y))
    assert_metrics(got, reference(t16.double().numpy(), c16.double().numpy(), y))
    assert all(math.isfinite(got[m]) for m in DISTANCES)


def test_identical_logits():
    t, _, y = random_case(7, 100, 10)
    y[:3] = (t[:3].argmax(1) + 1) % 10                  # both subsets non-empty
    got = functional_metrics(t, t.copy(), y)
    for m in DISTANCES:
        assert got[m] == pytest.approx(0.0, abs=1e-12), m
    for m in ("prediction_agreement", "correct_agreement", "incorrect_agreement"):
        assert got[m] == 1.0, m


def test_reversed_order_rank_disagreement():
    got = functional_metrics(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([0]))
    assert got["rank_disagreement"] == pytest.approx(2 / 3)
    assert got["prediction_disagreement"] == 1.0


def test_rank_ties_broken_by_lower_index():
    # q ties classes 0 and 2 at the top: ranked (0, 2, 1); p ranks (2, 0, 1) -> 2 of 3 positions differ
    got = functional_metrics(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[5.0, 1.0, 5.0]]), torch.tensor([2]))
    assert got["rank_disagreement"] == pytest.approx(2 / 3)
    assert got["prediction_disagreement"] == 1.0        # argmax q -> class 0, the lower index


@pytest.mark.parametrize("small", [-math.inf, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_js_with_exact_zeros(small, dtype):
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4)
    t = torch.tensor([[0.0, small]], dtype=dtype)
    c = torch.tensor([[0.0, 0.0]], dtype=dtype)
    hand = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    got = functional_metrics(t, c, torch.tensor([0]))
    assert math.isfinite(got["js_divergence"])
    assert got["js_divergence"] == pytest.approx(hand, rel=1e-12)
    assert got["activation_distance"] == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_js_bounded_by_ln2():
    # disjoint one-hot outputs reach the bound exactly
    t = torch.tensor([[0.0, -math.inf, -math.inf], [1e4, 0.0, 0.0]])
    c = torch.tensor([[-math.inf, 0.0, -math.inf], [0.0, 0.0, 1e4]])
    got = functional_metrics(t, c, torch.tensor([0, 0]))
    assert got["js_divergence"] == pytest.approx(math.log(2), rel=1e-12)
    assert got["js_divergence"] <= math.log(2)
    # extreme random logits: every row is within the bound
    t, c, y = random_case(8, 50, 10, scale=200.0)
    for i in range(len(y)):
        js = functional_metrics(t[i:i + 1], c[i:i + 1], y[i:i + 1])["js_divergence"]
        assert 0.0 <= js <= math.log(2)


def test_infinite_logits_stay_finite():
    t = torch.tensor([[math.inf, 0.0, math.inf], [-math.inf, -math.inf, -math.inf]])
    c = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = functional_metrics(t, c, torch.tensor([0, 1]))
    assert all(math.isfinite(got[m]) for m in DISTANCES)
    # row 0: p = (1/2, 0, 1/2) vs uniform; row 1: uniform vs uniform
    p, q = np.array([0.5, 0.0, 0.5]), np.full(3, 1 / 3)
    assert got["activation_distance"] == pytest.approx(np.linalg.norm(p - q) / 2, rel=1e-12)
    assert got["js_divergence"] == pytest.approx(jensenshannon(p, q) ** 2 / 2, rel=1e-9)


def test_correct_incorrect_agreement_hand_case():
    eye = torch.eye(3) * 5
    teacher = eye[[0, 1, 2, 0]]                         # argmax 0 1 2 0
    comparator = eye[[0, 0, 2, 0]]                      # agrees on inputs 0, 2, 3
    labels = torch.tensor([0, 1, 0, 1])                 # teacher right on 0, 1; wrong on 2, 3
    got = functional_metrics(teacher, comparator, labels)
    assert got["prediction_agreement"] == 0.75
    assert got["prediction_disagreement"] == 0.25
    assert got["correct_agreement"] == 0.5
    assert got["incorrect_agreement"] == 1.0


def test_empty_subsets_are_nan():
    t, c, _ = random_case(9, 40, 10)
    right = functional_metrics(t, c, t.argmax(1))
    assert math.isnan(right["incorrect_agreement"]) and math.isfinite(right["correct_agreement"])
    wrong = functional_metrics(t, c, (t.argmax(1) + 1) % 10)
    assert math.isnan(wrong["correct_agreement"]) and math.isfinite(wrong["incorrect_agreement"])


def test_vi_of_relabelling_is_zero():
    t, _, y = random_case(10, 300, 10)
    perm = np.random.default_rng(0).permutation(10)
    c = t[:, perm]                                      # argmax q is a bijection of argmax p
    got = functional_metrics(t, c, y)
    assert got["prediction_disagreement"] > 0.5
    assert got["variation_of_information"] == pytest.approx(0.0, abs=1e-12)
    # the Procrustes distance is invariant to a permutation of output columns too
    assert got["procrustes_distance"] == pytest.approx(0.0, abs=1e-10)


def test_vi_hand_case():
    # a = (0, 0, 1, 1), b = (0, 1, 0, 1): independent fair bits -> VI = 2 ln 2
    eye = torch.eye(2) * 5
    got = functional_metrics(eye[[0, 0, 1, 1]], eye[[0, 1, 0, 1]], torch.tensor([0, 0, 1, 1]))
    assert got["variation_of_information"] == pytest.approx(2 * math.log(2), rel=1e-12)


def test_procrustes_constant_outputs():
    t, c, y = random_case(11, 60, 10)
    const = np.tile(t[:1], (60, 1))
    assert functional_metrics(const, c, y)["procrustes_distance"] == 2.0
    assert functional_metrics(t, const, y)["procrustes_distance"] == 2.0
    assert functional_metrics(const, const, y)["procrustes_distance"] == 2.0


def test_shape_errors():
    with pytest.raises(ValueError):
        functional_metrics(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        functional_metrics(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_directions_cover_every_metric():
    t, c, y = random_case(12, 20, 10)
    assert set(functional_metrics(t, c, y)) <= set(METRIC_DIRECTIONS)
    for m in ("test_acc", "train_acc"):
        assert METRIC_DIRECTIONS[m] == "higher"
    for m in ("test_loss", "train_loss", *TRANSFER_METRICS):
        assert METRIC_DIRECTIONS[m] == "lower"
    assert set(METRIC_DIRECTIONS.values()) == {"lower", "higher"}
    assert TRANSFER_METRICS == ("activation_distance", "rank_disagreement", "prediction_disagreement", "js_divergence")


def test_rank_order_breaks_every_tie_by_the_lower_index_like_a_stable_sort():
    """The fast CPU ranking (numpy's sort, ties re-sorted) against Python's own stable sort, on
    rows with many ties (values drawn from 4 levels), rows of exact zeros, and tie-free rows."""
    from kdray.functional import rank_order

    g = torch.Generator().manual_seed(0)
    tied = torch.randint(0, 4, (300, 9), generator=g).to(torch.float64) / 4
    zeros = torch.zeros(5, 9, dtype=torch.float64)
    free = torch.rand(300, 9, generator=g, dtype=torch.float64)
    for p in (tied, zeros, free, torch.stack([tied[:5], free[:5]])):
        got = rank_order(p).reshape(-1, p.shape[-1])
        for row, order in zip(p.reshape(-1, p.shape[-1]).tolist(), got.tolist()):
            assert order == sorted(range(len(row)), key=lambda c: (-row[c], c))


@pytest.mark.parametrize("seed,n,k,max_elements", [(5, 203, 11, 40), (6, 97, 65, 65), (7, 50, 7, 1),
                                                   (8, 120, 300, 10 ** 6)])
def test_streamed_metrics_equal_the_full_tensor_computation(tmp_path, seed, n, k, max_elements):
    """functional_metrics_streamed (blocks of rows, from memory-mapped .npy files) equals the
    plain full-tensor computation and the per-sample reference to 1e-6, at block sizes down to one row."""
    from kdray.functional import STREAMED_METRICS, functional_metrics_streamed
    t, c, y = random_case(seed, n, k)
    t, c = t.astype(np.float32), c.astype(np.float32)
    c[:3] = t[:3]                                     # some exact agreement
    c[5, :] = c[5, 0]                                 # an all-tied row: ranks by the lower index
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "c.npy", c)
    got = functional_metrics_streamed(np.load(tmp_path / "t.npy", mmap_mode="r"),
                                      np.load(tmp_path / "c.npy", mmap_mode="r"), y, max_elements)
    full = functional_metrics(torch.tensor(t), torch.tensor(c), torch.tensor(y), chunk=10 ** 9)
    ref = reference(t, c, y)
    assert tuple(got) == STREAMED_METRICS
    for key in STREAMED_METRICS:
        np.testing.assert_allclose(got[key], full[key], rtol=1e-6, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-9, err_msg=key)
    with pytest.raises(ValueError, match="NaN"):
        functional_metrics_streamed(np.full((2, 3), np.nan), np.zeros((2, 3)), [0, 1])


def test_streamed_metrics_take_infinite_logits_as_the_full_computation():
    """+inf logits share a row's mass, an all -inf row is uniform, a -inf logit alone has p = 0."""
    from kdray.functional import STREAMED_METRICS, functional_metrics_streamed
    t, c, y = random_case(9, 30, 6)
    t[0, [1, 4]] = np.inf
    t[1] = -np.inf
    c[2, 3] = -np.inf
    c[3, 5] = np.inf
    got = functional_metrics_streamed(t, c, y, 7)
    full = functional_metrics(torch.tensor(t), torch.tensor(c), torch.tensor(y))
    for key in STREAMED_METRICS:
        np.testing.assert_allclose(got[key], full[key], rtol=1e-6, atol=1e-12, err_msg=key)
