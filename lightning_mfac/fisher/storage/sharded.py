"""A window split over the ranks of a ``torch.distributed`` group, coordinate-wise, and its
checkpoint of one file per rank."""

from __future__ import annotations

import errno
import math
import os
import re
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac._files import DiskFullError, atomic_save
from lightning_mfac.fisher.storage.base import SHARD_FILE_FORMAT, SHARDED_CHECKPOINT_FORMAT, WindowStorage

#: The name of a per-rank window file (see ``ShardedWindow.state_dict``).
WINDOW_FILE_NAME = re.compile(r"window-\d{8}-\d{6}-[0-9a-f]{12}-rank\d{5}-of-\d{5}\.pt")
#: Where a sharded window writes its per-rank files when its config names no ``shard_dir``.
DEFAULT_SHARD_DIR = "mfac-window-shards"


class ShardedWindow(WindowStorage):
    """Each rank stores coordinates ``[lo, hi)`` of a contiguous 1/world split of ``d`` in ``local``."""

    def __init__(
        self, local: WindowStorage, dim: int, lo: int, hi: int, group=None, shard_dir: str | None = None
    ) -> None:
        self.local, self.dim, self.lo, self.hi, self.group = local, dim, lo, hi, group
        self.shard_dir = shard_dir
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
        """Write this rank's column blocks to its own file and return the manifest of all ranks'
        files (docs/design.md, "Checkpoint layout"). Collective: rank 0 names the save (so a new
        checkpoint never overwrites the files an older one refers to) and every rank has written its
        file when any rank returns. No rank holds, sends or receives another rank's columns."""
        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        named = [None]
        if self.rank == 0:
            directory = os.path.abspath(self.shard_dir or DEFAULT_SHARD_DIR)
            named = [(directory, f"window-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}")]
        dist.broadcast_object_list(named, src=root, group=self.group)
        directory, tag = named[0]
        files = [(*self.bounds(self.dim, r, self.world), f"{tag}-rank{r:05d}-of-{self.world:05d}.pt")
                 for r in range(self.world)]  # fmt: skip
        mine = WindowStorage.state_dict(self)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, files[self.rank][2])
        # A crash or a full disk mid-write leaves no truncated file under the name a checkpoint
        # refers to (lightning_mfac._files).
        failure: OSError | None = None
        try:
            atomic_save({**mine, "format": SHARD_FILE_FORMAT, "lo": self.lo, "hi": self.hi}, path)
        except OSError as err:
            failure = err
        # In place of a barrier: every rank learns whether all files were written, so a rank whose
        # disk is full fails the save everywhere instead of leaving the others waiting forever.
        failed = torch.tensor([0 if failure is None else 1 + isinstance(failure, DiskFullError)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if failure is not None:
            raise failure
        if int(failed.item()) == 2:
            raise DiskFullError(errno.ENOSPC, f"no space left on device: another rank could not write its "
                                              f"sharded window file into {directory}")
        if int(failed.item()) == 1:
            raise OSError(f"sharded window checkpoint: another rank could not write its file into {directory}")
        return {
            "format": SHARDED_CHECKPOINT_FORMAT,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": str(self.dtype),
            "directory": directory,
            "files": files,
        }

    def to_dense(self) -> torch.Tensor:
        # Collective: the full window on every rank, for tests only.
        return torch.stack(
            [
                self._gather(self.local.read_columns(0, self.hi - self.lo)[j].to(self.device)).cpu()
                for j in range(self.rows)
            ]
        )

