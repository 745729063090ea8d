"""What a trial's streamed finish costs at GPT-2's vocabulary (kdray/streamed.py), without training.

A stand-in student (a linear map from 16 random features per position to V logits) is evaluated
on N test positions (windows of 64) through ``streamed.evaluate_to_file``; its loss, accuracy,
functional metrics against a memory-mapped random teacher ([N, V] float32, scale 3) and its
test_outputs.npz are then computed and stored from the files, as ``recipe.finish_trial`` does
above ``$KDRAY_METRICS_MEMORY_BYTES``.  Prints each phase's seconds, numpy's peak allocation
(tracemalloc) and the process's peak RSS before and after (mapped file pages count there).
Run: ``python analysis/reproductions/tinyshakespeare_bpe_gpt2/streamed_trial_cost.py [N] [V]``
(default 1024 50257).
"""
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from kdray import streamed
from kdray.functional import functional_metrics_streamed
from kdray.storage import Store

n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (1024, 50257)
T = 64
torch.manual_seed(0)
torch.set_num_threads(1)
d = Path(tempfile.mkdtemp())
g = np.random.default_rng(0)
teacher = np.lib.format.open_memmap(d / "t.npy", mode="w+", dtype=np.float32, shape=(n, k))
for i in range(0, n, 64):
    teacher[i:i + 64] = g.normal(size=(min(64, n - i), k)).astype(np.float32) * 3
teacher.flush()
del teacher


class Bundle:
    num_classes = k
    test_x = torch.randn(n // T, T, 16)
    test_y = torch.randint(0, k, (n // T, T))

    def test_batches(self, batch_size):
        for i in range(0, len(self.test_x), batch_size):
            yield self.test_x[i:i + batch_size], self.test_y[i:i + batch_size]

    def preprocess(self, x, train, gen):
        return x


model, store = torch.nn.Linear(16, k), Store(str(d / "store"), "cost")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
times = {}
t0 = time.perf_counter()
with streamed.evaluate_to_file(model, Bundle(), "cpu", 1024, store.local_dir("trial")) as (logits, y):
    times["test pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    streamed.loss_and_accuracy(logits, y)
    times["loss, accuracy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    functional_metrics_streamed(np.load(d / "t.npy", mmap_mode="r"), logits, y, streamed.BLOCK_ELEMENTS)
    times["metrics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    streamed.store_outputs(store, "trial", "test_outputs.npz", logits, y)
    times["test_outputs.npz"] = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shutil.rmtree(d)
print(f"N={n} V={k} ({n * k * 4 / 2**20:.0f} MiB of float32 logits each): "
      + ", ".join(f"{name} {s:.2f} s" for name, s in times.items())
      + f"; numpy peak {peak / 2**20:.0f} MiB; peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
