"""Logger adapters of the app."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _WandbLogger

__all__ = ["WandbLogger"]


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous`` argument it always passes to ``wandb.init``.

    Current W&B versions warn about that argument on every run, whatever its value.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
