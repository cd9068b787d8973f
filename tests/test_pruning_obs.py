"""The OBS step of ``oneshot_prune`` against a dense float64 Optimal Brain Surgeon reference.

The reference materializes ``F = λI + (1/m)GᵀG`` over the alive weights, inverts it with
``torch.linalg.inv`` and applies the textbook formulas: ``ρ = w²/(2[F⁻¹]ᵢᵢ)``, prune the lowest,
``δw = −F⁻¹v`` with ``v_q = w_q/[F⁻¹]_qq`` on the pruned set, pruned weights set to 0.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_mfac import StaticFisherInverse, oneshot_prune
from lightning_mfac.pruning import obs_correction, obs_saliency, prune_count

DAMP = 1e-3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()


def _batches(n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n * 4, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n * 4,), generator=gen)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, n * 4, 4)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


NAMES = ["0.weight", "2.weight"]


def _flat(model) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in NAMES])


def _gradients(model, batches, alive) -> torch.Tensor:
    params = dict(model.named_parameters())
    rows = []
    for batch in batches:
        grads = torch.autograd.grad(_loss(model, batch), [params[n] for n in NAMES])
        rows.append(torch.cat([g.reshape(-1) for g in grads])[alive])
    return torch.stack(rows)


def _reference(dense_inverse, model, batches, sparsity, alive, block=None, nm=None):
    """Weights and keep-mask (flat over NAMES) after one dense OBS step."""
    w_all = _flat(model)
    w = w_all[alive]
    inv = dense_inverse(_gradients(model, batches, alive), DAMP, block)
    diag = torch.diagonal(inv)
    saliency = torch.full_like(w_all, -math.inf)
    saliency[alive] = w * w / (2 * diag)
    k = prune_count(w_all.numel(), sparsity)
    if nm is None:
        pruned_all = torch.zeros_like(alive)
        pruned_all[torch.argsort(saliency)[:k]] = True
    else:
        n, mm = nm
        # Exact N:M (k == all eligible): the M - N lowest of every group.
        order = torch.argsort(saliency.view(-1, mm), dim=1)[:, : mm - n]
        pruned_all = torch.zeros(saliency.view(-1, mm).shape, dtype=torch.bool)
        pruned_all.scatter_(1, order, True)
        pruned_all = pruned_all.reshape(-1)
    pruned = pruned_all[alive]
    v = torch.where(pruned, w / diag, torch.zeros_like(w))
    new = w - inv @ v
    new[pruned] = 0
    out = torch.zeros_like(w_all)
    out[alive] = new
    return out, ~pruned_all & alive


@pytest.mark.parametrize("block", [None, 8, 40])
def test_oneshot_matches_dense_obs(block, dense_inverse):
    model, batches = _model(), _batches()
    ref_w, ref_keep = _reference(dense_inverse, copy.deepcopy(model), batches, 0.6, torch.ones(96, dtype=torch.bool), block)
    masks = oneshot_prune(model, _loss, batches, 0.6, obs=dict(ngrads=len(batches), damp=DAMP, block_size=block))
    keep = torch.cat([masks[n].reshape(-1) for n in NAMES])
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(_flat(model), ref_w, rtol=1e-9, atol=1e-10)
    assert int((~keep).sum()) == prune_count(96, 0.6)


def test_restricted_to_alive_weights_with_given_masks(dense_inverse):
    model, batches = _model(), _batches()
    gen = torch.Generator().manual_seed(3)
    alive = torch.rand(96, generator=gen) > 0.3
    given = dict(zip(NAMES, torch.split(alive, [64, 32]), strict=True))
    given = {n: m.reshape(p.shape) for (n, m), p in zip(given.items(), [model[0].weight, model[2].weight], strict=True)}
    with torch.no_grad():
        model[0].weight.mul_(given["0.weight"])
        model[2].weight.mul_(given["2.weight"])
    ref_w, ref_keep = _reference(dense_inverse, copy.deepcopy(model), batches, 0.7, alive)
    masks = oneshot_prune(model, _loss, batches, 0.7, masks=given, obs=dict(ngrads=len(batches), damp=DAMP))
    keep = torch.cat([masks[n].reshape(-1) for n in NAMES])
    assert torch.equal(keep, ref_keep)
    assert not bool((keep & ~alive).any()), "a pruned weight was revived"
    torch.testing.assert_close(_flat(model), ref_w, rtol=1e-9, atol=1e-10)


def test_nm_matches_dense_obs_selection(dense_inverse):
    model, batches = _model(), _batches()
    ref_w, ref_keep = _reference(dense_inverse, copy.deepcopy(model), batches, 0.5, torch.ones(96, dtype=torch.bool), nm=(2, 4))
    masks = oneshot_prune(model, _loss, batches, None, obs=dict(pattern="2:4", ngrads=len(batches), damp=DAMP))
    keep = torch.cat([masks[n].reshape(-1) for n in NAMES])
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(_flat(model), ref_w, rtol=1e-9, atol=1e-10)


def test_recomputations_are_sequential_obs_steps():
    """k recomputations == k one-step prunes to the geometric intermediate targets, with fresh
    gradients each (batches continue cycling from where the previous step stopped)."""
    batches = _batches(6)
    a, b = _model(), _model()
    oneshot_prune(a, _loss, batches, 0.75, obs=dict(ngrads=6, damp=DAMP, recomputations=2))
    masks = oneshot_prune(b, _loss, batches, 0.5, obs=dict(ngrads=6, damp=DAMP))
    masks = oneshot_prune(b, _loss, batches, 0.75, masks=masks, obs=dict(ngrads=6, damp=DAMP))
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-12, atol=1e-12)


def test_obs_helpers_match_dense_formulas(dense_inverse):
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    w = torch.randn(20, generator=gen, dtype=torch.float64)
    pruned = torch.rand(20, generator=gen) < 0.4
    fisher = StaticFisherInverse(grads, DAMP)
    inv = dense_inverse(grads, DAMP)
    diag = torch.diagonal(inv)
    torch.testing.assert_close(obs_saliency(w, fisher.diag()), w * w / (2 * diag))
    expected = -inv[:, pruned] @ (w[pruned] / diag[pruned])
    torch.testing.assert_close(obs_correction(fisher, w, pruned), expected, rtol=1e-9, atol=1e-9)
    # One weight at a time, OBS zeroes it exactly.
    single = torch.zeros(20, dtype=torch.bool)
    single[3] = True
    assert abs(float(w[3] + obs_correction(fisher, w, single)[3])) < 1e-9


def test_mfac_beats_magnitude_on_the_quadratic_model_of_the_loss(dense_inverse):
    """OBS minimizes ½δwᵀFδw; on the model it was built for it must not lose to magnitude."""
    batches = _batches()
    base = _model()
    inv = dense_inverse(_gradients(base, batches, torch.ones(96, dtype=torch.bool)), DAMP)
    fisher = torch.linalg.inv(inv)
    w0 = _flat(base)

    def quad_cost(model):
        dw = _flat(model) - w0
        return float(dw @ fisher @ dw) / 2

    obs, mag = _model(), _model()
    oneshot_prune(obs, _loss, batches, 0.6, obs=dict(ngrads=len(batches), damp=DAMP))
    oneshot_prune(mag, _loss, batches, 0.6, obs=dict(method="magnitude"))
    assert quad_cost(obs) < quad_cost(mag)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (paged gradients on the GPU)")
def test_cuda_with_host_gradients_is_paged_and_matches_cpu(monkeypatch):
    import lightning_mfac.fisher.storage.planner as planner
    import lightning_mfac.pruning.oneshot as oneshot

    built = []

    class Recording(StaticFisherInverse):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    # No room on the GPU: the gradient matrix is accumulated in host memory and paged.
    monkeypatch.setattr(planner, "AUTO_DEVICE_FRACTION", 0.0)
    monkeypatch.setattr(oneshot, "StaticFisherInverse", Recording)

    def loss(model, batch):
        device = next(model.parameters()).device
        return _loss(model, tuple(t.to(device) for t in batch))

    cpu, gpu = _model(), _model().cuda()
    batches = _batches()
    expected = oneshot_prune(cpu, loss, batches, 0.6, obs=dict(ngrads=len(batches), damp=DAMP))
    masks = oneshot_prune(gpu, loss, batches, 0.6, obs=dict(ngrads=len(batches), damp=DAMP))
    assert built[-1].paged and built[-1].device.type == "cuda"
    for name in NAMES:
        assert torch.equal(masks[name].cpu(), expected[name])
    torch.testing.assert_close(_flat(gpu).cpu(), _flat(cpu), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("block", [None, 8])
def test_kernels_choice_gives_the_same_masks_and_weights(block):
    batches = _batches()
    out = {}
    for kernels in ("auto", "torch"):
        model = _model()
        masks = oneshot_prune(model, _loss, batches, 0.6, obs=dict(ngrads=len(batches), damp=DAMP, block_size=block,
                                                                  window={"kernels": kernels}))
        out[kernels] = (masks, _flat(model))
    for name in NAMES:
        assert torch.equal(out["auto"][0][name], out["torch"][0][name])
    torch.testing.assert_close(out["auto"][1], out["torch"][1], rtol=0, atol=1e-12)


def test_obs_config_is_one_frozen_validated_object():
    import dataclasses

    from lightning_mfac.fisher.config import WindowConfig
    from lightning_mfac.pruning import OBSConfig

    obs = OBSConfig.coerce({"ngrads": {0: 4, 0.5: 8}, "params": ["0.weight"], "window": {"page_cols": 16}})
    assert obs.ngrads == {0.0: 4, 0.5: 8} and obs.params == ("0.weight",)
    assert obs.window == WindowConfig(page_cols=16) and obs.nm is None
    assert OBSConfig(pattern="2:4").nm == (2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.damp = 1.0
    for bad, needle in [
        ({"blocks": 3}, "unknown setting"),
        ({"window": {"storage": "sharded"}}, "window.storage='sharded'"),
        ({"window": {"kernels": "cuda"}}, "kernels='cuda'"),
        ({"damp": 0}, "damp=0"),
        ({"scope": "row"}, "scope='row'"),
    ]:
        with pytest.raises(ValueError, match=needle):
            OBSConfig.coerce(bad)
