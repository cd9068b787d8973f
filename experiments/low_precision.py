"""M-FAC and SINGD under Lightning's mixed precision, against full precision, on the digits task.

Real Lightning runs of the app's ``ImageClassifier`` on ``DigitsDataModule`` with the quickstart
CNN, for ``32-true`` and ``bf16-mixed``, several seeds. ``16-mixed`` cannot be measured on a CPU:
Lightning 2.6 answers ``Trainer(accelerator="cpu", precision="16-mixed")`` with "AMP with fp16 is
not supported on CPU. Using precision='bf16-mixed' instead" (``--precisions`` takes it on a GPU).

* ``sgd``: reference,
* ``mfac`` / ``mfac-bf16win``: the MFAC optimizer with a float32 / bfloat16 gradient window,
* ``sgd+mfac``: SGD + the ``MFACPreconditioner`` callback (the quickstart pairing),
* ``singd`` / ``singd-bf16``: SINGD (dense) with float32 / bfloat16 Kronecker factors.

Reported: test accuracy and loss (mean ± std over seeds), runs with a non-finite loss or
parameter, and the steps the optimizers skipped for non-finite gradients (M-FAC counts them).
Learning rates are the ones ``train_quality.py`` picked for these optimizers.

    python experiments/low_precision.py                # ~3 min on a 2-core CPU
    python experiments/low_precision.py --accelerator gpu --precisions 32-true,bf16-mixed,16-mixed
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_mfac import MFAC, MFACPreconditioner
from lightning_mfac.app.baselines import singd
from lightning_mfac.app.data import DigitsDataModule
from lightning_mfac.app.models import quickstart_cnn
from lightning_mfac.app.tasks import ImageClassifier

HERE = Path(__file__).resolve().parent
M, DAMP = 32, 1e-4

#: name -> (optimizer factory, callbacks factory)
SETUPS: dict[str, tuple[Any, Any]] = {
    "sgd": (functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9, weight_decay=5e-4), list),
    "mfac": (functools.partial(MFAC, lr=0.03, ngrads=M, damp=DAMP, weight_decay=3e-3), list),
    "mfac-bf16win": (
        functools.partial(MFAC, lr=0.03, ngrads=M, damp=DAMP, weight_decay=3e-3, window={"dtype": torch.bfloat16}),
        list,
    ),
    "sgd+mfac": (
        functools.partial(torch.optim.SGD, lr=0.003, momentum=0.9),
        lambda: [MFACPreconditioner(ngrads=M, damp=DAMP, log_stats=False)],
    ),
    "singd": (functools.partial(singd, lr=0.3, weight_decay=5e-4), list),
    "singd-bf16": (functools.partial(singd, lr=0.3, weight_decay=5e-4, preconditioner_dtype="bfloat16"), list),
}
# "16-mixed" is not here: on CPU Lightning replaces it by "bf16-mixed" (with a warning), so it
# would only repeat that row; on a GPU run `--precisions 32-true,bf16-mixed,16-mixed`.
PRECISIONS = ("32-true", "bf16-mixed")


def run(name: str, precision: str, seed: int, epochs: int, accelerator: str = "cpu") -> dict[str, Any]:
    pl.seed_everything(seed, workers=True, verbose=False)
    make_opt, make_callbacks = SETUPS[name]
    dm = DigitsDataModule(batch_size=64, seed=0)
    # The app's default schedule (scheduler=cosine, stepped per epoch).
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    task = ImageClassifier(quickstart_cnn(), optimizer=make_opt, lr_scheduler=cosine)
    callbacks = make_callbacks()
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=epochs, callbacks=callbacks,
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=dm)
        val_loss = float(trainer.callback_metrics["val/loss"])
        test = trainer.test(task, datamodule=dm, verbose=False)[0]
    opt = trainer.optimizers[0]
    skipped = getattr(opt, "skipped_steps", 0) + sum(getattr(c, "nonfinite_steps", 0) for c in callbacks)
    skipped += sum("Encountered inf" in str(w.message) for w in caught)  # SINGD's skip warning
    finite = all(torch.isfinite(p).all().item() for p in task.parameters()) and math.isfinite(test["test/loss"])
    return {"setup": name, "precision": precision, "seed": seed, "test_acc": test["test/acc"],
            "test_loss": test["test/loss"], "val_loss": val_loss,
            "finite": finite, "skipped_steps": skipped, "steps": trainer.global_step,
            "seconds": time.perf_counter() - start}


def _ms(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "nan"
    return f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}"


def markdown(runs: list[dict[str, Any]], setups: list[str], precisions: list[str]) -> str:
    lines = ["| setup | precision | test acc | test loss | Δ acc vs 32-true | non-finite runs | skipped steps | s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in setups:
        ref = [r["test_acc"] for r in runs if r["setup"] == name and r["precision"] == "32-true"]
        for prec in precisions:
            mine = [r for r in runs if r["setup"] == name and r["precision"] == prec]
            accs = [r["test_acc"] for r in mine]
            delta = (f"{statistics.fmean(accs) - statistics.fmean(ref):+.4f}"
                     if ref and prec != "32-true" and all(math.isfinite(a) for a in accs) else "")
            lines.append(
                f"| {name} | {prec} | {_ms(accs)} | {_ms([r['test_loss'] for r in mine])} | {delta} | "
                f"{sum(not r['finite'] for r in mine)}/{len(mine)} | {sum(r['skipped_steps'] for r in mine)} | "
                f"{statistics.fmean(r['seconds'] for r in mine):.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=str(HERE / "low_precision.json"))
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    setups, precisions = args.setups.split(","), args.precisions.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for name in setups:
        for prec in precisions:
            for seed in seeds:
                try:
                    r = run(name, prec, seed, args.epochs, args.accelerator)
                except Exception as err:  # noqa: BLE001 - recorded as a failed run
                    r = {"setup": name, "precision": prec, "seed": seed, "test_acc": math.nan, "test_loss": math.nan,
                         "finite": False, "skipped_steps": 0, "seconds": 0.0, "error": f"{type(err).__name__}: {err}"}
                runs.append(r)
                print(f"  {name:<13} {prec:<10} seed={seed}  test acc {r['test_acc']:.4f}  "
                      f"{'' if r['finite'] else 'NON-FINITE '}{r.get('error', '')}", file=sys.stderr, flush=True)
    print(f"\ndigits, quickstart CNN, {args.epochs} epochs (batch 64, cosine lr), seeds {args.seeds}, "
          f"Lightning Trainer on {args.accelerator}\n")
    print(markdown(runs, setups, precisions))
    if args.json:
        meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                "torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
