"""One trial, top to bottom: data -> model -> objective -> train -> test outputs -> metrics.

``run_trial(spec, store)`` is a pure function of the TrialSpec (and, for a
student, its teacher's stored artefacts).  It knows nothing about Ray or
MLflow: the engine passes ``report`` (called at every epoch end with the
epoch's metrics and, every ``checkpoint_every`` epochs, a resumable state) and
``restore`` (the last such state, after a worker crash).
"""
from __future__ import annotations

import copy
import hashlib
import io
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from kdray import conditions, generation
from kdray.contracts import EPOCH, FINAL
from kdray.data import load_dataset
from kdray.data.bundle import DataBundle
from kdray.losses import Batch
from kdray.models import block_output, build_model
from kdray.spec import TrialSpec
from kdray.storage import RUN_FILE, Store
from kdray.sweep import Recipe

Report = Callable[[dict, Optional[dict]], None]


class TrialDiverged(RuntimeError):
    """The training loss became NaN or inf; the trial stops and is marked failed."""


class TeacherArtifactError(RuntimeError):
    """A student's teacher has no usable checkpoint or test outputs in storage."""


def derive_seed(seed: int, purpose: str) -> int:
    """Independent, stable sub-seeds (data order, augmentation, dropout) from one seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "little") >> 1


def init_model(spec: TrialSpec, bundle: DataBundle) -> nn.Module:
    """The model at initialisation: a function of ``init_seed`` alone (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return build_model(spec.arch, bundle.num_classes, bundle.input_shape, **spec.arch_args)


def load_teacher(spec: TrialSpec, store: Store, bundle: DataBundle, device) -> tuple[nn.Module, np.ndarray]:
    """The frozen teacher (eval mode) and its float32 test logits, from storage (memory-mapped when
    they are too large to hold: kdray/streamed.py)."""
    from kdray.streamed import teacher_test_logits
    t = spec.teacher
    try:
        state = torch.load(io.BytesIO(store.read_bytes(t.trial_key, "model.pt")), map_location=device,
                           weights_only=True)
        logits = teacher_test_logits(store, t.trial_key)
        model = build_model(t.arch, bundle.num_classes, bundle.input_shape, **t.arch_args)
        model.load_state_dict(state)
    except Exception as e:  # missing, truncated or mismatched artefacts
        raise TeacherArtifactError(f"teacher {t.label} (trial {t.trial_key}) has no usable artefacts in "
                                   f"{store.trial_dir(t.trial_key)}: {type(e).__name__}: {e}") from None
    model.to(device).eval().requires_grad_(False)
    return model, logits


# ------------------------------------------------------------------ optimiser

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, r, **kw: torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay, **kw),
    "adamw": lambda params, r, **kw: torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay, **kw),
    "sgd": lambda params, r, **kw: torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                                                   weight_decay=r.weight_decay, **kw),
}   # **kw: torch's implementation switches (packs ask for fused: one kernel per stacked tensor)


def make_optimizer(r: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[r.optimizer](model.parameters(), r)


def lr_factor(r: Recipe, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning-rate multiplier at a step; schedules are defined in epochs, as the paper's."""
    epoch = step // steps_per_epoch
    if r.schedule == "cosine":
        t_max = r.cosine_t_max or epochs
        return 0.5 * (1 + math.cos(math.pi * min(epoch, t_max) / t_max))
    if r.schedule == "step":
        return r.gamma ** (epoch // r.step_size)
    if r.schedule == "warmup_step":
        frac = step / steps_per_epoch
        warm = min(1.0, (frac + 1e-9) / r.warmup_epochs) if r.warmup_epochs > 0 else 1.0
        return warm * r.gamma ** (epoch // r.step_size)
    return 1.0


# ------------------------------------------------------------------ evaluation

def _flatten(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


@torch.inference_mode()
def evaluate(model: nn.Module, bundle: DataBundle, device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test logits (float32, one row per test input) and labels, on the CPU."""
    model.eval()
    outs, ys = [], []
    for xb, yb in bundle.test_batches(batch_size):
        logits = model(bundle.preprocess(xb.to(device), False, None))
        logits, yb = _flatten(logits.float(), yb)
        outs.append(logits.cpu())
        ys.append(yb)
    return torch.cat(outs), torch.cat(ys)


def loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy); the accuracy is the exact rate k/n in float64, never a float32
    mean: two students' equal count differences must be equal differences, or a rank test would
    break their tie (docs/statistics.md)."""
    correct = int((logits.argmax(-1) == y).sum())
    return float(nn.functional.cross_entropy(logits, y)), correct / y.numel()


def eval_loss_and_accuracy(model: nn.Module, bundle: DataBundle, device, batch_size: int,
                           folder) -> tuple[float, float]:
    """``loss_and_accuracy`` of a test pass; through a temporary file in ``folder`` when the test
    logits are too large to hold (kdray/streamed.py)."""
    from kdray import streamed

    if not streamed.bundle_streams(bundle):
        return loss_and_accuracy(*evaluate(model, bundle, device, batch_size))
    with streamed.evaluate_to_file(model, bundle, device, batch_size, folder) as (logits, y):
        return streamed.loss_and_accuracy(logits, y)


# ------------------------------------------------------------------ the trial

def run_trial(spec: TrialSpec, store: Store, report: Optional[Report] = None,
              restore: Optional[Callable[[], Optional[dict]]] = None, device: str | torch.device = "cpu",
              shard=None, simulated: Optional[str] = None) -> dict:
    """``shard`` (a ``kdray.distributed.Shard``): train this rank's rows of every global batch under DDP;
    ``simulated``: what this run only simulates (kdray/simulation.py), recorded in its fingerprint."""
    report = report or (lambda metrics, state=None: None)
    device = torch.device(device)
    t0 = time.perf_counter()
    r = Recipe(**spec.recipe)
    bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)
    model = init_model(spec, bundle)
    if spec.checkpoint:   # a pretrained teacher: its weights, checked against the planned SHA-256
        from kdray import checkpoints
        checkpoints.load_into(model, spec.checkpoint, spec.arch, spec.arch_args, spec.checkpoint_sha256)
    model = model.to(device)
    fmt = torch.channels_last if r.channels_last and len(bundle.input_shape) == 3 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = shard.wrap(model) if shard is not None else model  # the module trained (DDP when sharded)
    if r.compile:
        net = torch.compile(net)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.precision == "bf16")
    cond = spec.condition   # None for a teacher: plain cross-entropy
    objective = conditions.teacher_objective() if cond is None else cond.objective(spec.params)
    teacher = teacher_logits = None
    if spec.role == "student":
        teacher, teacher_logits = load_teacher(spec, store, bundle, device)
    # KD on inputs that are never augmented: the teacher's training-set outputs are
    # computed once (by the teacher trial) and looked up per batch, not recomputed.
    train_cache = None
    if cond is not None and cond.teacher == "logits" and shard is None and bundle.train_inputs_are_fixed():
        train_cache = teacher_train_logits(spec.teacher, store, teacher, bundle, device, r.eval_batch_size)
    # Sequence-level KD: the teacher's greedy continuations of the training contexts, generated
    # once per teacher and setting (kdray/generation.py), replace the corpus windows.
    sequences = None
    if cond is not None and cond.teacher == "sequences":
        sequences = generation.teacher_sequences(spec.teacher, store, teacher, bundle, device, spec.params["prompt"],
                                                 r.eval_batch_size)

    # Seeds: the data seed alone fixes batch order, augmentation and dropout, so
    # KD, SIDDO and RCD with the same student seed see the same batches.
    order = torch.Generator().manual_seed(derive_seed(spec.data_seed, "order"))
    augment = torch.Generator().manual_seed(derive_seed(spec.data_seed, "augment"))
    torch.manual_seed(derive_seed(spec.data_seed, "dropout"))

    if bundle.task == "classification":
        if r.epochs is None:
            raise ValueError(f"setup {spec.setup}: dataset {spec.dataset!r} is classification; give recipe.epochs")
        steps_per_epoch, epochs, total = bundle.steps_per_epoch(r.batch_size), r.epochs, None
        total = steps_per_epoch * epochs
    else:
        if r.iterations is None:
            raise ValueError(f"setup {spec.setup}: dataset {spec.dataset!r} is a language model; give recipe.iterations")
        steps_per_epoch, total = r.log_every, r.iterations
        epochs = -(-total // steps_per_epoch)
    opt = make_optimizer(r, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(r, s, steps_per_epoch, epochs))

    if not r.train:  # e.g. a pretrained teacher loaded through its arch args: evaluate only
        epochs = 0
    start_epoch, history = 0, []
    state = restore() if restore else None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        order.set_state(state["order_rng"])
        augment.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])

    noise_seed = derive_seed(spec.data_seed, "fm_noise")
    # On-policy steps (GKD): the student's own samples replace some corpus batches, drawn from a
    # generator of (this seed, step) alone (kdray/generation.py), so a resumed run draws the same.
    on_policy = cond.on_policy(spec.params) if cond is not None and cond.on_policy is not None else None
    policy_seed = derive_seed(spec.data_seed, "on_policy")
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        if hasattr(bundle, "set_epoch"):  # streaming loaders (FFCV): per-epoch resolution
            bundle.set_epoch(epoch)
        model.train()
        n_steps = min(steps_per_epoch, total - epoch * steps_per_epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        batches = (_train_batches(bundle, r.batch_size, n_steps, order, train_cache) if sequences is None else
                   generation.sequence_batches(sequences, spec.params["prompt"], r.batch_size, n_steps, order))
        for xb, yb, cached in batches:
            xb = bundle.preprocess(xb.to(device, non_blocking=True), True, augment)
            yb = yb.to(device, non_blocking=True)
            swap = on_policy(model, xb, policy_seed, step) if on_policy is not None else None
            if swap is not None:     # the teacher scores the samples live: no cached logits
                (xb, yb), cached = swap, None
            if shard is not None:  # this rank's rows; scale makes DDP's gradient mean the global-batch mean
                xb, yb, grad_scale = shard.split(xb, yb)
            with autocast:
                batch = _forward(net, teacher, cond, spec.params, xb.contiguous(memory_format=fmt) if xb.dim() == 4 else xb,
                                 yb, noise_seed, step, cached)
                batch.sampled = swap is not None
                loss = objective(batch)
            opt.zero_grad(set_to_none=True)
            (loss if shard is None else loss * grad_scale).backward()
            if r.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            sched.step()
            masked = sequences is not None or swap is not None    # context targets are ignored
            n = int((yb != generation.IGNORE_INDEX).sum()) if masked else yb.numel()
            if n:  # (a rank's shard of a last batch can be empty)
                loss_sum += loss.detach() * n
            correct += (batch.logits.detach().argmax(-1) == yb).sum()
            seen += n
            step += 1
        # One host sync per epoch, for the curves and the divergence check.
        if shard is not None:
            loss_sum, correct, seen = shard.epoch_totals(loss_sum, correct, seen)
        train_loss = float(loss_sum) / seen
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss is {train_loss} at epoch {epoch + 1} (trial {spec.label})")
        metrics = {EPOCH: epoch + 1, "train_loss": train_loss, "train_acc": int(correct) / seen,
                   "lr": opt.param_groups[0]["lr"]}
        if r.eval_every and (epoch + 1) % r.eval_every == 0 and epoch + 1 < epochs:
            metrics["test_loss"], metrics["test_acc"] = eval_loss_and_accuracy(model, bundle, device, r.eval_batch_size,
                                                                               store.local_dir(spec.trial_key))
        history.append(metrics)
        ckpt = None
        if r.checkpoint_every and (epoch + 1) % r.checkpoint_every == 0 and epoch + 1 < epochs:
            # A copy, not live references: the state must not move on with training.
            ckpt = copy.deepcopy({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "order_rng": order.get_state(),
                                  "augment_rng": augment.get_state(), "torch_rng": torch.get_rng_state()})
        report(metrics, ckpt)

    if shard is not None and not shard.is_main:
        return {}  # rank 0 evaluates, reports and writes the artefacts
    return finish_trial(spec, store, model, bundle, device, r, teacher_logits, history, time.perf_counter() - t0, report,
                        simulated=simulated)


def _train_batches(bundle: DataBundle, batch_size: int, steps: int, order: torch.Generator,
                   cache: Optional[torch.Tensor]):
    """(x, y, cached teacher logits or None) per step, in the order ``order`` draws."""
    if cache is None:
        for xb, yb in bundle.train_batches(batch_size, steps, order):
            yield xb, yb, None
    else:
        for idx in bundle.train_index_batches(batch_size, steps, order):
            yield bundle.train_x[idx], bundle.train_y[idx], cache[idx]


@torch.inference_mode()
def training_set_logits(model: nn.Module, bundle: DataBundle, device, batch_size: int) -> torch.Tensor:
    """The model's float32 logits on every training input, as a KD student would see them."""
    model.eval()
    out = [model(bundle.preprocess(bundle.train_x[i:i + batch_size].to(device), False, None)).float().cpu()
           for i in range(0, len(bundle.train_x), batch_size)]
    return torch.cat(out)


def teacher_train_logits(teacher_spec: TrialSpec, store: Store, teacher: nn.Module, bundle: DataBundle, device,
                         batch_size: int) -> torch.Tensor:
    """The cache the teacher trial stored; a teacher from before the cache existed gets it computed now."""
    if store.exists(teacher_spec.trial_key, "train_logits.npy"):
        return torch.from_numpy(store.load_npy(teacher_spec.trial_key, "train_logits.npy"))
    logits = training_set_logits(teacher, bundle, device, batch_size)
    store.save_npy(teacher_spec.trial_key, "train_logits.npy", logits.numpy())
    return logits


def _forward(model, teacher, cond: Optional[conditions.Condition], params: dict, xb, yb, noise_seed: int,
             step: int, cached: Optional[torch.Tensor] = None) -> Batch:
    """The student's forward pass and whatever the condition declared it needs from the teacher."""
    batch = Batch(None, yb, seed=noise_seed, step=step)
    block = params.get(cond.features) if cond is not None and cond.features else None
    if block is None:
        batch.logits = model(xb)
    else:
        with block_output(model, block) as feats:
            batch.logits = model(xb)
        batch.features = feats["out"]
    needs = cond.teacher if cond is not None else None
    if needs == "logits":
        if cached is not None:
            batch.teacher_logits = cached.to(xb.device, non_blocking=True)
        else:
            with torch.no_grad():
                batch.teacher_logits = teacher(xb)
    elif needs == "features":
        with torch.no_grad(), block_output(teacher, block) as tfeats:
            teacher(xb)
        batch.teacher_features = tfeats["out"]
    return batch


TIMINGS = ("train_seconds",)    # reported and logged, kept in run.json, never in result.json


def run_record(spec: TrialSpec, device, bundle: DataBundle, seconds: float,
               pack: Optional[list[TrialSpec]] = None, simulated: Optional[str] = None,
               streamed_note: Optional[str] = None) -> dict:
    """How a trial was run (run.json): its spec, this process's fingerprint, the data's checksum,
    the pack it trained in, and how long it took.  Provenance, not a result: the report shows
    it and ``kdray verify`` re-runs the trial (or its pack) from it.  ``streamed_note``: why its
    functional metrics lack Procrustes (kdray/streamed.py); only such a trial's record has the key."""
    from kdray import provenance

    fp = provenance.fingerprint(str(device), spec.plugins, simulated)
    extra = {"metrics_streamed": streamed_note} if streamed_note else {}
    return {**extra, "spec": spec.to_dict(), "ray_node": provenance.ray_node(), "ray_gpu_ids": provenance.ray_gpu_ids(), "fingerprint": fp, "fingerprint_id": provenance.fingerprint_id(fp),
            "data_sha256": provenance.data_checksum(bundle), "seconds": seconds,
            "pack": [s.to_dict() for s in pack] if pack else None,
            "pack_keys": [s.trial_key for s in pack] if pack else None}


def finish_trial(spec: TrialSpec, store: Store, model: nn.Module, bundle: DataBundle, device, r: Recipe,
                 teacher_logits: Optional[np.ndarray], history: list[dict], seconds: float, report: Report,
                 outputs: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 similarity: Optional[dict] = None, pack: Optional[list[TrialSpec]] = None,
                 simulated: Optional[str] = None) -> dict:
    """Final evaluation, artefacts and the metrics the tracker logs.

    A packed trial passes its students' ``outputs`` (test logits, a tensor or a read-only [N, K]
    memmap, and labels) and ``similarity`` (functional metrics), computed for the whole pack at
    once (kdray/packing.py), and the ``pack`` it trained in (its members, in training order),
    which run.json keeps so that the pack can be trained again as it was (``kdray verify``).  A trial whose test logits are too
    large to hold (kdray/streamed.py) evaluates into a temporary file and reads it in blocks."""
    from kdray import streamed

    if outputs is None and streamed.bundle_streams(bundle):
        with streamed.evaluate_to_file(model, bundle, device, r.eval_batch_size,
                                       store.local_dir(spec.trial_key)) as outputs:
            return _finish(spec, store, model, bundle, device, r, teacher_logits, history, seconds, report,
                           outputs, similarity, pack, simulated, big=True)
    if outputs is None:
        outputs = evaluate(model, bundle, device, r.eval_batch_size)
    return _finish(spec, store, model, bundle, device, r, teacher_logits, history, seconds, report,
                   outputs, similarity, pack, simulated, big=isinstance(outputs[0], np.ndarray))


def _finish(spec: TrialSpec, store: Store, model: nn.Module, bundle: DataBundle, device, r: Recipe,
            teacher_logits: Optional[np.ndarray], history: list[dict], seconds: float, report: Report,
            outputs: tuple, similarity: Optional[dict], pack: Optional[list[TrialSpec]],
            simulated: Optional[str], big: bool) -> dict:
    """``finish_trial`` on test logits held in memory (a tensor) or, ``big``, in a [N, K] memmap."""
    from kdray import streamed
    from kdray.evals import EVALS

    logits, y = outputs
    test_loss, test_acc = (streamed.loss_and_accuracy if big else loss_and_accuracy)(logits, y)
    final = {EPOCH: len(history), "test_loss": test_loss, "test_acc": test_acc, "train_seconds": seconds, FINAL: 1}
    final["chance_acc"] = 1.0 / bundle.num_classes       # for the sanity check (kdray/sanity.py)
    if history:
        final.update(train_loss=history[-1]["train_loss"], train_acc=history[-1]["train_acc"],
                     train_loss_first=history[0]["train_loss"])
    if similarity is not None:
        final.update(similarity)
    elif teacher_logits is not None and big:
        from kdray.functional import functional_metrics_streamed
        final.update(functional_metrics_streamed(teacher_logits, logits, y, streamed.BLOCK_ELEMENTS))
    elif teacher_logits is not None:
        from kdray.functional import functional_metrics
        final.update(functional_metrics(torch.from_numpy(teacher_logits), logits, y))
    note = None
    if teacher_logits is not None and "procrustes_distance" not in final:
        note = streamed.reason(*teacher_logits.shape)
    for name in spec.evals:
        final.update(EVALS.get(name)(model.eval(), bundle, device))
    finite = streamed.all_finite(logits) if big else bool(torch.isfinite(logits).all())
    if spec.role == "teacher" and not finite:
        # Students would train against NaN targets and every metric would fail much later.
        raise TrialDiverged(f"the teacher's test outputs contain NaN or infinite values (trial {spec.label}"
                            + (f", checkpoint {spec.checkpoint}" if spec.checkpoint else "") + ")")
    if big:
        streamed.store_outputs(store, spec.trial_key, "test_outputs.npz", logits, y)
    else:
        store.save_npz(spec.trial_key, "test_outputs.npz", logits=logits.numpy().astype(np.float16), labels=y.numpy())
    stored = {k: v for k, v in final.items() if k not in TIMINGS}   # results only: the same bytes every run
    store.save_json(spec.trial_key, "result.json", {FINAL: stored, "history": history})
    store.save_json(spec.trial_key, RUN_FILE, run_record(spec, device, bundle, seconds, pack, simulated, note))
    if spec.role == "teacher":
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
        if big:     # the temporary file's bytes are np.save's of the same float32 array
            streamed.store_file(store, spec.trial_key, "test_logits.npy", logits.filename)
        else:
            store.save_npy(spec.trial_key, "test_logits.npy", logits.numpy().astype(np.float32))
        if bundle.train_inputs_are_fixed():
            store.save_npy(spec.trial_key, "train_logits.npy",
                           training_set_logits(model, bundle, device, r.eval_batch_size).numpy())
        store.write_bytes(spec.trial_key, "model.pt", buf.getvalue())  # written last: marks the teacher usable
    report(final, None)
    return final
