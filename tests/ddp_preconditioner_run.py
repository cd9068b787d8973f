"""Run by test_preconditioner.py: the same training once in one process and once under DDP with
2 CPU processes (gloo) and a sharded window; saves the final parameters for comparison."""

from __future__ import annotations

import os
import sys

import torch
from lit_models import TinyClassifier, make_trainer

from lightning_mfac import MFACPreconditioner


class Module(TinyClassifier):
    def train_dataloader(self):
        # shuffle=False: DDP's sampler gives rank r the samples r, r+2, …; one process with twice the
        # batch sees the same samples in each step, so the averaged gradients agree.
        dataset = super().train_dataloader().dataset
        sampler = None
        if self.trainer.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
        return torch.utils.data.DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler)


def main(mode: str, out: str) -> None:
    ddp = mode == "ddp"
    module = Module(optimizer="sgd", lr=0.05, batch_size=8 if ddp else 16)
    storage = os.environ.get("MFAC_TEST_STORAGE", "auto")
    callback = MFACPreconditioner(ngrads=3, damp=1e-2, window={"storage": storage})
    trainer = make_trainer(
        "/tmp", callbacks=[callback], precision="64-true", max_steps=7,
        devices=2 if ddp else 1, strategy="ddp" if ddp else "auto", deterministic=False,
    )
    trainer.fit(module)
    if trainer.global_rank == 0:
        torch.save(
            {"params": torch.nn.utils.parameters_to_vector(module.parameters()).detach(),
             "storage": type(callback._pre[0].fisher.window).__name__},
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
