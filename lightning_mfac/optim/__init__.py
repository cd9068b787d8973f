"""The M-FAC optimizer, built on :mod:`lightning_mfac.fisher` (the baselines it is compared with are
app adapters in :mod:`lightning_mfac.app.baselines`), the flat window it shares with the
``MFACPreconditioner`` callback, and the masking protocol pruning uses to reach them."""

from lightning_mfac.optim.flat import FlatPreconditioner
from lightning_mfac.optim.masking import MaskableWindow, broadcast_masks
from lightning_mfac.optim.mfac import MFAC

__all__ = ["MFAC", "FlatPreconditioner", "MaskableWindow", "broadcast_masks"]
