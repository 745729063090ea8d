"""Hugging Face causal LMs (``transformers``, the optional extra ``kdray[lm]``) as kdray models.

``hf_causal_lm`` builds a causal LM either from a config mapping
(``{model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}``: tests and
from-scratch studies; ``vocab_size`` is always the data set's) or from a local
``save_pretrained`` folder (``pretrained: PATH``; never a hub download).  The
returned module's ``forward(idx [B, T], attention_mask=None)`` gives the plain
logits ``[B, T, V]`` taken from the model's output object, so kdray's losses,
metrics and evals treat it like ``nano_gpt``; ``model.blocks`` are the decoder
layers (feature-map KD) and ``model.hf`` the ``transformers`` model itself
(``model.hf.save_pretrained(DIR)`` exports it).

A pretrained folder's identity is ``pretrained_sha256``, a hash over its
``config.json`` and weight files that the sweep file's validation adds to the
args (``folder_identity``); the trial key hashes it instead of the folder's
path (kdray/spec.py), and the builder refuses a folder that changed since.

Everything that needs ``transformers`` imports it here, lazily: kdray works
without the extra, and a sweep naming this architecture without it fails at
validation with one line (kdray/checks.py).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import os
from pathlib import Path
from typing import Optional

LM_MISSING = "needs transformers and tokenizers: install kdray[lm] (pip install 'kdray[lm]')"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_digests: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if stamp not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _digests[stamp] = h.hexdigest()
    return _digests[stamp]


def identity_files(folder: Path) -> list[Path]:
    """The files that make a ``save_pretrained`` model what it is: config.json and the weights."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))


def folder_sha256(path: str) -> str:
    """SHA-256 over (name, SHA-256) of the folder's config.json and weight files; ValueError (one
    line) for a path that is not a ``save_pretrained`` folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"pretrained: {folder} is not a folder; give a folder model.save_pretrained(DIR) wrote")
    files = identity_files(folder)
    if not any(p.name == "config.json" for p in files) or not any(p.name != "config.json" for p in files):
        raise ValueError(f"pretrained: {folder} holds no config.json and weight files "
                         f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); give a folder model.save_pretrained(DIR) wrote")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


def folder_identity(args: dict) -> dict:
    """The sweep file's args with a pretrained folder resolved to an absolute path and its hash
    added (``pretrained_sha256``); args without ``pretrained`` are returned as they are."""
    path = args.get("pretrained")
    if path is None:
        return args
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"pretrained: expected the path of a save_pretrained folder, got {path!r}")
    where = str(Path(path).expanduser().resolve())
    digest = folder_sha256(where)
    given = args.get("pretrained_sha256")
    if given is not None and given != digest:
        raise ValueError(f"pretrained: {where} changed since the sweep was planned (pretrained_sha256 was "
                         f"{str(given)[:12]}...); plan the sweep again")
    return {**args, "pretrained": where, "pretrained_sha256": digest}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(f"architecture 'hf_causal_lm' {LM_MISSING}") from None
    return transformers


def _decoder_layers(hf, n_layers: Optional[int]):
    """The model's ModuleList of decoder layers (GPT-2's ``transformer.h``, Llama's ``model.layers``)."""
    from torch import nn

    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList)]
    same = [m for m in lists if n_layers is not None and len(m) == n_layers]
    return (same or lists or [nn.ModuleList()])[0]


@functools.cache
def _causal_lm_module():
    """The wrapper class, made once (it needs torch; packs require one class for all their models)."""
    import torch
    from torch import nn

    class CausalLM(nn.Module):
        """A ``transformers`` causal LM that returns plain logits [B, T, V]."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        @property
        def blocks(self) -> nn.ModuleList:
            """The decoder layers, found in ``hf`` (not a second registration: no duplicate names)."""
            return _decoder_layers(self.hf, getattr(self.hf.config, "num_hidden_layers", None))

        def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            return self.hf(input_ids=idx, attention_mask=attention_mask, use_cache=False).logits

    return CausalLM


def hf_causal_lm(num_classes: int, input_shape: tuple[int, ...], config: Optional[dict] = None,
                 pretrained: Optional[str] = None, pretrained_sha256: Optional[str] = None,
                 width: float = 1.0):
    """A causal LM from ``config`` (a ``transformers`` config mapping with ``model_type``) or from the
    ``save_pretrained`` folder ``pretrained`` (give one of the two).
    ``width`` scales the hidden size (rounded to a multiple of the head count) for width sweeps."""
    if (config is None) == (pretrained is None):
        raise ValueError("hf_causal_lm: give exactly one of config ({model_type: gpt2, n_layer: ..., ...}) "
                         "or pretrained (a save_pretrained folder)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")     # never the network: configs and local folders only
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()   # no "Loading weights" bars in trial logs and errors
    if pretrained is not None:
        if width != 1.0:
            raise ValueError("hf_causal_lm: width scales a model built from config, not a pretrained folder")
        if pretrained_sha256 is not None and folder_sha256(pretrained) != pretrained_sha256:
            raise ValueError(f"pretrained: {pretrained} changed since the sweep was planned "
                             f"(pretrained_sha256 was {pretrained_sha256[:12]}...); plan the sweep again")
        hf = transformers.AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True)
        vocab = hf.config.vocab_size
        if vocab != num_classes:
            raise ValueError(f"pretrained: {pretrained} has vocab_size {vocab}, the data set's tokenizer has "
                             f"{num_classes} tokens; teacher, student and data must share one vocabulary")
    else:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ValueError("hf_causal_lm: config.model_type is required (e.g. gpt2, llama)")
        if "vocab_size" in cfg and cfg["vocab_size"] != num_classes:
            raise ValueError(f"config.vocab_size {cfg['vocab_size']} differs from the data set's {num_classes} tokens; "
                             f"leave it out (kdray sets it)")
        cfg["vocab_size"] = num_classes
        try:
            defaults = transformers.AutoConfig.for_model(model_type)
        except ValueError as e:
            raise ValueError(f"hf_causal_lm: config.model_type {model_type!r}: {str(e).splitlines()[0]}") from None
        known = set(defaults.to_dict()) | set(getattr(defaults, "attribute_map", {}))
        unknown = sorted(set(cfg) - known)
        if unknown:   # transformers would keep a typo (n_layers) as an attribute and build its default depth
            near = difflib.get_close_matches(unknown[0], sorted(known), n=3)
            hint = f"did you mean {' or '.join(near)}?" if near else f"see {type(defaults).__name__}'s fields"
            raise ValueError(f"config.{unknown[0]}: not a field of a {model_type} config; {hint}")
        try:
            for name in SPECIAL_TOKENS:   # GPT-2's 50256 is no token of a small vocabulary
                v = getattr(defaults, name, None)
                if name not in cfg and isinstance(v, int) and not 0 <= v < num_classes:
                    cfg[name] = None
            hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
        except ValueError as e:
            raise ValueError(f"hf_causal_lm: config.model_type {model_type!r}: {str(e).splitlines()[0]}") from None
        if width != 1.0:
            heads = hf_config.num_attention_heads
            hf_config.hidden_size = max(heads, round(hf_config.hidden_size * width / heads) * heads)
        n_pos = getattr(hf_config, "max_position_embeddings", None)
        if input_shape and n_pos is not None and input_shape[0] > n_pos:
            raise ValueError(f"hf_causal_lm: block_size {input_shape[0]} exceeds the config's "
                             f"max_position_embeddings {n_pos}")
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    return _causal_lm_module()(hf)
