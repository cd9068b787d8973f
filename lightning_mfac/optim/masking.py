"""The one protocol for handing pruning masks to whatever holds an M-FAC window.

After a pruning step, the pruned coordinates must leave every gradient window (the
``MFAC`` optimizer's, ``MFACPreconditioner``'s) and every momentum buffer, or the next
update moves the pruned weights again. The pruning code does not know who holds a window;
it calls :func:`broadcast_masks` on every candidate, and anything that implements
:class:`MaskableWindow` takes part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch

Masks = Mapping[str, torch.Tensor] | Mapping[torch.Tensor, torch.Tensor]
"""Keep-masks: a boolean tensor of the parameter's shape, ``True`` where the weight stays, keyed
by parameter name (as pruning returns them; for holders that know their parameters' names) or by
the parameter tensor itself (by identity; every holder accepts these, and ``OBSPruning`` sends
them). Parameters absent from the mapping are left alone."""


@runtime_checkable
class MaskableWindow(Protocol):
    """Something whose state carries per-coordinate information about parameters."""

    def apply_masks(self, masks: Masks) -> None:
        """Drop the coordinates where ``masks[param]`` is False from the held state, so a pruned
        weight receives exactly zero update from then on. Must not read device values on the host."""


def broadcast_masks(targets: Iterable[object], masks: Masks) -> int:
    """Call ``apply_masks(masks)`` on every target that implements :class:`MaskableWindow`
    (others are skipped); returns how many did."""
    count = 0
    for target in targets:
        if isinstance(target, MaskableWindow):
            target.apply_masks(masks)
            count += 1
    return count
