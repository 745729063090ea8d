"""Benchmark 4: whole-data-set tensors + batched augmentation (kdray.data.images) vs a
torchvision per-sample PIL pipeline, on SVHN-shaped data.

Data: synthetic uint8 ``[N, 3, 32, 32]`` images and labels (``n`` = 20,000 by default).

* kdray: ``DataBundle.train_batches`` (a permutation, index slicing) and the
  bundle's ``preprocess`` from ``image_preprocess(0.5, 0.5, "crop_flip")``:
  random crop with 4-pixel zero padding, horizontal flip, uint8 -> float,
  normalise, all batched; each batch moved to the device first, as run_trial
  does; with 1 torch thread and with one per core.
* torchvision: a ``torchvision.datasets.SVHN``-style ``Dataset`` (``__getitem__``
  turns one ``[3, 32, 32]`` array into a PIL image, as SVHN does) with
  ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
  Normalize(0.5, 0.5)])`` and a shuffling ``DataLoader``; measured with 0
  workers and with one worker per core (persistent workers, so worker start-up
  is not counted), the main process at 1 torch thread.

Each side is represented by its faster configuration (steady state).

Both produce normalised float32 ``[B, 3, 32, 32]`` batches on the device.
Samples/s over one epoch, a warm-up epoch first, then the sides alternate
(A B C A B C ...), medians.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from benchmarks.common import cpu_count, interleaved, median, now, result, svhn_like_arrays, sync, torch_threads

NAME = "data"
TITLE = "Data: whole-data-set tensors + batched augmentation vs torchvision per-sample PIL pipeline"
TARGET = 5.0     # kdray samples/s >= 5 x the torchvision pipeline's


class SVHNStyle(torch.utils.data.Dataset):
    """torchvision.datasets.SVHN's __getitem__ over in-memory arrays."""

    def __init__(self, data: np.ndarray, labels: np.ndarray, transform=None):
        self.data, self.labels, self.transform = data, labels, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], int(self.labels[index])
        img = Image.fromarray(np.transpose(img, (1, 2, 0)))
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def torchvision_transform():
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def kdray_epoch(bundle, batch_size: int, device: str, order: torch.Generator, gen: torch.Generator) -> float:
    steps = bundle.steps_per_epoch(batch_size)
    t = now()
    for xb, yb in bundle.train_batches(batch_size, steps, order):
        x = bundle.preprocess(xb.to(device, non_blocking=True), True, gen)
        y = yb.to(device, non_blocking=True)
    sync(device)
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and len(y) == len(x)
    return now() - t


def loader_epoch(it_factory, device: str) -> float:
    t = now()
    for x, y in it_factory():
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    sync(device)
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
    return now() - t


def run(quick: bool = False, device: str = "cpu", n: Optional[int] = None, batch_size: int = 256,
        reps: Optional[int] = None, workers: Optional[tuple[int, ...]] = None,
        threads: Optional[tuple[int, ...]] = None) -> dict:
    from torch.utils.data import DataLoader

    from kdray.data.bundle import DataBundle
    from kdray.data.images import image_preprocess

    t0 = now()
    n = n or (5000 if quick else 20000)
    reps = reps or (2 if quick else 3)
    workers = workers if workers is not None else tuple(dict.fromkeys((0, cpu_count())))
    threads = threads or tuple(dict.fromkeys((1, cpu_count())))
    x, y = svhn_like_arrays(n, 0)
    bundle = DataBundle("classification", 10, (3, 32, 32), torch.from_numpy(x), torch.from_numpy(y),
                        torch.from_numpy(x[:1]), torch.from_numpy(y[:1]),
                        preprocess=image_preprocess(0.5, 0.5, "crop_flip"))
    order, gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    ds = SVHNStyle(x, y, torchvision_transform())
    pin = torch.device(device).type == "cuda"
    loaders = {w: DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=w, pin_memory=pin,
                             persistent_workers=w > 0) for w in workers}
    def with_threads(k, fn):
        def f():
            with torch_threads(k):
                return fn()
        return f

    fns = {f"kdray_t{k}": with_threads(k, lambda: kdray_epoch(bundle, batch_size, device, order, gen))
           for k in threads}
    for w, dl in loaders.items():
        fns[f"torchvision_w{w}"] = with_threads(1, lambda dl=dl: loader_epoch(lambda: iter(dl), device))
    for fn in fns.values():          # warm-up epoch each (workers start, caches fill)
        fn()
    runs = interleaved(fns, reps)
    for dl in loaders.values():          # stop persistent workers
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    sps = {k: n / median(v) for k, v in runs.items()}
    best_tv = max((k for k in sps if k.startswith("torchvision")), key=sps.get)
    best_k = max((k for k in sps if k.startswith("kdray")), key=sps.get)
    ratio = sps[best_k] / sps[best_tv]
    meas = {f"{k} samples/s": v for k, v in sps.items()}
    meas.update({f"{k} epoch s (median)": median(v) for k, v in runs.items()})
    meas["best kdray / best torchvision"] = f"{best_k} / {best_tv}"
    meas["ratio best kdray / best torchvision"] = ratio
    for k in sps:
        if k.startswith("kdray"):
            for v in sps:
                if v.startswith("torchvision") and (k, v) != (best_k, best_tv):
                    meas[f"ratio {k} / {v}"] = sps[k] / sps[v]
    notes = [f"{n} synthetic SVHN-shaped images, batch {batch_size}, RandomCrop(32, padding=4) + "
             f"RandomHorizontalFlip + ToTensor + Normalize(0.5, 0.5) on both sides; kdray at torch threads "
             f"{list(threads)} (kdray_tK), torchvision with {list(workers)} workers (torchvision_wK, main process "
             f"at 1 thread); {reps} interleaved epochs per configuration after a warm-up epoch, medians.",
             "torchvision with workers: persistent workers, start-up not counted (favours torchvision)."]
    return result(NAME, TITLE, ratio, f"kdray samples/s / torchvision samples/s, best configuration of each "
                  f"({best_k} / {best_tv})",
                  f">= {TARGET}", ratio >= TARGET, meas,
                  {"quick": quick, "device": device, "n": n, "batch_size": batch_size, "reps": reps,
                   "workers": list(workers), "threads": list(threads)}, notes, now() - t0)
