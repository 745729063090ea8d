"""Architectures: torch-free declarations here, one implementation module each.

A declaration says what an architecture accepts (input modalities), where its
builder lives (``"kdray.models.gpt:nano_gpt"``, imported only when a trial
builds the model) and which builder argument sets its number of blocks (for
feature-map KD), so ``kdray validate`` checks a sweep without importing torch.

Contract for a builder::

    builder(num_classes: int, input_shape: tuple[int, ...], **args) -> nn.Module

``input_shape`` is one sample's shape without the batch dimension (``(C, H, W)``
for images, ``(n_mels, frames)`` or ``(1, n_mels, frames)`` for spectrograms,
``(block_size,)`` for token sequences).  ``forward(x)`` returns logits
``[B, K]`` for classification or ``[B, T, K]`` for language models.  Models
that support feature-map KD expose ``model.blocks`` (an ``nn.ModuleList``);
kdray reads block ``b`` (1-indexed, as the paper counts) with a forward hook.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

from kdray.registry import (AT_LEAST_1, DROPOUT, NON_NEGATIVE, POSITIVE, PluginError, Range, Registry, Target,
                            builder_args, resolve, takes)

# Input modalities a data set provides and an architecture accepts (docs/plugins.md has the table).
IMAGE, AUDIO, TOKENS = "image", "audio", "tokens"
ANY = "any"            # a data set: of a kind no architecture is checked against; an architecture: takes all
MODALITIES = (ANY, IMAGE, AUDIO, TOKENS)


def check_modalities(what: str, given) -> tuple[str, ...]:
    """The modalities, or PluginError naming the valid ones (a typo would match no architecture)."""
    given = (given,) if isinstance(given, str) else tuple(given)
    bad = [m for m in given if m not in MODALITIES]
    if bad or not given:
        raise PluginError(f"{what}: unknown input modality {bad[0] if bad else '(none)'!r}; valid: {', '.join(MODALITIES)}")
    return given
CONTEXT_ARGS = ("num_classes", "input_shape")     # kdray passes these; a sweep file does not


@dataclass(frozen=True)
class Packs:
    """Whether K students of an architecture can train as one pack, declared so that the plan
    decides it from a sweep file alone (kdray/packplan.py; no model is built).

    ``stacked``: a stacked forward (kdray/stacked) trains every model the builder makes, BatchNorm
    and dropout per student: it always packs.  Otherwise the pack runs the model under vmap, which
    stacks no BatchNorm statistics and has no per-student dropout: ``batch_norm`` is True when the
    model always has BatchNorm, or the name of the builder argument that switches it on;
    ``dropout`` names the argument that sets its dropout probability (> 0: trained alone).  A
    model whose packing these cannot say declares none (``packs=None``): the plan then builds one
    to look.  tests/test_packing.py checks each built-in declaration against the built model."""
    stacked: bool = False
    batch_norm: bool | str = False
    dropout: Optional[str] = None


@dataclass(frozen=True)
class Architecture:
    name: str
    target: Target                      # "module:function", or the builder itself
    accepts: tuple[str, ...]            # the modalities it can take
    blocks: Optional[str] = None        # the builder argument that sets len(model.blocks)
    ranges: Mapping[str, Range] = field(default_factory=dict, hash=False)   # valid values of numeric args
    requires: tuple[str, ...] = ()      # modules of an optional extra it imports (checked at validation)
    extra: Optional[str] = None         # ... and the extra that installs them ("lm": kdray[lm])
    prepare: Optional[Target] = None    # args -> args at validation (a pretrained folder's hash)
    packs: Optional[Packs] = None       # whether students pack (None: not declared, the plan builds one to look)

    def args(self) -> dict:
        """The arguments a sweep file may give: {name: (annotation, default)} (no import)."""
        return builder_args(self.target, skip=CONTEXT_ARGS)

    def __post_init__(self):
        object.__setattr__(self, "accepts", check_modalities(f"architecture {self.name!r}", self.accepts))

    def takes(self, modality: str) -> bool:
        """Whether it accepts inputs of ``modality`` (a data set of modality ``any`` fits every model)."""
        return modality == ANY or ANY in self.accepts or modality in self.accepts

    def n_blocks(self, args: dict) -> Optional[int]:
        """How many blocks feature-map KD can read (None: the model has no ``blocks``)."""
        if self.blocks is None:
            return None
        value = args.get(self.blocks, self.args().get(self.blocks, (None, None))[1])
        return value if isinstance(value, int) else None

    def missing(self) -> list[str]:
        """The modules it requires that are not installed (found without importing them)."""
        from kdray.registry import installed
        return [m for m in self.requires if not installed(m)]

    def prepared(self, args: dict) -> dict:
        """The sweep file's args as trials get them (``prepare``; torch-free)."""
        return dict(args) if self.prepare is None else resolve(self.prepare)(dict(args))

    def __call__(self, num_classes: int, input_shape: tuple[int, ...], **args):
        return resolve(self.target)(num_classes=num_classes, input_shape=tuple(input_shape), **args)


def adopt_model(path: str) -> Architecture:
    """The architecture at an import path: a declaration, or a bare builder (then it is taken to
    accept every modality, and to have no blocks unless declared)."""
    obj = resolve(path)
    if isinstance(obj, Architecture):
        return obj
    if callable(obj) and takes(obj, *CONTEXT_ARGS):
        return Architecture(path, obj, (IMAGE, AUDIO, TOKENS))
    raise PluginError(f"{path} is not an architecture: give a kdray.models.Architecture or a builder "
                      f"fn(num_classes, input_shape, **args) -> nn.Module")


MODELS: Registry[Architecture] = Registry("architecture", adopt=adopt_model)


def declare_model(name: str, target: Target, accepts: tuple[str, ...], blocks: Optional[str] = None,
                  ranges: Optional[Mapping[str, Range]] = None, **info) -> Architecture:
    arch = Architecture(name, target, tuple(accepts), blocks, dict(ranges or {}), **info)
    MODELS.register(name)(arch)
    return arch


_GPT = {"n_embd": AT_LEAST_1, "n_head": AT_LEAST_1, "n_layer": AT_LEAST_1, "dropout": DROPOUT,
        "block_size": AT_LEAST_1, "width": POSITIVE}
_ENCODER = {"dim": AT_LEAST_1, "depth": AT_LEAST_1, "heads": AT_LEAST_1, "mlp_dim": AT_LEAST_1, "dropout": DROPOUT}
_VIT = {**_ENCODER, "patch_size": AT_LEAST_1}
_AST = {**_ENCODER, "patch": AT_LEAST_1, "stride": AT_LEAST_1}
_VGG = {"hidden": AT_LEAST_1, "dropout": DROPOUT}
_ALWAYS = Packs(stacked=True)               # plain nn.Sequential: kdray/stacked/sequential.py
_VMAP_BN = Packs(batch_norm=True)
_VMAP_DROPOUT = Packs(dropout="dropout")    # kdray's GPT: the stacked forward without dropout, else vmap
declare_model("mlp", "kdray.models.small:mlp", (IMAGE, AUDIO), packs=_ALWAYS,
              ranges={"hidden": AT_LEAST_1, "depth": NON_NEGATIVE, "dropout": DROPOUT, "width": POSITIVE})
declare_model("small_cnn", "kdray.models.small:small_cnn", (IMAGE,), packs=_ALWAYS,
              ranges={"channels": AT_LEAST_1, "dropout": DROPOUT, "width": POSITIVE})
declare_model("resnet18", "kdray.models.resnet:resnet18", (IMAGE,), ranges={"width": POSITIVE}, packs=_VMAP_BN)
declare_model("resnet50", "kdray.models.resnet:resnet50", (IMAGE,), ranges={"width": POSITIVE}, packs=_VMAP_BN)
declare_model("vgg19", "kdray.models.vgg:vgg19", (IMAGE,), ranges=_VGG, packs=_VMAP_DROPOUT)
declare_model("vgg19_bn", "kdray.models.vgg:vgg19_bn", (IMAGE,), ranges=_VGG, packs=_VMAP_BN)
declare_model("vit", "kdray.models.vit:vit", (IMAGE,), blocks="depth", ranges=_VIT, packs=_VMAP_DROPOUT)
declare_model("vggish", "kdray.models.vggish:vggish", (AUDIO,), ranges={**_VGG, "width": POSITIVE},
              packs=Packs(batch_norm="batch_norm", dropout="dropout"))
declare_model("ast", "kdray.models.ast:ast", (AUDIO,), blocks="depth", ranges=_AST, packs=_VMAP_DROPOUT)
declare_model("nano_gpt", "kdray.models.gpt:nano_gpt", (TOKENS,), blocks="n_layer", ranges=_GPT, packs=_VMAP_DROPOUT)
declare_model("pico_gpt", "kdray.models.gpt:pico_gpt", (TOKENS,), blocks="n_layer", ranges=_GPT, packs=_VMAP_DROPOUT)
# a Hugging Face config's dropouts have many names: not declared, the plan builds one to look
declare_model("hf_causal_lm", "kdray.models.hf:hf_causal_lm", (TOKENS,), requires=("transformers",), extra="lm",
              prepare="kdray.models.hf:folder_identity")


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **args):
    return MODELS.get(name)(num_classes, input_shape, **args)


@contextmanager
def block_output(model, block: int) -> Iterator[dict]:
    """Capture the output of ``model.blocks[block - 1]`` during forward passes."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not 1 <= block <= len(blocks):
        n = 0 if blocks is None else len(blocks)
        raise ValueError(f"model {type(model).__name__} has {n} blocks; block {block} is out of range")
    box: dict = {}

    def hook(_mod, _inp, out):
        box["out"] = out[0] if isinstance(out, tuple) else out

    handle = blocks[block - 1].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
