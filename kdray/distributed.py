"""DDP trials: one Tune trial drives a Ray Train ``TorchTrainer`` whose workers run the recipe sharded.

A spec with ``distributed: {workers: N, backend: gloo|nccl, use_gpu: bool}`` is trained by
N Ray Train workers (``torch.distributed`` + ``DistributedDataParallel``) instead of the
Tune trial's own process.  The layout follows Ray 2.60's Train V2 + Tune pattern
(``docs.ray.io .../train/user-guides/hyperparameter-optimization``): the Tune function
trainable is only the *driver* of a ``TorchTrainer``; the Train run acquires the workers'
resources itself, in its own placement group.  Tune therefore reserves only a small driver
bundle (``DRIVER_CPU``) for such a trial (see ``placement_group_factory``), and a sweep
whose trials are distributed should set ``max_concurrent_trials`` to the number of Train
runs the cluster can hold at once (``max_concurrent``), so that no driver idles waiting
for worker resources.

Mathematics.  Every rank builds the same data set, the same order generator and the same
augmentation generator from the spec's seeds, so all ranks draw the same *global* batch
(``recipe.batch_size`` rows) in the same order.  ``Shard.split`` gives rank ``r`` the
``r``-th of ``N`` contiguous, disjoint slices of it (``torch.tensor_split``: sizes differ by
at most one).  The objective is a mean over the rows a rank sees, and DDP averages the
ranks' gradients, so rank ``r`` back-propagates its shard mean multiplied by
``n_r * N / n`` (``n_r`` rows of ``n``): the average over ranks of these gradients is then
exactly the gradient of the mean over the global batch, also for the unequal last batch of
an epoch.  Hence, for a model without BatchNorm and without dropout, the distributed run
computes the single-process run's updates up to floating-point summation order
(``tests/test_distributed.py`` checks the final test logits against a single-process run).
Not equivalent by construction: BatchNorm statistics (per shard, as in FFCV's ImageNet
example; no SyncBatchNorm), dropout masks (every rank seeds dropout identically and draws
per shard) and the feature-matching noise control (drawn per shard).

Tracking is unchanged: rank 0 forwards each epoch's metrics (and, every
``checkpoint_every`` epochs, the resumable state) to the driver through a Ray queue, and
the driver passes them to the ``report`` callable it was given (Tune's report); rank 0
alone writes the trial's artefacts.  The trial key ignores ``distributed``.
"""
from __future__ import annotations

import logging
import math
import threading
import uuid
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# Tune's bundle for the driver of a distributed trial: it only launches and watches the
# Train run (the workers reserve their own resources).  Ray needs a non-empty bundle.
DRIVER_CPU = 0.01


# ------------------------------------------------------------------ the rank's view

class _DDP(nn.parallel.DistributedDataParallel):
    """DDP whose unknown attributes resolve on the wrapped model (e.g. ``model.blocks`` for FM)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class Shard:
    """This rank's place in the process group; ``run_trial(shard=...)`` uses it to train sharded.

    The hooks in ``kdray.recipe.run_trial``: ``wrap`` (the module that is trained, DDP),
    ``split`` (this rank's rows of a global batch and its gradient scale),
    ``epoch_totals`` (loss, correct and seen summed over ranks for the epoch's metrics) and
    ``is_main`` (rank 0 reports and writes artefacts).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device | str = "cpu", presharded: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        # presharded: the data set's loader already yields only this rank's rows of every
        # global batch (FFCV: equal, full batches, so the gradient scale is 1).
        self.presharded = presharded

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return model
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        return _DDP(model, device_ids=ids)

    def split(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Rows ``r`` of ``N`` contiguous slices of the global batch, and the gradient scale ``n_r N / n``."""
        if self.presharded:
            return xb, yb, 1.0
        total = yb.numel()
        xs, ys = xb.tensor_split(self.world_size)[self.rank], yb.tensor_split(self.world_size)[self.rank]
        # An empty shard (a last batch smaller than N) contributes a zero gradient: the scale
        # is 0 and the empty mean's backward produces empty (not NaN) gradients.
        return xs, ys, ys.numel() * self.world_size / total if total else 0.0

    def epoch_totals(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int):
        """Sums over ranks (one all-reduce per epoch), so rank 0 reports the global curves."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return loss_sum, correct, seen
        buf = torch.stack([loss_sum.double().to(self.device), correct.double().to(self.device),
                           torch.tensor(float(seen), dtype=torch.float64, device=self.device)])
        torch.distributed.all_reduce(buf)
        return buf[0].to(loss_sum.dtype), buf[1].round().long(), int(buf[2].round())


# ------------------------------------------------------------------ resources

def worker_resources(spec_dict: dict) -> dict:
    """Ray resources of one worker: the stage's ``resources`` are per worker for a DDP trial."""
    r = spec_dict.get("resources") or {}
    d = spec_dict.get("distributed") or {}
    gpu = float(r.get("gpu", 0) or 0)
    if d.get("use_gpu") and gpu == 0:
        gpu = 1.0
    out = {"CPU": float(r.get("cpu", 1))}
    if gpu:
        out["GPU"] = gpu
    return out


def placement_group_factory(spec_dict: dict):
    """Tune's resources for a DDP trial: the driver bundle only (Train reserves the workers)."""
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}])


def max_concurrent(spec_dicts: list[dict], cluster: Optional[dict] = None) -> Optional[int]:
    """How many DDP trials' Train runs fit at once in the cluster (None: no DDP trial).

    For ``TuneConfig(max_concurrent_trials=...)``: Train V2 does not reserve through Tune, so
    without a cap Tune starts every driver and the surplus ones wait for resources.
    """
    import ray

    need: dict[str, float] = {}
    for s in spec_dicts:
        if not s.get("distributed"):
            continue
        n = int(s["distributed"].get("workers", 1))
        for k, v in worker_resources(s).items():
            need[k] = max(need.get(k, 0.0), v * n)
    if not need:
        return None
    cluster = cluster if cluster is not None else ray.cluster_resources()
    fits = min(math.floor((cluster.get(k, 0.0) + 1e-9) / v) for k, v in need.items() if v > 0)
    return max(1, fits)


# ------------------------------------------------------------------ the workers

def _worker_loop(config: dict) -> None:
    """One Ray Train worker: the recipe's loop on this rank's shards."""
    import ray
    import ray.train
    import ray.train.torch

    from kdray import testhook
    from kdray.contracts import FINAL
    from kdray.data import load_dataset
    from kdray.recipe import run_trial
    from kdray.spec import TrialSpec
    from kdray.storage import Store

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = TrialSpec.from_dict(config["spec"])
    store = Store(config["storage"], spec.sweep)
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # loaders that pick "the current device" (FFCV) get this rank's GPU
    torch.set_num_threads(max(1, int(config["cpu_per_worker"])))
    channel = config["channel"]
    state_ref = config.get("state")
    state = ray.get(state_ref) if state_ref is not None else None

    # Where the ranks run (placement, not a result): how many distinct Ray nodes the workers are on.
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    placed = {"ddp_workers": world, "ddp_nodes": len(set(nodes))}

    def report(metrics: dict, st: Optional[dict] = None) -> None:
        if rank == 0:  # the final metrics also record how the trial ran
            channel.put(({**metrics, **placed} if metrics.get(FINAL) else metrics, st))
        testhook.maybe_hold(f"{spec.label} rank {rank}", metrics.get("epoch"))

    presharded = bool(getattr(load_dataset(spec.dataset, spec.data_root, **spec.dataset_args), "presharded", False))
    run_trial(spec, store, report, (lambda: state), device=device, shard=Shard(rank, world, device, presharded))


# ------------------------------------------------------------------ the driver (inside the Tune trial)

class DistributedTrialError(RuntimeError):
    """A DDP trial's workers failed for a reason other than a kdray error."""


def _unwrap(err: BaseException) -> BaseException:
    """The first worker's own exception, as its kdray type where it is one (for the error line)."""
    from kdray import recipe

    causes = list(getattr(err, "worker_failures", {}).items())
    inner = sorted(causes)[0][1] if causes else err
    for _ in range(10):  # Ray wraps user errors (Train's UserExceptionWithTraceback, RayTaskError.cause)
        nxt = getattr(inner, "_base_exc", None) or getattr(inner, "cause", None) or inner.__cause__
        if nxt is None or nxt is inner:
            break
        inner = nxt
    for cls in (recipe.TrialDiverged, recipe.TeacherArtifactError):
        if isinstance(inner, cls) or type(inner).__name__ == cls.__name__:
            return cls(str(inner).strip().splitlines()[-1] if str(inner).strip() else cls.__name__)
    return DistributedTrialError(f"distributed training failed: {type(inner).__name__}: "
                                 f"{str(inner).strip().splitlines()[-1] if str(inner).strip() else ''}")


def _shutdown(channel) -> None:
    try:
        channel.shutdown(force=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def run_distributed_trial(spec_dict: dict, storage: str, report: Callable[[dict, Optional[dict]], None],
                          restore: Optional[Callable[[], Optional[dict]]] = None) -> None:
    """Train the trial with a ``TorchTrainer`` of ``distributed.workers`` workers; report as ``run_trial`` does."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from kdray.spec import TrialSpec
    from kdray.storage import Store

    spec = TrialSpec.from_dict(spec_dict)
    d = spec.distributed
    workers = int(d.get("workers", 1))
    backend = d.get("backend", "gloo")
    per_worker = worker_resources(spec_dict)
    use_gpu = "GPU" in per_worker
    if backend == "nccl" and not use_gpu:
        raise ValueError(f"trial {spec.label}: distributed.backend nccl needs GPUs (use_gpu: true or resources.gpu)")

    state = restore() if restore else None
    channel = Queue(actor_options={"num_cpus": 0})
    store = Store(storage, spec.sweep)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"spec": spec_dict, "storage": storage, "channel": channel, "use_gpu": use_gpu,
                           "cpu_per_worker": per_worker["CPU"],
                           "state": ray.put(state) if state is not None else None},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        # Retries belong to Tune (FailureConfig of the sweep), which restarts from its checkpoint.
        run_config=RunConfig(name=f"{spec.trial_key}-{uuid.uuid4().hex[:8]}",
                             storage_path=store.tune_path().rsplit("/", 1)[0] + "/train",
                             failure_config=FailureConfig(max_failures=0)),
    )
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the trial's thread
            box["error"] = e

    runner = threading.Thread(target=fit, name=f"kdray-ddp-{spec.trial_key}", daemon=True)
    runner.start()
    done = False
    try:
        while True:
            try:
                item = channel.get(timeout=0.5)
            except Empty:
                if runner.is_alive():
                    continue
                # The run ended: everything rank 0 put is already in the queue.
                while not channel.empty():
                    report(*channel.get_nowait())
                break
            report(*item)
        done = True
    finally:
        if not done:  # the trial is being stopped: without the queue rank 0's next put fails, ending the run
            _shutdown(channel)
        runner.join()
        _shutdown(channel)
    if "error" in box:
        raise _unwrap(box["error"]) from box["error"]
