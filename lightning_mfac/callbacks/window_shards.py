"""Checkpoint files of sharded M-FAC windows live and die with the Lightning checkpoints that use them.

Under DDP a sharded window is checkpointed as one file per rank beside the checkpoint
(docs/design.md, "Checkpoint layout"); the ``.ckpt`` holds only a manifest of those files. Lightning
deletes old checkpoints itself (``ModelCheckpoint(save_top_k=...)``, ``last.ckpt`` rewritten every
epoch), and it would not know about the window files: left alone, every save would add a full copy
of the window to the disk.

:class:`WindowShardCheckpointIO` is :class:`~lightning_mfac.callbacks.checkpoint_io.CrashSafeCheckpointIO`
(atomic saves, ``weights_only`` loads) plus reference counting: writing ``x.ckpt`` also writes
``x.ckpt.mfac-shards.json``, the list of window files its manifests name, and the shard folder
records which checkpoint folders refer to it (``.mfac-checkpoint-folders.json``). After every save
and removal, a window file in that shard folder that no sidecar of those checkpoint folders names
is deleted: the files of an overwritten (``last.ckpt``) or removed (``save_top_k``) checkpoint, and
the orphans of a save that was interrupted before its checkpoint was written. This runs on the
rank that writes checkpoints (rank 0), so the shard directory must be on a file system all ranks
share -- as the manifest already requires.

``MFACPreconditioner`` and ``mfac-train`` install it in place of Lightning's default
(:func:`use_window_shard_checkpoint_io`); with your own ``CheckpointIO``, pass this one's logic on
or delete the shard folder together with the checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mfac._files import atomic_write_text, is_temporary, plain_file_name
from lightning_mfac.callbacks.checkpoint_io import CrashSafeCheckpointIO
from lightning_mfac.fisher.storage import SHARDED_CHECKPOINT_FORMAT, WINDOW_FILE_NAME

#: Appended to a checkpoint's path: the window files it refers to.
SIDECAR_SUFFIX = ".mfac-shards.json"
#: In a shard folder: the checkpoint folders whose sidecars may name its files.
FOLDERS_FILE = ".mfac-checkpoint-folders.json"


def window_files(state: Any) -> Iterator[str]:
    """The absolute paths of the window files that the sharded-window manifests anywhere in a
    checkpoint dictionary (callback or optimizer state, any depth) refer to."""
    if isinstance(state, dict):
        if state.get("format") == SHARDED_CHECKPOINT_FORMAT:
            for _, _, name in state["files"]:
                yield os.path.join(state["directory"], plain_file_name(name, "sharded window manifest"))
            return
        for value in state.values():
            yield from window_files(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from window_files(value)


def _read_json_list(path: str, key: str) -> list[str]:
    """``key`` of a JSON file written by this module; nothing for a missing or unreadable one (a
    damaged sidecar then keeps no file alive, it never names one to delete)."""
    try:
        with open(path) as f:
            value = json.load(f)[key]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _is_window_file(name: str) -> bool:
    if is_temporary(name):  # a per-rank file whose write was interrupted
        name = name[1:].rsplit(".", 1)[0]
    return WINDOW_FILE_NAME.fullmatch(name) is not None


class WindowShardCheckpointIO(CrashSafeCheckpointIO):
    """A crash-safe ``CheckpointIO`` that keeps the window files of sharded M-FAC windows exactly as
    long as a checkpoint refers to them (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        sidecar = os.fspath(path) + SIDECAR_SUFFIX
        before = _read_json_list(sidecar, "files")  # an overwritten checkpoint (last.ckpt) releases its files
        super().save_checkpoint(checkpoint, path, storage_options)
        files = sorted(set(window_files(checkpoint)))
        if files:
            folder = os.path.dirname(os.path.abspath(sidecar))
            for shard_dir in {os.path.dirname(f) for f in files}:
                _register(shard_dir, folder)
            atomic_write_text(sidecar, json.dumps({"checkpoint": os.path.basename(os.fspath(path)),
                                                   "files": files}, indent=1))
        elif before and os.path.exists(sidecar):
            os.remove(sidecar)
        self._collect({os.path.dirname(f) for f in [*before, *files]})

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar = os.fspath(path) + SIDECAR_SUFFIX
        files = _read_json_list(sidecar, "files")
        if os.path.exists(sidecar):
            os.remove(sidecar)
        self._collect({os.path.dirname(f) for f in files})

    @staticmethod
    def _collect(shard_dirs: Iterable[str]) -> None:
        """Delete the window files in ``shard_dirs`` that no checkpoint of their registered folders
        names. Only names this package writes are considered: a crafted sidecar can keep a file
        alive, never get one deleted."""
        for shard_dir in shard_dirs:
            if not os.path.isdir(shard_dir):
                continue
            kept: set[str] = set()
            for folder in _read_json_list(os.path.join(shard_dir, FOLDERS_FILE), "folders"):
                if os.path.isdir(folder):
                    for entry in os.scandir(folder):
                        if entry.name.endswith(SIDECAR_SUFFIX):
                            kept.update(os.path.abspath(f) for f in _read_json_list(entry.path, "files"))
            for entry in os.scandir(shard_dir):
                if _is_window_file(entry.name) and os.path.abspath(entry.path) not in kept:
                    os.remove(entry.path)


def _register(shard_dir: str, checkpoint_folder: str) -> None:
    registry = os.path.join(shard_dir, FOLDERS_FILE)
    folders = _read_json_list(registry, "folders")
    if checkpoint_folder not in folders:
        atomic_write_text(registry, json.dumps({"folders": [*folders, checkpoint_folder]}, indent=1))


def use_window_shard_checkpoint_io(trainer: Any) -> None:
    """Install :class:`WindowShardCheckpointIO` on a trainer that uses Lightning's default
    ``TorchCheckpointIO`` (every trainer gets crash-safe saves); on a multi-process trainer with
    another ``CheckpointIO``, warn that sharded window files are not cleaned up with it."""
    strategy = trainer.strategy
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
        "M-FAC windows are not deleted together with old checkpoints; remove the shard folder with "
        "them, or derive your CheckpointIO from lightning_mfac.callbacks.window_shards.WindowShardCheckpointIO."
    )
