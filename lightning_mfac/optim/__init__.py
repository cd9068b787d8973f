"""Optimizers built on :mod:`lightning_mfac.fisher`, and adapters for the baselines it is compared with."""

from lightning_mfac.optim.baselines import SINGD, muon, shampoo, singd, soap, unsupported_singd_layers
from lightning_mfac.optim.mfac import MFAC

__all__ = ["MFAC", "SINGD", "muon", "shampoo", "singd", "soap", "unsupported_singd_layers"]
