"""Window files of sharded M-FAC windows are deleted with the last checkpoint that refers to them
(WindowShardCheckpointIO), never before."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lit_models import quiet_trainer

from lightning_mfac.callbacks.window_shards import (
    SIDECAR_SUFFIX,
    WindowShardCheckpointIO,
    use_window_shard_checkpoint_io,
    window_files,
)
from lightning_mfac.fisher.storage import SHARDED_CHECKPOINT_FORMAT


def _tag(label: str) -> str:
    """A save's name as ShardedWindow.state_dict() makes it (``label`` tells the saves apart)."""
    return f"window-20261205-120000-{label.encode().hex():0<12}"


def _window_set(directory, label: str) -> dict:
    """A manifest as ShardedWindow.state_dict() returns it, with its two rank files written."""
    tag = _tag(label)
    files = [(0, 5, f"{tag}-rank00000-of-00002.pt"), (5, 9, f"{tag}-rank00001-of-00002.pt")]
    for _, _, name in files:
        torch.save({"blocks": []}, os.path.join(directory, name))
    return {"format": SHARDED_CHECKPOINT_FORMAT, "rows": 2, "dim": 9, "dtype": "torch.float32",
            "directory": str(directory), "files": files}


def _checkpoint(manifest: dict | None) -> dict:
    # Where the callback and the MFAC optimizer put their window state: nested in the checkpoint.
    state = {"state_dict": {"w": torch.zeros(2)}, "callbacks": {}}
    if manifest is not None:
        state["callbacks"]["MFACPreconditioner{}"] = {"preconditioners": {0: {"fisher": {"window": manifest}}}}
    return state


def test_window_files_are_deleted_with_the_last_checkpoint_that_uses_them(tmp_path):
    shards, ckpts = tmp_path / "mfac-window-shards", tmp_path / "checkpoints"
    shards.mkdir()
    io = WindowShardCheckpointIO()
    # Each save writes its files just before its checkpoint (as ShardedWindow.state_dict() does
    # inside Trainer.save_checkpoint): files no checkpoint names yet are orphans.
    a = _window_set(shards, "a")
    files = {"a": sorted(window_files(a))}
    assert files["a"] == [str(shards / f"{_tag('a')}-rank00000-of-00002.pt"),
                          str(shards / f"{_tag('a')}-rank00001-of-00002.pt")]

    io.save_checkpoint(_checkpoint(a), ckpts / "last.ckpt")
    b = _window_set(shards, "b")
    files["b"] = sorted(window_files(b))
    io.save_checkpoint(_checkpoint(b), ckpts / "best.ckpt")
    sidecar = json.loads((ckpts / ("last.ckpt" + SIDECAR_SUFFIX)).read_text())
    assert sidecar == {"checkpoint": "last.ckpt", "files": files["a"]}
    # last.ckpt rewritten (next epoch): the files only the old last.ckpt named go.
    c = _window_set(shards, "c")
    files["c"] = sorted(window_files(c))
    io.save_checkpoint(_checkpoint(c), ckpts / "last.ckpt")
    assert not any(os.path.exists(f) for f in files["a"])
    assert all(os.path.exists(f) for f in files["b"] + files["c"])
    # ModelCheckpoint removing an old best: its files go with it, the others stay.
    io.remove_checkpoint(ckpts / "best.ckpt")
    assert not (ckpts / "best.ckpt").exists() and not (ckpts / ("best.ckpt" + SIDECAR_SUFFIX)).exists()
    assert not any(os.path.exists(f) for f in files["b"]) and all(os.path.exists(f) for f in files["c"])
    # A checkpoint without a sharded window (e.g. a later single-process run) writes no sidecar and
    # releases what the overwritten one named.
    io.save_checkpoint(_checkpoint(None), ckpts / "last.ckpt")
    assert not (ckpts / ("last.ckpt" + SIDECAR_SUFFIX)).exists()
    assert not any(os.path.exists(f) for f in files["c"])
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]["w"].shape == (2,)


def test_a_file_two_checkpoints_name_stays_until_both_are_gone(tmp_path):
    io = WindowShardCheckpointIO()
    shared = _window_set(tmp_path, "s")  # e.g. a copied checkpoint
    io.save_checkpoint(_checkpoint(shared), tmp_path / "one.ckpt")
    io.save_checkpoint(_checkpoint(shared), tmp_path / "two.ckpt")
    io.remove_checkpoint(tmp_path / "one.ckpt")
    assert all(os.path.exists(f) for f in window_files(shared))
    io.remove_checkpoint(tmp_path / "two.ckpt")
    assert not any(os.path.exists(f) for f in window_files(shared))


def test_installed_in_place_of_lightnings_default_only(tmp_path):
    trainer = quiet_trainer(default_root_dir=str(tmp_path))
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    use_window_shard_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is WindowShardCheckpointIO

    class Custom(TorchCheckpointIO):
        pass

    trainer = quiet_trainer(default_root_dir=str(tmp_path), plugins=[Custom()])
    use_window_shard_checkpoint_io(trainer)  # the user's own CheckpointIO stays
    assert type(trainer.strategy.checkpoint_io) is Custom


def test_orphans_of_an_interrupted_save_go_at_the_next_save(tmp_path):
    shards, ckpts = tmp_path / "shards", tmp_path / "checkpoints"
    shards.mkdir()
    io = WindowShardCheckpointIO()
    io.save_checkpoint(_checkpoint(_window_set(shards, "a")), ckpts / "last.ckpt")
    # A save killed after the ranks wrote their files, before the checkpoint was written; and one
    # killed while a rank was still writing (the temporary file of an atomic write).
    orphans = sorted(window_files(_window_set(shards, "b")))
    partial = shards / f".{_tag('c')}-rank00001-of-00002.pt.partial-0123456789ab"
    partial.write_bytes(b"half a shard")
    unrelated = shards / "notes.txt"  # not a name this package writes: never touched
    unrelated.write_text("keep")
    io.save_checkpoint(_checkpoint(_window_set(shards, "d")), ckpts / "last.ckpt")
    left = sorted(p.name for p in shards.iterdir() if not p.name.startswith(".mfac"))
    assert left == sorted([*(os.path.basename(f) for f in window_files(_window_set(shards, "d"))), "notes.txt"])
    assert not any(os.path.exists(f) for f in orphans) and not partial.exists()


def test_checkpoints_of_another_folder_keep_their_files(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    io = WindowShardCheckpointIO()
    best = _window_set(shards, "best")
    io.save_checkpoint(_checkpoint(best), tmp_path / "best" / "best.ckpt")  # a second ModelCheckpoint
    first_last = _window_set(shards, "l1")
    io.save_checkpoint(_checkpoint(first_last), tmp_path / "last" / "last.ckpt")
    io.save_checkpoint(_checkpoint(_window_set(shards, "l2")), tmp_path / "last" / "last.ckpt")
    assert all(os.path.exists(f) for f in window_files(best))  # named only in the other folder
    assert not any(os.path.exists(f) for f in window_files(first_last))


def test_a_crafted_sidecar_or_manifest_cannot_reach_outside_the_shard_folder(tmp_path):
    shards, ckpts = tmp_path / "shards", tmp_path / "checkpoints"
    shards.mkdir()
    ckpts.mkdir()
    victim = tmp_path / "precious.pt"
    victim.write_bytes(b"data")
    io = WindowShardCheckpointIO()
    (ckpts / ("last.ckpt" + SIDECAR_SUFFIX)).write_text(json.dumps({"files": [str(victim)]}))
    io.save_checkpoint(_checkpoint(_window_set(shards, "a")), ckpts / "last.ckpt")  # overwrites "last.ckpt"
    io.remove_checkpoint(ckpts / "last.ckpt")
    assert victim.exists()
    evil = _window_set(shards, "b")
    evil["files"][0] = (0, 5, "../precious.pt")
    with pytest.raises(ValueError, match=r"'../precious.pt' is not a plain file name"):
        list(window_files(evil))
