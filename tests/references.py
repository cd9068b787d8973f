"""Float64 references and training-like gradients shared by the tests (plain module, importable
from any test file; conftest.py hands the same functions out as fixtures)."""

from __future__ import annotations

import torch


def dense_fisher_inverse(grads: torch.Tensor, damp: float, block_size: int | None = None) -> torch.Tensor:
    """float64 ``F⁻¹`` of ``F = λI + GᵀG/m`` for the ``(m, d)`` rows ``G`` (zero rows count in ``m``),
    block-diagonal over consecutive blocks of ``block_size`` coordinates if given."""
    g = grads.to(torch.float64)
    m, d = g.shape
    fisher = damp * torch.eye(d, dtype=torch.float64, device=g.device) + g.t() @ g / m
    if block_size is not None:
        blk = torch.arange(d, device=g.device) // block_size
        fisher = fisher * (blk[:, None] == blk[None, :])
    return torch.linalg.inv(fisher)


def correlated_gradients(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(n, d)`` rows sharing a slowly drifting direction, like consecutive training gradients."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen, dtype=torch.float64)
    rows = []
    for _ in range(n):
        base = 0.9 * base + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
        rows.append(base + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64))
    return torch.stack(rows).to(dtype)
