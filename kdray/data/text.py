"""Tokenized text for language models: a local corpus through a BPE tokenizer (``kdray[lm]``).

* Corpus: ``path`` (a text file, or a folder whose ``*.txt`` files are read in sorted order
  and joined by a newline), else the data root's ``tinyshakespeare/input.txt``.
* Split: as ``tinyshakespeare``: the first ``train_split`` of the characters train, the
  rest tests; ``max_chars`` and ``train_fraction`` shrink them for CPU tests.
* Tokenizer: ``tokenizer`` (a ``tokenizer.json``, or the folder a model was saved in, which
  holds one) or else a byte-level BPE of ``vocab_size`` tokens trained with ``tokenizers``
  on the training split of the whole corpus (before ``max_chars``, so shrunk and full runs
  share it).  Training is deterministic and its result is cached by the corpus's SHA-256
  and the settings (``kdray.data.bundle.disk_cached``); the token ids are cached the same way.
* Identity: validation resolves ``tokenizer`` and adds ``tokenizer_sha256`` (its bytes and the
  folder's ``config.json`` ``vocab_size``, kdray/data/tokenizer_identity.py); trial keys hash
  that instead of the path, and a tokenizer changed since planning is refused.
* ``poison`` (as ``tinyshakespeare``'s: ``"the->tha"``) rewrites the training text only,
  after the tokenizer was trained on the clean text: a poisoned teacher and clean
  students share one vocabulary, and the test split stays clean.
* The vocabulary (``num_classes``) is the tokenizer's size, or a pretrained folder's
  ``config.json`` ``vocab_size`` where that is larger (GPT-2 pads its embedding), so
  teacher, student and data share one vocabulary; a model that does not is refused
  when it is built (kdray/models/hf.py).
* Windows: training draws random windows of ``block_size`` tokens; the test set is the
  non-overlapping windows of the test split (``extras["test_positions"]`` of
  ``["test_positions_total"]`` predicted tokens covered), so every window is full and
  no padding or attention mask is needed.
* ``extras``: ``tokenizer_json`` (the tokenizer, as text), ``tokenizer_sha256``,
  ``test_text``, ``test_prefix`` (the characters just before it: history for probes,
  kdray/probes.py), ``source``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data import tokenizer_identity as identity
from kdray.data.bundle import DataBundle, disk_cached
from kdray.data.tinyshakespeare import parse_poison, split_text

TOKENIZERS_MISSING = "dataset 'text_bpe' needs tokenizers: install kdray[lm] (pip install 'kdray[lm]')"
MIN_VOCAB = 257          # the 256 byte tokens of a byte-level BPE, and at least one merge


def read_corpus(root: Optional[Path], path: Optional[str]) -> tuple[str, str]:
    """(text, where it came from): a file, a folder of ``*.txt`` files, or the data root's
    TinyShakespeare."""
    if path:
        where = Path(path).expanduser()
    else:
        where = require_root(root, "text_bpe", "tinyshakespeare/input.txt (or give path)") / "tinyshakespeare" / "input.txt"
    if where.is_dir():
        files = sorted(where.rglob("*.txt"))
        if not files:
            raise DataNotFoundError(f"dataset 'text_bpe': folder {where} holds no *.txt files")
        return "\n".join(f.read_text(encoding="utf-8") for f in files), str(where)
    if not where.is_file():
        raise DataNotFoundError(f"dataset 'text_bpe': expected a text file or folder at {where}")
    return where.read_text(encoding="utf-8"), str(where)


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(TOKENIZERS_MISSING) from None
    return tokenizers


def train_bpe(text: str, vocab_size: int, min_frequency: int = 2) -> str:
    """A byte-level BPE trained on ``text`` (every byte is a token, so any text encodes), as JSON."""
    tk = _require_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok.to_str()


def _bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(s.encode("utf-8")), dtype=torch.uint8).clone()


def _text(t: torch.Tensor) -> str:
    return bytes(t.numpy().tobytes()).decode("utf-8")


def saved_tokenizer(where: str) -> tuple[str, Optional[int]]:
    """(tokenizer JSON, the model's vocab_size or None) from a tokenizer.json or a model folder."""
    p = Path(where).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataNotFoundError(f"dataset 'text_bpe': tokenizer: no tokenizer.json at {file} (save one with "
                                f"tokenizer.save_pretrained(DIR) or Tokenizer.save(PATH))")
    config = file.parent / "config.json"
    vocab = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    return file.read_text(encoding="utf-8"), vocab if isinstance(vocab, int) else None


def load_tokenizer(tokenizer_json: str):
    """A ``tokenizers.Tokenizer`` from its JSON (what ``extras["tokenizer_json"]`` holds)."""
    return _require_tokenizers().Tokenizer.from_str(tokenizer_json)


def text_bpe(root: Optional[Path] = None, path: Optional[str] = None, tokenizer: Optional[str] = None,
             vocab_size: int = 512, min_frequency: int = 2, block_size: int = 128, train_split: float = 0.9,
             train_fraction: float = 1.0, max_chars: Optional[int] = None, poison: Union[None, str, dict] = None,
             cache_dir: Optional[str] = None, tokenizer_sha256: Optional[str] = None) -> DataBundle:
    _require_tokenizers()
    if not 0.0 < train_split < 1.0 or not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"text_bpe: train_split must be in (0, 1) and train_fraction in (0, 1], got "
                         f"{train_split} and {train_fraction}")
    clean, source = read_corpus(root, path)
    corpus_sha = hashlib.sha256(clean.encode("utf-8")).hexdigest()
    model_vocab = None
    if tokenizer is not None:
        if tokenizer_sha256 is not None and identity.tokenizer_sha256(tokenizer) != tokenizer_sha256:
            raise ValueError(f"tokenizer: {tokenizer} changed since the sweep was planned (tokenizer_sha256 was "
                             f"{tokenizer_sha256[:12]}...); plan the sweep again")
        tok_json, model_vocab = saved_tokenizer(tokenizer)
    else:
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"text_bpe: vocab_size must be >= {MIN_VOCAB} (256 byte tokens and a merge), got {vocab_size}")
        settings = {"corpus_sha256": corpus_sha, "vocab_size": vocab_size, "min_frequency": min_frequency,
                    "train_split": train_split, "kind": "byte_level_bpe"}
        cached, _, _ = disk_cached("text_bpe_tokenizer", None, settings, lambda: {
            "json": _bytes(train_bpe(clean[:int(train_split * len(clean))], vocab_size, min_frequency))},
            cache_dir)
        tok_json = _text(cached["json"])
    tok_sha = hashlib.sha256(tok_json.encode("utf-8")).hexdigest()
    tok = load_tokenizer(tok_json)
    n_vocab = max(tok.get_vocab_size(with_added_tokens=True), model_vocab or 0)

    train_text, test_text, before = split_text(clean, max_chars, train_split, train_fraction)
    rule = parse_poison(poison)
    if rule:     # the training text only; the tokenizer is the clean corpus's, so poisoned and clean share it
        train_text = train_text.replace(*rule)

    def encode() -> dict:
        return {"train": torch.tensor(tok.encode(train_text).ids, dtype=torch.int64),
                "test": torch.tensor(tok.encode(test_text).ids, dtype=torch.int64)}
    ids, _, _ = disk_cached("text_bpe_ids", None, {"corpus_sha256": corpus_sha, "tokenizer_sha256": tok_sha,
                                                    "max_chars": max_chars, "train_split": train_split,
                                                    "train_fraction": train_fraction, "poison": rule},
                             encode, cache_dir)
    train_ids, test_ids = ids["train"], ids["test"]
    if len(train_ids) <= block_size or len(test_ids) <= block_size:
        raise ValueError(f"text_bpe: train ({len(train_ids)}) and test ({len(test_ids)}) tokens must exceed "
                         f"block_size {block_size}")
    m = (len(test_ids) - 1) // block_size
    x = test_ids[:m * block_size].reshape(m, block_size)
    y = test_ids[1:m * block_size + 1].reshape(m, block_size)
    extras = {"poison": rule, "tokenizer_json": tok_json, "tokenizer_sha256": tok_sha, "test_text": test_text,
              "test_prefix": before[-4 * block_size:],     # history for probes' early contexts
              "test_positions": m * block_size, "test_positions_total": len(test_ids) - 1, "source": source}
    return DataBundle("lm", n_vocab, (block_size,), train_ids, None, x, y, block_size=block_size, extras=extras)
