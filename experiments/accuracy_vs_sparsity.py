"""Test accuracy against sparsity: gradual M-FAC OBS pruning vs gradual magnitude pruning, via ``mfac-train``.

Runs the quickstart (``mfac-train``, digits, the M-FAC optimizer) once per (method, target
sparsity), each a separate ``mfac-train`` process, reads each run's ``summary.json`` and plots
test accuracy against the measured global sparsity, one line per method, into a PNG; the
numbers go to a JSON file and a markdown table on stdout.

    python experiments/accuracy_vs_sparsity.py                       # 0.5 .. 0.95, mfac and magnitude
    python experiments/accuracy_vs_sparsity.py --sparsities 0.7 0.9 --extra optimizer=sgd
    python experiments/accuracy_vs_sparsity.py --from multirun/quickstart/<time>   # plot finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _run(method: str, sparsity: float, seed: int, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "lightning_mfac.app", f"pruning={method}",
           f"pruning.callback.sparsity={sparsity}", f"seed={seed}", "logger=none",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return _record(out)


def _record(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    pruning = cfg.get("pruning") or {}
    node = pruning.get("callback") or pruning
    method = (node.get("obs") or {}).get("method") or node.get("method") or "none"
    return {"method": method, "kind": pruning.get("kind"), "target": (summary.get("pruning") or {}).get("target"),
            "sparsity": summary["global_sparsity"], "test_acc": summary["test"].get("test/acc"),
            "seed": cfg.get("seed"), "run": str(run_dir)}


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in sorted({r["method"] for r in records}):
        rows = sorted((r["sparsity"], r["test_acc"]) for r in records if r["method"] == method)
        ax.plot(*zip(*rows, strict=True), "-o", label=f"gradual {method}")
    ax.set_xlabel("global sparsity (Linear/Conv weights)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--methods", nargs="+", default=["mfac", "magnitude"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs="*", default=[], help="more mfac-train overrides for every run")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="plot the runs (folders with summary.json) under this folder instead")
    parser.add_argument("--png", type=Path, default=HERE / "accuracy_vs_sparsity.png")
    parser.add_argument("--json", type=Path, default=HERE / "accuracy_vs_sparsity.json")
    args = parser.parse_args()
    if args.source is not None:
        records = [_record(p.parent) for p in sorted(args.source.rglob("summary.json"))]
    else:
        records = []
        with tempfile.TemporaryDirectory() as tmp:
            for sparsity in args.sparsities:
                for method in args.methods:
                    rec = _run(method, sparsity, args.seed, args.extra, Path(tmp) / f"{method}-{sparsity}")
                    records.append(rec)
                    print(f"{method:<10} target {sparsity}: sparsity {rec['sparsity']:.3f}, "
                          f"test acc {rec['test_acc']:.4f}", file=sys.stderr, flush=True)
    if not records:
        raise SystemExit("no runs found")
    args.json.write_text(json.dumps({"extra": args.extra, "records": records}, indent=1))
    plot(records, args.png)
    print("| method | target | sparsity | test acc |\n| --- | --- | --- | --- |")
    for r in sorted(records, key=lambda r: (r["method"], r["sparsity"])):
        print(f"| {r['method']} | {r['target']} | {r['sparsity']:.3f} | {r['test_acc']:.4f} |")


if __name__ == "__main__":
    main()
