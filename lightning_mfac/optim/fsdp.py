"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): each is a ``DTensor``
whose local piece is a block of rows (``Shard(0)`` on a one-dimensional mesh). The M-FAC window then
keeps, on each rank, the columns of its own pieces: their coordinates in the single-process
``parameters_to_vector`` order form one range per parameter (:class:`ShardLayout`), so no rank
holds a full gradient or the full window, and a checkpoint's columns are numbered as in one
process (a resume may change the world size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_mfac.fisher.storage import ShardLayout

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch without DTensor has no FSDP2 either
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local piece of a ``DTensor`` (a view: in-place updates reach the parameter), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_rows(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (a plain tensor shaped like ``t``) that ``t``'s local piece holds: a view,
    for a ``Shard(0)`` ``DTensor``; ``full`` itself for a plain ``t``. How a full-size mask reaches
    the local piece of the weight, gradient or optimizer state it masks."""
    if not is_dtensor(t):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return full.narrow(0, offset[0], shape[0])


def shard_layout(params: Sequence[torch.Tensor], owner: str, names: Sequence[str] | None = None) -> ShardLayout | None:
    """The layout of ``params`` over their FSDP2 mesh, or ``None`` when none is a ``DTensor``.

    Collective over the mesh's group (one ``all_gather_object`` of every rank's row counts): build
    it on every rank, in the same parameter order."""
    flags = [is_dtensor(p) for p in params]
    if not any(flags):
        return None

    def label(i: int) -> str:
        return f"parameter {names[i]!r}" if names is not None else f"parameter index {i}"

    if not all(flags):
        plain = flags.index(False)
        raise ValueError(f"{owner}: {label(plain)} is a plain tensor but others are FSDP2 DTensors: expected "
                         "every parameter of the window sharded by fully_shard, or none.")
    mesh = params[0].device_mesh
    for i, p in enumerate(params):
        if p.device_mesh != mesh:
            raise ValueError(f"{owner}: {label(i)} lives on another device mesh than parameter index 0: expected "
                             "one mesh for the whole window.")
        if mesh.ndim != 1 or p.dim() == 0 or not (isinstance(p.placements[0], Shard) and p.placements[0].dim == 0):
            raise ValueError(
                f"{owner}: {label(i)} has placements {p.placements} on a {mesh.ndim}-dimensional mesh: expected "
                "FSDP2's default (Shard(0) on a one-dimensional mesh); HSDP meshes and shard_placement_fn "
                "placements are not supported yet."
            )
    group = mesh.get_group()
    rows = [p.to_local().shape[0] for p in params]
    world = dist.get_world_size(group)
    gathered: list[list[int]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, rows, group=group)
    members: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        width = n // p.shape[0] if p.shape[0] else 0
        counts = [gathered[r][i] for r in range(world)]
        if sum(counts) != p.shape[0]:
            raise ValueError(f"{owner}: {label(i)}'s local row blocks ({counts}) do not add up to its "
                             f"{p.shape[0]} rows.")
        start = 0  # Shard(0) puts rank r's rows after those of ranks 0..r-1
        for r in range(world):
            members[r].append((offset + start * width, offset + (start + counts[r]) * width))
            start += counts[r]
        offset += n
    return ShardLayout(offset, tuple(tuple(m) for m in members), group)
