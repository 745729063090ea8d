"""DDP trials: a 2-worker gloo run on CPU equals the single-process run (kdray.distributed)."""
import numpy as np
import pytest
import torch

from kdray.distributed import Shard, max_concurrent, worker_resources
from kdray.recipe import run_trial
from kdray.spec import TrialSpec
from kdray.storage import Store
from kdray.sweep import Recipe


def _spec(**changes) -> TrialSpec:
    # batch 100 over 1,437 digits: the last batch of an epoch (37 rows) splits 19/18, so the
    # gradient scaling of unequal shards is exercised.
    base = TrialSpec(setup="digits-ddp", role="teacher", method="teacher", dataset="digits", arch="mlp",
                     teacher_seed=0, init_seed=0, data_seed=0, arch_args={"hidden": 32, "dropout": 0.0},
                     recipe=Recipe(epochs=2, batch_size=100, lr=0.01).model_dump(),
                     resources={"cpu": 0.9, "gpu": 0}, sweep="ddp",
                     distributed={"workers": 2, "backend": "gloo", "use_gpu": False})
    return base.with_(**changes)


def test_split_is_a_disjoint_cover_with_scales_that_average_to_the_global_mean():
    x = torch.arange(37 * 3).reshape(37, 3)
    y = torch.arange(37)
    parts = [Shard(r, 4).split(x, y) for r in range(4)]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)          # same global order, disjoint
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert [len(p[1]) for p in parts] == [10, 9, 9, 9]
    # DDP averages: mean_r(scale_r * mean over shard r) == mean over the batch
    losses = y.float() ** 2
    per_rank, off = [], 0
    for _, ys, scale in parts:
        per_rank.append(scale * losses[off:off + len(ys)].mean())
        off += len(ys)
    assert torch.allclose(torch.stack(per_rank).mean(), losses.mean())
    # a batch smaller than the world: the empty shard's scale is 0
    xs, ys, s = Shard(3, 4).split(x[:2], y[:2])
    assert len(ys) == 0 and s == 0.0


def test_key_ignores_distribution_and_resources_are_per_worker():
    s = _spec()
    assert s.trial_key == s.with_(distributed={}).trial_key
    assert worker_resources(s.to_dict()) == {"CPU": 0.9}
    gpu = s.with_(distributed={"workers": 4, "backend": "nccl", "use_gpu": True}).to_dict()
    assert worker_resources(gpu) == {"CPU": 0.9, "GPU": 1.0}
    assert max_concurrent([gpu], {"CPU": 16, "GPU": 8}) == 2
    assert max_concurrent([s.with_(distributed={}).to_dict()], {"CPU": 16}) is None



def test_ddp_trial_through_tune_equals_the_single_process_trial(local_ray, tmp_path):
    from ray import tune

    from kdray.engine import _resources, trainable

    spec = _spec()
    single_store = Store(str(tmp_path / "single"), spec.sweep)
    single_history = []
    run_trial(spec.with_(distributed={}), single_store, lambda m, s=None: single_history.append(m))

    tuner = tune.Tuner(
        tune.with_resources(trainable, _resources),
        param_space={"storage": str(tmp_path / "ddp"), "spec": spec.to_dict()},
        run_config=tune.RunConfig(name="ddp", storage_path=str(tmp_path / "tune"), verbose=0))
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    reported = grid[0].metrics_dataframe
    # every record the trial sent, as the MLflow callback reads them (kdray/engine.py's RESULT_EPOCHS)
    records = [m for batch in reported["kdray_epochs"] for m in batch]
    assert [m["epoch"] for m in records] == [1, 2, 2]           # two epochs, then the final metrics
    assert records[-1]["final"] == 1
    assert records[-1]["ddp_workers"] == 2                      # trained by 2 DDP ranks
    assert reported["kdray/epoch"].tolist() == [1, 2, 2]        # Tune's table still shows the epochs

    ddp_store = Store(str(tmp_path / "ddp"), spec.sweep)
    a = single_store.load_npy(spec.trial_key, "test_logits.npy")
    b = ddp_store.load_npy(spec.trial_key, "test_logits.npy")
    assert a.shape == b.shape == (360, 10)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    # The curves are the global ones (summed over ranks), as in the single-process run.
    np.testing.assert_allclose([m["train_loss"] for m in records[:2]],
                               [h["train_loss"] for h in single_history[:2]], rtol=1e-5)
    np.testing.assert_allclose([m["train_acc"] for m in records[:2]],
                               [h["train_acc"] for h in single_history[:2]], rtol=0, atol=1e-12)


def test_a_worker_error_reaches_the_trial_as_its_kdray_type():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from kdray.distributed import DistributedTrialError, _unwrap
    from kdray.recipe import TrialDiverged

    msg = "training loss is nan at epoch 3 (trial x)"
    err = WorkerGroupError("workers failed", {1: UserExceptionWithTraceback(ValueError("other rank"), "tb"),
                                              0: UserExceptionWithTraceback(TrialDiverged(msg), "tb")})
    out = _unwrap(err)
    assert isinstance(out, TrialDiverged) and str(out) == msg
    out = _unwrap(WorkerGroupError("x", {0: UserExceptionWithTraceback(KeyError("k"), "tb")}))
    assert isinstance(out, DistributedTrialError) and "KeyError" in str(out)
