"""The M-FAC algorithms in plain PyTorch (no Lightning): static and dynamic inverse empirical
Fisher (``static``, ``dynamic``), their settings (``config``: ``WindowConfig``, ``DynamicConfig``)
and the storage of the gradient window (the ``storage`` package, one module per kind, and its
planner)."""

from lightning_mfac.fisher.config import DAMP_MODES, STORAGES, DynamicConfig, WindowConfig
from lightning_mfac.fisher.dynamic import DynamicFisherInverse
from lightning_mfac.fisher.static import StaticFisherInverse
from lightning_mfac.fisher.storage import DeviceWindow, PagedWindow, ShardedWindow, make_window

__all__ = [
    "DAMP_MODES",
    "STORAGES",
    "DynamicConfig",
    "DeviceWindow",
    "DynamicFisherInverse",
    "PagedWindow",
    "ShardedWindow",
    "StaticFisherInverse",
    "WindowConfig",
    "make_window",
]
