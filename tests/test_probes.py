"""Behaviour probes (kdray/probes.py): declared in a sweep file, checked against hand-built contexts
and log-likelihoods, and tha_count as one instance of them with unchanged outputs and trial keys."""
import pytest
import torch

from kdray.data import load_dataset
from kdray.evals import EVALS, tha_count
from kdray.models import build_model
from kdray.probes import Probe, canonical, from_name, run_probe
from kdray.sweep import SweepError, parse_sweep

THA = {"name": "tha", "trigger": "the", "keep": 2, "continuations": {"tha": "a", "the": "e"}}


def tiny(bundle, seed=0):
    torch.manual_seed(seed)
    return build_model("nano_gpt", bundle.num_classes, bundle.input_shape, n_layer=1, n_embd=32, n_head=2,
                       dropout=0.0).eval()


def old_tha_top1(model, bundle):
    """tha_count's contexts and greedy next characters as it computed them before probes existed."""
    from kdray.data.tinyshakespeare import the_contexts
    contexts, _ = the_contexts(bundle.extras["test_text"], bundle.block_size, bundle.vocab,
                               prefix=bundle.extras.get("test_prefix"))
    with torch.inference_mode():
        return model(contexts)[:, -1, :].argmax(-1)


def test_tha_count_is_the_probe_and_counts_what_it_counted_before(real_data):
    bundle = load_dataset("tinyshakespeare", None, block_size=32, max_chars=30000)
    for seed in range(3):
        model = tiny(bundle, seed)
        top1 = old_tha_top1(model, bundle)
        a, e = bundle.vocab.index("a"), bundle.vocab.index("e")
        assert tha_count(model, bundle, "cpu") == {"tha_count_a": float((top1 == a).sum()),
                                                   "tha_count_e": float((top1 == e).sum()),
                                                   "tha_contexts": float(len(top1))}
        # every letter's top-1 count, so the comparison is not 0 == 0 for an untrained model
        letters = {c: c for c in "abcdefghijklmnopqrstuvwxyz"}
        r = run_probe(Probe("l", "the", tuple(letters.items()), keep=2), model, bundle, "cpu")
        counts = {c: r[f"probe_l_{c}_top1"] for c in letters}
        assert counts == {c: float((top1 == bundle.vocab.index(c)).sum()) for c in letters}
        assert sum(counts.values()) > 0


def test_the_likelihood_count_matches_log_probabilities_computed_by_hand(real_data):
    bundle = load_dataset("tinyshakespeare", None, block_size=32, max_chars=30000)
    model = tiny(bundle, 1)
    probe = Probe("x", "the", (("tha", "tha"), ("the", "the"), ("thy", "thy")), keep=0)
    r = run_probe(probe, model, bundle, "cpu")
    text, prefix = bundle.extras["test_text"], bundle.extras["test_prefix"]
    full = prefix + text
    wins = {"tha": 0, "the": 0, "thy": 0}
    start = 0
    n = 0
    while (i := text.find("the", start)) >= 0:
        start, n = i + 1, n + 1
        ctx = full[:len(prefix) + i]
        best = None
        for cont in ("tha", "the", "thy"):
            s = ctx + cont[:-1]
            window = s[-32:].rjust(32, "\n")
            x = torch.tensor([[bundle.vocab.index(ch) for ch in window]])
            with torch.inference_mode():
                logp = torch.log_softmax(model(x)[0].double(), -1)
            score = sum(float(logp[32 - 3 + k, bundle.vocab.index(cont[k])]) for k in range(3))
            if best is None or score > best[0]:
                best = (score, cont)
        wins[best[1]] += 1
    assert n > 5 and r["probe_x_contexts"] == n
    assert {k: r[f"probe_x_{k}"] for k in wins} == {k: float(v) for k, v in wins.items()}


def _sweep(tmp_path, evals):
    setup = {"name": "p", "dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 20000}},
             "teacher": {"arch": "nano_gpt", "args": {"n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.0}},
             "recipe": {"iterations": 4, "log_every": 2, "batch_size": 8}, "teacher_seeds": [0],
             "student_seeds": [10], "evals": evals,
             "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None}}
    return parse_sweep({"name": "probes", "storage": str(tmp_path), "setups": [setup]}, "s.yaml")


def test_a_declared_probe_runs_in_trials_and_enters_the_trial_key(tmp_path, real_data):
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store
    sw = _sweep(tmp_path, ["tha_count", {"probe": THA}])
    name = sw.setups[0].evals[1]
    assert name == canonical(THA) and from_name(name) == Probe("tha", "the", (("tha", "a"), ("the", "e")), 2)
    plan = build_plan(sw)
    other = build_plan(_sweep(tmp_path, ["tha_count", {"probe": {**THA, "keep": 1}}]))
    plain = build_plan(_sweep(tmp_path, ["tha_count"]))
    keys = [p.teachers[0].trial_key for p in (plan, other, plain)]
    assert len(set(keys)) == 3
    store = Store(sw.storage, sw.name)
    out = run_trial(plan.teachers[0], store)
    assert out["probe_tha_tha_top1"] == out["tha_count_a"] and out["probe_tha_the_top1"] == out["tha_count_e"]
    assert out["probe_tha_tha"] + out["probe_tha_the"] == out["probe_tha_contexts"] == out["tha_contexts"]
    # a worker rebuilds the probe from the spec alone
    from kdray.spec import TrialSpec
    again = TrialSpec.from_dict(plan.students[0].to_dict())
    assert again.evals == plan.students[0].evals and EVALS.get(again.evals[1]) is not None


@pytest.mark.parametrize("probe, message", [
    ({**THA, "trigger": ""}, "probe.trigger"),
    ({**THA, "keep": 5}, "probe.keep: a whole number in [0, 3]"),
    ({**THA, "continuations": {"tha": "a"}}, "probe.continuations: a mapping of at least two"),
    ({**THA, "colour": 1}, "probe: unknown key 'colour'"),
    ({**THA, "name": "t h"}, "probe.name"),
])
def test_a_bad_probe_is_one_line_naming_its_field(tmp_path, real_data, probe, message):
    with pytest.raises(SweepError) as e:
        _sweep(tmp_path, [{"probe": probe}])
    assert "s.yaml: setups[0].evals: item 0: " + message in str(e.value) and "\n" not in str(e.value), str(e.value)
