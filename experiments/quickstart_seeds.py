"""The quickstart against plain SGD on the same budget, over seeds, through the real ``mfac-train``.

Each arm is a list of command-line overrides added to the default run (``mfac-train`` with no
arguments: digits, quickstart CNN, 6 epochs, gradual M-FAC OBS pruning to 70 %). Every run is a
separate ``mfac-train`` process; the script reads each run's ``summary.json`` and prints a markdown
table of test accuracy and final sparsity (mean ± std over the seeds).

    python experiments/quickstart_seeds.py                        # default vs optimizer=sgd, seeds 0 1 2
    python experiments/quickstart_seeds.py --arm "lr03=optimizer.lr=0.03" --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_ARMS = ["M-FAC (default)=", "SGD=optimizer=sgd"]


def run(overrides: list[str], seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lightning_mfac.app", f"seed={seed}", "logger=none",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "overrides": overrides, "seconds": time.perf_counter() - start,
            "test_acc": summary["test"]["test/acc"], "sparsity": summary["global_sparsity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", help="NAME=override override ... (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None, help="write every run's record here")
    args = parser.parse_args()
    arms = {}
    for spec in args.arm or DEFAULT_ARMS:
        name, _, rest = spec.partition("=")
        arms[name] = rest.split()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seeds outermost: arms interleave, so machine load hits them alike
            for name, overrides in arms.items():
                rec = run(overrides, seed, Path(tmp) / re.sub(r"[^A-Za-z0-9_-]", "_", f"{name}-{seed}"))
                rec["arm"] = name
                records.append(rec)
                print(f"{name:<24} seed {seed}: test acc {rec['test_acc']:.4f}, sparsity {rec['sparsity']:.3f}, "
                      f"{rec['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print("| run | overrides | test acc (mean ± std) | per seed | sparsity |")
    print("| --- | --- | --- | --- | --- |")
    for name, overrides in arms.items():
        accs = [r["test_acc"] for r in records if r["arm"] == name]
        sp = [r["sparsity"] for r in records if r["arm"] == name]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | `{' '.join(overrides) or '(none)'}` | {statistics.mean(accs):.4f} ± {std:.4f} | "
              f"{', '.join(f'{a:.4f}' for a in accs)} | {statistics.mean(sp):.3f} |")


if __name__ == "__main__":
    main()
