"""The contract between an M-FAC algorithm and its ``m × d`` gradient window, and the window's
checkpoint layout.

:class:`WindowStorage` is the whole contract (docs/design.md, "Storage layouts"): the three passes
(``dots`` = ``G x``, ``combine`` = ``Gᵀ c``, ``gram`` = ``G Gᵀ``), always accumulated in float64 by the
kernels of ``fisher.kernels``; the staged-row step that the dynamic algorithm needs (``stage``,
``staged_dots``, ``commit``); column access for the static algorithm
(``column_tiles``, ``columns``); masking, zeroing and a page-by-page checkpoint
(``state_dict``/``load_state_dict`` of column blocks). No algorithm touches a storage's tensors.

The staging row is a row ``m`` beside the ``m`` window rows: a new gradient is written there first,
so one pass over ``m + 1`` rows yields both ``G g`` and ``‖g‖²``, and the row enters the window (or
not) with an index copy decided on the device -- no host branch. The direction is then one
``combine`` over the ``m`` window rows, the new gradient already in its slot. Only finite
gradients ever enter them, so a rejected step's zeroed coefficients give an exactly zero
direction, with no pass over ``d`` of its own.

The checkpoint layout is shared by every storage: any storage loads any checkpoint, a sharded
one's per-rank files included (docs/design.md, "Checkpoint layout").
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from lightning_mfac._files import plain_file_name
from lightning_mfac.fisher.kernels import WindowKernels

#: Columns per block of a checkpoint: blocks are copied to the host one at a time.
CHECKPOINT_BLOCK_BYTES = 64 << 20
#: Version tag of the checkpoint layout (docs/design.md, "Checkpoint layout").
CHECKPOINT_FORMAT = "mfac-window/1"
#: A sharded window's checkpoint: a manifest of per-rank files, each in ``SHARD_FILE_FORMAT``.
SHARDED_CHECKPOINT_FORMAT = "mfac-window-sharded/1"
SHARD_FILE_FORMAT = "mfac-window-shard/1"
#: One rank's columns of a sharded window, as its ``state_dict()`` returns them (no files).
LOCAL_SHARD_FORMAT = "mfac-window-local-shard/1"
#: State that only one rank has (e.g. Adam moments of its FSDP2 shards), and its manifest of files.
RANK_LOCAL_FORMAT = "mfac-rank-local/1"
RANK_LOCAL_CHECKPOINT_FORMAT = "mfac-rank-local-files/1"


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def default_out_dtype(window_dtype: torch.dtype) -> torch.dtype:
    """Results of a float32 or bfloat16 window are float32, of a float64 window float64."""
    return torch.float64 if window_dtype == torch.float64 else torch.float32


class WindowStorage(ABC):
    """``rows`` gradients of ``dim`` coordinates stored as ``dtype``, multiplied on ``device``."""

    rows: int
    dim: int
    dtype: torch.dtype
    device: torch.device
    kernels: WindowKernels

    # ------------------------------------------------------------------ passes over the m rows
    @abstractmethod
    def dots(self, x: torch.Tensor) -> torch.Tensor:
        """``G x`` in float64: ``(m,)`` for ``x`` of shape ``(d,)``, ``(m, k)`` for ``(d, k)``."""

    @abstractmethod
    def combine(
        self, coeffs: torch.Tensor, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Gᵀ c`` accumulated in float64, rounded once to ``out_dtype`` (or to ``out``'s dtype,
        written into ``out`` when given: the dynamic step's direction goes straight into the
        caller's buffer)."""

    @abstractmethod
    def gram(self) -> torch.Tensor:
        """``G Gᵀ`` as a float64 ``(m, m)`` tensor."""

    def block_woodbury(
        self, x: torch.Tensor, block: int, factor: torch.Tensor, damp: float, out: torch.Tensor
    ) -> torch.Tensor:
        """``out_b = (x_b − G_bᵀ (L_b L_bᵀ)⁻¹ G_b x_b)/λ`` for every block of ``block`` columns
        (``factor``: the float64 ``(nblocks, m, m)`` factors ``L_b``): tile by tile, for storages
        whose ``column_tiles`` hold whole blocks."""
        for c0, c1, tile in self.column_tiles():
            nb = -(-(c1 - c0) // block)
            f = factor[c0 // block : c0 // block + nb]
            self.kernels.block_woodbury(tile, x[c0:c1], block, f, damp, out=out[c0:c1])
        return out

    # ------------------------------------------------------------------ the staged row
    @abstractmethod
    def stage(self, g: torch.Tensor) -> None:
        """Write ``g`` (rounded to the window dtype: ``ĝ``) into the staging row."""

    @abstractmethod
    def staged_dots(self, out: torch.Tensor) -> None:
        """``out += [G ĝ; ĝ·ĝ]`` (float64 ``(m + 1,)``)."""

    @abstractmethod
    def commit(self, target: torch.Tensor) -> None:
        """Copy the staging row into row ``target`` (an int64 ``(1,)`` device tensor); ``target == m``
        drops it. Chosen on the device, so the step never branches on the host."""

    # ------------------------------------------------------------------ columns
    @abstractmethod
    def column_tiles(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(c0, c1, tile)`` over all columns, ``tile`` an ``(m, c1 - c0)`` tensor on the device."""

    @abstractmethod
    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """The columns ``idx`` of ``G`` as a float64 ``(m, len(idx))`` tensor on the device."""

    @abstractmethod
    def read_columns(self, c0: int, c1: int) -> torch.Tensor:
        """A CPU copy of columns ``[c0, c1)`` (this rank's part of them for a sharded window)."""

    @abstractmethod
    def write_columns(self, c0: int, c1: int, block: torch.Tensor) -> None:
        """Overwrite columns ``[c0, c1)`` of the ``m`` rows with ``block`` (any device)."""

    @abstractmethod
    def mask_columns(self, keep: torch.Tensor) -> None:
        """Zero the columns where the boolean ``keep`` (``(d,)``) is False."""

    @abstractmethod
    def zero_(self) -> None:
        """Empty every row (and the staging row)."""

    # ------------------------------------------------------------------ shared
    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * itemsize(self.dtype)

    def local_bounds(self) -> tuple[int, int]:
        """The coordinates this process stores (the span of :meth:`local_segments`)."""
        return 0, self.dim

    def local_segments(self) -> list[tuple[int, int]]:
        """The ranges ``[lo, hi)`` of the ``dim`` coordinates this process stores, in order: one
        range, except for a window over FSDP2 shards (one per parameter shard)."""
        return [self.local_bounds()]

    def _block_cols(self) -> int:
        return max(1, CHECKPOINT_BLOCK_BYTES // max(1, self.rows * itemsize(self.dtype)))

    def state_dict(self) -> dict[str, Any]:
        """The window as CPU column blocks (docs/design.md, "Checkpoint layout"): no block is wider
        than ``CHECKPOINT_BLOCK_BYTES``, so at most one block is in flight on the device."""
        width = self._block_cols()
        blocks = [
            (c0, min(hi, c0 + width), self.read_columns(c0, min(hi, c0 + width)))
            for lo, hi in self.local_segments()
            for c0 in range(lo, hi, width)
        ]
        return {
            "format": CHECKPOINT_FORMAT,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": str(self.dtype),
            "blocks": blocks,
        }

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor, shard_dir: str | None = None) -> None:
        """Restore from :meth:`state_dict` (any storage, page geometry or shard split) or from a
        dense ``(m, d)`` tensor (older checkpoints). Blocks outside this process's columns are skipped.
        A sharded checkpoint's files are looked up in ``shard_dir`` first, then where they were written."""
        segments = self.local_segments()
        lo, hi = self.local_bounds()
        if isinstance(state, torch.Tensor):
            blocks = [(0, self.dim, state)]
        else:
            formats = (CHECKPOINT_FORMAT, SHARDED_CHECKPOINT_FORMAT, LOCAL_SHARD_FORMAT)
            if state.get("format") not in formats or state["rows"] != self.rows or state["dim"] != self.dim:
                raise ValueError(
                    f"window checkpoint (format={state.get('format')!r}, rows={state.get('rows')}, "
                    f"dim={state.get('dim')}) does not match this window (one of {formats}, "
                    f"rows={self.rows}, dim={self.dim})."
                )
            if state["format"] == SHARDED_CHECKPOINT_FORMAT:
                blocks = _shard_file_blocks(state, lo, hi, shard_dir)
            else:
                if state["format"] == LOCAL_SHARD_FORMAT and not _covers(state["segments"], segments):
                    raise ValueError(
                        f"this window state holds only columns {_ranges(state['segments'])} of a window sharded "
                        f"over {state['world']} ranks (rank {state['rank']}'s state_dict), but columns "
                        f"{_ranges(segments)} are needed here: "
                        "checkpoint sharded windows with write_window_shards(state, path) on every "
                        "rank (Lightning: MFACPreconditioner, mfac-train or "
                        "lightning_mfac.callbacks.use_window_shard_checkpoint_io(trainer) do it), or load each "
                        "rank's own state_dict on that rank."
                    )
                blocks = state["blocks"]
        self.zero_()
        for c0, c1, block in blocks:
            for lo, hi in segments:
                a, b = max(lo, c0), min(hi, c1)
                if a < b:
                    self.write_columns(a, b, block[:, a - c0 : b - c0])

    def to_dense(self) -> torch.Tensor:
        """The full ``(m, d)`` window on the CPU, for tests and small windows (collective when sharded)."""
        return self.read_columns(0, self.dim)



def _covers(held, needed) -> bool:
    """Whether the ranges ``held`` contain every range of ``needed`` (both sorted, disjoint)."""
    held = [(int(a), int(b)) for a, b in held if b > a]
    return all(any(a <= lo and hi <= b for a, b in held) for lo, hi in needed if hi > lo)


def _ranges(segments) -> str:
    shown = ", ".join(f"[{a}, {b})" for a, b in list(segments)[:3])
    return shown + (f" and {len(segments) - 3} more" if len(segments) > 3 else "")


def _shard_file_blocks(state: dict[str, Any], lo: int, hi: int, shard_dir: str | None):
    """The column blocks of a sharded checkpoint that overlap ``[lo, hi)``, read file by file (memory
    mapped, so only the blocks used are read): one file when the shard split is unchanged. Files are
    looked up in ``shard_dir`` first (a moved run directory), then where they were written."""
    for c0, c1, name in state["files"]:
        # A crafted manifest must not read files outside the shard folder.
        plain_file_name(name, "sharded window checkpoint")
        if c1 <= lo or c0 >= hi:
            continue
        candidates = [os.path.join(d, name) for d in (shard_dir, state["directory"]) if d]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            raise FileNotFoundError(
                f"sharded window checkpoint: the file {name!r} for columns [{c0}, {c1}) is in none of "
                f"{[os.path.dirname(p) for p in candidates]}; copy the shard directory along with the "
                "checkpoint, or set WindowConfig(shard_dir=...) to where it is now."
            )
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if shard.get("format") != SHARD_FILE_FORMAT or shard["rows"] != state["rows"] or shard["dim"] != state["dim"]:
            raise ValueError(f"{path} is not a shard of this checkpoint (format={shard.get('format')!r}).")
        yield from shard["blocks"]

