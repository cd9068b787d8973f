"""Accuracy of float32 and bfloat16 windows against float64 on gradients of a real training run.

Consecutive training gradients are strongly correlated, which makes ``S = mλI + GGᵀ`` badly
conditioned and ``F⁻¹g`` a difference of nearly equal vectors -- random vectors hide exactly this.
An MLP (64-64-10, d = 4,810) is trained in float64 with SGD on scikit-learn's 8×8 digits for 150
steps; its flat gradients feed DynamicFisherInverse windows of float64 (the reference), float32
and bfloat16. The errors are printed (``pytest -s tests/test_fisher_accuracy.py``; they also
appear in the captured output of a failure) and recorded in experiments/RESULTS.md.
"""

from __future__ import annotations

import pytest
import torch
from real_gradients import digits_sgd_gradients

from lightning_mfac.fisher import DynamicFisherInverse, StaticFisherInverse, WindowConfig

STEPS = 150
CONFIGS = [(32, 1e-4), (32, 1e-5), (128, 1e-4), (128, 1e-5)]  # (m, damp)
FP32_BOUND = 1e-6
#: bfloat16 keeps 8 bits: each stored gradient carries ~4e-3 relative quantization noise, and the
#: error of F⁻¹ĝ grows with the number of stored gradients relative to the damping.
BF16_BOUND = {(128, 1e-5): 1.5e-2}
BF16_DEFAULT_BOUND = 1e-2


@pytest.fixture(scope="module")
def gradients() -> torch.Tensor:
    """(STEPS, d) float64 gradients of a real SGD run on the digits data set."""
    g = digits_sgd_gradients(STEPS)
    assert g.shape == (STEPS, 4810)
    # The point of real gradients: consecutive ones are correlated (mean cosine about 0.24 here,
    # against about 1/√d = 0.014 for random vectors), so the window is badly conditioned.
    cos = torch.nn.functional.cosine_similarity(g[1:], g[:-1], dim=1)
    assert float(cos.mean()) > 0.1
    return g


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b).norm() / b.norm())


@pytest.mark.parametrize(("m", "damp"), CONFIGS)
def test_dynamic_window_accuracy_on_real_gradients(gradients: torch.Tensor, m: int, damp: float) -> None:
    d = gradients.shape[1]
    ref = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float64))
    # The same gradients rounded to float32 (what a float32 model produces): isolates the arithmetic.
    ref_rounded = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float64))
    fp32 = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.float32))
    bf16 = DynamicFisherInverse(d, m, damp, window=WindowConfig(dtype=torch.bfloat16))
    err = {"fp32": [], "fp32_arith": [], "bf16": []}
    for g in gradients:
        g32 = g.to(torch.float32)
        r64 = ref.update_mul(g)
        r64_rounded = ref_rounded.update_mul(g32.to(torch.float64))
        r32 = fp32.update_mul(g32)
        rbf = bf16.update_mul(g32)
        assert r32.dtype == torch.float32 and rbf.dtype == torch.float32
        err["fp32"].append(rel(r32, r64))
        err["fp32_arith"].append(rel(r32, r64_rounded))
        err["bf16"].append(rel(rbf, r64))
    # A fresh gradient (not in the window) through mul: the plain Woodbury form.
    probe = gradients[0]
    err_mul32 = rel(fp32.mul(probe.to(torch.float32)), ref.mul(probe))
    worst = {k: max(v) for k, v in err.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in err.items()}
    print(
        f"\n[accuracy] dynamic m={m} damp={damp:g} d={d} steps={len(gradients)}: "
        f"fp32 max {worst['fp32']:.2e} (median {median['fp32']:.2e}; vs fp64 on the same fp32-rounded "
        f"gradients {worst['fp32_arith']:.2e}), bf16 max {worst['bf16']:.2e} (median {median['bf16']:.2e}), "
        f"fp32 mul(fresh g) {err_mul32:.2e}"
    )
    assert worst["fp32"] <= FP32_BOUND
    assert worst["fp32_arith"] <= FP32_BOUND
    assert err_mul32 <= FP32_BOUND
    assert worst["bf16"] <= BF16_BOUND.get((m, damp), BF16_DEFAULT_BOUND)


@pytest.mark.parametrize("block_size", [None, 128])
@pytest.mark.parametrize(("m", "damp"), [(32, 1e-5), (128, 1e-5)])
def test_static_float32_accuracy_on_real_gradients(
    gradients: torch.Tensor, m: int, damp: float, block_size: int | None
) -> None:
    window = gradients[-m:]
    s64 = StaticFisherInverse(window, damp, block_size=block_size)
    s32 = StaticFisherInverse(window.to(torch.float32), damp, block_size=block_size)
    assert s32.dtype == torch.float32  # G kept in float32 (the factor in float64)
    diag_err = float(((s32.diag() - s64.diag()).abs() / s64.diag().abs()).max())
    fresh = gradients[:8].t().contiguous()  # gradients from before the window
    inside = window[-4:].t().contiguous()  # gradients in the window: x − GᵀS⁻¹Gx cancels most of x
    mul_fresh = rel(s32.mul(fresh.to(torch.float32)), s64.mul(fresh))
    mul_inside = rel(s32.mul(inside.to(torch.float32)), s64.mul(inside))
    print(
        f"\n[accuracy] static m={m} damp={damp:g} block_size={block_size}: diag max rel {diag_err:.2e}, "
        f"mul(fresh) {mul_fresh:.2e}, mul(in-window) {mul_inside:.2e}"
    )
    # Rounding the gradients to float32 is the only difference for the diagonal (computed in float64).
    assert diag_err <= 1e-5
    # G at its float32 width, the factor in float64 and float64-accumulating passes: the float32
    # rounding of the gradients is all that separates the two (a float32 Q lost 1e-5 to 4e-4 here).
    assert mul_fresh <= 1e-6
    assert mul_inside <= 1e-6
