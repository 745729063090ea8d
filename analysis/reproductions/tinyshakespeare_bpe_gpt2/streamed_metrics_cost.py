"""What the streamed functional metrics cost at GPT-2's vocabulary (kdray.functional.functional_metrics_streamed).

Writes two [N, V] float32 .npy files of random logits (scale 3) to a temporary folder,
memory-maps them, and times the streamed metrics with their default (max_elements 2**20,
rows of V at a time), printing the seconds and the process's peak RSS before and after (mapped
file pages count).  Run: ``python analysis/reproductions/tinyshakespeare_bpe_gpt2/streamed_metrics_cost.py [N] [V]``
(default 1024 50257).
"""
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from kdray.functional import functional_metrics_streamed
n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (1024, 50257)
d = tempfile.mkdtemp()
g = np.random.default_rng(0)
for name in ("t", "c"):
    m = np.lib.format.open_memmap(f"{d}/{name}.npy", mode="w+", dtype=np.float32, shape=(n, k))
    for i in range(0, n, 64):
        m[i:i+64] = g.normal(size=(min(64, n-i), k)).astype(np.float32) * 3
    m.flush(); del m
y = g.integers(0, k, n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = functional_metrics_streamed(np.load(f"{d}/t.npy", mmap_mode="r"), np.load(f"{d}/c.npy", mmap_mode="r"), y)
dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shutil.rmtree(d)
print(f"N={n} K={k} inputs {2*n*k*4/2**20:.0f} MiB on disk; {dt:.2f} s; peak RSS {before/1024:.0f} -> {after/1024:.0f} MiB")
