"""The MFAC optimizer against a float64 dense M-FAC reference."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from lightning_mfac import MFAC
from lightning_mfac.fisher.config import WindowConfig
from lightning_mfac.fisher.kernels import resolve_kernels
from lightning_mfac.optim.masking import MaskableWindow, broadcast_masks


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
            self.v = (
                (1 - self.momentum) * u
                if self.v is None
                else self.momentum * self.v + (1 - self.momentum) * u
            )
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
        lr=0.1,
        momentum=momentum,
        weight_decay=weight_decay,
        ngrads=m,
        damp=damp,
    )
    n0 = sum(t.numel() for t in p[:2])
    n1 = sum(t.numel() for t in p[2:])
    lrs = torch.cat(
        [torch.full((n0,), 0.1, dtype=torch.float64), torch.full((n1,), 0.05, dtype=torch.float64)]
    )
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


def test_closure_and_lr_scheduler():
    """``step(closure)`` returns the closure's loss and steps like the explicit loop; a scheduler's
    learning rate is the one the next step uses."""
    model, plain = _model(), _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=2, damp=1e-2)
    ref = MFAC(plain.parameters(), lr=0.1, ngrads=2, damp=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i, batch in enumerate(_batches(3)):

        def closure(batch=batch):
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss

        want = _loss(plain, batch).detach()
        loss = opt.step(closure)
        assert torch.equal(loss.detach(), want)
        ref.param_groups[0]["lr"] = 0.1 * 0.5**i
        _train(plain, ref, [batch])
        assert torch.equal(_vector(model), _vector(plain))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def _train(model, opt, batches):
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()


def _vector(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _two_groups(model, **kw):
    p = list(model.parameters())
    return MFAC([{"params": p[:2]}, {"params": p[2:], "lr": 0.05, "momentum": 0.3}], **kw)


def _poison(model) -> None:
    for q in model.parameters():
        q.grad = torch.full_like(q, float("nan"))


@pytest.mark.parametrize("save_after", [0, 2, 5])
def test_resume_is_exact(save_after):
    """Train, save (model + optimizer through torch.save), load into a fresh optimizer, continue:
    bit-for-bit the uninterrupted run, with momentum, weight decay, two groups and a skipped step."""
    kw = {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-2, "ngrads": 3, "damp": 1e-2}
    batches = list(_batches(9))
    model = _model()
    opt = _two_groups(model, **kw)
    _train(model, opt, batches[:save_after])
    if save_after:
        _poison(model)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clone = _model()
    clone.load_state_dict(saved["model"])
    opt2 = _two_groups(clone, **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.skipped_steps == opt.skipped_steps == (1 if save_after else 0)
    for batch in batches[save_after:]:
        _train(model, opt, [batch])
        _train(clone, opt2, [batch])
        assert torch.equal(_vector(model), _vector(clone))


def test_load_into_an_optimizer_that_already_stepped():
    kw = {"lr": 0.1, "momentum": 0.5, "ngrads": 3, "damp": 1e-2}
    batches = list(_batches(8))
    model = _model()
    opt = MFAC(model.parameters(), **kw)
    _train(model, opt, batches[:4])
    state = copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[4:6])  # moves the window and the momentum on
    opt.load_state_dict(copy.deepcopy(state))  # torch's loader keeps same-device tensors: no sharing
    # the model is not rewound, but the optimizer is: compare with a fresh load of the same state
    clone = copy.deepcopy(model)
    opt2 = MFAC(clone.parameters(), **kw)
    opt2.load_state_dict(copy.deepcopy(state))
    for batch in batches[6:]:
        _train(model, opt, [batch])
        _train(clone, opt2, [batch])
    assert torch.equal(_vector(model), _vector(clone))


def test_ngrads_and_damp_are_group_hyperparameters():
    model = _model()
    opt = MFAC(model.parameters(), ngrads=3, damp=1e-2)
    assert opt.defaults["ngrads"] == 3 and opt.defaults["damp"] == 1e-2
    assert opt.param_groups[0]["ngrads"] == 3 and opt.param_groups[0]["damp"] == 1e-2
    p = list(model.parameters())
    with pytest.raises(
        ValueError, match=r"param_groups\[1\]: ngrads=5 differs from param_groups\[0\]'s ngrads=3"
    ):
        MFAC([{"params": p[:2]}, {"params": p[2:], "ngrads": 5}], ngrads=3)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: damp=0.0 is invalid"):
        MFAC([{"params": p[:2]}, {"params": p[2:], "damp": 0.0}])
    # a group that repeats the shared value is fine
    MFAC([{"params": p[:2]}, {"params": p[2:], "ngrads": 3}], ngrads=3)


def test_window_settings_are_fixed_once_the_window_exists():
    model = _model()
    opt = MFAC(model.parameters(), ngrads=2, damp=1e-2)
    _train(model, opt, _batches(1))
    opt.param_groups[0]["damp"] = 1e-3
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['damp'\]=0.001 but the window was built with damp=0.01"
    ):
        _train(model, opt, _batches(1))
    opt.param_groups[0]["damp"] = 1e-2
    with pytest.raises(RuntimeError, match="after the M-FAC window was built"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]})


def test_resume_with_other_window_settings_keeps_the_checkpoints(recwarn):
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=3, damp=1e-2)
    _train(model, opt, _batches(4))
    state = opt.state_dict()
    opt2 = MFAC(copy.deepcopy(model).parameters(), lr=0.1, ngrads=5, damp=1e-3)
    opt2.load_state_dict(state)
    messages = [str(w.message) for w in recwarn]
    assert any("saved with ngrads=3" in m and "built with ngrads=5" in m for m in messages), messages
    assert opt2.param_groups[0]["ngrads"] == 3 and opt2._pre.fisher.ngrads == 3
    assert opt2._pre.fisher.damp == 1e-2 and opt2._pre.fisher.count == 4


def test_checkpoint_of_another_model_is_one_clear_error():
    model = _model()
    opt = MFAC(model.parameters(), ngrads=2)
    _train(model, opt, _batches(1))
    other = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)).double()
    with pytest.raises(RuntimeError, match="different model"):
        MFAC(other.parameters(), ngrads=2).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"groups of sizes \[4\], this one \[2\]"):
        MFAC(torch.nn.Linear(5, 3).parameters(), ngrads=2).load_state_dict(opt.state_dict())


def test_nonfinite_gradient_is_skipped_exactly():
    """A non-finite step changes nothing (parameters, momentum, window) and the run continues as
    if it had not happened."""
    kw = {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-2, "ngrads": 2, "damp": 1e-2}
    batches = list(_batches(5))
    model, clean = _model(), _model()
    opt, ref = MFAC(model.parameters(), **kw), MFAC(clean.parameters(), **kw)
    _train(model, opt, batches[:2])
    _train(clean, ref, batches[:2])
    before = _vector(model)
    momentum = [opt.state[q]["momentum_buffer"].clone() for q in model.parameters()]
    count = opt._pre.fisher.count
    _poison(model)
    opt.step()
    assert torch.equal(before, _vector(model))
    assert all(
        torch.equal(m, opt.state[q]["momentum_buffer"])
        for m, q in zip(momentum, model.parameters(), strict=True)
    )
    assert opt._pre.fisher.count == count
    assert opt.skipped_steps == 1 and opt.skipped_steps_tensor.dtype == torch.int64
    _train(model, opt, batches[2:])
    _train(clean, ref, batches[2:])
    # The window never sees the skipped step, but the host counts it towards the refactor
    # schedule (it cannot tell without a host read), so refactors may fall one step apart:
    # equal to float64 rounding.
    torch.testing.assert_close(_vector(model), _vector(clean), rtol=1e-10, atol=1e-12)


def test_first_step_nonfinite_is_skipped():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=2, damp=1e-2)
    before = _vector(model)
    _poison(model)
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(before, _vector(model))
    assert opt._pre.fisher.count == 0


def test_parameters_without_gradient_stay_put_like_sgd():
    """A frozen layer left in the optimizer: SGD with weight decay leaves it alone, so must MFAC;
    and the frozen layer (a zero column of the window) changes nothing for the others."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    model[0].requires_grad_(False)
    trained = copy.deepcopy(model)
    frozen_before = [q.detach().clone() for q in model[0].parameters()]
    kw = {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "ngrads": 3, "damp": 1e-2}
    opt = MFAC(model.parameters(), **kw)  # the frozen tensors are in the optimizer
    only = MFAC(trained[2].parameters(), **kw)  # the same run without them
    sgd_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.1)
    for batch in _batches(5):
        for mdl, o in ((model, opt), (trained, only), (sgd_model, sgd)):
            o.zero_grad()
            _loss(mdl, batch).backward()
            o.step()
    for q, q0, s in zip(model[0].parameters(), frozen_before, sgd_model[0].parameters(), strict=True):
        assert torch.equal(q, q0) and torch.equal(s, q0)
        assert "momentum_buffer" not in opt.state[q]
    for q, r in zip(model[2].parameters(), trained[2].parameters(), strict=True):
        assert torch.allclose(q, r, rtol=0, atol=1e-12)


def test_step_without_any_gradient_changes_nothing():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.1, ngrads=3, damp=1e-2)
    _train(model, opt, _batches(2))
    before, count = _vector(model), opt._pre.fisher.count
    opt.zero_grad()
    opt.step()
    assert torch.equal(_vector(model), before) and opt._pre.fisher.count == count


def test_parameter_without_gradient_in_one_step_is_not_updated_then():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, weight_decay=0.1, ngrads=3, damp=1e-2)
    _train(model, opt, _batches(2))  # couples every coordinate through the window
    last = model[2].bias
    before = last.detach().clone()
    opt.zero_grad()
    _loss(model, next(_batches(1))).backward()
    last.grad = None
    moved = [q.detach().clone() for q in model.parameters()]
    opt.step()
    assert torch.equal(last, before)
    assert not torch.equal(model[0].weight, moved[0])


def test_sparse_gradient_is_refused_naming_the_parameter():
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    lin = torch.nn.Linear(3, 2).double()
    opt = MFAC(list(lin.parameters()) + list(emb.parameters()), ngrads=2)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(
        ValueError, match=r"index 2, shape \(10, 3\).*sparse_coo gradient.*nn.Embedding\(sparse=True\)"
    ):
        opt.step()


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        layer = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"index 0, shape \(2, 4\).*meta device"):
        MFAC(layer.parameters())


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"index 0, shape \(3,\), dtype torch.complex64"):
        MFAC([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    model = _model()
    opt = MFAC(model.parameters(), ngrads=2)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="changed after the M-FAC window was built"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"ngrads": 0}, "ngrads=0"),
        ({"damp": 0.0}, "damp=0.0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"window": {"storage": "disk"}}, "storage='disk'"),
        ({"window": {"dtype": "int8"}}, "dtype='int8'"),
        ({"window": {"refactor_every": 0}}, "refactor_every=0"),
        ({"window": {"refactor_every": -3}}, "refactor_every=-3"),
        ({"window": {"kernels": "cuda"}}, "kernels='cuda'"),
        ({"window": {"ngrads": 4}}, r"unknown setting\(s\) \['ngrads'\]"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFAC(_model().parameters(), **kwargs)


@pytest.mark.parametrize(
    "window", [None, {"kernels": "torch"}, WindowConfig(kernels="auto", refactor_every=2)]
)
def test_window_config_reaches_the_window_and_matches_dense(window):
    model = _model()
    ref = copy.deepcopy(model)
    m, damp = 3, 1e-2
    opt = MFAC(model.parameters(), lr=0.1, ngrads=m, damp=damp, window=window)
    dense = DenseMFAC(list(ref.parameters()), 0.1, m, damp, 0.0, 0.0)
    for batch in _batches(2 * m + 1):
        _train(model, opt, [batch])
        for q in ref.parameters():
            q.grad = None
        _loss(ref, batch).backward()
        dense.step()
        assert (_vector(model) - _vector(ref)).abs().max() < 1e-10
    want = WindowConfig.coerce(window)
    assert opt.window == want
    fisher = opt._pre.fisher
    assert fisher.config.window.kernels == want.kernels and fisher.dtype == torch.float64
    assert fisher.window.kernels.name == resolve_kernels(want.kernels, "cpu").name
    assert fisher.refactor_every == (want.refactor_every or m)


def test_mixed_parameter_dtypes_follow_a_float32_run():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
    mixed = [copy.deepcopy(a), copy.deepcopy(b).bfloat16()]
    plain = [copy.deepcopy(a), copy.deepcopy(b).bfloat16().float()]
    opts = [
        MFAC([*m[0].parameters(), *m[1].parameters()], lr=0.05, momentum=0.5, ngrads=3, damp=1e-1)
        for m in (mixed, plain)
    ]
    for x, y in _batches(4):
        for (l0, l1), o in zip((mixed, plain), opts, strict=True):
            o.zero_grad()
            out = l1(torch.tanh(l0(x.float())).to(l1.weight.dtype))
            torch.nn.functional.cross_entropy(out.float(), y).backward()
            o.step()
    assert mixed[1].weight.dtype == torch.bfloat16
    assert torch.allclose(mixed[0].weight, plain[0].weight, atol=2e-2)
    assert torch.allclose(mixed[1].weight.float(), plain[1].weight, atol=2e-2)


def test_apply_masks_follows_the_shared_protocol():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, momentum=0.5, ngrads=3, damp=1e-2)
    assert isinstance(opt, MaskableWindow)
    _train(model, opt, _batches(3))
    weight = model[0].weight
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        weight.mul_(keep)
    assert broadcast_masks([object(), opt], {weight: keep}) == 1
    assert torch.all(opt.state[weight]["momentum_buffer"][~keep] == 0)
    window = opt._pre.fisher.window.to_dense()[:, : weight.numel()]
    assert torch.all(window[:, ~keep.reshape(-1)] == 0)
    with pytest.raises(ValueError, match=r"mask of parameter \(index 0, shape \(4, 5\).*has shape \(5, 4\)"):
        opt.apply_masks({weight: keep.t()})


def test_relative_damping_reaches_the_window_and_resumes():
    """``damp_mode="relative"`` is a window setting like ``damp``: MFAC steps by exactly the
    engine's ``F⁻¹g`` with relative dampening, and resumes exactly."""
    from lightning_mfac.fisher import DynamicFisherInverse

    kw = {"lr": 0.1, "ngrads": 3, "damp": 0.5, "damp_mode": "relative"}
    batches = list(_batches(8))
    model, ref = _model(), _model()
    opt = MFAC(model.parameters(), **kw)
    assert opt.param_groups[0]["damp_mode"] == "relative"
    dim = sum(q.numel() for q in ref.parameters())
    fisher = DynamicFisherInverse(dim, 3, 0.5, window={"dtype": torch.float64}, damp_mode="relative")
    for batch in batches[:5]:
        _train(model, opt, [batch])
        for q in ref.parameters():
            q.grad = None
        _loss(ref, batch).backward()
        g = torch.nn.utils.parameters_to_vector([q.grad for q in ref.parameters()])
        u = fisher.update_mul(g)
        torch.nn.utils.vector_to_parameters(_vector(ref) - 0.1 * u, ref.parameters())
        assert (_vector(model) - _vector(ref)).abs().max() < 1e-12
    assert opt._pre.fisher.damp_mode == "relative"
    clone = copy.deepcopy(model)
    opt2 = MFAC(clone.parameters(), **dict(kw, damp_mode="absolute"))
    with pytest.warns(RuntimeWarning, match="saved with damp_mode='relative'"):
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for batch in batches[5:]:
        _train(model, opt, [batch])
        _train(clone, opt2, [batch])
    assert torch.equal(_vector(model), _vector(clone))


def test_bad_damp_mode():
    with pytest.raises(ValueError, match="damp_mode='squared'"):
        MFAC(_model().parameters(), damp_mode="squared")
    p = list(_model().parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\]: damp_mode='relative' differs"):
        MFAC([{"params": p[:2]}, {"params": p[2:], "damp_mode": "relative"}])


def test_a_parameter_listed_twice_is_refused_naming_both_positions():
    import warnings

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.optim's own 'duplicate parameters' warning
        with pytest.raises(ValueError, match=r"index 2, shape \(3,\).*same tensor as parameter index 0"):
            MFAC([p, q, p], ngrads=2)
    MFAC([p, q], ngrads=2)  # each once: fine


@pytest.mark.parametrize("damp", [1e300, 1e-300])
def test_a_damping_whose_step_underflows_or_overflows_is_refused(damp):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=re.escape(f"damp={damp!r} is out of range: expected a damping in")):
        MFAC([p], ngrads=2, damp=damp)
    MFAC([p], ngrads=2, damp=1e6)  # a huge but representable damping (the identity ablation) is fine
