"""Numerically careful building blocks shared by the static and dynamic inverse Fisher.

Two facts drive everything here (see DESIGN.md, "Numerics"):

* ``S = m·λ·I + G Gᵀ`` can be badly conditioned and ``F⁻¹x`` is a difference of nearly equal
  vectors, so the ``m × m`` algebra runs in float64 (it is tiny) and the dot products ``G x`` are
  float32 partial sums over column chunks combined in float64 -- the window is read once, at
  its own width, and the long sums never run in float32.
* ``S ⪰ m·λ·I`` exactly, so a non-positive Cholesky pivot can only come from rounding; the
  fallback clamps the eigenvalues at that bound instead of failing or returning NaN.
"""

from __future__ import annotations

import warnings

import torch

#: Columns per float32 partial sum; 4096 keeps the float32 error at the rounding level of one
#: chunk while the float64 combination costs nothing next to the pass over the window.
DOT_CHUNK = 4096


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a window of ``dtype`` is multiplied: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked_dots(rows: torch.Tensor, x: torch.Tensor, chunk: int = DOT_CHUNK) -> torch.Tensor:
    """``rows @ x`` in float64 from float32 partial sums over column chunks.

    ``rows`` is ``(m, n)`` in any float dtype, ``x`` is ``(n, k)``; returns ``(m, k)`` float64.
    """
    if rows.dtype == torch.float64:
        return rows @ x.to(torch.float64)
    m, n = rows.shape
    k = x.shape[1]
    x32 = x.to(torch.float32)
    if rows.dtype == torch.float32 and n >= 2 * chunk:
        # One strided batched GEMM over all full chunks: every chunk's sum stays a float32 partial.
        full = (n // chunk) * chunk
        parts = torch.bmm(
            rows[:, :full].unflatten(1, (n // chunk, chunk)).transpose(0, 1),
            x32[:full].unflatten(0, (n // chunk, chunk)),
        )
        out = parts.to(torch.float64).sum(0)
        if full < n:
            out += (rows[:, full:] @ x32[full:]).to(torch.float64)
        return out
    out = torch.zeros(m, k, dtype=torch.float64, device=rows.device)
    for c0 in range(0, n, chunk):
        # Narrow windows (bfloat16) are widened one chunk at a time: no full-size copy.
        block = rows[:, c0 : c0 + chunk].to(torch.float32)
        out += (block @ x32[c0 : c0 + chunk]).to(torch.float64)
    return out


def combine_rows(rows: torch.Tensor, coeffs: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``rowsᵀ @ coeffs`` as ``(n, k)`` in the compute dtype of ``rows``.

    ``coeffs`` (float64, ``(m, k)``) is split into a high and a low float32 part so that the
    float64 precision of the ``m × m`` solve is not rounded away before the pass over the window.
    """
    cdt = compute_dtype(rows.dtype)
    if cdt == torch.float64:
        return rows.t() @ coeffs.to(torch.float64)
    hi = coeffs.to(torch.float32)
    lo = (coeffs - hi.to(torch.float64)).to(torch.float32)
    both = torch.cat([hi, lo], dim=1)
    k = coeffs.shape[1]
    if rows.dtype == torch.float32:
        prod = rows.t() @ both
        return prod[:, :k] + prod[:, k:]
    n = rows.shape[1]
    out = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    for c0 in range(0, n, chunk):
        prod = rows[:, c0 : c0 + chunk].to(torch.float32).t() @ both
        out[c0 : c0 + chunk] = prod[:, :k] + prod[:, k:]
    return out


class _WarnOnce:
    """Emits each distinct message once per process: a fallback in a training loop must not spam."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self._seen:
            self._seen.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


warn_once = _WarnOnce()


def spd_inverse(s: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of symmetric positive-definite float64 matrices ``(..., n, n)``.

    ``floor`` is a known lower bound of the eigenvalues (``m·λ`` for ``S``, ``λ`` for a block
    of ``F``). Cholesky is tried first; a matrix whose factorization hits a non-positive pivot
    is inverted through its eigendecomposition with eigenvalues clamped at ``floor``.
    """
    factor, info = torch.linalg.cholesky_ex(s)
    inv = torch.cholesky_inverse(factor)
    bad = info != 0
    if bool(bad.any()):
        warn_once(
            "M-FAC: Cholesky factorization of the damped Gram matrix hit a non-positive pivot "
            "(rounding on a nearly singular window); falling back to an eigendecomposition with "
            "eigenvalues clamped at the dampening bound."
        )
        inv[bad] = _eig_inverse(s[bad], floor)
    if not bool(torch.isfinite(inv).all()):
        inv = _eig_inverse(s, floor)
    return inv


def spd_cholesky(s: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a batch of SPD float64 matrices, with the same fallback as
    :func:`spd_inverse`: a failing matrix is rebuilt from its clamped eigendecomposition and
    factored again (its eigenvalues are then ≥ ``floor`` by construction)."""
    factor, info = torch.linalg.cholesky_ex(s)
    bad = info != 0
    if bool(bad.any()):
        warn_once(
            "M-FAC: Cholesky factorization of the damped Gram matrix hit a non-positive pivot "
            "(rounding on a nearly singular window); falling back to an eigendecomposition with "
            "eigenvalues clamped at the dampening bound."
        )
        vals, vecs = torch.linalg.eigh(s[bad])
        vals = vals.clamp_min(_floor_like(floor, s[bad]))
        repaired = (vecs * vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)
        repaired = 0.5 * (repaired + repaired.transpose(-1, -2))
        fixed, info2 = torch.linalg.cholesky_ex(repaired)
        if bool((info2 != 0).any()):
            # Clamped eigenvalues keep the matrix ≥ floor·I; a second failure means non-finite input.
            raise FloatingPointError("M-FAC: Gram matrix is not finite; cannot factor it.")
        factor[bad] = fixed
    return factor


def _floor_like(floor: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(floor, dtype=like.dtype, device=like.device)
    return f.reshape(f.shape + (1,)) if f.dim() else f


def _eig_inverse(s: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    vals = vals.clamp_min(_floor_like(floor, s))
    return (vecs / vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)
