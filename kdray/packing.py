"""Packed trials: K students of one architecture, data set and recipe trained in one process.

Small models spend their steps in per-operation overhead; training K of them
as one stacked model (``torch.func.stack_module_state`` and one forward for all
K) pays that overhead once.  Each student keeps what makes it a
pure function of its own spec: its initial weights (``init_model``), its batch
order and augmentation generators, its objective (condition, alpha,
temperature), its teacher, and its own optimiser state (the stacked Adam/SGD
update is elementwise, so it equals K separate optimisers; grad clipping is
applied per student).  Losses are summed, so each student's gradient is its
own loss's gradient.  After training every student is unstacked into a module
and written by ``recipe.finish_trial``, exactly as ``run_trial`` writes it.

The forward is the model family's stacked forward (kdray/stacked: grouped
convolutions for plain Sequential nets, batched matmuls for kdray's GPT), else
``functional_call`` under vmap.  Dropout masks come from each student's own
generator, seeded from its data seed as ``run_trial`` seeds the global one.

What can differ from training alone: batched and grouped operations round
differently from unbatched ones, so results agree within a tolerance
(docs/benchmarks.md, "Packed trials"), not bit for bit.  Which students pack
is the plan's decision (kdray/packplan.py: BatchNorm and dropout > 0 in models
left to vmap, feature-matching conditions, FFCV data sets and
compiled/bf16/channels-last recipes train one student per trial); ``run_pack``
only re-checks it on the built models and fails if they disagree.  Packs are cut
from the plan (``packplan.jobs`` over every planned student), never from what is
left to run, and a pack always trains whole: a student's stored result is then
the same bytes whether its sweep ran straight through or was killed and resumed.  Resume
is per student: a student whose ``result.json`` is stored is not stored or logged again.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdray import conditions
from kdray.contracts import EPOCH, FAILURE
from kdray.data import load_dataset
from kdray.losses import Batch, per_student
from kdray.packplan import by_loss_group as _by_loss_group
from kdray.packplan import group_key as _group_key
from kdray.packplan import loss_key as _loss_key
from kdray.packplan import asks_to_pack, jobs, pack_groups, unpackable  # noqa: F401 - re-exported
from kdray.recipe import (derive_seed, finish_trial, init_model, load_teacher,
                          loss_and_accuracy, lr_factor, OPTIMIZERS, teacher_train_logits)
from kdray.spec import TrialSpec
from kdray.stacked import stacked_forward
from kdray.storage import Store
from kdray.sweep import Recipe


def _math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """Attention from matmul/softmax, which vmap batches (the fused CPU kernel has no batching rule
    and falls back to a per-student loop).  Dropout is never > 0 here (``unpackable``)."""
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        n, m = q.shape[-2], k.shape[-2]
        s = s.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, dim=-1) @ v


@contextmanager
def _vmappable_attention():
    """Swap in ``_math_sdpa`` for the packed forward only (this process trains one pack at a time)."""
    F = torch.nn.functional
    fused, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _math_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = fused


def packed_forward(base: nn.Module) -> Callable:
    """(stacked params, stacked buffers, x [K, B, ...], per-student dropout generators) ->
    [K, B, ...]: the model family's own stacked forward where kdray/stacked has one (faster on
    small models, and the only one that trains BatchNorm and dropout per student), else
    ``functional_call`` under vmap."""
    stacked = stacked_forward(base)
    if stacked is not None:
        return stacked

    def fwd(p, b, x):
        with _vmappable_attention():
            return functional_call(base, (p, b), (x,))

    batched = vmap(fwd)
    return lambda p, b, x, rngs=(): batched(p, b, x)


class _Teacher:
    """The pack's one teacher (packs are cut per teacher: ``_group_key``), loaded once: the frozen
    model, its test logits and, on fixed training inputs, its training-set logits."""

    def __init__(self, spec: TrialSpec, store: Store, bundle, device, r: Recipe, needs_logits: bool):
        self.model = self.test_logits = self.cache = None
        if spec.role != "student":
            return
        self.model, self.test_logits = load_teacher(spec, store, bundle, device)
        if needs_logits and bundle.train_inputs_are_fixed():
            self.cache = teacher_train_logits(spec.teacher, store, self.model, bundle, device, r.eval_batch_size)

    @torch.no_grad()
    def logits(self, draws: torch.Tensor, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """[K, B, ...] teacher logits on each student's batch (looked up in the cache, or one
        forward over the ``rows`` students that need them; the other rows stay zero)."""
        if self.cache is not None:
            return self.cache[draws].to(x.device)
        out = self.model(x[rows].flatten(0, 1)).unflatten(0, (len(rows), -1))
        if len(rows) == x.shape[0]:
            return out
        full = out.new_zeros(x.shape[0], *out.shape[1:])
        full[rows] = out
        return full


class _Student:
    """One packed student's own state: spec, generators (order, augmentation, dropout), objective."""

    def __init__(self, spec: TrialSpec, device):
        self.spec, self.cond = spec, spec.condition
        self.objective = conditions.teacher_objective() if self.cond is None else self.cond.objective(spec.params)
        self.needs_logits = self.cond is not None and self.cond.teacher == "logits"
        self.order = torch.Generator().manual_seed(derive_seed(spec.data_seed, "order"))
        self.augment = torch.Generator().manual_seed(derive_seed(spec.data_seed, "augment"))
        self.noise_seed = derive_seed(spec.data_seed, "fm_noise")
        # run_trial seeds the global generator with this and only dropout draws from it
        self.dropout = torch.Generator(device).manual_seed(derive_seed(spec.data_seed, "dropout"))
        self.history: list[dict] = []
        self.failed = ""          # why it diverged; a diverged student no longer counts, the others go on


def _pack_batches(bundle, students: Sequence[_Student], batch_size: int, steps: int, device):
    """Per step: the students' draws ``[K, B]`` and preprocessed inputs ``[K, B, ...]`` and targets,
    each student's batch drawn by its own ``order`` generator as ``run_trial`` draws it.  The K
    batches are taken in one indexing operation, and preprocessed in one call unless the data set
    augments (then each student's batch with its own ``augment`` generator)."""
    shared = not bundle.augments()
    draws = [bundle.train_draws(batch_size, steps, st.order) for st in students]
    for step_draws in zip(*draws):
        idx = torch.stack(step_draws)
        xb, yb = bundle.take(idx)
        xb, yb = xb.to(device), yb.to(device)
        if shared:
            x = bundle.preprocess(xb.flatten(0, 1), True, students[0].augment).unflatten(0, idx.shape[:2])
        else:
            x = torch.stack([bundle.preprocess(xb[i], True, st.augment) for i, st in enumerate(students)])
        yield idx, x, yb


def _ignore(key: str, metrics: dict) -> None:
    return None


def run_pack(specs: Sequence[TrialSpec], store: Store, device: str | torch.device = "cpu",
             report: Callable[[str, dict], None] = _ignore, simulated: Optional[str] = None) -> dict[str, dict]:
    """Train one pack; returns {trial_key: final metrics} of the students it stored.

    The whole pack trains, always: a student's numbers depend (in the last bits) on which
    pack-mates share its stacked operations, so a pack that resumes after a crash trains the
    same students as it did the first time, and stores and reports only those without a stored
    result.  ``report(trial_key, record)`` gets those students' epoch records and final metrics
    as ``run_trial``'s report does, and ``{FAILURE: why}`` for a student that diverged (the
    others train on: each student's gradient is its own loss's)."""
    device = torch.device(device)
    members = _by_loss_group(specs)
    wanted = {s.trial_key for s in members if not store.exists(s.trial_key, "result.json")}
    if not wanted:
        return {}
    given = report
    report = lambda key, metrics: given(key, metrics) if key in wanted else None  # noqa: E731
    if len({_group_key(s) for s in members}) != 1:
        raise ValueError("a pack's specs must share arch, dataset and recipe")
    t0 = time.perf_counter()
    s0 = members[0]
    r = Recipe(**s0.recipe)
    bundle = load_dataset(s0.dataset, s0.data_root, **s0.dataset_args)
    models = [init_model(s, bundle).to(device) for s in members]
    for s, m in zip(members, models):   # the plan decided (kdray/packplan.py); this is its safety net
        why = unpackable(s, m, bundle)
        if why:
            raise ValueError(f"trial {s.label} cannot be packed: {why} (the plan packed it: the packing "
                             f"declaration of architecture {s.arch!r} or data set {s.dataset!r} disagrees "
                             f"with the built model; see kdray/packplan.py)")
    students = [_Student(s, device) for s in members]
    rngs = [st.dropout for st in students]
    teacher = _Teacher(s0, store, bundle, device, r, any(st.needs_logits for st in students))
    needs_logits = [i for i, st in enumerate(students) if st.needs_logits]
    params, buffers = stack_module_state(models)
    base = models[0]
    leaves = list(params.values())
    k_students = len(members)

    vfwd = packed_forward(base)
    if bundle.task == "classification":
        steps_per_epoch, epochs = bundle.steps_per_epoch(r.batch_size), r.epochs
        total = steps_per_epoch * epochs
    else:
        steps_per_epoch, total = r.log_every, r.iterations
        epochs = -(-total // steps_per_epoch)
    opt = _optimizer(r, leaves)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(r, s, steps_per_epoch, epochs))
    if not r.train:
        epochs = 0
    step = 0
    loss_groups = _loss_groups(students)
    base.train()
    for epoch in range(epochs):
        n_steps = min(steps_per_epoch, total - epoch * steps_per_epoch)
        loss_sum = torch.zeros(k_students, device=device)
        correct = torch.zeros(k_students, device=device, dtype=torch.long)
        seen = 0
        for idx, x, y_all in _pack_batches(bundle, students, r.batch_size, n_steps, device):
            logits = vfwd(params, buffers, x, rngs)
            teacher_logits = teacher.logits(idx, x, needs_logits) if needs_logits else None
            loss_vec = _losses(students, loss_groups, logits, y_all, teacher_logits, step)
            opt.zero_grad(set_to_none=True)
            loss_vec.sum().backward()   # d(sum)/d(loss_i) = 1: a diverged student's NaNs stay in its slices
            if r.grad_clip:  # per student: each student's own global norm over its slices
                norms = torch.stack([p.grad.reshape(k_students, -1).norm(dim=1) for p in leaves]).norm(dim=0)
                scale = (r.grad_clip / (norms + 1e-6)).clamp(max=1.0)
                for p in leaves:
                    p.grad.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
            opt.step()
            sched.step()
            n = y_all[0].numel()
            loss_sum += loss_vec.detach() * n
            correct += (logits.detach().argmax(-1) == y_all).reshape(k_students, -1).sum(1)
            seen += n
            step += 1
        lr = opt.param_groups[0]["lr"]
        evals = r.eval_every and (epoch + 1) % r.eval_every == 0 and epoch + 1 < epochs
        if evals:
            test = _pack_test_metrics(base, params, buffers, bundle, device, r,
                                      [store.local_dir(st.spec.trial_key) for st in students])
            base.train()
        for i, st in enumerate(students):
            if st.failed:
                continue
            train_loss = float(loss_sum[i]) / seen
            if not math.isfinite(train_loss):
                st.failed = f"TrialDiverged: training loss is {train_loss} at epoch {epoch + 1} (trial {st.spec.label})"
                report(st.spec.trial_key, {FAILURE: st.failed})
                continue
            metrics = {EPOCH: epoch + 1, "train_loss": train_loss, "train_acc": int(correct[i]) / seen, "lr": lr}
            if evals:    # as run_trial: the test metrics of the weights at this epoch
                metrics["test_loss"], metrics["test_acc"] = test[i]
            st.history.append(metrics)
            report(st.spec.trial_key, metrics)
    seconds = time.perf_counter() - t0
    live = [i for i, st in enumerate(students) if not st.failed]
    if not live:
        return {}
    out = {}
    live_params, live_buffers = {n: p[live] for n, p in params.items()}, {n: b[live] for n, b in buffers.items()}
    folders = [store.local_dir(students[i].spec.trial_key) for i in live]
    with _pack_outputs(base, live_params, live_buffers, bundle, device, r, folders) as (logits, y):
        similarity = _similarity(teacher, len(live), logits, y)
        for j, i in enumerate(live):
            st, key = students[i], students[i].spec.trial_key
            if key not in wanted:     # stored by an earlier run of this same pack
                continue
            out[key] = finish_trial(st.spec, store, _unstack(models[i], params, buffers, i), bundle, device, r,
                                    teacher.test_logits, st.history, seconds,
                                    lambda metrics, state=None, key=key: report(key, metrics),
                                    outputs=(logits[j], y), similarity=similarity[j], pack=members,
                                    simulated=simulated)
    return out


def _pack_test_metrics(base: nn.Module, params: dict, buffers: dict, bundle, device, r: Recipe,
                       folders: list) -> list[tuple[float, float]]:
    """Each student's (test loss, test accuracy) during training, from memory or from files."""
    from kdray import streamed

    with _pack_outputs(base, params, buffers, bundle, device, r, folders) as (logits, y):
        loss_acc = streamed.loss_and_accuracy if isinstance(logits, list) else loss_and_accuracy
        return [loss_acc(logits[i], y) for i in range(len(folders))]


@contextmanager
def _pack_outputs(base: nn.Module, params: dict, buffers: dict, bundle, device, r: Recipe, folders: list):
    """The live students' test logits and the labels: [S, N, C] in memory, or, when one student's
    are too large to hold (kdray/streamed.py), S read-only [N, C] memmaps in their trial folders."""
    from kdray import streamed

    if not streamed.bundle_streams(bundle):
        yield _evaluate_pack(base, params, buffers, bundle, device, _eval_rows(r, len(folders)))
        return
    with streamed.logits_files(*streamed.outputs_shape(bundle), folders) as files:
        y = _evaluate_pack(base, params, buffers, bundle, device,
                           streamed.eval_rows(bundle, _eval_rows(r, len(folders)), len(folders)), files)[1]
        yield [streamed.read_only(f) for f in files], y


def _optimizer(r: Recipe, leaves: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The recipe's optimiser over the stacked parameters: torch's fused kernel (one per tensor;
    3-4x faster than foreach on a CPU, and within float32 rounding of the per-parameter update
    ``run_trial`` uses), or foreach where the device has no fused kernel."""
    try:
        return OPTIMIZERS[r.optimizer](leaves, r, fused=True)
    except RuntimeError:
        return OPTIMIZERS[r.optimizer](leaves, r, foreach=True)


def _loss_groups(students: Sequence[_Student]) -> list[slice]:
    """The runs of consecutive students with one ``_loss_key`` (``run_pack`` orders them so)."""
    keys = [_loss_key(st.spec, i) for i, st in enumerate(students)]
    starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [len(keys)])]


def _losses(students: Sequence[_Student], groups: list[slice], logits: torch.Tensor, y: torch.Tensor,
            teacher_logits: Optional[torch.Tensor], step: int) -> torch.Tensor:
    """[K] losses, each student's own objective on its own slice of the stacked logits
    (``teacher_logits``: [K, ...], rows of students that need none are unused)."""
    pieces = []
    for at in groups:
        st, n = students[at.start], at.stop - at.start
        t = teacher_logits if st.needs_logits else None
        if n == 1:
            i = at.start
            batch = Batch(logits[i], y[i], None if t is None else t[i], seed=st.noise_seed, step=step)
            pieces.append(st.objective(batch).unsqueeze(0))
            continue
        with per_student(n):
            out = st.objective(Batch(logits[at], y[at], None if t is None else t[at]))
        if out.shape != (n,):
            raise ValueError(f"condition {st.cond.name!r} is declared rowwise but its objective gave shape "
                             f"{tuple(out.shape)} for {n} students: take its means with "
                             "kdray.losses.row_mean, or declare rowwise=False")
        pieces.append(out)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _eval_rows(r: Recipe, k: int) -> int:
    """Test rows per batch of a pack's evaluation: K x rows near one evaluation batch's size."""
    return max(r.batch_size, r.eval_batch_size // k)


@torch.inference_mode()
def _evaluate_pack(base: nn.Module, params: dict, buffers: dict, bundle, device,
                   rows: int, files: Optional[list] = None) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Every student's test logits in one packed pass per batch ([S, N, C] float32, CPU) and the
    labels, as ``recipe.evaluate`` gives one student's; each batch is preprocessed once for all S.
    ``rows`` per batch keeps S x rows near a training step's size.  With ``files`` (S writable
    [N, C] arrays) each student's rows are written there instead, and the logits returned are None."""
    base.eval()
    vfwd = packed_forward(base)
    k = next(iter(params.values())).shape[0]
    outs, ys, at = [], [], 0
    for xb, yb in bundle.test_batches(rows):
        x = bundle.preprocess(xb.to(device), False, None)
        logits = vfwd(params, buffers, x.expand(k, *x.shape)).float()
        logits = logits.reshape(logits.shape[0], -1, logits.shape[-1]).cpu()
        ys.append(yb.reshape(-1))
        if files is None:
            outs.append(logits)
            continue
        for f, student in zip(files, logits.numpy()):
            f[at:at + student.shape[0]] = student
        at += logits.shape[1]
    return (torch.cat(outs, dim=1) if files is None else None), torch.cat(ys)


def _similarity(teacher: _Teacher, n: int, logits: torch.Tensor, y: torch.Tensor) -> list[Optional[dict]]:
    """Each student's functional metrics against the pack's teacher, in one batched call; one student
    at a time, streamed and without Procrustes, when the students' logits are too large to hold
    (``logits`` is then a list of memmaps, kdray/streamed.py; the teacher's are mapped too)."""
    from kdray import streamed
    from kdray.functional import functional_metrics_many, functional_metrics_streamed

    if teacher.test_logits is None:
        return [None] * n
    if isinstance(logits, list):
        return [functional_metrics_streamed(teacher.test_logits, logits[i], y, streamed.BLOCK_ELEMENTS)
                for i in range(n)]
    return functional_metrics_many(torch.from_numpy(teacher.test_logits), logits, y)


def _unstack(model: nn.Module, params: dict, buffers: dict, i: int) -> nn.Module:
    """Student ``i``'s weights copied into its own module, by name as stacked (named_* dedups tied
    weights the same way)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name][i])
        for name, b in model.named_buffers():
            b.copy_(buffers[name][i])
    return model
