"""Window passes on the CPU: the fused kernel against a float32 GEMV over the same window.

For each window (``m × d``, stored as float32 or bfloat16) and pass, times on one thread, in one
process, interleaved (each repeat runs every contender once; the minimum over repeats is kept):

* ``dots``    ``G x``  — fused CPU kernel vs ``torch.mv(G32, x)`` (the float32 GEMV floor)
* ``combine`` ``Gᵀ c`` — fused CPU kernel vs ``torch.mv(G32.t(), c32)``
* ``gram``    ``G Gᵀ`` — fused CPU kernel vs ``torch.mm(G32, G32.t())`` (float32 GEMM; the Gram does
  ``m`` multiply-adds per value read, so it is bound by arithmetic and a GEMV is no floor for it)

``G32`` is the window in float32 (for a bfloat16 window, its float32 copy: the reference's arithmetic
over the same values). The reference path (``kernels="torch"``, float64 tiles + BLAS) is timed too.
Accuracy: relative error against a float64 evaluation of the stored values, for the fused kernel and
for the float32 GEMV. Targets (docs/design.md, "Performance model"): each GEMV-bound pass ≤ 1.3×.

    python experiments/bench_kernels.py                 # d = 1e5 and 1e6, m = 32..256
    python experiments/bench_kernels.py --d 100000 --m 64 --repeats 5 --passes dots combine
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lightning_mfac.fisher.kernels import resolve_kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_min(contenders: dict, repeats: int) -> dict:
    for fn in contenders.values():  # warm-up (and first-call compilation)
        fn()
    best = {name: float("inf") for name in contenders}
    names = list(contenders)
    for i in range(repeats):
        # Alternate the order, so that no contender always finds the caches as the previous one left them.
        for name in names if i % 2 == 0 else names[::-1]:
            best[name] = min(best[name], _once(contenders[name]))
    return best


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.to(torch.float64) - ref).norm() / ref.norm())


def bench_case(d: int, m: int, dtype: torch.dtype, passes: list[str], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    window = torch.randn(m, d, generator=gen).to(dtype)
    g32 = window.to(torch.float32)  # the float32 GEMV's view of the same values
    x = torch.randn(d, generator=gen)
    c = torch.randn(m, generator=gen, dtype=torch.float64)
    c32 = c.to(torch.float32)
    fused = resolve_kernels("cpu")
    ref = resolve_kernels("torch")
    rows = []
    for name in passes:
        if name == "dots":
            contenders = {
                "fused": lambda: fused.dots(window, x),
                "gemv": lambda: torch.mv(g32, x),
                "torch": lambda: ref.dots(window, x),
            }
            exact = ref.dots(window, x)  # float64 tiles: exact products, float64 sums
            err = (rel(fused.dots(window, x), exact), rel(torch.mv(g32, x), exact))
        elif name == "combine":
            contenders = {
                "fused": lambda: fused.combine(window, c),
                "gemv": lambda: torch.mv(g32.t(), c32),
                "torch": lambda: ref.combine(window, c),
            }
            exact = ref.combine(window, c, out_dtype=torch.float64)
            err = (
                rel(fused.combine(window, c, out_dtype=torch.float64), exact),
                rel(torch.mv(g32.t(), c32), exact),
            )
        else:
            contenders = {
                "fused": lambda: fused.gram(window),
                "gemv": lambda: torch.mm(g32, g32.t()),
                "torch": lambda: ref.gram(window),
            }
            exact = ref.gram(window)
            err = (rel(fused.gram(window), exact), rel(torch.mm(g32, g32.t()), exact))
        best = interleaved_min(contenders, repeats if name != "gram" else max(2, repeats // 2))
        rows.append(
            {
                "pass": name,
                "d": d,
                "m": m,
                "dtype": str(dtype).removeprefix("torch."),
                "fp32_ms": best["gemv"] * 1e3,
                "fused_ms": best["fused"] * 1e3,
                "ratio": best["fused"] / best["gemv"],
                "torch_ratio": best["torch"] / best["gemv"],
                "err_fused": err[0],
                "err_fp32": err[1],
            }
        )
        r = rows[-1]
        print(
            f"| {r['pass']} | {d:,} | {m} | {r['dtype']} | {r['fp32_ms']:.2f} | {r['fused_ms']:.2f} | "
            f"**{r['ratio']:.2f}×** | {r['torch_ratio']:.2f}× | {r['err_fused']:.1e} | {r['err_fp32']:.1e} |",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--m", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument(
        "--passes", nargs="+", choices=["dots", "combine", "gram"], default=["dots", "combine", "gram"]
    )
    parser.add_argument(
        "--gram-max-d", type=int, default=100_000, help="skip the (compute-bound) Gram above this d"
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:  # resolve_kernels("cpu") below raises the clear error
        pass
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, repeats={args.repeats}"
    )
    print(
        "| pass | d | m | window | fp32 GEMV ms (GEMM for gram) | fused ms | fused / fp32 | "
        "torch ref / fp32 | fused rel err | fp32 rel err |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in args.d:
        for m in args.m:
            for dt in args.dtype:
                passes = [p for p in args.passes if p != "gram" or d <= args.gram_max_d]
                bench_case(d, m, DTYPES[dt], passes, args.repeats)


if __name__ == "__main__":
    main()
