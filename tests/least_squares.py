"""Multi-output least squares whose gradient noise along known directions has a closed-form law.

L(w) = mean_j ½ Σ_k (s_k q_k·w − y_jk)², minimized at w* when y_jk = s_k q_k·w* + ε_jk. The gradient of a
batch of b examples at w* is −(1/b) Σ_j Σ_k ε_jk s_k q_k, so with orthonormal q_k its projection on q_k is
−(s_k/b) Σ_j ε_jk: SαS(α, σ·s_k·b^{1/α−1}) when the ε_jk are i.i.d. SαS(α, σ), independent across k.
"""

from __future__ import annotations

import torch
from torch import nn


class LeastSquares(nn.Module):
    """Forward returns {"loss": ...}, like a transformers model; ``dropout`` only to test eval mode."""

    def __init__(self, w_star: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(w_star.clone())
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.dropout(torch.einsum("bkp,p->bk", features, self.w))
        return {"loss": 0.5 * (pred - targets).square().sum(-1).mean()}


def orthonormal_directions(dim: int, k: int, seed: int = 0) -> torch.Tensor:
    """(dim, k) float64 with orthonormal columns q_k."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64)).Q


def features(scales_K: torch.Tensor, q_PK: torch.Tensor) -> torch.Tensor:
    """(K, P) features of one example: row k is s_k q_k."""
    return scales_K[:, None] * q_PK.T


def optimum(dim: int) -> torch.Tensor:
    return torch.linspace(-1, 1, dim, dtype=torch.float64)
