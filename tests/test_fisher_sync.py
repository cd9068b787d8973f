"""The dynamic step's budget, counted on the CPU with tests/dispatch_counters.py: no host read in a
steady-state step (one per refactor period), a constant number of aten ops and kernel launches
whatever d, a non-finite gradient kept out of the window without a read, a failed check that
never leaks a wrong direction, the m × m update captured whole by torch.compile, bounded
temporaries, and relative damping."""

from __future__ import annotations

import warnings

import pytest
import torch
from dispatch_counters import DispatchCounter, count_launches
from references import correlated_gradients as correlated_grads
from test_fisher_dynamic import DenseWindow, rel_err

from lightning_mfac.fisher import DynamicFisherInverse, WindowConfig
from lightning_mfac.fisher._numerics import warn_once
from lightning_mfac.fisher.dynamic import bordered_update

OP_BUDGET = 40


def warmed(
    d: int, m: int, dtype=torch.float32, damp: float = 1e-3, **kw
) -> tuple[DynamicFisherInverse, torch.Tensor]:
    """An inverse past its guarded first refactor period, and 3m more gradients for it."""
    inv = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=dtype), **kw)
    grads = correlated_grads(5 * m, d, seed=d % 97, dtype=torch.float32)
    for g in grads[: 2 * m]:
        inv.update_mul(g, return_finite=True)
    assert not inv._guarded  # a well-conditioned window leaves the guarded period
    return inv, grads[2 * m :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_at_most_one_host_read_per_refactor_period(dtype: torch.dtype) -> None:
    m = 16
    inv, grads = warmed(300, m, dtype)
    with DispatchCounter() as c:
        for g in grads:  # 3m steady steps, 3 refactor periods
            direction, finite = inv.update_mul(g, return_finite=True)
    assert c.host_reads <= 3, c.summary()
    assert bool(finite) and direction.shape == (300,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_count_is_constant_and_within_budget(dtype: torch.dtype) -> None:
    counts = []
    for d in (10_000, 1_000_000):
        m = 8
        inv = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(dtype=dtype))
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(d, generator=gen)
        for _ in range(2 * m + 1):
            inv.update_mul(base + torch.randn(d, generator=gen), return_finite=True)
        assert not inv._guarded
        c = DispatchCounter()
        inv.window.kernels = count_launches(inv.window.kernels, c)
        g = base + torch.randn(d, generator=gen)
        with c:
            inv.update_mul(g, return_finite=True)
        assert c.host_reads == 0, c.summary()
        assert c.launch_counts == {"dots": 1, "combine": 1}, c.summary()
        counts.append(c.ops + c.launches)
        print(f"\n[ops] d={d} {dtype}: {c.summary()}")
    assert counts[0] == counts[1] <= OP_BUDGET


def test_nonfinite_gradient_is_flagged_without_a_read_and_never_stored() -> None:
    d, m = 40, 6
    inv, grads = warmed(d, m, dtype=torch.float64, damp=1e-2)
    before = inv.window.to_dense().clone()
    count = int(inv.count)
    for bad in (float("nan"), float("inf")):
        g = grads[0].double().clone()
        g[3] = bad
        with DispatchCounter() as c:
            direction, finite = inv.update_mul(g, return_finite=True)
        assert c.host_reads == 0
        assert not bool(finite) and not bool(inv.finite)
        assert torch.equal(direction, torch.zeros_like(direction))
    assert int(inv.count) == count and int(inv.rejected) == 0
    assert torch.equal(inv.window.to_dense(), before)
    ref = DenseWindow(d, m, 1e-2)
    ref.w = before.double()
    g = grads[1].double()
    direction, finite = inv.update_mul(g, return_finite=True)
    ref.w[int(inv.slot) - 1] = g  # the next finite gradient goes where the skipped one would have
    assert bool(finite) and rel_err(direction, ref.mul(g)) < 1e-10
    # The legacy forms: None for a skipped step (one read), ValueError by default.
    g[0] = float("nan")
    assert inv.update_mul(g, skip_nonfinite=True) is None
    with pytest.raises(ValueError, match="non-finite"):
        inv.update_mul(g)


def test_failed_check_skips_the_step_and_guards_the_next_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drift planted in C⁻¹ between two reads: the step is rejected on the device -- zero direction,
    flag False, nothing stored, no host read -- and the next refactor reports it and guards the
    next period, where a rejected update is repaired through a fresh factorization."""
    d, m, damp = 30, 5, 1e-2
    inv, grads = warmed(d, m, dtype=torch.float64, damp=damp)
    stored = inv.window.to_dense().double()
    count = int(inv.count)
    inv.core_inverse[:m, :m] *= 1.5  # a drifted inverse (its residual is far beyond DRIFT_TOL)
    g = grads[0].double()
    with DispatchCounter() as c:
        direction, ok = inv.update_mul(g, return_finite=True)
    assert c.host_reads == 0 and not bool(ok)
    assert torch.equal(direction, torch.zeros_like(direction))
    assert torch.equal(inv.window.to_dense().double(), stored)
    assert int(inv.count) == count and int(inv.rejected) == 1
    monkeypatch.setattr(warn_once, "_seen", set())  # warned once per process: forget earlier tests
    with pytest.warns(RuntimeWarning, match="lost accuracy"):
        inv._refactor()
    assert inv._guarded
    # Guarded: drift again, and this time the gradient goes in exactly (one read per step).
    inv.core_inverse[:m, :m] *= 1.5
    ref = DenseWindow(d, m, damp)
    ref.w = stored
    ref.slot = count % m
    ref.update(g)
    with DispatchCounter() as c:
        direction, ok = inv.update_mul(g, return_finite=True)
    assert bool(ok) and rel_err(direction, ref.mul(g)) < 1e-10
    assert c.host_reads >= 1


def test_bordered_update_compiles_without_graph_break() -> None:
    d, m = 20, 4
    inv, grads = warmed(d, m, dtype=torch.float64, damp=1e-2)
    mm = m + 1
    u = torch.rand(mm, dtype=torch.float64)
    u[m] = 0
    args = (
        inv.core_inverse.clone(),
        inv.core.clone(),
        u,
        torch.tensor(3.0, dtype=torch.float64),
        torch.nn.functional.one_hot(torch.tensor(2), mm).to(torch.float64),
        torch.tensor([2]),
    )
    col = torch.zeros(mm, dtype=torch.float64)
    tol = torch.tensor(1e-9, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(bordered_update, fullgraph=True, backend="aot_eager")
    got = compiled(*args, col, col.view(1, mm), col.view(mm, 1), tol)
    col2 = torch.zeros(mm, dtype=torch.float64)
    want = bordered_update(*args, col2, col2.view(1, mm), col2.view(mm, 1), tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mask_refactor_and_gram_temporaries_stay_below_a_tenth_of_the_window() -> None:
    d, m = 200_000, 32  # a 25.6 MB float32 window
    inv = DynamicFisherInverse(d, m, 1e-3, window=WindowConfig(refactor_every=10**6))
    gen = torch.Generator().manual_seed(1)
    for _ in range(m):
        inv.update(torch.randn(d, generator=gen))
    keep = torch.rand(d, generator=gen) > 0.5
    with DispatchCounter() as c:
        inv.mask_coordinates(keep)
        inv.window.gram()
        inv._refactor()
    assert c.largest_bytes <= 0.1 * inv.window.nbytes, c.summary()


def test_relative_damping_follows_the_gradient_scale() -> None:
    d, m, delta = 25, 6, 0.1
    grads = correlated_grads(4 * m, d, seed=3)
    results = []
    for scale in (1.0, 1e-3):
        inv = DynamicFisherInverse(
            d, m, delta, window=WindowConfig(dtype=torch.float64), damp_mode="relative"
        )
        assert inv.lam == delta  # empty window
        outs = [inv.update_mul(scale * g) for g in grads]
        inv._refactor()  # a refactorization recomputes λ from the window
        w = inv.window.to_dense().double()
        lam = delta * float((w * w).sum(1).mean()) / m  # δ·mean(diag K)/m
        assert inv.lam == pytest.approx(lam, rel=1e-12)
        ref = DenseWindow(d, m, inv.lam)
        ref.w = w
        assert rel_err(inv.mul(scale * grads[0]), ref.mul(scale * grads[0])) < 1e-10
        results.append(outs[-1])
    # λ scales with ‖g‖², so the direction scales with 1/scale exactly: one damp serves both.
    assert rel_err(results[1] * 1e-3, results[0]) < 1e-9
    with pytest.raises(ValueError, match="damp_mode='typo'"):
        DynamicFisherInverse(d, m, delta, damp_mode="typo")


def test_relative_damping_reads_once_per_period_in_steady_state() -> None:
    m = 8
    inv, grads = warmed(64, m, damp=0.1, damp_mode="relative")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with DispatchCounter() as c:
            for g in grads:
                inv.update_mul(g, return_finite=True)
    assert c.host_reads <= 3


def test_capture_logic_replays_the_same_steps() -> None:
    """The capture path on the CPU, with a runner that re-executes what a CUDA graph would replay:
    the same directions as the eager step, across refactors, a skipped step and a guarded period."""
    from lightning_mfac.fisher.capture import CapturedStep, ReplayRunner

    d, m = 40, 6
    eager = DynamicFisherInverse(d, m, 1e-2, window=WindowConfig(dtype=torch.float64))
    captured = DynamicFisherInverse(d, m, 1e-2, window=WindowConfig(dtype=torch.float64))
    assert not captured.captured  # "auto" captures on CUDA only
    captured.captured = True
    captured._captured_step = CapturedStep(captured._flagged_step, ReplayRunner)
    grads = correlated_grads(5 * m, d, seed=21)
    for t, g in enumerate(grads):
        if t == 3 * m:
            g = g.clone()
            g[0] = float("nan")
        a, fa = eager.update_mul(g, return_finite=True)
        b, fb = captured.update_mul(g, return_finite=True)
        assert torch.equal(a, b) and bool(fa) == bool(fb), t
    assert captured._captured_step.runner.replays >= 2 * m
    with pytest.raises(ValueError, match="capture='cuda_graph' needs a window on the device"):
        DynamicFisherInverse(d, m, window=WindowConfig(storage="paged", capture="cuda_graph"))


def test_update_and_mul_have_read_free_forms() -> None:
    d, m = 30, 5
    inv, grads = warmed(d, m, dtype=torch.float64, damp=1e-2)
    ref = DynamicFisherInverse(d, m, 1e-2, window=WindowConfig(dtype=torch.float64))
    ref.load_state_dict(inv.state_dict())
    bad = grads[1].double().clone()
    bad[2] = float("inf")
    with DispatchCounter() as c:
        stored = inv.update(grads[0].double(), return_finite=True)
        skipped = inv.update(bad, return_finite=True)
        out = inv.mul(grads[2].double(), check_finite=False)
    assert c.host_reads == 0
    assert bool(stored) and not bool(skipped)
    ref.update(grads[0].double())
    torch.testing.assert_close(out, ref.mul(grads[2].double()), rtol=1e-12, atol=0)
