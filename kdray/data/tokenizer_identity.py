"""A saved tokenizer's identity (torch-free: sweep validation adds it to ``text_bpe``'s args).

``text_bpe``'s ``tokenizer`` (a ``tokenizer.json``, or a folder holding one) is identified by
``tokenizer_sha256``: a SHA-256 over the tokenizer.json's bytes and the ``vocab_size`` of the
``config.json`` beside it (what the data set reads of that folder: the vocabulary may be padded
past the tokenizer's size).  Validation resolves the path and adds the hash; the trial key hashes
the hash, not the path (kdray/spec.py), so the same files elsewhere key the same trials and
a changed tokenizer keys new ones; ``text_bpe`` refuses a tokenizer that changed since.
The corpus ``path`` is resolved too: trials read it from Ray workers, whose working folder is
not the one the sweep was started from.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kdray.errors import DataNotFoundError


def tokenizer_file(where: str) -> Path:
    p = Path(where).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataNotFoundError(f"dataset 'text_bpe': tokenizer: no tokenizer.json at {file} (save one with "
                                f"tokenizer.save_pretrained(DIR) or Tokenizer.save(PATH))")
    return file


def tokenizer_sha256(where: str) -> str:
    """SHA-256 over the tokenizer.json's bytes and its folder's config.json ``vocab_size`` (or None)."""
    file = tokenizer_file(where)
    config = file.parent / "config.json"
    vocab = None
    if config.is_file():
        try:
            vocab = json.loads(config.read_text()).get("vocab_size")
        except ValueError:
            vocab = None
    body = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps({"tokenizer.json": body, "vocab_size": vocab}, sort_keys=True).encode()).hexdigest()


def tokenizer_identity(args: dict) -> dict:
    """The sweep file's ``text_bpe`` args with ``tokenizer`` resolved to an absolute path and
    ``tokenizer_sha256`` added; args without ``tokenizer`` are returned as they are.  ValueError
    (one line) for a missing tokenizer or one that changed since the given hash."""
    path = args.get("tokenizer")
    if path is None:
        return args
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"tokenizer: expected the path of a tokenizer.json or a folder holding one, got {path!r}")
    where = str(Path(path).expanduser().resolve())
    try:
        digest = tokenizer_sha256(where)
    except DataNotFoundError as e:
        raise ValueError(str(e).replace("dataset 'text_bpe': tokenizer: ", "")) from None
    given = args.get("tokenizer_sha256")
    if given is not None and given != digest:
        raise ValueError(f"tokenizer: {where} changed since the sweep was planned (tokenizer_sha256 was "
                         f"{str(given)[:12]}...); plan the sweep again")
    return {**args, "tokenizer": where, "tokenizer_sha256": digest}


def corpus_path(args: dict) -> dict:
    """The args with ``path`` (a text file or a folder of them) made absolute; ValueError (one line)
    where nothing is there."""
    path = args.get("path")
    if path is None:
        return args
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"path: expected a text file or a folder of *.txt files, got {path!r}")
    where = Path(path).expanduser().resolve()
    if not where.exists():
        raise ValueError(f"path: no text file or folder at {where} (a relative path is read from the folder "
                         "kdray was started in)")
    return {**args, "path": str(where)}


def text_bpe_args(args: dict) -> dict:
    """``text_bpe``'s args as trials get them: the corpus path absolute, the tokenizer identified."""
    return tokenizer_identity(corpus_path(args))
