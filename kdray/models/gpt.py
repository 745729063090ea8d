"""Nano-GPT and Pico-GPT: nanoGPT's character-level transformer (Karpathy), plain.

``num_classes`` is the vocabulary size, ``input_shape`` is ``(block_size,)``,
``forward(idx [B, T])`` returns logits ``[B, T, vocab]`` for every position.
Pre-norm blocks (causal self-attention through
``F.scaled_dot_product_attention(is_causal=True)``, GELU MLP), learned
positional embedding, final LayerNorm, a linear head tied to the token
embedding (``tie_weights``).  ``self.blocks`` holds the transformer blocks
(feature-map KD reads block b, 1-indexed).

Defaults are the paper's TinyShakespeare models: Nano-GPT n_embd 384, 6 heads,
6 blocks, dropout 0.2, block size 256; Pico-GPT the same at n_embd 192.
``bias`` defaults to False as in nanoGPT's shakespeare-char configuration.
``width`` scales n_embd for the width sweep: ``scaled_n_embd`` rounds to a
multiple of the head count (at least one channel per head).

Initialisation is nanoGPT's: N(0, 0.02) for linears and embeddings, zero
biases, and N(0, 0.02 / sqrt(2 * n_layer)) for the residual projections,
all from the torch global RNG.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn



def scaled_n_embd(n_embd: int, n_head: int, width: float = 1.0) -> int:
    """``round(n_embd * width / n_head) * n_head``, at least ``n_head``."""
    return max(n_head, round(n_embd * width / n_head) * n_head)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_embd: int, n_head: int, n_layer: int,
                 dropout: float, bias: bool, tie_weights: bool):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        self.block_size, self.n_embd = block_size, n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _gpt(num_classes: int, input_shape: tuple[int, ...], n_embd: int, n_head: int, n_layer: int,
         dropout: float, block_size: Optional[int], bias: bool, width: float, tie_weights: bool) -> GPT:
    if block_size is None:
        block_size = input_shape[0] if input_shape else 256
    if input_shape and input_shape[0] > block_size:
        raise ValueError(f"input length {input_shape[0]} exceeds block_size {block_size}")
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    return GPT(num_classes, block_size, scaled_n_embd(n_embd, n_head, width), n_head, n_layer,
               dropout, bias, tie_weights)


def nano_gpt(num_classes: int, input_shape: tuple[int, ...], n_embd: int = 384, n_head: int = 6,
             n_layer: int = 6, dropout: float = 0.2, block_size: Optional[int] = None, bias: bool = False,
             width: float = 1.0, tie_weights: bool = True) -> nn.Module:
    return _gpt(num_classes, input_shape, n_embd, n_head, n_layer, dropout, block_size, bias, width,
                tie_weights)


def pico_gpt(num_classes: int, input_shape: tuple[int, ...], n_embd: int = 192, n_head: int = 6,
             n_layer: int = 6, dropout: float = 0.2, block_size: Optional[int] = None, bias: bool = False,
             width: float = 1.0, tie_weights: bool = True) -> nn.Module:
    return _gpt(num_classes, input_shape, n_embd, n_head, n_layer, dropout, block_size, bias, width,
                tie_weights)
