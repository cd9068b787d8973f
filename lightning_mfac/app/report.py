"""What a run leaves behind: ``summary.json``, ``sparsity.csv``, PNG plots, the W&B tables and the
console summary."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_mfac._files import atomic_write, atomic_write_text
from lightning_mfac.app.callbacks import MetricHistory
from lightning_mfac.app.checks import ConfigError

__all__ = [
    "checkpoint_callbacks", "layer_sparsity", "optimized_value", "plot_curves", "plot_sparsity", "print_summary",
    "pruning_report", "run_report", "write_tables",
]


def layer_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
    """``(name, zeros, total)`` of the named parameters, default the weights of every Linear and Conv layer."""
    if names is not None:
        params = dict(model.named_parameters())
        chosen = [(n, params[n]) for n in names if n in params]
    else:
        chosen = [
            (f"{prefix}.weight" if prefix else "weight", module.weight)
            for prefix, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        ]
    return [(n, _zeros(p), p.numel()) for n, p in chosen]


def _zeros(param: torch.Tensor) -> int:
    """Zeros of a parameter; of an FSDP2 ``DTensor``, summed over the shards, so every rank of its
    mesh must call this (a ``DTensor`` sum would count only the local shard once read on one rank)."""
    value = param.detach()
    if isinstance(value, DTensor):
        count = (value.to_local() == 0).sum()
        for dim in range(value.device_mesh.ndim):
            if value.placements[dim].is_shard():
                torch.distributed.all_reduce(count, group=value.device_mesh.get_group(dim))
        return int(count)
    return int((value == 0).sum())


def global_sparsity(rows: Sequence[tuple[str, int, int]]) -> float:
    total = sum(r[2] for r in rows)
    return sum(r[1] for r in rows) / total if total else 0.0


def write_tables(output_dir: Path, summary: dict[str, Any]) -> None:
    """``sparsity.csv`` and ``summary.json``, each written whole or not at all (a crash keeps the old file)."""
    with atomic_write(output_dir / "sparsity.csv", "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "params", "sparsity"])
        writer.writerows([name, n, s] for name, (n, s) in summary["layers"].items())
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    try:
        with atomic_write(path) as fh:
            fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)


def plot_curves(rows: list[dict[str, float]], path: Path) -> Path | None:
    """Loss and accuracy per epoch (train and validation) as one PNG; ``None`` without any epoch."""
    if not rows:
        return None
    plt = _pyplot()
    epochs = [r["epoch"] + 1 for r in rows]
    kinds = [k for k in ("loss", "acc", "ppl") if any(f"{s}/{k}" in r for r in rows for s in ("train", "val"))]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for stage, style in (("train", "-o"), ("val", "-s")):
            key = f"{stage}/{kind}"
            points = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=stage, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    _save_figure(plt, fig, path)
    return path


def plot_sparsity(layers: dict[str, tuple[int, float]], path: Path, target: float | None = None) -> Path | None:
    """Sparsity of every layer as a horizontal bar chart (the target as a dashed line)."""
    if not layers:
        return None
    plt = _pyplot()
    names = list(layers)
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.3 * len(names)))
    ax.barh(range(len(names)), [layers[n][1] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of zeros)")
    if target is not None:
        ax.axvline(target, color="tab:red", linestyle="--", label=f"target {target:g}")
        ax.legend(loc="lower right")
    _save_figure(plt, fig, path)
    return path


def print_summary(summary: dict[str, Any]) -> None:
    lines = ["", "=" * 72, "mfac-train summary", "=" * 72]
    for key, value in summary["test"].items():
        lines.append(f"{key:<32} {value:.4f}")
    lines.append(f"{'global sparsity':<32} {summary['global_sparsity']:.4f}")
    pruning = summary.get("pruning")
    if pruning:
        lines.append(f"{'pruning target':<32} {pruning['target']:.4f} ({pruning['kind']}, reached "
                     f"{pruning['reached']:.4f} of the pruned weights)")
        if pruning.get("note"):
            lines.append(f"NOTE: {pruning['note']}")
    lines.append("per-layer sparsity:")
    for name, (_, s) in summary["layers"].items():
        lines.append(f"  {name:<40} {s:.4f}")
    out = Path(summary["output_dir"])

    def rel(path: str | None) -> str:
        return str(Path(path).relative_to(out)) if path and Path(path).is_relative_to(out) else str(path)

    lines.append(f"{'outputs':<32} {out}   (the paths below are in it)")
    best, last = summary["checkpoints"].get("best"), summary["checkpoints"].get("last")
    if last:
        lines.append(f"{'last checkpoint (tested above)':<32} {rel(last)}")
    if best:
        score = best.get("score")
        # Lightning restores the best path but not its score when a resumed run writes elsewhere.
        shown = f"{best['monitor']}={score:.4f}" if score is not None else "from the resumed run; score not restored"
        lines.append(f"{'best checkpoint':<32} {rel(best['path'])} ({shown})")
    lines.append(f"{'plots':<32} {', '.join(rel(p) for p in summary.get('plots', [])) or '-'}")
    lines.append(f"{'logs':<32} {rel(summary['logger_dir']) if summary['logger_dir'] else '-'}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------- the run's report
#: Below the target by more than this (a fraction of the pruned weights), a run says so.
UNDER_TARGET_TOLERANCE = 0.005


def checkpoint_callbacks(trainer: pl.Trainer) -> tuple[ModelCheckpoint | None, ModelCheckpoint | None]:
    """``(best, last)``: the monitored ModelCheckpoint and the unmonitored one that keeps the last epoch."""
    best = last = None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.monitor is None and last is None:
                last = cb
            elif cb.monitor is not None and best is None:
                best = cb
    return best, last


def optimized_value(cfg: DictConfig, trainer: pl.Trainer) -> float:
    key = str(cfg.optimized_metric)
    value = trainer.callback_metrics.get(key)
    if value is None:
        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        raise ConfigError(f"optimized_metric={key!r} was not logged by validation: expected one of {logged}.")
    return float(value)


def pruning_report(cfg: DictConfig, task: pl.LightningModule, trainer: pl.Trainer,
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


def run_report(cfg: DictConfig, trainer: pl.Trainer, task: pl.LightningModule, output_dir: Path,
            test_metrics: dict[str, float], logger: Any, pruning: dict[str, Any] | None,
            objective: float, rows: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
    """The run's summary (written, logged and plotted); ``rows`` is ``layer_sparsity(task)``,
    counted on every rank since FSDP2 shards are counted together."""
    layers = {name: (n, z / n if n else 0.0) for name, z, n in rows}
    best, last = checkpoint_callbacks(trainer)
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

