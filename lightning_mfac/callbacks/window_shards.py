"""Lightning checkpoints of sharded M-FAC windows: every rank writes its columns, and the files live
and die with the checkpoint that uses them.

Under DDP a sharded window's ``state_dict()`` holds only this rank's columns, and Lightning writes
a checkpoint from rank 0 alone. ``Strategy.save_checkpoint`` is the one call every rank makes with
the checkpoint's path, so :func:`use_window_shard_checkpoint_io` wraps it: first every rank writes
its columns into ``<checkpoint>.mfac-window/`` and the checkpoint dictionary gets the manifest of
those files (:func:`lightning_mfac.fisher.storage.write_window_shards`), then Lightning saves as
usual (docs/design.md, "Checkpoint layout").

:class:`WindowShardCheckpointIO` is :class:`~lightning_mfac.callbacks.checkpoint_io.CrashSafeCheckpointIO`
(atomic saves, ``weights_only`` loads) that keeps that folder in step with its checkpoint: after a
save it deletes the files the checkpoint no longer names (an overwritten ``last.ckpt``, a save
interrupted before its checkpoint was written), removing a checkpoint (``save_top_k``) removes its
folder, and a load finds the files beside the path it was given, so a moved run folder resumes.
The folder must be on a file system all ranks share, like the checkpoint folder itself.

``MFACPreconditioner`` and ``mfac-train`` install both; with the ``MFAC`` optimizer in your own
``Trainer`` under DDP, call ``use_window_shard_checkpoint_io(trainer)`` (e.g. in your
LightningModule's ``setup``).
"""

from __future__ import annotations

import functools
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mfac.callbacks.checkpoint_io import CrashSafeCheckpointIO
from lightning_mfac.fisher.storage import locate_window_shards, prune_window_folder, write_window_shards

__all__ = ["WindowShardCheckpointIO", "use_window_shard_checkpoint_io"]


class WindowShardCheckpointIO(CrashSafeCheckpointIO):
    """A crash-safe ``CheckpointIO`` that keeps the files of sharded M-FAC windows exactly as long as
    their checkpoint and finds them from its path (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        prune_window_folder(path, checkpoint)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        prune_window_folder(path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return locate_window_shards(super().load_checkpoint(path, map_location, weights_only), path)


def _write_shards_on_every_rank(strategy: Any) -> None:
    save = strategy.save_checkpoint
    if getattr(save, "writes_window_shards", False):
        return

    @functools.wraps(save)
    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        save(write_window_shards(checkpoint, filepath), filepath, storage_options=storage_options)

    save_checkpoint.writes_window_shards = True  # type: ignore[attr-defined]
    strategy.save_checkpoint = save_checkpoint


def use_window_shard_checkpoint_io(trainer: Any) -> None:
    """Make ``trainer``'s checkpoints hold sharded M-FAC windows whole: every rank writes its columns
    beside the checkpoint, and :class:`WindowShardCheckpointIO` replaces Lightning's default
    ``TorchCheckpointIO`` (every trainer gets crash-safe saves). With another ``CheckpointIO`` on a
    multi-process trainer, warn that the window files are neither found from a moved checkpoint nor
    deleted with it."""
    strategy = trainer.strategy
    _write_shards_on_every_rank(strategy)
    current = strategy.checkpoint_io
    if isinstance(current, WindowShardCheckpointIO):
        return
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = WindowShardCheckpointIO()
        return
    if trainer.world_size <= 1:
        return
    rank_zero_warn(
        f"lightning_mfac: the trainer uses {type(current).__name__}, so the per-rank files of sharded "
        "M-FAC windows (<checkpoint>.mfac-window/) are not deleted together with old checkpoints; remove "
        "them with their checkpoints, or derive your CheckpointIO from "
        "lightning_mfac.callbacks.window_shards.WindowShardCheckpointIO."
    )
