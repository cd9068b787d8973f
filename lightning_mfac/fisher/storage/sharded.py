"""Windows split over the ranks of a ``torch.distributed`` group, coordinate-wise; their state is
this rank's columns (the files of a whole checkpoint: :mod:`.shard_files`).

* :class:`ShardedWindow` (DDP): every rank has the whole gradient; each stores a contiguous
  1/world of its coordinates and the direction is gathered back to all.
* :class:`LocalShardWindow` (FSDP2): every rank has only its parameter shards' gradients; each
  stores the columns of those shards and the direction stays local. Its columns are named in the
  single-process order of the parameters (``parameters_to_vector``), so a checkpoint resumes in
  another world size.

Both reduce the ``m``-vector of dots and the Gram matrix with one all-reduce."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac.fisher.storage.base import LOCAL_SHARD_FORMAT, WindowStorage


class _ReducedOverRanks:
    """What both sharded windows do alike: this rank's part of the Gram and of the staged dots,
    summed over the group by one all-reduce; the row operations stay local."""

    local: WindowStorage
    group: Any

    def gram(self):
        out = self.local.gram()
        dist.all_reduce(out, group=self.group)
        return out

    def staged_dots(self, out):
        part = torch.zeros_like(out)
        self.local.staged_dots(part)
        dist.all_reduce(part, group=self.group)
        out.add_(part)

    def commit(self, target):
        self.local.commit(target)

    def zero_(self):
        self.local.zero_()

    @property
    def nbytes(self) -> int:
        return self.local.nbytes


class ShardedWindow(_ReducedOverRanks, WindowStorage):
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

    def combine(self, coeffs, out_dtype=None, out=None):
        whole = self._gather(self.local.combine(coeffs, out_dtype if out is None else out.dtype))
        return whole if out is None else out.copy_(whole)

    def stage(self, g):
        self.local.stage(g[self.lo : self.hi])

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

    def state_dict(self) -> dict[str, Any]:
        """This rank's columns, in ``LOCAL_SHARD_FORMAT``: no file is written and no other rank is
        involved. A checkpoint of the whole window writes every rank's columns beside the checkpoint
        with :func:`~lightning_mfac.fisher.storage.shard_files.write_window_shards` (Lightning:
        ``lightning_mfac.callbacks.window_shards`` does it), or keeps one state per rank."""
        members = [[self.bounds(self.dim, r, self.world)] for r in range(self.world)]
        return _local_state(self, members)

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor, shard_dir: str | None = None) -> None:
        """As :meth:`WindowStorage.load_state_dict`; collective: when any rank cannot restore its
        columns, every rank raises (none goes on to train and waits forever for the others)."""
        _load_on_every_rank(self, state, shard_dir)

    def to_dense(self) -> torch.Tensor:
        # Collective: the full window on every rank, for tests only.
        return torch.stack(
            [
                self._gather(self.local.read_columns(0, self.hi - self.lo)[j].to(self.device)).cpu()
                for j in range(self.rows)
            ]
        )



def _local_state(window: WindowStorage, members: Sequence[Sequence[tuple[int, int]]]) -> dict[str, Any]:
    """A sharded window's ``state_dict``: its own columns and every rank's column ranges (by global
    rank), from which :func:`~.shard_files.write_window_shards` writes the manifest."""
    group = window.group
    ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(window.world)]
    return {**WindowStorage.state_dict(window), "format": LOCAL_SHARD_FORMAT,
            "segments": window.local_segments(), "rank": window.rank, "world": window.world,
            "members": [(rank, [tuple(s) for s in segs]) for rank, segs in zip(ranks, members, strict=True)]}


def _load_on_every_rank(window: WindowStorage, state: Any, shard_dir: str | None) -> None:
    """:meth:`WindowStorage.load_state_dict`, collective: when any rank cannot restore its columns,
    every rank raises (none goes on to train and waits forever for the others)."""
    failure: Exception | None = None
    try:
        WindowStorage.load_state_dict(window, state, shard_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        failure = err
    device = window.device if dist.get_backend(window.group) == "nccl" else torch.device("cpu")
    failed = torch.tensor([failure is not None], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=window.group)
    if failure is not None:
        raise failure
    if int(failed.item()):
        raise RuntimeError("sharded window: another rank could not restore its columns from the checkpoint "
                           "(its error says why); this rank's columns were not restored either.")


@dataclass(frozen=True)
class ShardLayout:
    """Which coordinates of a ``dim``-vector each rank of ``group`` holds: ``members[r]`` are rank
    ``r``'s ranges ``[lo, hi)``, in the order its local vector concatenates them (for FSDP2: one per
    parameter shard, in parameter order)."""

    dim: int
    members: tuple[tuple[tuple[int, int], ...], ...]
    group: Any = None

    def __post_init__(self) -> None:
        covered = sorted((lo, hi) for segs in self.members for lo, hi in segs if hi > lo)
        end = 0
        for lo, hi in covered:
            if lo != end:
                raise ValueError(f"ShardLayout: the ranks' ranges do not tile [0, {self.dim}) (at {end}: {lo}).")
            end = hi
        if end != self.dim:
            raise ValueError(f"ShardLayout: the ranks' ranges end at {end}: expected dim={self.dim}.")

    def local_size(self, rank: int) -> int:
        return sum(hi - lo for lo, hi in self.members[rank])


class LocalShardWindow(_ReducedOverRanks, WindowStorage):
    """The window over a :class:`ShardLayout`: this rank stores the columns of its own ranges, in
    ``local`` (a window of ``layout.local_size(rank)`` columns). Vectors in and out are this rank's
    local vectors; ``dim`` is the whole vector's (the checkpoint's column numbering)."""

    def __init__(self, local: WindowStorage, layout: ShardLayout) -> None:
        self.local, self.layout, self.group = local, layout, layout.group
        self.rows, self.dtype, self.device, self.kernels = local.rows, local.dtype, local.device, local.kernels
        self.dim = layout.dim
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if len(layout.members) != self.world:
            raise ValueError(f"ShardLayout has {len(layout.members)} members for a group of {self.world} ranks.")
        self._segments = [(lo, hi) for lo, hi in layout.members[self.rank] if hi > lo]
        starts, at = [], 0
        for lo, hi in self._segments:
            starts.append(at)
            at += hi - lo
        self._starts = starts
        if at != local.dim:
            raise ValueError(f"LocalShardWindow: {at} local coordinates in the layout, {local.dim} in the storage.")

    def local_segments(self):
        return list(self._segments)

    def local_bounds(self):
        if not self._segments:
            return 0, 0
        return self._segments[0][0], max(hi for _, hi in self._segments)

    def _local_range(self, c0: int, c1: int) -> tuple[int, int]:
        """Local columns of the coordinates ``[c0, c1)``, which lie in one of this rank's ranges."""
        for (lo, hi), start in zip(self._segments, self._starts, strict=True):
            if lo <= c0 and c1 <= hi:
                return start + c0 - lo, start + c1 - lo
        raise ValueError(f"columns [{c0}, {c1}) are not within one of this rank's ranges {self._segments[:4]}.")

    def dots(self, x):
        out = self.local.dots(x)
        dist.all_reduce(out, group=self.group)
        return out

    def combine(self, coeffs, out_dtype=None, out=None):
        return self.local.combine(coeffs, out_dtype, out)

    def stage(self, g):
        self.local.stage(g)

    def column_tiles(self):
        raise NotImplementedError("a window over FSDP2 shards holds a slice of the columns: iterate its local storage")

    def columns(self, idx):
        raise NotImplementedError("a window over FSDP2 shards has no global column access (the static "
                                  "algorithm does not run on FSDP2 shards)")

    def read_columns(self, c0, c1):
        if c0 >= c1:
            return torch.empty(self.rows, 0, dtype=self.dtype)
        a, b = self._local_range(c0, c1)
        return self.local.read_columns(a, b)

    def write_columns(self, c0, c1, block):
        if c0 < c1:
            a, b = self._local_range(c0, c1)
            self.local.write_columns(a, b, block)

    def mask_columns(self, keep):
        self.local.mask_columns(keep)  # ``keep`` is a local vector, as every vector here

    def state_dict(self) -> dict[str, Any]:
        """This rank's columns, as :meth:`ShardedWindow.state_dict` (numbered in the whole vector)."""
        return _local_state(self, self.layout.members)

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor, shard_dir: str | None = None) -> None:
        """As :meth:`ShardedWindow.load_state_dict` (collective)."""
        _load_on_every_rank(self, state, shard_dir)

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError("a window over FSDP2 shards is never gathered: read its state_dict per rank")
