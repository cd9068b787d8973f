"""Optimizers built on :mod:`lightning_mfac.fisher`."""

from lightning_mfac.optim.mfac import MFAC

__all__ = ["MFAC"]
