"""lightning-mfac: M-FAC second-order preconditioning and Optimal Brain Surgeon pruning for
PyTorch Lightning (Frantar, Kurtic & Alistarh, NeurIPS 2021).

The algorithms live in :mod:`lightning_mfac.fisher` (pure PyTorch). The Lightning pieces are
imported lazily so that ``import lightning_mfac.fisher`` never pulls Lightning in.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_mfac.fisher import DynamicFisherInverse, StaticFisherInverse

__version__ = "0.1.0"

_LAZY = {
    "MFAC": "lightning_mfac.optim",
    "MFACPreconditioner": "lightning_mfac.callbacks",
    "OBSPruning": "lightning_mfac.callbacks",
    "oneshot_prune": "lightning_mfac.pruning",
    "OBSConfig": "lightning_mfac.pruning",
    "WindowConfig": "lightning_mfac.fisher.config",
    "DynamicConfig": "lightning_mfac.fisher.config",
}

__all__ = ["DynamicFisherInverse", "StaticFisherInverse", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_mfac' has no attribute {name!r}")
