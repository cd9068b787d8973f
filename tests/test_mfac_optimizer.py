"""The MFAC optimizer against a float64 dense M-FAC reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lightning_mfac import MFAC


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def _batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,), generator=gen)
        yield x[idx], y[idx]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


class DenseMFAC:
    """The update of the paper with F materialized and solved in float64."""

    def __init__(self, params, lrs, m, damp, momentum, weight_decay):
        self.params, self.lrs, self.m, self.damp = params, lrs, m, damp
        self.momentum, self.wd, self.hist, self.v = momentum, weight_decay, [], None

    def step(self):
        w = torch.nn.utils.parameters_to_vector(self.params).detach()
        g = torch.nn.utils.parameters_to_vector([p.grad for p in self.params]) + self.wd * w
        self.hist.append(g)
        window = torch.stack(self.hist[-self.m :])
        window = torch.cat([window, window.new_zeros(self.m - window.shape[0], window.shape[1])])
        fisher = self.damp * torch.eye(g.numel(), dtype=torch.float64) + window.T @ window / self.m
        u = torch.linalg.solve(fisher, g)
        if self.momentum > 0:
            self.v = (1 - self.momentum) * u if self.v is None else self.momentum * self.v + (1 - self.momentum) * u
            u = self.v
        torch.nn.utils.vector_to_parameters(w - self.lrs * u, self.params)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.6, 1e-2)])
def test_matches_dense_reference_over_wraparounds(momentum, weight_decay):
    m, damp = 4, 1e-2
    model = _model()
    ref = copy.deepcopy(model)
    p = list(model.parameters())
    opt = MFAC(
        [{"params": p[:2]}, {"params": p[2:], "lr": 0.05}],
        lr=0.1, momentum=momentum, weight_decay=weight_decay, ngrads=m, damp=damp,
    )
    n0 = sum(t.numel() for t in p[:2])
    n1 = sum(t.numel() for t in p[2:])
    lrs = torch.cat([torch.full((n0,), 0.1, dtype=torch.float64), torch.full((n1,), 0.05, dtype=torch.float64)])
    dense = DenseMFAC(list(ref.parameters()), lrs, m, damp, momentum, weight_decay)
    for batch in _batches(3 * m + 1):  # > 2 wrap-arounds of the window
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        for q in ref.parameters():
            q.grad = None
        _loss(ref, batch).backward()
        dense.step()
        got = torch.nn.utils.parameters_to_vector(model.parameters())
        want = torch.nn.utils.parameters_to_vector(ref.parameters())
        assert (got - want).abs().max() < 1e-10, (got - want).abs().max()


def test_state_dict_round_trip_continues_exactly():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, momentum=0.5, ngrads=3, damp=1e-2)
    batches = list(_batches(10))
    for batch in batches[:5]:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    clone = _model()
    clone.load_state_dict(saved["model"])
    opt2 = MFAC(clone.parameters(), lr=0.1, momentum=0.5, ngrads=3, damp=1e-2)
    opt2.load_state_dict(saved["opt"])
    for batch in batches[5:]:
        for mdl, o in ((model, opt), (clone, opt2)):
            o.zero_grad()
            _loss(mdl, batch).backward()
            o.step()
    assert torch.equal(
        torch.nn.utils.parameters_to_vector(model.parameters()),
        torch.nn.utils.parameters_to_vector(clone.parameters()),
    )


def test_closure_and_lr_scheduler():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=2, damp=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batch = next(_batches(1))

    def closure():
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_nonfinite_gradient_is_skipped():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=2, damp=1e-2)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    for q in model.parameters():
        q.grad = torch.full_like(q, float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(before, torch.nn.utils.parameters_to_vector(model.parameters()))
    assert opt._pre.fisher.count == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"ngrads": 0}, "ngrads=0"),
        ({"damp": 0.0}, "damp=0.0"),
        ({"storage": "disk"}, "storage='disk'"),
        ({"window_dtype": "int8"}, "window_dtype='int8'"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFAC(_model().parameters(), **kwargs)


def test_bad_parameters():
    with pytest.raises(ValueError, match="complex"):
        MFAC([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]).step()
    model = _model()
    opt = MFAC(model.parameters(), ngrads=2)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="changed after the M-FAC window was built"):
        opt.step()
