"""TinyImageNet (100,000 train / 10,000 val as test, 200 classes, 64x64 RGB).

On disk, the ``tiny-imagenet-200`` folder of the official zip
(http://cs231n.stanford.edu/tiny-imagenet-200.zip) under the data root::

    <root>/tiny-imagenet-200/wnids.txt                      200 WordNet ids
    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 per class
    <root>/tiny-imagenet-200/val/images/*.JPEG              10,000
    <root>/tiny-imagenet-200/val/val_annotations.txt        file<TAB>wnid<TAB>box...

``download: true`` fetches and unpacks the zip (torchvision's
``download_and_extract_archive``, md5-checked) when ``wnids.txt`` is missing.  The
labelled ``val`` split is the test set (the official test split has no labels).
Labels: index of the wnid in ``sorted(wnids)`` (ImageFolder's convention).  Train
images are ordered by (label, file name), test images as in ``val_annotations.txt``.

All images are decoded once with PIL (greyscale ones converted to RGB, anything not
64x64 resized) into ``uint8 [N, 3, 64, 64]`` tensors and cached as
``<tiny-imagenet-200>/.kdray_cache/tinyimagenet-<hash>.pt`` (or in ``cache_dir``;
see ``kdray.data.disk_cached``), about 1.35 GB, memory-mapped by later trials.

Preprocess: ImageNet mean/std; augmentation ``augment`` (default ``crop_flip``, zero
padding ``crop_padding`` = 4; docs/protocol.md §6.1 names only RandAugment, the base
augmentation is our choice, set ``augment: none`` to drop it) preceded by
torchvision's default RandAugment when ``randaugment: true`` (per-sample, see
``kdray.data.images`` for its cost).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle, disk_cached, files_signature
from kdray.data.images import IMAGENET_MEAN, IMAGENET_STD, decode_images, image_preprocess, list_images

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"
SIZE = 64


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataNotFoundError(f"dataset 'tinyimagenet': expected {path} ({what} of the {FOLDER} folder from {URL}); "
                                f"set download: true to fetch it")
    return path


def tinyimagenet(root: Optional[Path] = None, randaugment: bool = False, augment: Optional[str] = "crop_flip",
                 crop_padding: int = 4, cache_dir: Optional[str] = None, download: bool = False) -> DataBundle:
    root = require_root(root, "tinyimagenet", f"{FOLDER}/")
    base = root / FOLDER
    if download and not (base / "wnids.txt").is_file():
        from torchvision.datasets.utils import download_and_extract_archive
        download_and_extract_archive(URL, str(root), md5=MD5)
    wnids = sorted(w.strip() for w in _need(base / "wnids.txt", "the class list").read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_labels = [], []
    for w in wnids:
        files = list_images(_need(base / "train" / w / "images", f"the training images of class {w}"))
        train_paths += files
        train_labels += [index[w]] * len(files)
    test_paths, test_labels = [], []
    ann = _need(base / "val" / "val_annotations.txt", "the validation labels")
    for line in ann.read_text().splitlines():
        if not line.strip():
            continue
        fname, wnid = line.split("\t")[:2]
        if wnid not in index:
            raise ValueError(f"{ann}: {fname} has class {wnid!r}, which is not in wnids.txt")
        test_paths.append(_need(base / "val" / "images" / fname, "a validation image"))
        test_labels.append(index[wnid])

    settings = {"format": 1, "size": SIZE, "wnids": wnids,
                "train": files_signature(train_paths, base), "test": files_signature(test_paths, base)}

    def build() -> dict:
        return {"train_x": decode_images(train_paths, SIZE), "test_x": decode_images(test_paths, SIZE)}

    tensors, path, hit = disk_cached("tinyimagenet", base, settings, build, cache_dir)
    aug = "+".join(a for a in ("randaugment" if randaugment else None, augment) if a and a != "none") or None
    return DataBundle("classification", len(wnids), (3, SIZE, SIZE),
                      tensors["train_x"], torch.tensor(train_labels, dtype=torch.int64),
                      tensors["test_x"], torch.tensor(test_labels, dtype=torch.int64),
                      preprocess=image_preprocess(IMAGENET_MEAN, IMAGENET_STD, aug, crop_padding),
                      extras={"classes": wnids, "cache": str(path), "cache_hit": hit})
