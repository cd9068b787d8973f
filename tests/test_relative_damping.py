"""``damp_mode="relative"`` through the MFAC optimizer and MFACPreconditioner."""

from __future__ import annotations

import pytest
import torch
from lit_models import TinyClassifier, flat_params, make_trainer

from lightning_mfac import MFAC, MFACPreconditioner


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_mfac_relative_damping_matches_dense_reference(scale):
    """λ = δ·trace(GGᵀ)/m² of the window as it was before the step (δ itself at the first step),
    refreshed at every step with refactor_every=1; gradients scaled by 1e-3 … 1e3."""
    m, delta, lr = 3, 0.5, 0.1
    model = _model()
    opt = MFAC(model.parameters(), lr=lr, ngrads=m, damp=delta, damp_mode="relative", window={"refactor_every": 1})
    gen = torch.Generator().manual_seed(1)
    hist, lam = [], delta
    for _ in range(2 * m + 1):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale for p in model.parameters()]
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        u = (before - torch.nn.utils.parameters_to_vector(model.parameters()).detach()) / lr
        hist.append(torch.cat([g.reshape(-1) for g in grads]))
        window = torch.stack(hist[-m:])
        fisher = lam * torch.eye(window.shape[1], dtype=torch.float64) + window.T @ window / m
        want = torch.linalg.solve(fisher, hist[-1])
        torch.testing.assert_close(u, want, rtol=1e-8, atol=0)
        lam = delta * window.square().sum() / m**2
    assert opt._pre.fisher.damp_mode == "relative"
    torch.testing.assert_close(torch.as_tensor(opt._pre.fisher.lam, dtype=torch.float64), lam, rtol=1e-12, atol=0)


def test_callback_relative_damping_equals_the_optimizer(tmp_path):
    kw = dict(ngrads=4, damp=0.3, damp_mode="relative")
    with_callback = TinyClassifier(optimizer="sgd", lr=0.05)
    callback = MFACPreconditioner(**kw)
    make_trainer(tmp_path / "a", callbacks=[callback]).fit(with_callback)
    assert callback._pre[0].fisher.damp_mode == "relative"
    with_optimizer = TinyClassifier(optimizer="mfac", lr=0.05, mfac_kwargs=kw)
    make_trainer(tmp_path / "b").fit(with_optimizer)
    torch.testing.assert_close(flat_params(with_callback), flat_params(with_optimizer), rtol=0, atol=1e-6)


def test_bad_damp_mode_is_rejected_by_name():
    with pytest.raises(ValueError, match="damp_mode='scaled'.*'absolute', 'relative'"):
        MFAC(_model().parameters(), damp_mode="scaled")
    with pytest.raises(ValueError, match="damp_mode='scaled'"):
        MFACPreconditioner(damp_mode="scaled")
