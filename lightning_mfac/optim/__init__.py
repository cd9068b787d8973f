"""The M-FAC optimizer, built on :mod:`lightning_mfac.fisher` (the baselines it is compared with are
app adapters in :mod:`lightning_mfac.app.baselines`)."""

from lightning_mfac.optim.mfac import MFAC

__all__ = ["MFAC"]
