"""Masks and ``oneshot_prune`` behaviour: exact sparsity, N:M validity, scopes, selection and
argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mfac import oneshot_prune
from lightning_mfac.pruning import (
    prune_count,
    select_masks,
    select_parameters,
    sparse_state_dict,
    sparsity_of,
)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # rows of 4·3·3 = 36
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _batches(n=6):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 4, 4, 4, generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(n)]


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


WEIGHTS = ["conv.weight", "fc1.weight", "fc2.weight"]


def _check_masks_match_weights(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert bool((params[name][~mask] == 0).all()), f"{name}: pruned weight is not exactly 0"


@pytest.mark.parametrize("method", ["mfac", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 0.999])
def test_global_sparsity_is_exact(method, sparsity):
    model = ConvNet()
    masks = oneshot_prune(model, _loss, _batches(), sparsity, obs=dict(method=method, ngrads=6, block_size=32))
    assert list(masks) == WEIGHTS
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == prune_count(total, sparsity)
    _check_masks_match_weights(model, masks)


def test_layer_scope_prunes_every_layer_to_the_target():
    model = ConvNet()
    masks = oneshot_prune(model, _loss, _batches(), 0.8, obs=dict(scope="layer", ngrads=6))
    for mask in masks.values():
        assert int((~mask).sum()) == prune_count(mask.numel(), 0.8)
    assert abs(sparsity_of(masks) - 0.8) <= len(masks) / (2 * sum(m.numel() for m in masks.values()))
    _check_masks_match_weights(model, masks)


def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).reshape(-1, m)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("method", ["mfac", "magnitude"])
def test_nm_pattern_is_valid(scope, method):
    model = ConvNet()
    masks = oneshot_prune(model, _loss, _batches(), None, obs=dict(pattern="2:4", scope=scope, method=method, ngrads=6))
    for mask in masks.values():
        assert bool((_groups(mask, 4).sum(1) == 2).all())
    assert sparsity_of(masks) == 0.5
    _check_masks_match_weights(model, masks)


def test_nm_conv_groups_run_along_flattened_input_axis():
    model = ConvNet()
    masks = oneshot_prune(model, _loss, _batches(), 0.75, obs=dict(pattern="1:4", params=["conv.weight"], ngrads=6))
    mask = masks["conv.weight"]
    # Each row is in_channels·kh·kw = 36 long, in PyTorch's (c, kh, kw) order.
    rows = mask.reshape(8, 36)
    assert bool((rows.reshape(8, 9, 4).sum(-1) == 1).all())


def test_nm_intermediate_sparsity_stays_compatible_and_completes():
    model = ConvNet()
    masks = oneshot_prune(model, _loss, _batches(), 0.25, obs=dict(pattern="2:4", ngrads=6))
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == prune_count(total, 0.25)
    for mask in masks.values():
        assert bool((_groups(mask, 4).sum(1) >= 2).all())
    before = {n: m.clone() for n, m in masks.items()}
    masks = oneshot_prune(model, _loss, _batches(), 0.5, masks=masks, obs=dict(pattern="2:4", ngrads=6, recomputations=2))
    for name, mask in masks.items():
        assert bool((_groups(mask, 4).sum(1) == 2).all())
        assert not bool((mask & ~before[name]).any()), "pruned weights revived"


def test_select_masks_never_revives_and_counts_dead_weights():
    keep = {"a": torch.tensor([True, False, True, True, False, True])}
    scores = {"a": torch.tensor([0.1, 9.0, 5.0, 4.0, 8.0, 3.0])}
    new = select_masks(scores, keep, 0.5)
    # Two already dead; 3 zeros requested -> one more, the lowest alive (index 0).
    assert new["a"].tolist() == [False, False, True, True, False, True]
    # A target below the current sparsity prunes nothing and revives nothing.
    assert select_masks(scores, keep, 0.1)["a"].tolist() == keep["a"].tolist()


def test_default_selection_and_regex():
    model = ConvNet()
    assert list(select_parameters(model)) == WEIGHTS
    assert list(select_parameters(model, ["re:fc\\d\\.weight"])) == ["fc1.weight", "fc2.weight"]
    assert list(select_parameters(model, ["conv.weight", "re:fc2\\..*"])) == ["conv.weight", "fc2.weight", "fc2.bias"]
    tied = nn.Linear(4, 4)
    assert list(select_parameters(nn.Sequential(tied, nn.ReLU(), tied))) == ["0.weight"]


def test_frozen_weights_can_be_pruned_and_stay_frozen():
    model = ConvNet()
    model.fc1.weight.requires_grad_(False)
    masks = oneshot_prune(model, _loss, _batches(), 0.5, obs=dict(ngrads=6))
    assert not model.fc1.weight.requires_grad
    assert sparsity_of(masks) == prune_count(sum(m.numel() for m in masks.values()), 0.5) / sum(
        m.numel() for m in masks.values()
    )


def test_batchnorm_statistics_and_grads_untouched():
    model = ConvNet().train()
    stats = {k: v.clone() for k, v in model.bn.state_dict().items()}
    oneshot_prune(model, _loss, _batches(), 0.5, obs=dict(ngrads=6))
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_batches_are_cycled_when_fewer_than_ngrads():
    calls = []

    def loss(model, batch):
        calls.append(batch)
        return _loss(model, batch)

    batches = _batches(3)
    oneshot_prune(ConvNet(), loss, batches, 0.5, obs=dict(ngrads=7))
    assert len(calls) == 7 and calls[3] is batches[0] and calls[6] is batches[0]


def test_sparse_state_dict_stores_pruned_weights_sparse():
    model = ConvNet()
    masks = oneshot_prune(model, _loss, None, 0.9, obs=dict(method="magnitude"))
    state = sparse_state_dict(model, masks)
    for name, mask in masks.items():
        assert state[name].is_sparse and state[name]._nnz() == int(mask.sum())
        assert torch.equal(state[name].to_dense(), model.state_dict()[name])
    assert not state["fc1.bias"].is_sparse


BAD = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(method="random"), "method"),
    (dict(scope="row"), "scope"),
    (dict(pattern="4:4"), "pattern"),
    (dict(pattern="5:4"), "pattern"),
    (dict(pattern="2-4"), "pattern"),
    (dict(pattern="2:4", sparsity=0.6), "sparsity"),
    (dict(pattern="2:8", params=["conv.weight"]), "pattern='2:8'"),
    (dict(params=["re:nothing.*"]), "params entry 're:nothing.*'"),
    (dict(params=["fc3.weight"]), "params entry 'fc3.weight'"),
    (dict(ngrads={0.5: 8}), "ngrads"),
    (dict(ngrads=0), "ngrads"),
    (dict(damp=0.0), "damp"),
    (dict(block_size=0), "block_size"),
    (dict(recomputations=0), "recomputations"),
    (dict(masks={"fc1.weight": torch.ones(3, dtype=torch.bool)}), "masks"),
]


@pytest.mark.parametrize(("kwargs", "needle"), BAD, ids=[f"{list(k)[-1]}-{i}" for i, (k, _) in enumerate(BAD)])
def test_bad_arguments_raise_value_error(kwargs, needle):
    direct = {"sparsity": 0.5, **{k: v for k, v in kwargs.items() if k in ("sparsity", "masks")}}
    obs = {k: v for k, v in kwargs.items() if k not in direct}
    with pytest.raises(ValueError) as info:
        oneshot_prune(ConvNet(), _loss, _batches(), obs=obs, **direct)
    assert needle in str(info.value)


def test_non_scalar_loss_is_rejected():
    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        oneshot_prune(ConvNet(), loss, _batches(), 0.5, obs=dict(ngrads=2))


def test_empty_or_exhausted_batches_are_rejected():
    with pytest.raises(ValueError, match="batches yielded no batch"):
        oneshot_prune(ConvNet(), _loss, [], 0.5, obs=dict(ngrads=2))
    with pytest.raises(ValueError, match="batches yielded no batch"):
        oneshot_prune(ConvNet(), _loss, iter(_batches(2)), 0.5, obs=dict(ngrads=3))


def test_model_without_linear_or_conv_needs_params():
    with pytest.raises(ValueError, match="params=None"):
        oneshot_prune(nn.Sequential(nn.BatchNorm1d(3)), _loss, _batches(), 0.5)
