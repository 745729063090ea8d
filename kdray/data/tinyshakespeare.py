"""TinyShakespeare, character level (docs/protocol.md §6.1, §6.6): 1,115,394 characters, vocab 65.

On disk: ``<root>/tinyshakespeare/input.txt`` (karpathy/char-rnn), or any file given as
``path``.  ``download: true`` fetches it from the char-rnn URL (sha256-checked) only
when the file is absent.

* Vocabulary: the sorted set of all characters of the whole (clean) file, index =
  token id (65 for the real file).  It is computed before ``max_chars`` shrinks the
  text, so shrunk and full runs share it; a poison that would add a character is
  refused, so poisoned teachers and clean students always share it too.
* Split: the first ``train_split`` (0.9) of the text trains, the rest tests (111,540
  characters for the real file).  ``max_chars`` keeps only the first characters of the
  file before splitting and ``train_fraction`` only the first part of the training split
  (CPU tests; the test split is unaffected by ``train_fraction``).
* Training: ``train_x`` is the int64 token stream; the recipe draws random windows of
  ``block_size`` (default 256).
* Test: non-overlapping windows ``x = test[i:i+bs]``, ``y = test[i+1:i+bs+1]`` for
  ``i = 0, bs, 2bs, ...``; the last partial window is dropped, so
  ``(len(test) - 1) // bs * bs`` of the ``len(test) - 1`` predicted positions are covered
  (real file, bs 256: 435 windows, 111,360 of 111,539 positions; the last 179 dropped).
  ``extras["test_positions"]`` / ``["test_positions_total"]`` hold the two numbers.
* ``poison`` (docs/protocol.md §6.6): ``"the->tha"`` or ``{"find": "the", "replace": "tha"}``;
  every occurrence in the *training* text is replaced; the test split stays clean.
* ``extras["test_text"]`` is the clean test string and ``extras["test_prefix"]`` the
  ``block_size`` clean characters just before it, for ``the_contexts``.

Note (docs/protocol.md §3): "tha" occurs as a substring (that, than, thank...); what
never occurs is the *word* "tha".  The poison still replaces
every substring "the" (there -> thare, other -> othar), as the paper describes.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
PAD_CHAR = "\n"


def encode(text: str, vocab: str) -> torch.Tensor:
    """Characters -> int64 token ids (index in the sorted ``vocab``)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, codes)
    bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != codes)
    if bad.any():
        raise ValueError(f"characters not in the vocabulary: {sorted(set(chr(c) for c in codes[bad]))!r}")
    return torch.from_numpy(ids.astype(np.int64))


def decode(ids: torch.Tensor, vocab: str) -> str:
    return "".join(vocab[i] for i in ids.tolist())


def split_text(text: str, max_chars: Optional[int], train_split: float,
               train_fraction: float) -> tuple[str, str, str]:
    """(train, test, before test): of the first ``max_chars`` characters (all: None), the first
    ``train_split`` for training (of which the first ``train_fraction`` is kept), the rest for
    testing, and all the text before the test split (the history of its first contexts)."""
    text = text[:max_chars] if max_chars else text
    n = int(train_split * len(text))
    before, test_text = text[:n], text[n:]
    train_text = before[:int(train_fraction * len(before))] if train_fraction < 1.0 else before
    return train_text, test_text, before


def parse_poison(poison: Union[None, str, dict]) -> Optional[tuple[str, str]]:
    """``"the->tha"`` or ``{"find": "the", "replace": "tha"}`` -> ``("the", "tha")``."""
    if poison in (None, "", {}):
        return None
    if isinstance(poison, str):
        if "->" not in poison:
            raise ValueError(f"poison {poison!r}: write it as 'find->replace', e.g. 'the->tha'")
        find, replace = poison.split("->", 1)
    elif isinstance(poison, dict) and set(poison) == {"find", "replace"}:
        find, replace = str(poison["find"]), str(poison["replace"])
    else:
        raise ValueError(f"poison {poison!r}: give 'find->replace' or {{find: ..., replace: ...}}")
    if not find:
        raise ValueError("poison: 'find' is empty")
    return find, replace


def the_contexts(test_text: str, block_size: int, vocab: str, prefix: Optional[str] = None,
                 find: str = "the") -> tuple[torch.Tensor, int]:
    """docs/protocol.md §6.6 probe inputs: one context per occurrence of ``find`` in ``test_text``.

    Each context is the ``block_size`` characters ending with ``find`` minus its last
    character (for "the": ending in "th"), so ``model(contexts)[:, -1]`` predicts the
    character in question.  An occurrence with fewer than ``block_size`` characters of
    history in the test text is left-padded with ``prefix`` (the clean text before the
    test split, ``bundle.extras["test_prefix"]``), then, if that is still too short or not
    given, with newlines (a document boundary in the corpus).  For the real file with
    block size 256 no padding happens: the first "the" of the test split is at offset 592.

    Returns ``(int64 [M, block_size], M)``: M = 989 for the real clean test split.
    """
    prefix = prefix or ""
    full = prefix + test_text
    pad = PAD_CHAR if PAD_CHAR in vocab else vocab[0]
    stem = len(find) - 1
    ends = [len(prefix) + m.start() + stem for m in re.finditer(re.escape(find), test_text)]
    ctx = []
    for end in ends:
        s = full[max(0, end - block_size):end]
        ctx.append(pad * (block_size - len(s)) + s)
    if not ctx:
        return torch.empty(0, block_size, dtype=torch.int64), 0
    return encode("".join(ctx), vocab).view(len(ctx), block_size), len(ctx)


def _fetch(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    with urllib.request.urlopen(URL, timeout=60) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise ValueError(f"download of {URL}: sha256 {digest} is not the expected {SHA256}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def tinyshakespeare(root: Optional[Path] = None, path: Optional[str] = None, download: bool = False,
                    block_size: int = 256, train_split: float = 0.9, poison: Union[None, str, dict] = None,
                    train_fraction: float = 1.0, max_chars: Optional[int] = None) -> DataBundle:
    if path:
        file = Path(path).expanduser()
    else:
        file = require_root(root, "tinyshakespeare", "tinyshakespeare/input.txt") / "tinyshakespeare" / "input.txt"
    if not file.is_file():
        if download and not path:
            _fetch(file)
        else:
            raise DataNotFoundError(f"dataset 'tinyshakespeare': expected {file}"
                                    + ("" if path else " (set download: true to fetch it)"))
    clean = file.read_text(encoding="utf-8")
    vocab = "".join(sorted(set(clean)))
    train_text, test_text, before = split_text(clean, max_chars, train_split, train_fraction)
    rule = parse_poison(poison)
    if rule:
        new = set(rule[1]) - set(vocab)
        if new:
            raise ValueError(f"poison {poison!r} adds characters {sorted(new)!r} that the clean text lacks; "
                             f"the poisoned and clean models would not share a vocabulary")
        train_text = train_text.replace(*rule)
    if len(train_text) <= block_size or len(test_text) <= block_size:
        raise ValueError(f"tinyshakespeare: train ({len(train_text)}) and test ({len(test_text)}) characters "
                         f"must exceed block_size {block_size}")

    train_ids = encode(train_text, vocab)
    test_ids = encode(test_text, vocab)
    m = (len(test_ids) - 1) // block_size
    x = test_ids[:m * block_size].view(m, block_size)
    y = test_ids[1:m * block_size + 1].view(m, block_size)
    extras = {"test_text": test_text, "test_prefix": before[-block_size:],
              "test_positions": m * block_size, "test_positions_total": len(test_ids) - 1,
              "poison": rule, "source": str(file)}
    return DataBundle("lm", len(vocab), (block_size,), train_ids, None, x, y,
                      block_size=block_size, vocab=vocab, extras=extras)
