"""The app's own callbacks (listed in ``conf/callbacks/``): stop on divergence, record the curves."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["MetricHistory", "StopOnDivergence", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became non-finite: the run cannot mean anything after that."""


class StopOnDivergence(Callback):
    """Raise :class:`TrainingDiverged` when a training loss is NaN or infinite, or has grown beyond
    ``max_ratio`` times the run's first loss.

    The ratio catches the divergence that normalization layers keep finite: with BatchNorm a
    huge step leaves the loss at 1e11, finite and meaningless. Checked every ``check_every``
    optimizer steps (one host read each); Lightning's ``EarlyStopping(check_finite=True)`` would
    end such a run as a success.
    """

    def __init__(self, check_every: int = 1, max_ratio: float | None = 1000.0) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r} is invalid: expected an integer >= 1.")
        if max_ratio is not None and not (isinstance(max_ratio, (int, float)) and max_ratio > 1):
            raise ValueError(f"max_ratio={max_ratio!r} is invalid: expected a number > 1 or None.")
        self.check_every = check_every
        self.max_ratio = max_ratio
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or batch_idx % self.check_every:
            return
        value = float(loss.detach())
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        hint = "(lower optimizer.lr, or raise the M-FAC damp)"
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged: the loss is {value} {where} {hint}")
        if self.first_loss is None:
            self.first_loss = abs(value)
        elif self.max_ratio is not None and self.first_loss > 0 and value > self.max_ratio * self.first_loss:
            raise TrainingDiverged(
                f"training diverged: the loss is {value:.4g} {where}, over {self.max_ratio:g}x the first "
                f"loss {self.first_loss:.4g} {hint}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_loss = state_dict.get("first_loss")


class MetricHistory(Callback):
    """Per-epoch means of the training loss/accuracy and the validation metrics, for the plots.

    ``rows`` holds one dict per training epoch: ``epoch``, ``train/loss``, ``train/acc`` (when the
    task logs it) and every ``val/*`` metric of that epoch.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._count = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._count = {}, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # The task logs train/* per step; callback_metrics holds this step's values.
        for key in ("train/loss", "train/acc"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row: dict[str, float] = {"epoch": float(trainer.current_epoch)}
        row.update({k: v / max(self._count, 1) for k, v in self._sums.items()})
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
