"""How ``mfac-train`` turns a checked config into Lightning objects: the data module, the task with
its model, optimizer and scheduler, the callbacks and the logger."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from lightning_mfac.app.checks import ConfigError, check_data, enabled
from lightning_mfac.app.tasks import TASKS

#: Model arguments that ``auto`` fills from the data module.
AUTO_FROM_DATA = {
    "num_classes": "num_classes",
    "num_labels": "num_classes",
    "in_channels": "in_channels",
    "vocab_size": "vocab_size",
}


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` with errors that say which config node failed."""
    try:
        return instantiate(cfg, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the key
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from err


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    dm = build(cfg.data, "data")
    # The model's size (classes, channels, vocabulary) comes from the data.
    try:
        dm.prepare_data()
        dm.setup("fit")
    except (ValueError, TypeError) as err:  # a setting the data cannot satisfy (e.g. splits over 100%)
        raise ConfigError(f"data: {str(err).splitlines()[0]}") from err
    check_data(cfg, dm)
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
    model = build(OmegaConf.create(model_cfg), "model")
    optimizer = build(cfg.optimizer, "optimizer") if enabled(cfg.get("optimizer")) else None
    scheduler = build(cfg.scheduler, "scheduler") if enabled(cfg.get("scheduler")) else None
    return TASKS[kind](model, optimizer=optimizer, lr_scheduler=scheduler)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Every entry of the ``callbacks`` group, then the pruning and preconditioner callbacks.

    OBSPruning goes before MFACPreconditioner: it zeroes pruned gradients before the
    preconditioner reads them. A progress bar is left out under ``trainer.enable_progress_bar=false``
    and a learning-rate monitor under ``logger=none`` (Lightning refuses both combinations).
    """
    nodes: list[tuple[str, Any]] = [(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items()]
    if OmegaConf.select(cfg, "pruning.kind", default=None) == "gradual":
        nodes.append(("pruning.callback", cfg.pruning.callback))
    nodes.append(("preconditioner", cfg.get("preconditioner")))
    callbacks = []
    show_bar = OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True)
    logged = enabled(cfg.get("logger"))
    for key, node in nodes:
        if not enabled(node):
            continue
        callback = build(node, key)
        if (isinstance(callback, ProgressBar) and not show_bar) or (
            isinstance(callback, LearningRateMonitor) and not logged
        ):
            continue
        callbacks.append(callback)
    return callbacks


def run_names(cfg: DictConfig) -> tuple[str, str | None, list[str]]:
    """``(run name, sweep group, overrides)`` of this job: W&B names every job of a multirun apart."""
    if not HydraConfig.initialized():
        return str(cfg.task_name), None, []
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    suffix = hc.job.override_dirname
    name = f"{cfg.task_name}" + (f"[{suffix}]" if suffix else "")
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = f"{cfg.task_name}/{Path(hc.sweep.dir).name}"
        name = f"{hc.job.num}:{name}"
    return name, group, overrides


def build_logger(cfg: DictConfig) -> Any:
    if not enabled(cfg.get("logger")):
        return False
    kwargs: dict[str, Any] = {}
    if "WandbLogger" in cfg.logger._target_:
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.get("offline", True):
            os.environ["WANDB_MODE"] = "offline"
        Path(cfg.logger.save_dir).mkdir(parents=True, exist_ok=True)
        name, group, _ = run_names(cfg)
        if cfg.logger.get("name") is None:
            kwargs["name"] = name
        if cfg.logger.get("group") is None and group is not None:
            kwargs["group"] = group
    return build(cfg.logger, "logger", **kwargs)


def finish_logger(logger: Any) -> None:
    # Each job its own W&B run: without finish(), the next job of a multirun writes into this one.
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()
