"""A small Vision Transformer for 32x32 images, written to be read.

Patch embedding (a conv with kernel = stride = ``patch_size``), a learned
class token and positional embedding, ``depth`` pre-norm transformer blocks
(multi-head self-attention + GELU MLP), a final LayerNorm and a linear head on
the class token.  ``self.blocks`` (an ``nn.ModuleList``) is what feature-map KD
hooks into.  ``Block`` is shared with the Audio Spectrogram Transformer.

Initialisation: truncated normal (std 0.02) for linear layers, the class token
and the positional embedding, zero biases, PyTorch's default for the patch
conv; all from the torch global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer(model: nn.Module) -> None:
    """Truncated-normal(0.02) linears, zero biases, unit LayerNorms; tokens done by the caller."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def add_encoder(model: nn.Module, num_patches: int, num_classes: int, dim: int, depth: int, heads: int,
                mlp_dim: int, dropout: float) -> None:
    """The part ViT and AST share after their patch embedding: cls token, positional
    embedding, transformer blocks, final norm and linear head, initialised."""
    model.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    model.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
    model.drop = nn.Dropout(dropout)
    model.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(depth))
    model.norm = nn.LayerNorm(dim)
    model.head = nn.Linear(dim, num_classes)
    init_transformer(model)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)


def encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches -> tokens -> blocks -> class-token logits, for a model built with ``add_encoder``."""
    x = model.patch_embed(x).flatten(2).transpose(1, 2)          # [B, N, dim]
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = model.drop(x + model.pos_embed)
    for block in model.blocks:
        x = block(x)
    return model.head(model.norm(x[:, 0]))


class ViT(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int], patch_size: int,
                 dim: int, depth: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size}")
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        add_encoder(self, num_patches, num_classes, dim, depth, heads, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode(self, x)


def vit(num_classes: int, input_shape: tuple[int, ...], patch_size: int = 4, dim: int = 256,
        depth: int = 6, heads: int = 8, mlp_dim: int = 512, dropout: float = 0.1) -> nn.Module:
    """ViT for ``(C, H, W)`` images; the defaults suit 32x32 (64 patches of 4x4)."""
    c, h, w = input_shape
    return ViT(num_classes, c, (h, w), patch_size, dim, depth, heads, mlp_dim, dropout)
