"""Keep-masks from saliency scores: one global threshold, one per layer, and N:M groups.

Every selection is "prune the ``k`` lowest scores", with already-pruned weights scored ``-inf`` so
that they are always inside the pruned set (pruning never revives a weight) and ``k`` counted
over all selected weights, dead ones included: a target sparsity ``s`` means ``round(s · n)``
weights are zero afterwards, exactly, for ``scope="global"``, and ``Σ round(s · n_l)`` for
``scope="layer"`` (within half a weight per layer of ``s · n``).

N:M. Inside each group of ``M`` (see :mod:`~lightning_mfac.pruning.selection`) only the ``M − N``
lowest-scoring weights are *eligible*; the ``k`` lowest eligible scores are pruned. At
``s = 1 − N/M`` every eligible weight is pruned, which is exactly the N:M pattern; at a smaller
``s`` (intermediate steps of a schedule or of ``recomputations``) the mask is N:M-compatible --
no group has more than ``M − N`` zeros -- so later steps can complete it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["layer_sparsities", "prune_count", "select_masks", "sparsity_of"]


def prune_count(n: int, sparsity: float) -> int:
    """``round(sparsity · n)`` with halves rounded up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(sparsity * n + 0.5))


def _effective_scores(score: torch.Tensor, keep: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    eff = torch.where(keep.reshape(-1), score.reshape(-1).to(torch.float64), -math.inf)
    if nm is not None:
        n, m = nm
        groups = eff.view(-1, m)
        order = torch.argsort(groups, dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(m, device=order.device).expand_as(order))
        eff = torch.where((rank < m - n).reshape(-1), eff, math.inf)
    return eff


def _lowest(eff: torch.Tensor, target: int) -> torch.Tensor:
    """Boolean mask of the ``target`` lowest entries, at least all ``-inf`` ones, never ``+inf`` ones."""
    dead = int(torch.isneginf(eff).sum())
    eligible = int((eff < math.inf).sum())
    k = min(max(target, dead), eligible)
    pruned = torch.zeros(eff.shape, dtype=torch.bool, device=eff.device)
    if k:
        pruned[torch.topk(eff, k, largest=False, sorted=False).indices] = True
    return pruned


def select_masks(
    scores: dict[str, torch.Tensor],
    keep: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    nm: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """New boolean keep-masks: prune the lowest ``scores`` until ``sparsity`` is reached.

    Args:
        scores: saliency per weight, by name (any shape; higher means more important).
        keep: current keep-masks (``False`` = already pruned), same names and numels.
        sparsity: target fraction of zeros over all weights (``scope="global"``) or per layer.
        scope: ``"global"`` (one threshold) or ``"layer"`` (every layer to ``sparsity``).
        nm: ``(N, M)`` for N:M-compatible masks, or ``None``.
    """
    effs = {name: _effective_scores(scores[name], keep[name], nm) for name in keep}
    if scope == "layer":
        pruned = {name: _lowest(eff, prune_count(eff.numel(), sparsity)) for name, eff in effs.items()}
    else:
        flat = torch.cat([e.to(next(iter(effs.values())).device) for e in effs.values()])
        chosen = _lowest(flat, prune_count(flat.numel(), sparsity))
        pruned = dict(zip(effs, torch.split(chosen, [e.numel() for e in effs.values()]), strict=True))
    out = {}
    for name, old in keep.items():
        # ``| ~old``: a mask handed in that already breaks N:M keeps its extra zeros.
        dead = pruned[name].to(old.device) | ~old.reshape(-1)
        out[name] = (~dead).reshape(old.shape)
    return out


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of pruned weights over all masks together."""
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return zeros / max(1, total)


def layer_sparsities(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: int((~m).sum()) / max(1, m.numel()) for name, m in masks.items()}
