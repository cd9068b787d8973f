"""LightningModules that wrap a model for the experiment app.

Optimizer and scheduler come in as factories (Hydra ``_partial_: true``), so any optimizer
(SGD, AdamW, MFAC, SINGD, ...) plugs in from config without this code knowing about it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier", "LanguageModel", "SequenceClassifier", "Task"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_STAGES = ("train", "val", "test")


def _logits(output: Any) -> torch.Tensor:
    # Hugging Face models return a ModelOutput; plain modules return the tensor.
    return output.logits if hasattr(output, "logits") else output


class Task(pl.LightningModule):
    """Shared training loop: subclasses define ``compute_loss`` and their metrics.

    ``optimizer`` maps parameters to an optimizer (default: SGD, lr 0.1, momentum 0.9);
    ``lr_scheduler`` maps the optimizer to a scheduler stepped every ``scheduler_interval``
    (``"epoch"`` or ``"step"``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp2``): FSDP2 data parallelism.

        Every module with parameters of its own becomes an FSDP2 unit (``fully_shard``), innermost
        first, so each unit's parameters are gathered only around its own forward and backward; the
        model itself is the root unit, which also takes parameters shared between modules (tied
        embeddings) and every module above them, since one parameter cannot belong to two units."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_fsdp2_sharded", False):
            return
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"trainer.strategy.tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported: "
                "the experiment models have no tensor-parallel plan; use tensor_parallel_size=1 (FSDP2 "
                "data parallelism)."
            )
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"]
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        # Reversed pre-order: every module is sharded after all of its submodules, as FSDP2 requires.
        for module in reversed(list(self.model.modules())):
            own = next(module.parameters(recurse=False), None) is not None
            # A shared parameter anywhere below would end up in two units: leave those to the root.
            if module is not self.model and own and all(owners[id(p)] == 1 for p in module.parameters()):
                fully_shard(module, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)
        self._fsdp2_sharded = True

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean loss, logits, targets)`` of one batch; also what callbacks use to sample gradients."""
        raise NotImplementedError

    def update_metrics(
        self, stage: str, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """Updates and logs the stage's metrics beyond the loss."""

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        loss, logits, targets = self.compute_loss(batch)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            # One of the two per stage, so the logged keys are exactly "train/loss", "val/loss", ...
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=True,
            sync_dist=not on_step,
            batch_size=len(targets),
        )
        self.update_metrics(stage, loss.detach(), logits.detach(), targets)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        else:
            from lightning_mfac.app.baselines import needs_model

            # SINGD hooks the model's layers and Muon splits by layer role: they get the model too.
            extra = {"model": self.model} if needs_model(self.optimizer_factory) else {}
            optimizer = self.optimizer_factory(params, **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            # `monitor` only matters for ReduceLROnPlateau.
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "monitor": "val/loss",
            },
        }


def _num_outputs(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        return int(config.num_labels)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot infer the number of classes of a model without nn.Linear; pass num_classes")
    return linears[-1].out_features


class _Classifier(Task):
    """Cross-entropy (with optional label smoothing) and accuracy per stage."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        scheduler_interval: str = "epoch",
    ):
        super().__init__(model, optimizer, lr_scheduler, scheduler_interval)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes) if num_classes is not None else _num_outputs(model)
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        # Keys avoid "train": nn.ModuleDict refuses names of existing nn.Module attributes.
        self.accuracy = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(self.num_classes, average="micro") for s in _STAGES}
        )

    def _classify(self, logits: torch.Tensor, targets: torch.Tensor):
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return loss, logits, targets

    def update_metrics(self, stage, loss, logits, targets):
        metric = self.accuracy[f"{stage}_acc"]
        metric(logits, targets)
        train = stage == "train"
        self.log(f"{stage}/acc", metric, on_step=train, on_epoch=not train, prog_bar=not train)


class ImageClassifier(_Classifier):
    """Classifier for ``(images, labels)`` batches."""

    def compute_loss(self, batch):
        x, y = batch
        return self._classify(_logits(self.model(x)), y)


class SequenceClassifier(_Classifier):
    """Classifier for dict batches (``input_ids``, ``attention_mask``, ..., ``labels``), e.g. BERT on GLUE."""

    def compute_loss(self, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self._classify(_logits(self.model(**inputs)), batch["labels"])


class LanguageModel(Task):
    """Causal LM on ``{"input_ids": (batch, seq)}`` batches: each token predicts the next.

    Logs ``{stage}/loss`` (nats per token) and, for val and test, ``{stage}/ppl`` = exp(mean loss)
    over the whole epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ):
        super().__init__(model, optimizer, lr_scheduler, scheduler_interval)
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        self.mean_loss = nn.ModuleDict({f"{s}_loss": MeanMetric() for s in ("val", "test")})

    def compute_loss(self, batch):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        kwargs = (
            {"attention_mask": batch["attention_mask"]}
            if isinstance(batch, dict) and "attention_mask" in batch
            else {}
        )
        logits = _logits(self.model(input_ids=ids, **kwargs))[:, :-1]
        targets = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return loss, logits, targets

    def update_metrics(self, stage, loss, logits, targets):
        if stage != "train":
            # Weighted by tokens so the epoch value is the per-token mean even with a short last batch.
            self.mean_loss[f"{stage}_loss"].update(loss, weight=targets.numel())

    def _log_ppl(self, stage: str) -> None:
        metric = self.mean_loss[f"{stage}_loss"]
        self.log(f"{stage}/ppl", math.exp(min(metric.compute().item(), 50.0)), prog_bar=True)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_ppl("val")

    def on_test_epoch_end(self) -> None:
        self._log_ppl("test")
