"""Checkpoint files of sharded M-FAC windows live and die with the Lightning checkpoints that use them.

Under DDP a sharded window is checkpointed as one file per rank beside the checkpoint
(docs/design.md, "Checkpoint layout"); the ``.ckpt`` holds only a manifest of those files. Lightning
deletes old checkpoints itself (``ModelCheckpoint(save_top_k=...)``, ``last.ckpt`` rewritten every
epoch), and it would not know about the window files: left alone, every save would add a full copy
of the window to the disk.

:class:`WindowShardCheckpointIO` is Lightning's own ``TorchCheckpointIO`` plus reference counting:
writing ``x.ckpt`` also writes ``x.ckpt.mfac-shards.json``, the list of window files its manifests
name; removing or overwriting a checkpoint deletes the window files that no remaining checkpoint
of the same folder names. Both run on the rank that writes checkpoints (rank 0), so the shard
directory must be on a file system all ranks share -- as the manifest already requires.

``MFACPreconditioner`` and ``mfac-train`` install it under multi-process strategies
(:func:`use_window_shard_checkpoint_io`); with your own ``CheckpointIO``, pass this one's logic on
or delete the shard folder together with the checkpoints.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mfac.fisher.storage import SHARDED_CHECKPOINT_FORMAT

#: Appended to a checkpoint's path: the window files it refers to.
SIDECAR_SUFFIX = ".mfac-shards.json"


def window_files(state: Any) -> Iterator[str]:
    """The absolute paths of the window files that the sharded-window manifests anywhere in a
    checkpoint dictionary (callback or optimizer state, any depth) refer to."""
    if isinstance(state, dict):
        if state.get("format") == SHARDED_CHECKPOINT_FORMAT:
            for _, _, name in state["files"]:
                yield os.path.join(state["directory"], name)
            return
        for value in state.values():
            yield from window_files(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from window_files(value)


def _read_sidecar(path: str) -> list[str]:
    try:
        with open(path) as f:
            return list(json.load(f)["files"])
    except FileNotFoundError:
        return []


class WindowShardCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that keeps the window files of sharded M-FAC windows exactly as long as
    a checkpoint in the same folder refers to them (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        sidecar = os.fspath(path) + SIDECAR_SUFFIX
        before = _read_sidecar(sidecar)  # an overwritten checkpoint (last.ckpt) releases its files
        super().save_checkpoint(checkpoint, path, storage_options)
        files = sorted(set(window_files(checkpoint)))
        if files:
            tmp = sidecar + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"checkpoint": os.path.basename(os.fspath(path)), "files": files}, f, indent=1)
            os.replace(tmp, sidecar)
        elif before:
            os.remove(sidecar)
        self._release(before, os.path.dirname(sidecar))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar = os.fspath(path) + SIDECAR_SUFFIX
        files = _read_sidecar(sidecar)
        if os.path.exists(sidecar):
            os.remove(sidecar)
        self._release(files, os.path.dirname(sidecar))

    @staticmethod
    def _release(files: list[str], folder: str) -> None:
        """Delete those of ``files`` that no checkpoint left in ``folder`` refers to."""
        if not files:
            return
        kept: set[str] = set()
        for other in glob.glob(os.path.join(glob.escape(folder), "*" + SIDECAR_SUFFIX)):
            kept.update(_read_sidecar(other))
        for file in set(files) - kept:
            if os.path.exists(file):
                os.remove(file)


def use_window_shard_checkpoint_io(trainer: Any) -> None:
    """Install :class:`WindowShardCheckpointIO` on a multi-process trainer that uses Lightning's
    default ``TorchCheckpointIO``; warn once when another ``CheckpointIO`` is in place."""
    if trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, WindowShardCheckpointIO):
        return
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = WindowShardCheckpointIO()
        return
    rank_zero_warn(
        f"lightning_mfac: the trainer uses {type(current).__name__}, so the per-rank files of sharded "
        "M-FAC windows are not deleted together with old checkpoints; remove the shard folder with "
        "them, or derive your CheckpointIO from lightning_mfac.callbacks.window_shards.WindowShardCheckpointIO."
    )
