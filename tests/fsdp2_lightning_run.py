"""Run by test_fsdp2.py: MFACPreconditioner (graft "adam") on an MLP, once on one device and once
under Lightning's ModelParallelStrategy with FSDP2 (``fully_shard`` in ``configure_model``) over 2
CPU processes (gloo) -- straight through, or (``fsdp2-resume``) checkpointed after one epoch and
resumed by a fresh Trainer; or (``single-prune``, ``fsdp2-prune``) with ``OBSPruning`` before it,
pruning to 50 % in two steps (epochs 0 and 1). Saves the final parameters (gathered) and the masks
for comparison.

Usage: ``fsdp2_lightning_run.py single|fsdp2|fsdp2-resume|single-prune|fsdp2-prune none|sgd|adam OUT [MAX_STEPS]``."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mfac import MFACPreconditioner, OBSPruning


class MLP(pl.LightningModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_size = batch_size
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        # shuffle=False: the distributed sampler gives rank r the samples r, r+2, …; one process with
        # twice the batch sees the same samples in each step, so the averaged gradients agree.
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(48, 6, generator=g), torch.randn(48, 1, generator=g))
        sampler = None
        if self.trainer.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def _fit(sharded: bool, root: str, graft: str | None, ckpt_path: str | None = None, prune: bool = False, **limits):
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = MLP(batch_size=4 if sharded else 8)
    callback = MFACPreconditioner(ngrads=3, damp=1e-2, graft=graft)
    pruning = [OBSPruning(0.5, start_epoch=0, end_epoch=1, obs={"ngrads": 4, "damp": 1e-3}, verbose=False)]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=2 if sharded else 1, strategy=strategy,
        callbacks=[*(pruning if prune else []), callback],
        default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **limits,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, callback, trainer, (pruning[0] if prune else None)


def main(mode: str, graft: str, out: str, steps: int = 9) -> None:
    graft = None if graft == "none" else graft
    sharded = mode.startswith("fsdp2")
    root = os.path.dirname(out)
    files: list[str] = []
    if mode.endswith("-resume"):
        _, _, first, _ = _fit(sharded, root, graft, max_epochs=1)  # 6 steps
        ckpt = os.path.join(root, "epoch0.ckpt")
        first.save_checkpoint(ckpt)
        first.strategy.barrier()
        files = sorted(os.listdir(ckpt + ".mfac-window"))
        module, callback, trainer, pruning = _fit(sharded, root, graft, ckpt_path=ckpt, max_steps=steps)
    else:
        module, callback, trainer, pruning = _fit(sharded, root, graft, prune=mode.endswith("-prune"),
                                                  max_steps=steps)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.parameters()]
    pre = callback._pre[0]
    if trainer.global_rank == 0:
        torch.save({"params": torch.cat([p.detach().reshape(-1) for p in params]),
                    "storage": type(pre.fisher.window).__name__, "local_dim": pre.dim, "files": files,
                    "masks": None if pruning is None else pruning.masks,
                    "history": None if pruning is None else pruning.history}, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))
