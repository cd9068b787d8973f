"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` whose message names the argument, the offending value
and what is allowed, so a misconfigured run fails at construction time, not mid-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

WINDOW_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}.")
    return int(value)


def positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number > 0.")
    return float(value)


#: Dampings whose reciprocal a float32 window step can represent: beyond them the step
#: underflows to zero (1e300: nothing trains) or overflows (1e-300).
DAMP_RANGE = (float(torch.finfo(torch.float32).tiny), 1.0 / float(torch.finfo(torch.float32).tiny))


def damping(name: str, value: Any) -> float:
    value = positive_float(name, value)
    low, high = DAMP_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range: expected a damping in [{low:.3g}, {high:.3g}] "
                         "(its reciprocal scales the step, and outside this range it underflows or "
                         "overflows float32).")
    return value


def nonnegative_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0.")
    return float(value)


def in_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and 0 <= value and (value <= 1 if closed_right else value < 1)
    if not ok:
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name}={value!r} is invalid: expected a number in {bound}.")
    return float(value)


def one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {allowed}.")
    return value


def window_dtype(name: str, value: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    """Accepts ``None`` (the default), a ``torch.dtype`` or one of the names in ``WINDOW_DTYPES``."""
    if value is None:
        return default
    if isinstance(value, str) and value in WINDOW_DTYPES:
        return WINDOW_DTYPES[value]
    if isinstance(value, torch.dtype) and value in WINDOW_DTYPES.values():
        return value
    raise ValueError(
        f"{name}={value!r} is invalid: expected None, torch.float32, torch.bfloat16, torch.float64 "
        f"or one of {sorted(WINDOW_DTYPES)}."
    )


def finite_tensor(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} non-finite entries (inf/NaN): expected finite values only.")


def float_tensor(name: str, value: Any, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.dim() not in ndims:
        dims = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} has shape {tuple(value.shape)}: expected a {dims} tensor.")
    if not value.is_floating_point():
        raise ValueError(f"{name} has dtype {value.dtype}: expected a floating-point tensor.")
    if value.is_sparse or value.is_complex():
        raise ValueError(f"{name} must be a dense real tensor.")
    return value
