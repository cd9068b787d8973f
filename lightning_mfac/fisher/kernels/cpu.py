"""Fused CPU window passes (numba): one read of the stored window, float64 accumulation.

A window pass is bound by memory bandwidth, so the only way to accumulate in float64 at the cost of a
float32 GEMV is to never materialize a float64 copy of the window: each stored value (float32,
bfloat16 or float64) is widened to float64 in a register, multiplied and summed there.

* bfloat16 has no numpy dtype: the window is handed over as its raw 16-bit patterns and widened from
  its bits (a bfloat16 is the upper half of a float32), inside the loop.
* The window is handed over as one flat contiguous array plus its row stride ``ld`` (BLAS style), so
  that a column-slice view of a bigger window costs nothing and the inner loops are unit-stride, which
  lets LLVM vectorize them.
* ``dots`` (``G x``) sweeps a column tile of ``x`` (kept in L2) across 8 rows at a time, each with its
  own float64 sum; ``combine`` (``Gᵀ c``) keeps float64 accumulators for one column tile (in L2)
  and adds 8 rows per sweep into them (one load and store of an accumulator per 8 values read).
* The *column-block* passes (``block_dots``/``block_combine``: a block-diagonal Fisher, each block
  of ``B`` consecutive columns with its own ``x`` sums or coefficients) run the vector passes over
  every block inside one compiled call; ``block_woodbury`` (the whole blocked static ``mul``)
  goes block after block through ``dots``, the two ``m × m`` triangular solves and ``combine``,
  so each block is read from memory once and re-read from cache.
* The block forms (``x`` or ``c`` with ``k`` columns) reuse each row tile from L1 for the ``k``
  columns: exact and bounded like the vector forms, but not tuned (measured 1.2–11× a float32 GEMM
  at k = 4–16, d = 1e6); the dynamic step and the static ``mul`` of one vector use the vector forms.
* ``gram`` (``G Gᵀ``) does ``m`` multiply-adds per value read, so it is bound by arithmetic, not by
  reading the window: a bounded column tile is widened into a float64 buffer here and multiplied
  with float64 BLAS (``torch.addmm``), which a hand-written loop would not beat.

Single-threaded and deterministic: the summation order depends only on the shapes. Reassociation is
allowed inside a tile (``fastmath={"reassoc", "contract"}``) so that the reductions vectorize; NaN
and infinity still propagate (no ``nnan``/``ninf``). Compiled on first use and cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from lightning_mfac.fisher.kernels import _checks
from lightning_mfac.fisher.kernels.reference import TorchKernels, mirror_upper_

_FASTMATH = {"reassoc", "contract"}
_JIT = {"cache": True, "nogil": True, "fastmath": _FASTMATH, "error_model": "numpy"}

#: Columns per sweep in ``dots`` and ``combine``. A tile's ``x`` values (``dots``, at most 256 KiB) or
#: float64 accumulators (``combine``, 256 KiB) stay in L2, and each of the 8 rows of a sweep is read
#: as one contiguous 128 KiB run: long runs are what the hardware prefetcher needs to stream a row at
#: full bandwidth. Measured on one core (AMD EPYC, float32 window, m = 32 and 256, d = 4e5 to
#: 1.2e7): 32768 columns read 1.2-1.6x faster than 2048 (``dots``) or 4096 (``combine``), on a par
#: with or faster than ``torch.mv``; 65536 gains nothing more.
DOTS_TILE = 32768
COMBINE_TILE = 32768
#: The block forms (``k`` columns of ``x`` or ``c``) re-read each row tile ``k`` times, so their tiles
#: stay small enough for L1: 2048 values of a row (``dots``), 4096 accumulators over the ``k``
#: columns (``combine``).
MAT_DOTS_TILE = 2048
MAT_COMBINE_TILE = 4096
#: Float64 elements of the widened tile in ``gram`` for small windows (2 MiB) ...
GRAM_TILE_ELEMS = 1 << 18
#: ... and at most this many tiles for large ones: the op count stays bounded whatever ``n`` (one
#: ``addmm`` per tile), while a tile stays a small fraction of the window (8 bytes per value over 64
#: tiles: 3 % of a float32 window, 6 % of a bfloat16 one).
GRAM_MAX_TILES = 64


@intrinsic
def _bf16_bits_to_f64(typingctx, bits):
    """The float64 value of the bfloat16 whose 16 bits are ``bits`` (an int16): zero-extend, shift
    into the upper half of a float32, reinterpret, widen. Exact, and all in registers."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        raise TypingError("_bf16_bits_to_f64 expects a 16-bit integer")

    def codegen(context, builder, signature, args):
        word = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.fpext(builder.bitcast(word, ir.FloatType()), ir.DoubleType())

    return types.float64(bits), codegen


def _widen(v):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(_widen, inline="always")
def _widen_impl(v):
    if isinstance(v, types.Integer) and v.bitwidth == 16:
        return lambda v: _bf16_bits_to_f64(v)
    if isinstance(v, types.Float):
        return lambda v: np.float64(v)
    return None


# Every inner loop runs over a slice starting at 0: numba then knows the index is non-negative and drops
# its wrap-around handling, which is what lets LLVM vectorize the loop (3x faster when it cannot).


@numba.njit(**_JIT)
def _dots_vec(g, ld, m, n, x, out):
    """``out[r] += Σ_j g[r·ld + j] · x[j]`` for ``r < m``, ``j < n``: 8 rows per sweep of an ``x`` tile."""
    for c0 in range(0, n, DOTS_TILE):
        w = min(DOTS_TILE, n - c0)
        xs = x[c0 : c0 + w]
        r = 0
        while r + 8 <= m:
            b = r * ld + c0
            g0 = g[b : b + w]
            g1 = g[b + ld : b + ld + w]
            g2 = g[b + 2 * ld : b + 2 * ld + w]
            g3 = g[b + 3 * ld : b + 3 * ld + w]
            g4 = g[b + 4 * ld : b + 4 * ld + w]
            g5 = g[b + 5 * ld : b + 5 * ld + w]
            g6 = g[b + 6 * ld : b + 6 * ld + w]
            g7 = g[b + 7 * ld : b + 7 * ld + w]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
            for j in range(w):
                xj = np.float64(xs[j])
                s0 += _widen(g0[j]) * xj
                s1 += _widen(g1[j]) * xj
                s2 += _widen(g2[j]) * xj
                s3 += _widen(g3[j]) * xj
                s4 += _widen(g4[j]) * xj
                s5 += _widen(g5[j]) * xj
                s6 += _widen(g6[j]) * xj
                s7 += _widen(g7[j]) * xj
            out[r] += s0
            out[r + 1] += s1
            out[r + 2] += s2
            out[r + 3] += s3
            out[r + 4] += s4
            out[r + 5] += s5
            out[r + 6] += s6
            out[r + 7] += s7
            r += 8
        while r < m:
            b = r * ld + c0
            g0 = g[b : b + w]
            s0 = 0.0
            for j in range(w):
                s0 += _widen(g0[j]) * np.float64(xs[j])
            out[r] += s0
            r += 1


@numba.njit(**_JIT)
def _dots_mat(g, ld, m, n, xt, out):
    """``out[r, i] += Σ_j g[r·ld + j] · xt[i, j]`` (``xt`` is ``xᵀ``, ``(k, n)`` contiguous float64)."""
    k = xt.shape[0]
    for c0 in range(0, n, MAT_DOTS_TILE):
        w = min(MAT_DOTS_TILE, n - c0)
        for r in range(m):
            b = r * ld + c0
            g0 = g[b : b + w]
            for i in range(k):
                xs = xt[i, c0 : c0 + w]
                s = 0.0
                for j in range(w):
                    s += _widen(g0[j]) * xs[j]
                out[r, i] += s


@numba.njit(**_JIT)
def _combine_vec(g, ld, m, n, c, out, acc):
    """``out[j] = Σ_r g[r·ld + j] · c[r]``: float64 accumulators (``acc``, ``COMBINE_TILE`` of them)
    for a column tile, 8 rows added per sweep, rounded once to ``out``'s dtype."""
    _combine_vec_affine(g, ld, m, n, c, out, acc, acc[:0], 1.0)


@numba.njit(**_JIT)
def _combine_vec_affine(g, ld, m, n, c, out, acc, start, scale):
    """``out[j] = (start[j] + Σ_r g[r·ld + j] · c[r]) · scale`` (``start`` empty: zero): the combine
    with the Woodbury step's subtraction and scaling folded into its one store."""
    for c0 in range(0, n, COMBINE_TILE):
        w = min(COMBINE_TILE, n - c0)
        a = acc[:w]
        if start.shape[0]:
            st = start[c0 : c0 + w]
            for j in range(w):
                a[j] = st[j]
        else:
            for j in range(w):
                a[j] = 0.0
        r = 0
        while r + 8 <= m:
            b = r * ld + c0
            g0 = g[b : b + w]
            g1 = g[b + ld : b + ld + w]
            g2 = g[b + 2 * ld : b + 2 * ld + w]
            g3 = g[b + 3 * ld : b + 3 * ld + w]
            g4 = g[b + 4 * ld : b + 4 * ld + w]
            g5 = g[b + 5 * ld : b + 5 * ld + w]
            g6 = g[b + 6 * ld : b + 6 * ld + w]
            g7 = g[b + 7 * ld : b + 7 * ld + w]
            k0, k1, k2, k3 = c[r], c[r + 1], c[r + 2], c[r + 3]
            k4, k5, k6, k7 = c[r + 4], c[r + 5], c[r + 6], c[r + 7]
            for j in range(w):
                a[j] += (
                    _widen(g0[j]) * k0 + _widen(g1[j]) * k1 + _widen(g2[j]) * k2 + _widen(g3[j]) * k3
                ) + (_widen(g4[j]) * k4 + _widen(g5[j]) * k5 + _widen(g6[j]) * k6 + _widen(g7[j]) * k7)
            r += 8
        while r < m:
            b = r * ld + c0
            g0 = g[b : b + w]
            k0 = c[r]
            for j in range(w):
                a[j] += _widen(g0[j]) * k0
            r += 1
        o = out[c0 : c0 + w]
        for j in range(w):
            o[j] = a[j] * scale


@numba.njit(**_JIT)
def _block_dots_vec(g, ld, m, n, block, x, out):
    """``out[b, r] += Σ_{j in block b} g[r·ld + j] · x[j]``: ``dots`` restricted to each block of
    ``block`` columns, all blocks in one call."""
    for c0 in range(0, n, block):
        w = min(block, n - c0)
        _dots_vec(g[c0:], ld, m, w, x[c0 : c0 + w], out[c0 // block])


@numba.njit(**_JIT)
def _block_combine_vec(g, ld, m, n, block, c, out):
    """``out[j] = Σ_r g[r·ld + j] · c[b(j), r]`` with ``b(j) = j // block``: each block combined
    with its own coefficients, all blocks in one call."""
    acc = np.empty(COMBINE_TILE, dtype=np.float64)
    for c0 in range(0, n, block):
        w = min(block, n - c0)
        _combine_vec(g[c0:], ld, m, w, c[c0 // block], out[c0 : c0 + w], acc)


@numba.njit(**_JIT)
def _block_woodbury_vec(g, ld, m, n, block, x, factor, damp, out):
    """``out_b = (x_b − G_bᵀ (L_b L_bᵀ)⁻¹ G_b x_b) / λ`` for every block ``b`` of ``block`` columns,
    block after block: the block's rows are read from memory by ``dots`` and re-read from cache by
    ``combine`` (a block of ``m × B`` values that fits in L2 costs one read of the window)."""
    acc = np.empty(COMBINE_TILE, dtype=np.float64)
    u = np.empty(m, dtype=np.float64)
    neg_x = np.empty(min(block, n), dtype=np.float64)
    scale = -1.0 / damp  # (−x + Gᵀc)·(−1/λ), as the reference path: no division per value
    for c0 in range(0, n, block):
        w = min(block, n - c0)
        lf = factor[c0 // block]
        for r in range(m):
            u[r] = 0.0
        xs = x[c0 : c0 + w]
        _dots_vec(g[c0:], ld, m, w, xs, u)
        for i in range(m):  # L y = u
            s = u[i]
            row = lf[i]
            for j in range(i):
                s -= row[j] * u[j]
            u[i] = s / row[i]
        for i in range(m - 1, -1, -1):  # Lᵀ c = y, by rows of L (contiguous, vectorizes)
            ci = u[i] / lf[i, i]
            u[i] = ci
            row = lf[i]
            for j in range(i):
                u[j] -= row[j] * ci
        nx = neg_x[:w]
        for j in range(w):
            nx[j] = -np.float64(xs[j])
        _combine_vec_affine(g[c0:], ld, m, w, u, out[c0 : c0 + w], acc, nx, scale)


@numba.njit(**_JIT)
def _combine_mat(g, ld, m, n, c, out):
    """``out[j, i] = Σ_r g[r·ld + j] · c[r, i]`` (``c`` is ``(m, k)``, ``out`` is ``(n, k)``)."""
    k = c.shape[1]
    tile = max(1, MAT_COMBINE_TILE // k)
    acc = np.empty((k, tile), dtype=np.float64)
    for c0 in range(0, n, tile):
        w = min(tile, n - c0)
        for i in range(k):
            a = acc[i, :w]
            for j in range(w):
                a[j] = 0.0
        for r in range(m):
            b = r * ld + c0
            g0 = g[b : b + w]
            for i in range(k):
                a = acc[i, :w]
                k0 = c[r, i]
                for j in range(w):
                    a[j] += _widen(g0[j]) * k0
        for j in range(w):
            for i in range(k):
                out[c0 + j, i] = acc[i, j]


@numba.njit(**_JIT)
def _widen_tile(g, ld, m, c0, w, buf):
    """``buf[r, j] = float64(g[r·ld + c0 + j])`` for a ``(m, w)`` tile."""
    for r in range(m):
        b = r * ld + c0
        g0 = g[b : b + w]
        dst = buf[r, :w]
        for j in range(w):
            dst[j] = _widen(g0[j])


def _np(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (one ``detach`` in torch's dispatcher, no copy)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _flat(rows: torch.Tensor) -> tuple[np.ndarray, int] | None:
    """``rows`` (non-empty) as one flat contiguous numpy array plus its row stride, or ``None`` when
    its columns are not unit-stride (then the caller takes the reference path). The flat view is
    made by numpy, so the hand-over costs one or two torch ops whatever the shape (the engine's
    step counts them)."""
    m, n = rows.shape
    ld = rows.stride(0) if m > 1 else n
    if (rows.stride(1) != 1 and n > 1) or ld < n or rows.device.type != "cpu":
        return None
    arr = _np(rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows)
    return np.lib.stride_tricks.as_strided(arr, shape=((m - 1) * ld + n,), strides=(arr.itemsize,)), ld


def _f64_out(out: torch.Tensor | None, shape: tuple[int, ...], device) -> tuple[torch.Tensor, bool]:
    """A float64 contiguous array to accumulate into: ``out`` itself when it is one."""
    if out is not None and out.dtype == torch.float64 and out.is_contiguous():
        return out, True
    return torch.zeros(shape, dtype=torch.float64, device=device), False


class CpuKernels:
    """The fused numba passes (see the module docstring)."""

    name = "cpu"

    def __init__(self) -> None:
        self._reference = TorchKernels()

    def dots(self, rows, x, out=None):
        _checks.dots(rows, x, out)
        flat = _flat(rows) if rows.numel() else None
        if flat is None:
            return self._reference.dots(rows, x, out)
        g, ld = flat
        m, n = rows.shape
        vec = x.dim() == 1
        shape = (m,) if vec else (m, x.shape[1])
        acc, inplace = _f64_out(out, shape, rows.device)
        if vec:
            xv = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float64)
            _dots_vec(g, ld, m, n, _np(xv.contiguous()), _np(acc))
        else:
            _dots_mat(g, ld, m, n, _np(x.t().to(torch.float64).contiguous()), _np(acc))
        if out is None or inplace:
            return acc
        return out.add_(acc)

    def combine(self, rows, coeffs, out=None, out_dtype=None):
        _checks.combine(rows, coeffs, out, out_dtype)
        flat = _flat(rows) if rows.numel() else None
        if flat is None:
            return self._reference.combine(rows, coeffs, out, out_dtype)
        g, ld = flat
        m, n = rows.shape
        vec = coeffs.dim() == 1
        shape = (n,) if vec else (n, coeffs.shape[1])
        dtype = _checks.combine_dtype(rows, out, out_dtype)
        direct = dtype in (torch.float32, torch.float64)
        if out is not None and out.dtype == dtype and direct and out.is_contiguous():
            res = out
        else:
            res = torch.empty(shape, dtype=dtype if direct else torch.float32, device=rows.device)
        c = _np(coeffs.to(torch.float64).contiguous())
        if vec:
            _combine_vec(g, ld, m, n, c, _np(res), np.empty(COMBINE_TILE, dtype=np.float64))
        else:
            _combine_mat(g, ld, m, n, c, _np(res))
        if res is out:
            return out
        if out is not None:
            return out.copy_(res)
        return res if direct else res.to(dtype)

    def block_dots(self, rows, x, block):
        nblocks = _checks.block_dots(rows, x, block)
        flat = _flat(rows) if rows.numel() else None
        if flat is None:
            return self._reference.block_dots(rows, x, block)
        g, ld = flat
        m, n = rows.shape
        res = torch.zeros(nblocks, m, dtype=torch.float64, device=rows.device)
        xv = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float64)
        _block_dots_vec(g, ld, m, n, block, _np(xv.contiguous()), _np(res))
        return res

    def block_combine(self, rows, coeffs, block, out_dtype=None):
        _checks.block_combine(rows, coeffs, block, out_dtype)
        flat = _flat(rows) if rows.numel() else None
        if flat is None:
            return self._reference.block_combine(rows, coeffs, block, out_dtype)
        g, ld = flat
        m, n = rows.shape
        dtype = out_dtype or _checks.default_out_dtype(rows.dtype)
        direct = dtype in (torch.float32, torch.float64)
        res = torch.empty(n, dtype=dtype if direct else torch.float32, device=rows.device)
        c = _np(coeffs.to(torch.float64).contiguous())
        _block_combine_vec(g, ld, m, n, block, c, _np(res))
        return res if direct else res.to(dtype)

    def block_woodbury(self, rows, x, block, factor, damp, out=None):
        _checks.block_woodbury(rows, x, block, factor, damp, out)
        flat = _flat(rows) if rows.numel() else None
        if flat is None:
            return self._reference.block_woodbury(rows, x, block, factor, damp, out)
        g, ld = flat
        m, n = rows.shape
        res = out if out is not None and out.is_contiguous() else torch.empty(n, dtype=torch.float64)
        _block_woodbury_vec(
            g, ld, m, n, block, _np(x.to(torch.float64).contiguous()), _np(factor.contiguous()), float(damp), _np(res)
        )
        return res if out is None or res is out else out.copy_(res)

    def gram(self, rows, out=None):
        _checks.gram(rows, out)
        m, n = rows.shape
        res = torch.zeros(m, m, dtype=torch.float64, device=rows.device) if out is None else out
        if rows.dtype == torch.float64:
            # Nothing to widen: BLAS reads the (strided) window in place.
            return mirror_upper_(res.addmm_(rows, rows.t())) if n else res
        flat = _flat(rows) if rows.numel() else None
        if flat is None:
            return self._reference.gram(rows, res)
        g, ld = flat
        cols = min(n, max(GRAM_TILE_ELEMS // m, -(-n // GRAM_MAX_TILES)))
        buf = torch.empty(m * cols, dtype=torch.float64)
        view = _np(buf)
        for c0 in range(0, n, cols):
            w = min(cols, n - c0)
            tile = buf[: m * w].view(m, w)
            _widen_tile(g, ld, m, c0, w, view[: m * w].reshape(m, w))
            res.addmm_(tile, tile.t())
        return mirror_upper_(res)
