"""Numerically careful building blocks shared by the static and dynamic inverse Fisher
(docs/design.md, "Numerics"): the ``m × m`` algebra runs in float64, and a factorization never
fails -- ``S ⪰ m·λ·I`` exactly, so a non-positive Cholesky pivot can only come from rounding, and
the fallback clamps the eigenvalues at that bound instead of failing or returning NaN. (The window
passes accumulate in float64 in ``fisher.kernels``.)
"""

from __future__ import annotations

import warnings

import torch

from lightning_mfac import _validation as check


def check_finite(name: str, x: torch.Tensor) -> None:
    """``ValueError`` naming ``name`` if ``x`` holds inf/NaN: one float64 sum (non-finite exactly
    when an entry is, short of a 1e308 overflow), the exact count only on the error path."""
    if not bool(torch.isfinite(x.sum(dtype=torch.float64))):
        check.finite_tensor(name, x)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a window of ``dtype`` is multiplied: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        inv[bad] = eig_inverse(s[bad], floor)
    if not bool(torch.isfinite(inv).all()):
        inv = eig_inverse(s, floor)
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


def eig_inverse(s: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """Inverse through the eigendecomposition, eigenvalues clamped at ``floor`` (the fallback)."""
    vals, vecs = _clamped_eigh(s, floor)
    return (vecs / vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)
