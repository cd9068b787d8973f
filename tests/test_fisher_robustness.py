"""Failure paths of the Fisher core: non-positive Cholesky pivots fall back with a warning and a
finite result, and invalid arguments fail early with a message naming the argument and value."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_mfac.fisher import DynamicFisherInverse, StaticFisherInverse, WindowConfig, make_window
from lightning_mfac.fisher._numerics import spd_cholesky, spd_inverse, warn_once

PIVOT_WARNING = "non-positive pivot"


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """warn_once remembers messages per process: forget them so each test sees its warning,
    whatever ran before it."""
    saved = set(warn_once._seen)
    warn_once._seen.clear()
    yield
    warn_once._seen.clear()
    warn_once._seen.update(saved)


def nearly_singular(n: int = 6, floor: float = 1e-9, seed: int = 0) -> torch.Tensor:
    """A symmetric float64 matrix whose smallest eigenvalue is a tiny negative number, as rounding
    leaves it in the Gram matrix of a window with (near) repeated gradients."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    vals = torch.logspace(0, 2, n, dtype=torch.float64)
    vals[0] = -1e-13
    s = (q * vals) @ q.t()
    return 0.5 * (s + s.t())


def clamped_inverse(s: torch.Tensor, floor: float) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs / vals.clamp_min(floor)) @ vecs.t()


def test_spd_inverse_falls_back_on_a_negative_pivot() -> None:
    s = nearly_singular()
    assert torch.linalg.cholesky_ex(s).info != 0  # the plain factorization fails
    floor = 1e-6
    with pytest.warns(RuntimeWarning, match=PIVOT_WARNING):
        inv = spd_inverse(s, floor)
    assert bool(torch.isfinite(inv).all())
    torch.testing.assert_close(inv, clamped_inverse(s, floor), rtol=1e-8, atol=1e-8)


def test_spd_inverse_batch_repairs_only_the_failing_matrix() -> None:
    bad = nearly_singular(seed=1)
    good = bad + 2.0 * torch.eye(6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=PIVOT_WARNING):
        inv = spd_inverse(torch.stack([good, bad]), 1e-6)
    torch.testing.assert_close(inv[0], torch.linalg.inv(good), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inv[1], clamped_inverse(bad, 1e-6), rtol=1e-8, atol=1e-8)


def test_spd_inverse_warns_once_per_process() -> None:
    s = nearly_singular()
    with pytest.warns(RuntimeWarning, match=PIVOT_WARNING):
        spd_inverse(s, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spd_inverse(s, 1e-6)  # the same message again: silent


@pytest.mark.parametrize("floor", [1e-6, 1e-30])
def test_spd_cholesky_falls_back_on_a_negative_pivot(floor: float) -> None:
    s = nearly_singular()
    with pytest.warns(RuntimeWarning, match=PIVOT_WARNING):
        factor = spd_cholesky(s, floor)
    assert bool(torch.isfinite(factor).all())
    assert torch.equal(factor, factor.tril())
    assert bool((torch.diagonal(factor) > 0).all())
    # A floor below the rounding level of s is raised to it: the factor stays meaningful.
    expected = clamped_inverse(s, max(floor, 6 * torch.finfo(torch.float64).eps * 100.0))
    torch.testing.assert_close(torch.cholesky_inverse(factor), expected, rtol=1e-6, atol=1e-6)


def test_spd_cholesky_passes_good_matrices_through() -> None:
    s = nearly_singular() + torch.eye(6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factor = spd_cholesky(s, 1.0)
    torch.testing.assert_close(factor, torch.linalg.cholesky(s))


@pytest.mark.parametrize("block_size", [None, 10, 4])
@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.float32])
def test_static_tiny_damp_repeated_gradients(block_size: int | None, grad_dtype: torch.dtype) -> None:
    """m copies of one gradient and λ far below the rounding level of the Gram matrix: the
    Cholesky factorization of S (or of F's blocks) fails; the result is still finite."""
    g = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = g.repeat(6, 1).to(grad_dtype)
    with pytest.warns(RuntimeWarning, match=PIVOT_WARNING):
        inv = StaticFisherInverse(grads, damp=1e-20, block_size=block_size)
    assert bool(torch.isfinite(inv.diag()).all())
    assert bool(torch.isfinite(inv.mul(g)).all())
    assert bool(torch.isfinite(inv.entries(torch.arange(40), torch.arange(40).flip(0))).all())
    assert not bool(torch.isnan(inv.mul(torch.randn(40, 3, dtype=torch.float64))).any())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dynamic_tiny_damp_repeated_gradients_stay_finite(dtype: torch.dtype) -> None:
    g = torch.randn(30, generator=torch.Generator().manual_seed(4)).to(dtype).to(torch.float32)
    g = g.double() if dtype == torch.float64 else g
    inv = DynamicFisherInverse(30, 5, damp=1e-20, window=WindowConfig(dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(12):
            r = inv.update_mul(g)
            assert bool(torch.isfinite(r).all())
        assert bool(torch.isfinite(inv.mul(torch.randn(30, 2, dtype=g.dtype))).all())
        inv.mask_coordinates(torch.arange(30) % 2 == 0)
        assert bool(torch.isfinite(inv.update_mul(g)).all())


def test_dynamic_refactor_fallback_warns() -> None:
    g = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    inv = DynamicFisherInverse(30, 5, damp=1e-20, window=WindowConfig(dtype=torch.float64, refactor_every=1))
    with pytest.warns(RuntimeWarning, match=PIVOT_WARNING):
        for _ in range(6):
            assert bool(torch.isfinite(inv.update_mul(g)).all())


# ---------------------------------------------------------------------- argument validation
@pytest.mark.parametrize("ngrads", [0, -3, 2.5, True])
def test_ngrads_must_be_a_positive_int(ngrads) -> None:
    with pytest.raises(ValueError, match=rf"ngrads={ngrads!r}"):
        DynamicFisherInverse(10, ngrads)


@pytest.mark.parametrize("dim", [0, -1])
def test_dim_must_be_positive(dim: int) -> None:
    with pytest.raises(ValueError, match=rf"dim={dim}"):
        DynamicFisherInverse(dim, 4)


@pytest.mark.parametrize("damp", [0.0, -1e-5, float("nan"), float("inf"), "1e-5"])
def test_damp_must_be_positive_and_finite(damp) -> None:
    with pytest.raises(ValueError, match="damp="):
        DynamicFisherInverse(10, 4, damp=damp)
    with pytest.raises(ValueError, match="damp="):
        StaticFisherInverse(torch.randn(3, 10), damp=damp)
    with pytest.raises(ValueError, match=repr(damp) if isinstance(damp, str) else str(damp)):
        DynamicFisherInverse(10, 4, damp=damp)


@pytest.mark.parametrize("block_size", [0, -2])
def test_block_size_must_be_positive(block_size: int) -> None:
    with pytest.raises(ValueError, match=rf"block_size={block_size}"):
        StaticFisherInverse(torch.randn(3, 10), 0.1, block_size=block_size)


def test_page_cols_and_refactor_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="page_cols=0"):
        StaticFisherInverse(torch.randn(3, 10), 0.1, window=WindowConfig(page_cols=0))
    with pytest.raises(ValueError, match="page_cols=0"):
        DynamicFisherInverse(10, 4, window=WindowConfig(storage="paged", page_cols=0))
    with pytest.raises(ValueError, match="refactor_every=0"):
        DynamicFisherInverse(10, 4, window=WindowConfig(refactor_every=0))


def test_wrong_shapes() -> None:
    inv = DynamicFisherInverse(10, 4)
    with pytest.raises(ValueError, match=r"g has shape \(11,\)"):
        inv.update(torch.randn(11))
    with pytest.raises(ValueError, match=r"g has shape \(10, 2\)"):
        inv.update(torch.randn(10, 2))  # one gradient at a time
    with pytest.raises(ValueError, match=r"g has shape \(9,\)"):
        inv.update_mul(torch.randn(9))
    with pytest.raises(ValueError, match=r"x has shape \(10, 2, 1\)"):
        inv.mul(torch.randn(10, 2, 1))
    with pytest.raises(ValueError, match=r"grads has shape \(10,\)"):
        StaticFisherInverse(torch.randn(10), 0.1)
    with pytest.raises(ValueError, match=r"grads has shape \(0, 5\)"):
        StaticFisherInverse(torch.randn(0, 5), 0.1)
    static = StaticFisherInverse(torch.randn(3, 10), 0.1)
    with pytest.raises(ValueError, match=r"x has shape \(7,\)"):
        static.mul(torch.randn(7))
    with pytest.raises(ValueError, match="rows and cols"):
        static.entries(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="rows holds indices outside"):
        static.entries(torch.tensor([10]), torch.tensor([0]))


def test_integer_dtype_is_rejected() -> None:
    inv = DynamicFisherInverse(10, 4)
    with pytest.raises(ValueError, match="g has dtype torch.int64"):
        inv.update(torch.arange(10))
    with pytest.raises(ValueError, match="x has dtype torch.int32"):
        inv.mul(torch.arange(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="grads has dtype torch.int64"):
        StaticFisherInverse(torch.ones(3, 10, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        inv.update([0.0] * 10)


def test_wrong_device_is_rejected() -> None:
    inv = DynamicFisherInverse(10, 4)
    g = torch.empty(10, device="meta")
    with pytest.raises(ValueError, match="g is on meta"):
        inv.update(g)
    with pytest.raises(ValueError, match="x is on meta"):
        inv.mul(torch.empty(10, 2, device="meta"))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_inputs_are_rejected(bad: float) -> None:
    inv = DynamicFisherInverse(10, 4)
    g = torch.randn(10)
    g[3] = bad
    with pytest.raises(ValueError, match="g contains 1 non-finite"):
        inv.update(g)
    with pytest.raises(ValueError, match="g contains 1 non-finite"):
        inv.update_mul(g)
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        inv.mul(g)
    assert inv.count == 0  # nothing was stored
    grads = torch.randn(3, 10)
    grads[1, 2] = bad
    with pytest.raises(ValueError, match="grads contains 1 non-finite"):
        StaticFisherInverse(grads, 0.1)


def test_unknown_storage() -> None:
    with pytest.raises(ValueError, match=r"storage='disk'"):
        DynamicFisherInverse(10, 4, window=WindowConfig(storage="disk"))
    with pytest.raises(ValueError, match=r"storage='disk'"):
        make_window({"storage": "disk"}, 4, 10, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, "half", torch.int32, "fp8"])
def test_unknown_window_dtype(dtype) -> None:
    with pytest.raises(ValueError, match=r"dtype=" + repr(dtype).replace("(", r"\(").replace(")", r"\)")):
        DynamicFisherInverse(10, 4, window=WindowConfig(dtype=dtype))


def test_static_window_dtype_and_storage() -> None:
    """G may be kept in bfloat16 (the inverse of the rounded gradients); a sharded static window is refused."""
    grads = torch.randn(3, 10, dtype=torch.float64)
    rounded = grads.to(torch.bfloat16).to(torch.float64)
    bf16 = StaticFisherInverse(grads, 0.1, window=WindowConfig(dtype=torch.bfloat16))
    ref = StaticFisherInverse(rounded, 0.1)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.diag(), ref.diag(), rtol=1e-12, atol=0)
    x = torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(bf16.mul(x), ref.mul(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="storage='sharded' is invalid for StaticFisherInverse"):
        StaticFisherInverse(grads, 0.1, window=WindowConfig(storage="sharded"))


def test_sharded_storage_needs_a_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="storage='sharded' needs an initialized torch.distributed"):
        DynamicFisherInverse(10, 4, window=WindowConfig(storage="sharded"))


@pytest.mark.parametrize(
    "name", ["dtype", "storage", "page_cols", "page_budget_bytes", "refactor_every", "process_group"]
)
def test_window_settings_moved_to_window_config(name: str) -> None:
    with pytest.raises(
        TypeError, match=rf"DynamicFisherInverse\(\) no longer takes '{name}'.*window=WindowConfig"
    ):
        DynamicFisherInverse(10, 4, **{name: None})
    with pytest.raises(
        TypeError, match=rf"StaticFisherInverse\(\) no longer takes '{name}'.*window=WindowConfig"
    ):
        StaticFisherInverse(torch.randn(3, 10), 0.1, **{name: None})
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        DynamicFisherInverse(10, 4, bogus=1)


def test_shard_dir_is_a_path_or_none(tmp_path) -> None:
    assert WindowConfig(shard_dir=tmp_path).shard_dir == str(tmp_path)  # PathLike -> str (Hydra, pickling)
    assert WindowConfig().shard_dir is None
    for bad in ("", 3):
        with pytest.raises(ValueError, match=rf"shard_dir={bad!r} is invalid: expected a directory path or None"):
            WindowConfig(shard_dir=bad)


# ------------------------------------------------------------------ windows larger than memory
HUGE = 10**9  # gradients: 10⁹ × 10⁴ float32 coordinates is 36 TiB, more than any machine here has


def test_a_window_larger_than_memory_is_refused_before_allocating() -> None:
    from lightning_mfac.fisher.storage import WindowMemoryError

    with pytest.raises(WindowMemoryError, match=r"needs 36\.4 TiB \(1000000000 gradients × 10000 coordinates × 4 bytes"):
        DynamicFisherInverse(10_000, HUGE, 1e-3)
    with pytest.raises(MemoryError, match="lower ngrads, store it in bfloat16"):
        make_window({"dtype": "bfloat16"}, HUGE, 10_000, "cpu")


def test_the_optimizer_and_oneshot_pruning_refuse_a_huge_window_naming_its_size() -> None:
    from lightning_mfac import MFAC, oneshot_prune
    from lightning_mfac.fisher.storage import WindowMemoryError

    model = torch.nn.Linear(100, 100)
    opt = MFAC(model.parameters(), lr=0.1, ngrads=HUGE, damp=1e-2)
    model(torch.randn(2, 100)).sum().backward()
    with pytest.raises(WindowMemoryError, match="1000000000 gradients × 10100 coordinates"):
        opt.step()
    batches = [torch.randn(2, 100)]
    with pytest.raises(WindowMemoryError, match="1000000000 gradients × 10000 coordinates"):
        oneshot_prune(model, lambda m, x: m(x).sum(), batches, 0.5, obs={"ngrads": HUGE})
