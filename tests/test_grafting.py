"""Grafting (``graft="sgd"|"adam"``) in the MFAC optimizer and MFACPreconditioner."""

from __future__ import annotations

import copy
import io

import lightning.pytorch as pl
import pytest
import torch
from lit_models import TinyClassifier, flat_params, make_trainer

from lightning_mfac import MFAC, MFACPreconditioner
from lightning_mfac.callbacks.obs_pruning import OBSPruning
from lightning_mfac.optim.grafting import AdamGrafting, SGDGrafting, make_grafting


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def _grads(model: torch.nn.Module, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Fixed gradient sequences (scaled differently per tensor), so two optimizers see the same ones."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 10.0 ** (i - 2) for i, p in enumerate(model.parameters())]
        for _ in range(steps)
    ]


def _set_grads(model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()


def _norms(tensors) -> torch.Tensor:
    return torch.stack([t.norm() for t in tensors])


# ---------------------------------------------------------------------- the grafting objects


def test_sgd_grafting_takes_the_gradient_norm_and_keeps_the_direction():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen) * 1e3]
    dirs = [torch.randn(7, 3, generator=gen) * 1e-6, torch.randn(5, generator=gen) * 1e4]
    before = [d.clone() for d in dirs]
    SGDGrafting().graft_(dirs, grads)
    torch.testing.assert_close(_norms(dirs), _norms(grads), rtol=1e-6, atol=0)
    for d, b in zip(dirs, before, strict=True):
        assert torch.nn.functional.cosine_similarity(d.reshape(-1), b.reshape(-1), dim=0) > 1 - 1e-6


def test_zero_direction_stays_zero_and_tiny_one_is_scaled():
    dirs = [torch.zeros(4), torch.full((3,), 1e-15)]
    grads = [torch.ones(4), torch.ones(3)]
    SGDGrafting().graft_(dirs, grads)
    assert torch.equal(dirs[0], torch.zeros(4))
    torch.testing.assert_close(dirs[1].norm(), torch.tensor(3.0).sqrt(), rtol=1e-6, atol=0)


def test_adam_grafting_norms_equal_torch_adam_steps():
    model = _model()
    ref = copy.deepcopy(model)
    adam = torch.optim.Adam(ref.parameters(), lr=1.0, betas=(0.8, 0.99), eps=1e-8)
    graft = AdamGrafting(betas=(0.8, 0.99), eps=1e-8)
    for grads in _grads(model, 6):
        before = [p.detach().clone() for p in ref.parameters()]
        _set_grads(ref, grads)
        adam.step()
        want = _norms([p.detach() - b for p, b in zip(ref.parameters(), before, strict=True)])
        got = torch.stack(graft.target_norms([g.clone() for g in grads]))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_adam_grafting_leaves_a_tensor_without_gradient_alone_as_torch_adam_does():
    """Steps where one parameter has no gradient: torch.optim.Adam skips it (moments and its own
    step count unchanged); the grafted norms follow that, step by step."""
    model = _model()
    ref = copy.deepcopy(model)
    adam = torch.optim.Adam(ref.parameters(), lr=1.0)
    graft = AdamGrafting()
    for t, grads in enumerate(_grads(model, 6)):
        has = [not (t in (1, 2, 4) and i == 0) for i in range(len(grads))]
        before = [p.detach().clone() for p in ref.parameters()]
        for p, g, h in zip(ref.parameters(), grads, has, strict=True):
            p.grad = g.clone() if h else None
        adam.step()
        want = _norms([p.detach() - b for p, b in zip(ref.parameters(), before, strict=True)])
        got = torch.stack(graft.target_norms([g.clone() for g in grads], has_grad=has))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert graft.steps.tolist()[:2] == [3.0, 6.0]
    # A checkpoint of the earlier format (one count for all tensors) still loads.
    old = {**graft.state_dict(), "steps": torch.tensor(6.0)}
    again = AdamGrafting()
    again.load_state_dict(old)
    assert again.steps.tolist() == [6.0] * len(grads)


@pytest.mark.parametrize("graft", [SGDGrafting, AdamGrafting])
def test_a_skipped_step_zeroes_the_direction_and_keeps_the_state(graft):
    gen = torch.Generator().manual_seed(0)
    grafting = graft()
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    grafting.graft_([torch.randn(4, 3), torch.randn(5)], grads, finite=torch.tensor(True))
    saved = grafting.state_dict()
    dirs = [torch.randn(4, 3), torch.randn(5)]
    bad = [torch.full((4, 3), float("nan")), torch.full((5,), float("inf"))]
    grafting.graft_(dirs, bad, finite=torch.tensor(False))
    assert all(bool((d == 0).all()) for d in dirs)
    after = grafting.state_dict()
    for key, value in saved.items():
        if isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, after[key], strict=True))
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key])
    # and the next finite step continues as if the skipped one never happened
    ref = graft()
    ref.graft_([torch.randn(4, 3), torch.randn(5)], grads)
    nxt = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    torch.testing.assert_close(torch.stack(grafting.target_norms(nxt, torch.tensor(True))),
                               torch.stack(ref.target_norms(nxt)), rtol=1e-6, atol=0)


def test_bad_graft_is_rejected_by_name():
    for build in (lambda: MFAC(_model().parameters(), graft="adagrad"), lambda: MFACPreconditioner(graft="adagrad")):
        with pytest.raises(ValueError, match="graft='adagrad'.*'sgd', 'adam'"):
            build()
    with pytest.raises(ValueError, match="betas"):
        AdamGrafting(betas=(0.9, 1.0))
    assert make_grafting(None) is None
    with pytest.raises(RuntimeError, match="graft='sgd'"):
        AdamGrafting().load_state_dict(SGDGrafting().state_dict())


# ---------------------------------------------------------------------- MFAC optimizer


def _dense_inverse_fisher_step(hist: list[torch.Tensor], m: int, damp: float) -> torch.Tensor:
    window = torch.stack(hist[-m:])
    fisher = damp * torch.eye(window.shape[1], dtype=torch.float64) + window.T @ window / m
    return torch.linalg.solve(fisher, hist[-1])


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.7, 1e-2)])
def test_mfac_sgd_graft_matches_dense_reference(momentum, weight_decay):
    """Per tensor: M-FAC's direction rescaled to ‖g + wd·w‖, then momentum, then lr (float64, 1e-10)."""
    m, damp, lr = 3, 1e-3, 0.05
    model = _model()
    ref = [p.detach().clone() for p in model.parameters()]
    opt = MFAC(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, ngrads=m, damp=damp, graft="sgd")
    hist, buf = [], None
    for grads in _grads(model, 3 * m + 1):
        before = [p.detach().clone() for p in model.parameters()]
        _set_grads(model, grads)
        opt.step()
        g = [gi + weight_decay * w for gi, w in zip(grads, ref, strict=True)]
        hist.append(torch.cat([t.reshape(-1) for t in g]))
        u = _dense_inverse_fisher_step(hist, m, damp).split([t.numel() for t in g])
        u = torch.cat([ui * gi.norm() / ui.norm() for ui, gi in zip(u, g, strict=True)])
        buf = (1 - momentum) * u if buf is None else momentum * buf + (1 - momentum) * u
        step = buf if momentum > 0 else u
        ref = [w - lr * s.view_as(w) for w, s in zip(ref, step.split([w.numel() for w in ref]), strict=True)]
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        want = torch.cat([w.reshape(-1) for w in ref])
        assert (got - want).abs().max() < 1e-10
        if momentum == 0 and weight_decay == 0:
            moved = _norms([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
            torch.testing.assert_close(moved, lr * _norms(grads), rtol=1e-6, atol=0)


def test_mfac_adam_graft_step_norms_equal_adam():
    lr = 1e-2
    model = _model()
    ref = copy.deepcopy(model)
    opt = MFAC(model.parameters(), lr=lr, ngrads=4, damp=1e-3, graft="adam")
    adam = torch.optim.Adam(ref.parameters(), lr=lr)
    for grads in _grads(model, 8):
        b_m = [p.detach().clone() for p in model.parameters()]
        b_a = [p.detach().clone() for p in ref.parameters()]
        _set_grads(model, grads)
        _set_grads(ref, grads)
        opt.step()
        adam.step()
        got = _norms([p.detach() - b for p, b in zip(model.parameters(), b_m, strict=True)])
        want = _norms([p.detach() - b for p, b in zip(ref.parameters(), b_a, strict=True)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("graft", ["sgd", "adam"])
def test_mfac_graft_resume_is_exact(graft):
    kw = dict(lr=0.02, momentum=0.5, weight_decay=1e-3, ngrads=3, damp=1e-3, graft=graft)
    grads = _grads(_model(), 10)
    full = _model()
    opt = MFAC(full.parameters(), **kw)
    for g in grads:
        _set_grads(full, g)
        opt.step()
    half = _model()
    opt = MFAC(half.parameters(), **kw)
    for g in grads[:5]:
        _set_grads(half, g)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = copy.deepcopy(half)
    opt = MFAC(resumed.parameters(), **kw)
    opt.load_state_dict(torch.load(buffer, weights_only=False))
    if graft == "adam":
        assert opt.graft.steps.tolist() == [5.0] * len(list(resumed.parameters()))
    for g in grads[5:]:
        _set_grads(resumed, g)
        opt.step()
    assert torch.equal(flat_params(resumed), flat_params(full))


# ---------------------------------------------------------------------- callback in real Trainer runs


class GradProbe(pl.Callback):
    """Placed after MFACPreconditioner: records the gradients it hands to the optimizer."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(_norms([p.grad.float() for p in pl_module.parameters()]))


class RawProbe(GradProbe):
    """Placed before MFACPreconditioner: the raw (accumulated, unscaled) gradients."""


def _fit(tmp_path, module, callbacks, **kw):
    trainer = make_trainer(tmp_path, callbacks=list(callbacks), **kw)
    trainer.fit(module)
    return trainer


def test_sgd_plus_grafted_callback_equals_grafted_mfac(tmp_path):
    kw = dict(ngrads=4, damp=1e-3, graft="sgd")
    with_callback = TinyClassifier(optimizer="sgd", lr=0.05)
    _fit(tmp_path / "a", with_callback, [MFACPreconditioner(**kw)])
    with_optimizer = TinyClassifier(optimizer="mfac", lr=0.05, mfac_kwargs=kw)
    _fit(tmp_path / "b", with_optimizer, [])
    torch.testing.assert_close(flat_params(with_callback), flat_params(with_optimizer), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{}, {"accumulate_grad_batches": 2}, {"precision": "bf16-mixed"}],
    ids=["plain", "accumulation", "bf16-mixed"],
)
def test_callback_graft_sgd_gives_the_gradient_norm_per_tensor(tmp_path, trainer_kwargs):
    raw, out = RawProbe(), GradProbe()
    callback = MFACPreconditioner(ngrads=4, damp=1e-4, weight_decay=0.0, graft="sgd", log_stats=False)
    _fit(tmp_path, TinyClassifier(optimizer="sgd_momentum", lr=0.05), [raw, callback, out], max_steps=5, **trainer_kwargs)
    assert len(out.seen) == 5
    for r, o in zip(raw.seen, out.seen, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=0)


def test_callback_graft_with_clipping_and_weight_decay(tmp_path):
    seen = []

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(torch.nn.utils.parameters_to_vector([p.grad for p in pl_module.parameters()]).norm())

    callback = MFACPreconditioner(ngrads=4, damp=1e-4, weight_decay=1e-2, graft="adam", log_stats=False)
    module = TinyClassifier(optimizer="sgd_momentum", lr=0.05)
    _fit(tmp_path, module, [callback, After()], max_steps=4, gradient_clip_val=0.01, gradient_clip_algorithm="norm")
    assert len(seen) == 4 and all(n <= 0.01 + 1e-7 for n in seen)
    assert set(callback._grafts[0].steps.tolist()) == {4.0}
    assert torch.isfinite(flat_params(module)).all()


@pytest.mark.parametrize("where", ["optimizer", "callback"])
def test_graft_adam_with_pruning_masks(tmp_path, where):
    pruning = OBSPruning(0.6, start_epoch=1, end_epoch=2, obs={"ngrads": 8}, verbose=False)
    if where == "optimizer":
        module = TinyClassifier(optimizer="mfac", lr=0.01, features=8,
                                mfac_kwargs=dict(ngrads=8, damp=1e-3, momentum=0.5, graft="adam"))
        callbacks = [pruning]
    else:
        module = TinyClassifier(optimizer="sgd_momentum", lr=0.01, features=8)
        pre = MFACPreconditioner(ngrads=8, damp=1e-3, graft="adam", log_stats=False)
        callbacks = [pre, pruning]
    trainer = _fit(tmp_path, module, callbacks, max_epochs=3, max_steps=-1)
    graft = trainer.optimizers[0].graft if where == "optimizer" else pre._grafts[0]
    params = dict(module.named_parameters())
    names = [n for n, _ in module.named_parameters()]
    assert pruning.masks
    for name, keep in pruning.masks.items():
        assert bool((params[name][~keep] == 0).all()), f"{name} revived"
        i = names.index(name)
        # Adam's moments of pruned coordinates were zeroed and only ever saw zero gradients since.
        assert bool((graft.exp_avg[i][~keep] == 0).all())
        assert bool((graft.exp_avg_sq[i][~keep] == 0).all())
