"""A window split over the ranks of a ``torch.distributed`` group, coordinate-wise; its state is
this rank's columns (the files of a whole checkpoint: :mod:`.shard_files`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac.fisher.storage.base import LOCAL_SHARD_FORMAT, WindowStorage


class ShardedWindow(WindowStorage):
    """Each rank stores coordinates ``[lo, hi)`` of a contiguous 1/world split of ``d`` in ``local``."""

    def __init__(self, local: WindowStorage, dim: int, lo: int, hi: int, group=None) -> None:
        self.local, self.dim, self.lo, self.hi, self.group = local, dim, lo, hi, group
        self.rows, self.dtype, self.device, self.kernels = (
            local.rows,
            local.dtype,
            local.device,
            local.kernels,
        )
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shard = math.ceil(dim / self.world)

    @staticmethod
    def bounds(dim: int, rank: int, world: int) -> tuple[int, int]:
        shard = math.ceil(dim / world)
        lo = min(dim, rank * shard)
        return lo, min(dim, lo + shard)

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def local_bounds(self):
        return self.lo, self.hi

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        padded = part.new_zeros((self.shard,) + tuple(part.shape[1:]))
        padded[: part.shape[0]] = part
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat(gathered)[: self.dim]

    def dots(self, x):
        out = self.local.dots(x[self.lo : self.hi])
        dist.all_reduce(out, group=self.group)
        return out

    def combine(self, coeffs, out_dtype=None):
        return self._gather(self.local.combine(coeffs, out_dtype))

    def gram(self):
        out = self.local.gram()
        dist.all_reduce(out, group=self.group)
        return out

    def stage(self, g):
        self.local.stage(g[self.lo : self.hi])

    def staged_dots(self, out):
        part = torch.zeros_like(out)
        self.local.staged_dots(part)
        dist.all_reduce(part, group=self.group)
        out.add_(part)

    def staged_combine(self, coeffs, out_dtype=None):
        return self._gather(self.local.staged_combine(coeffs, out_dtype))

    def commit(self, target):
        self.local.commit(target)

    def column_tiles(self):
        raise NotImplementedError("a sharded window holds a slice of the columns: iterate its local storage")

    def columns(self, idx):
        idx = idx.to(self.device)
        out = torch.zeros(self.rows, idx.numel(), dtype=torch.float64, device=self.device)
        mine = (idx >= self.lo) & (idx < self.hi)
        local = self.local.columns((idx - self.lo).clamp(0, max(0, self.hi - self.lo - 1)))
        out += local * mine.to(torch.float64)
        dist.all_reduce(out, group=self.group)
        return out

    def read_columns(self, c0, c1):
        a, b = max(c0, self.lo), min(c1, self.hi)
        if a >= b:
            return torch.empty(self.rows, 0, dtype=self.dtype)
        return self.local.read_columns(a - self.lo, b - self.lo)

    def write_columns(self, c0, c1, block):
        a, b = max(c0, self.lo), min(c1, self.hi)
        if a < b:
            self.local.write_columns(a - self.lo, b - self.lo, block[:, a - c0 : b - c0])

    def mask_columns(self, keep):
        self.local.mask_columns(keep[self.lo : self.hi])

    def zero_(self):
        self.local.zero_()

    def state_dict(self) -> dict[str, Any]:
        """This rank's columns, in ``LOCAL_SHARD_FORMAT``: no file is written and no other rank is
        involved. A checkpoint of the whole window writes every rank's columns beside the checkpoint
        with :func:`~lightning_mfac.fisher.storage.shard_files.write_window_shards` (Lightning:
        ``lightning_mfac.callbacks.window_shards`` does it), or keeps one state per rank."""
        members = [(dist.get_global_rank(self.group, r) if self.group is not None else r,
                    self.bounds(self.dim, r, self.world)) for r in range(self.world)]  # fmt: skip
        return {**WindowStorage.state_dict(self), "format": LOCAL_SHARD_FORMAT, "lo": self.lo, "hi": self.hi,
                "rank": self.rank, "world": self.world, "members": members}

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor, shard_dir: str | None = None) -> None:
        """As :meth:`WindowStorage.load_state_dict`; collective: when any rank cannot restore its
        columns, every rank raises (none goes on to train and waits forever for the others)."""
        failure: Exception | None = None
        try:
            WindowStorage.load_state_dict(self, state, shard_dir)
        except (OSError, ValueError, KeyError, TypeError) as err:
            failure = err
        failed = torch.tensor([failure is not None], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if failure is not None:
            raise failure
        if int(failed.item()):
            raise RuntimeError("sharded window: another rank could not restore its columns from the checkpoint "
                               "(its error says why); this rank's columns were not restored either.")

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    def to_dense(self) -> torch.Tensor:
        # Collective: the full window on every rank, for tests only.
        return torch.stack(
            [
                self._gather(self.local.read_columns(0, self.hi - self.lo)[j].to(self.device)).cpu()
                for j in range(self.rows)
            ]
        )

