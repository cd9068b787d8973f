"""Small LightningModules shared by the callback tests (deterministic, CPU, seconds)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def classification_data(n: int = 96, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, classes, generator=gen)
    y = (x @ w).argmax(1)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    """An MLP; ``optimizer`` is "sgd", "sgd_momentum", "adam", "adamw" or "mfac"; ``fused`` passes
    ``fused=True`` to the torch optimizers; ``seed`` sets the initial weights."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        features: int = 6,
        classes: int = 3,
        batch_size: int = 16,
        scheduler: bool = False,
        mfac_kwargs: dict | None = None,
        nan_at_step: int | None = None,
        fused: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.Tanh(), torch.nn.Linear(8, classes))
        self.seen_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        if self.hparams.nan_at_step is not None and self.global_step == self.hparams.nan_at_step:
            loss = loss * float("inf")
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        name, lr = self.hparams.optimizer, self.hparams.lr
        fused = {"fused": True} if self.hparams.fused else {}
        if name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=lr, **fused)
        elif name == "sgd_momentum":
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, **fused)
        elif name == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=lr, **fused)
        elif name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-2, **fused)
        else:
            from lightning_mfac import MFAC

            opt = MFAC(self.parameters(), lr=lr, **(self.hparams.mfac_kwargs or {}))
        if not self.hparams.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

    def train_dataloader(self):
        return DataLoader(classification_data(features=self.hparams.features), batch_size=self.hparams.batch_size)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; ``kwargs`` override."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"max_steps": 6, "default_root_dir": str(tmp_path), "deterministic": True, **kwargs})


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach().clone()
