"""Which storage a window gets (the one rule behind ``storage="auto"``), and building it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac.fisher.config import WindowConfig
from lightning_mfac.fisher.storage.base import WindowStorage, itemsize
from lightning_mfac.fisher.storage.device import DeviceWindow
from lightning_mfac.fisher.storage.paged import PagedWindow
from lightning_mfac.fisher.storage.sharded import LocalShardWindow, ShardedWindow, ShardLayout

#: Fraction of free device memory that ``storage="auto"`` lets a new window take before paging.
AUTO_DEVICE_FRACTION = 0.5


class WindowMemoryError(MemoryError):
    """A window larger than the memory free where it would live, refused before allocating it."""


def free_bytes(device: torch.device | str) -> int:
    """Memory free for a new tensor: the device's on CUDA, else the host's (``MemAvailable``, which
    counts reclaimable caches; without ``/proc/meminfo``, the free pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_window_fits(rows: int, dim: int, dtype: torch.dtype, device: torch.device | str, storage: str) -> None:
    """Refuse, before allocating, a ``rows × dim`` window that cannot fit where ``storage`` (a
    planned storage, not ``"auto"``) puts it: the device for ``"device"``, pinned host memory for
    ``"paged"``. An allocator failure would name neither the window nor a way out."""
    need = rows * dim * itemsize(dtype)
    device = torch.device(device)
    where = torch.device("cpu") if storage == "paged" else device
    free = free_bytes(where)
    if need > free:
        place = "host memory" if where.type == "cpu" else f"{where}"
        ways = ["lower ngrads", "store it in bfloat16 (window dtype)"]
        if where.type == "cuda":
            ways.append("page it to host memory (storage 'paged')")
        ways.append("spread it over DDP ranks (storage 'sharded')")
        raise WindowMemoryError(
            f"the M-FAC window needs {_size(need)} ({rows} gradients × {dim} coordinates × {itemsize(dtype)} "
            f"bytes of {str(dtype).replace('torch.', '')}) but {place} has {_size(free)} free: "
            + ", ".join(ways[:-1]) + f" or {ways[-1]}."
        )


def plan_storage(
    storage: str,
    rows: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    process_group: Any = None,
    shardable: bool = True,
    held_on: torch.device | str | None = None,
) -> str:
    """The storage of a ``rows × dim`` window of ``dtype`` multiplied on ``device``: ``storage``
    itself unless it is ``"auto"``, which picks, in this order,

    1. ``"sharded"`` when the window may be sharded (``shardable``) and ``process_group`` (default:
       the world) is an initialized group of more than one rank;
    2. ``"device"`` on a device other than CUDA (host memory is the device's memory);
    3. for gradients that already exist (``held_on``: where they are), where they are: ``"device"``
       on the compute device (wrapped, not copied), ``"paged"`` in host memory;
    4. for a new window, ``"device"`` if it takes at most ``AUTO_DEVICE_FRACTION`` of the free
       device memory, else ``"paged"``.

    ``DynamicFisherInverse`` (through :func:`make_window`), ``StaticFisherInverse`` (``held_on``:
    its gradients' device) and ``oneshot_prune`` (where it accumulates the gradient matrix:
    host memory exactly when the plan is ``"paged"``) all follow it."""
    if storage != "auto":
        return storage
    if shardable and dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return "sharded"
    device = torch.device(device)
    if device.type != "cuda":
        return "device"
    if held_on is not None:
        return "device" if torch.device(held_on).type == "cuda" else "paged"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if rows * dim * itemsize(dtype) <= AUTO_DEVICE_FRACTION * free else "paged"


def make_window(
    config: WindowConfig | Mapping[str, Any] | None,
    rows: int,
    dim: int,
    device: torch.device | str,
    layout: ShardLayout | None = None,
) -> WindowStorage:
    """An empty ``rows × dim`` window of the ``config``'s dtype (float32 where it names none),
    storage (see :func:`plan_storage`), page geometry, kernels, process group and shard folder.

    With a ``layout`` (FSDP2 shards), ``dim`` is this rank's number of coordinates and the window
    is a :class:`LocalShardWindow` of the layout (storage ``"auto"`` or ``"sharded"``)."""
    cfg = WindowConfig.coerce(config)
    device = torch.device(device)
    dtype = cfg.resolved_dtype(torch.float32)
    if layout is not None:
        if cfg.storage not in ("auto", "sharded"):
            raise ValueError(f"storage={cfg.storage!r} for parameters sharded by FSDP2: expected 'auto' or "
                             "'sharded' (each rank keeps the window columns of its own shards).")
        local = cfg.replace(storage=plan_storage("auto", rows, dim, dtype, device, shardable=False),
                            process_group=None)
        return LocalShardWindow(make_window(local, rows, dim, device), layout)
    storage = plan_storage(cfg.storage, rows, dim, dtype, device, process_group=cfg.process_group)
    if storage == "sharded":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "storage='sharded' needs an initialized torch.distributed process group "
                "(e.g. a Lightning DDP strategy); use storage='device' or 'paged' in a single process."
            )
        group = cfg.process_group
        lo, hi = ShardedWindow.bounds(dim, dist.get_rank(group), dist.get_world_size(group))
        # This rank's slice is a window of its own, placed by the same rule (never sharded again).
        local = cfg.replace(storage=plan_storage("auto", rows, hi - lo, dtype, device, shardable=False),
                            process_group=None)
        return ShardedWindow(make_window(local, rows, hi - lo, device), dim, lo, hi, group)
    check_window_fits(rows, dim, dtype, device, storage)
    if storage == "paged":
        return PagedWindow(rows, dim, dtype, device, cfg.page_cols, cfg.page_budget_bytes, cfg.kernels)
    return DeviceWindow(rows, dim, dtype, device, cfg.kernels)
