"""One ``mfac-train`` run: check, assemble, fit, prune, test, report (:func:`train`), and the
Hydra entry that turns the user's mistakes into one line and an exit code."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf

from lightning_mfac._files import DiskFullError
from lightning_mfac.app import config_dir
from lightning_mfac.app.assembly import (
    build,
    build_callbacks,
    build_datamodule,
    build_logger,
    build_task,
    finish_logger,
    run_names,
)
from lightning_mfac.app.callbacks import TrainingDiverged
from lightning_mfac.app.checks import (
    ConfigError,
    check_resume,
    check_window_memory,
    fit_pruning_schedule,
    validate_config,
)
from lightning_mfac.app.report import (
    checkpoint_callbacks,
    layer_sparsity,
    optimized_value,
    print_summary,
    pruning_report,
    run_report,
)
from lightning_mfac.callbacks.window_shards import use_window_shard_checkpoint_io
from lightning_mfac.fisher.storage import WindowMemoryError


def _quiet_lightning() -> None:
    # Lightning 2.6 on torch >= 2.10 warns about its own use of torch's pytree API on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    """No advertising on the console: Lightning's litlogger tip is dropped, and its note that the
    configured ModelSummary replaces the default one; everything else is kept."""
    noise = ("litlogger", "Skipping setting a default `ModelSummary`")

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not any(n in message for n in noise)

    for name in ("lightning.pytorch", "lightning.fabric"):
        target = logging.getLogger(name)
        for handler in [*target.handlers, None]:
            (handler or target).addFilter(_NoTips())


def _oneshot(cfg: DictConfig, task: pl.LightningModule, dm: pl.LightningDataModule) -> dict[str, torch.Tensor]:
    from lightning_mfac import oneshot_prune

    # A preset's gradual settings (pruning.callback) do not apply to one-shot pruning.
    node = {k: v for k, v in OmegaConf.to_container(cfg.pruning, resolve=True).items() if k not in ("kind", "callback")}

    def loss_fn(module: pl.LightningModule, batch: Any) -> torch.Tensor:
        return module.compute_loss(move_data_to_device(batch, module.device))[0]

    try:
        return oneshot_prune(task, loss_fn, dm.train_dataloader(), **node)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pruning: {err}") from err


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs one configured experiment; returns the summary (also written to ``summary.json``)."""
    validate_config(cfg)
    schedule_note = fit_pruning_schedule(cfg)
    if schedule_note:
        print(f"mfac-train: note: {schedule_note}.", file=sys.stderr, flush=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm)
    check_resume(cfg, task)
    check_window_memory(cfg, task)
    callbacks = build_callbacks(cfg)
    logger = build_logger(cfg)
    try:
        trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=logger,
                                     default_root_dir=str(output_dir))
        use_window_shard_checkpoint_io(trainer)
        if logger:
            _, _, overrides = run_names(cfg)
            logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "overrides": overrides})
        try:
            # weights_only: a checkpoint is data; nothing in a user's file runs as code.
            trainer.fit(task, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        except FloatingPointError as err:  # an M-FAC window that cannot be factorized
            raise TrainingDiverged(f"training diverged: {err}") from err
        except WindowMemoryError as err:  # one the checks could not size (a parameter selection, OBS)
            raise ConfigError(str(err)) from err
        if str(cfg.optimized_metric) not in trainer.callback_metrics:
            # Resuming a run that had already finished trains no epoch, so validation never ran.
            trainer.validate(task, datamodule=dm, verbose=False)
        objective = optimized_value(cfg, trainer)
        masks = None
        _, last = checkpoint_callbacks(trainer)
        if OmegaConf.select(cfg, "pruning.kind", default=None) == "oneshot":
            masks = _oneshot(cfg, task, dm)
            trainer.validate(task, datamodule=dm, verbose=False)
            objective = optimized_value(cfg, trainer)
            if last is not None and last.dirpath is not None:
                # The saved model is the one the summary describes: the pruned one.
                path = Path(last.dirpath) / f"{last.filename or 'last'}{last.FILE_EXTENSION}"
                trainer.save_checkpoint(path, weights_only=False)  # explicit, or Lightning logs its default
                last.last_model_path = last.best_model_path = str(path)
        test_metrics: dict[str, float] = {}
        if cfg.test:
            results = trainer.test(task, datamodule=dm, verbose=False)
            test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        summary: dict[str, Any] = {"optimized": objective}
        # Every rank counts: an FSDP2 rank holds only its shards of the weights.
        rows, pruning = layer_sparsity(task), pruning_report(cfg, task, trainer, masks, schedule_note)
        if trainer.is_global_zero:
            summary = run_report(cfg, trainer, task, output_dir, test_metrics, logger, pruning, objective, rows)
            print_summary(summary)
            note = (summary.get("pruning") or {}).get("note")
            if note:
                print(f"mfac-train: warning: {note}.", file=sys.stderr, flush=True)
        return summary
    finally:
        finish_logger(logger)


def _discard_output_dir() -> None:
    """A rejected run leaves nothing behind: its Hydra output folder goes, and empty parents up to the cwd."""
    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or cwd.is_relative_to(out):
        return
    shutil.rmtree(out / ".hydra", ignore_errors=True)
    for log in out.glob("*.log"):
        log.unlink(missing_ok=True)
    for sub in ("checkpoints", "wandb"):
        if (out / sub).is_dir() and not any((out / sub).rglob("*.ckpt")):
            shutil.rmtree(out / sub, ignore_errors=True)
    path = out
    while path != cwd and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def _run_label(override_dirname: str) -> str:
    """The overrides as a folder-name suffix: ``_optimizer-adamw_seed-1`` (bounded).

    ``=`` and ``,`` become ``-`` and ``_``: a path holding them could not be passed back as an
    override (``ckpt_path=<run>/checkpoints/last.ckpt``). Plain overrides come before
    ``+key``/``~key`` ones (usually limits and debugging additions), so a long list is cut where
    it matters least.
    """
    if not override_dirname:
        return ""
    items = override_dirname.split(",")
    items = [i for i in items if not i.startswith(("+", "~"))] + [i for i in items if i.startswith(("+", "~"))]
    items = [re.sub(r"[^A-Za-z0-9.+_-]", "-", i.lstrip("~").replace("=", "-", 1)) for i in items]
    label = "_".join(items)
    return "_" + (label if len(label) <= 80 else label[:80] + "+")


OmegaConf.register_new_resolver("mfac_run_label", _run_label, replace=True)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """The run Hydra launches: the optimized value for sweepers; user errors become one line and an exit code."""
    _quiet_lightning()
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg)
    except (ConfigError, TrainingDiverged) as err:
        # The user's to fix: one line, no traceback, a non-zero exit.
        print(f"mfac-train: error: {err}", file=sys.stderr, flush=True)
        if isinstance(err, ConfigError):
            _discard_output_dir()
        if multirun:
            raise  # the sweeper records a failed job and goes on
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    except DiskFullError as err:
        # Every file was written whole or not at all: the last good checkpoint is still there.
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:  # one line, not one per rank
            print(f"mfac-train: error: {err.strerror}; free space there (or set hydra.run.dir to another disk) "
                  "and resume with ckpt_path=<the last checkpoint>.", file=sys.stderr, flush=True)
        if multirun:
            raise
        raise SystemExit(1) from None
    return summary["optimized"]
