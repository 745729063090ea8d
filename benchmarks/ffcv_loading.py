"""Benchmark 7: FFCV vs torchvision ImageFolder, JPEG loading throughput (ImageNet-style training input).

Data: ``n`` synthetic photographs-like images (smooth random fields plus noise,
``size`` x ``size`` RGB, default 256) saved as JPEG quality 90 in the
ImageFolder layout (``<root>/<class>/<i>.jpg``, 10 classes).

* torchvision: ``ImageFolder(root, Compose([RandomResizedCrop(res),
  RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet mean/std)]))`` and a
  shuffling ``DataLoader`` with one worker per core (persistent workers).
* FFCV: the same images written once to a ``.beton`` (``RGBImageField``,
  JPEG quality 90, as the paper re-encodes ImageNet; timed separately), read
  by ``ffcv.loader.Loader`` (random order, one worker per core) with
  ``RandomResizedCropRGBImageDecoder((res, res))``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``ToTorchImage`` and a float normalisation, the pipeline of
  FFCV's ImageNet example minus the GPU transfer (on a GPU machine the batch
  is moved with ``.to(device)`` on both sides).

Both deliver normalised float ``[B, 3, res, res]`` batches.  A warm-up epoch
each (FFCV compiles its pipeline with numba), then alternating epochs (A B A B),
median samples/s.  When ffcv cannot be imported, the result says
"not measured: ffcv not installed" and nothing is timed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.common import cpu_count, interleaved, median, now, result, sync, torch_threads

NAME = "ffcv"
TITLE = "FFCV vs torchvision ImageFolder: JPEG loading throughput"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def ffcv_available() -> tuple[bool, str]:
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401
        from ffcv.writer import DatasetWriter  # noqa: F401
    except Exception as e:  # ImportError, or a broken native dependency (libturbojpeg, opencv)
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def write_jpegs(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> int:
    """ImageFolder layout, JPEG quality 90; returns the bytes written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        c = i % classes
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, size=(size // 16, size // 16, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-10, 11, size=(size, size, 3))
        path = d / f"{i:06d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def torchvision_loader(root: Path, res: int, batch_size: int, workers: int, device: str):
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(res), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN / 255, IMAGENET_STD / 255)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)


def write_beton(root: Path, beton: Path, size: int, workers: int) -> float:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision import datasets

    ds = datasets.ImageFolder(str(root))          # PIL images, as FFCV's ImageNet writer reads them
    t = now()
    writer = DatasetWriter(str(beton), {"image": RGBImageField(write_mode="jpg", max_resolution=size,
                                                               jpeg_quality=90),
                                        "label": IntField()}, num_workers=workers)
    writer.from_indexed_dataset(ds)
    return now() - t


class _Normalize(torch.nn.Module):
    """uint8 [B, 3, H, W] -> float32 (x - mean) / std (FFCV's NormalizeImage has no CPU-tensor path)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)


def ffcv_loader(beton: Path, res: int, batch_size: int, workers: int):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    pipes = {"image": [RandomResizedCropRGBImageDecoder((res, res)), RandomHorizontalFlip(), ToTensor(),
                       ToTorchImage()],
             "label": [IntDecoder(), ToTensor(), Squeeze()]}
    return Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                  drop_last=False, pipelines=pipes, os_cache=True, seed=0)


def epoch(loader, device: str, norm=None, res: int = 0) -> float:
    t = now()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if norm is not None:
            x = norm(x)
        y = y.to(device, non_blocking=True)
    sync(device)
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, res, res), (x.dtype, x.shape)
    return now() - t


def run(quick: bool = False, device: str = "cpu", n: Optional[int] = None, size: int = 256, res: int = 160,
        batch_size: int = 128, reps: Optional[int] = None, workers: Optional[int] = None) -> dict:
    t0 = now()
    n = n or (400 if quick else 2000)
    reps = reps or (2 if quick else 3)
    workers = workers or cpu_count()
    params = {"quick": quick, "device": device, "n": n, "size": size, "res": res, "batch_size": batch_size,
              "reps": reps, "workers": workers}
    ok, why = ffcv_available()
    if not ok:
        return result(NAME, TITLE, None, "FFCV samples/s / ImageFolder samples/s", "report (no target)", None,
                      {"status": "not measured: ffcv not installed", "import error": why}, params,
                      ["Install the optional extra (pip install -e '.[ffcv]') to measure."], now() - t0)
    with tempfile.TemporaryDirectory(prefix="kdray-bench-ffcv-") as tmp:
        root, beton = Path(tmp) / "images", Path(tmp) / "images.beton"
        t = now()
        nbytes = write_jpegs(root, n, size)
        t_jpeg = now() - t
        t_write = write_beton(root, beton, size, workers)
        tv = torchvision_loader(root, res, batch_size, workers, device)
        ff = ffcv_loader(beton, res, batch_size, workers)
        norm = _Normalize()
        with torch_threads(1):
            fns = {"ffcv": lambda: epoch(ff, device, norm, res), "torchvision": lambda: epoch(tv, device, None, res)}
            t = now()
            fns["ffcv"]()                           # warm-up: numba compiles the pipeline
            t_compile = now() - t
            fns["torchvision"]()
            runs = interleaved(fns, reps)
        it = getattr(tv, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        beton_mb = beton.stat().st_size / 1e6
    sps = {k: n / median(v) for k, v in runs.items()}
    ratio = sps["ffcv"] / sps["torchvision"]
    meas = {"ffcv samples/s": sps["ffcv"], "torchvision ImageFolder samples/s": sps["torchvision"],
            "ratio ffcv / torchvision": ratio, "ffcv first epoch s (incl. numba compile)": t_compile,
            "write .beton s (one-off)": t_write, "write JPEGs s (fixture)": t_jpeg,
            "JPEG folder MB": nbytes / 1e6, ".beton MB": beton_mb}
    notes = [f"{n} JPEGs of {size}x{size} (quality 90), RandomResizedCrop({res}) + flip + normalise, batch "
             f"{batch_size}, {workers} loader workers on both sides; {reps} interleaved epochs after a warm-up "
             "epoch each, medians.",
             "The normalisation runs in the main process on FFCV batches (a torch op; FFCV's NormalizeImage "
             "targets GPU tensors) and inside the torchvision workers."]
    return result(NAME, TITLE, ratio, "FFCV samples/s / torchvision ImageFolder samples/s", "report (no target)",
                  None, meas, params, notes, now() - t0)
