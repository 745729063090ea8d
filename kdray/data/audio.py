"""The audio pipeline shared by SpeechCommands, UrbanSound8K and FSDD (docs/protocol.md §6.1).

Per file, once per data set (never per epoch):

1. read the WAV (``soundfile`` when installed, else ``scipy.io.wavfile``; integer
   PCM scaled to [-1, 1]: int16 / 2**15, int32 and 24-bit / 2**31, uint8 (x - 128) / 128);
2. mono: the mean over channels;
3. resample to 16 kHz with ``torchaudio.functional.resample`` (skipped at 16 kHz);
4. pad with zeros at the end or crop (keep the start) to ``seconds * 16000`` samples
   (1 s for SpeechCommands/FSDD, 4 s for UrbanSound8K);
5. ``torchaudio.transforms.Spectrogram(n_fft=512, power=2)`` (hop 256, centred) then
   ``MelScale(n_mels=32, sample_rate=16000, n_stft=257)``: a power mel spectrogram
   ``[32, frames]`` with ``frames = samples // 256 + 1`` (63 for 1 s, 251 for 4 s);
6. ``log(x + 1e-6)`` only with ``log_mel: true``; the paper's pipeline has no log, so
   the default is the plain power spectrogram.

The result, ``float32 [N, n_mels, frames]`` for all files of a data set, is cached with
``kdray.data.disk_cached`` under ``<data set folder>/.kdray_cache/`` (or ``cache_dir``;
a read-only data root falls back to ``$KDRAY_CACHE`` / ``~/.cache/kdray``), keyed by
these settings and the files' names and sizes, so the second load reads one file.
Audio bundles use the default preprocess (the float spectrograms as they are).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kdray.data.bundle import disk_cached, files_signature

SAMPLE_RATE = 16000
N_FFT = 512
N_MELS = 32
LOG_EPS = 1e-6


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """``(float32 [channels, samples] in [-1, 1], sample rate)``."""
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
        return np.ascontiguousarray(data.T), int(sr)
    from scipy.io import wavfile

    try:
        sr, data = wavfile.read(str(path))
    except ValueError as e:
        raise ValueError(f"{path}: cannot read this WAV with scipy ({e}); install soundfile") from None
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype == np.int16:
        x = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:                # 32-bit, and 24-bit that scipy left-justifies in int32
        x = data.astype(np.float32) / 2147483648.0
    elif data.dtype == np.int64:
        x = (data / 9223372036854775808.0).astype(np.float32)
    else:
        x = data.astype(np.float32)
    x = x[:, None] if x.ndim == 1 else x
    return np.ascontiguousarray(x.T), int(sr)


def load_waveform(path: Path, seconds: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Steps 1-4: mono, resampled, padded/cropped ``float32 [round(seconds * sample_rate)]``."""
    import torchaudio.functional as AF

    data, sr = read_wav(path)
    w = torch.from_numpy(data).mean(0)
    if sr != sample_rate:
        w = AF.resample(w, sr, sample_rate)
    n = int(round(seconds * sample_rate))
    return w[:n] if len(w) >= n else torch.nn.functional.pad(w, (0, n - len(w)))


def n_frames(seconds: float, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> int:
    return int(round(seconds * sample_rate)) // (n_fft // 2) + 1


def mel_spectrograms(paths: Sequence[Path], seconds: float, log_mel: bool = False, n_mels: int = N_MELS,
                     chunk: int = 512) -> torch.Tensor:
    """Steps 1-6 for every file: ``float32 [len(paths), n_mels, frames]``."""
    import torchaudio.transforms as AT

    spec = AT.Spectrogram(n_fft=N_FFT, power=2)
    mel = AT.MelScale(n_mels=n_mels, sample_rate=SAMPLE_RATE, n_stft=N_FFT // 2 + 1)
    out = torch.empty(len(paths), n_mels, n_frames(seconds), dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, len(paths), chunk):
            w = torch.stack([load_waveform(p, seconds) for p in paths[i:i + chunk]])
            m = mel(spec(w))
            out[i:i + len(w)] = torch.log(m + LOG_EPS) if log_mel else m
    return out


def cached_spectrograms(name: str, data_dir: Path, splits: dict[str, Sequence[Path]], seconds: float,
                        log_mel: bool = False, cache_dir: Optional[str] = None) -> tuple[dict, Path, bool]:
    """Spectrograms of each split's files, from the disk cache when present.

    Returns ``({split: float32 [N, 32, frames]}, cache path, hit)``.
    """
    settings = {"format": 1, "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "power": 2, "n_mels": N_MELS,
                "seconds": seconds, "log_mel": log_mel,
                "files": {k: files_signature(v, data_dir) for k, v in splits.items()}}

    def build() -> dict:
        return {k: mel_spectrograms(v, seconds, log_mel) for k, v in splits.items()}

    return disk_cached(name, data_dir, settings, build, cache_dir)


def input_shape(seconds: float) -> tuple[int, int]:
    return (N_MELS, n_frames(seconds))
