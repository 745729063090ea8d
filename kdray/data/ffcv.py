"""ImageNet through FFCV (docs/protocol.md §6.2): .beton conversion, seeded loaders, progressive resolution.

The optional extra ``ffcv==1.0.2`` (``pip install 'kdray[ffcv]'``; building it needs the
system packages pkg-config, libopencv-dev and libturbojpeg0-dev).  Nothing here imports
ffcv until it is used, so kdray works without it.

* ``write_beton`` / ``kdray data ffcv-write SRC DST``: an ImageFolder tree to a .beton file
  (every image re-encoded as JPEG, quality 90 by default, longer side capped at
  ``max_resolution``) plus ``DST.meta.json`` (classes, sample count, settings).  The writer
  runs in a fresh Python process: FFCV's writer can hang after a Loader ran in the same
  process.
* Dataset ``imagenet_ffcv`` (a ``DataBundle`` whose batches come from FFCV loaders):
  RandomResizedCrop + horizontal flip at the epoch's resolution for training,
  centre crop (ratio 224/256) at ``val_resolution`` for the test split; ImageNet mean/std
  in ``preprocess``.  Under DDP each rank loads only its shard of every global batch.
* ``progressive_resolution``: FFCV's ImageNet rule (160 -> 192 px between epochs 41 and 48).

Determinism (checked against ffcv 1.0.2's source and by ``tests/test_ffcv.py``).  FFCV's
``ORDER_RANDOM`` with a fixed ``seed`` *is* a fixed order: epoch ``e`` is
``np.random.default_rng(seed + e).permutation`` (``distributed=True``: torch's
``DistributedSampler`` with that seed).  Its pitfalls: without a seed every process draws
its own (``np.random.randint``), so DDP ranks would disagree; ``seed + e`` makes seed ``s``
at epoch 1 the order of seed ``s + 1`` at epoch 0; ``ORDER_QUASI_RANDOM`` is seeded too but
refuses ``distributed=True``.  FFCV's augmentations are *not* seeded at all
(``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's
per-thread global generator, in parallel threads), so two runs with the same seed crop
and flip differently.  kdray therefore (1) passes its own traversal order: each epoch one
seed is drawn from the trial's order generator (``derive_seed(data_seed, "order")``),
the epoch's permutation is ``torch.randperm`` under that seed, and rank ``r`` of ``N``
takes the ``r``-th contiguous ``batch_size / N`` rows of every global batch (the same
sharding as ``kdray.distributed.Shard``); (2) replaces the crop decoder and the flip with
seeded versions that reseed numba's generator per sample from (epoch seed, sample index).
Same data seed => same batches, same crops and flips, on any number of ranks; the price
is one pipeline recompilation per epoch (the epoch seed is a compile-time constant).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle
from kdray.data.images import IMAGENET_MEAN, IMAGENET_STD, image_preprocess

DEFAULT_CROP_RATIO = 224 / 256
FFCV_MISSING = "FFCV is not installed: pip install 'kdray[ffcv]' (ffcv==1.0.2; needs pkg-config, libopencv-dev, libturbojpeg0-dev)"


def _require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{FFCV_MISSING} ({e})") from None


# ------------------------------------------------------------------ schedules

def progressive_resolution(epoch: int, start_ramp: int = 41, end_ramp: int = 48, min_res: int = 160,
                           max_res: int = 192) -> int:
    """The training resolution at a 0-indexed epoch (FFCV's ImageNet rule).

    ``min_res`` up to ``start_ramp``, ``max_res`` from ``end_ramp``; in between the linear
    interpolation rounded to the nearest multiple of 32 (so 160 -> 192 switches at epoch 45
    with the defaults).
    """
    if min_res > max_res:
        raise ValueError(f"min_res {min_res} > max_res {max_res}")
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0]
    return int(np.round(interp / 32)) * 32


# ------------------------------------------------------------------ writing

def _write_here(src: str, dst: str, max_resolution: int, jpeg_quality: int, write_mode: str,
                num_workers: int, chunk_size: int, classes_from: Optional[str], max_per_class: Optional[int]) -> None:
    """The writer itself (runs in the subprocess that ``write_beton`` starts)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torch.utils.data import Subset

    from kdray.data.ffcv_ops import ClassListFolder, class_list

    classes = class_list(Path(classes_from or src))
    ds = ClassListFolder(src, classes, classes_from)
    if max_per_class is not None:
        keep, count = [], {}
        for i, (_, y) in enumerate(ds.samples):
            if count.get(y, 0) < max_per_class:
                keep.append(i)
                count[y] = count.get(y, 0) + 1
        ds = Subset(ds, keep)
    if len(ds) == 0:
        raise DataNotFoundError(f"{src}: no images")
    tmp = f"{dst}.tmp-{os.getpid()}"
    writer = DatasetWriter(tmp, {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                                        jpeg_quality=jpeg_quality),
                                 "label": IntField()}, num_workers=num_workers)
    writer.from_indexed_dataset(ds, chunksize=chunk_size)
    os.replace(tmp, dst)
    meta = {"classes": classes, "num_samples": len(ds), "max_resolution": max_resolution,
            "jpeg_quality": jpeg_quality, "write_mode": write_mode, "source": str(Path(src).resolve())}
    Path(f"{dst}.meta.json").write_text(json.dumps(meta, indent=1))


def write_beton(image_folder: str | os.PathLike, out_path: str | os.PathLike, max_resolution: int,
                jpeg_quality: int = 90, *, write_mode: str = "jpg", num_workers: Optional[int] = None,
                chunk_size: int = 100, classes_from: str | os.PathLike | None = None,
                max_per_class: Optional[int] = None, timeout: Optional[float] = None) -> dict:
    """Convert an ImageFolder tree to ``out_path`` (.beton) in a fresh process; returns its metadata.

    ``write_mode="jpg"`` re-encodes every image as JPEG at ``jpeg_quality`` (docs/protocol.md §6.2:
    quality 90); ``classes_from`` takes the class list of another tree (the val split uses
    train's); ``max_per_class`` keeps the first images of each class (quick subsets).
    """
    _require_ffcv()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(src=str(image_folder), dst=str(out), max_resolution=int(max_resolution),
                  jpeg_quality=int(jpeg_quality), write_mode=write_mode,
                  num_workers=int(num_workers or max(1, min(16, os.cpu_count() or 1))), chunk_size=int(chunk_size),
                  classes_from=str(classes_from) if classes_from else None, max_per_class=max_per_class)
    code = "import json, sys; from kdray.data.ffcv import _write_here; _write_here(**json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"writing {out} from {image_folder} failed:\n{tail}")
    return json.loads(Path(f"{out}.meta.json").read_text())


def ffcv_write_main(argv: Optional[Sequence[str]] = None) -> int:
    """``kdray data ffcv-write SRC DST``: an ImageFolder tree to a .beton file."""
    p = argparse.ArgumentParser(prog="kdray data ffcv-write",
                                description="Convert an ImageFolder tree (<class>/*.JPEG) to an FFCV .beton file.")
    p.add_argument("src", help="ImageFolder root, e.g. imagenet/train")
    p.add_argument("dst", help="output .beton, e.g. imagenet/ffcv/train.beton")
    p.add_argument("--max-resolution", type=int, default=512, help="cap on the longer side in px (default 512)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the re-encoded images (default 90)")
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart", "proportion"],
                   help="FFCV's image write mode (default jpg: every image re-encoded)")
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: CPU count, at most 16)")
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--classes-from", default=None,
                   help="take the class list from this tree (give the train folder when writing val)")
    p.add_argument("--max-per-class", type=int, default=None, help="keep only the first N images of each class")
    a = p.parse_args(argv)
    try:
        meta = write_beton(a.src, a.dst, a.max_resolution, a.jpeg_quality, write_mode=a.write_mode,
                           num_workers=a.num_workers, chunk_size=a.chunk_size, classes_from=a.classes_from,
                           max_per_class=a.max_per_class)
    except (ImportError, RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"kdray data ffcv-write: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.dst}: {meta['num_samples']} images, {len(meta['classes'])} classes")
    return 0


# ------------------------------------------------------------------ order and seeded augmentation

def epoch_permutation(n: int, seed: int) -> np.ndarray:
    """The epoch's sample order: ``torch.randperm(n)`` under ``seed`` (identical on every rank)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()


def rank_order(perm: np.ndarray, global_batch: int, rank: int, world_size: int, drop_last: bool = True) -> np.ndarray:
    """Rank ``r``'s rows: the ``r``-th contiguous ``global_batch / N`` of every global batch, concatenated.

    With ``drop_last`` the last partial global batch is dropped (every rank then gets equal,
    full batches, and no gradient rescaling is needed).
    """
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
    local = global_batch // world_size
    n_full = len(perm) // global_batch
    full = perm[:n_full * global_batch].reshape(n_full, world_size, local)[:, rank].reshape(-1)
    if drop_last or n_full * global_batch == len(perm):
        return full
    rest = np.array_split(perm[n_full * global_batch:], world_size)[rank]
    return np.concatenate([full, rest])


# ------------------------------------------------------------------ loaders

def _guarded(loader) -> Iterator:
    """Iterate an FFCV loader without hanging when its worker thread dies.

    FFCV 1.0.2's ``EpochIterator.__next__`` blocks on its queue forever if the pipeline
    raised in the iterator thread; this polls the queue and raises instead.  It also stops
    the thread (``close``) and waits for it when the consumer stops early, so no pipeline
    still runs while the next epoch recompiles.  (Relies on the pinned 1.0.2 internals:
    ``output_queue``, ``None`` as the end marker, ``(slot, batch)`` items.)
    """
    import queue

    it = iter(loader)
    try:
        while True:
            try:
                item = it.output_queue.get(timeout=1.0)
            except queue.Empty:
                if not it.is_alive() and it.output_queue.empty():
                    raise RuntimeError("FFCV's loader thread died (its traceback is printed above)") from None
                continue
            if item is None:
                return
            slot, batch = item
            if torch.cuda.is_available() and getattr(it, "cuda_streams", None):
                it.current_stream.wait_stream(it.cuda_streams[slot])
            yield batch
    finally:
        it.close()
        it.join(timeout=60)


class FFCVTrainLoader:
    """Training batches from a .beton: kdray's order, seeded crops and flips, this rank's shard.

    ``epoch(order_seed, augment_seed, resolution)`` yields ``(uint8 [B, 3, R, R], int64 [B])``
    on ``device`` with ``B = global_batch / world_size``; ``len`` is the number of batches.
    """

    def __init__(self, path: str | os.PathLike, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", num_workers: int = 8, os_cache: bool = True,
                 resolution: int = 160, seeded: bool = True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 batches_ahead: int = 3):
        _require_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        from kdray.data.ffcv_ops import CropDecoder as Crop, ExplicitOrder as Order, SeededHorizontalFlip as Flip

        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by {world_size} workers")
        self.seeded, self.resolution = seeded, resolution
        self.device = torch.device(device)
        if seeded:
            self.decoder, self.flip = Crop((resolution, resolution), 0, scale, ratio), Flip(0)
        else:
            self.decoder, self.flip = RandomResizedCropRGBImageDecoder((resolution, resolution), scale, ratio), \
                RandomHorizontalFlip()
        to_dev = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        self.order = Order()
        self.loader = Loader(str(path), batch_size=self.local_batch, num_workers=num_workers,
                             order=self.order if seeded else OrderOption.RANDOM, os_cache=os_cache, drop_last=True,
                             batches_ahead=batches_ahead, distributed=False,
                             pipelines={"image": [self.decoder, self.flip, ToTensor(), *to_dev, ToTorchImage()],
                                        "label": [IntDecoder(), ToTensor(), Squeeze(), *to_dev]})
        self.num_samples = int(self.loader.reader.num_samples)
        self._previous: list = []

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def epoch(self, order_seed: int, augment_seed: int, resolution: Optional[int] = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        res = resolution or self.resolution
        if self.seeded:
            self.order.current = rank_order(epoch_permutation(self.num_samples, order_seed), self.global_batch,
                                            self.rank, self.world_size)
            self.decoder.seed, self.flip.seed = augment_seed, augment_seed ^ 0x5DEECE66D
        else:
            self.loader.traversal_order.seed = int(order_seed) % (2 ** 31)
        recompile = self.seeded or res != self.resolution or self.loader.code is None
        self.decoder.output_size = (res, res)
        self.resolution = res
        if recompile:  # the seeds and the output size are compile-time constants of the pipeline
            # Keep the previous compiled pipeline alive: finalising numba dispatchers while
            # another thread compiles is not safe.
            self._previous.append(self.loader.code)
            self.loader.generate_code()
        for images, labels in _guarded(self.loader):
            yield images, labels.long().reshape(-1)


def ffcv_eval_batches(path: str | os.PathLike, batch_size: int, resolution: int = 256,
                      crop_ratio: float = DEFAULT_CROP_RATIO, num_workers: int = 8,
                      device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in file order, centre-cropped: ``(uint8 [B, 3, R, R], int64 [B])``."""
    _require_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    from kdray.data.ffcv_ops import CropDecoder

    crop = CropDecoder((resolution, resolution), center_ratio=crop_ratio)  # FFCV's centre crop
    device = torch.device(device)
    to_dev = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    drop_last=False, os_cache=True,
                    pipelines={"image": [crop, ToTensor(), *to_dev, ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(), *to_dev]})
    for images, labels in _guarded(loader):
        yield images, labels.long().reshape(-1)


# ------------------------------------------------------------------ the data set

class FFCVBundle(DataBundle):
    """A ``DataBundle`` whose batches stream from .beton files (nothing is held in memory).

    ``presharded``: under DDP each rank's loader yields only its rows of every global batch
    (``kdray.distributed`` then does not split again); ``set_epoch`` picks the epoch's
    resolution.  Batch order and augmentation come from the trial's order generator.
    """

    presharded = True

    def __init__(self, train_path: Path, val_path: Path, meta: dict, n_val: int, opts: dict):
        empty = torch.empty(0, dtype=torch.uint8)
        res = opts["max_res"]
        super().__init__("classification", len(meta["classes"]), (3, res, res), empty, None, empty,
                         torch.empty(0, dtype=torch.int64),
                         preprocess=image_preprocess(IMAGENET_MEAN, IMAGENET_STD, None),
                         extras={"classes": meta["classes"], "train": str(train_path), "val": str(val_path)})
        self.train_path, self.val_path, self.opts = train_path, val_path, opts
        self._n_train, self._n_val, self._epoch = int(meta["num_samples"]), n_val, 0
        self._loader: Optional[FFCVTrainLoader] = None

    @property
    def n_train(self) -> int:
        return self._n_train

    def steps_per_epoch(self, batch_size: int) -> int:
        return self._n_train // batch_size  # drop_last: full global batches only

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _rank(self) -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_batches(self, batch_size: int, steps: int, order: torch.Generator):
        rank, world = self._rank()
        o = self.opts
        if self._loader is None or (self._loader.global_batch, self._loader.rank, self._loader.world_size) != \
                (batch_size, rank, world):
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and \
                o.get("device", "auto") != "cpu" else torch.device("cpu")
            self._loader = FFCVTrainLoader(self.train_path, batch_size, rank=rank, world_size=world, device=dev,
                                           num_workers=o["num_workers"], os_cache=o["os_cache"],
                                           resolution=o["min_res"], seeded=o["seeded"])
        # Two draws per epoch from the trial's order generator: the same on every rank, and
        # restored with it after a crash.
        order_seed, augment_seed = (int(v) for v in torch.randint(0, 2 ** 62, (2,), generator=order))
        res = progressive_resolution(self._epoch, o["start_ramp"], o["end_ramp"], o["min_res"], o["max_res"])
        for i, batch in enumerate(self._loader.epoch(order_seed, augment_seed, res)):
            if i == steps:
                return
            yield batch

    def test_batches(self, batch_size: int):
        o = self.opts
        yield from ffcv_eval_batches(self.val_path, batch_size, o["val_res"], o["crop_ratio"], o["num_workers"])


def imagenet_ffcv(root: Optional[Path] = None, train: str = "imagenet/ffcv/train.beton",
                  val: str = "imagenet/ffcv/val.beton", min_res: int = 160, max_res: int = 192,
                  start_ramp: int = 41, end_ramp: int = 48, val_res: int = 256,
                  crop_ratio: float = DEFAULT_CROP_RATIO, num_workers: int = 8, os_cache: bool = True,
                  seeded: bool = True, device: str = "auto") -> DataBundle:
    """ImageNet from .beton files under the data root (``kdray data ffcv-write`` makes them)."""
    _require_ffcv()
    root = require_root(root, "imagenet_ffcv", "imagenet/ffcv/train.beton and val.beton")
    paths = {}
    for name, rel in (("train", train), ("val", val)):
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        if not p.is_file():
            raise DataNotFoundError(f"dataset 'imagenet_ffcv': no {name} file {p} "
                                    f"(make it with: kdray data ffcv-write <imagenet/{name}> {p})")
        paths[name] = p
    meta_file = Path(f"{paths['train']}.meta.json")
    if not meta_file.is_file():
        raise DataNotFoundError(f"dataset 'imagenet_ffcv': {meta_file} is missing (written by kdray data ffcv-write)")
    meta = json.loads(meta_file.read_text())
    val_meta = Path(f"{paths['val']}.meta.json")
    n_val = json.loads(val_meta.read_text())["num_samples"] if val_meta.is_file() else -1
    opts = dict(min_res=min_res, max_res=max_res, start_ramp=start_ramp, end_ramp=end_ramp, val_res=val_res,
                crop_ratio=crop_ratio, num_workers=num_workers, os_cache=os_cache, seeded=seeded, device=device)
    return FFCVBundle(paths["train"], paths["val"], meta, n_val, opts)
