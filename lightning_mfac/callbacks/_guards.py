"""What a callback that keeps a gradient window needs from the run: every rank holds the full
gradient of every parameter it preconditions, as dense tensors with data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

SUPPORTED = "a single device, or DDP (strategy='ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook', …)"

# Strategies whose ranks hold shards of the parameters and gradients (or hand them to an engine
# that does): a window over one rank's shard is not the model's Fisher.
_SHARDED = (
    (FSDPStrategy, "shards parameters and gradients over the ranks (FSDP)"),
    (DeepSpeedStrategy, "partitions gradients and optimizer state over the ranks (ZeRO) inside DeepSpeed's engine"),
    (ModelParallelStrategy, "holds DTensor shards of the parameters and gradients (FSDP2, tensor parallelism)"),
)


def check_strategy(strategy: Strategy, owner: str) -> None:
    """Refuse a strategy under which a rank does not hold full parameter gradients."""
    for cls, why in _SHARDED:
        if isinstance(strategy, cls):
            raise ValueError(
                f"{owner} does not support strategy {type(strategy).__name__}: it {why}, so a rank cannot see "
                f"the full gradient its window needs. Supported: {SUPPORTED}."
            )


def check_full_gradients(module: torch.nn.Module, named: Sequence[tuple[str, torch.Tensor]], owner: str) -> None:
    """Refuse, naming the parameter, what a dense window cannot hold: DTensor shards (a strategy
    that shards parameters), parameters without data (meta device) and parameters of modules that
    produce sparse gradients (``nn.Embedding(sparse=True)``)."""
    sparse = {
        id(m.weight): type(m).__name__
        for m in module.modules()
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse
    }
    for name, p in named:
        if _is_dtensor(p):
            raise ValueError(
                f"{owner}: parameter {name!r} is a DTensor (a shard of a parameter sharded by the strategy): "
                f"the window needs full gradients on every rank. Supported: {SUPPORTED}."
            )
        if p.is_meta:
            raise ValueError(
                f"{owner}: parameter {name!r} (shape {tuple(p.shape)}) is on the meta device and has no data: "
                "materialize the model before fit (e.g. in configure_model) or leave it out via params."
            )
        if id(p) in sparse:
            raise ValueError(
                f"{owner}: parameter {name!r} belongs to an {sparse[id(p)]}(sparse=True), whose gradients are "
                "sparse; the M-FAC window holds dense gradients. Use sparse=False or leave it out via params."
            )


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return False
    return isinstance(t, DTensor)
