"""The window passes (fisher/kernels): every implementation against float64 dense references.

``"triton"`` runs here on CPU tensors, through the Triton interpreter, so the arithmetic of the CUDA
kernels is checked in CI without a GPU; ``"cpu"`` is the fused numba kernel; ``"torch"`` the
reference path. Each is checked for every stored width, for vectors and blocks of vectors, on
contiguous windows and on column-slice views (the pages of a bigger window), and on a window of real
training gradients: ``F⁻¹g`` through the passes must stay within 1e-6 of float64 for a float32
window (1e-2 for bfloat16, its quantization).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from real_gradients import digits_sgd_gradients
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_mfac.fisher import kernels as kernels_mod
from lightning_mfac.fisher.kernels import resolve_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (it ships with torch on Linux)"
)
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")

IMPLS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=needs_numba),
    pytest.param("triton", id="triton", marks=needs_triton),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
#: Relative error of a float64-accumulated pass: products of stored values are exact in float64, so
#: only the float64 summation (and, for ``combine``, the final rounding to ``out_dtype``) remains.
F64_TOL = 1e-13


def window(dtype: torch.dtype, m: int, n: int, sliced: bool, seed: int = 0) -> torch.Tensor:
    """An ``(m, n)`` window; ``sliced`` makes it a column slice of a wider one (row stride > n)."""
    gen = torch.Generator().manual_seed(seed)
    if not sliced:
        return torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    wide = torch.randn(m, n + 37, generator=gen, dtype=torch.float64).to(dtype)
    view = wide[:, 11 : 11 + n]
    assert not view.is_contiguous() and view.stride(0) == n + 37
    return view


def relerr(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.to(torch.float64) - ref).norm() / ref.norm())


# Odd sizes: row blocks and column tiles with remainders in every kernel.
M, N, K = 13, 2_500, 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [None, K], ids=["vector", "block"])
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "slice"])
def test_passes_match_float64(impl: str, dtype: torch.dtype, k: int | None, sliced: bool) -> None:
    kern = resolve_kernels(impl, "cpu")
    rows = window(dtype, M, N, sliced)
    g64 = rows.to(torch.float64)  # the stored values, exactly
    gen = torch.Generator().manual_seed(1)
    shape_x = (N,) if k is None else (N, k)
    shape_c = (M,) if k is None else (M, k)
    x = torch.randn(shape_x, generator=gen, dtype=torch.float64).to(torch.float32)
    c = torch.randn(shape_c, generator=gen, dtype=torch.float64)

    d = kern.dots(rows, x)
    assert d.dtype == torch.float64 and d.shape == (M,) + shape_x[1:]
    assert relerr(d, g64 @ x.to(torch.float64)) <= F64_TOL
    # Float64 x as well (the static mul's probe vectors).
    x64 = x.to(torch.float64) * (1 + 1e-9)
    assert relerr(kern.dots(rows, x64), g64 @ x64) <= F64_TOL

    ref_c = g64.t() @ c
    comb = kern.combine(rows, c)
    assert comb.shape == (N,) + shape_c[1:]
    assert comb.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Rounded once from float64: within half an ulp of the output dtype.
    assert relerr(comb, ref_c) <= (F64_TOL if dtype == torch.float64 else 6e-8)
    assert relerr(kern.combine(rows, c, out_dtype=torch.float64), ref_c) <= F64_TOL

    gram = kern.gram(rows)
    assert gram.dtype == torch.float64 and gram.shape == (M, M)
    assert relerr(gram, g64 @ g64.t()) <= F64_TOL
    assert torch.equal(gram, gram.t())


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "slice"])
def test_cpu_vector_passes_span_several_column_tiles(dtype: torch.dtype, sliced: bool) -> None:
    """The numba vector passes at a width of two full column tiles and a remainder (their tiles are
    wider than ``N``): every tile boundary sums exactly as float64."""
    from lightning_mfac.fisher.kernels import cpu

    n = 2 * max(cpu.DOTS_TILE, cpu.COMBINE_TILE) + 37
    kern = resolve_kernels("cpu", "cpu")
    rows = window(dtype, M, n, sliced)
    g64 = rows.to(torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=gen, dtype=torch.float64).to(torch.float32)
    c = torch.randn(M, generator=gen, dtype=torch.float64)
    assert relerr(kern.dots(rows, x), g64 @ x.to(torch.float64)) <= F64_TOL
    assert relerr(kern.combine(rows, c, out_dtype=torch.float64), g64.t() @ c) <= F64_TOL
    out = torch.empty(n)
    assert kern.combine(rows, c, out=out) is out
    assert relerr(out, g64.t() @ c) <= 6e-8  # rounded once to out's float32


@pytest.mark.parametrize("impl", IMPLS)
def test_out_accumulates_for_dots_and_gram_and_is_written_by_combine(impl: str) -> None:
    kern = resolve_kernels(impl, "cpu")
    rows = window(torch.float32, M, N, sliced=True)
    g64 = rows.to(torch.float64)
    x = torch.randn(N)
    start = torch.randn(M, dtype=torch.float64)
    out = start.clone()
    assert kern.dots(rows, x, out=out) is out
    assert relerr(out - start, g64 @ x.double()) <= F64_TOL

    gram_out = torch.eye(M, dtype=torch.float64)
    assert kern.gram(rows, out=gram_out) is gram_out
    assert relerr(gram_out - torch.eye(M, dtype=torch.float64), g64 @ g64.t()) <= F64_TOL

    c = torch.randn(M, 2, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        comb_out = torch.full((N, 2), 7.0, dtype=dtype)
        assert kern.combine(rows, c, out=comb_out) is comb_out
        assert relerr(comb_out, g64.t() @ c) <= {torch.bfloat16: 4e-3}.get(dtype, 6e-8)
    # Rounded once to nearest, as torch rounds the float64 result.
    bf = kern.combine(rows, c, out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, (g64.t() @ c).to(torch.bfloat16))
    # A non-contiguous out (a column of a bigger buffer) is written in place too.
    buf = torch.zeros(N, 3, dtype=torch.float32)
    kern.combine(rows, c[:, 0], out=buf[:, 1])
    assert relerr(buf[:, 1], g64.t() @ c[:, 0]) <= 6e-8 and not buf[:, 0].any() and not buf[:, 2].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_widening_is_exact_for_special_values(impl: str) -> None:
    """Widened from the bits: signed zeros, subnormals, the extremes and a NaN come out exactly."""
    kern = resolve_kernels(impl, "cpu")
    values = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, 3.0e38, -3.0e38, 1e-40, -9.2e-41, 1.1754944e-38, 65504.0, 0.1, -7.0],
        dtype=torch.float64,
    )
    rows = values.to(torch.bfloat16).reshape(2, 6)
    exact = rows.to(torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.equal(kern.dots(rows, eye), exact)
    assert torch.equal(
        kern.combine(rows, torch.eye(2, dtype=torch.float64), out_dtype=torch.float64), exact.t()
    )
    nan_rows = rows.clone()
    nan_rows[1, 3] = float("nan")
    d = kern.dots(nan_rows, torch.ones(6))
    assert torch.isfinite(d[0]) and torch.isnan(d[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [1, 7, 128, N, N + 5], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "slice"])
def test_column_block_passes_match_float64(impl: str, dtype: torch.dtype, block: int, sliced: bool) -> None:
    """``block_dots``/``block_combine`` equal ``dots``/``combine`` of each block of columns, in float64
    (blocks that divide ``n`` and ones that leave a short last block, one block, a block wider
    than the window)."""
    kern = resolve_kernels(impl, "cpu")
    rows = window(dtype, M, N, sliced)
    rows64 = rows.to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, generator=gen, dtype=torch.float64)
    nblocks = -(-N // block)
    c = torch.randn(nblocks, M, generator=gen, dtype=torch.float64)
    spans = [slice(b * block, min(N, (b + 1) * block)) for b in range(nblocks)]
    u_ref = torch.stack([rows64[:, s] @ x[s] for s in spans])
    out_ref = torch.cat([rows64[:, s].t() @ c[b] for b, s in enumerate(spans)])
    u = kern.block_dots(rows, x, block)
    assert u.shape == (nblocks, M) and u.dtype == torch.float64
    assert relerr(u, u_ref) < F64_TOL
    out = kern.block_combine(rows, c, block, out_dtype=torch.float64)
    assert out.shape == (N,) and out.dtype == torch.float64
    assert relerr(out, out_ref) < F64_TOL
    rounded = kern.block_combine(rows, c, block)
    assert rounded.dtype == kernels_mod.default_out_dtype(dtype)
    # float64 sums rounded once: within the output's own rounding
    assert relerr(rounded, out_ref) < (F64_TOL if rounded.dtype == torch.float64 else 2.0**-24)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [7, 128, N + 5], ids=lambda b: f"B{b}")
def test_block_woodbury_is_the_blocked_inverse(impl: str, dtype: torch.dtype, block: int) -> None:
    """``block_woodbury`` (the blocked static ``mul``, fused on the CPU) against each block's dense
    float64 ``(λI + G_bᵀG_b/m)⁻¹ x_b``, with the factors of ``m·λ·I + G_b G_bᵀ``, written into ``out``."""
    kern = resolve_kernels(impl, "cpu")
    rows = window(dtype, M, N, sliced=True)
    rows64 = rows.to(torch.float64)
    damp = 1e-2
    x = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spans = [slice(b, min(N, b + block)) for b in range(0, N, block)]
    eye = torch.eye(M, dtype=torch.float64)
    factor = torch.stack([torch.linalg.cholesky(rows64[:, s] @ rows64[:, s].T + M * damp * eye) for s in spans])
    ref = torch.cat([
        torch.linalg.solve(damp * torch.eye(s.stop - s.start, dtype=torch.float64) + rows64[:, s].T @ rows64[:, s] / M, x[s])
        for s in spans
    ])  # fmt: skip
    out = torch.full((N,), float("nan"), dtype=torch.float64)
    got = kern.block_woodbury(rows, x, block, factor, damp, out=out)
    assert got is out
    assert relerr(out, ref) < 1e-11
    with pytest.raises(ValueError, match=r"factor has shape .*expected float64 \(nblocks, m, m\)"):
        kern.block_woodbury(rows, x, block, factor[:, 1:, 1:], damp)
    with pytest.raises(ValueError, match="damp=0 is invalid"):
        kern.block_woodbury(rows, x, block, factor, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_column_block_passes_refuse_bad_blocks(impl: str) -> None:
    kern = resolve_kernels(impl, "cpu")
    rows = torch.zeros(4, 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"block={bad!r} is not supported: expected a positive int"):
            kern.block_dots(rows, torch.zeros(10), bad)
    with pytest.raises(ValueError, match="x must be 1-D"):
        kern.block_dots(rows, torch.zeros(10, 2), 5)
    with pytest.raises(ValueError, match=r"coeffs has shape \(3, 4\): expected \(nblocks, m\) = \(2, 4\)"):
        kern.block_combine(rows, torch.zeros(3, 4, dtype=torch.float64), 5)
    assert kern.block_dots(torch.zeros(3, 0), torch.zeros(0), 4).shape == (0, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_windows(impl: str) -> None:
    kern = resolve_kernels(impl, "cpu")
    assert kern.dots(torch.zeros(0, 5), torch.ones(5)).shape == (0,)
    assert torch.equal(kern.dots(torch.zeros(3, 0), torch.ones(0)), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(kern.combine(torch.zeros(0, 4), torch.zeros(0, dtype=torch.float64)), torch.zeros(4))
    assert torch.equal(kern.gram(torch.zeros(2, 0)), torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_names_the_parameter(impl: str) -> None:
    kern = resolve_kernels(impl, "cpu")
    rows = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="rows must be a 2-D"):
        kern.dots(torch.zeros(6), torch.zeros(6))
    with pytest.raises(TypeError, match=r"rows.dtype=torch.float16 .*float32, bfloat16 or float64"):
        kern.gram(torch.zeros(4, 6, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"rows.dtype=torch.int64"):
        kern.dots(torch.zeros(4, 6, dtype=torch.int64), torch.zeros(6))
    with pytest.raises(ValueError, match=r"x has 5 rows .*x.shape\[0\] == 6"):
        kern.dots(rows, torch.zeros(5))
    with pytest.raises(ValueError, match="x must be 1-D"):
        kern.dots(rows, torch.zeros(6, 1, 1))
    with pytest.raises(TypeError, match="x.dtype=torch.int64"):
        kern.dots(rows, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"coeffs has 3 rows .*coeffs.shape\[0\] == 4"):
        kern.combine(rows, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out has shape \(3,\), expected \(4,\)"):
        kern.dots(rows, torch.zeros(6), out=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="out.dtype=torch.float32 .*float64"):
        kern.gram(rows, out=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="out_dtype=torch.int32"):
        kern.combine(rows, torch.zeros(4, dtype=torch.float64), out_dtype=torch.int32)
    with pytest.raises(TypeError, match="rows must be a torch.Tensor"):
        kern.gram([[1.0]])


def test_resolve_kernels() -> None:
    assert resolve_kernels("torch").name == "torch"
    assert resolve_kernels("auto", "cpu").name == ("cpu" if HAS_NUMBA else "torch")
    if HAS_TRITON:
        assert resolve_kernels("auto", "cuda").name == "triton"
        assert resolve_kernels("triton", "cpu").name == "triton"
    with pytest.raises(ValueError, match=r"kernels='numba' is not supported: expected one of 'auto'"):
        resolve_kernels("numba")
    with pytest.raises(ValueError, match="kernels='cpu' runs on CPU tensors only"):
        resolve_kernels("cpu", "cuda")


@pytest.mark.parametrize(
    ("impl", "device", "dependency"), [("cpu", "cpu", "numba"), ("triton", "cuda", "triton")]
)
def test_missing_dependency_auto_falls_back_once_and_by_name_is_an_error(
    monkeypatch: pytest.MonkeyPatch, impl: str, device: str, dependency: str
) -> None:
    module = kernels_mod._NEEDS[impl][0]

    def missing(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named {dependency!r}")
        return real_import(name, *args, **kwargs)

    real_import = importlib.import_module
    monkeypatch.setattr(kernels_mod.importlib, "import_module", missing)
    monkeypatch.setattr(kernels_mod, "_warned", set())
    with pytest.warns(RuntimeWarning, match=f"{dependency} could not be imported.*kernels='torch'"):
        assert resolve_kernels("auto", device).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        assert resolve_kernels("auto", device).name == "torch"
    with pytest.raises(ImportError, match=f"kernels='{impl}' needs {dependency}"):
        resolve_kernels(impl, "cpu")


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of the largest tensor an aten op creates (views share storage: skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=needs_numba)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_passes_allocate_no_window_sized_temporaries(impl: str, dtype: torch.dtype) -> None:
    kern = resolve_kernels(impl, "cpu")
    m, n = 32, 200_000
    rows = torch.randn(m, n + 16).to(dtype)[:, 8 : 8 + n]
    window_bytes = m * n * rows.element_size()
    # A bounded float64 tile (2 MiB, fixed) or a twentieth of the window's values, whichever is larger.
    tile_bytes = 2 << 20
    x = torch.randn(n)
    c = torch.randn(m, dtype=torch.float64)
    for name, run, result_bytes in [
        ("dots", lambda: kern.dots(rows, x), m * 8),
        ("combine", lambda: kern.combine(rows, c), n * 4),
        ("gram", lambda: kern.gram(rows), m * m * 8),
    ]:
        with LargestAllocation() as mode:
            run()
        assert mode.largest <= max(result_bytes, tile_bytes, window_bytes // 10), (
            name,
            mode.largest,
            window_bytes,
        )


# --- accuracy of F⁻¹g through the passes, on real gradients ----------------------------------------

STEPS = 150
REAL_CONFIGS = [(32, 1e-5), (128, 1e-4)]  # (m, damp)
BOUND = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def gradients() -> torch.Tensor:
    return digits_sgd_gradients(STEPS)


def shifted_gram(kern, rows: torch.Tensor, damp: float) -> torch.Tensor:
    s = kern.gram(rows)
    s.diagonal().add_(rows.shape[0] * damp)
    return s


def inverse_fisher_times(kern, rows: torch.Tensor, g: torch.Tensor, damp: float) -> torch.Tensor:
    """``F⁻¹g = (g − Gᵀ S⁻¹ (G g)) / λ`` with ``S = mλI + G Gᵀ``: every pass over ``G`` through ``kern``."""
    c = torch.linalg.solve(shifted_gram(kern, rows, damp), kern.dots(rows, g))
    return (g.to(torch.float64) - kern.combine(rows, c, out_dtype=torch.float64)) / damp


def inverse_fisher_times_row(kern, rows: torch.Tensor, j: int, damp: float) -> torch.Tensor:
    """``F⁻¹gⱼ = m·Gᵀ S⁻¹ eⱼ`` for the gradient stored in row ``j`` (the dynamic step's form: no
    cancellation between nearly equal vectors)."""
    m = rows.shape[0]
    e = torch.zeros(m, dtype=torch.float64)
    e[j] = 1.0
    return m * kern.combine(
        rows, torch.linalg.solve(shifted_gram(kern, rows, damp), e), out_dtype=torch.float64
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "damp"), REAL_CONFIGS)
def test_inverse_fisher_on_real_gradients(
    gradients: torch.Tensor, impl: str, dtype: torch.dtype, m: int, damp: float
) -> None:
    kern = resolve_kernels(impl, "cpu")
    ref64 = resolve_kernels("torch")
    g64 = gradients[-m:]
    # The window as a column-slice view of a wider buffer, as a paged or sharded storage hands it over.
    d = g64.shape[1]
    buf = torch.zeros(m, d + 64, dtype=dtype)
    buf[:, 32 : 32 + d] = g64.to(dtype)
    rows = buf[:, 32 : 32 + d]
    fresh = gradients[0]  # a gradient from before the window
    err = {
        "fresh": relerr(
            inverse_fisher_times(kern, rows, fresh.to(torch.float32), damp),
            inverse_fisher_times(ref64, g64, fresh, damp),
        ),
        "in-window": relerr(
            inverse_fisher_times_row(kern, rows, m - 1, damp), inverse_fisher_times(ref64, g64, g64[-1], damp)
        ),
    }
    print(
        f"\n[kernels] {impl} {dtype} m={m} damp={damp:g}: F⁻¹g rel err "
        + ", ".join(f"{k} {v:.2e}" for k, v in err.items())
    )
    assert max(err.values()) <= BOUND[dtype], err


# --- the CUDA code path, compiled without a GPU ------------------------------------------------------

_COMPILE_SCRIPT = """
import torch
from lightning_mfac.fisher.kernels import triton_kernels as tk

m, n = 1024, 4096
f32 = torch.zeros(m, n)
bf16 = torch.zeros(m, n, dtype=torch.bfloat16)
f64 = torch.zeros(m, n, dtype=torch.float64)
plans = {
    "dots f32 vector": tk.plan_dots(f32, torch.zeros(n, 1), torch.zeros(m, 1, dtype=torch.float64), False, False),
    "dots bf16 block +=": tk.plan_dots(bf16[:, 8:], torch.zeros(n - 8, 4, dtype=torch.float64),
                                       torch.zeros(m, 4, dtype=torch.float64), True, False),
    "combine bf16 -> bf16": tk.plan_combine(bf16, torch.zeros(m, 1, dtype=torch.float64),
                                            torch.zeros(n, 1, dtype=torch.bfloat16), False),
    "combine f64 block": tk.plan_combine(f64, torch.zeros(m, 3, dtype=torch.float64),
                                         torch.zeros(n, 3, dtype=torch.float64), False),
    "dots f32 column blocks": tk.plan_dots(f32, torch.zeros(n, 1), torch.zeros(n // 1000 + 1, m, dtype=torch.float64),
                                           False, False, block=1000),
    "combine bf16 column blocks": tk.plan_combine(bf16, torch.zeros(n // 1000 + 1, m, dtype=torch.float64),
                                                  torch.zeros(n, 1, dtype=torch.float64), False, block=1000),
    "gram bf16 +=": tk.plan_gram(bf16, torch.zeros(m, m, dtype=torch.float64), True, False),
}
for name, plan in plans.items():
    kernel = tk.compile_for(plan, 90)
    assert ".f64" in kernel.asm["ptx"], name  # float64 arithmetic on the device
    print("compiled", name, kernel.metadata.num_warps)
"""


@needs_triton
def test_cuda_kernels_compile_for_sm90_without_a_gpu(tmp_path) -> None:
    """The kernels as launched on CUDA (GPU block sizes) compile for an H100/H200 (sm_90) through
    Triton's own ptxas. In a subprocess: a failing lowering aborts the process (a C++ assertion)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 7, proc.stdout


# --- end to end: the dynamic step through each implementation ---------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dynamic_steps_on_real_gradients_through_each_implementation(
    gradients: torch.Tensor, impl: str, dtype: torch.dtype
) -> None:
    """``DynamicFisherInverse.update_mul`` with ``kernels=impl``: a full window plus a refactorization
    on real gradients, against a float64 window (kept short: the Triton passes run interpreted)."""
    from lightning_mfac.fisher import DynamicFisherInverse

    m, damp, steps = 16, 1e-5, 24
    d = gradients.shape[1]
    ref = DynamicFisherInverse(d, m, damp, window={"dtype": torch.float64, "kernels": "torch"})
    inv = DynamicFisherInverse(d, m, damp, window={"dtype": dtype, "kernels": impl, "refactor_every": 8})
    assert inv.window.kernels.name == impl
    worst = 0.0
    for g in gradients[-steps:]:
        want = ref.update_mul(g)
        worst = max(worst, relerr(inv.update_mul(g.to(torch.float32)), want))
    print(f"\n[kernels] dynamic update_mul {impl} {dtype} m={m} damp={damp:g}: max rel err {worst:.2e}")
    assert worst <= BOUND[dtype]
