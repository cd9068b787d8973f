"""``mfac-train``: the Hydra + Lightning + W&B experiment app.

``mfac-train`` with no arguments runs the offline quickstart; every config group in
``conf/`` can be swapped from the command line (``optimizer=adamw``,
``experiment=resnet20_cifar10_mfac``, ``-m optimizer=sgd,mfac`` …).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_mfac.app import config_dir
from lightning_mfac.app.tasks import ImageClassifier, LanguageModel, SequenceClassifier

TASKS = {"image": ImageClassifier, "sequence": SequenceClassifier, "language_model": LanguageModel}
#: Model arguments that ``auto`` fills from the data module.
AUTO_FROM_DATA = {
    "num_classes": "num_classes",
    "num_labels": "num_classes",
    "in_channels": "in_channels",
    "vocab_size": "vocab_size",
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


# ---------------------------------------------------------------------- validation
def _number(cfg: DictConfig, key: str, *, minimum: float | None = None, strict: bool = False,
            below: float | None = None, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {kind}.")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected a finite number.")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{key}={value!r} is out of range: expected {kind} {'>' if strict else '>='} {minimum}.")
    if below is not None and value >= below:
        raise ConfigError(f"{key}={value!r} is out of range: expected {kind} < {below}.")


def validate_config(cfg: DictConfig) -> None:
    """Fail before any training starts, naming the offending key."""
    _number(cfg, "seed", integer=True)
    for key in ("optimizer.lr", "optimizer.weight_decay"):
        _number(cfg, key, minimum=0)
    _number(cfg, "optimizer.momentum", minimum=0, below=1)
    for node in ("optimizer", "preconditioner"):
        _number(cfg, f"{node}.ngrads", minimum=1, integer=True)
        _number(cfg, f"{node}.damp", minimum=0, strict=True)
    for key in ("pruning.sparsity", "pruning.callback.sparsity"):
        _number(cfg, key, minimum=0, below=1)
    for key in ("pruning.obs.ngrads", "pruning.obs.recomputations", "pruning.callback.obs.recomputations"):
        _number(cfg, key, minimum=1, integer=True)
    _number(cfg, "data.batch_size", minimum=1, integer=True)
    _number(cfg, "trainer.max_epochs", minimum=-1, integer=True)
    _number(cfg, "trainer.max_steps", minimum=-1, integer=True)
    _number(cfg, "trainer.accumulate_grad_batches", minimum=1, integer=True)
    if "data_dir" in cfg.data.keys():
        if OmegaConf.is_missing(cfg.data, "data_dir"):
            raise ConfigError("data.data_dir is missing: this data set needs data.data_dir=<path>.")
        path = cfg.data.data_dir
        if path is not None and not cfg.data.get("download", False) and not Path(str(path)).exists():
            hint = " (pass data.download=true to fetch it)" if "download" in cfg.data else ""
            raise ConfigError(f"data.data_dir={path!r} does not exist{hint}.")
    if cfg.model.get("task", "image") not in TASKS:
        raise ConfigError(f"model.task={cfg.model.get('task')!r} is invalid: expected one of {sorted(TASKS)}.")
    kind = OmegaConf.select(cfg, "pruning.kind", default=None)
    if kind not in (None, "gradual", "oneshot"):
        raise ConfigError(f"pruning.kind={kind!r} is invalid: expected 'gradual' or 'oneshot'.")


def _build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` with errors that say which config node failed."""
    try:
        return instantiate(cfg, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the key
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from err


def _enabled(node: Any) -> bool:
    return node is not None and "_target_" in node


# ---------------------------------------------------------------------- assembly
def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    dm = _build(cfg.data, "data")
    # The model's size (classes, channels, vocabulary) comes from the data.
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_task(cfg: DictConfig, dm: pl.LightningDataModule) -> pl.LightningModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    kind = model_cfg.pop("task", "image")
    for arg, attr in AUTO_FROM_DATA.items():
        if model_cfg.get(arg) == "auto":
            value = getattr(dm, attr, None)
            if value is None and attr == "in_channels":
                value = getattr(dm, "input_shape", (None,))[0]
            if value is None:
                raise ConfigError(f"model.{arg}=auto but data {type(dm).__name__} does not provide {attr}.")
            model_cfg[arg] = value
    model = _build(OmegaConf.create(model_cfg), "model")
    optimizer = _build(cfg.optimizer, "optimizer") if _enabled(cfg.get("optimizer")) else None
    scheduler = _build(cfg.scheduler, "scheduler") if _enabled(cfg.get("scheduler")) else None
    return TASKS[kind](model, optimizer=optimizer, lr_scheduler=scheduler)


def monitored_metric(cfg: DictConfig, task: pl.LightningModule) -> tuple[str, str]:
    if isinstance(task, LanguageModel):
        return "val/loss", "min"
    return str(cfg.checkpoint.monitor), str(cfg.checkpoint.mode)


def build_callbacks(cfg: DictConfig, task: pl.LightningModule, output_dir: Path) -> list[pl.Callback]:
    monitor, mode = monitored_metric(cfg, task)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_last=cfg.checkpoint.save_last,
            save_top_k=cfg.checkpoint.save_top_k,
        )
    ]
    # OBSPruning goes first: it zeroes pruned gradients before the preconditioner reads them.
    if OmegaConf.select(cfg, "pruning.kind", default=None) == "gradual":
        callbacks.append(_build(cfg.pruning.callback, "pruning.callback"))
    if _enabled(cfg.get("preconditioner")):
        callbacks.append(_build(cfg.preconditioner, "preconditioner"))
    return callbacks


def build_logger(cfg: DictConfig) -> Any:
    if not _enabled(cfg.get("logger")):
        return False
    if "WandbLogger" in cfg.logger._target_:
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.get("offline", True):
            os.environ["WANDB_MODE"] = "offline"
        Path(cfg.logger.save_dir).mkdir(parents=True, exist_ok=True)
    return _build(cfg.logger, "logger")


# ---------------------------------------------------------------------- reporting
def layer_sparsity(task: pl.LightningModule) -> list[tuple[str, int, int]]:
    """``(name, zeros, total)`` for the weights of every Linear and Conv layer."""
    rows = []
    for name, module in task.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            w = module.weight.detach()
            rows.append((f"{name}.weight", int((w == 0).sum()), w.numel()))
    return rows


def _report(trainer: pl.Trainer, task: pl.LightningModule, output_dir: Path, test_metrics: dict[str, float],
            logger: Any) -> dict[str, Any]:
    rows = layer_sparsity(task)
    zeros, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    table = [[name, n, z / n if n else 0.0] for name, z, n in rows]
    with open(output_dir / "sparsity.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "params", "sparsity"])
        writer.writerows(table)
    ckpt = trainer.checkpoint_callback
    summary = {
        "test": test_metrics,
        "global_sparsity": zeros / total if total else 0.0,
        "layers": {name: s for name, _, s in table},
        "output_dir": str(output_dir),
        "checkpoints": str(ckpt.dirpath) if ckpt is not None else None,
        "last_checkpoint": (ckpt.last_model_path or None) if ckpt is not None else None,
        "logger_dir": _logger_dir(logger),
    }
    if logger:
        if hasattr(logger, "log_table"):
            logger.log_table(key="sparsity", columns=["layer", "params", "sparsity"], data=table)
        logger.log_metrics({"final/global_sparsity": summary["global_sparsity"]}, step=trainer.global_step)
        logger.save()
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _logger_dir(logger: Any) -> str | None:
    if not logger:
        return None
    experiment = getattr(logger, "experiment", None)
    run_dir = getattr(experiment, "dir", None)  # W&B: <save_dir>/wandb/offline-run-*/files
    if isinstance(run_dir, str):
        return str(Path(run_dir).parent)
    return getattr(logger, "log_dir", None)


def print_summary(summary: dict[str, Any]) -> None:
    lines = ["", "=" * 64, "mfac-train summary", "=" * 64]
    for key, value in summary["test"].items():
        lines.append(f"{key:<32} {value:.4f}")
    lines.append(f"{'global sparsity':<32} {summary['global_sparsity']:.4f}")
    lines.append("per-layer sparsity:")
    for name, s in summary["layers"].items():
        lines.append(f"  {name:<40} {s:.4f}")
    lines.append(f"{'outputs':<32} {summary['output_dir']}")
    lines.append(f"{'checkpoints':<32} {summary['checkpoints']}")
    lines.append(f"{'logs':<32} {summary['logger_dir']}")
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------- the run
def _oneshot(cfg: DictConfig, task: pl.LightningModule, dm: pl.LightningDataModule) -> None:
    from lightning_mfac import oneshot_prune

    node = {k: v for k, v in OmegaConf.to_container(cfg.pruning, resolve=True).items() if k != "kind"}

    def loss_fn(module: pl.LightningModule, batch: Any) -> torch.Tensor:
        return module.compute_loss(move_data_to_device(batch, module.device))[0]

    try:
        oneshot_prune(task, loss_fn, dm.train_dataloader(), **node)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pruning: {err}") from err


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs one configured experiment; returns the summary (also written to ``summary.json``)."""
    validate_config(cfg)
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm)
    callbacks = build_callbacks(cfg, task, output_dir)
    logger = build_logger(cfg)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer: pl.Trainer = _build(cfg.trainer, "trainer", callbacks=callbacks, logger=logger,
                                 default_root_dir=str(output_dir))
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(task, datamodule=dm, ckpt_path=cfg.ckpt_path)
    if OmegaConf.select(cfg, "pruning.kind", default=None) == "oneshot":
        _oneshot(cfg, task, dm)
    test_metrics: dict[str, float] = {}
    if cfg.test:
        results = trainer.test(task, datamodule=dm, verbose=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    summary = {}
    if trainer.is_global_zero:
        summary = _report(trainer, task, output_dir, test_metrics, logger)
        print_summary(summary)
    summary["optimized"] = float(trainer.callback_metrics.get(cfg.optimized_metric, float("nan")))
    return summary


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        summary = train(cfg)
    except ConfigError as err:
        # A configuration mistake is the user's to fix: one line, no traceback, exit status 2.
        print(f"mfac-train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary["optimized"]


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
