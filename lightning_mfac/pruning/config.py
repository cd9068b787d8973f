"""How an Optimal Brain Surgeon pruning step is computed: one frozen, validated object.

``oneshot_prune``, ``prune_step`` and the ``OBSPruning`` callback take an :class:`OBSConfig`
instead of repeating the settings; they are validated here, once, when the config is built.
What differs between them (the target sparsity, the schedule of a gradual run) stays with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_mfac import _validation as check
from lightning_mfac.fisher.config import WindowConfig, coerce_config
from lightning_mfac.pruning.schedule import check_ngrads
from lightning_mfac.pruning.selection import parse_pattern
from lightning_mfac.selection import name_patterns

METHODS = ("mfac", "magnitude")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class OBSConfig:
    """Settings of an OBS pruning step on the static M-FAC inverse Fisher.

    Args:
        method: ``"mfac"`` (OBS saliency ``w²/(2[F⁻¹]ᵢᵢ)`` and correction) or ``"magnitude"``
            (``|w|``, no correction, no gradients).
        ngrads: gradients per step ``m``, or a ``{sparsity: m}`` schedule with key 0 (the entry
            with the largest key ``<=`` the step's target applies).
        damp: Fisher dampening ``λ > 0``.
        block_size: ``None`` for the full Fisher, else block-diagonal over ``B`` consecutive alive
            weights (in ``params`` order).
        recomputations: sub-steps per pruning step, each with fresh gradients (the density
            shrinks geometrically towards the step's target).
        scope: ``"global"`` (one threshold over all selected weights) or ``"layer"``.
        pattern: ``"unstructured"`` or ``"N:M"`` (N of every M consecutive weights along the input
            dimension; see :mod:`~lightning_mfac.pruning.selection`).
        params: ``None`` (the weights of all Linear and Conv layers) or names / ``"re:<regex>"``.
        window: how the gradient matrix is stored and multiplied
            (:class:`~lightning_mfac.fisher.config.WindowConfig`: ``page_cols``, ``kernels``, …).
    """

    method: str = "mfac"
    ngrads: int | Mapping[float, int] = 64
    damp: float = 1e-5
    block_size: int | None = None
    recomputations: int = 1
    scope: str = "global"
    pattern: str = "unstructured"
    params: tuple[str, ...] | None = None
    window: WindowConfig = dataclasses.field(default_factory=WindowConfig)

    def __post_init__(self) -> None:
        check.one_of("method", self.method, METHODS)
        object.__setattr__(self, "ngrads", check_ngrads(self.ngrads))
        object.__setattr__(self, "damp", check.damping("damp", self.damp))
        if self.block_size is not None:
            object.__setattr__(self, "block_size", check.positive_int("block_size", self.block_size))
        object.__setattr__(self, "recomputations", check.positive_int("recomputations", self.recomputations))
        check.one_of("scope", self.scope, SCOPES)
        parse_pattern(self.pattern)
        params = name_patterns(self.params if not isinstance(self.params, tuple) else list(self.params))
        object.__setattr__(self, "params", None if params is None else tuple(params))
        object.__setattr__(self, "window", WindowConfig.coerce(self.window))
        if self.window.storage == "sharded":
            raise ValueError(
                "window.storage='sharded' is invalid for pruning: the static inverse is built on one device; "
                "expected 'auto', 'device' or 'paged'."
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of an ``"N:M"`` pattern, ``None`` for unstructured pruning."""
        return parse_pattern(self.pattern)

    def replace(self, **changes: Any) -> OBSConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, value: OBSConfig | Mapping[str, Any] | None) -> OBSConfig:
        """Accept a config, a plain mapping of its fields (e.g. from Hydra), or ``None`` (defaults)."""
        return coerce_config(cls, value, "obs", _plain_fields)


def _plain_fields(items: dict[str, Any]) -> dict[str, Any]:
    """A mapping's ``params`` list and ``ngrads`` schedule (Hydra containers) as the field types."""
    if isinstance(items.get("params"), Sequence) and not isinstance(items["params"], str):
        items["params"] = tuple(items["params"])
    if items.get("ngrads") is not None and hasattr(items["ngrads"], "items"):
        items["ngrads"] = dict(items["ngrads"].items())
    return items
