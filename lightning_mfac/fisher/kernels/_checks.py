"""Argument checks shared by every implementation of the window passes: shapes and dtypes only (no
value is read, so a check never synchronizes with a device)."""

from __future__ import annotations

import torch

WINDOW_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def default_out_dtype(window_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if window_dtype == torch.float64 else torch.float32


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    return value


def _rows(rows) -> tuple[int, int]:
    _tensor("rows", rows)
    if rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D (m, n) window, got shape {tuple(rows.shape)}.")
    if rows.dtype not in WINDOW_DTYPES:
        raise TypeError(f"rows.dtype={rows.dtype} is not supported: expected float32, bfloat16 or float64.")
    return rows.shape[0], rows.shape[1]


def _operand(name: str, value, length: int, length_name: str, rows: torch.Tensor) -> None:
    _tensor(name, value)
    if value.dim() not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D ({length_name},) or 2-D ({length_name}, k), got shape {tuple(value.shape)}."
        )
    if value.shape[0] != length:
        raise ValueError(
            f"{name} has {value.shape[0]} rows but rows is {tuple(rows.shape)}: expected {name}.shape[0] == {length}."
        )
    if not value.is_floating_point():
        raise TypeError(f"{name}.dtype={value.dtype} is not supported: expected a floating-point dtype.")
    if value.device != rows.device:
        raise ValueError(f"{name} is on {value.device} but rows is on {rows.device}.")


def _out(out, shape: tuple[int, ...], rows: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if out is None:
        return
    _tensor("out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}.")
    if dtype is not None and out.dtype != dtype:
        raise TypeError(f"out.dtype={out.dtype} is not supported: the pass accumulates into float64.")
    if not out.is_floating_point():
        raise TypeError(f"out.dtype={out.dtype} is not supported: expected a floating-point dtype.")
    if out.device != rows.device:
        raise ValueError(f"out is on {out.device} but rows is on {rows.device}.")


def dots(rows, x, out) -> None:
    m, n = _rows(rows)
    _operand("x", x, n, "n", rows)
    _out(out, (m,) if x.dim() == 1 else (m, x.shape[1]), rows, torch.float64)


def combine(rows, coeffs, out, out_dtype) -> None:
    m, n = _rows(rows)
    _operand("coeffs", coeffs, m, "m", rows)
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype={out_dtype!r} is not supported: expected a floating-point torch.dtype.")
    _out(out, (n,) if coeffs.dim() == 1 else (n, coeffs.shape[1]), rows)
    if out is not None and out_dtype is not None and out.dtype != out_dtype:
        raise TypeError(f"out.dtype={out.dtype} contradicts out_dtype={out_dtype}.")


def combine_dtype(rows: torch.Tensor, out: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return out.dtype if out is not None else default_out_dtype(rows.dtype)


def gram(rows, out) -> None:
    m, _ = _rows(rows)
    _out(out, (m, m), rows, torch.float64)


def _block(block, n: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r} is not supported: expected a positive int (columns per block).")
    return -(-n // block)


def block_dots(rows, x, block) -> int:
    """Checks of ``block_dots``; returns the number of blocks."""
    _, n = _rows(rows)
    _operand("x", x, n, "n", rows)
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D (n,) for the block passes, got shape {tuple(x.shape)}.")
    return _block(block, n)


def block_combine(rows, coeffs, block, out_dtype) -> int:
    """Checks of ``block_combine``; returns the number of blocks."""
    m, n = _rows(rows)
    nblocks = _block(block, n)
    _tensor("coeffs", coeffs)
    if tuple(coeffs.shape) != (nblocks, m):
        raise ValueError(
            f"coeffs has shape {tuple(coeffs.shape)}: expected (nblocks, m) = {(nblocks, m)} for "
            f"rows {tuple(rows.shape)} in blocks of {block} columns."
        )
    if not coeffs.is_floating_point():
        raise TypeError(f"coeffs.dtype={coeffs.dtype} is not supported: expected a floating-point dtype.")
    if coeffs.device != rows.device:
        raise ValueError(f"coeffs is on {coeffs.device} but rows is on {rows.device}.")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype={out_dtype!r} is not supported: expected a floating-point torch.dtype.")
    return nblocks


def block_woodbury(rows, x, block, factor, damp, out=None) -> int:
    """Checks of ``block_woodbury``; returns the number of blocks."""
    m, _ = _rows(rows)
    nblocks = block_dots(rows, x, block)
    _tensor("factor", factor)
    if tuple(factor.shape) != (nblocks, m, m) or factor.dtype != torch.float64:
        raise ValueError(
            f"factor has shape {tuple(factor.shape)} and dtype {factor.dtype}: expected float64 "
            f"(nblocks, m, m) = {(nblocks, m, m)} lower-triangular Cholesky factors."
        )
    if factor.device != rows.device:
        raise ValueError(f"factor is on {factor.device} but rows is on {rows.device}.")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp={damp!r} is invalid: expected a positive float.")
    _out(out, (rows.shape[1],), rows, torch.float64)
    return nblocks
