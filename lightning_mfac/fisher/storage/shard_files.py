"""The files of sharded windows beside a checkpoint (docs/design.md, "Checkpoint layout").

``ShardedWindow.state_dict()`` has no side effects: it returns this rank's own columns, in
``LOCAL_SHARD_FORMAT``, and touches neither the disk nor the other ranks. A checkpoint of the whole
window is made in two phases, because the checkpoint file itself is written by one rank while each
rank holds columns no other rank has:

1. :func:`write_window_shards` -- collective, on every rank, with the checkpoint's path: each rank
   writes its columns into ``<checkpoint>.mfac-window/`` and every local state in the checkpoint
   dictionary is replaced by the manifest of all ranks' files (the manifest is what rank 0 saves);
2. after the checkpoint is written, :func:`prune_window_folder` (on the writing rank) deletes the
   files of that folder that the new checkpoint no longer names (an overwritten ``last.ckpt``).

A load finds the files from the checkpoint's path (:func:`locate_window_shards`): a run folder
moved or copied as a whole resumes. Lightning users get all of it from
``lightning_mfac.callbacks.window_shards``; code without Lightning calls these functions itself.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac._files import DiskFullError, atomic_save, is_temporary, plain_file_name
from lightning_mfac.fisher.storage.base import (
    LOCAL_SHARD_FORMAT,
    RANK_LOCAL_CHECKPOINT_FORMAT,
    RANK_LOCAL_FORMAT,
    SHARD_FILE_FORMAT,
    SHARDED_CHECKPOINT_FORMAT,
)

#: Appended to a checkpoint's path: the folder of its sharded windows' files.
SHARD_FOLDER_SUFFIX = ".mfac-window"
#: The name of a per-rank window file: save tag, window number in the checkpoint, global rank, world.
WINDOW_FILE_NAME = re.compile(r"window-[0-9a-f]{12}-\d{3}-rank\d{5}-of-\d{5}\.pt")

__all__ = [
    "SHARD_FOLDER_SUFFIX",
    "WINDOW_FILE_NAME",
    "locate_window_shards",
    "rank_local",
    "rank_local_value",
    "prune_window_folder",
    "window_files",
    "window_shard_folder",
    "write_window_shards",
]


def window_shard_folder(path: str | os.PathLike) -> str:
    """The folder, beside the checkpoint ``path``, that holds its sharded windows' files."""
    return os.path.abspath(os.fspath(path)) + SHARD_FOLDER_SUFFIX


def _walk(state: Any, fmt: str | tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The dictionaries of format ``fmt`` (one or several) anywhere in ``state``, in a fixed
    (insertion) order."""
    fmts = (fmt,) if isinstance(fmt, str) else fmt
    if isinstance(state, dict):
        if state.get("format") in fmts:
            yield state
            return
        for value in state.values():
            yield from _walk(value, fmt)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _walk(value, fmt)


def _replaced(state: Any, new: dict[int, dict[str, Any]]) -> Any:
    """``state`` with the dictionaries whose ``id`` is in ``new`` replaced; the caller's containers
    are left as they are (copies are made along the way)."""
    if id(state) in new:
        return new[id(state)]
    if isinstance(state, dict):
        return {k: _replaced(v, new) for k, v in state.items()}
    if isinstance(state, list):
        return [_replaced(v, new) for v in state]
    if isinstance(state, tuple):
        return tuple(_replaced(v, new) for v in state)
    return state


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; every other backend takes CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _file_name(tag: str, index: int, rank: int, world: int) -> str:
    return f"window-{tag}-{index:03d}-rank{rank:05d}-of-{world:05d}.pt"


_MANIFESTS = (SHARDED_CHECKPOINT_FORMAT, RANK_LOCAL_CHECKPOINT_FORMAT)


def rank_local(value: Any) -> dict[str, Any]:
    """Mark ``value`` (tensors and plain data) as this rank's own: :func:`write_window_shards` writes
    it into this rank's file, and :func:`rank_local_value` gives each rank its own back."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return {"format": RANK_LOCAL_FORMAT, "rank": rank, "world": world, "value": value}


def rank_local_value(state: Any) -> Any:
    """The value :func:`rank_local` marked, for this rank: from the state itself (not yet written)
    or from this rank's file of a checkpoint's manifest; anything else is returned as it is.
    Refused (a ``ValueError`` saying why) when the world size or the rank differ from the save's."""
    if not isinstance(state, dict) or state.get("format") not in (RANK_LOCAL_FORMAT, RANK_LOCAL_CHECKPOINT_FORMAT):
        return state
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if state["world"] != world:
        raise ValueError(f"this state was saved per rank by {state['world']} ranks; {world} are running now: "
                         "it resumes only in the world size it was saved in.")
    if state["format"] == RANK_LOCAL_FORMAT:
        if state["rank"] != rank:
            raise ValueError(f"this state is rank {state['rank']}'s; this is rank {rank}: write the checkpoint with "
                             "write_window_shards on every rank.")
        return state["value"]
    _, _, name = state["files"][rank]
    path = os.path.join(state["directory"], plain_file_name(name, "per-rank state manifest"))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != RANK_LOCAL_FORMAT or saved["rank"] != rank:
        raise ValueError(f"{path} is not rank {rank}'s state of this checkpoint.")
    return saved["value"]


def write_window_shards(state: Any, path: str | os.PathLike) -> Any:
    """Write every rank's sharded-window columns found in ``state`` beside the checkpoint ``path``
    and return ``state`` with each of them replaced by the manifest of all ranks' files.

    Collective over the default process group: every rank calls it with its own ``state`` (built by
    the same code, so the local shards come in the same order) and rank 0's ``path`` names the
    folder. Each rank writes only its own columns (and the values marked :func:`rank_local`, such as
    Adam moments of its FSDP2 shards, each replaced by a manifest of every rank's file); one broadcast names the save (a new save never
    overwrites the files an older checkpoint refers to) and one all-reduce tells every rank whether
    all files were written, so a full disk on one rank fails the save on all of them. A ``state``
    without local shards is returned as it is, with no collective."""
    local = list(_walk(state, (LOCAL_SHARD_FORMAT, RANK_LOCAL_FORMAT)))
    if not local:
        return state
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("write_window_shards: the state holds sharded windows, but torch.distributed "
                           "is not initialized; call it on every rank of the group that made them.")
    rank, world = dist.get_rank(), dist.get_world_size()
    named = [(window_shard_folder(path), uuid.uuid4().hex[:12])] if rank == 0 else [None]
    dist.broadcast_object_list(named, src=0)
    folder, tag = named[0]
    failure: OSError | None = None
    try:
        os.makedirs(folder, exist_ok=True)
        for index, shard in enumerate(local):
            # A crash or a full disk mid-write leaves no truncated file under the name a checkpoint
            # refers to (lightning_mfac._files).
            content = shard if shard["format"] == RANK_LOCAL_FORMAT else {**shard, "format": SHARD_FILE_FORMAT}
            atomic_save(content, os.path.join(folder, _file_name(tag, index, rank, world)))
    except OSError as err:
        failure = err
    # In place of a barrier: every rank learns whether all files were written (and that all ranks
    # found as many windows), instead of waiting forever for a rank that failed.
    level = 0 if failure is None else 1 + isinstance(failure, DiskFullError)
    flags = torch.tensor([level, len(local), -len(local)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if int(flags[0]) == 2:
        raise DiskFullError(errno.ENOSPC, f"no space left on device: another rank could not write its "
                                          f"sharded window file into {folder}")
    if int(flags[0]) == 1:
        raise OSError(f"sharded window checkpoint: another rank could not write its file into {folder}")
    if int(flags[1]) != -int(flags[2]):
        raise RuntimeError(f"write_window_shards: the ranks hold different numbers of sharded windows "
                           f"(between {-int(flags[2])} and {int(flags[1])}); every rank must save the same state.")
    manifests = {
        id(shard): {
            "format": RANK_LOCAL_CHECKPOINT_FORMAT,
            "world": world,
            "directory": folder,
            "files": [(r, r + 1, _file_name(tag, index, r, world)) for r in range(world)],
        }
        if shard["format"] == RANK_LOCAL_FORMAT
        else {
            "format": SHARDED_CHECKPOINT_FORMAT,
            "rows": shard["rows"],
            "dim": shard["dim"],
            "dtype": shard["dtype"],
            "directory": folder,
            "files": [
                (lo, hi, _file_name(tag, index, member, world))
                for member, segments in shard["members"]
                for lo, hi in segments
                if hi > lo
            ],
        }
        for index, shard in enumerate(local)
    }
    return _replaced(state, manifests)


def window_files(state: Any) -> Iterator[str]:
    """The absolute paths of the window files that the sharded-window manifests anywhere in a
    checkpoint dictionary (callback or optimizer state, any depth) refer to."""
    for manifest in _walk(state, _MANIFESTS):
        for _, _, name in manifest["files"]:
            yield os.path.join(manifest["directory"], plain_file_name(name, "sharded window manifest"))


def locate_window_shards(state: Any, path: str | os.PathLike) -> Any:
    """Point the sharded-window manifests in ``state``, loaded from the checkpoint ``path``, at the
    folder beside that path (or beside the file a ``last.ckpt`` link leads to) when their files are
    there: a run folder that was moved or copied resumes. Manifests are updated in place; ``state``
    is returned."""
    candidates = [window_shard_folder(path), window_shard_folder(os.path.realpath(os.fspath(path)))]
    for manifest in _walk(state, _MANIFESTS):
        names = [plain_file_name(name, "sharded window manifest") for _, _, name in manifest["files"]]
        for folder in candidates:
            if all(os.path.isfile(os.path.join(folder, name)) for name in names):
                manifest["directory"] = folder
                break
    return state


def _is_window_file(name: str) -> bool:
    if is_temporary(name):  # a per-rank file whose write was interrupted
        name = name[1:].rsplit(".", 1)[0]
    return WINDOW_FILE_NAME.fullmatch(name) is not None


def prune_window_folder(path: str | os.PathLike, state: Any | None = None) -> None:
    """Delete the window files beside the checkpoint ``path`` that ``state`` (the checkpoint as
    written; ``None`` when it was removed) does not name: those of the checkpoint it replaced and
    of saves interrupted before their checkpoint was written. The folder goes once it is empty.
    Only names this package writes are considered."""
    folder = window_shard_folder(path)
    if not os.path.isdir(folder):
        return
    kept = {os.path.basename(f) for f in window_files(state)} if state is not None else set()
    for entry in os.scandir(folder):
        if _is_window_file(entry.name) and entry.name not in kept:
            os.remove(entry.path)
    if not any(os.scandir(folder)):
        os.rmdir(folder)
