"""Operations on stacked tensors (each ``[K, ...]``) shared by the stacked forwards."""
from __future__ import annotations

from typing import Optional

import torch


def batched_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """K students' linear layers as one batched matmul: x [K, ..., C] @ w[K]^T (+ b[K]) -> [K, ..., O]."""
    k, c = x.shape[0], x.shape[-1]
    flat = x.reshape(k, -1, c)
    wt = w.transpose(1, 2)
    out = torch.bmm(flat, wt) if b is None else torch.baddbmm(b.unsqueeze(1), flat, wt)
    return out.reshape(*x.shape[:-1], w.shape[1])
