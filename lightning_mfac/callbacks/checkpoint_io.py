"""A ``CheckpointIO`` whose saves never destroy the previous checkpoint and whose loads never run code.

Lightning's ``TorchCheckpointIO`` writes a checkpoint through an fsspec transaction, which stages
the file in the system's temporary folder and moves it over the destination at the end. When the
run folder is on another file system than ``/tmp`` that move is a copy, and a crash or a full disk
in the middle of it leaves a truncated ``last.ckpt`` where a good one was.
:class:`CrashSafeCheckpointIO` writes local checkpoints with :func:`lightning_mfac._files.atomic_write`
instead (temporary file in the destination folder, fsync, rename) and loads them with
``weights_only=True`` (no pickled code runs, whatever the file holds). Remote paths (``s3://`` ...)
keep Lightning's own behaviour.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from lightning_mfac._files import atomic_save

__all__ = ["CrashSafeCheckpointIO"]


class CrashSafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local saves and ``weights_only`` loads (see the module docstring).

    A full disk raises :class:`lightning_mfac._files.DiskFullError` naming the checkpoint, its file
    system and the space left; no partial file is left under the checkpoint's name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"storage_options={storage_options!r} is not supported by {type(self).__name__}: "
                "it writes local files only (pass storage_options=None)."
            )
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Lightning passes None unless the user chose; a checkpoint is data, never code.
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)
