"""Run by test_preconditioner.py: the same training once in one process and once under DDP with
2 CPU processes (gloo) and a sharded window -- straight through, or (``ddp32-resume``) stopped after
one epoch, checkpointed (one window file per rank) and resumed by a fresh Trainer; saves the final
parameters for comparison. The resume compares in float32 (``ddp32``): Lightning loads a
checkpoint into the module before a "64-true" run converts it, rounding the weights through
float32 with or without this callback."""

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


def _fit(ddp: bool, root: str, precision: str, ckpt_path: str | None = None, **limits):
    module = Module(optimizer="sgd", lr=0.05, batch_size=8 if ddp else 16)
    storage = os.environ.get("MFAC_TEST_STORAGE", "auto")
    callback = MFACPreconditioner(ngrads=3, damp=1e-2, window={"storage": storage})
    trainer = make_trainer(
        root, callbacks=[callback], precision=precision, **limits,
        devices=2 if ddp else 1, strategy="ddp" if ddp else "auto", deterministic=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, callback, trainer


def main(mode: str, out: str) -> None:
    ddp = mode.startswith("ddp")
    precision = "32-true" if mode.startswith("ddp32") else "64-true"
    root = os.path.dirname(out)
    shards = []
    if mode.endswith("-resume"):
        # 6 steps = one epoch (96 samples, 16 per step); the fresh Trainer goes on to step 7.
        _, _, first = _fit(ddp, root, precision, max_epochs=1, max_steps=-1)
        ckpt = os.path.join(root, "epoch0.ckpt")
        first.save_checkpoint(ckpt)
        # Every rank wrote its columns beside the checkpoint, which names exactly those files.
        shards = sorted(os.listdir(ckpt + ".mfac-window"))
        (state,) = [v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
                    if k.startswith("MFACPreconditioner")]
        manifest = state["preconditioners"][0]["fisher"]["window"]
        shards.append(sorted(name for _, _, name in manifest["files"]) == shards)
        module, callback, trainer = _fit(ddp, root, precision, ckpt_path=ckpt, max_steps=7)
    else:
        module, callback, trainer = _fit(ddp, root, precision, max_steps=7)
    if trainer.global_rank == 0:
        torch.save(
            {"params": torch.nn.utils.parameters_to_vector(module.parameters()).detach(),
             "storage": type(callback._pre[0].fisher.window).__name__, "shards": shards},
            out,
        )
    if torch.distributed.is_initialized():
        # Tear the group down before exit: two Trainers shared it, and gloo threads still alive at
        # interpreter exit abort the process ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
