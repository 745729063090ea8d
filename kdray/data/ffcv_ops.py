"""The FFCV pipeline pieces kdray seeds itself, and the writer's class-indexed folder.

Imported only after ``kdray.data.ffcv._require_ffcv`` has checked that the
``ffcv`` extra is installed: every class here subclasses an ffcv (or
torchvision) class.  FFCV's own crop and flip draw from numba's unseeded
generator; these reseed it per sample from (augmentation seed, sample index),
so a trial's augmentation is a function of its spec.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
from ffcv.fields.rgb_image import (IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop, get_random_crop,
                                   imdecode, resize_crop)
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.traversal_order.base import TraversalOrder
from torchvision.datasets import ImageFolder

from kdray.errors import DataNotFoundError


def _mix(base: int, index):  # a per-sample 32-bit seed; used inside numba
    return np.uint32((np.uint64(base) + np.uint64(index) * np.uint64(2654435761)) % np.uint64(4294967291))



class CropDecoder(ResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder with numba's generator reseeded per sample, or
    (``center_ratio``) its centre-crop decoder."""

    def __init__(self, output_size, seed: int = 0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 center_ratio: Optional[float] = None):
        super().__init__(output_size)
        self.seed, self.scale, self.ratio, self.center_ratio = seed, scale, ratio, center_ratio

    @property
    def get_crop_generator(self):
        return get_random_crop if self.center_ratio is None else get_center_crop

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # Fresh dispatchers per compilation, as FFCV's own decoders do: re-using one across
        # recompilations hit a KeyError in numba 0.68's dispatcher bookkeeping (the same
        # inconsistency shows as an ignored KeyError when such dispatchers are finalised).
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        mix = Compiler.compile(_mix)
        seeded = self.center_ratio is None
        scale = np.array(self.scale, dtype=np.float64)
        ratio = np.array(self.ratio, dtype=np.float64) if seeded else float(self.center_ratio)
        base = int(self.seed) % 4294967291

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                if seeded:
                    np.random.seed(mix(base, source_ix))
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

class SeededHorizontalFlip(Operation):
    """Flip with probability ``flip_prob``, the coin reseeded per sample (FFCV's flip is unseeded)."""

    def __init__(self, seed: int = 0, flip_prob: float = 0.5):
        super().__init__()
        self.seed, self.flip_prob = seed, flip_prob

    def generate_code(self):
        my_range = Compiler.get_iterator()
        p = self.flip_prob
        base = int(self.seed) % 4294967291
        mix = Compiler.compile(_mix)

        def flip(images, dst, indices):
            for i in my_range(images.shape[0]):
                np.random.seed(mix(base, indices[i]))
                if np.random.random() < p:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)

class ExplicitOrder(TraversalOrder):
    """A traversal order set from outside before each epoch (``order.current``)."""

    def __init__(self):  # bound to its loader by __call__ (Loader calls ``order(loader)``)
        self.current: Optional[np.ndarray] = None

    def __call__(self, loader):
        TraversalOrder.__init__(self, loader)
        if self.current is None:
            self.current = np.asarray(self.indices)
        return self

    def sample_order(self, epoch: int):
        return self.current


def class_list(folder: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted (the label order of every .beton written from it)."""
    if not folder.is_dir():
        raise DataNotFoundError(f"{folder}: expected an ImageFolder tree (<class>/*.JPEG)")
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataNotFoundError(f"{folder}: no class folders (<class>/*.JPEG)")
    return names


class ClassListFolder(ImageFolder):
    """An ImageFolder whose class indices come from a given class list (the training split's, as
    imagenet_folder does), so train and val .beton files agree on the labels."""

    def __init__(self, root: str, classes: list[str], classes_from: Optional[str] = None):
        self.class_list, self.classes_from = classes, classes_from
        super().__init__(root)

    def find_classes(self, directory):
        extra = sorted(set(class_list(Path(directory))) - set(self.class_list))
        if extra:
            raise ValueError(f"{directory}: classes {extra[:5]} have no folder in {self.classes_from}")
        return self.class_list, {c: i for i, c in enumerate(self.class_list)}
