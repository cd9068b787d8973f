"""What a callback that keeps a gradient window needs from the run: every rank holds the full
gradient of every parameter it preconditions, or (FSDP2) the gradient of its own ``DTensor``
shards, as dense tensors with data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy

SUPPORTED = ("a single device, DDP (strategy='ddp', 'ddp_spawn', …), or FSDP2: ModelParallelStrategy with "
             "torch.distributed.fsdp.fully_shard applied in configure_model")

# Strategies whose ranks hold shards in a form the window cannot follow: FSDP1's flat parameters
# mix the tensors of a module in one flat shard, DeepSpeed hands the gradients to its own engine.
_SHARDED = (
    (FSDPStrategy, "shards flattened parameters (FSDP1 FlatParameter), whose shards are not whole rows of "
                   "the model's tensors"),
    (DeepSpeedStrategy, "partitions gradients and optimizer state over the ranks (ZeRO) inside DeepSpeed's engine"),
)


def check_strategy(strategy: Strategy, owner: str) -> None:
    """Refuse a strategy whose gradients the window cannot follow (FSDP1, DeepSpeed)."""
    for cls, why in _SHARDED:
        if isinstance(strategy, cls):
            raise ValueError(
                f"{owner} does not support strategy {type(strategy).__name__}: it {why}. Use FSDP2 instead "
                "(ModelParallelStrategy, fully_shard in configure_model), whose DTensor shards the window "
                f"follows. Supported: {SUPPORTED}."
            )


def check_full_gradients(module: torch.nn.Module, named: Sequence[tuple[str, torch.Tensor]], owner: str) -> None:
    """Refuse, naming the parameter, what a dense window cannot hold: parameters without data
    (meta device) and parameters of modules that produce sparse gradients
    (``nn.Embedding(sparse=True)``). FSDP2's DTensor shards are checked where the window is laid
    out over them (``lightning_mfac.optim.fsdp``)."""
    sparse = {
        id(m.weight): type(m).__name__
        for m in module.modules()
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse
    }
    for name, p in named:
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

