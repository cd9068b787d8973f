"""``MFAC`` behaves like a ``torch.optim`` optimizer (issue #17): copies, low-precision parameters,
dtype errors, a tensor ``lr`` and ``torch.compile``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lightning_mfac import MFAC
from lightning_mfac.optim.mfac import COMPILE_MESSAGE


def _data(n: int = 32, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=gen)
    y = x @ torch.randn(6, 2, generator=gen) + 0.1 * torch.randn(n, 2, generator=gen)
    return x.to(dtype), y.to(dtype)


def _linear(dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 2).to(dtype)


def _loss(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def _step(model, opt, x, y) -> float:
    opt.zero_grad()
    loss = _loss(model, x, y)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------------- copies
@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("graft", [None, "adam"])
def test_a_copy_of_a_stepped_optimizer_steps_exactly_like_the_original(copier, graft):
    model = _linear()
    opt = MFAC(model.parameters(), lr=0.05, momentum=0.5, weight_decay=1e-3, ngrads=3, damp=1e-2, graft=graft)
    x, y = _data()
    for i in range(5):  # past the first refactor period: window, factorization, momentum, moments
        _step(model, opt, x[i::5], y[i::5])
    both = {"model": model, "opt": opt}
    twin = copy.deepcopy(both) if copier == "deepcopy" else pickle.loads(pickle.dumps(both))
    model2, opt2 = twin["model"], twin["opt"]
    assert all(p is q for p, q in zip(opt2.param_groups[0]["params"], model2.parameters(), strict=True))
    assert all(p is not q for p, q in zip(model.parameters(), model2.parameters(), strict=True))
    for i in range(3):
        for m, o in ((model, opt), (model2, opt2)):
            _step(m, o, x[i::3], y[i::3])
        for p, q in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(p, q)
    assert opt2._pre is not opt._pre and opt2._pre.params[0] is next(model2.parameters())
    # The copy's checkpoints still carry the window (the state-dict hooks came back with it).
    saved = opt2.state_dict()["mfac"]
    assert saved["window"] is not None and int(saved["skipped_steps"]) == 0
    assert (graft is None) == ("graft" not in saved)


def test_a_copy_of_an_unstepped_optimizer_builds_its_window_on_first_use():
    model = _linear()
    opt = MFAC(model.parameters(), lr=0.05, ngrads=3, damp=1e-2)
    twin = copy.deepcopy({"model": model, "opt": opt})
    assert twin["opt"]._pre is None
    x, y = _data()
    _step(model, opt, x, y)
    _step(twin["model"], twin["opt"], x, y)
    assert torch.equal(model.weight, twin["model"].weight)


# ---------------------------------------------------------------------- low precision
@pytest.mark.parametrize("graft", [None, "sgd", "adam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(dtype, graft):
    model = _linear(dtype)
    lr = 0.02 if graft == "adam" else 0.1
    opt = MFAC(model.parameters(), lr=lr, momentum=0.5, ngrads=4, damp=1e-1, graft=graft)
    x, y = _data(dtype=dtype)
    losses = [_step(model, opt, x, y) for _ in range(20)]
    assert model.weight.dtype == dtype and opt._pre.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_first_direction_matches_float32(dtype, tol):
    low = _linear(dtype)
    ref = _linear(dtype).float()  # the same (rounded) weights, in float32
    lr = 0.1
    opts = [MFAC(m.parameters(), lr=lr, ngrads=4, damp=1e-1) for m in (low, ref)]
    x, y = _data(dtype=dtype)
    before = [torch.cat([p.detach().float().flatten() for p in m.parameters()]) for m in (low, ref)]
    _step(low, opts[0], x, y)
    _step(ref, opts[1], x.float(), y)
    directions = [o._pre._direction.float() for o in opts]
    assert directions[0].dtype == torch.float32  # kept at the compute precision until the update
    err = (directions[0] - directions[1]).norm() / directions[1].norm()
    assert err < tol, float(err)
    # The update rounds that direction once into each parameter.
    after = torch.cat([p.detach().float().flatten() for p in low.parameters()])
    want = (before[0] - lr * directions[0]).to(dtype).float()
    assert torch.equal(after, want)


def test_float64_parameters_with_a_float32_window_step():
    model = _linear(torch.float64)
    opt = MFAC(model.parameters(), lr=0.1, ngrads=3, damp=1e-1, window={"dtype": "float32"})
    x, y = _data(dtype=torch.float64)
    losses = [_step(model, opt, x, y) for _ in range(6)]
    assert model.weight.dtype == torch.float64 and opt._pre.dtype == torch.float32
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- parameter errors
@pytest.mark.parametrize(
    "param, match",
    [
        (
            torch.zeros(3, 3).to_sparse(),
            r"index 0, shape \(3, 3\).*has layout torch.sparse_coo: expected a dense",
        ),
        (
            torch.zeros(3, dtype=torch.complex64),
            r"has the complex dtype torch.complex64: expected a real floating",
        ),
        (
            torch.zeros(3, dtype=torch.int64),
            r"has the non-floating-point dtype torch.int64: expected a real floating",
        ),
        (torch.zeros(3, dtype=torch.bool), r"non-floating-point dtype torch.bool.*register it as a buffer"),
        (torch.zeros(3, dtype=torch.float8_e4m3fn), r"dtype torch.float8_e4m3fn, which M-FAC does not train"),
    ],
)
def test_parameter_errors_name_the_parameter_and_what_is_wrong(param, match):
    with pytest.raises(ValueError, match=match) as err:
        MFAC([torch.nn.Parameter(param, requires_grad=False)])
    message = str(err.value)
    assert message.startswith("MFAC: parameter (index 0")
    # Each message says what is allowed: a dense layout, or the real floating-point dtypes.
    allowed = "torch.strided" if param.layout != torch.strided else "float32, float64, bfloat16 or float16"
    assert allowed in message


def test_named_parameter_errors_name_the_parameter():
    params = [
        ("w", torch.nn.Parameter(torch.zeros(2))),
        ("z", torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))),
    ]
    with pytest.raises(ValueError, match=r"parameter 'z' \(index 1, shape \(2,\), dtype torch.complex128"):
        MFAC(params)


# ---------------------------------------------------------------------- tensor lr
def test_tensor_lr_steps_like_a_float_lr_and_is_read_on_the_device():
    x, y = _data()
    runs = []
    for lr in (0.05, torch.tensor(0.05)):
        model = _linear()
        opt = MFAC(model.parameters(), lr=lr, momentum=0.5, ngrads=3, damp=1e-2, graft="sgd")
        for i in range(5):
            _step(model, opt, x[i::5], y[i::5])
        runs.append((model, opt))
    (m_float, _), (m_tensor, opt) = runs
    for p, q in zip(m_float.parameters(), m_tensor.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    # The step reads the tensor each time: set to 0 in place, nothing moves (momentum or not).
    lr.fill_(0.0)
    frozen = [p.detach().clone() for p in m_tensor.parameters()]
    _step(m_tensor, opt, x, y)
    assert all(torch.equal(p, f) for p, f in zip(m_tensor.parameters(), frozen, strict=True))
    # And it survives a checkpoint round trip.
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


def test_tensor_lr_per_group():
    model = _linear()
    opt = MFAC(
        [{"params": [model.weight], "lr": torch.tensor(0.1)}, {"params": [model.bias], "lr": 0.0}],
        ngrads=3,
        damp=1e-2,
    )
    bias = model.bias.detach().clone()
    weight = model.weight.detach().clone()
    x, y = _data()
    _step(model, opt, x, y)
    assert torch.equal(model.bias, bias) and not torch.equal(model.weight, weight)


@pytest.mark.parametrize(
    "lr, match",
    [
        (torch.tensor(-0.1), r"lr=tensor\(-0.1"),
        (torch.tensor(float("nan")), r"lr=tensor\(nan\) is invalid"),
        (torch.tensor([0.1, 0.2]), r"lr is a tensor of shape \(2,\).*one-element floating-point tensor"),
        (torch.tensor(1), r"lr is a tensor of shape \(\) and dtype torch.int64"),
        (torch.tensor(0.1, requires_grad=True), "requires grad"),
    ],
)
def test_bad_tensor_lr_is_refused_at_construction(lr, match):
    with pytest.raises(ValueError, match=match):
        MFAC(_linear().parameters(), lr=lr)


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_fullgraph_compile_of_the_step_is_refused_with_what_to_do():
    model = _linear()
    opt = MFAC(model.parameters(), lr=0.05, ngrads=3, damp=1e-2, window={"kernels": "torch"})
    x, y = _data()
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="compile the model/loss, not the optimizer step") as err:
        torch.compile(opt.step, fullgraph=True)()
    assert "call opt.step() eagerly" in str(err.value) and "call opt.step() eagerly" in COMPILE_MESSAGE
    assert opt._pre is None  # refused before anything ran


@pytest.mark.slow
def test_compiled_step_without_fullgraph_runs_eagerly():
    torch._dynamo.reset()
    models = [_linear(), _linear()]
    opts = [MFAC(m.parameters(), lr=0.05, ngrads=3, damp=1e-2, window={"kernels": "torch"}) for m in models]
    steps = [torch.compile(opts[0].step), opts[1].step]
    x, y = _data()
    for i in range(4):
        for m, o, s in zip(models, opts, steps, strict=True):
            o.zero_grad()
            _loss(m, x[i::4], y[i::4]).backward()
            s()
        assert torch.equal(models[0].weight, models[1].weight)


def test_step_hooks_still_run_around_the_eager_step():
    # The step is wrapped for torch.compile; torch.optim's step hooks must still see it.
    model = _linear()
    opt = MFAC(model.parameters(), lr=0.05, ngrads=3, damp=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    x, y = _data()
    weight = model.weight.detach().clone()
    _step(model, opt, x, y)
    assert calls == ["pre", "post"] and not torch.equal(model.weight, weight)
