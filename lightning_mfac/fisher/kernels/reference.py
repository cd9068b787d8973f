"""Reference window passes in plain PyTorch: widen a bounded column tile to float64, multiply with
BLAS. Any device; the temporaries are bounded (one tile), whatever ``n``."""

from __future__ import annotations

import torch

from lightning_mfac.fisher.kernels import _checks

#: Float64 elements of one widened tile (2 MiB): bounds the temporaries.
TILE_ELEMS = 1 << 18


def two_pass_block_woodbury(kern, rows, x, block, factor, damp, out=None):
    """``block_woodbury`` as two column-block passes of ``kern`` around batched triangular solves
    (two reads of the window: the composition the Triton and reference paths use)."""
    _checks.block_woodbury(rows, x, block, factor, damp, out)
    u = kern.block_dots(rows, x, block)
    # Two batched triangular solves: 5x faster than a batched cholesky_solve on the CPU, whose
    # per-block LAPACK calls dominate when there are thousands of blocks.
    y = torch.linalg.solve_triangular(factor, u.unsqueeze(2), upper=False)
    c = torch.linalg.solve_triangular(factor.mT, y, upper=True).squeeze(2)
    res = kern.block_combine(rows, c, block, out_dtype=torch.float64).sub_(x).mul_(-1.0 / damp)
    return res if out is None else out.copy_(res)



def mirror_upper_(gram: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of ``gram`` onto its lower one, in place: a BLAS ``A @ A.T`` is
    symmetric only up to rounding on some CPUs (the two triangles are summed in different orders),
    and the Gram matrix must be exactly symmetric for its Cholesky factor and eigendecomposition
    to be the same on every machine."""
    lower = torch.tril_indices(gram.shape[0], gram.shape[1], -1, device=gram.device)
    gram[lower[0], lower[1]] = gram[lower[1], lower[0]]
    return gram

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

    def _block_tiles(self, rows: torch.Tensor, block: int):
        """``(b0, c0, c1, tile)``: whole blocks of columns as float64 ``(m, nb, block)`` tiles (the
        last block zero-padded), ``b0`` the first block's index."""
        m, n = rows.shape
        cols = max(1, TILE_ELEMS // max(m * block, 1)) * block
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            tile = torch.nn.functional.pad(rows[:, c0:c1].to(torch.float64), (0, (-(c1 - c0)) % block))
            yield c0 // block, c0, c1, tile.unflatten(1, (-1, block))

    def block_dots(self, rows, x, block):
        nblocks = _checks.block_dots(rows, x, block)
        res = torch.empty(nblocks, rows.shape[0], dtype=torch.float64, device=rows.device)
        for b0, c0, c1, tile in self._block_tiles(rows, block):
            seg = torch.nn.functional.pad(x[c0:c1].to(torch.float64), (0, tile.shape[1] * block - (c1 - c0)))
            res[b0 : b0 + tile.shape[1]] = torch.einsum("mbj,bj->bm", tile, seg.view(-1, block))
        return res

    def block_combine(self, rows, coeffs, block, out_dtype=None):
        _checks.block_combine(rows, coeffs, block, out_dtype)
        dtype = out_dtype or _checks.default_out_dtype(rows.dtype)
        res = torch.empty(rows.shape[1], dtype=dtype, device=rows.device)
        c64 = coeffs.to(torch.float64)
        for b0, c0, c1, tile in self._block_tiles(rows, block):
            part = torch.einsum("mbj,bm->bj", tile, c64[b0 : b0 + tile.shape[1]])
            res[c0:c1] = part.flatten()[: c1 - c0]
        return res

    def block_woodbury(self, rows, x, block, factor, damp, out=None):
        return two_pass_block_woodbury(self, rows, x, block, factor, damp, out)

    def gram(self, rows, out=None):
        _checks.gram(rows, out)
        m = rows.shape[0]
        res = torch.zeros(m, m, dtype=torch.float64, device=rows.device) if out is None else out
        for _, _, tile in self._tiles(rows):
            res += tile @ tile.t()
        return mirror_upper_(res)
