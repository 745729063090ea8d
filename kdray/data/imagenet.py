"""ImageNet in the ImageFolder layout, decoded into memory at a small resolution.

On disk::

    <root>/imagenet/train/<wnid>/*.JPEG
    <root>/imagenet/val/<wnid>/*.JPEG      (val sorted into class folders, as for ImageFolder)

Classes: the sorted ``train`` sub-folders (ImageFolder's convention); every ``val``
folder must be one of them.  Every image is resized once (shorter side to
``resolution``, bilinear, then the central ``resolution`` square) into
``uint8 [N, 3, R, R]`` tensors, cached like TinyImageNet's
(``<root>/imagenet/.kdray_cache`` or ``cache_dir``).  ``max_per_class`` keeps the first
files (by name) of each class, for quick subsets.

This in-memory loader is for small fixtures, subsets and downsampled variants: all of
ImageNet at 64 px would already be ~15.7 GB of RAM.  The paper's ImageNet runs
(docs/protocol.md §6.2: FFCV, JPEG quality 90, progressive 160 -> 192 px, DDP) go through
the FFCV loader in a separate module, not through this one.

Preprocess: ImageNet mean/std; ``augment`` as in ``kdray.data.images`` (default
``crop_flip`` with zero padding ``crop_padding``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle, disk_cached, files_signature
from kdray.data.images import IMAGENET_MEAN, IMAGENET_STD, decode_images, image_preprocess, list_images


def _class_dirs(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataNotFoundError(f"dataset 'imagenet_folder': expected {split_dir} holding one folder per class "
                                f"(<wnid>/*.JPEG)")
    names = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataNotFoundError(f"dataset 'imagenet_folder': {split_dir} has no class folders (<wnid>/*.JPEG)")
    return names


def imagenet_folder(root: Optional[Path] = None, resolution: int = 64, augment: Optional[str] = "crop_flip",
                    crop_padding: int = 4, max_per_class: Optional[int] = None,
                    cache_dir: Optional[str] = None) -> DataBundle:
    root = require_root(root, "imagenet_folder", "imagenet/train/<wnid>/ and imagenet/val/<wnid>/")
    base = root / "imagenet"
    classes = _class_dirs(base / "train")
    index = {c: i for i, c in enumerate(classes)}
    split = {}
    for name in ("train", "val"):
        paths, labels = [], []
        for c in _class_dirs(base / name):
            if c not in index:
                raise ValueError(f"{base / name / c}: class {c!r} has no folder in {base / 'train'}")
            files = list_images(base / name / c)[:max_per_class]
            paths += files
            labels += [index[c]] * len(files)
        if not paths:
            raise DataNotFoundError(f"dataset 'imagenet_folder': no images under {base / name}")
        split[name] = (paths, labels)

    settings = {"format": 1, "resolution": resolution, "classes": classes,
                "train": files_signature(split["train"][0], base), "val": files_signature(split["val"][0], base)}

    def build() -> dict:
        return {f"{k}_x": decode_images(split[k][0], resolution, fit="center_crop") for k in ("train", "val")}

    tensors, path, hit = disk_cached("imagenet_folder", base, settings, build, cache_dir)
    y = {k: torch.tensor(split[k][1], dtype=torch.int64) for k in split}
    return DataBundle("classification", len(classes), (3, resolution, resolution),
                      tensors["train_x"], y["train"], tensors["val_x"], y["val"],
                      preprocess=image_preprocess(IMAGENET_MEAN, IMAGENET_STD, augment, crop_padding),
                      extras={"classes": classes, "cache": str(path), "cache_hit": hit})
