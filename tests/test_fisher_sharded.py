"""A sharded window across 2 gloo CPU processes: every step equals the single-process window, the
checkpoint holds column blocks (rank 0 receives the other shard by ``gather``, rank 1 keeps only its
own), and resuming from it -- also into a different storage -- continues exactly."""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D, M, DAMP = 23, 4, 1e-2  # d odd: the shards differ in width


def _grads(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=gen, dtype=torch.float64)
    return torch.stack([base + 0.5 * torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(n)])


def _worker(rank: int, world: int, init: str, out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from lightning_mfac.fisher import DynamicFisherInverse, WindowConfig

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        grads = _grads(3 * M + 3)
        sharded = DynamicFisherInverse(
            D, M, DAMP, window=WindowConfig(dtype=torch.float64, storage="sharded")
        )
        single = DynamicFisherInverse(D, M, DAMP, window=WindowConfig(dtype=torch.float64, storage="device"))
        assert sharded.storage == "ShardedWindow"
        errs = []
        for g in grads[: 2 * M + 1]:
            errs.append(float((sharded.update_mul(g) - single.update_mul(g)).abs().max()))
        state = sharded.state_dict()
        blocks = state["window"]["blocks"]
        covered = sorted((c0, c1) for c0, c1, _ in blocks)
        lo, hi = sharded.window.local_bounds()
        if rank == 0:
            torch.save(state, out + ".ckpt")
        dist.barrier()
        loaded = torch.load(out + ".ckpt", weights_only=False)
        resumed = DynamicFisherInverse(
            D, M, DAMP, window=WindowConfig(dtype=torch.float64, storage="sharded")
        )
        resumed.load_state_dict(loaded)
        for g in grads[2 * M + 1 :]:
            a, b = resumed.update_mul(g), single.update_mul(g)
            errs.append(float((a - b).abs().max()))
            assert torch.equal(a, sharded.update_mul(g))  # resume is exact
        torch.save({"errs": errs, "covered": covered, "local": (lo, hi)}, f"{out}.{rank}")
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
    # Rank 0's checkpoint covers all columns (both shards), rank 1's only its own.
    assert results[0]["covered"][0][0] == 0 and results[0]["covered"][-1][1] == D
    lo, hi = results[1]["local"]
    assert all(lo <= c0 < c1 <= hi for c0, c1 in results[1]["covered"])
    # The checkpoint also restores into a single-process window.
    from lightning_mfac.fisher import DynamicFisherInverse, WindowConfig

    state = torch.load(out + ".ckpt", weights_only=False)
    single = DynamicFisherInverse(
        D, M, DAMP, window=WindowConfig(dtype=torch.float64, storage="paged", page_cols=5)
    )
    single.load_state_dict(state)
    ref = DynamicFisherInverse(D, M, DAMP, window=WindowConfig(dtype=torch.float64))
    for g in _grads(3 * M + 3)[: 2 * M + 1]:
        ref.update_mul(g)
    torch.testing.assert_close(single.window.to_dense(), ref.window.to_dense(), rtol=0, atol=0)
