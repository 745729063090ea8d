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
from dataclasses import dataclass
from typing import Iterator, Optional

from kdray.registry import PluginError, Registry, Target, builder_args, resolve, takes

# Input modalities a data set provides and an architecture accepts.
IMAGE, AUDIO, TOKENS = "image", "audio", "tokens"
ANY = "any"                                        # a plug-in data set that does not say
CONTEXT_ARGS = ("num_classes", "input_shape")     # kdray passes these; a sweep file does not


@dataclass(frozen=True)
class Architecture:
    name: str
    target: Target                      # "module:function", or the builder itself
    accepts: tuple[str, ...]            # the modalities it can take
    blocks: Optional[str] = None        # the builder argument that sets len(model.blocks)
    requires: tuple[str, ...] = ()      # modules of an optional extra it imports (checked at validation)
    extra: Optional[str] = None         # ... and the extra that installs them ("lm": kdray[lm])
    prepare: Optional[Target] = None    # args -> args at validation (a pretrained folder's hash)

    def args(self) -> dict:
        """The arguments a sweep file may give: {name: (annotation, default)} (no import)."""
        return builder_args(self.target, skip=CONTEXT_ARGS)

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
                  **info) -> Architecture:
    arch = Architecture(name, target, tuple(accepts), blocks, **info)
    MODELS.register(name)(arch)
    return arch


declare_model("mlp", "kdray.models.small:mlp", (IMAGE, AUDIO))
declare_model("small_cnn", "kdray.models.small:small_cnn", (IMAGE,))
declare_model("resnet18", "kdray.models.resnet:resnet18", (IMAGE,))
declare_model("resnet50", "kdray.models.resnet:resnet50", (IMAGE,))
declare_model("vgg19", "kdray.models.vgg:vgg19", (IMAGE,))
declare_model("vgg19_bn", "kdray.models.vgg:vgg19_bn", (IMAGE,))
declare_model("vit", "kdray.models.vit:vit", (IMAGE,), blocks="depth")
declare_model("vggish", "kdray.models.vggish:vggish", (AUDIO,))
declare_model("ast", "kdray.models.ast:ast", (AUDIO,), blocks="depth")
declare_model("nano_gpt", "kdray.models.gpt:nano_gpt", (TOKENS,), blocks="n_layer")
declare_model("pico_gpt", "kdray.models.gpt:pico_gpt", (TOKENS,), blocks="n_layer")
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
