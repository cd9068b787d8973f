"""A sharded window across 2 gloo CPU processes: every step equals the single-process window; its
state_dict is this rank's columns (no file, no collective); a checkpoint is one file per rank beside
it holding only that rank's columns plus a manifest (no rank sends or receives another rank's
columns), and resuming from it -- also into a different storage, or after a move -- continues
exactly."""

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D, M, DAMP = 23, 4, 1e-2  # d odd: the shards differ in width


def _grads(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=gen, dtype=torch.float64)
    return torch.stack([base + 0.5 * torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(n)])


class CollectiveCounter:
    """Records the ``torch.distributed`` collectives called (by name) while active."""

    NAMES = ("all_gather", "gather", "all_gather_into_tensor", "broadcast_object_list", "barrier", "all_reduce")

    def __enter__(self):
        self.calls: list[str] = []
        self._saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _save_with_a_full_disk_on_rank_1(sharded, rank: int, path: str) -> str | None:
    """Save while rank 1 cannot write more than 64 bytes (a real EFBIG from the kernel): both ranks
    must fail with DiskFullError, none may wait forever for the other."""
    import resource
    import signal

    from lightning_mfac._files import DiskFullError
    from lightning_mfac.fisher.storage import write_window_shards

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        write_window_shards(sharded.state_dict(), path)
        return None
    except DiskFullError as err:
        return err.strerror
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from lightning_mfac.fisher import DynamicFisherInverse, WindowConfig
        from lightning_mfac.fisher.storage import write_window_shards

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        grads = _grads(3 * M + 3)
        config = WindowConfig(dtype=torch.float64, storage="sharded")
        sharded = DynamicFisherInverse(D, M, DAMP, window=config)
        single = DynamicFisherInverse(D, M, DAMP, window=WindowConfig(dtype=torch.float64, storage="device"))
        assert sharded.storage == "ShardedWindow"
        errs = []
        for g in grads[: 2 * M + 1]:
            errs.append(float((sharded.update_mul(g) - single.update_mul(g)).abs().max()))
        with CollectiveCounter() as collectives:
            local = sharded.state_dict()
            state_dict_calls = list(collectives.calls)
            state = write_window_shards(local, out + ".ckpt")
        assert local["window"]["format"] == "mfac-window-local-shard/1"  # the caller's state is kept
        manifest = state["window"]
        assert manifest["format"] == "mfac-window-sharded/1" and "blocks" not in manifest
        assert manifest["directory"] == out + ".ckpt.mfac-window"
        lo, hi = sharded.window.local_bounds()
        assert manifest["files"][rank][:2] == (lo, hi)
        mine = torch.load(os.path.join(manifest["directory"], manifest["files"][rank][2]), weights_only=True)
        covered = sorted((c0, c1) for c0, c1, _ in mine["blocks"])
        if rank == 0:
            torch.save(state, out + ".ckpt")
            torch.save(local, out + ".rank0-only.ckpt")
        dist.barrier()
        loaded = torch.load(out + ".ckpt", weights_only=True)
        resumed = DynamicFisherInverse(D, M, DAMP, window=config)
        resumed.load_state_dict(loaded)
        # One rank's own state restores that rank (and only it): a checkpoint holding rank 0's
        # state alone fails on every rank, in one line on the rank whose columns are missing.
        own = DynamicFisherInverse(D, M, DAMP, window=config)
        own.load_state_dict(local)
        try:
            DynamicFisherInverse(D, M, DAMP, window=config).load_state_dict(
                torch.load(out + ".rank0-only.ckpt", weights_only=True))
            partial = None
        except (ValueError, RuntimeError) as err:
            partial = f"{type(err).__name__}: {err}"
        for g in grads[2 * M + 1 :]:
            a, b = resumed.update_mul(g), single.update_mul(g)
            errs.append(float((a - b).abs().max()))
            assert torch.equal(a, sharded.update_mul(g))  # resume is exact
            assert torch.equal(a, own.update_mul(g))
        full = _save_with_a_full_disk_on_rank_1(sharded, rank, out + ".full.ckpt")
        torch.save(
            {"errs": errs, "covered": covered, "local": (lo, hi), "collectives": collectives.calls[len(state_dict_calls):],
             "state_dict_calls": state_dict_calls, "full": full, "partial": partial,
             "left": sorted(os.listdir(out + ".full.ckpt.mfac-window"))},
            f"{out}.{rank}",
        )
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - reported through the file
        torch.save({"error": traceback.format_exc()}, f"{out}.{rank}")


def test_sharded_window_steps_checkpoint_and_resume(tmp_path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res.get('error')}"
        assert max(res["errs"]) < 1e-10
    # Each rank's file holds exactly its own columns, and saving moved no window data between ranks:
    # state_dict() is local, then rank 0 broadcasts the save's name and one all-reduce of a flag says
    # every rank wrote its file.
    for res in results:
        lo, hi = res["local"]
        assert res["covered"][0][0] == lo and res["covered"][-1][1] == hi
        assert all(lo <= c0 < c1 <= hi for c0, c1 in res["covered"])
        assert res["state_dict_calls"] == []
        assert res["collectives"] == ["broadcast_object_list", "all_reduce"]
    # A full disk on one rank fails the save on every rank, in one clear line, without a partial file.
    assert results[1]["full"].startswith("file size limit reached writing ") and "rank00001" in results[1]["full"]
    assert results[0]["full"].startswith("no space left on device: another rank could not write")
    assert not any(name.startswith(".") for name in results[1]["left"])
    assert results[0]["local"][1] == results[1]["local"][0] and results[1]["local"][1] == D
    split = results[0]["local"][1]
    assert results[1]["partial"].startswith(
        f"ValueError: this window state holds only columns [0, {split}) of a window sharded over 2 ranks "
        f"(rank 0's state_dict), but columns [{split}, {D}) are needed here: checkpoint sharded windows "
        "with write_window_shards(state, path) on every rank")
    assert results[0]["partial"].startswith("RuntimeError: sharded window: another rank could not restore")
    # The checkpoint also restores into a single-process window (reading both files); moved with its
    # folder it is found from its new path, and files moved elsewhere from the folder the config names.
    from lightning_mfac.fisher import DynamicFisherInverse, WindowConfig
    from lightning_mfac.fisher.storage import locate_window_shards

    state = torch.load(out + ".ckpt", weights_only=True)
    ref = DynamicFisherInverse(D, M, DAMP, window=WindowConfig(dtype=torch.float64))
    for g in _grads(3 * M + 3)[: 2 * M + 1]:
        ref.update_mul(g)
    single = DynamicFisherInverse(
        D, M, DAMP, window=WindowConfig(dtype=torch.float64, storage="paged", page_cols=5)
    )
    single.load_state_dict(state)
    torch.testing.assert_close(single.window.to_dense(), ref.window.to_dense(), rtol=0, atol=0)
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(out + ".ckpt", moved / "last.ckpt")
    os.rename(out + ".ckpt.mfac-window", moved / "last.ckpt.mfac-window")
    state = torch.load(moved / "last.ckpt", weights_only=True)
    with pytest.raises(FileNotFoundError, match=r"rank00000-of-00002.pt.*copy the shard directory.*shard_dir"):
        single.load_state_dict(state)
    single.load_state_dict(locate_window_shards(state, moved / "last.ckpt"))
    torch.testing.assert_close(single.window.to_dense(), ref.window.to_dense(), rtol=0, atol=0)
    elsewhere = tmp_path / "elsewhere"
    os.rename(moved / "last.ckpt.mfac-window", elsewhere)
    state = torch.load(moved / "last.ckpt", weights_only=True)
    relocated = DynamicFisherInverse(D, M, DAMP, window=WindowConfig(dtype=torch.float64, shard_dir=elsewhere))
    relocated.load_state_dict(state)
    torch.testing.assert_close(relocated.window.to_dense(), ref.window.to_dense(), rtol=0, atol=0)
