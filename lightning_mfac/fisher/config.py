"""The settings of the M-FAC engines: frozen, validated objects.

:class:`WindowConfig` says how and where the gradient window is stored and multiplied; every layer
that holds a window (``DynamicFisherInverse``, ``StaticFisherInverse``, ``MFAC``,
``MFACPreconditioner``, ``oneshot_prune``/``OBSPruning``) takes one instead of repeating the
settings. :class:`DynamicConfig` adds what the dynamic engine needs on top of it (``ngrads``,
``damp``, ``damp_mode``) -- the counterpart of pruning's ``OBSConfig``. Validation happens here,
once, when a config is built; every error names the setting (``damp=0.0 is invalid: expected ...``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lightning_mfac import _validation as check
from lightning_mfac.fisher.kernels import KERNELS

STORAGES = ("auto", "device", "paged", "sharded")
#: ``"cuda_graph"``: the steady-state dynamic step is captured once and replayed; ``"auto"``: that on
#: CUDA for a window on the device, eager otherwise (paged steps keep their page stream).
CAPTURES = ("auto", "off", "cuda_graph")
#: How ``damp`` is read: ``λ`` itself, or the factor ``δ`` of ``λ = δ·mean(diag GGᵀ)/m``.
DAMP_MODES = ("absolute", "relative")

Config = TypeVar("Config")


def coerce_config(
    cls: type[Config],
    value: Any,
    key: str,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Config:
    """``value`` as a ``cls`` (a frozen dataclass): an instance as it is, ``None`` as the defaults, or a
    plain mapping of its fields (e.g. from Hydra), whose values ``prepare`` may first turn into the
    field types. ``key`` is the setting's name in error messages."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping) or hasattr(value, "items"):
        fields = {f.name for f in dataclasses.fields(cls)}
        items = dict(value.items())
        unknown = sorted(set(items) - fields)
        if unknown:
            raise ValueError(f"{key}: unknown setting(s) {unknown}: expected some of {sorted(fields)}.")
        return cls(**(prepare(items) if prepare is not None else items))
    raise TypeError(f"{key}={value!r}: expected a{'n' if cls.__name__[0] in 'AEIOU' else ''} "
                    f"{cls.__name__}, a mapping of its fields, or None.")


@dataclass(frozen=True)
class WindowConfig:
    """Settings of an ``m × d`` gradient window.

    Args:
        dtype: storage dtype of the window: ``None`` (float64 for float64 parameters, else float32),
            ``torch.float32``/``"float32"``, ``torch.bfloat16``/``"bfloat16"`` (half the memory and
            traffic, relative error ~1e-2) or ``torch.float64`` (references).
        storage: ``"device"`` (on the compute device), ``"paged"`` (pinned host memory streamed to the
            device in pages), ``"sharded"`` (1/world of the coordinates per rank) or ``"auto"``.
        page_cols: columns per page of a paged window (default: from the page budget).
        page_budget_bytes: device memory for the pages in flight of a paged window.
        refactor_every: steps between fresh factorizations of ``S`` (default: the window size ``m``).
        kernels: implementation of the window passes: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"``.
        capture: ``"auto"``, ``"off"`` or ``"cuda_graph"`` (see :data:`CAPTURES`).
        process_group: ``torch.distributed`` group of a sharded window (default: the world).
        shard_dir: where to look first for the per-rank files of a sharded window's checkpoint when
            it is loaded (they are written beside the checkpoint, in ``<checkpoint>.mfac-window/``,
            and found there from the checkpoint's path; docs/design.md, "Checkpoint layout"). Needed
            only for a checkpoint whose files were moved apart from it.
    """

    dtype: torch.dtype | None = None
    storage: str = "auto"
    page_cols: int | None = None
    page_budget_bytes: int | None = None
    refactor_every: int | None = None
    kernels: str = "auto"
    capture: str = "auto"
    process_group: Any = dataclasses.field(default=None, compare=False)
    shard_dir: str | None = None

    def __post_init__(self) -> None:
        if self.shard_dir is not None:
            if not isinstance(self.shard_dir, (str, os.PathLike)) or not str(self.shard_dir):
                raise ValueError(f"shard_dir={self.shard_dir!r} is invalid: expected a directory path or None.")
            object.__setattr__(self, "shard_dir", os.fspath(self.shard_dir))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", check.window_dtype("dtype", self.dtype))
        check.one_of("storage", self.storage, STORAGES)
        check.one_of("kernels", self.kernels, KERNELS)
        check.one_of("capture", self.capture, CAPTURES)
        for name in ("page_cols", "page_budget_bytes", "refactor_every"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check.positive_int(name, value))

    def resolved_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The window dtype for parameters of ``param_dtype``."""
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if param_dtype == torch.float64 else torch.float32

    def replace(self, **changes: Any) -> WindowConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, value: WindowConfig | Mapping[str, Any] | None) -> WindowConfig:
        """Accept a config, a plain mapping of its fields (e.g. from Hydra), or ``None`` (defaults)."""
        return coerce_config(cls, value, "window")


@dataclass(frozen=True)
class DynamicConfig:
    """Settings of a dynamic M-FAC engine (``DynamicFisherInverse``, and through it ``MFAC`` and
    ``MFACPreconditioner``).

    Args:
        ngrads: window size ``m`` (the capacity; the Fisher always divides by it).
        damp: dampening: ``λ`` itself (``damp_mode="absolute"``), or the factor ``δ`` of
            ``λ = δ·mean(diag GGᵀ)/m`` (``damp_mode="relative"``), which follows the gradients' scale.
        damp_mode: ``"absolute"`` or ``"relative"`` (:data:`DAMP_MODES`).
        window: how the window is stored and multiplied (a :class:`WindowConfig` or a mapping of its
            fields).
    """

    ngrads: int = 1024
    damp: float = 1e-5
    damp_mode: str = "absolute"
    window: WindowConfig = dataclasses.field(default_factory=WindowConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngrads", check.positive_int("ngrads", self.ngrads))
        object.__setattr__(self, "damp", check.damping("damp", self.damp))
        check.one_of("damp_mode", self.damp_mode, DAMP_MODES)
        object.__setattr__(self, "window", WindowConfig.coerce(self.window))

    def replace(self, **changes: Any) -> DynamicConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, value: DynamicConfig | Mapping[str, Any] | None) -> DynamicConfig:
        """Accept a config, a plain mapping of its fields (e.g. from Hydra), or ``None`` (defaults)."""
        return coerce_config(cls, value, "mfac")


#: Keyword arguments that the fisher classes took before ``window=`` replaced them.
LEGACY_WINDOW_ARGS = ("dtype", "storage", "page_cols", "page_budget_bytes", "refactor_every", "process_group")


def reject_legacy_arguments(owner: str, kwargs: dict[str, Any]) -> None:
    """Raise the ``TypeError`` of an unexpected keyword, pointing moved settings to ``window=``."""
    if not kwargs:
        return
    moved = sorted(k for k in kwargs if k in LEGACY_WINDOW_ARGS)
    if moved:
        example = ", ".join(f"{k}=..." for k in moved)
        raise TypeError(
            f"{owner}() no longer takes {', '.join(map(repr, moved))}: pass window=WindowConfig({example}) "
            "(from lightning_mfac.fisher.config import WindowConfig)."
        )
    raise TypeError(f"{owner}() got an unexpected keyword argument {sorted(kwargs)[0]!r}.")
