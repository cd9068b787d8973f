"""The three passes over an M-FAC gradient window, behind one interface.

Every pass reads the window ``rows`` (``m × n``, stored as float32, bfloat16 or float64) once, at its
own width, and accumulates in float64 (docs/design.md, "Numerics"):

* ``dots(rows, x)``      → ``rows @ x``          (``G x``), float64 ``(m,)`` or ``(m, k)``
* ``combine(rows, c)``   → ``rowsᵀ @ c``         (``Gᵀ c``), ``c`` float64; float64 accumulation,
  rounded once to ``out_dtype`` (default: float32 for float32/bfloat16 windows, float64 otherwise)
* ``gram(rows)``         → ``rows @ rowsᵀ``      (``K = G Gᵀ``), float64 ``(m, m)``

``out=`` accumulates (``out += …``) for ``dots``/``gram`` so that paged and sharded storages sum
page contributions without a temporary; ``combine`` writes into ``out``.

Implementations (``kernels=`` everywhere in the package):

* ``"torch"``  — plain reference: float64 copies of bounded column tiles, then BLAS. Any device.
* ``"cpu"``    — fused CPU kernel (widen in registers, float64 accumulators).
* ``"triton"`` — Triton kernels, one launch per pass whatever ``n``; on CPU tensors they run under the
  Triton interpreter (``TRITON_INTERPRET=1``).
* ``"auto"``   — ``"triton"`` on CUDA, ``"cpu"`` on the CPU.
"""

from __future__ import annotations

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


__all__ = [
    "KERNELS",
    "WINDOW_DTYPES",
    "TorchKernels",
    "WindowKernels",
    "default_out_dtype",
    "resolve_kernels",
]

_warned_no_numba = False


def _cpu_kernels(explicit: bool) -> WindowKernels:
    global _warned_no_numba
    try:
        from lightning_mfac.fisher.kernels.cpu import CpuKernels
    except ImportError as exc:
        if explicit:
            raise ImportError(
                f"kernels='cpu' needs numba, which could not be imported ({exc}); install numba>=0.59 "
                "or choose kernels='torch' (the reference path, about 2-3x slower on the CPU)."
            ) from exc
        if not _warned_no_numba:
            _warned_no_numba = True
            warnings.warn(
                f"kernels='auto' on the CPU: numba could not be imported ({exc}); using the slower "
                "reference path kernels='torch'. Install numba>=0.59 for the fused CPU kernel.",
                RuntimeWarning,
                stacklevel=3,
            )
        return TorchKernels()
    return CpuKernels()


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
            return _triton_kernels()
        if device.type == "cpu":
            return _cpu_kernels(explicit=False)
        return TorchKernels()  # any other accelerator: the portable reference path
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"kernels='cpu' runs on CPU tensors only, got device={device}.")
        return _cpu_kernels(explicit=True)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"kernels='triton' runs on CUDA tensors (or CPU tensors, interpreted), got device={device}."
        )
    return _triton_kernels()


def _triton_kernels() -> WindowKernels:
    from lightning_mfac.fisher.kernels.triton_kernels import TritonKernels

    return TritonKernels()
