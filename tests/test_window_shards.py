"""Window files of sharded M-FAC windows are deleted with the last checkpoint that refers to them
(WindowShardCheckpointIO), never before."""

from __future__ import annotations

import json
import os

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


def _window_set(directory, tag: str) -> dict:
    """A manifest as ShardedWindow.state_dict() returns it, with its two rank files written."""
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
    a, b, c = (_window_set(shards, tag) for tag in ("a", "b", "c"))
    files = {k: sorted(window_files(m)) for k, m in zip("abc", (a, b, c), strict=True)}
    assert files["a"] == [str(shards / "a-rank00000-of-00002.pt"), str(shards / "a-rank00001-of-00002.pt")]

    io.save_checkpoint(_checkpoint(a), ckpts / "last.ckpt")
    io.save_checkpoint(_checkpoint(b), ckpts / "best.ckpt")
    sidecar = json.loads((ckpts / ("last.ckpt" + SIDECAR_SUFFIX)).read_text())
    assert sidecar == {"checkpoint": "last.ckpt", "files": files["a"]}
    # last.ckpt rewritten (next epoch): the files only the old last.ckpt named go.
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


def test_installed_only_for_multi_process_trainers(tmp_path):
    trainer = quiet_trainer(default_root_dir=str(tmp_path))
    use_window_shard_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
