"""Data sets: torch-free declarations here, one loader module each.

A declaration says what a data set provides (modality, task, number of
classes, whether it reads files) and where its loader lives (imported only
when a trial loads it), so ``kdray validate`` checks a sweep without importing
torch.  A loader reads the data set's own on-disk format into a
``kdray.data.bundle.DataBundle``.

Contract for a loader::

    loader(root: pathlib.Path | None, **args) -> DataBundle

``root`` is the data root (the sweep's ``data_root`` or ``$KDRAY_DATA``); a
loader that needs files raises ``DataNotFoundError`` naming the path it looked
for.  ``args`` come from the sweep file's ``dataset:`` mapping.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from kdray.errors import DataNotFoundError  # noqa: F401 - raised by every loader, re-exported
from kdray.models import ANY, AUDIO, IMAGE, MODALITIES, TOKENS, check_modalities
from kdray.registry import (AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, SEED_32, PluginError, Range, Registry,
                            Target, builder_args, resolve, takes)

DATA_ROOT_ENV = "KDRAY_DATA"
CLASSIFICATION, LM = "classification", "lm"
BUDGET = {CLASSIFICATION: "epochs", LM: "iterations"}     # how a recipe counts training length
BATCHES = ("indexed", "streaming", "own")                 # how a pack takes its batches (Dataset.batches)


@dataclass(frozen=True)
class Dataset:
    name: str
    target: Target                      # "module:function", or the loader itself
    modality: str                       # what the inputs are: image, audio, tokens (any: not declared)
    task: str = CLASSIFICATION          # classification, or lm (next-token prediction)
    classes: Optional[int] = None       # None: depends on the files (or args)
    reads_files: bool = True            # False: ships inside a package (digits)
    file_arg: Optional[str] = None      # an argument that points at the files instead of the data root
    ranges: Mapping[str, Range] = field(default_factory=dict, hash=False)   # valid values of numeric args

    def __post_init__(self):
        if self.modality not in MODALITIES:
            check_modalities(f"dataset {self.name!r}", (self.modality,))
        if self.batches not in (None, *BATCHES):
            raise PluginError(f"dataset {self.name!r}: unknown batches {self.batches!r}; valid: {', '.join(BATCHES)}")
    requires: tuple[str, ...] = ()      # modules of an optional extra its loader imports
    extra: Optional[str] = None         # ... and the extra that installs them ("lm": kdray[lm])
    prepare: Optional[Target] = None    # args -> args as trials get them (torch-free): e.g. a file's hash added
    # How K packed students take its batches (kdray/packplan.py): "indexed" (the DataBundle's own
    # train_draws/take: it packs), "streaming" (one shared loader, FFCV) or "own" (it overrides
    # train_batches): trained alone; None: not declared, the plan loads it to look.
    batches: Optional[str] = None

    @property
    def budget(self) -> str:
        return BUDGET[self.task]

    def args(self) -> dict:
        return builder_args(self.target, skip=("root",))

    def missing(self) -> list[str]:
        """The modules it requires that are not installed (found without importing them)."""
        from kdray.registry import installed
        return [m for m in self.requires if not installed(m)]

    def prepared(self, args: dict) -> dict:
        """The sweep file's args as trials get them (``prepare``; torch-free)."""
        return dict(args) if self.prepare is None else resolve(self.prepare)(dict(args))

    def needs_root(self, args: dict) -> bool:
        return self.reads_files and not (self.file_arg and args.get(self.file_arg))

    def __call__(self, root: Optional[Path], **args):
        return resolve(self.target)(root, **args)


def adopt_dataset(path: str) -> Dataset:
    """The data set at an import path: a declaration, or a bare loader ``fn(root, **args)`` (a
    classification set whose modality is not declared, so any architecture may take it)."""
    obj = resolve(path)
    if isinstance(obj, Dataset):
        return obj
    if callable(obj) and takes(obj, "root"):
        return Dataset(path, obj, ANY)
    raise PluginError(f"{path} is not a data set: give a kdray.data.Dataset or a loader fn(root, **args) -> DataBundle")


DATASETS: Registry[Dataset] = Registry("dataset", adopt=adopt_dataset)


def declare_dataset(name: str, target: Target, modality: str, **info) -> Dataset:
    ds = Dataset(name, target, modality, **info)
    DATASETS.register(name)(ds)
    return ds


def register_dataset(name: str, modality: str = IMAGE, **info):
    """Decorator form, for loaders defined in the caller's own code (benchmarks, plug-ins)."""
    def deco(fn):
        declare_dataset(name, fn, modality, **info)
        return fn
    return deco


_AUDIO = {"seconds": POSITIVE}
_IMAGES = {"crop_padding": NON_NEGATIVE}
declare_dataset("digits", "kdray.data.digits:digits", IMAGE, batches="indexed", classes=10, reads_files=False,
                ranges={"test_size": FRACTION, "split_seed": SEED_32})
declare_dataset("svhn", "kdray.data.svhn:svhn", IMAGE, batches="indexed", classes=10, ranges=_IMAGES)
declare_dataset("tinyimagenet", "kdray.data.tinyimagenet:tinyimagenet", IMAGE, batches="indexed", classes=200,
                ranges=_IMAGES)
declare_dataset("imagenet_folder", "kdray.data.imagenet:imagenet_folder", IMAGE, batches="indexed",
                ranges={**_IMAGES, "resolution": AT_LEAST_1, "max_per_class": AT_LEAST_1})
declare_dataset("imagenet_ffcv", "kdray.data.ffcv:imagenet_ffcv", IMAGE, batches="streaming", classes=1000,
                ranges={"min_res": AT_LEAST_1, "max_res": AT_LEAST_1, "val_res": AT_LEAST_1, "num_workers": NON_NEGATIVE,
                        "crop_ratio": Range(0, 1, low_open=True)})
declare_dataset("fsdd", "kdray.data.fsdd:fsdd", AUDIO, batches="indexed", classes=10, ranges=_AUDIO)
declare_dataset("speechcommands", "kdray.data.speechcommands:speechcommands", AUDIO, batches="indexed", classes=35,
                ranges=_AUDIO)
declare_dataset("urbansound8k", "kdray.data.urbansound:urbansound8k", AUDIO, batches="indexed", classes=10,
                ranges={**_AUDIO, "test_size": FRACTION, "random_state": SEED_32})
declare_dataset("tinyshakespeare", "kdray.data.tinyshakespeare:tinyshakespeare", TOKENS, batches="indexed", task=LM,
                classes=65, file_arg="path",
                ranges={"block_size": AT_LEAST_1, "train_split": FRACTION,
                        "train_fraction": Range(0, 1, low_open=True), "max_chars": AT_LEAST_1})
declare_dataset("text_bpe", "kdray.data.text:text_bpe", TOKENS, batches="indexed", task=LM, file_arg="path",
                requires=("tokenizers",), extra="lm", prepare="kdray.data.tokenizer_identity:text_bpe_args")


def resolve_root(root: str | os.PathLike | None) -> Optional[Path]:
    """The data root: the explicit value, else ``$KDRAY_DATA``, else None."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else None


def require_root(root: Optional[Path], dataset: str, expected: str) -> Path:
    """Fail clearly when a data set that needs files was given no data root."""
    if root is None:
        raise DataNotFoundError(
            f"dataset {dataset!r} needs a data root holding {expected}: set data_root in the sweep file or ${DATA_ROOT_ENV}"
        )
    return root


_cache: dict = {}


def load_dataset(name: str, root: str | os.PathLike | None = None, **args):
    """Load (and memoise per process) a registered data set."""
    key = (name, str(resolve_root(root)), tuple(sorted((k, repr(v)) for k, v in args.items())))
    if key not in _cache:
        _cache[key] = DATASETS.get(name)(resolve_root(root), **args)
    return _cache[key]
