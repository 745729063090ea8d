"""The in-memory ``DataBundle`` every loader returns, and the loaders' shared helpers.

Small data sets live as whole tensors (the airbench way): a loader reads the
data set's own on-disk format once and returns a ``DataBundle``; the training
loop slices batches out of it with index tensors and applies batched
preprocessing.  No per-sample PIL pipelines, no DataLoader workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

# (x_batch, train, generator) -> float tensor ready for the model, row by row (a packed trial
# preprocesses its students' batches in one call when nothing in it is random)
Preprocess = Callable[[torch.Tensor, bool, Optional[torch.Generator]], torch.Tensor]


def default_preprocess(x: torch.Tensor, train: bool, gen: Optional[torch.Generator]) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


@dataclass
class DataBundle:
    """A whole data set in memory.

    task "classification": ``train_x[N, ...]``, ``train_y[N]`` (int64), same
    for test.  task "lm": ``train_x`` is the 1-D int64 token stream of the
    training split (``train_y`` is None, batches are random windows of
    ``block_size``); ``test_x``/``test_y`` are ``[M, block_size]`` windows
    of inputs and next-token targets, so every predicted position of the test
    split is one test input.
    """

    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_x: torch.Tensor
    train_y: Optional[torch.Tensor]
    test_x: torch.Tensor
    test_y: torch.Tensor
    preprocess: Preprocess = default_preprocess
    block_size: Optional[int] = None
    vocab: Optional[str] = None  # lm: the characters, index = token id
    extras: dict = field(default_factory=dict)  # loader-specific (e.g. clean test text)

    @property
    def n_train(self) -> int:
        return len(self.train_x) if self.task == "classification" else len(self.train_x) - self.block_size

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.task != "classification":
            raise ValueError("language-model data sets count iterations, not epochs")
        return -(-len(self.train_x) // batch_size)

    def train_index_batches(self, batch_size: int, steps: int, order: torch.Generator) -> Iterator[torch.Tensor]:
        """Classification: the row indices of ``steps`` batches, a fresh permutation per epoch."""
        n = len(self.train_x)
        done = 0
        while done < steps:
            perm = torch.randperm(n, generator=order)
            for i in range(0, n, batch_size):
                if done == steps:
                    return
                yield perm[i:i + batch_size]
                done += 1

    def train_draws(self, batch_size: int, steps: int, order: torch.Generator) -> Iterator[torch.Tensor]:
        """What ``order`` draws for each of ``steps`` batches: row indices (classification; a
        fresh permutation per epoch, last partial batch kept) or window starts (LM: uniformly
        random offsets)."""
        if self.task == "classification":
            yield from self.train_index_batches(batch_size, steps, order)
            return
        for _ in range(steps):
            yield torch.randint(len(self.train_x) - self.block_size, (batch_size,), generator=order)

    def take(self, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw training batch for ``draws`` of any leading shape: a packed trial stacks its
        students' draws ``[K, B]`` and takes their K batches in one indexing operation."""
        if self.task == "classification":
            return self.train_x[draws], self.train_y[draws]
        idx = draws[..., None] + torch.arange(self.block_size)
        return self.train_x[idx], self.train_x[idx + 1]

    def train_batches(self, batch_size: int, steps: int, order: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` raw training batches, their order drawn from ``order`` (``train_draws``)."""
        for draws in self.train_draws(batch_size, steps, order):
            yield self.take(draws)

    def augments(self) -> bool:
        """Whether training preprocessing is random: it draws from its generator (even where the
        draw changes nothing), or two generators give different inputs for the first 16 rows."""
        x, _ = self.take(torch.arange(min(16, self.n_train)))
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        before = g1.get_state()
        a, b = self.preprocess(x, True, g1), self.preprocess(x, True, g2)
        return not torch.equal(g1.get_state(), before) or not torch.equal(a, b)

    def train_inputs_are_fixed(self) -> bool:
        """True when a training input reaches the model the same way every time (no random
        augmentation), so a teacher's outputs on the training set can be computed once."""
        if self.task != "classification" or type(self).train_batches is not DataBundle.train_batches:
            return False
        x = self.train_x[:16]
        return not self.augments() and torch.equal(self.preprocess(x, True, torch.Generator().manual_seed(1)),
                                                   self.preprocess(x, False, None))

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.test_x), batch_size):
            yield self.test_x[i:i + batch_size], self.test_y[i:i + batch_size]


CACHE_ENV = "KDRAY_CACHE"


def disk_cached(name: str, data_dir: Optional[Path], settings: dict, build: Callable[[], dict],
                cache_dir: str | os.PathLike | None = None) -> tuple[dict, Path, bool]:
    """Tensors a loader derives from raw files (decoded images, spectrograms), built once.

    The file is ``<dir>/<name>-<hash of settings>.pt`` where ``<dir>`` is ``cache_dir`` if
    given, else the first writable of ``$KDRAY_CACHE/<name>``, ``<data_dir>/.kdray_cache``
    and ``~/.cache/kdray/<name>`` (a hit is looked for in the same places; ``data_dir`` None:
    a data set with no files of its own).  Setting
    ``$KDRAY_CACHE`` keeps caches out of a shared data root.  ``settings`` must hold
    everything the tensors depend on (loader options and a signature of the source
    files), so a changed setting or file set builds a new entry rather than reading a
    stale one.  The file is written atomically (temp file + rename), so concurrent trials
    at worst build it twice, and read back memory-mapped.  Returns ``(tensors, path, hit)``.
    """
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    fname = f"{name}-{key}.pt"
    if cache_dir is not None:
        dirs = [Path(cache_dir).expanduser()]
    else:
        env = os.environ.get(CACHE_ENV)
        dirs = (([Path(env).expanduser() / name] if env else [])
                + ([Path(data_dir) / ".kdray_cache"] if data_dir is not None else [])
                + [Path.home() / ".cache" / "kdray" / name])
    for d in dirs:
        if (d / fname).is_file():
            try:
                return torch.load(d / fname, map_location="cpu", weights_only=True, mmap=True), d / fname, True
            except Exception as e:  # a truncated or foreign file: rebuild it
                warnings.warn(f"ignoring unreadable cache {d / fname}: {e}")
    tensors = build()
    for d in dirs:
        tmp = d / f".{fname}.{os.getpid()}.tmp"
        try:
            d.mkdir(parents=True, exist_ok=True)
            torch.save(tensors, tmp)
            os.replace(tmp, d / fname)
            return tensors, d / fname, False
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    warnings.warn(f"could not write the {name} cache in any of {[str(d) for d in dirs]}; "
                  f"set cache_dir or ${CACHE_ENV} to a writable folder")
    return tensors, dirs[0] / fname, False


def files_signature(paths, base: Path) -> list:
    """(relative path, size) of each file: enough to notice an edited or changed file set."""
    return [(str(Path(p).relative_to(base)), os.stat(p).st_size) for p in paths]
