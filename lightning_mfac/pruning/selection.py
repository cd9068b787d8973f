"""Which weights are pruned, and the ``"N:M"`` pattern grammar.

``params=None`` selects the ``weight`` of every ``nn.Linear`` and convolution (``_ConvNd``, which
includes transposed convolutions); biases and normalization parameters are left dense, as in the
M-FAC and WoodFisher pruning experiments. Otherwise ``params`` is a list whose entries are either
exact parameter names (``"features.0.weight"``) or regular expressions prefixed with ``re:``
(``"re:.*conv.*\\.weight"``) matched against the whole name (``re.fullmatch``), resolved by
:func:`lightning_mfac.selection.match_names` like every other ``params`` argument of the package.

N:M groups. A weight is viewed as rows ``weight.reshape(weight.shape[0], -1)``: for ``Linear``
the rows run along ``in_features``, for ``Conv`` along the flattened ``in_channels/groups × kh × kw``
axis in PyTorch's own (channel, row, column) order -- the reduction axis of the im2col GEMM that
an N:M sparse kernel would run. Groups are ``M`` consecutive entries of a row, so every row's
length must be a multiple of ``M``; because rows are contiguous, the groups are also ``M``
consecutive entries of ``weight.flatten()``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from lightning_mfac.selection import match_names, name_patterns

__all__ = ["check_nm", "parse_pattern", "row_length", "select_parameters"]

_DEFAULT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def select_parameters(model: nn.Module, params: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """The parameters to prune, by name, in ``model.named_parameters()`` order.

    Raises ``ValueError`` when an entry of ``params`` matches no parameter, when nothing is
    selected, or when a selected parameter is not a floating-point tensor.
    """
    named = dict(model.named_parameters())
    if params is None:
        # By identity: a shared layer is listed once, under its name in named_parameters().
        ids = set()
        for mod_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, _DEFAULT_LAYERS) and isinstance(weight, nn.Parameter):
                if isinstance(weight, nn.parameter.UninitializedParameter):
                    raise ValueError(
                        f"params=None: layer {mod_name!r} is lazy and not initialized yet; run one forward "
                        "pass before pruning."
                    )
                ids.add(id(weight))
        chosen = {n for n, p in named.items() if id(p) in ids}
        if not chosen:
            raise ValueError(
                "params=None selects the weights of Linear and Conv layers, but the model has none: "
                "pass params as a list of parameter names or 're:<regex>' patterns."
            )
    else:
        chosen = set(match_names(named, name_patterns(params), "params"))
    out = {n: p for n, p in named.items() if n in chosen}
    for name, p in out.items():
        if not p.is_floating_point():
            raise ValueError(f"params selects {name!r} of dtype {p.dtype}: only floating-point weights can be pruned.")
    return out


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"N:M"`` -> ``(N, M)`` with ``1 <= N < M``."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern={pattern!r} is invalid: expected 'unstructured' or 'N:M' such as '2:4'.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"pattern={pattern!r} is invalid: 'N:M' keeps N of every M weights, so 1 <= N < M is required.")
    return n, m


def row_length(param: torch.Tensor) -> int:
    """Length of the axis along which N:M groups run (see the module docstring)."""
    return param[0].numel() if param.dim() > 1 else param.numel()


def check_nm(named: dict[str, torch.Tensor], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    n, m = nm
    for name, p in named.items():
        if row_length(p) % m:
            raise ValueError(
                f"pattern='{n}:{m}' needs the input dimension of every selected weight to be a multiple of {m}, "
                f"but {name!r} (shape {tuple(p.shape)}) has rows of {row_length(p)}; exclude it via params."
            )
