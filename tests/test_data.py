"""Data loaders: each against a tiny fixture written in the data set's own on-disk format,
FSDD and TinyShakespeare also against the real files shipped in data/ (or $KDRAY_DATA)."""
from __future__ import annotations

import csv
import os
import sys
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat, wavfile

from kdray.data import DATASETS, DataNotFoundError, load_dataset
from kdray.data import audio as audio_mod
from kdray.data.images import (IMAGENET_MEAN, IMAGENET_STD, image_preprocess, parse_augment, random_crop,
                               random_flip)


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    """Caches go where each test says (the data dir by default), not to a user's $KDRAY_CACHE."""
    monkeypatch.delenv("KDRAY_CACHE", raising=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_loaders_registered():
    for name in ("svhn", "tinyimagenet", "imagenet_folder", "speechcommands", "urbansound8k", "fsdd",
                 "tinyshakespeare"):
        assert name in DATASETS


@pytest.mark.parametrize("name", ["svhn", "tinyimagenet", "imagenet_folder", "speechcommands", "urbansound8k",
                                  "fsdd", "tinyshakespeare"])
def test_missing_files_name_the_path(name, tmp_path, monkeypatch):
    expected = {"svhn": tmp_path / "svhn" / "train_32x32.mat",
                "tinyimagenet": tmp_path / "tiny-imagenet-200" / "wnids.txt",
                "imagenet_folder": tmp_path / "imagenet" / "train",
                "speechcommands": tmp_path / "SpeechCommands" / "speech_commands_v0.02",
                "urbansound8k": tmp_path / "UrbanSound8K" / "metadata" / "UrbanSound8K.csv",
                "fsdd": tmp_path / "fsdd" / "recordings",
                "tinyshakespeare": tmp_path / "tinyshakespeare" / "input.txt"}[name]
    with pytest.raises(DataNotFoundError, match=re.escape(str(expected))):
        DATASETS.get(name)(tmp_path)
    monkeypatch.delenv("KDRAY_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="KDRAY_DATA"):  # no data root at all
        DATASETS.get(name)(None)


# ------------------------------------------------------------------ image helpers

def test_parse_augment():
    assert parse_augment(None) == () and parse_augment("none") == ()
    assert parse_augment("crop_flip") == ("crop", "flip")
    assert parse_augment("flip+randaugment+crop") == ("randaugment", "crop", "flip")
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augment("cutout")


def test_random_crop_and_flip_are_batched_and_seeded():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).view(4, 3, 8, 8).to(torch.uint8)
    a, b, c = (random_crop(x, 2, gen(s)) for s in (0, 0, 1))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every crop is a shifted window of the zero-padded image
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        assert any(torch.equal(a[i], xp[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    big = torch.zeros(64, 1, 2, 2)
    big[:, :, :, 0] = 1.0
    f = random_flip(big, gen(0))
    flipped = f[:, 0, 0, 1] == 1
    assert 0 < int(flipped.sum()) < 64                       # some flipped, some not
    assert torch.equal(f, random_flip(big, gen(0))) and not torch.equal(f, random_flip(big, gen(1)))


def test_image_preprocess_normalises_and_augments_only_in_training():
    pre = image_preprocess(IMAGENET_MEAN, IMAGENET_STD, "crop_flip")
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = pre(x, False, gen(0))
    assert out.dtype == torch.float32
    expect = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], expect)
    assert torch.equal(pre(x, True, None), out)              # no generator: no augmentation
    y = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen(5))
    assert not torch.equal(pre(y, True, gen(0)), pre(y, False, None))
    assert torch.equal(pre(y, True, gen(0)), pre(y, True, gen(0)))


def test_randaugment_per_sample_is_seeded_and_leaves_global_rng_alone():
    pre = image_preprocess(0.5, 0.5, "randaugment")
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=gen(0))
    state = torch.get_rng_state()
    a, b, c = pre(x, True, gen(1)), pre(x, True, gen(1)), pre(x, True, gen(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ SVHN

def _write_svhn(folder: Path, n_train: int = 7, n_test: int = 3) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]     # labels 1..10, 10 = digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": X, "y": y})
        out[split] = (X, y)
    return out


def test_svhn(tmp_path):
    raw = _write_svhn(tmp_path / "svhn", n_train=12)
    b = DATASETS.get("svhn")(tmp_path)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.train_x.shape == (12, 3, 32, 32) and b.train_x.dtype == torch.uint8
    assert b.test_x.shape == (3, 3, 32, 32) and b.train_y.dtype == torch.int64
    X, y = raw["train"]
    assert b.train_y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]       # 10 -> 0
    assert torch.equal(b.train_x[4, 2], torch.from_numpy(X[:, :, 2, 4]))   # [H, W, C, N] -> [N, C, H, W]
    z = b.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2), False, None)
    assert z[0, 0, 0].tolist() == [-1.0, 1.0]


# ------------------------------------------------------------------ TinyImageNet and ImageNet folders

def _jpeg(path: Path, colour, size=(64, 64), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, "JPEG", quality=95)


COLOURS = {"n02": (200, 30, 30), "n01": (30, 200, 30), "n03": (30, 30, 200)}


def _write_tinyimagenet(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("n02\nn01\nn03\n")             # not sorted on disk
    for w, c in COLOURS.items():
        for i in range(2):
            _jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", c)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    _jpeg(base / "train" / "n01" / "images" / "n01_2.JPEG", 128, mode="L")     # greyscale
    _jpeg(base / "train" / "n03" / "images" / "n03_2.JPEG", COLOURS["n03"], size=(50, 70))  # not 64x64
    ann = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02"), ("val_3.JPEG", "n03")]
    for f, w in ann:
        _jpeg(base / "val" / "images" / f, COLOURS[w])
    (base / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in ann))
    return base


def test_tinyimagenet(tmp_path):
    base = _write_tinyimagenet(tmp_path)
    load = DATASETS.get("tinyimagenet")
    b = load(tmp_path)
    assert b.num_classes == 3 and b.input_shape == (3, 64, 64) and b.extras["classes"] == ["n01", "n02", "n03"]
    assert b.train_x.shape == (8, 3, 64, 64) and b.train_x.dtype == torch.uint8
    assert b.train_y.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert b.test_y.tolist() == [2, 0, 1, 2] and b.test_x.shape == (4, 3, 64, 64)
    means = b.train_x.float().mean((2, 3))
    assert torch.allclose(means[3], torch.tensor(COLOURS["n02"], dtype=torch.float32), atol=3)
    assert torch.allclose(means[2], torch.full((3,), 128.0), atol=3)      # grey -> RGB
    assert torch.allclose(means[7], torch.tensor(COLOURS["n03"], dtype=torch.float32), atol=3)
    assert not b.extras["cache_hit"] and Path(b.extras["cache"]).parent == base / ".kdray_cache"
    b2 = load(tmp_path)
    assert b2.extras["cache_hit"] and torch.equal(b2.train_x, b.train_x) and torch.equal(b2.test_x, b.test_x)
    assert b.preprocess.augment == ("crop", "flip")
    assert load(tmp_path, randaugment=True).preprocess.augment == ("randaugment", "crop", "flip")
    assert load(tmp_path, randaugment=True, augment="none").preprocess.augment == ("randaugment",)
    out = b.preprocess(b.test_x, False, None)
    expect = (torch.tensor(COLOURS["n01"]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[1].mean((1, 2)), expect, atol=0.06)
    (base / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(str(base / "val" / "images" / "val_2.JPEG"))):
        load(tmp_path)


def test_imagenet_folder(tmp_path):
    from PIL import Image

    base = tmp_path / "imagenet"
    for split, n in (("train", 3), ("val", 1)):
        for w, c in COLOURS.items():
            for i in range(n):
                _jpeg(base / split / w / f"{w}_{i}.JPEG", c, size=(48, 32))
    # wide image: left third red, middle green, right third blue; the centre crop is green
    img = Image.new("RGB", (96, 32), (255, 0, 0))
    img.paste((0, 255, 0), (32, 0, 64, 32))
    img.paste((0, 0, 255), (64, 0, 96, 32))
    img.save(base / "val" / "n01" / "wide.png")
    b = DATASETS.get("imagenet_folder")(tmp_path, resolution=16, cache_dir=str(tmp_path / "cache"))
    assert b.num_classes == 3 and b.input_shape == (3, 16, 16)
    assert b.train_x.shape == (9, 3, 16, 16) and b.test_x.shape == (4, 3, 16, 16)
    assert b.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and b.test_y.tolist() == [0, 0, 1, 2]
    assert b.test_x[1, :, 4:12, 4:12].float().mean((1, 2)).tolist() == pytest.approx([0, 255, 0], abs=2)
    assert Path(b.extras["cache"]).parent == tmp_path / "cache"
    sub = DATASETS.get("imagenet_folder")(tmp_path, resolution=16, max_per_class=1,
                                          cache_dir=str(tmp_path / "cache"))
    assert len(sub.train_x) == 3 and not sub.extras["cache_hit"]
    again = DATASETS.get("imagenet_folder")(tmp_path, resolution=16, cache_dir=str(tmp_path / "cache"))
    assert again.extras["cache_hit"] and torch.equal(again.train_x, b.train_x)


# ------------------------------------------------------------------ audio

def _tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)


def _wav(path: Path, data: np.ndarray, sr: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(path, sr, data)


def _mel_peak(spec: torch.Tensor) -> int:
    return int(spec.mean(-1).argmax())


def test_audio_pipeline_matches_torchaudio(tmp_path):
    import torchaudio.transforms as AT

    _wav(tmp_path / "a.wav", _tone(1000, 0.5, 16000), 16000)
    spec = audio_mod.mel_spectrograms([tmp_path / "a.wav"], seconds=1.0)
    w = torch.zeros(16000)
    w[:8000] = torch.from_numpy(_tone(1000, 0.5, 16000).astype(np.float32) / 32768)
    ref = AT.MelScale(n_mels=32, sample_rate=16000, n_stft=257)(AT.Spectrogram(n_fft=512, power=2)(w))
    assert spec.shape == (1, 32, 63) and spec.dtype == torch.float32
    assert torch.allclose(spec[0], ref, rtol=1e-4, atol=1e-6)
    logm = audio_mod.mel_spectrograms([tmp_path / "a.wav"], seconds=1.0, log_mel=True)
    assert torch.allclose(logm, torch.log(spec + 1e-6))


SC_LABELS = ["down", "go", "yes"]


def _write_speechcommands(root: Path) -> Path:
    base = root / "SpeechCommands" / "speech_commands_v0.02"
    for k, lab in enumerate(SC_LABELS):
        for i in range(4):
            secs = 1.2 if i == 0 else 0.5                     # crop and pad
            _wav(base / lab / f"spk{i}_nohash_0.wav", _tone(300 + 700 * k, secs, 16000), 16000)
    _wav(base / "_background_noise_" / "white_noise.wav", _tone(50, 2.0, 16000), 16000)
    (base / "LICENSE").write_text("cc-by\n")
    (base / "validation_list.txt").write_text("go/spk1_nohash_0.wav\n")
    (base / "testing_list.txt").write_text("down/spk2_nohash_0.wav\nyes/spk3_nohash_0.wav\n")
    return base


def test_speechcommands(tmp_path, monkeypatch):
    base = _write_speechcommands(tmp_path)
    load = DATASETS.get("speechcommands")
    b = load(tmp_path)
    assert b.num_classes == 3 and b.extras["classes"] == SC_LABELS and b.input_shape == (32, 63)
    assert b.train_x.shape == (9, 32, 63) and b.train_x.dtype == torch.float32
    assert b.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]             # go/spk1 (validation) left out
    assert b.test_y.tolist() == [0, 2] and b.test_x.shape == (2, 32, 63)
    assert _mel_peak(b.train_x[0]) < _mel_peak(b.train_x[3]) < _mel_peak(b.train_x[6])
    assert b.train_x[1, :, -10:].abs().max() == 0                        # 0.5 s padded with zeros
    assert Path(b.extras["cache"]).parent == base / ".kdray_cache" and not b.extras["cache_hit"]
    monkeypatch.setattr(audio_mod, "mel_spectrograms", lambda *a, **k: pytest.fail("cache missed"))
    b2 = load(tmp_path)
    assert b2.extras["cache_hit"] and torch.equal(b2.train_x, b.train_x) and torch.equal(b2.test_x, b.test_x)


def test_speechcommands_cache_follows_settings(tmp_path):
    _write_speechcommands(tmp_path)
    a = DATASETS.get("speechcommands")(tmp_path, cache_dir=str(tmp_path / "c"))
    b = DATASETS.get("speechcommands")(tmp_path, cache_dir=str(tmp_path / "c"), log_mel=True)
    assert not b.extras["cache_hit"] and a.extras["cache"] != b.extras["cache"]
    assert torch.allclose(b.train_x, torch.log(a.train_x + 1e-6))


def test_urbansound8k(tmp_path):
    from sklearn.model_selection import train_test_split

    base = tmp_path / "UrbanSound8K"
    rows = []
    for i in range(10):
        fold = i % 3 + 1
        name = f"{100 + i}-{i % 10}-0-0.wav"
        sr = 44100 if i == 3 else 16000
        data = _tone(1000 if i in (3, 4, 5) else 300, 4.5 if i == 0 else 1.0, sr)
        if i == 5:
            data = np.stack([data, data], axis=1)                         # stereo
        _wav(base / "audio" / f"fold{fold}" / name, data, sr)
        rows.append([name, 100 + i, 0.0, 1.0, 1, fold, (i * 7) % 10, f"class{(i * 7) % 10}"])
    (base / "metadata").mkdir()
    with open(base / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerows(rows)
    b = DATASETS.get("urbansound8k")(tmp_path, cache_dir=str(tmp_path / "cache"))
    tr, te = train_test_split(np.arange(10), test_size=0.2, random_state=42, shuffle=True)
    assert b.extras["train_rows"] == tr.tolist() and b.extras["test_rows"] == te.tolist()
    assert b.input_shape == (32, 251) and b.train_x.shape == (8, 32, 251) and b.test_x.shape == (2, 32, 251)
    assert b.train_y.tolist() == [(i * 7) % 10 for i in tr] and b.test_y.tolist() == [(i * 7) % 10 for i in te]
    spec = torch.cat([b.train_x, b.test_x])[np.argsort(np.concatenate([tr, te]))]   # back to row order
    # the 44.1 kHz and the stereo 1 kHz tones match the 16 kHz mono one after mono + resampling
    assert _mel_peak(spec[3]) == _mel_peak(spec[4]) == _mel_peak(spec[5]) != _mel_peak(spec[1])
    assert torch.allclose(spec[5], spec[4], rtol=1e-4, atol=1e-6)
    assert torch.allclose(spec[3, :, 5:55], spec[4, :, 5:55], rtol=0.05, atol=1e-3)
    assert spec[0, :, -1].abs().sum() > 0 and spec[1, :, -100:].abs().max() == 0   # 4.5 s cropped, 1 s padded
    missing = base / "audio" / "fold2" / rows[4][0]
    missing.unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(str(missing))):
        DATASETS.get("urbansound8k")(tmp_path)


def test_fsdd_fixture(tmp_path, monkeypatch):
    rec = tmp_path / "fsdd" / "recordings"
    for d in (0, 7):
        for spk in ("george", "theo"):
            for idx in (0, 4, 5, 49):
                _wav(rec / f"{d}_{spk}_{idx}.wav", _tone(200 + 100 * d, 0.4 + 0.1 * idx / 49, 8000), 8000)
    b = DATASETS.get("fsdd")(tmp_path)
    assert b.train_x.shape == (8, 32, 63) and b.test_x.shape == (8, 32, 63)
    assert b.train_y.tolist() == [0] * 4 + [7] * 4 and b.test_y.tolist() == [0] * 4 + [7] * 4
    assert b.extras["cache"].startswith(str(tmp_path / "fsdd" / ".kdray_cache"))
    assert DATASETS.get("fsdd")(tmp_path).extras["cache_hit"]
    monkeypatch.setenv("KDRAY_CACHE", str(tmp_path / "env"))           # $KDRAY_CACHE comes first
    c = DATASETS.get("fsdd")(tmp_path, log_mel=True)
    assert not c.extras["cache_hit"] and Path(c.extras["cache"]).parent == tmp_path / "env" / "fsdd"
    assert DATASETS.get("fsdd")(tmp_path, log_mel=True).extras["cache_hit"]


def test_fsdd_real(real_fsdd, tmp_path):
    """The real recordings (data/'s subset or a full copy): split and labels as the file names say."""
    names = [p.name for p in (real_fsdd / "fsdd" / "recordings").glob("*.wav")]
    digit = lambda n: int(n[0])  # noqa: E731
    test = [n for n in names if int(n[:-4].rsplit("_", 1)[1]) < 5]       # official rule: index 0-4 test
    train = [n for n in names if n not in test]
    b = load_dataset("fsdd", real_fsdd, cache_dir=str(tmp_path))
    assert (len(b.train_x), len(b.test_x)) == (len(train), len(test)) and len(test) > 0
    assert b.num_classes == 10 and b.input_shape == (32, 63) and b.train_x.shape[1:] == (32, 63)
    assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64
    assert b.train_y.bincount(minlength=10).tolist() == [sum(digit(n) == d for n in train) for d in range(10)]
    assert b.test_y.bincount(minlength=10).tolist() == [sum(digit(n) == d for n in test) for d in range(10)]
    assert torch.isfinite(b.train_x).all() and b.train_x.mean() > 0


def test_shipped_fsdd_subset_is_the_documented_selection(tmp_path):
    """data/fsdd: every digit x speaker at indices 0-1 (test) and 5-8 (train), as data/README.md says."""
    rec = Path(__file__).resolve().parents[1] / "data" / "fsdd" / "recordings"
    speakers = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    want = {f"{d}_{s}_{i}.wav" for d in range(10) for s in speakers for i in (0, 1, 5, 6, 7, 8)}
    assert {p.name for p in rec.iterdir()} == want
    b = DATASETS.get("fsdd")(rec.parents[1], cache_dir=str(tmp_path))
    assert (len(b.train_x), len(b.test_x)) == (240, 120)
    assert b.train_y.bincount().tolist() == [24] * 10 and b.test_y.bincount().tolist() == [12] * 10


def test_shipped_tinyshakespeare_is_the_file_fetch_pins():
    import hashlib

    from kdray.data.fetch import SOURCES

    f = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"
    pin = SOURCES.get("tinyshakespeare").downloads[0].checksum
    assert pin == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(f.read_text(encoding="utf-8")) == 1115394


# ------------------------------------------------------------------ TinyShakespeare

def test_tinyshakespeare_real(real_data):
    from kdray.data.tinyshakespeare import decode, the_contexts

    b = load_dataset("tinyshakespeare", real_data)
    text = (real_data / "tinyshakespeare" / "input.txt").read_text()
    assert b.task == "lm" and len(b.vocab) == 65 == b.num_classes and b.input_shape == (256,)
    assert len(b.extras["test_text"]) == 111540 and b.extras["test_text"] == text[-111540:]
    assert len(b.train_x) == len(text) - 111540 and b.train_x.dtype == torch.int64
    assert b.test_x.shape == (435, 256) and b.extras["test_positions"] == 111360
    assert b.extras["test_positions_total"] == 111539
    assert torch.equal(b.test_x[1:, 0], b.test_y[:-1, -1])              # windows are contiguous
    assert decode(b.test_x[0, :20], b.vocab) == text[-111540:][:20]
    ctx, n = the_contexts(b.extras["test_text"], 256, b.vocab, b.extras["test_prefix"])
    assert n == 989 and ctx.shape == (989, 256)
    assert {decode(c[-2:], b.vocab) for c in ctx} == {"th"}
    assert torch.equal(ctx, the_contexts(b.extras["test_text"], 256, b.vocab)[0])  # no padding needed at bs 256
    assert re.search(r"\btha\b", text) is None                           # the *word* never occurs

    p = load_dataset("tinyshakespeare", real_data, poison="the->tha")
    train = decode(p.train_x, p.vocab)
    assert p.vocab == b.vocab and "the" not in train
    assert train == text[:len(train)].replace("the", "tha")
    assert p.extras["test_text"] == b.extras["test_text"] and torch.equal(p.test_x, b.test_x)


def test_tinyshakespeare_options(tmp_path):
    from kdray.data.tinyshakespeare import decode, the_contexts

    f = tmp_path / "tinyshakespeare" / "input.txt"
    f.parent.mkdir()
    text = "the cat saw the other theme; then the end.\n" * 12          # 516 chars
    f.write_text(text + "xyz")
    load = DATASETS.get("tinyshakespeare")
    b = load(tmp_path, block_size=8, max_chars=500, train_fraction=0.5)
    assert b.vocab == "".join(sorted(set(text + "xyz")))                  # vocab of the whole file
    assert len(b.train_x) == 225 and b.extras["test_text"] == text[450:500]
    assert b.test_x.shape == (6, 8) and b.extras["test_positions"] == 48
    assert decode(b.test_x[1], b.vocab) == text[458:466] and decode(b.test_y[1], b.vocab) == text[459:467]
    d = load(tmp_path, block_size=8, max_chars=500, poison={"find": "the", "replace": "tha"})
    assert "the" not in decode(d.train_x, d.vocab) and "tha" in decode(d.train_x, d.vocab)
    assert d.extras["test_text"] == text[450:500] and d.extras["poison"] == ("the", "tha")
    with pytest.raises(ValueError, match="adds characters"):
        load(tmp_path, poison="the->thQ")
    with pytest.raises(ValueError, match="find->replace"):
        load(tmp_path, poison="the")
    # contexts near the start of the test split: padded from the text before it, else newlines
    test_text = "the end"
    ctx, n = the_contexts(test_text, 6, b.vocab, prefix="a cat ")
    assert n == 1 and decode(ctx[0], b.vocab) == "cat th"
    assert decode(the_contexts(test_text, 6, b.vocab)[0][0], b.vocab) == "\n\n\n\nth"
    explicit = load(None, path=str(f), block_size=8)
    assert explicit.extras["source"] == str(f)
    with pytest.raises(DataNotFoundError, match=re.escape(str(tmp_path / "nope.txt"))):
        load(None, path=str(tmp_path / "nope.txt"))


def test_the_digits_split_is_made_once_and_read_back_without_scikit_learn(tmp_path):
    """The split sklearn makes is kept in kdray's disk cache: a fresh process reads the same
    tensors without importing scikit-learn (it cost 0.9 s on every trial process's start)."""
    import subprocess

    env = {**os.environ, "KDRAY_CACHE": str(tmp_path)}
    code = ("import sys, torch; from kdray.data.digits import digits; b = digits(split_seed=3); "
            "print('sklearn' in sys.modules); torch.save([b.train_x, b.train_y, b.test_x, b.test_y], sys.argv[1])")
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.pt")], env=env, capture_output=True,
                           text=True, timeout=120) for i in range(2)]
    assert [r.stdout.split() for r in runs] == [["True"], ["False"]], [r.stderr[-2000:] for r in runs]
    first, second = (torch.load(tmp_path / f"{i}.pt") for i in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert [len(t) for t in first] == [1437, 1437, 360, 360]
    assert len(list((tmp_path / "digits").glob("digits-*.pt"))) == 1
