"""Time per training step and memory of M-FAC next to SGD, AdamW, SINGD, Shampoo, SOAP and Muon.

For each model, every optimizer trains a fresh copy (same seed) on the *same* synthetic batches
of the model's real input shape; a step is forward + backward + optimizer step (and, for
``sgd+mfac-callback``, the ``MFACPreconditioner`` hook in between), synchronized on the GPU.
Reported per (model, optimizer): median and mean time per step after ``--warmup`` steps (the
mean includes the optimizers' periodic work: SINGD's preconditioner update every T=10 steps,
Shampoo's inverse roots and SOAP's eigenbases every 10), the median's ratio to SGD's, the median
of the optimizer step alone (``optimizer.step()`` plus the callback's hook, timed between device
synchronizations) and its ratio to AdamW's step, peak GPU
memory (``torch.cuda.max_memory_allocated`` less the pre-made input batches; "n/a" on CPU)
and the bytes of tensors the optimizer itself holds (state, windows, Kronecker factors: exact
on any device). M-FAC's passes always cover all m window rows, so its steps cost the same
before the window fills. An optimizer
that fails on a model (e.g. SINGD with ``--singd-unsupported error`` on a model with BatchNorm,
or out of memory) gets its error in the table instead of stopping the run.

    python experiments/bench_train_step.py --quick                     # CPU smoke run, ~30 s
    python experiments/bench_train_step.py --device cpu --threads 1 --json experiments/bench_train_step_cpu.json
    python experiments/bench_train_step.py --device cuda --json experiments/bench_train_step_gpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mfac import MFAC, MFACPreconditioner
from lightning_mfac.app.baselines import muon, shampoo, singd, soap

# ---------------------------------------------------------------------- models


def _image(builder, shape, classes):
    return {"build": builder, "kind": "image", "shape": shape, "classes": classes}


def model_specs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from lightning_mfac.app import models

    small = args.device == "cpu"
    size = args.image_size or (32 if small else 224)
    return {
        "resnet20": _image(functools.partial(models.resnet20, num_classes=10), (3, 32, 32), 10),
        "resnet18": _image(functools.partial(models.resnet18, num_classes=1000), (3, size, size), 1000),
        "resnet50": _image(functools.partial(models.resnet50, num_classes=1000), (3, size, size), 1000),
        "mobilenet_v1": _image(functools.partial(models.mobilenet_v1, num_classes=1000), (3, size, size), 1000),
        # A 396K-parameter MLP on 28×28 inputs: a small model, where the step's fixed costs show.
        "mlp": _image(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 200),
                                            nn.ReLU(), nn.Linear(200, 10)), (1, 28, 28), 10),
        "bert_tiny": {
            "build": functools.partial(models.bert_classifier, num_labels=2, vocab_size=args.vocab_size),
            "kind": "sequence",
            "seq_len": args.seq_len or (64 if small else 128),
            "vocab": args.vocab_size,
            "classes": 2,
        },
    }


def make_batches(spec: dict[str, Any], n: int, batch: int, device: torch.device) -> list:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        if spec["kind"] == "image":
            x = torch.randn(batch, *spec["shape"], generator=gen)
            y = torch.randint(spec["classes"], (batch,), generator=gen)
            out.append((x.to(device), y.to(device)))
        else:
            ids = torch.randint(spec["vocab"], (batch, spec["seq_len"]), generator=gen)
            y = torch.randint(spec["classes"], (batch,), generator=gen)
            out.append(({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}, y.to(device)))
    return out


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(**x) if isinstance(x, dict) else model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.float(), y)


# ---------------------------------------------------------------------- optimizers


def optimizer_specs(args: argparse.Namespace) -> dict[str, Any]:
    """name -> (model -> (optimizer, hook before step or None))."""
    m, damp = args.ngrads, 1e-4

    def plain(factory):
        return lambda model: (factory(model), None)

    def mfac(**kw):
        return plain(lambda model: MFAC(model.parameters(), lr=1e-3, ngrads=m, damp=damp, **kw))

    def callback(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        cb = MFACPreconditioner(ngrads=m, damp=damp, log_stats=False, window={"storage": "device"})
        # The callback's own hook, with the two trainer attributes it reads.
        trainer = SimpleNamespace(optimizers=[opt], precision_plugin=SimpleNamespace(scaler=None))

        def hook():
            cb.on_before_optimizer_step(trainer, model, opt)

        hook.state = cb  # where the window lives, for the memory column
        return opt, hook

    def singd_(**kw):
        return plain(lambda model: singd(model.parameters(), model=model, lr=1e-3, unsupported=args.singd_unsupported, **kw))

    return {
        "sgd": plain(lambda model: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)),
        "adamw": plain(lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3)),
        "mfac": mfac(window={"storage": "device"}),
        "mfac-bf16": mfac(window={"storage": "device", "dtype": torch.bfloat16}),
        "mfac-paged": mfac(window={"storage": "paged"}),
        "sgd+mfac-callback": callback,
        "singd-dense": singd_(structures="dense"),
        "singd-hierarchical": singd_(structures="hierarchical"),
        "singd-diagonal": singd_(structures="diagonal"),
        "ikfac-dense": singd_(structures="dense", kfac_like=True),
        # Preconditioning from the first measured step on, roots / bases refreshed every 10 steps.
        "shampoo": plain(
            lambda model: shampoo(
                model.parameters(), start_preconditioning_step=1, preconditioning_compute_steps=10
            )
        ),
        "soap": plain(lambda model: soap(model.parameters(), precondition_frequency=10)),
        "muon": plain(lambda model: muon(model.parameters(), model=model)),
    }


# ---------------------------------------------------------------------- measurement


_STATE_PACKAGES = ("lightning_mfac", "singd", "pytorch_optimizer", "torch")


def tensor_bytes(obj: Any, exclude: set[int], seen: tuple[set, set] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (optimizer state, M-FAC
    windows, Kronecker factors...), the storages in ``exclude`` (parameters, gradients) left out."""
    objects, storages = seen if seen is not None else (set(), set())
    if depth > 12 or id(obj) in objects or isinstance(obj, nn.Module):
        return 0
    objects.add(id(obj))
    down = functools.partial(tensor_bytes, exclude=exclude, seen=(objects, storages), depth=depth + 1)
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if obj.is_meta or key in exclude or key in storages:
            return 0
        storages.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(down(k) + down(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(down(v) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in _STATE_PACKAGES:
        return down(vars(obj))
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(model_spec, opt_factory, batches, args, device) -> dict[str, Any]:
    """One fresh model + optimizer over ``batches``; the step times after the warm-up."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # The pre-made batches are live during the whole run and the same for everyone: left out.
    inputs = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    model = model_spec["build"]().to(device)
    model.train()
    optimizer, before_step = opt_factory(model)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    times, step_times = [], []
    begin = time.perf_counter()
    for i, batch in enumerate(batches):
        if args.budget and times and time.perf_counter() - begin > args.budget:
            break  # a pathologically slow case keeps the steps measured so far
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss = loss_of(model, batch)
        loss.backward()
        sync(device)
        stepping = time.perf_counter()
        if before_step is not None:
            before_step()
        optimizer.step()
        sync(device)
        if i >= args.warmup:
            end = time.perf_counter()
            times.append(end - start)
            step_times.append(end - stepping)  # the optimizer's own work (and the callback's hook)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    holders = [optimizer, getattr(before_step, "state", None)]
    state = tensor_bytes(holders, params)
    peak = torch.cuda.max_memory_allocated(device) - inputs if device.type == "cuda" else None
    return {
        "times": times,
        "step_times": step_times,
        "peak_mem_mb": peak / 2**20 if peak is not None else None,
        "state_mb": state / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": loss.item(),
    }


def bandwidth_floors(device: torch.device) -> dict[str, float]:
    """Measured memory bandwidth (bytes/s) for M-FAC's floor: ``device`` counts the read *and* the
    write bytes of a large copy, so it is the rate at which memory streams bytes, the rate of a
    window read; ``pinned_h2d`` (CUDA only) is the pinned host-to-device copy rate."""
    n = (256 if device.type == "cuda" else 64) * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    cases = [("device", lambda: b.copy_(a), 2 * n)]
    if device.type == "cuda":
        h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        cases.append(("pinned_h2d", lambda: a.copy_(h, non_blocking=True), n))
    out = {}
    for name, fn, nbytes in cases:
        fn()
        sync(device)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        out[name] = nbytes / min(times)  # the least disturbed copy: a floor must not be inflated by load
    return out


def floor_ms(opt: str, d: int, m: int, bw: dict[str, float]) -> float | None:
    """Two reads of the ``m × d`` window per step (DESIGN's performance model: ``2·m·d·bytes / B``).

    ``B`` is the copy rate as measured, read + write bytes per second: that *is* the memory's rate.
    (It used to be halved as "a read is half a copy's traffic", which counted the copy's two
    streams twice and put the floor at 4·m·d·bytes / B, 2× off DESIGN's and bench_fisher.py's.)
    On a CPU the paged window is read in place, so its floor is the memory one as well."""
    if not bw or not (opt.startswith("mfac") or opt.startswith("sgd+mfac")):
        return None
    nbytes = 2 if opt == "mfac-bf16" else 4
    rate = bw["pinned_h2d"] if opt == "mfac-paged" and "pinned_h2d" in bw else bw["device"]
    return 1e3 * 2 * m * d * nbytes / rate


# ---------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict[str, Any]], device: torch.device, planned: int) -> str:
    mem = "peak GPU MB" if device.type == "cuda" else "peak mem"
    head = (f"| model | optimizer | median ms/step | mean ms/step | × SGD (median) | optimizer step ms | "
            f"step × AdamW's | {mem} | optimizer state MB | M-FAC floor ms |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['optimizer']} | error: {r['error']} | | | | | | | |")
            continue
        ratio = fmt(r.get("ratio_to_sgd"), 2)
        short = f" ({r['measured_steps']} steps)" if r["measured_steps"] < planned else ""
        lines.append(
            f"| {r['model']} | {r['optimizer']}{short} | {fmt(r['median_ms'])} | {fmt(r['mean_ms'])} | {ratio} | "
            f"{fmt(r['step_ms'], 2)} | {fmt(r.get('step_ratio_to_adamw'), 2)} | {fmt(r['peak_mem_mb'], 0)} | {fmt(r['state_mb'], 1)} | {fmt(r.get('floor_ms'), 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny batches, 3 steps, ResNet-20 + BERT")
    parser.add_argument("--models", default=None, help="comma list (default: resnet20,resnet18,mobilenet_v1,bert_tiny,mlp)")
    parser.add_argument("--optimizers", default=None, help="comma list (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on cuda, 32 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: 30 cuda, 10 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 cuda, 2 cpu")
    parser.add_argument("--ngrads", type=int, default=None, help="M-FAC window m (default: 1024 cuda, 32 cpu)")
    parser.add_argument("--image-size", type=int, default=None, help="ImageNet models' input (default 224 cuda, 32 cpu)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--repeats", type=int, default=None, help="rounds over all optimizers (default: 1 cuda, 3 cpu)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast the forward pass")
    parser.add_argument("--singd-unsupported", default="sgd", choices=["sgd", "freeze", "error"])
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds per run after which it stops with the steps measured so far (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda"
    if args.quick:
        args.device, cuda = "cpu", False
        args.models = args.models or "resnet20,bert_tiny"
        args.batch_size = args.batch_size or 8
        args.steps, args.warmup = args.steps or 2, args.warmup if args.warmup is not None else 1
        args.ngrads = args.ngrads or 8
        args.seq_len = args.seq_len or 16
        if args.vocab_size == 30522:
            args.vocab_size = 1000
    args.models = args.models or "resnet20,resnet18,mobilenet_v1,bert_tiny,mlp"
    args.batch_size = args.batch_size or (128 if cuda else 32)
    args.steps = args.steps or (30 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.ngrads = args.ngrads or (1024 if cuda else 32)
    args.repeats = args.repeats or (1 if cuda or args.quick else 3)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    models = model_specs(args)
    optimizers = optimizer_specs(args)
    want_models = args.models.split(",")
    want_opts = args.optimizers.split(",") if args.optimizers else list(optimizers)
    for name in want_models:
        if name not in models:
            parser.error(f"unknown model {name!r}: expected one of {sorted(models)}")
    for name in want_opts:
        if name not in optimizers:
            parser.error(f"unknown optimizer {name!r}: expected one of {list(optimizers)}")
    if "sgd" not in want_opts:
        want_opts.insert(0, "sgd")  # every ratio is to SGD on the same batches

    bw = bandwidth_floors(device)
    rows: list[dict[str, Any]] = []
    for mname in want_models:
        spec = models[mname]
        batches = make_batches(spec, args.warmup + args.steps, args.batch_size, device)
        results: dict[str, dict[str, Any]] = {
            o: {"model": mname, "optimizer": o, "times": [], "step_times": []} for o in want_opts
        }
        # Repeats go round all optimizers in turn, so that load from other processes on a shared
        # machine spreads over all of them instead of spoiling one.
        for rep in range(args.repeats):
            for oname in want_opts if rep % 2 == 0 else reversed(want_opts):
                row = results[oname]
                if row.get("error"):
                    continue
                try:
                    out = run_one(spec, optimizers[oname], batches, args, device)
                except Exception as err:  # noqa: BLE001 - the table reports it and the run goes on
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                else:
                    row["times"] += out.pop("times")
                    row["step_times"] += out.pop("step_times")
                    peak = max(row.get("peak_mem_mb") or 0.0, out.pop("peak_mem_mb") or 0.0)
                    row.update(out, peak_mem_mb=peak if device.type == "cuda" else None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                gc.collect()
                print(f"  {mname:<13} {oname:<20} " + (row.get("error") or f"{1e3 * row['times'][-1]:.1f} ms (last)"),
                      file=sys.stderr, flush=True)
        base = None
        adamw = results.get("adamw", {}).get("step_times")
        adamw_ms = 1e3 * statistics.median(adamw) if adamw else None
        for oname in want_opts:
            row = results[oname]
            times, step_times = row.pop("times"), row.pop("step_times")
            if not row.get("error"):
                row["measured_steps"] = len(times)
                row["median_ms"] = 1e3 * statistics.median(times)
                row["mean_ms"] = 1e3 * statistics.fmean(times)
                row["step_ms"] = 1e3 * statistics.median(step_times)
                row["step_ratio_to_adamw"] = row["step_ms"] / adamw_ms if adamw_ms else None
                if oname == "sgd":
                    base = row["median_ms"]
                row["ratio_to_sgd"] = row["median_ms"] / base if base else None
                row["floor_ms"] = floor_ms(oname, row["params"], args.ngrads, bw)
            rows.append(row)

    device_name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "bench_train_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.budget,
        "ngrads": args.ngrads,
        "amp": args.amp,
        "bandwidth_bytes_per_s": bw,
        "inputs": {
            k: (list(v["shape"]) if v["kind"] == "image" else [v["seq_len"]]) for k, v in models.items() if k in want_models
        },
    }
    table = markdown(rows, device, args.steps * args.repeats)
    print(f"\nTraining-step benchmark on {device_name} (torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.repeats} x {args.steps} measured steps after {args.warmup} warm-up, M-FAC m={args.ngrads})\n")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or 'unknown'}"


if __name__ == "__main__":
    sys.exit(main())
