"""Reference window passes in plain PyTorch: widen a bounded column tile to float64, multiply with
BLAS. Any device; the temporaries are bounded (one tile), whatever ``n``."""

from __future__ import annotations

import torch

from lightning_mfac.fisher.kernels import _checks

#: Float64 elements of one widened tile (2 MiB): bounds the temporaries.
TILE_ELEMS = 1 << 18


class TorchKernels:
    """Reference path: widen a bounded column tile to float64, multiply with BLAS."""

    name = "torch"

    def _tiles(self, rows: torch.Tensor):
        m, n = rows.shape
        cols = max(1, TILE_ELEMS // max(m, 1))
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            yield c0, c1, rows[:, c0:c1].to(torch.float64)

    def dots(self, rows, x, out=None):
        _checks.dots(rows, x, out)
        vec = x.dim() == 1
        x2 = x if x.dim() == 2 else x.unsqueeze(1)
        res = torch.zeros(rows.shape[0], x2.shape[1], dtype=torch.float64, device=rows.device)
        for c0, c1, tile in self._tiles(rows):
            res += tile @ x2[c0:c1].to(torch.float64)
        res = res.squeeze(1) if vec else res
        if out is None:
            return res
        return out.add_(res)

    def combine(self, rows, coeffs, out=None, out_dtype=None):
        _checks.combine(rows, coeffs, out, out_dtype)
        vec = coeffs.dim() == 1
        c2 = (coeffs if coeffs.dim() == 2 else coeffs.unsqueeze(1)).to(torch.float64)
        dtype = _checks.combine_dtype(rows, out, out_dtype)
        res = torch.empty(rows.shape[1], c2.shape[1], dtype=dtype, device=rows.device)
        if rows.shape[0] == 0:
            res.zero_()
        for c0, c1, tile in self._tiles(rows):
            res[c0:c1] = tile.t() @ c2
        res = res.squeeze(1) if vec else res
        if out is None:
            return res
        return out.copy_(res)

    def gram(self, rows, out=None):
        _checks.gram(rows, out)
        m = rows.shape[0]
        res = torch.zeros(m, m, dtype=torch.float64, device=rows.device) if out is None else out
        for _, _, tile in self._tiles(rows):
            res += tile @ tile.t()
        return res
