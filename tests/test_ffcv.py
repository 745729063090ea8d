"""The ImageNet path (docs/protocol.md §6.2): schedules, FFCV .beton writing and seeded loading, local teacher weights."""
import importlib.util

import numpy as np
import pytest
import torch

from kdray.data.ffcv import epoch_permutation, progressive_resolution, rank_order
from kdray.recipe import lr_factor
from kdray.sweep import Recipe

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
# numba 0.68 (pulled in by ffcv 1.0.2) prints an ignored KeyError when it finalises the
# dispatchers of FFCV's image decoder (its own bookkeeping; harmless): keep it out of the report.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
_skip_without_ffcv = pytest.mark.skipif(not HAS_FFCV,
                                        reason="ffcv is not installed (optional extra: pip install 'kdray[ffcv]')")


def needs_ffcv(test):
    """FFCV's own tests: skipped without the extra, slow with it (numba compiles FFCV's pipeline)."""
    return pytest.mark.slow(_skip_without_ffcv(test))


def test_progressive_resolution_is_ffcvs_160_to_192_ramp():
    assert [progressive_resolution(e) for e in (0, 20, 41)] == [160, 160, 160]
    # 160 + 32 (e - 41) / 7 rounded to a multiple of 32: still 160 up to epoch 44, 192 from 45
    assert [progressive_resolution(e) for e in range(42, 49)] == [160, 160, 160, 192, 192, 192, 192]
    assert progressive_resolution(55) == 192
    assert progressive_resolution(5, start_ramp=0, end_ramp=10, min_res=128, max_res=256) == 192
    with pytest.raises(ValueError):
        progressive_resolution(0, min_res=200, max_res=100)


def test_warmup_step_schedule_peaks_at_epoch_2_then_steps_by_10x_every_30_epochs():
    r = Recipe(optimizer="sgd", lr=0.5, epochs=56, schedule="warmup_step", warmup_epochs=2, step_size=30, gamma=0.1)
    spe = 10
    f = [lr_factor(r, s, spe, 56) for s in range(56 * spe)]
    assert f[0] == pytest.approx(0.0, abs=1e-8)                     # linear warm-up from 0
    assert f[5] == pytest.approx(0.25) and f[10] == pytest.approx(0.5) and f[15] == pytest.approx(0.75)
    assert f[20] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)  # the peak: the start of epoch 2
    assert np.argmax(np.array(f) > 1 - 1e-9) == 2 * spe
    assert f[299] == pytest.approx(1.0) and f[300] == pytest.approx(0.1)  # epoch 30: x0.1
    assert f[-1] == pytest.approx(0.1)                                # 56 epochs: one step only
    assert lr_factor(r, 60 * spe, spe, 90) == pytest.approx(0.01)


def test_rank_order_shards_every_global_batch_contiguously():
    perm = epoch_permutation(23, seed=7)
    assert sorted(perm.tolist()) == list(range(23))
    assert np.array_equal(perm, epoch_permutation(23, seed=7)) and not np.array_equal(perm, epoch_permutation(23, 8))
    ranks = [rank_order(perm, 8, r, 2) for r in range(2)]          # 2 full global batches, 7 rows dropped
    assert [len(x) for x in ranks] == [8, 8]
    for b in range(2):
        assert np.array_equal(np.concatenate([x[b * 4:(b + 1) * 4] for x in ranks]), perm[b * 8:(b + 1) * 8])
    assert np.array_equal(rank_order(perm, 8, 0, 1), perm[:16])
    with pytest.raises(ValueError):
        rank_order(perm, 9, 0, 2)


# ------------------------------------------------------------------ FFCV itself

@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    """A tiny ImageFolder of JPEGs (3 classes x 6, random sizes) written with the CLI function."""
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed (optional extra: pip install 'kdray[ffcv]')")
    from PIL import Image

    from kdray.data.ffcv import ffcv_write_main

    root = tmp_path_factory.mktemp("ffcv")
    rng = np.random.default_rng(0)
    for c in ("n01", "n02", "n03"):
        d = root / "imagenet" / "train" / c
        d.mkdir(parents=True)
        for i in range(6):
            h, w = rng.integers(40, 72, 2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.JPEG", quality=95)
    out = root / "imagenet" / "ffcv" / "train.beton"
    assert ffcv_write_main([str(root / "imagenet" / "train"), str(out), "--max-resolution", "64",
                            "--num-workers", "1"]) == 0
    return root, out


@needs_ffcv
def test_written_beton_has_the_images_and_classes(beton):
    import json
    root, out = beton
    meta = json.loads(out.with_name("train.beton.meta.json").read_text())
    assert meta["classes"] == ["n01", "n02", "n03"] and meta["num_samples"] == 18
    assert meta["jpeg_quality"] == 90 and meta["write_mode"] == "jpg"


@needs_ffcv
def test_seeded_loader_fixes_order_and_augmentation_and_shards_match_the_global_batch(beton):
    from kdray.data.ffcv import FFCVTrainLoader, ffcv_eval_batches

    _, path = beton
    one = FFCVTrainLoader(path, 6, num_workers=1, resolution=32)
    assert len(one) == 3
    a = list(one.epoch(1, 2))
    assert [x.shape for x, _ in a] == [torch.Size([6, 3, 32, 32])] * 3 and a[0][0].dtype == torch.uint8
    again = list(one.epoch(1, 2))
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, again))   # same seeds
    other_aug = list(one.epoch(1, 3))
    assert all(torch.equal(u, v) for (_, u), (_, v) in zip(a, other_aug))                      # same order
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, other_aug))                  # other crops
    # Two ranks: each gets its 3 rows of every global batch, with the very same crops and flips
    # (rank 1 decodes with 2 threads: the per-sample seeding does not depend on threads).
    ranks = [list(FFCVTrainLoader(path, 6, rank=r, world_size=2, num_workers=1 + r, resolution=32).epoch(1, 2))
             for r in range(2)]
    for b in range(3):
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), a[b][0])
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), a[b][1])
    # A new resolution recompiles the pipeline.
    assert list(one.epoch(1, 2, resolution=48))[0][0].shape == (6, 3, 48, 48)
    ev = list(ffcv_eval_batches(path, 8, resolution=32, num_workers=1))
    assert [len(y) for _, y in ev] == [8, 8, 2] and torch.cat([y for _, y in ev]).tolist() == [0] * 6 + [1] * 6 + [2] * 6


@needs_ffcv
def test_eval_centre_crop_equals_ffcvs_own_decoder(beton):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    from kdray.data.ffcv import DEFAULT_CROP_RATIO, ffcv_eval_batches

    _, path = beton
    ours = torch.cat([x for x, _ in ffcv_eval_batches(path, 8, resolution=40, num_workers=1)])
    ref = Loader(str(path), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                 pipelines={"image": [CenterCropRGBImageDecoder((40, 40), ratio=DEFAULT_CROP_RATIO), ToTensor(),
                                      ToTorchImage()],
                            "label": [IntDecoder(), ToTensor(), Squeeze()]})
    assert torch.equal(ours, torch.cat([x for x, _ in ref]))


@needs_ffcv
def test_imagenet_ffcv_trains_through_the_recipe_reproducibly(beton, tmp_path):
    from kdray.recipe import run_trial
    from kdray.spec import TrialSpec
    from kdray.storage import Store

    root, path = beton
    spec = TrialSpec(setup="inet-ffcv", role="teacher", method="teacher", dataset="imagenet_ffcv", arch="mlp",
                     teacher_seed=0, init_seed=0, data_seed=0, arch_args={"hidden": 16, "dropout": 0.0},
                     dataset_args={"val": str(path), "min_res": 32, "max_res": 32, "val_res": 32, "num_workers": 1},
                     recipe=Recipe(epochs=2, batch_size=6, lr=0.01, eval_batch_size=8).model_dump(),
                     data_root=str(root), sweep="ffcv")
    outs = []
    for run in ("a", "b"):
        store = Store(str(tmp_path / run), spec.sweep)
        history = []
        final = run_trial(spec, store, lambda m, s=None: history.append(m))
        assert [h["epoch"] for h in history] == [1, 2, 2] and 0 <= final["test_acc"] <= 1
        outs.append(store.load_npy(spec.trial_key, "test_logits.npy"))
    assert outs[0].shape == (18, 3)
    np.testing.assert_array_equal(outs[0], outs[1])       # same seeds: same batches, crops, flips


# ------------------------------------------------------------------ the pretrained teacher from a local file

def test_resnet_weights_path_loads_a_local_state_dict(tmp_path):
    from torchvision.models import resnet18 as tv_resnet18

    from kdray.models import build_model

    torch.manual_seed(3)
    src = build_model("resnet18", 10, (3, 32, 32))
    f = tmp_path / "w.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, f)   # DDP-style wrapper
    torch.manual_seed(4)
    got = build_model("resnet18", 10, (3, 32, 32), weights_path=str(f))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), got.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet18", 5, (3, 32, 32), weights_path=str(f))
    with pytest.raises(ValueError, match="not both"):
        build_model("resnet18", 1000, (3, 224, 224), weights="IMAGENET1K_V1", weights_path=str(f))
    # torchvision's own checkpoints (what IMAGENET1K_V2 downloads) fit the ImageNet geometry.
    tv = tv_resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    got = build_model("resnet18", 1000, (3, 224, 224), weights_path=str(tmp_path / "tv.pth"))
    assert torch.equal(got.fc.weight, tv.fc.weight)
