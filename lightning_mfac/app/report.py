"""What a run leaves behind: ``summary.json``, ``sparsity.csv``, PNG plots, and the console summary."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_mfac._files import atomic_write, atomic_write_text

__all__ = ["layer_sparsity", "plot_curves", "plot_sparsity", "print_summary", "write_tables"]


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
    return [(n, int((p.detach() == 0).sum()), p.numel()) for n, p in chosen]


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


def checkpoint_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU as data only (``weights_only=True``): a user-supplied file is
    never unpickled as code, whatever objects it names (what the app writes is tensors and
    plain containers, which load this way)."""
    return torch.load(path, map_location="cpu", weights_only=True)
