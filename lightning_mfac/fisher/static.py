"""Static M-FAC: the inverse empirical Fisher of a fixed set of ``m`` gradients (for OBS pruning).

Frantar, Kurtic & Alistarh, NeurIPS 2021, Section 3 (the static algorithm), computed in the
Gram/Cholesky form of DESIGN.md instead of the paper's ``m`` sequential rank-one steps:

    K = G Gᵀ,   S = m·λ·I + K = L Lᵀ,   Q = L⁻¹ G,
    F⁻¹x = (x − Qᵀ(Q x)) / λ,   diag(F⁻¹) = (1 − Σₖ Qₖ²) / λ,   [F⁻¹]ᵢⱼ = (δᵢⱼ − Q₍:,ᵢ₎·Q₍:,ⱼ₎) / λ.

With ``block_size=B`` F is block-diagonal over consecutive blocks of ``B`` coordinates (the last
one may be shorter). Blocks with ``B > m`` use the same Woodbury form per block (a batch of
``m × m`` factors); blocks with ``B ≤ m`` are inverted directly as ``B × B`` matrices, batched.

All factorizations and solves run in float64, one column page at a time; the diagonal is taken
from the float64 ``Q`` page before it is stored, so it is exact even when ``Q`` is kept in float32
(``1 − ΣQ²`` cancels badly for high-curvature coordinates). Gradients in CPU memory with a CUDA
``device`` are paged: copied to page-major (pinned) host memory and streamed to the GPU, the
Gram accumulated and the triangular solve done page by page, ``Q`` overwriting the host copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightning_mfac import _validation as check
from lightning_mfac.fisher._numerics import spd_cholesky, spd_inverse
from lightning_mfac.fisher.config import WindowConfig, reject_legacy_arguments
from lightning_mfac.fisher.storage import DeviceWindow, PagedWindow, WindowStorage, default_page_cols


class StaticFisherInverse:
    """Inverse of ``F = λ·I + (1/m)·Σᵢ gᵢgᵢᵀ`` built once from an ``(m, d)`` gradient matrix.

    Args:
        grads: ``(m, d)`` gradients, one per row.
        damp: dampening ``λ > 0``.
        block_size: ``None`` for the full ``d × d`` inverse, else the block size ``B ≥ 1``.
        device: compute device (default: that of ``grads``). CPU gradients with a CUDA device
            are paged.
        window: :class:`~lightning_mfac.fisher.config.WindowConfig` (or a mapping of its fields):
            ``dtype`` in which the gradients are kept (default float64 for float64 gradients, else
            float32) and ``page_cols``, the columns per page (rounded to whole blocks; default from
            free device memory). The diagonal is always exact float64.
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
        dtype, page_cols = self.config.dtype, self.config.page_cols
        check.float_tensor("grads", grads, (2,))
        m, d = grads.shape
        if m < 1 or d < 1:
            raise ValueError(
                f"grads has shape {(m, d)}: expected at least one gradient of at least one coordinate."
            )
        check.finite_tensor("grads", grads)
        self.damp = check.positive_float("damp", damp)
        self.ngrads, self.dim = m, d
        self.block_size = d if block_size is None else min(check.positive_int("block_size", block_size), d)
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype!r} is invalid: expected None, torch.float32 or torch.float64.")
        self.device = grads.device if device is None else torch.device(device)
        self.dtype = dtype or (torch.float64 if grads.dtype == torch.float64 else torch.float32)
        self.nblocks = math.ceil(d / self.block_size)
        # B ≤ m: a B × B block is cheaper to invert directly than through an m × m Woodbury factor.
        self.direct = block_size is not None and self.block_size <= m
        self.paged = grads.device.type == "cpu" and self.device.type == "cuda"
        self.page_cols = self._page_cols(page_cols)
        self._diag = torch.empty(d, dtype=torch.float64, device=self.device)
        grads = grads.detach()
        if self.direct:
            self._build_direct(grads)
        else:
            self._build_woodbury(grads)

    # ------------------------------------------------------------------ construction
    def _page_cols(self, page_cols: int | None) -> int:
        b = self.block_size
        if page_cols is None:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            # Each page column is also held as float64 work copies (page and its solve).
            page_cols = default_page_cols(self.ngrads, itemsize + 8, self.device, None)
        if b == self.dim and not self.direct:
            return max(1, min(page_cols, self.dim))
        # A page holds whole blocks so that each block's Gram and solve happen in one page.
        return max(1, page_cols // b) * b

    def _source(self, grads: torch.Tensor) -> WindowStorage:
        if self.paged:
            store = PagedWindow(self.ngrads, self.dim, self.dtype, self.device, page_cols=self.page_cols)
            for p in range(store.npages):
                c0, c1 = store._bounds(p)
                store.host[p, :, : c1 - c0] = grads[:, c0:c1]
            return store
        store = DeviceWindow.__new__(DeviceWindow)
        store.rows, store.dim, store.dtype, store.device = self.ngrads, self.dim, self.dtype, self.device
        store.data = grads.to(self.device)
        return _ColumnPages(store, self.page_cols)

    def _blocks_of(self, c0: int, page: torch.Tensor) -> tuple[int, torch.Tensor]:
        """First block index and the page as float64 ``(nb, m, w)`` blocks (the last one zero-padded)."""
        if self.block_size == self.dim and not self.direct:
            return 0, page.to(torch.float64).unsqueeze(0)
        b = self.block_size
        width = page.shape[1]
        pad = (-width) % b
        page64 = F.pad(page.to(torch.float64), (0, pad))
        return c0 // b, page64.unflatten(1, (-1, b)).transpose(0, 1)

    def _build_woodbury(self, grads: torch.Tensor) -> None:
        m, lam = self.ngrads, self.damp
        store = self._source(grads)
        gram = torch.zeros(self.nblocks, m, m, dtype=torch.float64, device=self.device)
        for c0, _, page in store.pages():
            b0, blocks = self._blocks_of(c0, page)
            gram[b0 : b0 + blocks.shape[0]] += blocks @ blocks.transpose(1, 2)
        eye = torch.eye(m, dtype=torch.float64, device=self.device)
        self._chol = spd_cholesky(gram + m * lam * eye, m * lam)
        if self.paged:
            q_store = store
        else:
            q_store = DeviceWindow(m, self.dim, self.dtype, self.device)
        for c0, c1, page in store.pages():
            b0, blocks = self._blocks_of(c0, page)
            q = torch.linalg.solve_triangular(self._chol[b0 : b0 + blocks.shape[0]], blocks, upper=False)
            q = q.transpose(0, 1).flatten(1)[:, : c1 - c0]
            self._diag[c0:c1] = (1.0 - (q * q).sum(0)) / lam
            self._write(q_store, c0, c1, q)
        self._q = q_store if self.paged else _ColumnPages(q_store, self.page_cols)

    def _write(self, store: WindowStorage, c0: int, c1: int, q: torch.Tensor) -> None:
        if isinstance(store, PagedWindow):
            store.host[c0 // store.page_cols, :, : c1 - c0] = q.to("cpu", self.dtype)
        else:
            store.data[:, c0:c1] = q

    def _build_direct(self, grads: torch.Tensor) -> None:
        m, lam, b = self.ngrads, self.damp, self.block_size
        store = self._source(grads)
        self._inv = torch.empty(self.nblocks, b, b, dtype=self.dtype, device=self.device)
        eye = torch.eye(b, dtype=torch.float64, device=self.device)
        for c0, c1, page in store.pages():
            b0, blocks = self._blocks_of(c0, page)
            fisher = lam * eye + blocks.transpose(1, 2) @ blocks / m
            inv = spd_inverse(fisher, lam)
            self._inv[b0 : b0 + inv.shape[0]] = inv.to(self.dtype)
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
        check.finite_tensor("x", x)
        cols = (x if x.dim() == 2 else x.unsqueeze(1)).to(self.device, torch.float64)
        out = self._mul_direct(cols) if self.direct else self._mul_woodbury(cols)
        return out.reshape(x.shape)

    def _mul_direct(self, x: torch.Tensor) -> torch.Tensor:
        b, k = self.block_size, x.shape[1]
        padded = F.pad(x, (0, 0, 0, self.nblocks * b - self.dim)).view(self.nblocks, b, k)
        out = self._inv.to(torch.float64) @ padded
        return out.reshape(-1, k)[: self.dim]

    def _mul_woodbury(self, x: torch.Tensor) -> torch.Tensor:
        m, k = self.ngrads, x.shape[1]
        qx = torch.zeros(self.nblocks, m, k, dtype=torch.float64, device=self.device)
        for c0, _, page in self._q.pages():
            b0, blocks = self._blocks_of(c0, page)
            xb = self._x_blocks(c0, x, blocks.shape)
            qx[b0 : b0 + blocks.shape[0]] += blocks @ xb
        out = torch.empty_like(x)
        for c0, c1, page in self._q.pages():
            b0, blocks = self._blocks_of(c0, page)
            back = blocks.transpose(1, 2) @ qx[b0 : b0 + blocks.shape[0]]
            out[c0:c1] = back.reshape(-1, k)[: c1 - c0]
        return (x - out) / self.damp

    def _x_blocks(self, c0: int, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        nb, _, w = shape
        seg = x[c0 : c0 + nb * w]
        seg = F.pad(seg, (0, 0, 0, nb * w - seg.shape[0]))
        return seg.view(nb, w, x.shape[1])

    def entry(self, i: int, j: int) -> float:
        """``[F⁻¹]ᵢⱼ`` in O(m)."""
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
        same = rows // b == cols // b
        out = torch.zeros(rows.shape, dtype=torch.float64, device=self.device)
        if self.direct:
            vals = self._inv[rows // b, rows % b, cols % b].to(torch.float64)
            out = torch.where(same, vals, out)
        else:
            qi = self._columns(rows)
            qj = self._columns(cols)
            vals = (rows == cols).to(torch.float64) - (qi * qj).sum(0)
            out = torch.where(same, vals / self.damp, out)
        diag = rows == cols
        out[diag] = self._diag[rows[diag]]
        return out

    def _columns(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self._q, PagedWindow):
            p, c = idx.cpu() // self._q.page_cols, idx.cpu() % self._q.page_cols
            return self._q.host[p, :, c].t().to(self.device, torch.float64)
        return self._q.store.data[:, idx].to(torch.float64)


class _ColumnPages(WindowStorage):
    """Column pages (views) of a window already on the compute device, so paged and unpaged
    constructions share one loop while float64 work copies stay within a page."""

    def __init__(self, store: DeviceWindow, page_cols: int) -> None:
        self.store, self.page_cols = store, page_cols
        self.rows, self.dim, self.dtype, self.device = store.rows, store.dim, store.dtype, store.device

    def pages(self):
        for c0 in range(0, self.dim, self.page_cols):
            c1 = min(self.dim, c0 + self.page_cols)
            yield c0, c1, self.store.data[:, c0:c1]
