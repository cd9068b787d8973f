"""The three passes over an M-FAC gradient window, behind one interface.

Every pass reads the window ``rows`` (``m × n``, stored as float32, bfloat16 or float64) once, at its
own width, and accumulates in float64 (docs/design.md, "Numerics"):

* ``dots(rows, x)``      → ``rows @ x``          (``G x``), float64 ``(m,)`` or ``(m, k)``
* ``combine(rows, c)``   → ``rowsᵀ @ c``         (``Gᵀ c``), ``c`` float64; float64 accumulation,
  rounded once to ``out_dtype`` (default: float32 for float32/bfloat16 windows, float64 otherwise)
* ``gram(rows)``         → ``rows @ rowsᵀ``      (``K = G Gᵀ``), float64 ``(m, m)``
* ``block_dots(rows, x, B)``, ``block_combine(rows, c, B)`` → ``dots``/``combine`` restricted to each
  block of ``B`` consecutive columns (the block-diagonal static inverse): ``(nblocks, m)`` sums, and
  ``(n,)`` with the coefficients ``c[j // B]`` for column ``j``; vectors only, still one read of
  the window (one launch on Triton)
* ``block_woodbury(rows, x, B, L, λ)`` → ``(x_b − G_bᵀ (L_b L_bᵀ)⁻¹ G_b x_b)/λ`` per block: the blocked
  static ``mul``; fused block by block on the CPU (one read of the window), two block passes
  around batched triangular solves elsewhere

``out=`` accumulates (``out += …``) for ``dots``/``gram`` so that paged and sharded storages sum
page contributions without a temporary; ``combine`` writes into ``out``.

Implementations (``kernels=`` everywhere in the package):

* ``"torch"``  — plain reference (``reference.py``): float64 copies of bounded column tiles, then BLAS.
  Any device.
* ``"cpu"``    — fused CPU kernel (``cpu.py``, numba): widens each stored value in a register and
  accumulates in float64, at the speed of a float32 GEMV for ``dots``/``combine``.
* ``"triton"`` — Triton kernels (``triton_kernels.py``), one launch per pass whatever ``n``; on CPU
  tensors the same kernels run under the Triton interpreter (no ``TRITON_INTERPRET`` needed).
* ``"auto"``   — ``"triton"`` on CUDA, ``"cpu"`` on the CPU, the reference path elsewhere; when the
  chosen implementation's dependency (triton, numba) is missing, the reference path with one
  warning. Naming ``"cpu"`` or ``"triton"`` without it is an ImportError that says so.

Every implementation checks shapes and dtypes the same way (``_checks.py``: the error names the
parameter) and reads no tensor value on the host.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Protocol

import torch

from lightning_mfac.fisher.kernels._checks import WINDOW_DTYPES, default_out_dtype
from lightning_mfac.fisher.kernels.reference import TorchKernels

KERNELS = ("auto", "triton", "cpu", "torch")


class WindowKernels(Protocol):
    name: str

    def dots(self, rows: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def combine(
        self,
        rows: torch.Tensor,
        coeffs: torch.Tensor,
        out: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor: ...

    def gram(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def block_dots(self, rows: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor: ...

    def block_combine(
        self, rows: torch.Tensor, coeffs: torch.Tensor, block: int, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor: ...

    def block_woodbury(
        self,
        rows: torch.Tensor,
        x: torch.Tensor,
        block: int,
        factor: torch.Tensor,
        damp: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


__all__ = [
    "KERNELS",
    "WINDOW_DTYPES",
    "TorchKernels",
    "WindowKernels",
    "default_out_dtype",
    "resolve_kernels",
]

#: What each optional implementation needs, and the advice when it is missing.
_NEEDS = {
    "cpu": ("lightning_mfac.fisher.kernels.cpu", "CpuKernels", "numba", "install numba>=0.59"),
    "triton": (
        "lightning_mfac.fisher.kernels.triton_kernels",
        "TritonKernels",
        "triton",
        "triton ships with PyTorch's CUDA builds on Linux; install a matching triton",
    ),
}
_warned: set[str] = set()


def _optional(name: str, explicit: bool) -> WindowKernels:
    """The ``cpu`` or ``triton`` implementation; if its dependency is missing, a clear error when it
    was asked for by name, the reference path with one warning per process when ``"auto"`` chose it."""
    module, cls, dependency, advice = _NEEDS[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        if explicit:
            raise ImportError(
                f"kernels={name!r} needs {dependency}, which could not be imported ({exc}); {advice}, "
                "or choose kernels='torch' (the reference path)."
            ) from exc
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"kernels='auto' chose {name!r} but {dependency} could not be imported ({exc}); using the "
                f"slower reference path kernels='torch' ({advice}).",
                RuntimeWarning,
                stacklevel=3,
            )
        return TorchKernels()


def resolve_kernels(name: str, device: torch.device | str | None = None) -> WindowKernels:
    """The kernels called ``name`` (one of :data:`KERNELS`) for tensors on ``device`` (default: CPU)."""
    if name not in KERNELS:
        raise ValueError(
            f"kernels={name!r} is not supported: expected one of {', '.join(map(repr, KERNELS))}."
        )
    device = torch.device("cpu" if device is None else device)
    if name == "torch":
        return TorchKernels()
    if name == "auto":
        if device.type == "cuda":
            return _optional("triton", explicit=False)
        if device.type == "cpu":
            return _optional("cpu", explicit=False)
        return TorchKernels()  # any other accelerator: the portable reference path
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"kernels='cpu' runs on CPU tensors only, got device={device}.")
    if name == "triton" and device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"kernels='triton' runs on CUDA tensors (or CPU tensors, interpreted), got device={device}."
        )
    return _optional(name, explicit=True)
