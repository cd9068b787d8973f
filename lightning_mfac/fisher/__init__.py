"""The M-FAC algorithms in plain PyTorch (no Lightning): static and dynamic inverse empirical
Fisher and the storage of the gradient window."""

from lightning_mfac.fisher.config import STORAGES, WindowConfig
from lightning_mfac.fisher.dynamic import DynamicFisherInverse
from lightning_mfac.fisher.static import StaticFisherInverse
from lightning_mfac.fisher.storage import DeviceWindow, PagedWindow, ShardedWindow, make_window

__all__ = [
    "STORAGES",
    "DeviceWindow",
    "DynamicFisherInverse",
    "PagedWindow",
    "ShardedWindow",
    "StaticFisherInverse",
    "WindowConfig",
    "make_window",
]
