"""Where the ``m × d`` gradient window lives, and the two passes every M-FAC step makes over it.

A storage holds ``m`` rows of length ``d`` and offers exactly what the Woodbury formulas need:

* ``dots(X)``    -> ``G X``   (``(m, k)`` float64; float32 partial sums combined in float64)
* ``combine(C)`` -> ``Gᵀ C``  (``(d, k)`` in the compute dtype)
* ``set_row(j, g)``, ``gram()`` (``G Gᵀ`` in float64), ``mask_columns(keep)``, ``zero_()``

Three layouts share that interface:

``DeviceWindow``  the whole window on the compute device.
``PagedWindow``   page-major host memory (pinned when CUDA is present), streamed to the
                  compute device one page at a time with the next page's copy issued on a side
                  stream while the current page is used, so device memory holds about two pages.
``ShardedWindow`` under ``torch.distributed``: each rank keeps a contiguous 1/world slice of the
                  coordinates; dot products are all-reduced, each rank combines its own slice
                  and the slices are all-gathered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from lightning_mfac.fisher._numerics import chunked_dots, combine_rows, compute_dtype
from lightning_mfac.fisher.config import STORAGES

#: Fraction of free device memory that ``storage="auto"`` lets the window take before paging.
AUTO_DEVICE_FRACTION = 0.5
#: Default fraction of free device memory that the pages of a paged window may use.
PAGE_BUDGET_FRACTION = 0.25


class WindowStorage:
    """Base class: ``pages()`` yields ``(c0, c1, page)`` with ``page`` a ``(m, c1 - c0)`` tensor on
    the compute device; every pass is written once, in terms of pages."""

    rows: int
    dim: int
    dtype: torch.dtype
    device: torch.device

    def pages(self) -> Iterator[tuple[int, int, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def dots(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.rows, x.shape[1], dtype=torch.float64, device=self.device)
        for c0, c1, page in self.pages():
            out += chunked_dots(page, x[c0:c1])
        return out

    def combine(self, coeffs: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.dim, coeffs.shape[1], dtype=compute_dtype(self.dtype), device=self.device)
        for c0, c1, page in self.pages():
            out[c0:c1] = combine_rows(page, coeffs)
        return out

    def gram(self) -> torch.Tensor:
        out = torch.zeros(self.rows, self.rows, dtype=torch.float64, device=self.device)
        for _, _, page in self.pages():
            out += chunked_dots(page, page.t())
        return out

    def set_row(self, j: int, g: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def row(self, j: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mask_columns(self, keep: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The full ``(m, d)`` window on the CPU (for checkpoints and tests)."""
        return (
            torch.stack([self.row(j).cpu() for j in range(self.rows)])
            if self.rows
            else torch.empty(0, self.dim)
        )

    def load_dense(self, rows: torch.Tensor) -> None:
        for j in range(self.rows):
            self.set_row(j, rows[j])


class DeviceWindow(WindowStorage):
    def __init__(self, rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.dim, self.dtype, self.device = rows, dim, dtype, torch.device(device)
        self.data = torch.zeros(rows, dim, dtype=dtype, device=self.device)

    def pages(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        yield 0, self.dim, self.data

    def set_row(self, j: int, g: torch.Tensor) -> None:
        self.data[j].copy_(g)

    def row(self, j: int) -> torch.Tensor:
        return self.data[j]

    def mask_columns(self, keep: torch.Tensor) -> None:
        self.data.mul_(keep.to(device=self.device, dtype=self.dtype))

    def zero_(self) -> None:
        self.data.zero_()

    def to_dense(self) -> torch.Tensor:
        return self.data.detach().cpu().clone()

    def load_dense(self, rows: torch.Tensor) -> None:
        self.data.copy_(rows)


class PagedWindow(WindowStorage):
    """Page-major host window ``(npages, m, page_cols)``: each page is one contiguous block, so a
    page moves to the device in a single asynchronous copy from pinned memory."""

    def __init__(
        self,
        rows: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        page_cols: int | None = None,
        page_budget_bytes: int | None = None,
    ) -> None:
        self.rows, self.dim, self.dtype, self.device = rows, dim, dtype, torch.device(device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if page_cols is None:
            page_cols = default_page_cols(rows, itemsize, self.device, page_budget_bytes)
        self.page_cols = max(1, min(int(page_cols), dim))
        self.npages = math.ceil(dim / self.page_cols)
        pin = self.device.type == "cuda"
        self.host = torch.zeros(self.npages, rows, self.page_cols, dtype=dtype, pin_memory=pin)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _bounds(self, p: int) -> tuple[int, int]:
        c0 = p * self.page_cols
        return c0, min(self.dim, c0 + self.page_cols)

    def pages(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self._copy_stream is None:
            for p in range(self.npages):
                c0, c1 = self._bounds(p)
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
            c0, c1 = self._bounds(p)
            yield c0, c1, page[:, : c1 - c0]

    def _fetch(self, p: int, main: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
        assert self._copy_stream is not None
        # The copy may only start once earlier work that wrote host pages (set_row) is ordered.
        self._copy_stream.wait_stream(main)
        with torch.cuda.stream(self._copy_stream):
            page = self.host[p].to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return page, ready

    def set_row(self, j: int, g: torch.Tensor) -> None:
        flat = torch.zeros(self.npages * self.page_cols, dtype=self.dtype)
        flat[: self.dim] = g.detach().to("cpu", self.dtype)
        self.host[:, j, :] = flat.view(self.npages, self.page_cols)

    def row(self, j: int) -> torch.Tensor:
        return self.host[:, j, :].reshape(-1)[: self.dim].clone()

    def mask_columns(self, keep: torch.Tensor) -> None:
        flat = torch.zeros(self.npages * self.page_cols, dtype=self.dtype)
        flat[: self.dim] = keep.to("cpu", self.dtype)
        self.host.mul_(flat.view(self.npages, 1, self.page_cols))

    def zero_(self) -> None:
        self.host.zero_()


class ShardedWindow(WindowStorage):
    """Each rank stores coordinates ``[lo, hi)`` of a contiguous 1/world split of ``d``."""

    def __init__(self, local: WindowStorage, dim: int, lo: int, hi: int, group=None) -> None:
        self.local, self.dim, self.lo, self.hi, self.group = local, dim, lo, hi, group
        self.rows, self.dtype, self.device = local.rows, local.dtype, local.device
        self.world = dist.get_world_size(group)
        self.shard = math.ceil(dim / self.world)

    @staticmethod
    def bounds(dim: int, rank: int, world: int) -> tuple[int, int]:
        shard = math.ceil(dim / world)
        lo = min(dim, rank * shard)
        return lo, min(dim, lo + shard)

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def dots(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local.dots(x[self.lo : self.hi])
        dist.all_reduce(out, group=self.group)
        return out

    def combine(self, coeffs: torch.Tensor) -> torch.Tensor:
        part = self.local.combine(coeffs)
        padded = part.new_zeros(self.shard, coeffs.shape[1])
        padded[: part.shape[0]] = part
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat(gathered)[: self.dim]

    def gram(self) -> torch.Tensor:
        out = self.local.gram()
        dist.all_reduce(out, group=self.group)
        return out

    def set_row(self, j: int, g: torch.Tensor) -> None:
        self.local.set_row(j, g[self.lo : self.hi])

    def row(self, j: int) -> torch.Tensor:
        part = self.local.row(j).to(self.device)
        padded = part.new_zeros(self.shard)
        padded[: part.numel()] = part
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat(gathered)[: self.dim]

    def to_dense(self) -> torch.Tensor:
        # Collective: every rank must call it (Lightning dumps checkpoints on all ranks).
        return torch.stack([self.row(j).cpu() for j in range(self.rows)])

    def load_dense(self, rows: torch.Tensor) -> None:
        self.local.load_dense(rows[:, self.lo : self.hi])

    def mask_columns(self, keep: torch.Tensor) -> None:
        self.local.mask_columns(keep[self.lo : self.hi])

    def zero_(self) -> None:
        self.local.zero_()


def default_page_cols(rows: int, itemsize: int, device: torch.device, budget_bytes: int | None) -> int:
    """Columns per page so that two pages in flight plus their float64 work copies fit the budget."""
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = int(PAGE_BUDGET_FRACTION * free)
        else:
            budget_bytes = 256 << 20
    per_col = rows * (2 * itemsize + 8)
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
        local = make_window(rows, hi - lo, dtype, device, inner, page_cols, page_budget_bytes)
        return ShardedWindow(local, dim, lo, hi, process_group)
    if storage == "paged":
        return PagedWindow(rows, dim, dtype, device, page_cols, page_budget_bytes)
    return DeviceWindow(rows, dim, dtype, device)


def resolve_auto_storage(rows: int, dim: int, dtype: torch.dtype, device: torch.device, process_group) -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return "sharded"
    if device.type != "cuda":
        return "device"
    need = rows * dim * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need <= AUTO_DEVICE_FRACTION * free else "paged"
