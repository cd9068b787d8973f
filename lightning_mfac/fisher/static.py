"""Static M-FAC: the inverse empirical Fisher of a fixed set of ``m`` gradients (for OBS pruning).

Frantar, Kurtic & Alistarh, NeurIPS 2021, Section 3 (the static algorithm), computed in the
Gram/Cholesky form of docs/design.md ("Static M-FAC") instead of the paper's ``m`` sequential
rank-one steps:

    S = m·λ·I + G Gᵀ = L Lᵀ,     F⁻¹x = (x − Gᵀ S⁻¹ (G x)) / λ,
    diag(F⁻¹)ᵢ = (1 − ‖L⁻¹gᵢ‖²) / λ,     [F⁻¹]ᵢⱼ = (δᵢⱼ − (L⁻¹gᵢ)·(L⁻¹gⱼ)) / λ,

with ``gᵢ`` the column ``i`` of ``G``. What is kept: ``G`` at its stored width (a reference to the
given gradients when they already have the window's dtype and device; pinned host pages when
paged) and the float64 ``m × m`` factor ``L`` -- no second ``m × d`` matrix. ``mul`` makes two
float64-accumulating passes over ``G`` (``fisher.kernels``); ``diag`` is taken once, column tile by
column tile, from float64 tiles of ``L⁻¹G``; ``entries`` solves with the columns it needs.

With ``block_size=B`` F is block-diagonal over consecutive blocks of ``B`` coordinates (the last
one may be shorter). Blocks with ``B > m`` use the same Woodbury form per block (a batch of
``m × m`` factors; ``mul`` of a vector is the storage's ``block_woodbury`` pass, fused block by
block on the CPU); blocks with ``B ≤ m`` are inverted directly as float64 ``B × B`` matrices
(their ``d·B`` entries replace ``G``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightning_mfac import _validation as check
from lightning_mfac.fisher._numerics import check_finite, spd_cholesky, spd_inverse
from lightning_mfac.fisher.config import WindowConfig, reject_legacy_arguments
from lightning_mfac.fisher.kernels import resolve_kernels
from lightning_mfac.fisher.storage import DeviceWindow, PagedWindow, WindowStorage, plan_storage

#: Bytes of one float64 work tile (a column tile of ``G`` widened, or of ``L⁻¹G``)...
TILE_BYTES = 16 << 20
#: ... and at most this fraction of the columns, so a tile stays a small part of any window.
TILE_FRACTION = 1 / 32


def default_tile_cols(m: int, d: int) -> int:
    return max(1, min(TILE_BYTES // (8 * m), math.ceil(d * TILE_FRACTION)))


class StaticFisherInverse:
    """Inverse of ``F = λ·I + (1/m)·Σᵢ gᵢgᵢᵀ`` built once from an ``(m, d)`` gradient matrix.

    Args:
        grads: ``(m, d)`` gradients, one per row.
        damp: dampening ``λ > 0``.
        block_size: ``None`` for the full ``d × d`` inverse, else the block size ``B ≥ 1``.
        device: compute device (default: that of ``grads``). CPU gradients with a CUDA device
            are paged (``storage="auto"``).
        window: :class:`~lightning_mfac.fisher.config.WindowConfig` (or a mapping of its fields):
            ``dtype`` in which ``G`` is kept (default float64 for float64 gradients, else float32;
            bfloat16 halves the memory and gives the inverse of the rounded gradients),
            ``storage`` (``"auto"``, ``"device"`` or ``"paged"``), ``page_cols`` (columns per tile,
            rounded to whole blocks) and ``kernels``.
    """

    def __init__(
        self,
        grads: torch.Tensor,
        damp: float = 1e-5,
        block_size: int | None = None,
        device: torch.device | str | None = None,
        *,
        window: WindowConfig | dict[str, Any] | None = None,
        **legacy: Any,
    ) -> None:
        reject_legacy_arguments("StaticFisherInverse", legacy)
        self.config = WindowConfig.coerce(window)
        check.float_tensor("grads", grads, (2,))
        m, d = grads.shape
        if m < 1 or d < 1:
            raise ValueError(
                f"grads has shape {(m, d)}: expected at least one gradient of at least one coordinate."
            )
        check_finite("grads", grads)
        self.damp = check.damping("damp", damp)
        self.ngrads, self.dim = m, d
        self.block_size = d if block_size is None else min(check.positive_int("block_size", block_size), d)
        if self.config.storage == "sharded":
            raise ValueError(
                "storage='sharded' is invalid for StaticFisherInverse: expected 'auto', 'device' or 'paged'."
            )
        self.device = grads.device if device is None else torch.device(device)
        self.dtype = self.config.resolved_dtype(grads.dtype)
        self.nblocks = math.ceil(d / self.block_size)
        # B ≤ m: a B × B block is cheaper to invert directly than through an m × m Woodbury factor.
        self.direct = block_size is not None and self.block_size <= m
        storage = plan_storage(self.config.storage, m, d, self.dtype, self.device, shardable=False, held_on=grads.device)
        self.paged = storage == "paged"
        self.page_cols = self._page_cols(self.config.page_cols)
        self.kernels = resolve_kernels(self.config.kernels, self.device)
        self._diag = torch.empty(d, dtype=torch.float64, device=self.device)
        grads = grads.detach()
        if self.paged:
            store: WindowStorage = PagedWindow.from_rows(
                grads.to(self.dtype), self.device, self.page_cols, self.kernels
            )
        else:
            store = DeviceWindow.wrap(
                grads.to(self.device, self.dtype), self.kernels, tile_cols=self.page_cols
            )
        if self.direct:
            self._build_direct(store)
            self._window = None
        else:
            self._window = store
            self._build_woodbury(store)

    # ------------------------------------------------------------------ construction
    def _page_cols(self, page_cols: int | None) -> int:
        b = self.block_size
        if page_cols is None:
            page_cols = default_tile_cols(self.ngrads, self.dim)
        if b == self.dim and not self.direct:
            return max(1, min(page_cols, self.dim))
        # A tile holds whole blocks so that each block's Gram and solve happen in one tile.
        return max(1, page_cols // b) * b

    @property
    def _full(self) -> bool:
        return self.block_size == self.dim and not self.direct

    def _blocks_of(self, c0: int, tile: torch.Tensor) -> tuple[int, torch.Tensor]:
        """First block index and the tile as float64 ``(nb, m, B)`` blocks (the last zero-padded)."""
        if self._full:
            return 0, tile.to(torch.float64).unsqueeze(0)
        b = self.block_size
        pad = (-tile.shape[1]) % b
        tile64 = F.pad(tile.to(torch.float64), (0, pad))
        return c0 // b, tile64.unflatten(1, (-1, b)).transpose(0, 1)

    def _build_woodbury(self, store: WindowStorage) -> None:
        m, lam = self.ngrads, self.damp
        eye = torch.eye(m, dtype=torch.float64, device=self.device)
        if self._full:
            gram = store.gram().unsqueeze(0)
        else:
            gram = torch.zeros(self.nblocks, m, m, dtype=torch.float64, device=self.device)
            for c0, _, tile in store.column_tiles():
                b0, blocks = self._blocks_of(c0, tile)
                gram[b0 : b0 + blocks.shape[0]] += blocks @ blocks.transpose(1, 2)
        # Row-major factors: the CPU kernel reads each block's factor in place.
        self._factor = spd_cholesky(gram + m * lam * eye, m * lam).contiguous()
        for c0, c1, tile in store.column_tiles():
            b0, blocks = self._blocks_of(c0, tile)
            q = torch.linalg.solve_triangular(self._factor[b0 : b0 + blocks.shape[0]], blocks, upper=False)
            # ‖L⁻¹gᵢ‖² from the float64 tile: exact where 1 − ‖·‖² cancels (high-curvature coordinates).
            sq = q.square_().sum(1).flatten()[: c1 - c0]
            self._diag[c0:c1] = (1.0 - sq) / lam
            del q, blocks

    def _build_direct(self, store: WindowStorage) -> None:
        m, lam, b = self.ngrads, self.damp, self.block_size
        self._block_inverse = torch.empty(self.nblocks, b, b, dtype=torch.float64, device=self.device)
        eye = torch.eye(b, dtype=torch.float64, device=self.device)
        for c0, c1, tile in store.column_tiles():
            b0, blocks = self._blocks_of(c0, tile)
            fisher = torch.baddbmm(lam * eye, blocks.transpose(1, 2), blocks, alpha=1.0 / m)
            inv = spd_inverse(fisher, lam)
            self._block_inverse[b0 : b0 + inv.shape[0]] = inv
            self._diag[c0:c1] = torch.diagonal(inv, dim1=1, dim2=2).flatten()[: c1 - c0]

    # ------------------------------------------------------------------ queries
    def diag(self) -> torch.Tensor:
        """``diag(F⁻¹)`` as a float64 ``(d,)`` tensor, exact to float64 rounding."""
        return self._diag.clone()

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ x`` for ``x`` of shape ``(d,)`` or ``(d, k)``; float64 result."""
        check.float_tensor("x", x, (1, 2))
        if x.shape[0] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected first dimension d={self.dim}.")
        check_finite("x", x)
        if self._full:  # the passes take (d,) or (d, k) as they are
            return self._mul_full(x.to(self.device, torch.float64))
        cols = (x if x.dim() == 2 else x.unsqueeze(1)).to(self.device, torch.float64)
        out = self._mul_direct(cols) if self.direct else self._mul_blocked(cols)
        return out.reshape(x.shape)

    def _mul_full(self, x: torch.Tensor) -> torch.Tensor:
        u = self._window.dots(x)
        c = torch.cholesky_solve(u.reshape(self.ngrads, -1), self._factor[0]).reshape(u.shape)
        out = self._window.combine(c, out_dtype=torch.float64)
        return out.sub_(x).mul_(-1.0 / self.damp)

    def _mul_blocked(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return self._mul_blocked_vector(x[:, 0]).unsqueeze(1)
        k = x.shape[1]
        out = torch.empty_like(x)
        for c0, c1, tile in self._window.column_tiles():
            b0, blocks = self._blocks_of(c0, tile)
            nb, _, w = blocks.shape
            seg = F.pad(x[c0:c1], (0, 0, 0, nb * w - (c1 - c0))).view(nb, w, k)
            c = torch.cholesky_solve(blocks @ seg, self._factor[b0 : b0 + nb])
            back = (blocks.transpose(1, 2) @ c).reshape(-1, k)[: c1 - c0]
            out[c0:c1] = (x[c0:c1] - back) / self.damp
        return out

    def _mul_blocked_vector(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's ``(x_b − G_bᵀ S_b⁻¹ G_b x_b)/λ`` through the storage's ``block_woodbury``:
        one float64-accumulating read of ``G`` per block on the CPU (fused kernel), two column-block
        passes around batched triangular solves on other devices (page by page when paged: pages
        hold whole blocks)."""
        return self._window.block_woodbury(x, self.block_size, self._factor, self.damp, torch.empty_like(x))

    def _mul_direct(self, x: torch.Tensor) -> torch.Tensor:
        b, k = self.block_size, x.shape[1]
        padded = F.pad(x, (0, 0, 0, self.nblocks * b - self.dim)).view(self.nblocks, b, k)
        return (self._block_inverse @ padded).reshape(-1, k)[: self.dim]

    def entry(self, i: int, j: int) -> float:
        """``[F⁻¹]ᵢⱼ`` in O(m²)."""
        return float(self.entries(torch.tensor([i]), torch.tensor([j]))[0])

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``[F⁻¹]`` at the index pairs ``(rows[k], cols[k])``, vectorized; float64 ``(n,)``."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        cols = torch.as_tensor(cols, dtype=torch.long, device=self.device).reshape(-1)
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols must have the same length, got {rows.numel()} and {cols.numel()}."
            )
        for name, idx in (("rows", rows), ("cols", cols)):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.dim):
                raise ValueError(f"{name} holds indices outside [0, {self.dim}).")
        b = self.block_size
        block = rows // b
        same = block == cols // b
        out = torch.zeros(rows.shape, dtype=torch.float64, device=self.device)
        if self.direct:
            vals = self._block_inverse[block, rows % b, cols % b]
            out = torch.where(same, vals, out)
        else:
            for blk in torch.unique(block[same]).tolist():
                sel = same & (block == blk)
                qi = self._solve_columns(blk, rows[sel])
                qj = self._solve_columns(blk, cols[sel])
                eq = (rows[sel] == cols[sel]).to(torch.float64)
                out[sel] = (eq - (qi * qj).sum(0)) / self.damp
        diag = rows == cols
        out[diag] = self._diag[rows[diag]]
        return out

    def _solve_columns(self, blk: int, idx: torch.Tensor) -> torch.Tensor:
        """``L_b⁻¹ gᵢ`` for the columns ``idx`` of block ``blk`` (float64 ``(m, n)``)."""
        return torch.linalg.solve_triangular(self._factor[blk], self._window.columns(idx), upper=False)
