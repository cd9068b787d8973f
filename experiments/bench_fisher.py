"""Benchmark of the M-FAC Fisher core against the floors of DESIGN.md ("Performance model").

Times, each the median of several repetitions (synchronized on CUDA):

* static: precompute (``StaticFisherInverse(...)``), ``diag()`` and one IHVP (``mul``), full and
  blocked;
* dynamic: one optimizer step (``update_mul``) over a grid of (d, m, window dtype, storage).

Each time is printed next to its floor and the ratio time / floor. The floors use rates measured
in the same run:

* dynamic step, window on the device: ``2·m·d·bytes / B_mem`` (two reads of the window), with
  ``B_mem`` the device copy bandwidth (read + write bytes of a large tensor copy);
* dynamic step, paged window: ``2·m·d·bytes / B_h2d`` with ``B_h2d`` the pinned host→device copy
  bandwidth (on the CPU nothing is copied, so the CPU floor is the memory bandwidth);
* static precompute: ``2·m²·d / R_gemm`` with ``R_gemm`` the measured float32 GEMM rate;
* IHVP: ``2·m·d·bytes(Q) / B_mem`` (Q read twice); ``diag()``: ``2·d·8 / B_mem`` (a copy).

Usage::

    python experiments/bench_fisher.py --quick                 # CPU smoke run, about 10 s (1 thread)
    python experiments/bench_fisher.py --device cuda --json experiments/bench_fisher_h100.json

The default (non-quick) grid holds the reference cases of DESIGN.md: dynamic d = 272,474
(ResNet-20) and d = 11,689,512 (ResNet-18) at m = 1024 with float32 and bfloat16 windows on the
device and paged; static d = 2,000,000, m = 1024, full and B = 128.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_mfac.fisher import DynamicFisherInverse, StaticFisherInverse, WindowConfig

MiB = 1 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------- measurement helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Bytes/s moved (read + write) by a large on-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / t


def h2d_bandwidth(device: torch.device, nbytes: int, reps: int) -> float | None:
    """Bytes/s of a pinned host → device copy (None on the CPU: nothing moves)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dst = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    t = median_time(lambda: dst.copy_(src, non_blocking=True), device, reps)
    return nbytes / t


def gemm_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """Flop/s of an ``n × n × n`` GEMM (TF32 off: the Fisher core never uses it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flags = torch.backends.cuda.matmul
    saved = getattr(flags, "fp32_precision", None)
    if saved is not None:
        flags.fp32_precision = "ieee"
    try:
        t = median_time(lambda: a @ b, device, reps)
    finally:
        if saved is not None:
            flags.fp32_precision = saved
    return 2 * n**3 / t


class PeakMemory:
    """Peak device memory allocated inside the block, above what was allocated before it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------- benchmark cases
def bench_dynamic(
    d: int,
    m: int,
    wdtype: str,
    storage: str,
    device: torch.device,
    reps: int,
    rates: dict,
    page_cols: int | None,
) -> dict:
    dtype = DTYPES[wdtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    with PeakMemory(device) as mem:
        inv = DynamicFisherInverse(
            d,
            m,
            1e-5,
            device=device,
            window=WindowConfig(
                dtype=dtype, storage=storage, page_cols=page_cols if storage == "paged" else None
            ),
        )
        # Distinct gradients: repeating a few would leave a rank-deficient window, whose O(m²)
        # inverse update is rejected (refactor every step) -- not the steady state being timed.
        pool = iter([torch.randn(d, device=device) for _ in range(reps + 2)])
        t = median_time(lambda: inv.update_mul(next(pool)), device, reps, warmup=2)
    bytes_read = 2 * m * d * itemsize
    if storage == "paged" and rates["h2d"] is not None:
        floor, basis = bytes_read / rates["h2d"], "2·m·d·bytes / pinned H2D"
    else:
        floor, basis = bytes_read / rates["mem"], "2·m·d·bytes / copy BW"
    return {
        "op": "dynamic update_mul",
        "d": d,
        "m": m,
        "window": wdtype,
        "storage": storage,
        "block_size": None,
        "time_s": t,
        "floor_s": floor,
        "floor_basis": basis,
        "ratio": t / floor,
        "peak_mem_bytes": mem.peak,
    }


def bench_static(
    d: int, m: int, block_size: int | None, device: torch.device, reps: int, rates: dict
) -> list[dict]:
    with PeakMemory(device) as mem:
        grads = torch.randn(m, d, device=device)
        holder: list[StaticFisherInverse] = []

        def build() -> None:
            holder.clear()
            holder.append(StaticFisherInverse(grads, 1e-5, block_size=block_size))

        t_build = median_time(build, device, reps, warmup=1)
        inv = holder[0]
        x = torch.randn(d, device=device)
        t_diag = median_time(inv.diag, device, max(reps, 5), warmup=1)
        t_mul = median_time(lambda: inv.mul(x), device, reps, warmup=1)
    qbytes = 4  # Q (or the block inverses) kept in float32 for float32 gradients
    if block_size is not None and block_size <= m:
        # Direct blocks: the B × B inverses are read once, GEMM cost d·B² per precompute.
        pre_flops, ihvp_bytes = 2 * d * block_size * m, d * block_size * qbytes
    else:
        pre_flops, ihvp_bytes = 2 * m * m * d, 2 * m * d * qbytes
    common = {"d": d, "m": m, "window": "fp32 grads", "storage": "device", "block_size": block_size}
    rows = [
        {
            "op": "static precompute",
            **common,
            "time_s": t_build,
            "floor_s": pre_flops / rates["gemm32"],
            "floor_basis": "2·m²·d / fp32 GEMM" if pre_flops == 2 * m * m * d else "2·d·B·m / fp32 GEMM",
        },
        {
            "op": "static diag()",
            **common,
            "time_s": t_diag,
            "floor_s": 2 * d * 8 / rates["mem"],
            "floor_basis": "2·d·8 / copy BW",
        },
        {
            "op": "static mul (1 IHVP)",
            **common,
            "time_s": t_mul,
            "floor_s": ihvp_bytes / rates["mem"],
            "floor_basis": "2·m·d·4 / copy BW" if block_size is None or block_size > m else "d·B·4 / copy BW",
        },
    ]
    for row in rows:
        row["ratio"] = row["time_s"] / row["floor_s"]
        row["peak_mem_bytes"] = mem.peak
    return rows


def grids(quick: bool, device: torch.device) -> tuple[list[tuple], list[tuple]]:
    """(dynamic cases (d, m, dtype, storage), static cases (d, m, block_size))."""
    if quick:
        dyn = [
            (d, m, w, s)
            for d in (100_000,)
            for m in (32, 64)
            for w in ("fp32", "bf16")
            for s in ("device", "paged")
        ]
        return dyn, [(100_000, 64, None), (100_000, 64, 128), (100_000, 64, 32)]
    dyn = [
        (d, 1024, w, s) for d in (272_474, 11_689_512) for w in ("fp32", "bf16") for s in ("device", "paged")
    ]
    return dyn, [(2_000_000, 1024, None), (2_000_000, 1024, 128)]


# ---------------------------------------------------------------------- output
def fmt_time(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def markdown_table(rows: list[dict], device: torch.device) -> str:
    head = (
        "| operation | d | m | window | storage | B | median (ms) | floor (ms) | time/floor | floor basis |"
    )
    sep = "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"
    if device.type == "cuda":
        head = head[:-1] + " peak GPU mem (MiB) |"
        sep += " ---: |"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['op']} | {r['d']:,} | {r['m']} | {r['window']} | {r['storage']} | {r['block_size'] or '—'} "
            f"| {fmt_time(r['time_s'])} | {fmt_time(r['floor_s'])} | {r['ratio']:.1f} | {r['floor_basis']} |"
        )
        if device.type == "cuda":
            line += f" {r['peak_mem_bytes'] / MiB:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small CPU-sized grid: a smoke run of a few seconds"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per case (default 5, quick 3)"
    )
    parser.add_argument("--only", choices=("static", "dynamic"), help="run one half of the grid")
    parser.add_argument(
        "--page-cols", type=int, default=None, help="page width of paged windows (default: from free memory)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 with --quick, whose tiny ops only pay OpenMP hand-offs; else torch's choice)",
    )
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    reps = args.reps or (3 if args.quick else 5)
    page_cols = args.page_cols or (16_384 if args.quick else None)
    started = time.perf_counter()

    copy_bytes = (64 if args.quick else 1024) * MiB
    rates = {
        "mem": copy_bandwidth(device, copy_bytes, reps),
        "h2d": h2d_bandwidth(device, copy_bytes, reps),
        "gemm32": gemm_rate(device, 1024 if device.type == "cpu" else 8192, torch.float32, reps),
        "gemm64": gemm_rate(device, 1024 if device.type == "cpu" else 8192, torch.float64, reps),
    }
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv) if argv is None else "bench_fisher.py " + " ".join(argv),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "reps": reps,
        "rates": rates,
    }
    print(
        f"# bench_fisher ({'quick CPU smoke run' if args.quick else 'full grid'}) on {meta['gpu'] or meta['cpu']}"
    )
    print(
        f"date {meta['date']}, torch {meta['torch']}, {meta['cpu_threads']} CPU threads, median of {reps} reps"
    )
    h2d = f"{rates['h2d'] / 1e9:.1f} GB/s" if rates["h2d"] else "n/a (CPU: pages are read in place)"
    print(
        f"measured: copy bandwidth {rates['mem'] / 1e9:.1f} GB/s (read+write), pinned H2D {h2d}, "
        f"GEMM fp32 {rates['gemm32'] / 1e12:.3f} TFLOP/s, fp64 {rates['gemm64'] / 1e12:.3f} TFLOP/s\n",
        flush=True,
    )

    dyn_cases, static_cases = grids(args.quick, device)
    rows: list[dict] = []
    if args.only != "dynamic":
        for d, m, b in static_cases:
            rows += bench_static(d, m, b, device, reps, rates)
            print(f"  static d={d:,} m={m} B={b}: done", file=sys.stderr, flush=True)
    if args.only != "static":
        for d, m, w, s in dyn_cases:
            rows.append(bench_dynamic(d, m, w, s, device, reps, rates, page_cols))
            print(f"  dynamic d={d:,} m={m} {w} {s}: done", file=sys.stderr, flush=True)

    print(markdown_table(rows, device))
    elapsed = time.perf_counter() - started
    print(f"\ntotal wall time {elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "wall_s": elapsed}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
