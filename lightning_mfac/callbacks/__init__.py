"""Lightning callbacks: M-FAC preconditioning and OBS pruning."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "MFACPreconditioner": "lightning_mfac.callbacks.preconditioner",
    "OBSPruning": "lightning_mfac.callbacks.obs_pruning",
    "WindowShardCheckpointIO": "lightning_mfac.callbacks.window_shards",
    "use_window_shard_checkpoint_io": "lightning_mfac.callbacks.window_shards",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    # Imported on first use so that each callback's module loads only what it needs.
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'lightning_mfac.callbacks' has no attribute {name!r}")
