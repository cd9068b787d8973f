"""The files of sharded M-FAC windows live in ``<checkpoint>.mfac-window/`` exactly as long as their
checkpoint (WindowShardCheckpointIO), and are found from the checkpoint's path when it is loaded."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lit_models import quiet_trainer

from lightning_mfac.callbacks.window_shards import WindowShardCheckpointIO, use_window_shard_checkpoint_io
from lightning_mfac.fisher.storage import (
    SHARDED_CHECKPOINT_FORMAT,
    WINDOW_FILE_NAME,
    window_files,
    window_shard_folder,
)


def _written(ckpt, label: str) -> dict:
    """The manifest write_window_shards() puts in a checkpoint for ``ckpt``, with its two rank files
    written into the checkpoint's folder (``label`` tells the saves apart)."""
    folder = window_shard_folder(ckpt)
    os.makedirs(folder, exist_ok=True)
    tag = f"{label.encode().hex():0<12}"
    files = [(0, 5, f"window-{tag}-000-rank00000-of-00002.pt"), (5, 9, f"window-{tag}-000-rank00001-of-00002.pt")]
    for _, _, name in files:
        assert WINDOW_FILE_NAME.fullmatch(name)
        torch.save({"blocks": []}, os.path.join(folder, name))
    return {"format": SHARDED_CHECKPOINT_FORMAT, "rows": 2, "dim": 9, "dtype": "torch.float32",
            "directory": folder, "files": files}


def _checkpoint(manifest: dict | None) -> dict:
    # Where the callback and the MFAC optimizer put their window state: nested in the checkpoint.
    state = {"state_dict": {"w": torch.zeros(2)}, "callbacks": {}}
    if manifest is not None:
        state["callbacks"]["MFACPreconditioner{}"] = {"preconditioners": {0: {"fisher": {"window": manifest}}}}
    return state


def test_window_files_go_with_the_checkpoint_that_uses_them(tmp_path):
    ckpts = tmp_path / "checkpoints"
    io = WindowShardCheckpointIO()
    a = _written(ckpts / "last.ckpt", "a")
    assert sorted(window_files(a)) == [str(ckpts / "last.ckpt.mfac-window" / name) for _, _, name in a["files"]]
    io.save_checkpoint(_checkpoint(a), ckpts / "last.ckpt")
    b = _written(ckpts / "best.ckpt", "b")
    io.save_checkpoint(_checkpoint(b), ckpts / "best.ckpt")
    assert all(os.path.exists(f) for f in [*window_files(a), *window_files(b)])
    # last.ckpt rewritten (next epoch): the files only the old last.ckpt named go.
    c = _written(ckpts / "last.ckpt", "c")
    io.save_checkpoint(_checkpoint(c), ckpts / "last.ckpt")
    assert not any(os.path.exists(f) for f in window_files(a))
    assert all(os.path.exists(f) for f in [*window_files(b), *window_files(c)])
    # ModelCheckpoint removing an old best: its folder goes with it, the others stay.
    io.remove_checkpoint(ckpts / "best.ckpt")
    assert not (ckpts / "best.ckpt").exists() and not (ckpts / "best.ckpt.mfac-window").exists()
    assert all(os.path.exists(f) for f in window_files(c))
    # A checkpoint without a sharded window (e.g. a later single-process run) releases the folder.
    io.save_checkpoint(_checkpoint(None), ckpts / "last.ckpt")
    assert not (ckpts / "last.ckpt.mfac-window").exists()
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]["w"].shape == (2,)


def test_orphans_of_an_interrupted_save_go_at_the_next_save(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    io = WindowShardCheckpointIO()
    io.save_checkpoint(_checkpoint(_written(ckpt, "a")), ckpt)
    # A save killed after the ranks wrote their files, before the checkpoint was written; and one
    # killed while a rank was still writing (the temporary file of an atomic write).
    orphans = sorted(window_files(_written(ckpt, "b")))
    folder = tmp_path / "last.ckpt.mfac-window"
    partial = folder / f".window-{b'c'.hex():0<12}-000-rank00001-of-00002.pt.partial-0123456789ab"
    partial.write_bytes(b"half a shard")
    unrelated = folder / "notes.txt"  # not a name this package writes: never touched
    unrelated.write_text("keep")
    d = _written(ckpt, "d")
    io.save_checkpoint(_checkpoint(d), ckpt)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(name for _, _, name in d["files"]), "notes.txt"])
    assert not any(os.path.exists(f) for f in orphans) and not partial.exists()
    io.remove_checkpoint(ckpt)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # the folder stays for the user's file


def test_a_load_finds_the_files_beside_a_moved_or_linked_checkpoint(tmp_path):
    io = WindowShardCheckpointIO()
    first = tmp_path / "run" / "epoch=0.ckpt"
    io.save_checkpoint(_checkpoint(_written(first, "a")), first)
    moved = tmp_path / "moved"
    os.rename(tmp_path / "run", moved)
    loaded = io.load_checkpoint(moved / "epoch=0.ckpt")
    files = list(window_files(loaded))
    assert files and all(f.startswith(str(moved / "epoch=0.ckpt.mfac-window") + os.sep) for f in files)
    assert all(os.path.exists(f) for f in files)
    # ModelCheckpoint(save_last="link"): last.ckpt is a link to the file whose folder holds the shards.
    os.symlink(moved / "epoch=0.ckpt", moved / "last.ckpt")
    assert sorted(window_files(io.load_checkpoint(moved / "last.ckpt"))) == sorted(files)
    # Files found nowhere: the manifest keeps the folder they were written to (the error names it).
    gone = tmp_path / "gone"
    os.rename(moved / "epoch=0.ckpt.mfac-window", gone)
    assert all(f.startswith(str(tmp_path / "run")) for f in window_files(io.load_checkpoint(moved / "epoch=0.ckpt")))


def test_installed_in_place_of_lightnings_default_only(tmp_path):
    trainer = quiet_trainer(default_root_dir=str(tmp_path))
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    use_window_shard_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is WindowShardCheckpointIO
    wrapped = trainer.strategy.save_checkpoint
    assert wrapped.writes_window_shards
    use_window_shard_checkpoint_io(trainer)  # twice (callback and app): wrapped once
    assert trainer.strategy.save_checkpoint is wrapped

    class Custom(TorchCheckpointIO):
        pass

    trainer = quiet_trainer(default_root_dir=str(tmp_path), plugins=[Custom()])
    use_window_shard_checkpoint_io(trainer)  # the user's own CheckpointIO stays; every rank still writes
    assert type(trainer.strategy.checkpoint_io) is Custom
    assert trainer.strategy.save_checkpoint.writes_window_shards


def test_a_crafted_manifest_cannot_reach_outside_the_shard_folder(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    victim = tmp_path / "precious.pt"
    victim.write_bytes(b"data")
    io = WindowShardCheckpointIO()
    evil = _written(ckpt, "a")
    evil["files"][0] = (0, 5, "../precious.pt")
    with pytest.raises(ValueError, match=r"'../precious.pt' is not a plain file name"):
        list(window_files(evil))
    with pytest.raises(ValueError, match=r"'../precious.pt' is not a plain file name"):
        io.save_checkpoint(_checkpoint(evil), ckpt)
    evil["directory"] = str(tmp_path)
    evil["files"] = [(0, 5, "precious.pt")]  # a plain name, but not one this package writes
    io.save_checkpoint(_checkpoint(evil), ckpt)
    io.remove_checkpoint(ckpt)
    assert victim.exists()
