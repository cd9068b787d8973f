"""One home per concern: the dynamic engine's settings (DynamicConfig), the storage planner,
the engine's set_damp, and the one restore rule of the flat window both surfaces share."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from references import correlated_gradients

from lightning_mfac import MFAC
from lightning_mfac.fisher import DynamicConfig, DynamicFisherInverse, WindowConfig
from lightning_mfac.fisher.storage import DeviceWindow, make_window, plan_storage
from lightning_mfac.optim.flat import FlatPreconditioner
from lightning_mfac.pruning import OBSConfig


def _dense_inverse_mul(window: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    m, d = window.shape
    fisher = damp * torch.eye(d, dtype=torch.float64) + window.t() @ window / m
    return torch.linalg.solve(fisher, x)


# ---------------------------------------------------------------------- DynamicConfig
def test_dynamic_config_is_one_frozen_validated_object():
    cfg = DynamicConfig.coerce({"ngrads": 4, "damp": 1e-3, "window": {"dtype": "float64"}})
    assert cfg == DynamicConfig(4, 1e-3, "absolute", WindowConfig(dtype=torch.float64))
    assert DynamicConfig.coerce(None) == DynamicConfig() and DynamicConfig.coerce(cfg) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.damp = 1.0
    for bad, needle in [
        ({"ngrads": 0}, "ngrads=0 is invalid"),
        ({"damp": 0.0}, "damp=0.0 is invalid"),
        ({"damp": 1e300}, r"damp=1e\+300 is out of range"),
        ({"damp_mode": "squared"}, "damp_mode='squared' is invalid"),
        ({"window": {"storage": "disk"}}, "storage='disk'"),
        ({"windows": {}}, r"mfac: unknown setting\(s\) \['windows'\]"),
    ]:
        with pytest.raises(ValueError, match=needle):
            DynamicConfig.coerce(bad)
    with pytest.raises(TypeError, match="mfac=3: expected a DynamicConfig"):
        DynamicConfig.coerce(3)
    # The same coercion serves every config: same texts, each naming its own key.
    with pytest.raises(ValueError, match=r"window: unknown setting\(s\) \['pages'\]"):
        WindowConfig.coerce({"pages": 2})
    with pytest.raises(TypeError, match="obs=3: expected an OBSConfig"):
        OBSConfig.coerce(3)


def test_engine_from_config_equals_engine_from_arguments():
    grads = correlated_gradients(9, 12, seed=3)
    cfg = DynamicConfig(ngrads=4, damp=1e-2, damp_mode="relative", window={"dtype": torch.float64})
    a = DynamicFisherInverse(12, config=cfg)
    b = DynamicFisherInverse(12, 4, 1e-2, window={"dtype": torch.float64}, damp_mode="relative")
    assert a.config == b.config == cfg
    for g in grads:
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    # The dtype is settled once: the engine's config says what its window holds.
    assert DynamicFisherInverse(12, 4).config.window.dtype == torch.float32
    with pytest.raises(TypeError, match="not both"):
        DynamicFisherInverse(12, 4, config=cfg)
    with pytest.raises(TypeError, match="ngrads"):
        DynamicFisherInverse(12)


# ---------------------------------------------------------------------- set_damp
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_set_damp_keeps_the_window_and_refactorizes(mode):
    grads = correlated_gradients(7, 10, seed=5)
    inv = DynamicFisherInverse(10, 5, 1e-2, window={"dtype": torch.float64}, damp_mode=mode)
    for g in grads:
        inv.update(g)
    before = inv.window.to_dense().clone()
    inv.set_damp(3e-2)
    assert inv.damp == 3e-2 and inv.damp_mode == mode and torch.equal(inv.window.to_dense(), before)
    lam = 3e-2 if mode == "absolute" else 3e-2 * float(before.square().sum()) / 5 / 5
    assert inv.lam == pytest.approx(lam, rel=1e-12)
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(inv.mul(x), _dense_inverse_mul(before, inv.lam, x), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damp=-1.0 is invalid"):
        inv.set_damp(-1.0)


# ---------------------------------------------------------------------- the storage planner
def test_one_storage_plan_for_every_window_on_the_cpu():
    for storage in ("device", "paged"):
        assert plan_storage(storage, 4, 10, torch.float32, "cpu") == storage
    # "auto" on a CPU device: the device's memory is the host's, whether the rows exist or not.
    assert plan_storage("auto", 4, 10, torch.float32, "cpu") == "device"
    assert plan_storage("auto", 4, 10, torch.float32, "cpu", held_on="cpu", shardable=False) == "device"
    window = make_window(WindowConfig(dtype=torch.float64), 4, 10, "cpu")
    assert isinstance(window, DeviceWindow) and window.dtype == torch.float64
    assert (window.rows, window.dim) == (4, 10)
    assert make_window(None, 4, 10, "cpu").dtype == torch.float32


# ---------------------------------------------------------------------- the restore rule
def _filled(damp: float = 1e-2, **kw) -> tuple[list[torch.nn.Parameter], FlatPreconditioner]:
    params = [torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(4))]
    pre = FlatPreconditioner(params, DynamicConfig(3, damp, **kw), names=["w", "b"])
    for g in correlated_gradients(4, 10, seed=2):
        pre.precondition(g)
    return params, pre


def test_restore_keeps_the_window_under_the_settings_in_effect():
    params, pre = _filled()
    state = copy.deepcopy(pre.state_dict())
    assert state["names"] == ["w", "b"]
    same = FlatPreconditioner(params, pre.config, names=["w", "b"])
    assert same.restore(state) is None and int(same.fisher.count) == 4
    redamped = FlatPreconditioner(params, pre.config.replace(damp=3e-2), names=["w", "b"])
    message = redamped.restore(state)
    assert "damp=0.03 (absolute); the checkpoint was written with damp=0.01" in message
    assert redamped.config.damp == 3e-2 and int(redamped.fisher.count) == 4
    resized = FlatPreconditioner(params, pre.config.replace(ngrads=5), names=["w", "b"])
    assert "ngrads: 3 in the checkpoint, 5 now" in resized.restore(state)
    assert int(resized.fisher.count) == 0
    without = {**state, "fisher": {k: v for k, v in state["fisher"].items() if k != "window"}}
    assert "save_window=False" in same.restore(without) and int(same.fisher.count) == 0


def test_masks_by_name_or_by_tensor_do_the_same():
    params, by_tensor = _filled()
    _, by_name = _filled()
    keep = torch.rand(3, 2, generator=torch.Generator().manual_seed(0)) > 0.5
    by_tensor.apply_masks({params[0]: keep})
    by_name.apply_masks({"w": keep, "not-here": torch.ones(1, dtype=torch.bool)})
    assert torch.equal(by_tensor.fisher.window.to_dense(), by_name.fisher.window.to_dense())
    anonymous = FlatPreconditioner(params, DynamicConfig(3, 1e-2))
    with pytest.raises(ValueError, match="keyed by parameter name"):
        anonymous.apply_masks({"w": keep})


def test_mfac_built_from_named_parameters_takes_masks_by_name():
    model = torch.nn.Linear(4, 2).double()
    opt = MFAC(model.named_parameters(), lr=0.1, ngrads=2, momentum=0.5)
    model(torch.randn(3, 4, dtype=torch.float64)).square().sum().backward()
    opt.step()
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    opt.apply_masks({"weight": keep})
    assert opt.state[model.weight]["momentum_buffer"][0, 1] == 0
    assert bool((opt._pre.fisher.window.to_dense()[:, 1] == 0).all())
