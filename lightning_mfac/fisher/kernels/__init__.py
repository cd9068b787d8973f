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

from typing import Protocol

import torch

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


def default_out_dtype(window_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if window_dtype == torch.float64 else torch.float32


#: Float64 elements of one widened tile in the reference path (2 MiB): bounds its temporaries.
_TILE_ELEMS = 1 << 18


class TorchKernels:
    """Reference path: widen a bounded column tile to float64, multiply with BLAS."""

    name = "torch"

    def _tiles(self, rows: torch.Tensor):
        m, n = rows.shape
        cols = max(1, _TILE_ELEMS // max(m, 1))
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            yield c0, c1, rows[:, c0:c1].to(torch.float64)

    def dots(self, rows, x, out=None):
        vec = x.dim() == 1
        x2 = x.reshape(x.shape[0], -1)
        res = torch.zeros(rows.shape[0], x2.shape[1], dtype=torch.float64, device=rows.device)
        for c0, c1, tile in self._tiles(rows):
            res += tile @ x2[c0:c1].to(torch.float64)
        res = res.squeeze(1) if vec else res
        if out is None:
            return res
        return out.add_(res)

    def combine(self, rows, coeffs, out=None, out_dtype=None):
        vec = coeffs.dim() == 1
        c2 = coeffs.reshape(coeffs.shape[0], -1).to(torch.float64)
        dtype = out_dtype or (out.dtype if out is not None else default_out_dtype(rows.dtype))
        res = torch.empty(rows.shape[1], c2.shape[1], dtype=dtype, device=rows.device)
        for c0, c1, tile in self._tiles(rows):
            res[c0:c1] = tile.t() @ c2
        res = res.squeeze(1) if vec else res
        if out is None:
            return res
        return out.copy_(res)

    def gram(self, rows, out=None):
        m = rows.shape[0]
        res = torch.zeros(m, m, dtype=torch.float64, device=rows.device) if out is None else out
        for _, _, tile in self._tiles(rows):
            res += tile @ tile.t()
        return res


def resolve_kernels(name: str, device: torch.device | str | None = None) -> WindowKernels:
    """The kernels called ``name`` (one of :data:`KERNELS`) for tensors on ``device``."""
    if name not in KERNELS:
        raise ValueError(f"kernels={name!r} is not supported: expected one of {', '.join(map(repr, KERNELS))}.")
    # The fused CPU and Triton implementations are added by the engine work; until then every name
    # resolves to the reference path, which has the same contract.
    return TorchKernels()
