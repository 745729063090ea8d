"""Generated training text: the teacher's greedy continuations of training contexts (sequence-level
KD, kdray/conditions/seqkd.py) and the student's own samples (on-policy GKD, kdray/conditions/gkd.py).

Contexts: the training token stream cut into non-overlapping windows of ``block_size``
tokens (window i starts at token ``i * block_size``); each window's first ``prompt``
tokens are a context.  The teacher (eval mode, float32 logits) extends every context
greedily, one token at a time, re-reading the whole prefix each step (no KV cache, so
any kdray LM generates), until the sequence holds ``block_size + 1`` tokens.  A student
then trains on ``x = seq[:-1]``, ``y = seq[1:]`` with the targets that are still the
corpus's (the first ``prompt - 1``) set to ``IGNORE_INDEX``: cross-entropy on the
teacher's generated tokens only.

The sequences are generated once per teacher and setting and kept in the teacher's trial
folder as ``seqkd_<digest>.npy`` (int64 ``[contexts, block_size + 1]``), where the digest
hashes the decoding rule, ``prompt``, the length and the SHA-256 of the contexts
themselves (so a student whose data differs from its teacher's, e.g. a poisoned teacher,
gets its own file).  A second student of the teacher reads the file.

The student's own samples are drawn at training time, never cached: on an on-policy step
the student (current weights, eval mode, no grad) extends each corpus row's first
``prompt`` tokens to ``block_size + 1`` by sampling (``sample_continue``), with uniforms from
a generator of (seed, step) alone (``step_generator``); the same ``IGNORE_INDEX`` targets
mark the context.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from kdray.data.bundle import DataBundle
from kdray.spec import TrialSpec
from kdray.storage import Store

IGNORE_INDEX = -100      # torch's cross_entropy default: these targets add nothing to the loss
DECODE = "greedy-v1"


def contexts(bundle: DataBundle, prompt: int) -> torch.Tensor:
    """``[M, prompt]`` int64: the first ``prompt`` tokens of each non-overlapping training window."""
    if bundle.task != "lm":
        raise ValueError(f"sequence-level KD needs a language-model data set, not task {bundle.task!r}")
    b = bundle.block_size
    if not 1 <= prompt < b:
        raise ValueError(f"seqkd: prompt must be in [1, block_size) = [1, {b}), got {prompt}")
    m = (len(bundle.train_x) - 1) // b
    if m < 1:
        raise ValueError(f"seqkd: the training split holds fewer than block_size + 1 = {b + 1} tokens")
    return bundle.train_x[:m * b].reshape(m, b)[:, :prompt].clone()


@torch.inference_mode()
def greedy_continue(model: nn.Module, prompts: torch.Tensor, length: int, device, batch_size: int = 64) -> torch.Tensor:
    """``prompts`` ``[M, p]`` extended to ``[M, length]`` by the model's argmax next token (CPU int64)."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        seq = prompts[i:i + batch_size].to(device)
        while seq.shape[1] < length:
            nxt = model(seq)[:, -1].float().argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq.cpu())
    return torch.cat(out) if out else prompts.new_zeros((0, length))


def cache_name(ctx: torch.Tensor, prompt: int, length: int) -> str:
    """The artefact name: a digest of the decoding rule, its settings and the contexts."""
    settings = {"decode": DECODE, "prompt": prompt, "length": length,
                "contexts_sha256": hashlib.sha256(ctx.numpy().astype("<i8").tobytes()).hexdigest()}
    return f"seqkd_{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]}.npy"


def teacher_sequences(teacher_spec: TrialSpec, store: Store, teacher: nn.Module, bundle: DataBundle, device,
                      prompt: int, batch_size: int = 64) -> torch.Tensor:
    """The teacher's continuations ``[M, block_size + 1]``: read from its trial folder, or generated
    and stored there."""
    ctx = contexts(bundle, prompt)
    length = bundle.block_size + 1
    name = cache_name(ctx, prompt, length)
    if store.exists(teacher_spec.trial_key, name):
        return torch.from_numpy(store.load_npy(teacher_spec.trial_key, name))
    seqs = greedy_continue(teacher, ctx, length, device, batch_size)
    store.save_npy(teacher_spec.trial_key, name, seqs.numpy())
    return seqs


def inputs_and_targets(rows: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = rows[:, :-1]``, ``y = rows[:, 1:]`` with the context's own targets (the first
    ``prompt - 1``) ignored: a loss counts the generated tokens only."""
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[:, :prompt - 1] = IGNORE_INDEX
    return x, y


def sequence_batches(seqs: torch.Tensor, prompt: int, batch_size: int, steps: int, order: torch.Generator):
    """(x, y, None) per step: rows drawn with replacement by ``order``; y's corpus targets ignored."""
    for _ in range(steps):
        rows = seqs[torch.randint(len(seqs), (batch_size,), generator=order)]
        yield (*inputs_and_targets(rows, prompt), None)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that is a function of (seed, step) alone: a rerun, or a run resumed from a
    checkpoint, draws the same numbers at every step."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8],
                                                        "little") >> 1)


@torch.no_grad()
def sample_continue(model: nn.Module, prompts: torch.Tensor, length: int, temperature: float,
                    generator: torch.Generator) -> torch.Tensor:
    """``prompts`` ``[B, p]`` extended to ``[B, length]`` by tokens sampled from
    ``softmax(logits / temperature)`` of the model's current weights (eval mode, restored after).

    Inverse-CDF sampling: one float64 uniform per row and token, drawn on the CPU from
    ``generator`` (so every device draws the same numbers), picks the first token whose
    cumulative probability exceeds it.  The whole prefix is re-read each step (no KV cache:
    any kdray LM).  No grad, but not inference mode: the result is a training input."""
    was_training = model.training
    model.eval()
    try:
        seq = prompts
        while seq.shape[1] < length:
            u = torch.rand((len(seq), 1), generator=generator, dtype=torch.float64).to(seq.device)
            probs = torch.softmax(model(seq)[:, -1].float() / temperature, dim=-1).double()
            cdf = probs.cumsum(-1)
            nxt = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
            seq = torch.cat([seq, nxt.to(seq.dtype)], dim=1)
    finally:
        model.train(was_training)
    return seq
