"""A window held in one tensor on the compute device."""

from __future__ import annotations

import torch

from lightning_mfac.fisher.kernels import WindowKernels, resolve_kernels
from lightning_mfac.fisher.storage.base import WindowStorage


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

    def combine(self, coeffs, out_dtype=None, out=None):
        return self.kernels.combine(self._rows, coeffs, out=out, out_dtype=out_dtype)

    def gram(self):
        return self.kernels.gram(self._rows)

    def block_woodbury(self, x, block, factor, damp, out):
        # One call: the kernels bound their own temporaries, whatever the width.
        return self.kernels.block_woodbury(self._rows, x, block, factor, damp, out=out)

    def stage(self, g):
        self._staged.copy_(g)

    def staged_dots(self, out):
        self.kernels.dots(self.data, self._staged, out=out)

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

