"""One-shot pruning quality: magnitude vs. Optimal Brain Surgeon with (blocked / full) M-FAC.

Trains a small MLP on scikit-learn's 8x8 digits (ships offline), then prunes copies of it
one-shot -- no fine-tuning -- at increasing sparsity with

* magnitude (|w|, global threshold),
* M-FAC OBS with a block-diagonal Fisher (block sizes ``--blocks``),
* M-FAC OBS with the full Fisher, in one step and in ``--recompute`` steps,

and reports test accuracy as a markdown table and a PNG plot. The dampening λ is chosen on a
validation split (held out of the training data) for each M-FAC variant at one sparsity
(``--select-at``), never on the test set. Gradients are those of the training objective (cross-entropy with
``--label-smoothing``) on ``--grad-batch`` samples each -- per-sample gradients by default, the
empirical Fisher of the paper.

    python experiments/oneshot_quality.py                          # ~2-3 min on a 2-core CPU
    python experiments/oneshot_quality.py --label-smoothing 0      # ablation: trained to ~0 loss
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mfac import oneshot_prune


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test, n_val = 360, 180
    test = (x[:n_test], y[:n_test])
    val = (x[n_test : n_test + n_val], y[n_test : n_test + n_val])
    train = (x[n_test + n_val :], y[n_test + n_val :])
    return train, val, test


def make_model(hidden: tuple[int, int]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Linear(hidden[1], 10)
    )


def train(model: nn.Module, data, epochs: int, seed: int, smoothing: float) -> None:
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx], label_smoothing=smoothing).backward()
            opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def gradient_batches(data, batch: int, count: int, seed: int):
    """``count`` training mini-batches of ``batch`` samples (one gradient each)."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=gen)
    idx = idx.repeat(count * batch // len(y) + 1)[: count * batch]
    return [(x[i], y[i]) for i in idx.split(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--hidden", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--ngrads", type=int, default=256)
    parser.add_argument("--grad-batch", type=int, default=1, help="samples per sampled gradient")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--damps", type=float, nargs="+", default=[1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
    parser.add_argument("--select-at", type=float, default=0.9, help="sparsity at which λ is chosen")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--recompute", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: the work is small GEMMs and autograd on tiny layers, where a second OpenMP
    # thread mostly spin-waits (and is much slower on a shared 2-core machine).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("oneshot_quality.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    train_set, val_set, test_set = load_digits_split(args.seed)
    torch.manual_seed(args.seed)
    dense = make_model(tuple(args.hidden))
    train(dense, train_set, args.epochs, args.seed, args.label_smoothing)
    n_weights = sum(m.weight.numel() for m in dense if isinstance(m, nn.Linear))
    dense_acc = accuracy(dense, test_set)
    print(f"dense MLP 64-{args.hidden[0]}-{args.hidden[1]}-10 ({n_weights} prunable weights): "
          f"test accuracy {dense_acc:.4f} after {time.perf_counter() - start:.1f}s")

    # A fresh set of batches per pruning step (recomputations cycle on through them).
    batches = gradient_batches(train_set, args.grad_batch, args.ngrads * args.recompute, args.seed + 1)

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], label_smoothing=args.label_smoothing)

    def prune(sparsity: float, data, **kw) -> float:
        model = copy.deepcopy(dense)
        oneshot_prune(model, loss_fn, batches, sparsity, obs=dict(ngrads=args.ngrads, **kw))
        return accuracy(model, data)

    methods = {"magnitude": dict(method="magnitude")}
    for b in args.blocks:
        methods[f"M-FAC B={b}"] = dict(block_size=b)
    methods["M-FAC full"] = {}
    methods[f"M-FAC full, {args.recompute} recomp."] = dict(recomputations=args.recompute)

    results: dict[str, list[float]] = {}
    damps: dict[str, str] = {"magnitude": "-"}
    for name, kw in methods.items():
        t0 = time.perf_counter()
        if name != "magnitude":
            # Each M-FAC variant gets its own λ, chosen on the validation split.
            val = {d: prune(args.select_at, val_set, damp=d, **kw) for d in args.damps}
            kw["damp"] = max(val, key=lambda d: (val[d], -d))
            damps[name] = f"{kw['damp']:g}"
            shown = ", ".join(f"{d:g}: {a:.3f}" for d, a in val.items())
            print(f"  {name}: validation accuracy at sparsity {args.select_at} by λ {{{shown}}} -> λ = {damps[name]}")
        results[name] = [prune(s, test_set, **kw) for s in args.sparsities]
        print(f"  {name}: {time.perf_counter() - t0:.1f}s")

    header = "| method | λ | " + " | ".join(f"{s:.0%}" for s in args.sparsities) + " |"
    lines = [header, "|---" * (len(args.sparsities) + 2) + "|"]
    lines.append("| dense | - | " + " | ".join(f"{dense_acc:.3f}" for _ in args.sparsities) + " |")
    for name, accs in results.items():
        lines.append(f"| {name} | {damps[name]} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    print()
    print(f"Test accuracy after one-shot pruning (no fine-tuning), m = {args.ngrads} gradients of "
          f"{args.grad_batch} sample(s), label smoothing {args.label_smoothing:g}:")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(dense_acc, color="gray", ls=":", label="dense")
    for name, accs in results.items():
        label = name if name == "magnitude" else f"{name} (λ={damps[name]})"
        ax.plot(args.sparsities, accs, marker="o", label=label)
    ax.set_xlabel("sparsity (fraction of Linear weights pruned)")
    ax.set_ylabel("test accuracy (no fine-tuning)")
    ax.set_title(f"One-shot pruning (no fine-tuning), digits MLP, {n_weights} weights, m={args.ngrads}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}  (total {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
