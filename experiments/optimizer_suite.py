"""Side-by-side of M-FAC and its baselines on three offline tasks where curvature matters.

Tasks (all data ships with scikit-learn or Python itself; nothing is downloaded):

* ``digits_cnn``: scikit-learn's 8x8 digits (``DigitsDataModule``'s seeded 70/15/15 split), the
  quickstart CNN (9.8K parameters), cross-entropy, batch 64;
* ``autoencoder``: the same images through a deep tanh autoencoder 64-48-24-12-6-12-24-48-64 with a
  linear 6-unit code (9.4K parameters), Bernoulli cross-entropy on the pixel intensities, batch 128:
  the classic hard optimisation benchmark of the K-FAC / Shampoo literature, scaled to 8x8;
* ``char_lm``: a 2-layer pre-norm Transformer (width 24, 4 heads, context 32; 14K parameters) predicting the next
  character of Python's own ``pydoc_data.topics`` text (first 90 % train, last 10 % validation),
  batch 32 sequences.

Optimizers (every one runs every learning rate of its 5-point log grid with every seed):

* ``sgd`` (momentum 0.9), ``adamw`` (weight decay 1e-2);
* ``mfac``: the ``MFAC`` optimizer, momentum 0; ``mfac+adam``: the same with ``graft="adam"``
  (AdamW's lr grid: grafting is meant to keep the lr tuned for Adam);
* ``sgd+mfac``: SGD (momentum 0.9) + ``MFACPreconditioner``; ``sgd+mfac+sgd``: the same with
  ``graft="sgd"`` (SGD's lr grid);
* ``singd`` (dense factors, T = 10), ``shampoo`` (RMSProp-grafted, so Adam-like lrs), ``soap``,
  ``muon`` (its AdamW part for the head, embeddings, biases and norms at lr/10) via the app's
  baseline adapters.

M-FAC uses a window of ``m = 256`` gradients (the paper's regime starts there) and ``damp`` (see
``--damp``); every task runs more steps than ``m`` so the window fills. All runs use a cosine
learning-rate decay to 0 over the run. Jobs go round (seed, lr, task, optimizer) so optimizers are
interleaved in time: on a shared machine the load spreads over all of them, which keeps the
equal-wall-clock comparison fair *within* one run of the suite.

Reported per task and optimizer: the lr with the lowest mean final validation loss, the final
training (full training set) and validation loss there (mean ± std over seeds), the loss at the
grafted method's tuned lr for the grafted M-FAC variants, the training loss at equal wall-clock
time (the time SGD's best-lr runs took), and the lr sensitivity (final validation loss of every
grid lr: one PNG per task). JSON keeps every run's evaluations.

    python experiments/optimizer_suite.py                 # defaults: ~20-30 min on 2 CPU cores
    python experiments/optimizer_suite.py --quick         # smoke run, < 3 min
    python experiments/optimizer_suite.py --study damp    # lr x damp sensitivity of M-FAC (see --help)
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    steps: int
    batch_size: int
    m: int


@functools.cache
def _digits() -> dict[str, torch.Tensor]:
    from lightning_mfac.app.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    (xt, yt), (xv, yv) = dm.train_set.tensors, dm.val_set.tensors
    return {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv}


@functools.cache
def _text() -> dict[str, Any]:
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    # Characters seen fewer than 100 times (mostly non-ASCII) share one "unknown" id.
    vocab = sorted(ch for ch, n in counts.items() if n >= 100)
    index = {ch: i + 1 for i, ch in enumerate(vocab)}
    ids = torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return {"train": ids[:cut], "val": ids[cut:], "vocab": len(vocab) + 1}


class AutoEncoder(nn.Module):
    def __init__(self, sizes=(64, 48, 24, 12, 6)) -> None:
        super().__init__()
        dims = list(sizes) + list(reversed(sizes[:-1]))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            # Linear code layer (as in Hinton & Salakhutdinov), tanh elsewhere, logits out.
            if i < len(dims) - 2 and b != sizes[-1]:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # nn.Linear projections (not nn.MultiheadAttention) so SINGD preconditions them too.
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ff1, self.ff2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab: int, width: int = 24, layers: int = 2, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, 2 * width) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)  # registered last: Muon's adapter leaves the head to AdamW

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


CONTEXT = 32


class Task:
    """Data, model, loss and batches of one task (built once per worker process)."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "digits_cnn":
            d = _digits()
            self.train, self.val = (d["x_train"], d["y_train"]), (d["x_val"], d["y_val"])
        elif name == "autoencoder":
            d = _digits()
            self.train, self.val = (d["x_train"].flatten(1),), (d["x_val"].flatten(1),)
        elif name == "char_lm":
            t = _text()
            self.vocab = t["vocab"]
            self.ids = {"train": t["train"], "val": t["val"]}
            # Fixed evaluation windows: 256 evenly spaced ones from each split.
            self.eval_starts = {
                k: torch.linspace(0, len(v) - CONTEXT - 2, 256).long() for k, v in self.ids.items()
            }
        else:
            raise ValueError(f"task={name!r} is invalid: expected one of {list(TASKS)}")

    def model(self) -> nn.Module:
        if self.name == "digits_cnn":
            from lightning_mfac.app.models import quickstart_cnn

            return quickstart_cnn(num_classes=10, in_channels=1)
        if self.name == "autoencoder":
            return AutoEncoder()
        return CharLM(self.vocab)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.name == "digits_cnn":
            return F.cross_entropy(model(batch[0]), batch[1])
        if self.name == "autoencoder":
            return F.binary_cross_entropy_with_logits(model(batch[0]), batch[0], reduction="sum") / len(batch[0])
        logits = model(batch[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def _windows(self, split: str, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(CONTEXT + 1)
        chunk = self.ids[split][idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, steps: int, batch_size: int, gen: torch.Generator):
        if self.name == "char_lm":
            n = len(self.ids["train"]) - CONTEXT - 1
            for _ in range(steps):
                yield self._windows("train", torch.randint(0, n, (batch_size,), generator=gen))
            return
        n = len(self.train[0])
        perm = torch.randperm(n, generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            yield tuple(t[idx] for t in self.train)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, full: bool = True) -> float:
        """Loss on the split; ``full=False`` (the curve points between start and end) uses a fixed
        quarter of the evaluation set, so that evaluating costs little next to training."""
        model.eval()
        if self.name == "char_lm":
            starts = self.eval_starts[split]
            batch = self._windows(split, starts if full else starts[::4])
        else:
            batch = self.train if split == "train" else self.val
            if not full:
                batch = tuple(t[: len(t) // 4] for t in batch)
        loss = self.loss(model, batch).item()
        model.train()
        return loss


TASKS: dict[str, TaskSpec] = {
    "digits_cnn": TaskSpec(steps=300, batch_size=64, m=256),
    "autoencoder": TaskSpec(steps=300, batch_size=128, m=256),
    "char_lm": TaskSpec(steps=300, batch_size=32, m=256),
}

# ---------------------------------------------------------------------- optimizers

SGD_GRID = [0.01, 0.03, 0.1, 0.3, 1.0]
ADAM_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def _sgd_mfac(model, lr, m, damp, graft=None, damp_mode=None):
    from lightning_mfac import MFACPreconditioner

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    kw = {} if damp_mode is None else {"damp_mode": damp_mode}
    cb = MFACPreconditioner(ngrads=m, damp=damp, log_stats=False, graft=graft, **kw)
    # What Lightning passes to the hook, reduced to the attributes the callback reads.
    trainer = SimpleNamespace(optimizers=[opt], precision_plugin=SimpleNamespace(scaler=None))
    return opt, lambda: cb.on_before_optimizer_step(trainer, model, opt)


def _mfac(model, lr, m, damp, graft=None, damp_mode=None):
    from lightning_mfac import MFAC

    kw = {} if damp_mode is None else {"damp_mode": damp_mode}
    return MFAC(model.parameters(), lr=lr, ngrads=m, damp=damp, graft=graft, **kw), None


def _baseline(name, model, lr):
    from lightning_mfac.app.baselines import muon, shampoo, singd, soap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SINGD names the layers it leaves to plain SGD
        if name == "singd":
            return singd(model.parameters(), model=model, lr=lr)
        if name == "shampoo":
            return shampoo(model.parameters(), lr=lr)
        if name == "soap":
            return soap(model.parameters(), lr=lr)
        return muon(model.parameters(), model=model, lr=lr, adamw_lr=lr / 10)


#: name -> (lr grid, builder(model, lr, m, damp, damp_mode) -> (optimizer, hook before step or None))
OPTIMIZERS: dict[str, tuple[list[float], Any]] = {
    "sgd": (SGD_GRID, lambda mdl, lr, *_: (torch.optim.SGD(mdl.parameters(), lr=lr, momentum=0.9), None)),
    "adamw": (ADAM_GRID, lambda mdl, lr, *_: (torch.optim.AdamW(mdl.parameters(), lr=lr, weight_decay=1e-2), None)),
    "mfac": ([1e-3, 3e-3, 1e-2, 3e-2, 0.1], lambda mdl, lr, m, d, dm: _mfac(mdl, lr, m, d, None, dm)),
    "mfac+adam": (ADAM_GRID, lambda mdl, lr, m, d, dm: _mfac(mdl, lr, m, d, "adam", dm)),
    "sgd+mfac": ([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], lambda mdl, lr, m, d, dm: _sgd_mfac(mdl, lr, m, d, None, dm)),
    "sgd+mfac+sgd": (SGD_GRID, lambda mdl, lr, m, d, dm: _sgd_mfac(mdl, lr, m, d, "sgd", dm)),
    "singd": ([0.01, 0.03, 0.1, 0.3, 1.0], lambda mdl, lr, *_: (_baseline("singd", mdl, lr), None)),
    "shampoo": ([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], lambda mdl, lr, *_: (_baseline("shampoo", mdl, lr), None)),
    "soap": ([1e-3, 3e-3, 1e-2, 3e-2, 0.1], lambda mdl, lr, *_: (_baseline("soap", mdl, lr), None)),
    "muon": ([3e-3, 1e-2, 3e-2, 0.1, 0.3], lambda mdl, lr, *_: (_baseline("muon", mdl, lr), None)),
    # Ablation, not in the default list: MFAC with λ = 1e6, so F⁻¹g = g/λ to ~1e-9 and the step is
    # the gradient rescaled per tensor to Adam's step norm -- what Adam grafting alone does, with
    # the window's curvature switched off.
    "identity+adam": (ADAM_GRID, lambda mdl, lr, m, d, dm: _mfac(mdl, lr, m, IDENTITY_DAMP, "adam", None)),
}
#: the optimizers a run of the suite compares unless --optimizers names others
DEFAULT_OPTIMIZERS = [n for n in OPTIMIZERS if n != "identity+adam"]
#: λ of the ablation: m·λ dwarfs every entry of GGᵀ on these tasks
IDENTITY_DAMP = 1e6
#: each M-FAC form's dampening when --damp is not given: the app's shipped defaults
#: (conf/optimizer/mfac.yaml, conf/preconditioner/mfac.yaml) for the grafted forms
DEFAULT_DAMP = {"mfac": 1e-2, "mfac+adam": 1e-2, "sgd+mfac": 1e-2, "sgd+mfac+sgd": 0.1}
#: grafted variant -> the method whose tuned lr it should reuse
GRAFTED_FROM = {"mfac+adam": "adamw", "sgd+mfac+sgd": "sgd", "identity+adam": "adamw"}

# ---------------------------------------------------------------------- one run


@functools.cache
def _task(name: str) -> Task:
    return Task(name)


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    task = _task(job["task"])
    steps, m = job["steps"], job["m"]
    torch.manual_seed(job["seed"])
    model = task.model()
    optimizer, before_step = OPTIMIZERS[job["optimizer"]][1](model, job["lr"], m, job["damp"], job.get("damp_mode"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(1000 + job["seed"])
    every = max(1, steps // job["evals"])
    evals = [{"step": 0, "seconds": 0.0, "train": task.evaluate(model, "train", False),
              "val": task.evaluate(model, "val", False)}]
    elapsed, diverged = 0.0, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, batch in enumerate(task.batches(steps, job["batch_size"], gen), start=1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            schedule.step()
            elapsed += time.perf_counter() - start
            if step % every == 0 or step == steps:
                full = step == steps
                tr = task.evaluate(model, "train", full)
                evals.append({"step": step, "seconds": elapsed, "train": tr, "val": task.evaluate(model, "val", full)})
                if not math.isfinite(tr) or tr > 1e3 * max(evals[0]["train"], 1e-12):
                    diverged = True  # no point running a blown-up model to the end
                    break
    last = evals[-1]
    bad = diverged or not (math.isfinite(last["train"]) and math.isfinite(last["val"]))
    return {
        **{k: job[k] for k in ("task", "optimizer", "lr", "seed", "damp", "m", "steps")},
        "damp_mode": job.get("damp_mode"),
        "final_train": math.inf if bad else last["train"],
        "final_val": math.inf if bad else last["val"],
        "diverged": bad,
        "seconds": elapsed,
        "seconds_per_step": elapsed / max(1, last["step"]),
        "evals": evals,
    }


# ---------------------------------------------------------------------- summary


def _ms(values: list[float]) -> tuple[float, float]:
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_loss(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs]
    return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf


def _loss_at(run: dict[str, Any], seconds: float, key: str = "train") -> float:
    """The last evaluation at or before ``seconds`` of training time."""
    before = [e for e in run["evals"] if e["seconds"] <= seconds]
    return before[-1][key] if before else run["evals"][0][key]


def summarize(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        rows = []
        mine = [r for r in runs if r["task"] == task]
        # An interrupted suite: keep the seeds that ran every (optimizer, lr) of the task, so that
        # every grid point is a mean over the same seeds.
        cells = {(r["optimizer"], r["lr"]) for r in mine}
        seeds = [s for s in sorted({r["seed"] for r in mine})
                 if {(r["optimizer"], r["lr"]) for r in mine if r["seed"] == s} == cells]
        mine = [r for r in mine if r["seed"] in seeds] or mine
        for name in dict.fromkeys(r["optimizer"] for r in mine):
            by_lr: dict[float, list] = {}
            for r in mine:
                if r["optimizer"] == name:
                    by_lr.setdefault(r["lr"], []).append(r)
            lrs = sorted(by_lr)
            val = {lr: _mean_loss(by_lr[lr], "final_val") for lr in lrs}
            train = {lr: _mean_loss(by_lr[lr], "final_train") for lr in lrs}
            best = min(lrs, key=lambda lr: val[lr])
            i = lrs.index(best)
            neighbours = [val[lrs[j]] for j in (i - 1, i + 1) if 0 <= j < len(lrs)]
            rows.append({
                "optimizer": name,
                "lr": best,
                "lrs": lrs,
                "seeds": len(by_lr[best]),
                "train": _ms([r["final_train"] for r in by_lr[best]]),
                "val": _ms([r["final_val"] for r in by_lr[best]]),
                "val_by_lr": val,
                "train_by_lr": train,
                "val_std_by_lr": {lr: _ms([r["final_val"] for r in by_lr[lr]])[1] for lr in lrs},
                # Sensitivity: how much worse one grid step (about 3x) away from the best lr is,
                # and how many grid lrs end within 1.5x of the best final validation loss.
                "neighbour_ratio": max(neighbours) / val[best] if neighbours and val[best] > 0 else math.nan,
                "good_lrs": sum(v <= 1.5 * val[best] for v in val.values()),
                "diverged_runs": sum(r["diverged"] for lr in lrs for r in by_lr[lr]),
                "runs": len([r for lr in lrs for r in by_lr[lr]]),
                "ms_per_step": 1e3 * statistics.fmean(r["seconds_per_step"] for r in by_lr[best]),
                "_best_runs": by_lr[best],
                "_by_lr": by_lr,
            })
        by_name = {r["optimizer"]: r for r in rows}
        sgd = by_name.get("sgd")
        budget = statistics.fmean(r["seconds"] for r in sgd["_best_runs"]) if sgd else None
        for row in rows:
            if budget is not None:
                row["wallclock_seconds"] = budget
                row["train_at_wallclock"] = _ms([_loss_at(r, budget) for r in row["_best_runs"]])
            ref = by_name.get(GRAFTED_FROM.get(row["optimizer"], ""))
            if ref is not None and ref["lr"] in row["_by_lr"]:
                at = row["_by_lr"][ref["lr"]]
                row["at_ref_lr"] = {"lr": ref["lr"], "train": _ms([r["final_train"] for r in at]),
                                    "val": _ms([r["final_val"] for r in at])}
        out[task] = rows
    return out


def _fmt(v: tuple[float, float], digits: int = 4) -> str:
    return "diverged" if not math.isfinite(v[0]) else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def markdown(summary: dict[str, list[dict[str, Any]]]) -> str:
    parts = []
    for task, rows in summary.items():
        budget = rows[0].get("wallclock_seconds")
        wc = f"train loss at {budget:.1f} s" if budget is not None else "train loss at equal time"
        lines = [
            f"**{task}**",
            "",
            f"| optimizer | best lr (grid) | train loss | val loss | at ref. lr (val) | {wc} | val loss per lr "
            "| worst neighbour / best | lrs within 1.5× | diverged | ms/step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            grid = ", ".join(f"{lr:g}" for lr in r["lrs"])
            per = ", ".join("inf" if not math.isfinite(v) else f"{v:.3g}" for v in r["val_by_lr"].values())
            ref = r.get("at_ref_lr")
            ref_s = f"{_fmt(ref['val'])} (lr {ref['lr']:g})" if ref else ""
            wall = _fmt(r["train_at_wallclock"]) if "train_at_wallclock" in r else ""
            lines.append(
                f"| {r['optimizer']} | {r['lr']:g} ({grid}) | {_fmt(r['train'])} | {_fmt(r['val'])} | {ref_s} | {wall} "
                f"| {per} | {r['neighbour_ratio']:.2f} | {r['good_lrs']}/{len(r['lrs'])} | "
                f"{r['diverged_runs']}/{r['runs']} | {r['ms_per_step']:.1f} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(task: str, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        style = "-" if "mfac" in r["optimizer"] else "--"
        lrs = [lr for lr in r["lrs"] if math.isfinite(r["val_by_lr"][lr])]
        ax.errorbar(lrs, [r["val_by_lr"][lr] for lr in lrs], yerr=[r["val_std_by_lr"][lr] for lr in lrs],
                    fmt=style, marker="o", ms=3, capsize=2, label=r["optimizer"])
        diverged = [lr for lr in r["lrs"] if not math.isfinite(r["val_by_lr"][lr])]
        if diverged:
            ax.plot(diverged, [ax.get_ylim()[1]] * len(diverged), "x", color=ax.lines[-1].get_color())
        runs = r["_best_runs"]
        steps = [e["step"] for e in runs[0]["evals"]]
        n = min(len(x["evals"]) for x in runs)
        secs = [statistics.fmean(x["evals"][i]["seconds"] for x in runs) for i in range(n)]
        loss = [statistics.fmean(x["evals"][i]["train"] for x in runs) for i in range(n)]
        bx.plot(secs, loss, style, marker=".", ms=3, label=f"{r['optimizer']} (lr {r['lr']:g})")
        del steps
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (mean ± std over seeds; x: diverged)")
    ax.set_title(f"{task}: lr sensitivity")
    bx.set_yscale("log")
    bx.set_xlabel("training time (s, this machine; see the JSON meta)")
    bx.set_ylabel("training loss (full set), best lr, mean over seeds")
    bx.set_title(f"{task}: loss against wall-clock")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def _damp_of(name: str, damp: float | None) -> float | None:
    if name == "identity+adam":
        return IDENTITY_DAMP
    return damp if damp is not None else DEFAULT_DAMP.get(name)


def _damps_label(runs: list[dict[str, Any]], task: str) -> str:
    """'0.01 (mfac, ...), 0.1 (sgd+mfac+sgd)': the dampening each M-FAC form of ``task`` ran with."""
    by_damp: dict[float, list[str]] = {}
    for r in runs:
        if r["task"] == task and r.get("damp") is not None and r["optimizer"] not in by_damp.get(r["damp"], []):
            by_damp.setdefault(r["damp"], []).append(r["optimizer"])
    return ", ".join(f"{d:g} ({', '.join(sorted(names))})" for d, names in sorted(by_damp.items()))


def _jobs(args, tasks, names, seeds) -> list[dict[str, Any]]:
    jobs = []
    grid_index = range(5) if args.lrs == "all" else [1, 2, 3]
    for seed in seeds:
        for li in grid_index:
            for task in tasks:
                spec = TASKS[task]
                for oi in range(len(names)):
                    # Rotate the optimizer order per round so no optimizer always runs first.
                    name = names[(oi + li + seed) % len(names)]
                    grid = OPTIMIZERS[name][0]
                    jobs.append({
                        "task": task, "optimizer": name, "lr": grid[li], "seed": seed,
                        "steps": args.steps or spec.steps, "batch_size": spec.batch_size,
                        "m": args.ngrads or spec.m, "damp": _damp_of(name, args.damp), "damp_mode": args.damp_mode,
                        "evals": args.evals,
                    })
    return jobs


#: the damping grids of ``--study damp``: absolute λ, and the factor δ of λ = δ·mean(diag GGᵀ)/m
DAMP_GRIDS = {"absolute": [1e-4, 1e-3, 1e-2, 1e-1], "relative": [0.1, 1.0, 10.0, 100.0]}


def _damp_study_jobs(args, tasks, seeds) -> list[dict[str, Any]]:
    """lr x damp grid for the M-FAC variants, with absolute and relative damping.

    ``--study-lrs`` chooses the lrs per optimizer (``name=lr:lr:...``, comma-separated); an
    optimizer not named there runs the middle three of its grid."""
    chosen = {}
    for item in filter(None, (args.study_lrs or "").split(",")):
        name, _, lrs = item.partition("=")
        chosen[name] = [float(v) for v in lrs.split(":")]
    jobs = []
    for seed in seeds:
        for task in tasks:
            spec = TASKS[task]
            for name in args.optimizers.split(","):
                lrs = chosen.get(name) or OPTIMIZERS[name][0][1:4]
                for mode in args.damp_modes.split(","):
                    for damp in DAMP_GRIDS[mode]:
                        for lr in lrs:
                            jobs.append({
                                "task": task, "optimizer": name, "lr": lr, "seed": seed,
                                "steps": args.steps or spec.steps, "batch_size": spec.batch_size,
                                "m": args.ngrads or spec.m, "damp": damp,
                                "damp_mode": None if mode == "absolute" else mode, "evals": args.evals,
                            })
    return jobs


def _run_all(jobs: list[dict[str, Any]], workers: int, log: Path | None = None) -> list[dict[str, Any]]:
    """Run ``jobs``; every finished run is appended to ``log`` (JSON lines) at once, so an
    interrupted suite can still be summarized (``--summarize``)."""
    results = []
    start = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    mapper = pool.imap_unordered(train_one, jobs) if pool else map(train_one, jobs)
    try:
        for i, r in enumerate(mapper, start=1):
            results.append(r)
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps(r) + "\n")
            damp = "" if r["damp"] is None else f"damp={r['damp']:g}{'' if r['damp_mode'] is None else ' ' + r['damp_mode']} "
            print(f"[{i}/{len(jobs)} {time.perf_counter() - start:6.0f}s] {r['task']:<11} {r['optimizer']:<13} "
                  f"lr={r['lr']:<7g} {damp}"
                  f"seed={r['seed']}  train {r['final_train']:.4f}  val {r['final_val']:.4f}  "
                  f"({r['seconds']:.1f}s)", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    return results


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--optimizers", default=None, help=f"comma list (default: all of {DEFAULT_OPTIMIZERS}; also: identity+adam)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="all", choices=["all", "middle3"])
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count")
    parser.add_argument("--ngrads", type=int, default=None, help="override M-FAC's window (default 256)")
    parser.add_argument("--damp", type=float, default=None,
                        help=f"M-FAC dampening for every M-FAC form (absolute unless --damp-mode); default per form: {DEFAULT_DAMP}")
    parser.add_argument("--damp-mode", default=None, help="passed to MFAC / MFACPreconditioner as damp_mode")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per run (curves, equal wall-clock)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 torch thread each)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 lrs, 40 steps, m=32")
    parser.add_argument("--study", default="suite", choices=["suite", "damp"],
                        help="'damp': lr x damp grid of --optimizers on --tasks, absolute and relative damping")
    parser.add_argument("--damp-modes", default="absolute,relative")
    parser.add_argument("--study-lrs", default=None, help="--study damp: lrs per optimizer, e.g. 'mfac=0.003:0.01,sgd+mfac+sgd=0.1'")
    parser.add_argument("--out", default=str(HERE / "optimizer_suite"), help="prefix of the .json / .png outputs")
    parser.add_argument("--summarize", default=None, metavar="RUNS.jsonl",
                        help="only summarize the runs logged in RUNS.jsonl (e.g. of an interrupted suite)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.lrs = "0", "middle3"
        args.steps, args.ngrads, args.evals = args.steps or 40, args.ngrads or 32, 4
        args.out = args.out if args.out != str(HERE / "optimizer_suite") else str(HERE / "optimizer_suite_quick")
    tasks = args.tasks.split(",")
    names = args.optimizers.split(",") if args.optimizers else list(DEFAULT_OPTIMIZERS)
    for t in tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}: expected some of {list(TASKS)}")
    for n in names:
        if n not in OPTIMIZERS:
            parser.error(f"unknown optimizer {n!r}: expected some of {list(OPTIMIZERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.study == "damp":
        if args.optimizers is None:
            args.optimizers = "mfac,mfac+adam,sgd+mfac+sgd"
        jobs = _damp_study_jobs(args, tasks, seeds)
    else:
        jobs = _jobs(args, tasks, names, seeds)
    out = Path(args.out)
    if args.study == "damp":
        out = out.with_name(out.name + "_damp")
    if args.summarize:
        runs = [json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line.strip()]
    else:
        log = Path(str(out) + "_runs.jsonl")
        log.unlink(missing_ok=True)
        runs = _run_all(jobs, args.workers, log)
    wall = time.perf_counter() - start
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python experiments/optimizer_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "workers": args.workers, "threads_per_worker": 1, "cpus": os.cpu_count(),
        "wall_seconds": wall, "runs": len(runs), "planned_runs": len(jobs), "seeds": seeds, "damp": {n: _damp_of(n, args.damp) for n in names}, "damp_mode": args.damp_mode, "study": args.study,
        "tasks": {t: vars(TASKS[t]) for t in tasks},
    }
    if args.study == "damp":
        table = damp_markdown(runs)
        print(table)
        Path(str(out) + ".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        return 0
    summary = summarize(runs)
    print(f"\nwall {wall:.0f} s for {len(runs)} runs\n")
    print(markdown(summary))
    for task, rows in summary.items():
        done = sorted({r["seed"] for r in runs if r["task"] == task})
        title = (f"{task}: {TASKS[task].steps if not args.steps else args.steps} steps, cosine lr, seeds {done}, "
                 f"M-FAC m={args.ngrads or TASKS[task].m} damp {_damps_label(runs, task)}; lr picked on validation loss")
        plot(task, rows, Path(f"{out}_{task}.png"), title)
    Path(str(out) + ".json").write_text(json.dumps(
        {"meta": meta, "summary": {t: _strip(rows) for t, rows in summary.items()}, "runs": runs}, indent=1))
    return 0


def damp_markdown(runs: list[dict[str, Any]]) -> str:
    """Per optimizer and damping mode: final val loss over lr (rows) x damp (columns), and the
    spread of the whole grid (how many cells end within 1.5x of the best)."""
    parts = []
    for task, name in dict.fromkeys((r["task"], r["optimizer"]) for r in runs):
        for mode in dict.fromkeys(r["damp_mode"] for r in runs):
            mine = [r for r in runs if r["task"] == task and r["optimizer"] == name and r["damp_mode"] == mode]
            if not mine:
                continue
            damps = sorted({r["damp"] for r in mine})
            lrs = sorted({r["lr"] for r in mine})
            cell = {(lr, d): _mean_loss([r for r in mine if r["lr"] == lr and r["damp"] == d], "final_val")
                    for lr in lrs for d in damps}
            best = min(cell.values())
            good = sum(v <= 1.5 * best for v in cell.values())
            lines = [f"**{task}, {name}, damping {mode or 'absolute'}** (best {best:.4f}; {good}/{len(cell)} cells "
                     "within 1.5× of it)",
                     "", "| lr \\ damp | " + " | ".join(f"{d:g}" for d in damps) + " |",
                     "| --- |" + " --- |" * len(damps)]
            for lr in lrs:
                lines.append(f"| {lr:g} | " + " | ".join(
                    "inf" if not math.isfinite(cell[(lr, d)]) else f"{cell[(lr, d)]:.4f}" for d in damps) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
