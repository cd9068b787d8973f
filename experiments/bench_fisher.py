"""Benchmark of the M-FAC Fisher core against its floors (docs/design.md, "Performance model").

Per case it prints the time of one operation next to

* its floor: the bytes the operation must read over the measured copy bandwidth (dynamic step:
  ``2·m·d·bytes``, i.e. two reads of the window; paged on CUDA: over the pinned host→device rate),
* the ratio to a float32 GEMV over an ``m × d`` window, timed interleaved with it in the same process
  on the same threads (the reference arithmetic: dynamic step and static ``mul`` read the window
  twice, so their target is about 2 GEMVs),
* aten ops plus kernel launches per call and host reads per call, counted with
  ``tests/dispatch_counters.py`` (a steady-state step, after the guarded first refactor period),
* peak extra memory: on CUDA the allocator's peak above the window; on the CPU the largest tensor
  the call allocates (the window itself excluded).

Times are the minimum over repetitions interleaved with the GEMV, so a shared machine inflates both
sides alike. Usage::

    python experiments/bench_fisher.py --quick          # CPU, about a minute on one thread
    python experiments/bench_fisher.py                   # CPU grid recorded in experiments/RESULTS.md
    python experiments/bench_fisher.py --device cuda --json experiments/bench_fisher_gpu.json

The CUDA grid holds the reference cases of issue 11: dynamic d = 272,474 and d = 11,689,512 at
m = 1024 (float32 and bfloat16, on the device and paged) and static d = 2,000,000, m = 1024.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from dispatch_counters import DispatchCounter, count_launches  # noqa: E402

from lightning_mfac.fisher import DynamicFisherInverse, StaticFisherInverse, WindowConfig  # noqa: E402

MiB = 1 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: list[Callable[[], Any]], device: torch.device, reps: int) -> list[float]:
    """Minimum wall time of each function, the calls interleaved round-robin."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    (t,) = interleaved([lambda: dst.copy_(src)], device, reps)
    return 2 * nbytes / t


def h2d_bandwidth(device: torch.device, nbytes: int, reps: int) -> float | None:
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dst = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    (t,) = interleaved([lambda: dst.copy_(src, non_blocking=True)], device, reps)
    return nbytes / t


def counted(call: Callable[[], Any], kernels_owner: Any) -> DispatchCounter:
    counter = DispatchCounter()
    saved = kernels_owner.kernels
    kernels_owner.kernels = count_launches(saved, counter)
    try:
        with counter:
            call()
    finally:
        kernels_owner.kernels = saved
    return counter


def peak_extra(call: Callable[[], Any], device: torch.device, counter: DispatchCounter) -> int:
    if device.type != "cuda":
        return counter.largest_bytes
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def bench_dynamic(
    d: int, m: int, wdtype: str, storage: str, device, reps: int, rates: dict, page_cols
) -> dict:
    dtype = DTYPES[wdtype]
    window = WindowConfig(dtype=dtype, storage=storage, page_cols=page_cols if storage == "paged" else None)
    inv = DynamicFisherInverse(d, m, 1e-5, device=device, window=window)
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(d, device=device, generator=gen)
    # More distinct gradients than slots: a window of repeated gradients is rank-deficient, whose
    # updates are rejected and guarded -- not the steady state being timed.
    pool = [base + torch.randn(d, device=device, generator=gen) for _ in range(m + 8)]
    state = {"i": 0}

    def step() -> None:
        state["i"] += 1
        inv.update_mul(pool[state["i"] % len(pool)], return_finite=True)

    for _ in range(2 * m + 2):  # fill the window and leave the guarded first period
        step()
    gemv_rows = torch.randn(m, d, device=device)
    x = torch.randn(d, device=device)
    t, t_gemv = interleaved([step, lambda: torch.mv(gemv_rows, x)], device, reps)
    while inv._since_refactor in (0, inv.refactor_every - 1):  # count a step that does not refactor
        step()
    c = counted(step, inv.window)
    item = dtype.itemsize
    floor = 2 * m * d * item / (rates["h2d"] if storage == "paged" and rates["h2d"] else rates["mem"])
    return {
        "case": f"dynamic update_mul {storage}",
        "d": d,
        "m": m,
        "window": wdtype,
        "time_s": t,
        "floor_s": floor,
        "gemv_s": t_gemv,
        "vs_gemv": t / t_gemv,
        "ops": c.ops + c.launches,
        "host_reads": c.host_reads,
        "peak_extra_bytes": peak_extra(step, device, c),
        "window_bytes": m * d * item,
    }


def bench_static(d: int, m: int, block_size: int | None, device, reps: int, rates: dict) -> list[dict]:
    grads = torch.randn(m, d, device=device)
    inv = StaticFisherInverse(grads, 1e-5, block_size=block_size)
    x = torch.randn(d, device=device, dtype=torch.float64)
    t_mul, t_gemv = interleaved([lambda: inv.mul(x), lambda: torch.mv(grads, x.float())], device, reps)
    owner = inv._window if inv._window is not None else inv
    c = counted(lambda: inv.mul(x), owner) if inv._window is not None else DispatchCounter()
    if inv._window is None:
        with c:
            inv.mul(x)
    t0 = time.perf_counter()
    with DispatchCounter() as cb:
        StaticFisherInverse(grads, 1e-5, block_size=block_size)
    t_build = time.perf_counter() - t0
    rows = []
    for case, t, counter, floor in (
        ("static mul", t_mul, c, 2 * m * d * 4 / rates["mem"]),
        ("static precompute", t_build, cb, 2 * m * m * d / rates["gemm"]),
    ):
        rows.append(
            {
                "case": case + (f" B={block_size}" if block_size else " full"),
                "d": d,
                "m": m,
                "window": "fp32",
                "time_s": t,
                "floor_s": floor,
                "gemv_s": t_gemv,
                "vs_gemv": t / t_gemv,
                "ops": counter.ops + counter.launches,
                "host_reads": counter.host_reads,
                "peak_extra_bytes": counter.largest_bytes,
                "window_bytes": m * d * 4,
            }
        )
    return rows


def gemm_rate(device: torch.device, reps: int) -> float:
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    (t,) = interleaved([lambda: a @ b], device, reps)
    return 2 * n**3 / t


def grids(quick: bool, device: torch.device) -> tuple[list[tuple], list[tuple]]:
    if device.type == "cuda":
        dyn = [
            (d, 1024, w, s)
            for d in (272_474, 11_689_512)
            for w in ("fp32", "bf16")
            for s in ("device", "paged")
        ]
        return dyn, [(2_000_000, 1024, None), (2_000_000, 1024, 128)]
    if quick:
        return [(100_000, 32, w, "device") for w in ("fp32", "bf16")], [(100_000, 32, None)]
    dyn = [(d, m, w, "device") for d, m in ((1_000_000, 32), (272_474, 256)) for w in ("fp32", "bf16")]
    dyn.append((272_474, 256, "fp32", "paged"))
    return dyn, [(1_000_000, 64, None), (1_000_000, 64, 1024), (1_000_000, 64, 32)]


def table(rows: list[dict]) -> str:
    head = (
        "| case | d | m | window | time (ms) | floor (ms) | × fp32 GEMV | ops+launches | host reads "
        "| peak extra (MiB) |\n| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['d']:,} | {r['m']} | {r['window']} | {r['time_s'] * 1e3:.2f} "
            f"| {r['floor_s'] * 1e3:.2f} | {r['vs_gemv']:.2f} | {r['ops']} | {r['host_reads']} "
            f"| {r['peak_extra_bytes'] / MiB:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small CPU grid (about a minute)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--page-cols", type=int, default=65_536, help="page width of paged windows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = args.reps or (3 if args.quick else 5)
    rates = {
        "mem": copy_bandwidth(device, 256 * MiB, reps),
        "h2d": h2d_bandwidth(device, 256 * MiB, reps),
        "gemm": gemm_rate(device, reps),
    }
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# bench_fisher on {where}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; copy {rates['mem'] / 1e9:.1f} GB/s, "
        f"fp32 GEMM {rates['gemm'] / 1e9:.0f} GFLOP/s"
        + (f", pinned H2D {rates['h2d'] / 1e9:.1f} GB/s" if rates["h2d"] else "")
    )
    dyn, static = grids(args.quick, device)
    rows = [bench_dynamic(*case, device, reps, rates, args.page_cols) for case in dyn]
    for case in static:
        rows.extend(bench_static(*case, device, reps, rates))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rates": rates, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
