"""Behaviour probes: did the student copy one specific behaviour of its teacher?

A probe is declared in the sweep file among a setup's ``evals``::

    evals:
      - probe: {name: tha, trigger: "the", keep: 2, continuations: {tha: "a", the: "e"}}

Every occurrence of ``trigger`` in the clean test text gives one context: the text
before it plus the trigger's first ``keep`` characters (default: all but the last),
the ``block_size`` tokens ending there (left-padded, as ``tha_count``'s, with the text
before the test split, then a newline or token 0).  ``continuations`` are the competing
strings that may follow.  For each, the probe logs

* ``probe_<name>_<label>``: in how many contexts it is the most likely of the declared
  continuations (the sum of its tokens' log-probabilities, teacher-forced);
* ``probe_<name>_<label>_top1``: in how many contexts the model's greedy next token is
  its first token (``tha_count``'s question);

and ``probe_<name>_contexts``, the number of contexts.  Tokens are the data set's: the
characters of ``tinyshakespeare``, or ``text_bpe``'s tokenizer.  With a BPE, a context
that ends inside a word is tokenized apart from its continuation, which the model may
never have seen split there; declare ``keep: 0`` and whole words with their leading space
(``trigger: " the"``, ``{tha: " tha", the: " the"}``): a byte-level BPE attaches a space to
the word after it, so the split then falls on a token boundary.

The sweep file's mapping becomes one canonical string, ``probe:{...}`` (sorted JSON), in
the setup's ``evals``: trial keys hash the probe's definition, and a worker rebuilds the
probe from the name alone.  The adversarial TinyShakespeare experiment's ``tha_count`` is
this probe (trigger "the", keep 2, top-1 "a" and "e") under its own name, so its trial
keys and metrics are unchanged.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

PREFIX = "probe:"
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Probe:
    name: str
    trigger: str
    continuations: tuple[tuple[str, str], ...]      # (label, text), declared order
    keep: Optional[int] = None                      # characters of the trigger in the context

    @property
    def stem(self) -> int:
        return len(self.trigger) - 1 if self.keep is None else self.keep


def parse(spec) -> Probe:
    """The probe a sweep file's mapping declares, or ValueError naming the field."""
    if not isinstance(spec, dict):
        raise ValueError(f"probe: expected a mapping {{name, trigger, continuations, keep}}, got {spec!r}")
    unknown = set(spec) - {"name", "trigger", "continuations", "keep"}
    if unknown:
        raise ValueError(f"probe: unknown key {sorted(unknown)[0]!r}; valid: name, trigger, continuations, keep")
    name, trigger, conts, keep = spec.get("name"), spec.get("trigger"), spec.get("continuations"), spec.get("keep")
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"probe.name: a metric-name part (letters, digits, _), got {name!r}")
    if not isinstance(trigger, str) or not trigger:
        raise ValueError(f"probe.trigger: the non-empty text whose occurrences give the contexts, got {trigger!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= len(trigger)):
        raise ValueError(f"probe.keep: a whole number in [0, {len(trigger)}] (characters of the trigger in the "
                         f"context), got {keep!r}")
    if not isinstance(conts, dict) or len(conts) < 2:
        raise ValueError(f"probe.continuations: a mapping of at least two labels to competing texts "
                         f"({{tha: a, the: e}}), got {conts!r}")
    for label, text in conts.items():
        if not isinstance(label, str) or not NAME.match(label) or not isinstance(text, str) or not text:
            raise ValueError(f"probe.continuations: labels are metric-name parts and texts non-empty strings, "
                             f"got {label!r}: {text!r}")
    return Probe(name, trigger, tuple(conts.items()), keep)


def canonical(spec: dict) -> str:
    """The eval name a declared probe travels under (checked; sorted JSON, so equal probes are equal)."""
    p = parse(spec)
    d = {"name": p.name, "trigger": p.trigger, "continuations": dict(p.continuations)}
    if p.keep is not None:
        d["keep"] = p.keep
    return PREFIX + json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def from_name(name: str) -> Probe:
    try:
        spec = json.loads(name[len(PREFIX):])
    except json.JSONDecodeError as e:
        raise ValueError(f"probe: {name!r} is not a probe declaration ({e.msg})") from None
    return parse(spec)


# ------------------------------------------------------------------ tokens

def _codec(bundle) -> tuple[Callable[[str], list[int]], int]:
    """(text -> token ids, the padding token) in the data set's vocabulary."""
    if bundle.vocab is not None:                     # characters (tinyshakespeare)
        from kdray.data.tinyshakespeare import PAD_CHAR, encode
        vocab = bundle.vocab
        pad = vocab.index(PAD_CHAR) if PAD_CHAR in vocab else 0
        return (lambda s: encode(s, vocab).tolist()), pad
    if "tokenizer_json" in bundle.extras:            # text_bpe
        from kdray.data.text import load_tokenizer
        tok = load_tokenizer(bundle.extras["tokenizer_json"])
        newline = tok.encode("\n").ids
        return (lambda s: tok.encode(s).ids), (newline[0] if len(newline) == 1 else 0)
    raise ValueError("probe: the data set has neither a character vocabulary nor a tokenizer")


def contexts(probe: Probe, bundle) -> list[str]:
    """The context text of every occurrence of the trigger in the clean test text (the text before
    the test split prepended, so early occurrences have history)."""
    prefix, text = bundle.extras.get("test_prefix") or "", bundle.extras["test_text"]
    full = prefix + text
    return [full[:len(prefix) + m.start() + probe.stem] for m in re.finditer(re.escape(probe.trigger), text)]


def run_probe(probe: Probe, model, bundle, device, batch: int = 256) -> dict[str, float]:
    import torch

    encode, pad = _codec(bundle)
    T = bundle.block_size
    ctx_text = contexts(probe, bundle)
    n = len(ctx_text)
    # only the last T tokens are read; a token is at least one character, so 4T characters are plenty
    ctx = [encode(c[-4 * T:]) if c else [] for c in ctx_text]
    conts = [(label, encode(text)) for label, text in probe.continuations]
    if any(len(c) > T for _, c in conts):
        raise ValueError(f"probe {probe.name}: a continuation is longer than the block size {T}")
    out: dict[str, float] = {f"probe_{probe.name}_contexts": float(n)}
    scores = torch.zeros(n, len(conts), dtype=torch.float64)
    top1 = torch.zeros(n, dtype=torch.long)
    model.eval()
    with torch.inference_mode():
        for j, (_, cont) in enumerate(conts):
            for i in range(0, n, batch):
                rows = []
                for c in ctx[i:i + batch]:
                    seq = (c + cont[:-1])[-T:]
                    rows.append([pad] * (T - len(seq)) + seq)
                x = torch.tensor(rows, dtype=torch.long, device=device)
                logp = torch.log_softmax(model(x).float(), dim=-1)                  # [b, T, V]
                k = len(cont)
                pos = torch.arange(T - k, T, device=device)                         # positions predicting cont
                tgt = torch.tensor(cont, device=device)
                scores[i:i + len(rows), j] = logp[:, pos, tgt].sum(-1).double().cpu()
                if j == 0:
                    top1[i:i + len(rows)] = logp[:, T - k].argmax(-1).cpu()
    best = scores.argmax(1) if n else torch.empty(0, dtype=torch.long)
    for j, (label, cont) in enumerate(conts):
        out[f"probe_{probe.name}_{label}"] = float((best == j).sum())
        out[f"probe_{probe.name}_{label}_top1"] = float((top1 == cont[0]).sum())
    return out


def probe_eval(probe: Probe) -> Callable:
    """An eval (``fn(model, bundle, device) -> dict``) that runs ``probe``."""
    def fn(model, bundle, device):
        return run_probe(probe, model, bundle, device)
    return fn
