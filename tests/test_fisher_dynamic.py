"""DynamicFisherInverse against a dense float64 reference of the sliding window: F = λI + WᵀW/m
with W the ring buffer (empty slots are zero rows, m is always the capacity)."""

from __future__ import annotations

import io

import pytest
import torch
from references import correlated_gradients as correlated_grads

from lightning_mfac.fisher import DynamicFisherInverse, WindowConfig


class DenseWindow:
    """The float64 reference: a ring buffer of rows and a dense solve."""

    def __init__(self, d: int, m: int, damp: float) -> None:
        self.w = torch.zeros(m, d, dtype=torch.float64)
        self.m, self.damp, self.slot = m, damp, 0

    def update(self, g: torch.Tensor) -> None:
        self.w[self.slot] = g.to(torch.float64)
        self.slot = (self.slot + 1) % self.m

    def fisher(self) -> torch.Tensor:
        d = self.w.shape[1]
        return self.damp * torch.eye(d, dtype=torch.float64) + self.w.t() @ self.w / self.m

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.fisher(), x.to(torch.float64))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).norm() / b.to(torch.float64).norm())




@pytest.mark.parametrize(("d", "m"), [(12, 5), (9, 16), (30, 7)])
def test_matches_dense_over_wraparounds(d: int, m: int) -> None:
    damp = 0.01
    inv = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float64))
    ref = DenseWindow(d, m, damp)
    grads = correlated_grads(3 * m + 4, d, seed=d)
    probe = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(inv.mul(probe), probe / damp)  # empty window: F = λI
    for t, g in enumerate(grads):
        ref.update(g)
        r = inv.update_mul(g)
        assert r.shape == (d,) and r.dtype == torch.float64
        assert rel_err(r, ref.mul(g)) < 1e-10, t
        assert inv.filled == min(t + 1, m)
        if t % 3 == 0:
            assert rel_err(inv.mul(probe), ref.mul(probe)) < 1e-10, t
    assert inv.count == len(grads)
    assert inv.slot == len(grads) % m


def test_float32_window_matches_dense() -> None:
    d, m, damp = 40, 8, 0.01
    grads = correlated_grads(30, d, seed=3, dtype=torch.float32)
    inv = DynamicFisherInverse(d, m, damp)  # float32 window (default)
    ref = DenseWindow(d, m, damp)
    for g in grads:
        ref.update(g)
        r = inv.update_mul(g)
        assert r.dtype == torch.float32
        assert rel_err(r, ref.mul(g)) < 1e-6


def test_update_mul_equals_update_then_mul() -> None:
    d, m = 20, 6
    a = DynamicFisherInverse(d, m, 1e-2, window=WindowConfig(dtype=torch.float64))
    b = DynamicFisherInverse(d, m, 1e-2, window=WindowConfig(dtype=torch.float64))
    for g in correlated_grads(4 * m, d, seed=11):
        r1 = a.update_mul(g)
        b.update(g)
        r2 = b.mul(g)
        # Two formulas (m·GᵀS⁻¹eⱼ and (g − GᵀS⁻¹Gg)/λ): equal to float64 rounding times κ(S).
        assert rel_err(r1, r2) < 2e-12


def test_mul_matrix_columns() -> None:
    d, m = 15, 4
    inv = DynamicFisherInverse(d, m, 0.02, window=WindowConfig(dtype=torch.float64))
    ref = DenseWindow(d, m, 0.02)
    for g in correlated_grads(6, d, seed=4):
        inv.update(g)
        ref.update(g)
    x = torch.randn(d, 5, dtype=torch.float64)
    out = inv.mul(x)
    assert out.shape == (d, 5)
    assert rel_err(out, ref.mul(x)) < 1e-10
    for k in range(5):  # column k of the batch is the product of column k alone
        assert rel_err(out[:, k], inv.mul(x[:, k])) < 1e-12
    out32 = inv.mul(x.to(torch.float32))
    assert out32.dtype == torch.float32


def test_reset_empties_the_window() -> None:
    d, m, damp = 10, 3, 0.1
    inv = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float64))
    grads = correlated_grads(10, d, seed=5)
    for g in grads[:5]:
        inv.update(g)
    inv.reset()
    assert inv.count == 0 and inv.slot == 0 and inv.filled == 0
    x = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(inv.mul(x), x / damp)
    fresh = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float64))
    for g in grads[5:]:
        torch.testing.assert_close(inv.update_mul(g), fresh.update_mul(g), rtol=1e-12, atol=0)


@pytest.mark.parametrize("through_bytes", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype: torch.dtype, through_bytes: bool) -> None:
    d, m = 14, 5
    grads = correlated_grads(20, d, seed=6, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    a = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(dtype=dtype, refactor_every=3))
    for g in grads[:8]:  # mid-ring, mid refactor period
        a.update_mul(g)
    state = a.state_dict()
    if through_bytes:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf)
    b = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(dtype=dtype, refactor_every=3))
    b.load_state_dict(state)
    assert (b.slot, b.count) == (a.slot, a.count)
    for g in grads[8:]:
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    x = torch.randn(d, 2, dtype=grads.dtype)
    assert torch.equal(a.mul(x), b.mul(x))


def test_load_state_dict_rejects_other_shape() -> None:
    a = DynamicFisherInverse(10, 4, window=WindowConfig(dtype=torch.float64))
    b = DynamicFisherInverse(11, 4, window=WindowConfig(dtype=torch.float64))
    with pytest.raises(ValueError, match="dim"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_refactor_every_small_and_large_agree(dtype: torch.dtype) -> None:
    d, m = 25, 6
    grads = correlated_grads(
        5 * m, d, seed=8, dtype=torch.float32 if dtype == torch.float32 else torch.float64
    )
    often = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(dtype=dtype, refactor_every=1))
    rarely = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(dtype=dtype, refactor_every=10_000))
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    for g in grads:
        assert rel_err(often.update_mul(g), rarely.update_mul(g)) < tol


def test_mask_coordinates() -> None:
    d, m, damp = 16, 5, 0.05
    inv = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float64))
    ref = DenseWindow(d, m, damp)
    grads = correlated_grads(12, d, seed=12)
    for g in grads[:7]:
        inv.update(g)
        ref.update(g)
    keep = torch.ones(d, dtype=torch.bool)
    keep[::3] = False
    inv.mask_coordinates(keep)
    ref.w[:, ~keep] = 0.0
    assert bool((inv.window.to_dense()[:, ~keep] == 0).all())
    x = torch.randn(d, dtype=torch.float64)
    assert rel_err(inv.mul(x), ref.mul(x)) < 1e-10
    for g in grads[7:]:  # later gradients are stored as given
        ref.update(g)
        assert rel_err(inv.update_mul(g), ref.mul(g)) < 1e-10
    with pytest.raises(ValueError, match="keep"):
        inv.mask_coordinates(torch.ones(d + 1, dtype=torch.bool))


@pytest.mark.parametrize("page_cols", [1, 4, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_paged_storage_matches_device(page_cols: int, dtype: torch.dtype) -> None:
    d, m = 30, 4
    grads = correlated_grads(11, d, seed=13, dtype=torch.float32)
    dev = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(dtype=dtype, storage="device"))
    paged = DynamicFisherInverse(
        d, m, 1e-3, window=WindowConfig(dtype=dtype, storage="paged", page_cols=page_cols)
    )
    assert paged.storage == "PagedWindow" and dev.storage == "DeviceWindow"
    assert paged.window.npages == -(-d // min(page_cols, d))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for g in grads:
        g = g.to(torch.float64) if dtype == torch.float64 else g
        assert rel_err(paged.update_mul(g), dev.update_mul(g)) < tol
    x = torch.randn(d, 3, dtype=grads.dtype)
    assert rel_err(paged.mul(x), dev.mul(x)) < tol
    torch.testing.assert_close(paged.window.to_dense(), dev.window.to_dense())
    keep = torch.arange(d) % 2 == 0
    paged.mask_coordinates(keep)
    dev.mask_coordinates(keep)
    assert rel_err(paged.mul(x), dev.mul(x)) < tol
    state = paged.state_dict()
    other = DynamicFisherInverse(
        d, m, 1e-3, window=WindowConfig(dtype=dtype, storage="paged", page_cols=page_cols)
    )
    other.load_state_dict(state)
    assert torch.equal(other.mul(x), paged.mul(x))


@pytest.mark.filterwarnings("ignore:M-FAC:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("damp", [1e-4, 1e-8])
def test_repeated_gradients_rank_deficient_window(dtype: torch.dtype, damp: float) -> None:
    d, m = 50, 8
    g = correlated_grads(1, d, seed=14, dtype=torch.float32)[0]
    g = g.to(dtype).to(torch.float32)  # exactly representable in the window
    inv = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=dtype))
    ref = DenseWindow(d, m, damp)
    for _ in range(3 * m):
        ref.update(g)
        r = inv.update_mul(g)
        assert bool(torch.isfinite(r).all())
        # F⁻¹g = g / (λ + (k/m)‖g‖²) with k copies in the window: well-conditioned for g itself.
        assert rel_err(r, ref.mul(g)) < 1e-5
    x = torch.randn(d, dtype=torch.float32)
    assert bool(torch.isfinite(inv.mul(x)).all())


def test_bfloat16_window_multiplies_the_stored_gradient() -> None:
    """update_mul on a bf16 window returns F⁻¹ĝ for ĝ = bf16(g), the gradient it stored."""
    d, m, damp = 40, 6, 1e-3
    grads = correlated_grads(15, d, seed=15, dtype=torch.float32)
    inv = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.bfloat16))
    ref = DenseWindow(d, m, damp)
    for g in grads:
        stored = g.to(torch.bfloat16).to(torch.float32)
        ref.update(stored)
        assert rel_err(inv.update_mul(g), ref.mul(stored)) < 1e-6
    torch.testing.assert_close(inv.window.to_dense().to(torch.float64), ref.w, rtol=0, atol=0)


def test_string_dtype_and_float32_default() -> None:
    assert DynamicFisherInverse(4, 2).dtype == torch.float32
    assert DynamicFisherInverse(4, 2, window=WindowConfig(dtype="bf16")).dtype == torch.bfloat16
    assert DynamicFisherInverse(4, 2, window=WindowConfig(dtype="float64")).dtype == torch.float64
