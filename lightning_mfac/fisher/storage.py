"""Where the ``m × d`` gradient window lives, and the passes the M-FAC algorithms make over it.

:class:`WindowStorage` is the whole contract between an algorithm and its window (docs/design.md,
"Storage layouts"): the three passes (``dots`` = ``G x``, ``combine`` = ``Gᵀ c``, ``gram`` = ``G Gᵀ``),
always accumulated in float64 by the kernels of ``fisher.kernels``; the staged-row step that the
dynamic algorithm needs (``stage``, ``staged_dots``, ``staged_combine``, ``commit``); column access for
the static algorithm (``column_tiles``, ``columns``); masking, zeroing and a page-by-page checkpoint
(``state_dict``/``load_state_dict`` of column blocks). No algorithm touches a storage's tensors.

The staging row is a row ``m`` beside the ``m`` window rows: a new gradient is written there first,
so one pass over ``m + 1`` rows yields both ``G g`` and ``‖g‖²``, one combine covers the new
gradient with the window, and the row enters the window (or not) with an index copy decided on the
device -- no host branch.

Layouts:

``DeviceWindow``  the rows (and the staging row) in one ``(m + 1, d)`` tensor on the compute device.
``PagedWindow``   page-major host memory ``(npages, m, page_cols)`` (pinned when CUDA is present),
                  streamed to the device a page at a time with the next page's copy in flight on a
                  side stream; host-side writes wait for that stream first.
``ShardedWindow`` under ``torch.distributed``: each rank stores a contiguous 1/world slice of the
                  coordinates; dot products and Grams are all-reduced, combinations all-gathered;
                  checkpointed as one file per rank plus a manifest (no rank sees another's columns).
"""

from __future__ import annotations

import errno
import math
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac._files import DiskFullError, atomic_save, plain_file_name
from lightning_mfac.fisher.config import STORAGES
from lightning_mfac.fisher.kernels import WindowKernels, resolve_kernels

#: Fraction of free device memory that ``storage="auto"`` lets the window take before paging.
AUTO_DEVICE_FRACTION = 0.5
#: Default fraction of free device memory that the pages of a paged window may use.
PAGE_BUDGET_FRACTION = 0.25
#: Columns per block of a checkpoint: blocks are copied to the host one at a time.
CHECKPOINT_BLOCK_BYTES = 64 << 20
#: Version tag of the checkpoint layout (docs/design.md, "Checkpoint layout").
CHECKPOINT_FORMAT = "mfac-window/1"
#: A sharded window's checkpoint: a manifest of per-rank files, each in ``SHARD_FILE_FORMAT``.
SHARDED_CHECKPOINT_FORMAT = "mfac-window-sharded/1"
SHARD_FILE_FORMAT = "mfac-window-shard/1"
#: The name of a per-rank window file (see ``ShardedWindow.state_dict``).
WINDOW_FILE_NAME = re.compile(r"window-\d{8}-\d{6}-[0-9a-f]{12}-rank\d{5}-of-\d{5}\.pt")
#: Where a sharded window writes its per-rank files when its config names no ``shard_dir``.
DEFAULT_SHARD_DIR = "mfac-window-shards"


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def default_out_dtype(window_dtype: torch.dtype) -> torch.dtype:
    """Results of a float32 or bfloat16 window are float32, of a float64 window float64."""
    return torch.float64 if window_dtype == torch.float64 else torch.float32


class WindowStorage(ABC):
    """``rows`` gradients of ``dim`` coordinates stored as ``dtype``, multiplied on ``device``."""

    rows: int
    dim: int
    dtype: torch.dtype
    device: torch.device
    kernels: WindowKernels

    # ------------------------------------------------------------------ passes over the m rows
    @abstractmethod
    def dots(self, x: torch.Tensor) -> torch.Tensor:
        """``G x`` in float64: ``(m,)`` for ``x`` of shape ``(d,)``, ``(m, k)`` for ``(d, k)``."""

    @abstractmethod
    def combine(self, coeffs: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Gᵀ c`` accumulated in float64, rounded once to ``out_dtype``."""

    @abstractmethod
    def gram(self) -> torch.Tensor:
        """``G Gᵀ`` as a float64 ``(m, m)`` tensor."""

    def block_woodbury(
        self, x: torch.Tensor, block: int, factor: torch.Tensor, damp: float, out: torch.Tensor
    ) -> torch.Tensor:
        """``out_b = (x_b − G_bᵀ (L_b L_bᵀ)⁻¹ G_b x_b)/λ`` for every block of ``block`` columns
        (``factor``: the float64 ``(nblocks, m, m)`` factors ``L_b``): tile by tile, for storages
        whose ``column_tiles`` hold whole blocks."""
        for c0, c1, tile in self.column_tiles():
            nb = -(-(c1 - c0) // block)
            f = factor[c0 // block : c0 // block + nb]
            self.kernels.block_woodbury(tile, x[c0:c1], block, f, damp, out=out[c0:c1])
        return out

    # ------------------------------------------------------------------ the staged row
    @abstractmethod
    def stage(self, g: torch.Tensor) -> None:
        """Write ``g`` (rounded to the window dtype: ``ĝ``) into the staging row."""

    @abstractmethod
    def staged_dots(self, out: torch.Tensor) -> None:
        """``out += [G ĝ; ĝ·ĝ]`` (float64 ``(m + 1,)``)."""

    @abstractmethod
    def staged_combine(self, coeffs: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Gᵀ c[:m] + ĝ c[m]`` with one float64 accumulation (``coeffs`` float64 ``(m + 1,)``)."""

    @abstractmethod
    def commit(self, target: torch.Tensor) -> None:
        """Copy the staging row into row ``target`` (an int64 ``(1,)`` device tensor); ``target == m``
        drops it. Chosen on the device, so the step never branches on the host."""

    # ------------------------------------------------------------------ columns
    @abstractmethod
    def column_tiles(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(c0, c1, tile)`` over all columns, ``tile`` an ``(m, c1 - c0)`` tensor on the device."""

    @abstractmethod
    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """The columns ``idx`` of ``G`` as a float64 ``(m, len(idx))`` tensor on the device."""

    @abstractmethod
    def read_columns(self, c0: int, c1: int) -> torch.Tensor:
        """A CPU copy of columns ``[c0, c1)`` (this rank's part of them for a sharded window)."""

    @abstractmethod
    def write_columns(self, c0: int, c1: int, block: torch.Tensor) -> None:
        """Overwrite columns ``[c0, c1)`` of the ``m`` rows with ``block`` (any device)."""

    @abstractmethod
    def mask_columns(self, keep: torch.Tensor) -> None:
        """Zero the columns where the boolean ``keep`` (``(d,)``) is False."""

    @abstractmethod
    def zero_(self) -> None:
        """Empty every row (and the staging row)."""

    # ------------------------------------------------------------------ shared
    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * itemsize(self.dtype)

    def local_bounds(self) -> tuple[int, int]:
        """The coordinates this process stores."""
        return 0, self.dim

    def _block_cols(self) -> int:
        return max(1, CHECKPOINT_BLOCK_BYTES // max(1, self.rows * itemsize(self.dtype)))

    def state_dict(self) -> dict[str, Any]:
        """The window as CPU column blocks (docs/design.md, "Checkpoint layout"): no block is wider
        than ``CHECKPOINT_BLOCK_BYTES``, so at most one block is in flight on the device."""
        lo, hi = self.local_bounds()
        width = self._block_cols()
        blocks = [
            (c0, min(hi, c0 + width), self.read_columns(c0, min(hi, c0 + width)))
            for c0 in range(lo, hi, width)
        ]
        return {
            "format": CHECKPOINT_FORMAT,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": str(self.dtype),
            "blocks": blocks,
        }

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor, shard_dir: str | None = None) -> None:
        """Restore from :meth:`state_dict` (any storage, page geometry or shard split) or from a
        dense ``(m, d)`` tensor (older checkpoints). Blocks outside this process's columns are skipped.
        A sharded checkpoint's files are looked up in ``shard_dir`` first, then where they were written."""
        lo, hi = self.local_bounds()
        if isinstance(state, torch.Tensor):
            blocks = [(0, self.dim, state)]
        else:
            if (
                state.get("format") not in (CHECKPOINT_FORMAT, SHARDED_CHECKPOINT_FORMAT)
                or state["rows"] != self.rows
                or state["dim"] != self.dim
            ):
                raise ValueError(
                    f"window checkpoint (format={state.get('format')!r}, rows={state.get('rows')}, "
                    f"dim={state.get('dim')}) does not match this window ({CHECKPOINT_FORMAT!r} or "
                    f"{SHARDED_CHECKPOINT_FORMAT!r}, rows={self.rows}, dim={self.dim})."
                )
            if state["format"] == SHARDED_CHECKPOINT_FORMAT:
                blocks = _shard_file_blocks(state, lo, hi, shard_dir)
            else:
                blocks = state["blocks"]
        self.zero_()
        for c0, c1, block in blocks:
            a, b = max(lo, c0), min(hi, c1)
            if a < b:
                self.write_columns(a, b, block[:, a - c0 : b - c0])

    def to_dense(self) -> torch.Tensor:
        """The full ``(m, d)`` window on the CPU, for tests and small windows (collective when sharded)."""
        return self.read_columns(0, self.dim)


class DeviceWindow(WindowStorage):
    """All rows in one tensor on the compute device, plus the staging row when ``staging``."""

    def __init__(
        self,
        rows: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kernels: str | WindowKernels = "auto",
        staging: bool = True,
        data: torch.Tensor | None = None,
        tile_cols: int | None = None,
    ) -> None:
        self.rows, self.dim, self.dtype, self.device = rows, dim, dtype, torch.device(device)
        self.tile_cols = max(1, tile_cols or dim)
        self.kernels = resolve_kernels(kernels, self.device) if isinstance(kernels, str) else kernels
        if data is None:
            data = torch.zeros(rows + int(staging), dim, dtype=dtype, device=self.device)
        self.data = data
        # Persistent views: the step uses them without creating any.
        self._rows = data[:rows]
        self._staged = data[rows] if staging else None
        # index_copy_ refuses a source inside its destination: the row is committed from a copy.
        self._commit_row = torch.empty(1, dim, dtype=dtype, device=self.device) if staging else None
        self._commit_vec = self._commit_row[0] if staging else None

    @classmethod
    def wrap(
        cls, rows: torch.Tensor, kernels: str | WindowKernels = "auto", tile_cols: int | None = None
    ) -> DeviceWindow:
        """A window over an existing ``(m, d)`` tensor, without copying it (static M-FAC), whose
        ``column_tiles`` are ``tile_cols`` wide."""
        m, d = rows.shape
        return cls(m, d, rows.dtype, rows.device, kernels, staging=False, data=rows, tile_cols=tile_cols)

    def dots(self, x):
        return self.kernels.dots(self._rows, x)

    def combine(self, coeffs, out_dtype=None):
        return self.kernels.combine(self._rows, coeffs, out_dtype=out_dtype)

    def gram(self):
        return self.kernels.gram(self._rows)

    def block_woodbury(self, x, block, factor, damp, out):
        # One call: the kernels bound their own temporaries, whatever the width.
        return self.kernels.block_woodbury(self._rows, x, block, factor, damp, out=out)

    def stage(self, g):
        self._staged.copy_(g)

    def staged_dots(self, out):
        self.kernels.dots(self.data, self._staged, out=out)

    def staged_combine(self, coeffs, out_dtype=None):
        return self.kernels.combine(self.data, coeffs, out_dtype=out_dtype)

    def commit(self, target):
        self._commit_vec.copy_(self._staged)
        self.data.index_copy_(0, target, self._commit_row)

    def column_tiles(self):
        for c0 in range(0, self.dim, self.tile_cols):
            c1 = min(self.dim, c0 + self.tile_cols)
            yield c0, c1, self._rows[:, c0:c1]

    def columns(self, idx):
        return self._rows.index_select(1, idx.to(self.device)).to(torch.float64)

    def read_columns(self, c0, c1):
        block = self._rows[:, c0:c1]
        return block.clone() if block.device.type == "cpu" else block.cpu()

    def write_columns(self, c0, c1, block):
        self._rows[:, c0:c1].copy_(block)

    def mask_columns(self, keep):
        self._rows.mul_(keep.to(device=self.device, dtype=self.dtype))

    def zero_(self):
        self.data.zero_()


class PagedWindow(WindowStorage):
    """Page-major host window ``(npages, m, page_cols)``: each page is one contiguous block, so a
    page moves to the device in a single asynchronous copy from pinned memory. The staging row
    lives on the device."""

    def __init__(
        self,
        rows: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_cols: int | None = None,
        page_budget_bytes: int | None = None,
        kernels: str | WindowKernels = "auto",
    ) -> None:
        self.rows, self.dim, self.dtype, self.device = rows, dim, dtype, torch.device(device)
        self.kernels = resolve_kernels(kernels, self.device) if isinstance(kernels, str) else kernels
        if page_cols is None:
            page_cols = default_page_cols(rows, itemsize(dtype), self.device, page_budget_bytes)
        self.page_cols = max(1, min(int(page_cols), dim))
        self.npages = math.ceil(dim / self.page_cols)
        pin = self.device.type == "cuda"
        self.host = torch.zeros(self.npages, rows, self.page_cols, dtype=dtype, pin_memory=pin)
        self._staged = torch.zeros(dim, dtype=dtype, device=self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def from_rows(
        cls,
        rows: torch.Tensor,
        device: torch.device | str,
        page_cols: int | None,
        kernels: str | WindowKernels,
    ) -> PagedWindow:
        m, d = rows.shape
        window = cls(m, d, rows.dtype, device, page_cols, None, kernels)
        for p in range(window.npages):
            c0, c1 = window.bounds(p)
            window.host[p, :, : c1 - c0] = rows[:, c0:c1]
        return window

    def bounds(self, p: int) -> tuple[int, int]:
        c0 = p * self.page_cols
        return c0, min(self.dim, c0 + self.page_cols)

    # ------------------------------------------------------------------ streaming
    def column_tiles(self):
        if self._copy_stream is None:
            for p in range(self.npages):
                c0, c1 = self.bounds(p)
                yield c0, c1, self.host[p, :, : c1 - c0]
            return
        main = torch.cuda.current_stream(self.device)
        pending = self._fetch(0, main)
        for p in range(self.npages):
            page, ready = pending
            if p + 1 < self.npages:
                # Issue the next copy before using this page: the transfer overlaps the compute.
                pending = self._fetch(p + 1, main)
            main.wait_event(ready)
            page.record_stream(main)
            c0, c1 = self.bounds(p)
            yield c0, c1, page[:, : c1 - c0]

    def _fetch(self, p: int, main: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
        assert self._copy_stream is not None
        # The copy may only start once earlier work on the main stream is ordered before it.
        self._copy_stream.wait_stream(main)
        with torch.cuda.stream(self._copy_stream):
            page = self.host[p].to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return page, ready

    def _host_write_barrier(self) -> None:
        """Wait for the page copies in flight before the host writes pages they may still be
        reading (every host-side write goes through here: set, mask, zero, load)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    # ------------------------------------------------------------------ passes
    def dots(self, x):
        out = torch.zeros((self.rows,) + tuple(x.shape[1:]), dtype=torch.float64, device=self.device)
        for c0, c1, page in self.column_tiles():
            self.kernels.dots(page, x[c0:c1], out=out)
        return out

    def combine(self, coeffs, out_dtype=None):
        dtype = out_dtype or default_out_dtype(self.dtype)
        out = torch.empty((self.dim,) + tuple(coeffs.shape[1:]), dtype=dtype, device=self.device)
        for c0, c1, page in self.column_tiles():
            self.kernels.combine(page, coeffs, out=out[c0:c1])
        return out

    def gram(self):
        out = torch.zeros(self.rows, self.rows, dtype=torch.float64, device=self.device)
        for _, _, page in self.column_tiles():
            self.kernels.gram(page, out=out)
        return out

    def stage(self, g):
        self._staged.copy_(g)

    def staged_dots(self, out):
        m = self.rows
        for c0, c1, page in self.column_tiles():
            self.kernels.dots(page, self._staged[c0:c1], out=out[:m])
        self.kernels.dots(self._staged.unsqueeze(0), self._staged, out=out[m:])

    def staged_combine(self, coeffs, out_dtype=None):
        m = self.rows
        dtype = out_dtype or default_out_dtype(self.dtype)
        out = torch.empty(self.dim, dtype=dtype, device=self.device)
        for c0, c1, page in self.column_tiles():
            # The staged row joins the page's float64 sum before the one rounding to ``dtype``.
            part = self.kernels.combine(page, coeffs[:m], out_dtype=torch.float64)
            part.add_(self._staged[c0:c1].to(torch.float64) * coeffs[m])
            out[c0:c1] = part
        return out

    def commit(self, target):
        # The row goes to pinned host memory: the host needs the slot, so a paged step reads it
        # (one read per step; docs/design.md, "Host reads").
        t = int(target[0])
        if t < self.rows:
            self._host_write_barrier()
            row = self._staged.to("cpu")
            flat = torch.zeros(self.npages * self.page_cols, dtype=self.dtype)
            flat[: self.dim] = row
            self.host[:, t, :] = flat.view(self.npages, self.page_cols)

    # ------------------------------------------------------------------ columns
    def columns(self, idx):
        self._host_write_barrier()
        idx = idx.cpu()
        p, c = idx // self.page_cols, idx % self.page_cols
        return self.host[p, :, c].t().to(self.device, torch.float64)

    def read_columns(self, c0, c1):
        self._host_write_barrier()
        parts = []
        for p in range(c0 // self.page_cols, math.ceil(c1 / self.page_cols)):
            a, b = self.bounds(p)
            lo, hi = max(a, c0), min(b, c1)
            parts.append(self.host[p, :, lo - a : hi - a])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()

    def write_columns(self, c0, c1, block):
        self._host_write_barrier()
        for p in range(c0 // self.page_cols, math.ceil(c1 / self.page_cols)):
            a, b = self.bounds(p)
            lo, hi = max(a, c0), min(b, c1)
            self.host[p, :, lo - a : hi - a] = block[:, lo - c0 : hi - c0].to("cpu", self.dtype)

    def mask_columns(self, keep):
        self._host_write_barrier()
        flat = torch.zeros(self.npages * self.page_cols, dtype=self.dtype)
        flat[: self.dim] = keep.to("cpu", self.dtype)
        self.host.mul_(flat.view(self.npages, 1, self.page_cols))

    def zero_(self):
        self._host_write_barrier()
        self.host.zero_()
        self._staged.zero_()


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


def _shard_file_blocks(state: dict[str, Any], lo: int, hi: int, shard_dir: str | None):
    """The column blocks of a sharded checkpoint that overlap ``[lo, hi)``, read file by file (memory
    mapped, so only the blocks used are read): one file when the shard split is unchanged. Files are
    looked up in ``shard_dir`` first (a moved run directory), then where they were written."""
    for c0, c1, name in state["files"]:
        # A crafted manifest must not read files outside the shard folder.
        plain_file_name(name, "sharded window checkpoint")
        if c1 <= lo or c0 >= hi:
            continue
        candidates = [os.path.join(d, name) for d in (shard_dir, state["directory"]) if d]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            raise FileNotFoundError(
                f"sharded window checkpoint: the file {name!r} for columns [{c0}, {c1}) is in none of "
                f"{[os.path.dirname(p) for p in candidates]}; copy the shard directory along with the "
                "checkpoint, or set WindowConfig(shard_dir=...) to where it is now."
            )
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if shard.get("format") != SHARD_FILE_FORMAT or shard["rows"] != state["rows"] or shard["dim"] != state["dim"]:
            raise ValueError(f"{path} is not a shard of this checkpoint (format={shard.get('format')!r}).")
        yield from shard["blocks"]


def default_page_cols(rows: int, item: int, device: torch.device, budget_bytes: int | None) -> int:
    """Columns per page so that two pages in flight fit the budget."""
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = int(PAGE_BUDGET_FRACTION * free)
        else:
            budget_bytes = 256 << 20
    per_col = rows * 3 * item
    return max(1, budget_bytes // max(1, per_col))


def make_window(
    rows: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    storage: str = "device",
    page_cols: int | None = None,
    page_budget_bytes: int | None = None,
    process_group=None,
    kernels: str | WindowKernels = "auto",
    shard_dir: str | None = None,
) -> WindowStorage:
    """Build a window; ``storage="auto"`` picks ``sharded`` under an initialized process group of
    more than one rank, else ``device`` if the window takes at most ``AUTO_DEVICE_FRACTION`` of free
    device memory, else ``paged``."""
    device = torch.device(device)
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is invalid: expected one of {list(STORAGES)}.")
    if storage == "auto":
        storage = resolve_auto_storage(rows, dim, dtype, device, process_group)
    if storage == "sharded":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "storage='sharded' needs an initialized torch.distributed process group "
                "(e.g. a Lightning DDP strategy); use storage='device' or 'paged' in a single process."
            )
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        lo, hi = ShardedWindow.bounds(dim, rank, world)
        inner = (
            "device" if device.type != "cuda" else resolve_auto_storage(rows, hi - lo, dtype, device, None)
        )
        local = make_window(rows, hi - lo, dtype, device, inner, page_cols, page_budget_bytes, None, kernels)
        return ShardedWindow(local, dim, lo, hi, process_group, shard_dir)
    if storage == "paged":
        return PagedWindow(rows, dim, dtype, device, page_cols, page_budget_bytes, kernels)
    return DeviceWindow(rows, dim, dtype, device, kernels)


def resolve_auto_storage(rows: int, dim: int, dtype: torch.dtype, device: torch.device, process_group) -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return "sharded"
    if device.type != "cuda":
        return "device"
    need = rows * dim * itemsize(dtype)
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need <= AUTO_DEVICE_FRACTION * free else "paged"
