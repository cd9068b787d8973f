"""Nothing lost, nobody in: user files are never unpickled as code, and every file the package
writes appears whole or not at all -- also when the process is killed mid-write or the disk is full."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lit_models import TinyClassifier, quiet_trainer

from lightning_mfac import MFACPreconditioner
from lightning_mfac._files import DiskFullError, atomic_save, atomic_write, atomic_write_text, plain_file_name
from lightning_mfac.callbacks.checkpoint_io import CrashSafeCheckpointIO

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_checkpoint(path: Path, marker: Path, state_dict: dict | None = None) -> Path:
    torch.save({"state_dict": state_dict or {}, "callbacks": {"x": _Payload(marker)}}, path)
    assert not marker.exists()
    return path


def test_a_hostile_checkpoint_never_runs_in_the_library(tmp_path):
    marker = tmp_path / "pwned"
    path = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        CrashSafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    # The same through a Trainer that resumes with the package's CheckpointIO installed.
    trainer = quiet_trainer(default_root_dir=str(tmp_path), max_epochs=1, callbacks=[MFACPreconditioner(ngrads=2)])
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        trainer.fit(TinyClassifier(), ckpt_path=str(path))
    assert not marker.exists()


def test_a_hostile_checkpoint_never_runs_in_mfac_train(tmp_path):
    marker = tmp_path / "pwned"
    path = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_mfac.app", "logger=none", f"ckpt_path={path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mfac-train: error:")]
    assert len(errors) == 1 and "is not a readable checkpoint" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="mid-write"), atomic_write(path) as fh:
        fh.write(b"the first half of a new checkpoint")
        raise RuntimeError("mid-write")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_the_temporary_file_is_written_in_the_destination_folder(tmp_path, monkeypatch):
    # A rename within one folder never crosses file systems, so it is never a copy over the old file.
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((a, b)), real(a, b))[1])
    atomic_write_text(tmp_path / "summary.json", "{}")
    CrashSafeCheckpointIO().save_checkpoint({"w": torch.zeros(1)}, tmp_path / "ck" / "last.ckpt")
    assert [os.path.dirname(a) == os.path.dirname(b) for a, b in moves] == [True, True]
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_plain_file_names_only():
    assert plain_file_name("window-1-rank00000-of-00002.pt", "manifest") == "window-1-rank00000-of-00002.pt"
    for bad in ("../x.pt", "/etc/passwd", "a/b.pt", "..", ".", "", "x\0y", 3, None):
        with pytest.raises(ValueError, match="not a plain file name"):
            plain_file_name(bad, "manifest")


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from lightning_mfac.callbacks.checkpoint_io import CrashSafeCheckpointIO
    io, path = CrashSafeCheckpointIO(), sys.argv[1]
    big = torch.zeros(8 << 20)  # 32 MB: each save takes long enough to be killed inside it
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        big[0] = i
        io.save_checkpoint({"step": i, "w": big}, path)
    """
)


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    CrashSafeCheckpointIO().save_checkpoint({"step": 0, "w": torch.zeros(8 << 20)}, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        state = torch.load(path, weights_only=True)  # never truncated
        assert state["w"].shape == (8 << 20,) and float(state["w"][0]) == state["step"]
    # Only the checkpoint itself, and perhaps the temporary file of the killed write (hidden, never
    # under a checkpoint's name).
    assert [n for n in os.listdir(path.parent) if not n.startswith(".")] == ["last.ckpt"]


_FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from lightning_mfac._files import DiskFullError
    from lightning_mfac.callbacks.checkpoint_io import CrashSafeCheckpointIO
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        CrashSafeCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 20)}, sys.argv[1])
    except DiskFullError as err:
        print("DiskFullError:", err.strerror)
    """
)


def test_a_write_past_the_file_size_limit_is_one_clear_error_and_no_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(4)}, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"DiskFullError: file size limit reached writing {path}" in proc.stdout
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["last.ckpt"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root and mount rights: skipped where there are none)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and mount rights")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_clear_error_and_the_old_checkpoint_survives(small_tmpfs):
    path = small_tmpfs / "last.ckpt"
    io = CrashSafeCheckpointIO()
    io.save_checkpoint({"w": torch.ones(1000)}, path)
    with pytest.raises(DiskFullError, match=rf"no space left on device writing {path} \(file system {small_tmpfs}, "
                                            r"[0-9.]+ MiB free\)"):
        io.save_checkpoint({"w": torch.zeros(1 << 20)}, path)  # 4 MB on a 2 MiB disk
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(1000))
    assert os.listdir(small_tmpfs) == ["last.ckpt"]


def test_a_full_disk_in_mfac_train_is_one_line_naming_the_disk(small_tmpfs, tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    run = small_tmpfs / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_mfac.app", "logger=none", "optimizer=sgd", "pruning=none",
         "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "model.width=256",
         f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mfac-train: error:")]
    assert len(errors) == 1 and "no space left on device writing" in errors[0] and str(small_tmpfs) in errors[0], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # No file under a checkpoint's name that is not a whole checkpoint.
    for ckpt in run.rglob("*.ckpt"):
        torch.load(ckpt, weights_only=True)
