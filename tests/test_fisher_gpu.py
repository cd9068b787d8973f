"""CUDA-only checks of the Fisher core: paged windows (pinned host pages streamed to the GPU) give
the device-resident result, the peak GPU memory of paged runs and checkpoints stays within a few
pages, the CUDA kernels keep float32 accuracy on real training gradients (also with TF32 enabled
by the user), and the captured CUDA-graph step equals the eager one. Skipped without CUDA::

    python -m pytest -q tests/test_fisher_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from real_gradients import digits_sgd_gradients

from lightning_mfac.fisher import DynamicFisherInverse, StaticFisherInverse, WindowConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
MiB = 1 << 20


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm())


def correlated_grads(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    rows = []
    for _ in range(n):
        base = 0.9 * base + 0.3 * torch.randn(d, generator=gen)
        rows.append(base + 0.5 * torch.randn(d, generator=gen))
    return torch.stack(rows)


# ---------------------------------------------------------------------- paged == device
@pytest.mark.parametrize("block_size", [None, 32, 1000])  # full, direct (B ≤ m), Woodbury per block
def test_static_paged_matches_device(block_size: int | None) -> None:
    m, d, damp = 48, 100_003, 1e-3  # d not a multiple of the page or block width
    grads = correlated_grads(m, d, seed=1)
    paged = StaticFisherInverse(
        grads.pin_memory(), damp, block_size=block_size, device="cuda", window=WindowConfig(page_cols=8192)
    )
    assert paged.paged and paged.page_cols < d
    resident = StaticFisherInverse(grads.to(CUDA), damp, block_size=block_size)
    assert not resident.paged
    torch.testing.assert_close(paged.diag(), resident.diag(), rtol=1e-9, atol=0)
    x = torch.randn(d, 3, device=CUDA, dtype=torch.float64)
    assert rel(paged.mul(x), resident.mul(x)) < 1e-6
    rows = torch.randint(0, d, (200,), device=CUDA)
    cols = torch.randint(0, d, (200,), device=CUDA)
    torch.testing.assert_close(paged.entries(rows, cols), resident.entries(rows, cols), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_paged_matches_device(dtype: torch.dtype) -> None:
    m, d, damp = 32, 200_003, 1e-4
    grads = correlated_grads(3 * m, d, seed=2).to(CUDA)
    paged = DynamicFisherInverse(
        d, m, damp, device="cuda", window=WindowConfig(dtype=dtype, storage="paged", page_cols=16_384)
    )
    resident = DynamicFisherInverse(
        d, m, damp, device="cuda", window=WindowConfig(dtype=dtype, storage="device")
    )
    assert paged.storage == "PagedWindow" and paged.window.npages > 2
    assert paged.window.host.is_pinned()
    for g in grads:
        assert rel(paged.update_mul(g), resident.update_mul(g)) < 1e-5
    x = torch.randn(d, 2, device=CUDA)
    assert rel(paged.mul(x), resident.mul(x)) < 1e-5
    keep = torch.rand(d, device=CUDA) > 0.3
    paged.mask_coordinates(keep)
    resident.mask_coordinates(keep)
    assert rel(paged.mul(x), resident.mul(x)) < 1e-5
    state = paged.state_dict()
    clone = DynamicFisherInverse(
        d, m, damp, device="cuda", window=WindowConfig(dtype=dtype, storage="paged", page_cols=16_384)
    )
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.mul(x), paged.mul(x))


def test_dynamic_auto_storage_on_cuda_is_device_for_small_windows() -> None:
    inv = DynamicFisherInverse(10_000, 8, device="cuda", window=WindowConfig(storage="auto"))
    assert inv.storage == "DeviceWindow"


# ---------------------------------------------------------------------- peak memory
def _peak_during(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_paged_peak_memory(dtype: torch.dtype) -> None:
    m, d, page_cols, damp = 256, 2_000_000, 65_536, 1e-4
    itemsize = torch.empty((), dtype=dtype).element_size()
    page = m * page_cols * itemsize
    inv = DynamicFisherInverse(
        d, m, damp, device="cuda", window=WindowConfig(dtype=dtype, storage="paged", page_cols=page_cols)
    )
    window_bytes = m * d * itemsize
    assert window_bytes > 10 * page  # the window itself could never fit the bound below
    grads = [torch.randn(d, device=CUDA) for _ in range(3)]

    def steps() -> None:
        for g in grads:
            inv.update_mul(g)
        inv.mul(grads[0])

    steps()  # warm up (streams, cuBLAS workspace)
    peak = _peak_during(steps)
    # Three pages in flight + the m × m float64 work + a few d-vectors (‖g‖² in float64, results);
    # a bfloat16 page is also widened to float32 for Gᵀc, at most 65,536 columns at a time.
    widen = m * min(page_cols, 1 << 16) * 4 if dtype == torch.bfloat16 else 0
    bound = 3 * page + widen + 16 * m * m * 8 + 6 * d * 8 + 8 * MiB
    print(
        f"\n[gpu] dynamic paged peak {peak / MiB:.1f} MiB, page {page / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB"
    )
    assert peak <= bound


def test_static_paged_peak_memory() -> None:
    m, d, page_cols, damp = 128, 1_000_000, 32_768, 1e-4
    grads = torch.randn(m, d).pin_memory()

    def build() -> StaticFisherInverse:
        return StaticFisherInverse(grads, damp, device="cuda", window=WindowConfig(page_cols=page_cols))

    holder = []
    peak = _peak_during(lambda: holder.append(build()))
    page32 = m * page_cols * 4
    page64 = m * page_cols * 8
    # Up to three float32 pages in flight plus one conversion on the way back to the host, three
    # float64 work copies of a page (page, solve, squares; the previous solve lives until the
    # next is assigned), the m × m Gram/factor and the float64 diagonal that the result keeps:
    # a constant number of pages, independent of d (one page of slack).
    bound = 4 * page32 + 4 * page64 + 8 * m * m * 8 + 2 * d * 8 + 8 * MiB
    print(
        f"\n[gpu] static paged peak {peak / MiB:.1f} MiB, page {page32 / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB"
    )
    assert peak <= bound
    inv = holder[0]
    x = torch.randn(d, device=CUDA, dtype=torch.float64)
    peak_mul = _peak_during(lambda: inv.mul(x))
    assert peak_mul <= 2 * page32 + 3 * page64 + 6 * d * 8 + 8 * MiB


# ---------------------------------------------------------------------- CUDA numerics
@pytest.fixture(scope="module")
def real_gradients() -> torch.Tensor:
    """Gradients of a real SGD run (MLP on scikit-learn's digits), as in test_fisher_accuracy."""
    return digits_sgd_gradients(150)


@pytest.mark.parametrize("matmul_precision", ["highest", "high"])
@pytest.mark.parametrize(("m", "damp"), [(32, 1e-5), (128, 1e-5)])
def test_cuda_float32_window_accuracy(
    real_gradients: torch.Tensor, m: int, damp: float, matmul_precision: str
) -> None:
    """Same measurement as tests/test_fisher_accuracy.py with the CUDA code path, also with the
    user having enabled TF32 matmuls (the Fisher core must not use them)."""
    d = real_gradients.shape[1]
    grads = real_gradients.to(CUDA)
    ref = DynamicFisherInverse(d, m, damp, device="cuda", window=WindowConfig(dtype=torch.float64))
    fp32 = DynamicFisherInverse(d, m, damp, device="cuda", window=WindowConfig(dtype=torch.float32))
    bf16 = DynamicFisherInverse(d, m, damp, device="cuda", window=WindowConfig(dtype=torch.bfloat16))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        e32, ebf = [], []
        for g in grads:
            r64 = ref.update_mul(g)
            e32.append(rel(fp32.update_mul(g.float()), r64))
            ebf.append(rel(bf16.update_mul(g.float()), r64))
        assert torch.get_float32_matmul_precision() == matmul_precision  # restored after each call
    finally:
        torch.set_float32_matmul_precision(previous)
    print(
        f"\n[gpu accuracy] m={m} damp={damp:g} precision={matmul_precision}: fp32 max {max(e32):.2e}, bf16 max {max(ebf):.2e}"
    )
    assert max(e32) <= 1e-6
    assert max(ebf) <= 1.5e-2


# ---------------------------------------------------------------------- capture, reads, memory
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_matches_eager(dtype: torch.dtype) -> None:
    m, d, damp = 64, 300_003, 1e-4
    grads = correlated_grads(4 * m, d, seed=3).to(CUDA)
    eager = DynamicFisherInverse(d, m, damp, device="cuda", window=WindowConfig(dtype=dtype, capture="off"))
    graph = DynamicFisherInverse(d, m, damp, device="cuda", window=WindowConfig(dtype=dtype))
    assert graph.captured
    for g in grads:
        a, _ = eager.update_mul(g, return_finite=True)
        b, ok = graph.update_mul(g, return_finite=True)
        assert bool(ok) and rel(b, a) < 1e-6
    assert graph._captured_step.runner is not None


def test_window_state_dict_stays_off_the_device_when_paged() -> None:
    m, d = 64, 1_000_000
    inv = DynamicFisherInverse(
        d, m, 1e-4, device="cuda", window=WindowConfig(storage="paged", page_cols=65_536)
    )
    for _ in range(3):
        inv.update_mul(torch.randn(d, device=CUDA))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    state = inv.state_dict()
    clone = DynamicFisherInverse(
        d, m, 1e-4, device="cuda", window=WindowConfig(storage="paged", page_cols=65_536)
    )
    clone.load_state_dict(state)
    torch.cuda.synchronize()
    window = m * d * 4
    assert torch.cuda.max_memory_allocated() - base < 0.1 * window
    x = torch.randn(d, device=CUDA)
    torch.testing.assert_close(clone.mul(x), inv.mul(x))
