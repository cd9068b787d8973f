"""Numerically careful building blocks shared by the static and dynamic inverse Fisher.

Two facts drive everything here (see DESIGN.md, "Numerics"):

* ``S = m·λ·I + G Gᵀ`` can be badly conditioned and ``F⁻¹x`` is a difference of nearly equal
  vectors, so the ``m × m`` algebra runs in float64 (it is tiny) and the dot products ``G x`` never
  run as long float32 sums -- the window is read once, at its own width. On the CPU each
  cache-sized column slab is widened to float64 and multiplied there (exact products, float64
  sums; faster than the batched float32 alternative on the CPU). On CUDA they are float32
  partial sums over column chunks combined in float64, with TF32 switched off for the call.
  Measured on real gradients (tests/test_fisher_accuracy.py): float32 sums over 4096-column
  chunks left 1e-5 relative error in ``F⁻¹g`` (through ``K``); exact float64 sums leave 2e-7.
* ``S ⪰ m·λ·I`` exactly, so a non-positive Cholesky pivot can only come from rounding; the
  fallback clamps the eigenvalues at that bound instead of failing or returning NaN.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

#: Columns per float32 partial sum (CUDA); 4096 keeps the float32 error at the rounding level of
#: one chunk while the float64 combination costs nothing next to the pass over the window.
DOT_CHUNK = 4096
#: Elements of the float64 work slab on the CPU (256 KiB): it stays in cache, and at torch's
#: parallel grain size the widening copy runs on the calling thread (an OpenMP hand-off per slab
#: was measured 5-10x slower on a busy 2-core machine).
SLAB_ELEMS = 1 << 15


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a window of ``dtype`` is multiplied: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked_dots(rows: torch.Tensor, x: torch.Tensor, chunk: int = DOT_CHUNK) -> torch.Tensor:
    """``rows @ x`` in float64: exact products summed in float64 on the CPU, float32 partial sums
    over column chunks combined in float64 on CUDA.

    ``rows`` is ``(m, n)`` in any float dtype, ``x`` is ``(n, k)``; returns ``(m, k)`` float64.
    """
    if rows.dtype == torch.float64:
        return rows @ x.to(torch.float64)
    if rows.device.type == "cpu":
        return _slab_dots(rows, x)
    with _ieee_fp32():
        return _chunk_dots(rows, x, chunk)


def _slab_dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    m, n = rows.shape
    cols = _slab_cols(m, n)
    buf = torch.empty(m * cols, dtype=torch.float64, device=rows.device)
    out = torch.zeros(m, x.shape[1], dtype=torch.float64, device=rows.device)
    for c0 in range(0, n, cols):
        w = min(cols, n - c0)
        slab = buf[: m * w].view(m, w)
        slab.copy_(rows[:, c0 : c0 + w])
        out.addmm_(slab, x[c0 : c0 + w].to(torch.float64))
    return out


def _slab_cols(m: int, n: int) -> int:
    return max(1, min(n, max(32, SLAB_ELEMS // max(1, m))))


@contextlib.contextmanager
def _ieee_fp32():
    """Full float32 CUDA matmuls for the duration: a user's ``set_float32_matmul_precision("high")``
    would otherwise turn the window products into TF32 (about 1e-3 relative error). Uses the
    per-backend flag, which overrides the global setting and is restored exactly."""
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision"):
        previous = flags.fp32_precision
        if previous == "ieee":
            yield
            return
        flags.fp32_precision = "ieee"
        try:
            yield
        finally:
            flags.fp32_precision = previous
    else:  # torch < 2.9: the legacy flag
        previous = flags.allow_tf32
        flags.allow_tf32 = False
        try:
            yield
        finally:
            flags.allow_tf32 = previous


def _chunk_dots(rows: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
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
    if rows.device.type == "cpu":
        return _slab_combine(rows, coeffs)
    with _ieee_fp32():
        return _split_combine(rows, coeffs, chunk)


def _slab_combine(rows: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """CPU: exact products and float64 sums, one cache-sized float64 slab at a time."""
    m, n = rows.shape
    cols = _slab_cols(m, n)
    c64 = coeffs.to(torch.float64)
    buf = torch.empty(m * cols, dtype=torch.float64, device=rows.device)
    out = torch.empty(n, coeffs.shape[1], dtype=torch.float32, device=rows.device)
    for c0 in range(0, n, cols):
        w = min(cols, n - c0)
        slab = buf[: m * w].view(m, w)
        slab.copy_(rows[:, c0 : c0 + w])
        out[c0 : c0 + w] = slab.t() @ c64
    return out


def _split_combine(rows: torch.Tensor, coeffs: torch.Tensor, chunk: int) -> torch.Tensor:
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
    is inverted through its eigendecomposition with eigenvalues clamped at ``floor`` (or at the
    rounding level of the matrix, where that is larger: see :func:`_clamped_eigh`).
    """
    factor, info = torch.linalg.cholesky_ex(s)
    bad = info != 0
    if bool(bad.any()):
        _warn_pivot()
        # A failed factor may hold a zero pivot, on which cholesky_inverse raises: invert a
        # placeholder there and overwrite it.
        factor[bad] = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    inv = torch.cholesky_inverse(factor)
    if bool(bad.any()):
        inv[bad] = _eig_inverse(s[bad], floor)
    if not bool(torch.isfinite(inv).all()):
        inv = _eig_inverse(s, floor)
    return inv


def spd_cholesky(s: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a batch of SPD float64 matrices, with the same fallback as
    :func:`spd_inverse`: a failing matrix is replaced by its clamped eigendecomposition
    ``V D Vᵀ``, whose triangular factor is taken from the QR decomposition of ``D^½ Vᵀ``
    (``Rᵀ R = V D Vᵀ``) -- a second Cholesky of the rebuilt matrix can fail again when the
    floor is below its rounding level."""
    factor, info = torch.linalg.cholesky_ex(s)
    bad = info != 0
    if bool(bad.any()):
        _warn_pivot()
        vals, vecs = _clamped_eigh(s[bad], floor)
        r = torch.linalg.qr(vals.sqrt().unsqueeze(-1) * vecs.transpose(-1, -2), mode="r").R
        # Rows of R flipped to a positive diagonal: still Rᵀ R = V D Vᵀ.
        sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
        factor[bad] = (sign.unsqueeze(-1) * r).transpose(-1, -2)
    return factor


def _warn_pivot() -> None:
    warn_once(
        "M-FAC: Cholesky factorization of the damped Gram matrix hit a non-positive pivot "
        "(rounding on a nearly singular window); falling back to an eigendecomposition with "
        "eigenvalues clamped at the dampening bound."
    )


def _floor_like(floor: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(floor, dtype=like.dtype, device=like.device)
    return f.reshape(f.shape + (1,)) if f.dim() else f


def _clamped_eigh(s: torch.Tensor, floor: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition with the eigenvalues clamped at ``floor``, or at ``n·ε·max|eig|`` where
    that is larger: below it an eigenvalue is rounding noise, and ``1/floor`` for a ``floor`` of
    say 1e-30 would only amplify that noise (the eigenvector carries no gradient energy there)."""
    vals, vecs = torch.linalg.eigh(s)
    n = s.shape[-1]
    noise = n * torch.finfo(s.dtype).eps * vals.abs().amax(-1, keepdim=True)
    lower = torch.maximum(_floor_like(floor, s).expand_as(noise), noise)
    if not bool(torch.isfinite(vals).all()):
        raise FloatingPointError("M-FAC: the Gram matrix is not finite; cannot factor it.")
    return vals.clamp_min(lower), vecs


def _eig_inverse(s: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    vals, vecs = _clamped_eigh(s, floor)
    return (vecs / vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)
