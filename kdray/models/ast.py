"""Audio Spectrogram Transformer (Gong et al. 2021), small and from scratch.

The log-mel spectrogram ``(n_mels, frames)`` (or ``(1, n_mels, frames)``) is
cut into ``patch`` x ``patch`` tiles over the mel x time plane with step
``stride`` (AST's 16 / 10, i.e. overlapping; ``stride = patch`` gives
non-overlapping patches), each tile is linearly embedded (a strided conv), a
class token is prepended, a learned positional embedding sized from
``input_shape`` is added, and ``depth`` pre-norm transformer blocks (the ViT's
``Block``) follow; the head reads the class token.  No ImageNet pre-training
(there are no weights at run time).  ``self.blocks`` is what feature-map KD
hooks into.  ``patch`` and ``stride`` may be an int or a (mel, time) pair.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from kdray.models.vit import add_encoder, encode

Pair = Union[int, tuple[int, int], list[int]]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class AST(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], dim: int, depth: int, heads: int,
                 mlp_dim: int, patch: Pair, stride: Pair, dropout: float):
        super().__init__()
        in_channels, n_mels, frames = (1, *input_shape) if len(input_shape) == 2 else input_shape
        (pf, pt), (sf, st) = _pair(patch), _pair(stride)
        if pf > n_mels or pt > frames:
            raise ValueError(f"patch {pf}x{pt} is larger than the {n_mels}x{frames} spectrogram")
        grid = ((n_mels - pf) // sf + 1, (frames - pt) // st + 1)
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=(pf, pt), stride=(sf, st))
        add_encoder(self, grid[0] * grid[1], num_classes, dim, depth, heads, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:                                             # [B, n_mels, frames]
            x = x.unsqueeze(1)
        return encode(self, x)


def ast(num_classes: int, input_shape: tuple[int, ...], dim: int = 192, depth: int = 6, heads: int = 4,
        mlp_dim: int | None = None, patch: Pair = 16, stride: Pair = 10, dropout: float = 0.1) -> nn.Module:
    """AST for ``(n_mels, frames)`` spectrograms; ``mlp_dim`` defaults to ``4 * dim``."""
    return AST(num_classes, tuple(input_shape), dim, depth, heads, mlp_dim or 4 * dim, patch, stride, dropout)
