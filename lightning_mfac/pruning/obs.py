"""The Optimal Brain Surgeon step on an inverse Fisher (Hassibi & Stork 1993; M-FAC paper,
Frantar, Kurtic & Alistarh, NeurIPS 2021, static algorithm).

With the loss locally quadratic, ``δL ≈ ½ δwᵀ F δw``, removing weight ``q`` (``δw_q = −w_q``) at
least cost gives

    ρ_q = w_q² / (2 [F⁻¹]_qq),        δw = −(w_q / [F⁻¹]_qq) · F⁻¹ e_q.

Pruning a set ``Q`` at once, M-FAC (like WoodFisher) ranks by the single-weight ``ρ`` and sums
the single-weight corrections, which costs one inverse-Hessian-vector product:

    δw = −F⁻¹ v,    v_q = w_q / [F⁻¹]_qq for q ∈ Q, 0 elsewhere.

Interactions between the pruned weights are ignored, so ``w_q + δw_q`` is not exactly zero for
``|Q| > 1``; the caller zeroes the pruned set afterwards. The functions below work on flat
vectors over the weights that are still alive, matching a Fisher built from gradients
restricted to those weights.
"""

from __future__ import annotations

import torch

from lightning_mfac.fisher.static import StaticFisherInverse

__all__ = ["obs_correction", "obs_saliency"]


def obs_saliency(weights: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
    """``ρ = w² / (2 diag(F⁻¹))`` in float64."""
    w = weights.to(inv_diag.device, torch.float64)
    return w * w / (2.0 * inv_diag)


def obs_correction(
    fisher: StaticFisherInverse, weights: torch.Tensor, pruned: torch.Tensor, inv_diag: torch.Tensor | None = None
) -> torch.Tensor:
    """``δw = −F⁻¹ v`` with ``v_q = w_q / [F⁻¹]_qq`` on the boolean set ``pruned``; float64."""
    inv_diag = fisher.diag() if inv_diag is None else inv_diag
    w = weights.to(inv_diag.device, torch.float64)
    pruned = pruned.to(inv_diag.device)
    v = torch.where(pruned, w / inv_diag, torch.zeros((), dtype=torch.float64, device=w.device))
    return -fisher.mul(v)
