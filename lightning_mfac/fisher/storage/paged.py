"""A window in page-major host memory, streamed to the device a page at a time."""

from __future__ import annotations

import math

import torch

from lightning_mfac.fisher.kernels import WindowKernels, resolve_kernels
from lightning_mfac.fisher.storage.base import WindowStorage, default_out_dtype, itemsize

#: Default fraction of free device memory that the pages of a paged window may use.
PAGE_BUDGET_FRACTION = 0.25


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

    def combine(self, coeffs, out_dtype=None, out=None):
        if out is None:
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

