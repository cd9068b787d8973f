"""StaticFisherInverse against a materialized float64 inverse of F = λI + GᵀG/m (masked to its
diagonal blocks for ``block_size``) on small d."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import dense_fisher_inverse as dense_inverse

from lightning_mfac.fisher import StaticFisherInverse, WindowConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b).norm() / b.norm())


def make_grads(m: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A shared direction makes the rows correlated, like consecutive training gradients.
    common = torch.randn(1, d, generator=gen, dtype=torch.float64)
    return (torch.randn(m, d, generator=gen, dtype=torch.float64) + 2.0 * common).to(dtype)


# (m, d, block_size): m > d and m < d; blocks dividing d and not; B ≤ m (direct) and B > m (Woodbury).
CASES = [
    (24, 10, None),  # m > d, full Woodbury
    (24, 10, 5),  # direct, divides
    (24, 10, 3),  # direct, last block of 1
    (6, 40, None),  # m < d, full Woodbury
    (6, 40, 8),  # Woodbury per block (B > m), divides
    (6, 40, 12),  # Woodbury per block, last block of 4
    (6, 40, 5),  # direct (B ≤ m), divides
    (6, 40, 7),  # direct, last block of 5
    (6, 40, 1),  # diagonal F
    (6, 40, 40),  # one block = full, through the blocked code path
    (6, 40, 100),  # block larger than d
]


@pytest.mark.parametrize(
    ("storage", "page_cols"), [("device", None), ("device", 7), ("device", 16), ("paged", 7)]
)
@pytest.mark.parametrize(("m", "d", "block_size"), CASES)
def test_matches_dense_inverse(m: int, d: int, block_size: int | None, storage: str, page_cols: int | None) -> None:
    damp = 0.05
    grads = make_grads(m, d, seed=m * 1000 + d)
    ref = dense_inverse(grads, damp, None if block_size is None else min(block_size, d))
    window = WindowConfig(storage=storage, page_cols=page_cols)
    inv = StaticFisherInverse(grads, damp, block_size=block_size, window=window)

    torch.testing.assert_close(inv.diag(), torch.diagonal(ref), rtol=1e-10, atol=0)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(inv.mul(x), ref @ x, rtol=1e-10, atol=1e-10)
    xs = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    out = inv.mul(xs)
    assert out.shape == (d, 3)
    torch.testing.assert_close(out, ref @ xs, rtol=1e-10, atol=1e-10)

    # Single entries and vectorized pairs, including pairs in different blocks (exactly 0).
    assert inv.entry(0, 0) == pytest.approx(float(ref[0, 0]), rel=1e-10)
    assert inv.entry(1, d - 1) == pytest.approx(float(ref[1, d - 1]), rel=1e-9, abs=1e-12)
    rows = torch.randint(0, d, (50,), generator=gen)
    cols = torch.randint(0, d, (50,), generator=gen)
    rows = torch.cat([rows, torch.arange(d)])
    cols = torch.cat([cols, torch.arange(d).flip(0)])
    vals = inv.entries(rows, cols)
    torch.testing.assert_close(vals, ref[rows, cols], rtol=1e-9, atol=1e-12)
    if block_size is not None and min(block_size, d) < d:
        b = min(block_size, d)
        cross = rows // b != cols // b
        assert bool(cross.any())
        assert bool((vals[cross] == 0).all())


@pytest.mark.parametrize("block_size", [None, 4, 16])
def test_float32_gradients_give_float32_accuracy(block_size: int | None) -> None:
    m, d, damp = 12, 64, 0.05
    grads64 = make_grads(m, d, seed=7)
    grads = grads64.to(torch.float32)
    # The reference uses the same (float32-representable) gradients: only the arithmetic differs.
    ref = dense_inverse(grads.to(torch.float64), damp, block_size)
    inv = StaticFisherInverse(grads, damp, block_size=block_size)
    x = torch.randn(d, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel_err(inv.diag(), torch.diagonal(ref)) < 1e-12  # diagonal taken in float64
    assert rel_err(inv.mul(x), ref @ x) < 2e-6
    assert inv.mul(x.to(torch.float32)).dtype == torch.float64


def test_float32_q_storage_is_default_for_float32_grads() -> None:
    grads = make_grads(5, 30, seed=2, dtype=torch.float32)
    inv = StaticFisherInverse(grads, 0.1)
    assert inv.dtype == torch.float32
    assert StaticFisherInverse(grads.double(), 0.1).dtype == torch.float64
    assert StaticFisherInverse(grads, 0.1, window=WindowConfig(dtype=torch.float64)).dtype == torch.float64


def test_pages_hold_whole_blocks() -> None:
    grads = make_grads(4, 50, seed=5)
    inv = StaticFisherInverse(grads, 0.1, block_size=8, window=WindowConfig(page_cols=20))
    assert inv.page_cols == 16  # rounded down to whole blocks
    inv = StaticFisherInverse(grads, 0.1, block_size=8, window=WindowConfig(page_cols=3))
    assert inv.page_cols == 8  # at least one block
    torch.testing.assert_close(inv.diag(), torch.diagonal(dense_inverse(grads, 0.1, 8)), rtol=1e-10, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 10),
    d=st.integers(1, 30),
    block=st.one_of(st.none(), st.integers(1, 35)),
    page_cols=st.one_of(st.none(), st.integers(1, 30)),
    damp=st.sampled_from([1e-3, 0.1, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(
    m: int, d: int, block: int | None, page_cols: int | None, damp: float, seed: int
) -> None:
    grads = make_grads(m, d, seed)
    ref = dense_inverse(grads, damp, None if block is None else min(block, d))
    inv = StaticFisherInverse(grads, damp, block_size=block, window=WindowConfig(page_cols=page_cols))
    scale = float(ref.abs().max())
    torch.testing.assert_close(inv.diag(), torch.diagonal(ref), rtol=1e-8, atol=1e-10 * scale)
    x = torch.randn(d, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(inv.mul(x), ref @ x, rtol=1e-8, atol=1e-9 * scale * float(x.abs().max()))
    i, j = seed % d, (seed // 7) % d
    assert inv.entry(i, j) == pytest.approx(float(ref[i, j]), rel=1e-7, abs=1e-9 * scale)


@pytest.mark.parametrize("block_size", [None, 1024])
def test_no_second_window_in_memory(block_size: int | None) -> None:
    """G is kept as given (no copy, no Q): construction, diag, mul and entries allocate at most a
    float64 column tile, far below the window."""
    from dispatch_counters import DispatchCounter

    m, d = 32, 200_000
    grads = torch.randn(m, d, generator=torch.Generator().manual_seed(0))
    with DispatchCounter() as c:
        inv = StaticFisherInverse(grads, 1e-3, block_size=block_size, window=WindowConfig(page_cols=8192))
        inv.diag()
        inv.mul(grads[0])
        inv.entries(torch.tensor([0, 5, 70_000]), torch.tensor([3, 5, 70_001]))
    window = grads.numel() * grads.element_size()
    assert c.largest_bytes <= 0.1 * window, c.summary()


@pytest.mark.parametrize("page_cols", [None, 1024])
def test_wide_blocks_through_the_kernels_match_dense(page_cols: int | None) -> None:
    m, d, b, damp = 6, 1500, 512, 0.05  # blocks of 512, 512 and 476 columns
    grads = make_grads(m, d, seed=9)
    ref = dense_inverse(grads, damp, b)
    inv = StaticFisherInverse(grads, damp, block_size=b, window=WindowConfig(page_cols=page_cols))
    x = torch.randn(d, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(inv.mul(x), ref @ x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inv.mul(x[:, 0]), ref @ x[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inv.diag(), torch.diagonal(ref), rtol=1e-10, atol=0)
