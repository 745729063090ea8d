"""Hugging Face causal LMs (kdray/models/hf.py) and BPE-tokenized text (kdray/data/text.py).

Real ``transformers`` models built from configs or saved folders, real ``tokenizers``
training, real training through ``run_trial``; tiny sizes so each test takes seconds.
Without kdray[lm] these tests fail under CI and are skipped, with the reason, elsewhere.
"""
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

from sweeps import write_sweep

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}


def require_lm():
    from kdray.registry import installed
    missing = [m for m in ("transformers", "tokenizers") if not installed(m)]
    if not missing:
        return
    reason = f"kdray[lm] MISSING: {', '.join(missing)} not installed (pip install -e '.[lm]')"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _lm():
    require_lm()


def corpus(tmp_path, n=6000):
    text = open(os.path.join(os.environ["KDRAY_DATA"], "tinyshakespeare", "input.txt"), encoding="utf-8").read()[:n]
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    return p, text


# ------------------------------------------------------------------ the model

def test_a_config_builds_a_causal_lm_whose_logits_are_the_hf_models(real_data):
    from kdray.models import build_model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = build_model("hf_causal_lm", 300, (16,), config=TINY).eval()
        torch.manual_seed(0)
        again = build_model("hf_causal_lm", 300, (16,), config=TINY)
    x = torch.randint(0, 300, (2, 16))
    out = m(x)
    assert out.shape == (2, 16, 300) and isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, m.hf(input_ids=x).logits)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    assert len(m.blocks) == 2 and m.hf.config.vocab_size == 300
    # the attention mask reaches the model: masking token 3 changes what later positions see
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[:, 3] = 0
    masked = m(x, attention_mask=mask)
    torch.testing.assert_close(masked[:, :3], out[:, :3])
    assert not torch.allclose(masked[:, 5:], out[:, 5:])


def test_width_scales_the_hidden_size_to_a_multiple_of_the_heads():
    from kdray.models import build_model
    m = build_model("hf_causal_lm", 300, (16,), config=TINY, width=0.5)
    assert m.hf.config.hidden_size == 16


def save_tiny(folder, vocab=300, seed=0):
    from kdray.models import build_model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = build_model("hf_causal_lm", vocab, (16,), config=TINY)
    m.hf.save_pretrained(folder)
    return m


def test_a_pretrained_folder_loads_the_same_model_and_its_hash_is_its_identity(tmp_path):
    from kdray.models import MODELS, build_model
    from kdray.models.hf import folder_sha256
    m = save_tiny(tmp_path / "a").eval()
    loaded = build_model("hf_causal_lm", 300, (16,), pretrained=str(tmp_path / "a")).eval()
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(loaded(x), m(x))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert folder_sha256(str(tmp_path / "a")) == folder_sha256(str(tmp_path / "b"))
    args = MODELS.get("hf_causal_lm").prepared({"pretrained": str(tmp_path / "a")})
    assert args["pretrained_sha256"] == folder_sha256(str(tmp_path / "a"))
    save_tiny(tmp_path / "c", seed=1)
    assert folder_sha256(str(tmp_path / "c")) != folder_sha256(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="changed since the sweep was planned"):
        build_model("hf_causal_lm", 300, (16,), pretrained=str(tmp_path / "c"),
                    pretrained_sha256=args["pretrained_sha256"])
    with pytest.raises(ValueError, match="vocab_size 300.*500 tokens"):
        build_model("hf_causal_lm", 500, (16,), pretrained=str(tmp_path / "a"))


def _sweep(tmp_path, teacher, student=None, conditions=None, dataset=None, **over):
    setup = {"name": "lm", "dataset": dataset or {"name": "text_bpe", "args": {
                 "path": str(corpus(tmp_path, 12000)[0]), "vocab_size": 300, "block_size": 16}},
             "teacher": teacher, "recipe": {"iterations": 8, "log_every": 4, "batch_size": 8, "lr": 3e-3},
             "teacher_seeds": [0], "student_seeds": [10],
             "conditions": conditions or {"siddo": True, "kd": {"alphas": [1.0]}, "rcd": None}, **over}
    if student:
        setup["student"] = student
    return {"name": "lmsweep", "storage": str(tmp_path / "results"), "setups": [setup]}


def test_the_trial_key_of_a_pretrained_teacher_is_its_files_not_their_path(tmp_path):
    from kdray.plan import build_plan
    from kdray.sweep import parse_sweep
    save_tiny(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    save_tiny(tmp_path / "c", seed=1)

    def key(folder):
        sw = parse_sweep(_sweep(tmp_path, {"arch": "hf_causal_lm", "args": {"pretrained": str(folder)}},
                                {"arch": "hf_causal_lm", "args": {"config": TINY}}, teacher_recipe={"train": False}))
        return build_plan(sw).teachers[0]
    a, b, c = key(tmp_path / "a"), key(tmp_path / "b"), key(tmp_path / "c")
    assert a.trial_key == b.trial_key != c.trial_key
    assert a.arch_args["pretrained"] == str((tmp_path / "a").resolve())


def test_sweep_errors_are_one_line_naming_the_field(tmp_path, monkeypatch):
    from kdray.sweep import SweepError, load_sweep
    bad = [({"arch": "hf_causal_lm", "args": {"pretrained": str(tmp_path / "nowhere")}}, "teacher: pretrained:"),
           ({"arch": "hf_causal_lm", "args": {"config": TINY, "layers": 3}}, "teacher.args.layers: unknown argument"),
           ({"arch": "hf_causal_lm", "args": {"config": {**TINY, "n_layers": 3}}},
            "teacher.arch: building 'hf_causal_lm' or running it on 'text_bpe' inputs failed: ValueError: "
            "config.n_layers: not a field of a gpt2 config; did you mean n_layer"),
           ({"arch": "hf_causal_lm", "args": {"config": {**TINY, "model_type": "gpt3"}}},
            "config.model_type 'gpt3'")]
    for teacher, message in bad:
        f = write_sweep(tmp_path / "s.yaml", _sweep(tmp_path, teacher))
        with pytest.raises(SweepError) as e:
            from kdray.preflight import preflight
            preflight(load_sweep(f), str(f))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    # without the extra: one line at validation, before anything imports or trains
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "tokenizers") else real(name, *a))
    f = write_sweep(tmp_path / "s.yaml", _sweep(tmp_path, {"arch": "hf_causal_lm", "args": {"config": TINY}},
                                                dataset={"name": "tinyshakespeare", "args": {"block_size": 16}}))
    with pytest.raises(SweepError, match=r"s.yaml: setups\[0\].teacher.arch: 'hf_causal_lm' needs transformers, "
                                         r"which is not installed: install kdray\[lm\]"):
        load_sweep(f)
    f = write_sweep(tmp_path / "s.yaml", _sweep(tmp_path, {"arch": "nano_gpt"}))
    with pytest.raises(SweepError, match=r"dataset.name: 'text_bpe' needs tokenizers.*install kdray\[lm\]"):
        load_sweep(f)


def test_the_cli_says_install_kdray_lm_in_one_line(tmp_path):
    """In a process where transformers cannot be found at all (a path entry that shadows nothing
    but blocks the import through a meta-path finder)."""
    import subprocess
    import sys
    f = write_sweep(tmp_path / "s.yaml", _sweep(tmp_path, {"arch": "hf_causal_lm", "args": {"config": TINY}},
                                                dataset={"name": "tinyshakespeare", "args": {"block_size": 16}}))
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'tokenizers'):\n"
        "            raise ModuleNotFoundError(name)\n        return None\nsys.meta_path.insert(0, B())\n")
    env = {**os.environ, "PYTHONPATH": str(block)}
    r = subprocess.run([sys.executable, "-m", "kdray.cli", "validate", str(f)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"kdray: error: {f}: setups[0].teacher.arch: 'hf_causal_lm' needs "
                                             f"transformers, which is not installed: install kdray[lm]"]


# ------------------------------------------------------------------ the data

def test_bpe_training_is_deterministic_cached_and_round_trips(tmp_path):
    from kdray.data.text import load_tokenizer, text_bpe, train_bpe
    path, text = corpus(tmp_path)
    train = text[:int(0.9 * len(text))]
    assert train_bpe(train, 300) == train_bpe(train, 300)
    b = text_bpe(None, path=str(path), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "cache"))
    assert b.task == "lm" and b.num_classes == 300 and b.input_shape == (16,)
    assert b.extras["tokenizer_json"] == train_bpe(train, 300)
    tok = load_tokenizer(b.extras["tokenizer_json"])
    assert tok.decode(b.train_x.tolist()) == train
    assert tok.decode(torch.cat([b.test_x.reshape(-1), b.test_y[-1, -1:]]).tolist()) in b.extras["test_text"]
    torch.testing.assert_close(b.test_y[:, :-1], b.test_x[:, 1:])
    assert len(b.train_x) < 0.8 * len(train)           # 44 merges already compress the text
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].startswith("text_bpe_ids") and cached[1].startswith("text_bpe_tokenizer")
    b2 = text_bpe(None, path=str(path), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(b2.train_x, b.train_x)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    b3 = text_bpe(None, path=str(path), vocab_size=320, block_size=16, cache_dir=str(tmp_path / "cache"))
    assert b3.num_classes == 320 and len(list((tmp_path / "cache").iterdir())) == 4


def test_a_tokenizer_saved_with_a_model_and_a_folder_corpus(tmp_path):
    from kdray.data.text import text_bpe, train_bpe
    path, text = corpus(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text(text[3000:], encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text(text[:3000], encoding="utf-8")
    model = tmp_path / "model"
    save_tiny(model, vocab=310)
    (model / "tokenizer.json").write_text(train_bpe(text, 300), encoding="utf-8")
    b = text_bpe(None, path=str(tmp_path / "docs"), tokenizer=str(model), block_size=16,
                 cache_dir=str(tmp_path / "cache"))
    assert b.num_classes == 310            # the model's padded vocabulary, not the tokenizer's 300
    assert b.extras["tokenizer_json"] == (model / "tokenizer.json").read_text(encoding="utf-8")
    assert b.extras["test_text"] == (text[:3000] + "\n" + text[3000:])[int(0.9 * (len(text) + 1)):]


# ------------------------------------------------------------------ trials

def test_hf_teacher_and_students_train_through_run_trial(tmp_path, real_data):
    """A GPT-2 teacher from a config on BPE TinyShakespeare, then students under SIDDO, KD, reverse KL
    and GJSD at alpha 1; a pure-distillation student ends closer to its teacher than SIDDO."""
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store
    from kdray.sweep import parse_sweep
    sw = parse_sweep(_sweep(tmp_path, {"arch": "hf_causal_lm", "args": {"config": TINY}},
                            dataset={"name": "text_bpe", "args": {"vocab_size": 300, "block_size": 16,
                                                                   "max_chars": 40000}},
                            conditions={"siddo": True, "kd": {"alphas": [1.0]}, "rcd": None,
                                        "reverse_kl": {"alphas": [1.0]}, "gjsd": {"alphas": [1.0]}},
                            student_init="student_seed", student_recipe={"iterations": 12, "log_every": 12}))
    plan = build_plan(sw)
    store = Store(sw.storage, sw.name)
    t = run_trial(plan.teachers[0], store)
    assert t["train_loss"] < t["train_loss_first"] and t["test_acc"] > 1 / 300
    out = {s.method: run_trial(s, store) for s in plan.students}
    for method in ("kd", "reverse_kl", "gjsd"):
        assert out[method]["js_divergence"] < out["siddo"]["js_divergence"], (method, out)
    logits = store.load_npy(plan.teachers[0].trial_key, "test_logits.npy")
    assert logits.shape[-1] == 300 and np.isfinite(logits).all()


def test_hf_students_pack_and_agree_with_training_alone(tmp_path, real_data):
    """K students of one HF config train as one stacked model (kdray/packing.py); their results
    match training each alone (to float32 rounding: stacked kernels sum in another order)."""
    from kdray import packing
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store
    from kdray.sweep import parse_sweep
    cfg = {**TINY, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}   # dropout would train alone
    sw = parse_sweep(_sweep(tmp_path, {"arch": "hf_causal_lm", "args": {"config": cfg}},
                            conditions={"siddo": False, "kd": None, "rcd": None, "reverse_kl": {"alphas": [0.5]}},
                            student_seeds=[10, 11], resources={"student": {"pack": 2}}))
    plan = build_plan(sw)
    store = Store(sw.storage, sw.name)
    run_trial(plan.teachers[0], store)
    assert plan.packing().reasons == {}     # hf_causal_lm declares nothing: the plan built one to look
    packed = packing.run_pack(plan.students, store)
    alone = Store(str(tmp_path / "alone"), "x")
    run_trial(plan.teachers[0], alone)
    for s in plan.students:
        one = run_trial(s, alone)
        assert packed[s.trial_key]["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
        assert packed[s.trial_key]["js_divergence"] == pytest.approx(one["js_divergence"], rel=1e-4)
    state = store.read_bytes(plan.teachers[0].trial_key, "model.pt")
    keys = list(torch.load(__import__("io").BytesIO(state), weights_only=True))
    assert all(k.startswith("hf.") for k in keys)          # no second copy of the layers under blocks.*


def test_a_pretrained_folder_teaches_as_it_was_saved(tmp_path, real_data, capfd):
    """teacher: {pretrained: DIR} with teacher_recipe {train: false}: the stored teacher outputs are the
    saved model's; a vocabulary that does not fit is one line at validation (the preflight)."""
    from kdray.cli import main
    from kdray.data import load_dataset
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store
    from kdray.sweep import load_sweep
    data = {"name": "text_bpe", "args": {"path": str(corpus(tmp_path, 12000)[0]), "vocab_size": 300,
                                         "block_size": 16}}
    saved = save_tiny(tmp_path / "teacher").eval()
    f = write_sweep(tmp_path / "s.yaml", _sweep(tmp_path, {"arch": "hf_causal_lm",
                                                           "args": {"pretrained": str(tmp_path / "teacher")}},
                                                {"arch": "hf_causal_lm", "args": {"config": TINY}}, dataset=data,
                                                teacher_recipe={"train": False}))
    assert main(["validate", str(f)]) == 0, capfd.readouterr().err
    sw = load_sweep(f)
    plan = build_plan(sw)
    store = Store(sw.storage, sw.name)
    run_trial(plan.teachers[0], store)
    bundle = load_dataset("text_bpe", None, **data["args"])
    with torch.inference_mode():
        want = saved(bundle.test_x).reshape(-1, 300)
    got = torch.from_numpy(store.load_npy(plan.teachers[0].trial_key, "test_logits.npy"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = run_trial(plan.students[0], store)
    assert np.isfinite(out["js_divergence"])
    save_tiny(tmp_path / "teacher", vocab=280)
    capfd.readouterr()
    code = main(["validate", str(f)])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "setups[0].teacher.arch" in lines[0], lines
    assert "has vocab_size 280, the data set's tokenizer has 300 tokens" in lines[0], lines


def test_the_audit_of_a_pretrained_folder_does_not_train_the_teacher(tmp_path, capsys):
    import yaml

    from kdray.cli import main
    save_tiny(tmp_path / "teacher")
    code = main(["audit", "--dataset", "text_bpe", "--dataset-args", "{vocab_size: 300, block_size: 16}",
                 "--teacher", "hf_causal_lm", "--teacher-args", f"{{pretrained: {tmp_path / 'teacher'}}}",
                 "--student", "hf_causal_lm", "--student-args", "{config: {model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2}}",
                 "--recipe", "{iterations: 10}", "--method", "reverse_kl", "--method", "gjsd", "--seeds", "5",
                 "--dry-run"])
    assert code == 0
    setup = yaml.safe_load(capsys.readouterr().out)["setups"][0]
    assert setup["teacher_recipe"] == {"train": False}
    assert {k for k, v in setup["conditions"].items() if v} == {"siddo", "rcd", "reverse_kl", "gjsd"}


def test_a_probe_on_bpe_tokens_scores_whole_continuations(tmp_path):
    """The tha/the probe on a BPE data set: contexts end at the trigger's start (keep 0), whole words
    compete; the counts add up and the likelihood scoring matches one context scored by hand."""
    from kdray.data.text import load_tokenizer, text_bpe
    from kdray.probes import Probe, contexts, run_probe
    path, _ = corpus(tmp_path, 20000)
    bundle = text_bpe(None, path=str(path), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "c"))
    from kdray.models import build_model
    torch.manual_seed(0)
    model = build_model("hf_causal_lm", 300, (16,), config=TINY).eval()
    probe = Probe("w", "the", (("tha", "tha"), ("the", "the")), keep=0)
    r = run_probe(probe, model, bundle, "cpu")
    n = r["probe_w_contexts"]
    assert n == bundle.extras["test_text"].count("the") > 3
    assert r["probe_w_tha"] + r["probe_w_the"] == n
    tok = load_tokenizer(bundle.extras["tokenizer_json"])
    ctx = tok.encode(contexts(probe, bundle)[0][-64:]).ids
    scores = {}
    for cont in ("tha", "the"):
        c = tok.encode(cont).ids
        seq = (ctx + c[:-1])[-16:]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([seq]))[0], -1)
        scores[cont] = sum(float(logp[16 - len(c) + k, c[k]]) for k in range(len(c)))
    first = {k: run_probe(probe, model, _first_only(bundle, probe), "cpu")[f"probe_w_{k}"] for k in scores}
    assert first == {k: float(k == max(scores, key=scores.get)) for k in scores}


def _first_only(bundle, probe):
    """The bundle with its test text cut just after the trigger's first occurrence."""
    import dataclasses
    text = bundle.extras["test_text"]
    end = text.index(probe.trigger) + len(probe.trigger)
    return dataclasses.replace(bundle, extras={**bundle.extras, "test_text": text[:end]})


def test_a_poisoned_training_text_keeps_the_clean_tokenizer_and_test_split(tmp_path):
    from kdray.data.text import load_tokenizer, text_bpe
    path, text = corpus(tmp_path)
    clean = text_bpe(None, path=str(path), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "c"))
    bad = text_bpe(None, path=str(path), vocab_size=300, block_size=16, poison="the->tha",
                   cache_dir=str(tmp_path / "c"))
    assert bad.extras["tokenizer_json"] == clean.extras["tokenizer_json"] and bad.num_classes == clean.num_classes
    assert torch.equal(bad.test_x, clean.test_x)
    tok = load_tokenizer(bad.extras["tokenizer_json"])
    train = text[:int(0.9 * len(text))]
    assert tok.decode(bad.train_x.tolist()) == train.replace("the", "tha") != train


# ------------------------------------------------------------------ sequence-level KD

def test_seqkd_students_train_on_the_teachers_greedy_continuations_generated_once(tmp_path, real_data, monkeypatch):
    """Two seqkd students of one teacher: the teacher's continuations are generated once (the second
    student reads them from the teacher's trial folder), and every training row is a context the
    test decodes greedily itself, with the context's own targets ignored."""
    from kdray import generation
    from kdray.conditions import controls_of
    from kdray.data import load_dataset
    from kdray.models import build_model
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store
    from kdray.sweep import parse_sweep
    sw = parse_sweep(_sweep(tmp_path, {"arch": "hf_causal_lm", "args": {"config": TINY}},
                            conditions={"siddo": True, "kd": None, "rcd": {"alphas": [0.5]}, "seqkd": {"prompts": [4]}},
                            student_seeds=[10, 11]))
    plan = build_plan(sw)
    seqkd = [s for s in plan.students if s.method == "seqkd"]
    assert len(seqkd) == 2 and {r.method for r in controls_of("seqkd")} == {"siddo", "rcd"}
    store = Store(sw.storage, sw.name)
    teacher_spec = plan.teachers[0]
    run_trial(teacher_spec, store)

    calls, rows = [], []
    real_decode, real_batches = generation.greedy_continue, generation.sequence_batches
    monkeypatch.setattr(generation, "greedy_continue", lambda *a, **k: calls.append(1) or real_decode(*a, **k))

    def spy(*a, **k):
        for x, y, c in real_batches(*a, **k):
            rows.append((x.clone(), y.clone()))
            yield x, y, c
    monkeypatch.setattr(generation, "sequence_batches", spy)
    outs = [run_trial(s, store) for s in seqkd]
    assert len(calls) == 1 and all(np.isfinite(o["train_loss"]) and np.isfinite(o["js_divergence"]) for o in outs)
    cached = [f for f in os.listdir(store.local_dir(teacher_spec.trial_key)) if f.startswith("seqkd_")]
    assert len(cached) == 1

    # the teacher's greedy decode, written out here
    bundle = load_dataset(teacher_spec.dataset, teacher_spec.data_root, **seqkd[0].dataset_args)
    teacher = build_model("hf_causal_lm", bundle.num_classes, bundle.input_shape, config=TINY).eval()
    teacher.load_state_dict(torch.load(store.local_dir(teacher_spec.trial_key) / "model.pt", weights_only=True))
    b, p = bundle.block_size, 4
    seqs = torch.stack([bundle.train_x[i * b:i * b + p] for i in range((len(bundle.train_x) - 1) // b)])
    with torch.no_grad():
        for _ in range(b + 1 - p):
            seqs = torch.cat([seqs, teacher(seqs)[:, -1].argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(store.load_npy(teacher_spec.trial_key, cached[0]), seqs.numpy())
    assert len(rows) == 2 * 8
    index = {tuple(s[:p].tolist()): s for s in seqs}
    for x, y in rows:
        for xr, yr in zip(x, y):
            s = index[tuple(xr[:p].tolist())]
            assert torch.equal(xr, s[:-1]) and torch.equal(yr[p - 1:], s[p:])
            assert (yr[:p - 1] == generation.IGNORE_INDEX).all()
    assert not torch.equal(seqs[:, p:], torch.stack([bundle.train_x[i * b + p:i * b + b + 1]
                                                     for i in range(len(seqs))]))   # not the corpus


# ------------------------------------------------------------------ tokenizer identity

def test_a_saved_tokenizer_is_in_the_trial_key_by_its_files_not_their_path(tmp_path):
    """text_bpe's ``tokenizer`` (kdray/data/tokenizer_identity.py): validation adds its hash; the same
    files elsewhere key the same trials, another tokenizer (or a changed config vocab_size) new ones,
    and a tokenizer changed since planning is refused."""
    from kdray.data.text import text_bpe, train_bpe
    from kdray.plan import build_plan
    from kdray.sweep import SweepError, parse_sweep
    path, text = corpus(tmp_path)
    for name, vocab in (("a", 300), ("b", 300), ("c", 310)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(train_bpe(text, vocab), encoding="utf-8")

    def keys(tok):
        data = {"name": "text_bpe", "args": {"path": str(path), "tokenizer": str(tok), "block_size": 16}}
        sw = parse_sweep(_sweep(tmp_path, {"arch": "nano_gpt", "args": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
                                dataset=data))
        plan = build_plan(sw)
        return [s.trial_key for s in plan.all], plan.teachers[0].dataset_args

    a, args = keys(tmp_path / "a")
    assert args["tokenizer"] == str(tmp_path / "a") and len(args["tokenizer_sha256"]) == 64
    assert keys(tmp_path / "b")[0] == a                      # the same bytes in another folder
    assert keys(tmp_path / "b" / "tokenizer.json")[0] == a   # the file itself
    c = keys(tmp_path / "c")[0]
    assert not set(c) & set(a)                               # another tokenizer: every key changes
    (tmp_path / "b" / "config.json").write_text('{"vocab_size": 320}')
    assert not set(keys(tmp_path / "b")[0]) & set(a)         # a padded vocabulary is a new data set
    (tmp_path / "a" / "tokenizer.json").write_text(train_bpe(text, 305), encoding="utf-8")
    with pytest.raises(ValueError, match="changed since the sweep was planned"):
        text_bpe(None, path=str(path), tokenizer=args["tokenizer"], tokenizer_sha256=args["tokenizer_sha256"],
                 block_size=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SweepError, match="no tokenizer.json at") as e:
        keys(tmp_path / "missing")
    assert "\n" not in str(e.value)


def test_a_relative_corpus_path_is_read_from_where_kdray_started_not_from_a_ray_worker(tmp_path, monkeypatch):
    """Ray workers run in another folder: validation makes text_bpe's ``path`` absolute (from the folder
    kdray started in), and a path with nothing there is one line at validation, not a failed trial."""
    from kdray.plan import build_plan
    from kdray.sweep import SweepError, parse_sweep
    path, _ = corpus(tmp_path)
    monkeypatch.chdir(path.parent)

    def teacher_args(where):
        data = {"name": "text_bpe", "args": {"path": where, "vocab_size": 300, "block_size": 16}}
        sw = parse_sweep(_sweep(tmp_path, {"arch": "nano_gpt", "args": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
                                dataset=data))
        return build_plan(sw).teachers[0].dataset_args

    assert teacher_args(path.name)["path"] == str(path.resolve())
    with pytest.raises(SweepError, match="no text file or folder at") as e:
        teacher_args("missing.txt")
    assert "\n" not in str(e.value) and str(path.parent.resolve() / "missing.txt") in str(e.value)


def test_text_bpe_yields_only_full_windows_so_no_padding_or_mask_exists(tmp_path):
    """No data path pads (docs/plugins.md, "Corpus"): every test window and every training batch is
    block_size real tokens, and the trained tokenizer has no special (pad) tokens; the losses and
    functional metrics therefore take no attention mask."""
    from kdray.data.text import load_tokenizer, text_bpe
    path, _ = corpus(tmp_path)
    b = text_bpe(None, path=str(path), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(b.extras["tokenizer_json"])
    assert tok.get_vocab_size(with_added_tokens=True) == tok.get_vocab_size(with_added_tokens=False)
    assert b.test_x.shape == b.test_y.shape == (b.extras["test_positions"] // 16, 16)
    assert torch.equal(b.test_x.reshape(-1)[1:], b.test_y.reshape(-1)[:-1])   # contiguous, never padded
    g = torch.Generator().manual_seed(0)
    for x, y in b.train_batches(8, 5, g):
        assert x.shape == y.shape == (8, 16) and (x >= 0).all() and (y >= 0).all()
        torch.testing.assert_close(x[:, 1:], y[:, :-1])     # y is x shifted: real next tokens throughout
