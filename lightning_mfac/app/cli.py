"""``mfac-train``: the Hydra + Lightning + W&B experiment app.

``mfac-train`` with no arguments runs the offline quickstart; every config group in ``conf/``
can be swapped from the command line (``optimizer=adamw``, ``experiment=resnet20_cifar10_mfac``,
``-m optimizer=sgd,mfac`` …). ``mfac-train --help`` lists the groups and their options.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_mfac import _validation as check
from lightning_mfac._files import DiskFullError
from lightning_mfac.app import config_dir
from lightning_mfac.app.callbacks import MetricHistory, TrainingDiverged
from lightning_mfac.app.report import (
    checkpoint_state,
    global_sparsity,
    layer_sparsity,
    plot_curves,
    plot_sparsity,
    print_summary,
    write_tables,
)
from lightning_mfac.app.tasks import ImageClassifier, LanguageModel, SequenceClassifier
from lightning_mfac.callbacks.window_shards import use_window_shard_checkpoint_io, window_files
from lightning_mfac.fisher.storage import DEFAULT_SHARD_DIR

TASKS = {"image": ImageClassifier, "sequence": SequenceClassifier, "language_model": LanguageModel}
#: Model arguments that ``auto`` fills from the data module.
AUTO_FROM_DATA = {
    "num_classes": "num_classes",
    "num_labels": "num_classes",
    "in_channels": "in_channels",
    "vocab_size": "vocab_size",
}
#: Below the target by more than this (a fraction of the pruned weights), a run says so.
UNDER_TARGET_TOLERANCE = 0.005


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


def _enabled(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _is_mfac_optimizer(cfg: DictConfig) -> bool:
    target = str(OmegaConf.select(cfg, "optimizer._target_", default="") or "")
    return target.rsplit(".", 1)[-1] == "MFAC"


#: Targets that need a package of an optional extra: (module, extra).
OPTIONAL_PACKAGES = {
    "lightning_mfac.app.baselines.singd": ("singd", "baselines"),
    "lightning_mfac.app.baselines.shampoo": ("pytorch_optimizer", "baselines"),
    "lightning_mfac.app.baselines.soap": ("pytorch_optimizer", "baselines"),
    "lightning_mfac.app.baselines.muon": ("pytorch_optimizer", "baselines"),
    "lightning_mfac.app.models.bert_classifier": ("transformers", "nlp"),
    "lightning_mfac.app.models.gpt_lm": ("transformers", "nlp"),
    "lightning_mfac.app.data.GLUEDataModule": ("datasets", "nlp"),
}


def _targets(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """``(config key, _target_)`` of every instantiated object in the config."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield key or "<root>", node["_target_"]
        for k, v in node.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))


def _check_optional_packages(cfg: DictConfig) -> None:
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    for key, target in _targets({k: v for k, v in tree.items() if k != "hydra"}):
        if target in OPTIONAL_PACKAGES:
            module, extra = OPTIONAL_PACKAGES[target]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"{key} ({target.rsplit('.', 1)[-1]}) needs the `{module}` package, which is not "
                    f'installed: pip install "lightning-mfac[{extra}]".'
                )


def validate_config(cfg: DictConfig) -> None:
    """Fail before any training starts, naming the offending key."""
    _check_optional_packages(cfg)
    _number(cfg, "seed", integer=True)
    for key in ("optimizer.lr", "optimizer.weight_decay"):
        _number(cfg, key, minimum=0)
    _number(cfg, "optimizer.momentum", minimum=0, below=1)
    for node in ("optimizer", "preconditioner"):
        _number(cfg, f"{node}.ngrads", minimum=1, integer=True)
        _number(cfg, f"{node}.damp", minimum=0, strict=True)
        damp = OmegaConf.select(cfg, f"{node}.damp", default=None)
        if damp is not None:
            try:  # the library's range (the step's float32 arithmetic), checked before any training
                check.damping(f"{node}.damp", damp)
            except ValueError as err:
                raise ConfigError(str(err)) from None
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
    if _is_mfac_optimizer(cfg) and _enabled(cfg.get("preconditioner")):
        # F⁻¹ applied twice: the steps shrink by another factor of the Fisher and learning stalls.
        raise ConfigError(
            "optimizer=mfac with preconditioner=mfac would precondition every gradient twice: "
            "use optimizer=mfac preconditioner=none, or keep preconditioner=mfac with another optimizer."
        )
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={ckpt!r} does not exist (expected a .ckpt file written by mfac-train).")


def fit_pruning_schedule(cfg: DictConfig) -> str | None:
    """Fit a gradual schedule into ``trainer.max_epochs``; returns what was changed, if anything.

    The last pruning step runs at the start of its epoch, so it must be an epoch the run reaches.
    Named schedules (cubic, linear) are scaled into the run; an explicit list is refused.
    """
    from lightning_mfac.pruning import gradual_schedule

    if OmegaConf.select(cfg, "pruning.kind", default=None) != "gradual":
        return None
    node = cfg.pruning.callback
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if not isinstance(max_epochs, int) or max_epochs < 1:
        return None  # a step-bounded run: its length in epochs is unknown here
    start, end, freq = node.get("start_epoch", 0), node.get("end_epoch"), node.get("frequency", 1)
    schedule = node.get("schedule", "cubic")
    try:
        steps = gradual_schedule(node.get("sparsity"), OmegaConf.to_object(schedule) if OmegaConf.is_config(schedule)
                                 else schedule, start, end, freq)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pruning.callback: {err}") from err
    last = steps[-1][0]
    if last < max_epochs:
        return None
    if not isinstance(schedule, str):
        raise ConfigError(
            f"pruning.callback.schedule ends at epoch {last}, but trainer.max_epochs={max_epochs} stops before it: "
            f"give a schedule whose last step is at most epoch {max_epochs - 1}, or raise trainer.max_epochs."
        )
    new_end = max_epochs - 1
    scale = new_end / last if last else 0.0
    new_start = min(int(start * scale), new_end)
    new_freq = max(1, int(freq * scale))
    with open_dict(node):
        node.start_epoch, node.end_epoch, node.frequency = new_start, new_end, new_freq
    return (
        f"the pruning schedule (epochs {start}..{last}) does not fit trainer.max_epochs={max_epochs}: "
        f"scaled to epochs {new_start}..{new_end} (every {new_freq}) so the run reaches its target"
    )


def _build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` with errors that say which config node failed."""
    try:
        return instantiate(cfg, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the key
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from err


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


def check_resume(cfg: DictConfig, task: pl.LightningModule) -> None:
    """A checkpoint that cannot resume this run fails here, in one line, before any training."""
    path = cfg.get("ckpt_path")
    if path is None:
        return
    try:
        state = checkpoint_state(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated or not a "
                          f"PyTorch file: {reason}).") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"ckpt_path={str(path)!r} is not a Lightning checkpoint (it has no 'state_dict').")
    saved, own = state["state_dict"], task.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise ConfigError(
            f"ckpt_path={str(path)!r} was saved from a different model than model={cfg.model._target_}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} mis-shaped tensors "
            f"(e.g. {example!r})."
        )
    try:
        files = list(window_files(state))
    except (ValueError, KeyError, TypeError) as err:  # a crafted or damaged manifest
        raise ConfigError(f"ckpt_path={str(path)!r} holds a bad sharded-window manifest: {err}") from None
    for file in files:
        # A DDP run's window lives in per-rank files beside the checkpoint; without them the resume
        # would fail inside fit, after the run folder and the logger were set up.
        if not Path(file).is_file():
            raise ConfigError(
                f"ckpt_path={str(path)!r} refers to the sharded M-FAC window file {file!r}, which does not "
                "exist: copy the run's mfac-window-shards folder along with the checkpoint."
            )
    pruned = [k for k in state.get("callbacks", {}) if str(k).startswith("OBSPruning")]
    if pruned and OmegaConf.select(cfg, "pruning.kind", default=None) != "gradual":
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds the masks of a gradual pruning run; resuming it without "
            "pruning would let the pruned weights grow back: resume with the same pruning= choice "
            "(e.g. pruning=mfac)."
        )


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
    logged = _enabled(cfg.get("logger"))
    for key, node in nodes:
        if not _enabled(node):
            continue
        callback = _build(node, key)
        if (isinstance(callback, ProgressBar) and not show_bar) or (
            isinstance(callback, LearningRateMonitor) and not logged
        ):
            continue
        callbacks.append(callback)
    return callbacks


def _run_names(cfg: DictConfig) -> tuple[str, str | None, list[str]]:
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
    if not _enabled(cfg.get("logger")):
        return False
    kwargs: dict[str, Any] = {}
    if "WandbLogger" in cfg.logger._target_:
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.get("offline", True):
            os.environ["WANDB_MODE"] = "offline"
        Path(cfg.logger.save_dir).mkdir(parents=True, exist_ok=True)
        name, group, _ = _run_names(cfg)
        if cfg.logger.get("name") is None:
            kwargs["name"] = name
        if cfg.logger.get("group") is None and group is not None:
            kwargs["group"] = group
    return _build(cfg.logger, "logger", **kwargs)


def _finish_logger(logger: Any) -> None:
    # Each job its own W&B run: without finish(), the next job of a multirun writes into this one.
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()


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


# ---------------------------------------------------------------------- the run
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


def _checkpoints(trainer: pl.Trainer) -> tuple[ModelCheckpoint | None, ModelCheckpoint | None]:
    """``(best, last)``: the monitored ModelCheckpoint and the unmonitored one that keeps the last epoch."""
    best = last = None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.monitor is None and last is None:
                last = cb
            elif cb.monitor is not None and best is None:
                best = cb
    return best, last


def _objective(cfg: DictConfig, trainer: pl.Trainer) -> float:
    key = str(cfg.optimized_metric)
    value = trainer.callback_metrics.get(key)
    if value is None:
        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        raise ConfigError(f"optimized_metric={key!r} was not logged by validation: expected one of {logged}.")
    return float(value)


def _pruning_report(cfg: DictConfig, task: pl.LightningModule, trainer: pl.Trainer,
                    oneshot_masks: dict[str, torch.Tensor] | None, schedule_note: str | None) -> dict[str, Any] | None:
    from lightning_mfac.callbacks import OBSPruning

    kind = OmegaConf.select(cfg, "pruning.kind", default=None)
    if kind == "gradual":
        callback = next((c for c in trainer.callbacks if isinstance(c, OBSPruning)), None)
        if callback is None:
            return None
        names, target = list(callback.masks or {}), float(callback.sparsity)
    elif kind == "oneshot" and oneshot_masks is not None:
        names, target = list(oneshot_masks), float(cfg.pruning.sparsity)
    else:
        return None
    reached = global_sparsity(layer_sparsity(task, names)) if names else 0.0
    note = None
    if reached < target - UNDER_TARGET_TOLERANCE:
        note = (f"the run ended at sparsity {reached:.4f}, below its target {target:.4f} "
                "(the schedule did not reach its last step)")
    return {"kind": kind, "target": target, "reached": reached, "note": note, "schedule": schedule_note}


def place_window_shards(cfg: DictConfig, shard_dir: Path) -> None:
    """Sharded M-FAC windows (DDP) write their per-rank checkpoint files into the run folder, not
    the working directory: the optimizer's and the preconditioner's ``window.shard_dir`` default
    to ``shard_dir``."""
    for group in ("optimizer", "preconditioner"):
        window = OmegaConf.select(cfg, f"{group}.window", default=None)
        if isinstance(window, DictConfig) and window.get("shard_dir") is None:
            with open_dict(window):
                window.shard_dir = str(shard_dir)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs one configured experiment; returns the summary (also written to ``summary.json``)."""
    validate_config(cfg)
    schedule_note = fit_pruning_schedule(cfg)
    if schedule_note:
        print(f"mfac-train: note: {schedule_note}.", file=sys.stderr, flush=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    place_window_shards(cfg, output_dir / DEFAULT_SHARD_DIR)
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm)
    check_resume(cfg, task)
    callbacks = build_callbacks(cfg)
    logger = build_logger(cfg)
    try:
        trainer: pl.Trainer = _build(cfg.trainer, "trainer", callbacks=callbacks, logger=logger,
                                     default_root_dir=str(output_dir))
        use_window_shard_checkpoint_io(trainer)
        if logger:
            _, _, overrides = _run_names(cfg)
            logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "overrides": overrides})
        try:
            # weights_only: a checkpoint is data; nothing in a user's file runs as code.
            trainer.fit(task, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        except FloatingPointError as err:  # an M-FAC window that cannot be factorized
            raise TrainingDiverged(f"training diverged: {err}") from err
        if str(cfg.optimized_metric) not in trainer.callback_metrics:
            # Resuming a run that had already finished trains no epoch, so validation never ran.
            trainer.validate(task, datamodule=dm, verbose=False)
        objective = _objective(cfg, trainer)
        masks = None
        _, last = _checkpoints(trainer)
        if OmegaConf.select(cfg, "pruning.kind", default=None) == "oneshot":
            masks = _oneshot(cfg, task, dm)
            trainer.validate(task, datamodule=dm, verbose=False)
            objective = _objective(cfg, trainer)
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
        if trainer.is_global_zero:
            summary = _report(cfg, trainer, task, output_dir, test_metrics, logger,
                              _pruning_report(cfg, task, trainer, masks, schedule_note), objective)
            print_summary(summary)
            note = (summary.get("pruning") or {}).get("note")
            if note:
                print(f"mfac-train: warning: {note}.", file=sys.stderr, flush=True)
        return summary
    finally:
        _finish_logger(logger)


def _report(cfg: DictConfig, trainer: pl.Trainer, task: pl.LightningModule, output_dir: Path,
            test_metrics: dict[str, float], logger: Any, pruning: dict[str, Any] | None,
            objective: float) -> dict[str, Any]:
    rows = layer_sparsity(task)
    layers = {name: (n, z / n if n else 0.0) for name, z, n in rows}
    best, last = _checkpoints(trainer)
    checkpoints: dict[str, Any] = {"dir": str(best.dirpath) if best is not None else None}
    if best is not None and best.best_model_path:
        score = best.best_model_score
        checkpoints["best"] = {"path": best.best_model_path, "monitor": best.monitor,
                               "score": float(score) if score is not None else None}
    if last is not None:
        checkpoints["last"] = last.last_model_path or last.best_model_path or None
    history = next((c.rows for c in trainer.callbacks if isinstance(c, MetricHistory)), [])
    plots = [p for p in (plot_curves(history, output_dir / "curves.png"),
                         plot_sparsity(layers, output_dir / "sparsity.png", pruning["target"] if pruning else None))
             if p is not None]
    summary = {
        # What a sweep optimizes: optimized_metric of the final model on the validation set.
        "optimized": objective,
        "optimized_metric": str(cfg.optimized_metric),
        "test": test_metrics,
        "tested_model": "last" if last is not None else "end of training",
        "global_sparsity": global_sparsity(rows),
        "pruning": pruning,
        "layers": layers,
        "output_dir": str(output_dir),
        "checkpoints": checkpoints,
        "plots": [str(p) for p in plots],
        "logger_dir": _logger_dir(logger),
    }
    if logger:
        _log_report(logger, trainer, summary, history, plots)
    write_tables(output_dir, summary)
    return summary


def _log_report(logger: Any, trainer: pl.Trainer, summary: dict[str, Any], history: list[dict[str, float]],
                plots: list[Path]) -> None:
    layers = summary["layers"]
    final = {"final/global_sparsity": summary["global_sparsity"]}
    final.update({f"final/{k}": v for k, v in summary["test"].items()})
    logger.log_metrics(final, step=trainer.global_step)
    if hasattr(logger, "log_table"):
        logger.log_table(key="sparsity", columns=["layer", "params", "sparsity"],
                         data=[[name, n, s] for name, (n, s) in layers.items()])
        if history:
            columns = sorted({k for row in history for k in row})
            logger.log_table(key="curves", columns=columns,
                             data=[[row.get(c, float("nan")) for c in columns] for row in history])
    if hasattr(logger, "log_image"):
        for plot in plots:  # one key each: W&B shows images of different sizes badly under one key
            logger.log_image(key=f"plots/{plot.stem}", images=[str(plot)])
    logger.save()


def _logger_dir(logger: Any) -> str | None:
    if not logger:
        return None
    experiment = getattr(logger, "experiment", None)
    run_dir = getattr(experiment, "dir", None)  # W&B: <save_dir>/wandb/offline-run-*/files
    if isinstance(run_dir, str):
        return str(Path(run_dir).parent)
    return getattr(logger, "log_dir", None)


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
def _hydra_main(cfg: DictConfig) -> float:
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


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
