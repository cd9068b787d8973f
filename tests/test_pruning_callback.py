"""``OBSPruning`` in real ``lightning.Trainer`` runs (CPU, sklearn digits, a few seconds)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lit_models import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mfac import MFACPreconditioner
from lightning_mfac.callbacks.obs_pruning import OBSPruning
from lightning_mfac.optim.masking import MaskableWindow
from lightning_mfac.pruning import gradual_schedule, prune_count

WEIGHTS = ["net.0.weight", "net.3.weight", "net.5.weight"]


def _digits(n: int = 192) -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(data.target[:n]))


class DigitsMLP(pl.LightningModule):
    """64 → 32 (BatchNorm) → 16 → 10; every input dimension is a multiple of 4."""

    def __init__(self, optimizer: str = "sgd_momentum", lr: float = 0.05, manual: bool = False) -> None:
        super().__init__()
        self.optimizer, self.lr = optimizer, lr
        self.automatic_optimization = not manual
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
        )
        from torchmetrics.classification import MulticlassAccuracy

        self.train_acc = MulticlassAccuracy(num_classes=10)
        self.log_calls = 0
        self.steps_seen = 0

    def log(self, *args, **kwargs):
        self.log_calls += 1
        return super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.steps_seen += 1
        self.log("train/loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        if self.optimizer == "mfac":
            from lightning_mfac import MFAC

            return MFAC(self.parameters(), lr=self.lr, momentum=0.5, ngrads=32, damp=1e-3)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr / 10, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        return DataLoader(_digits(), batch_size=32)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return make_trainer(tmp_path, **{"callbacks": callbacks, "max_epochs": 4, "max_steps": -1, **kwargs})


class MaskProbe(Callback):
    """Checks after every batch that pruned weights and their optimizer state are exactly 0."""

    def __init__(self, pruning: OBSPruning) -> None:
        self.pruning = pruning
        self.checked = 0
        self.sparsity_at_epoch_start: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if self.pruning.masks is not None:
            self.sparsity_at_epoch_start[trainer.current_epoch] = _sparsity(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            p = params[name]
            assert bool((p[~mask] == 0).all()), f"{name} revived"
            for key, value in trainer.optimizers[0].state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert bool((value[~mask] == 0).all()), f"{name}: optimizer state {key} of pruned weights"
        self.checked += 1


def _sparsity(module) -> float:
    params = dict(module.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in WEIGHTS)
    return zeros / sum(params[n].numel() for n in WEIGHTS)


TOTAL = 64 * 32 + 32 * 16 + 16 * 10


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_schedule_runs_at_epoch_starts_and_pruned_weights_stay_zero(tmp_path, optimizer):
    pruning = OBSPruning(0.8, start_epoch=1, end_epoch=3, verbose=False, obs=dict(ngrads=16))
    probe = MaskProbe(pruning)
    module = DigitsMLP(optimizer)
    trainer = _trainer(tmp_path, [pruning, probe], max_epochs=5, logger=CSVLogger(str(tmp_path)))
    trainer.fit(module)

    expected = gradual_schedule(0.8, "cubic", 1, 3, 1)
    assert [(h["epoch"], h["target"]) for h in pruning.history] == expected
    for h in pruning.history:
        assert h["sparsity"] * TOTAL == prune_count(TOTAL, h["target"])
    # Pruning happens before the epoch trains: the probe (after OBSPruning) already sees it.
    for epoch, target in expected:
        assert probe.sparsity_at_epoch_start[epoch] >= prune_count(TOTAL, target) / TOTAL
    assert probe.checked == 5 * 6
    assert _sparsity(module) >= prune_count(TOTAL, 0.8) / TOTAL
    # Logged to the trainer's logger, with per-layer values.
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    logged = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert logged == pytest.approx([h["sparsity"] for h in pruning.history])
    assert any(r.get("pruning/sparsity/net.0.weight") for r in rows)
    assert all(float(r["pruning/seconds"]) > 0 for r in rows if r.get("pruning/seconds"))


def test_sampling_pass_leaves_no_trace(tmp_path):
    """No BatchNorm statistics, no metric updates and no train-mode change from the pruning
    gradients (what the sampling pass logs is checked below, in
    test_training_step_logging_on_step_is_discarded_while_sampling)."""

    class Snapshot(Callback):
        def __init__(self):
            self.states = []

        def on_train_epoch_start(self, trainer, pl_module):
            bn = {k: v.clone() for k, v in pl_module.net[1].state_dict().items()}
            acc = pl_module.train_acc
            self.states.append((bn, acc.tp.clone(), acc._update_count, pl_module.training))

    before, after = Snapshot(), Snapshot()
    pruning = OBSPruning(0.5, start_epoch=0, end_epoch=1, verbose=False, obs=dict(ngrads=8))
    module = DigitsMLP()
    trainer = _trainer(tmp_path, [before, pruning, after], max_epochs=2)
    trainer.fit(module)
    for b, a in zip(before.states, after.states, strict=True):
        for k in b[0]:
            assert torch.equal(b[0][k], a[0][k]), k
        assert torch.equal(b[1], a[1]) and b[2] == a[2] and a[3]
    # training_step ran 8 extra times per pruning step, and logged every time.
    assert module.steps_seen == 2 * 6 + 2 * 8
    assert module.log_calls == 2 * 6 + 2 * 8


def test_resume_mid_schedule_continues_exactly(tmp_path):
    def run(epochs, ckpt=None, save=None):
        pruning = OBSPruning(0.9, start_epoch=0, end_epoch=3, verbose=False, obs=dict(ngrads=8, recomputations=2))
        module = DigitsMLP()
        trainer = _trainer(tmp_path, [pruning], max_epochs=epochs)
        trainer.fit(module, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module, pruning

    full, full_cb = run(4)
    ckpt = str(tmp_path / "half.ckpt")
    _, half_cb = run(2, save=ckpt)
    assert half_cb.steps_done == 2
    resumed, resumed_cb = run(4, ckpt=ckpt)

    assert resumed_cb.steps_done == full_cb.steps_done == 4
    assert [h["epoch"] for h in resumed_cb.history] == [0, 1, 2, 3]
    for name in WEIGHTS:
        assert torch.equal(full_cb.masks[name], resumed_cb.masks[name])
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_nm_pattern_with_linear_schedule_made_permanent(tmp_path):
    pruning = OBSPruning(
        None, end_epoch=1, schedule="linear", make_permanent=True, verbose=False, obs=dict(pattern="2:4", ngrads=8)
    )
    module = DigitsMLP()
    _trainer(tmp_path, [pruning], max_epochs=3).fit(module)
    assert [h["target"] for h in pruning.history] == [0.25, 0.5]
    assert pruning.exported_to == str(tmp_path / "obs_pruning_sparse.pt")
    assert torch.load(pruning.exported_to, weights_only=True)["net.0.weight"].is_sparse
    assert pruning._handles == []
    params = dict(module.named_parameters())
    for name, mask in pruning.masks.items():
        assert bool((mask.reshape(-1, 4).sum(1) == 2).all())
        assert bool((params[name].reshape(-1, 4) != 0).sum(1).le(2).all())


def test_explicit_schedule_ngrads_schedule_magnitude_and_export(tmp_path):
    path = tmp_path / "sparse.pt"
    pruning = OBSPruning(
        None, schedule=[0.5, 0.75], frequency=2, export_path=str(path), verbose=True, obs=dict(method="magnitude")
    )
    module = DigitsMLP()
    _trainer(tmp_path, [pruning], max_epochs=3).fit(module)
    assert [(h["epoch"], h["target"]) for h in pruning.history] == [(0, 0.5), (2, 0.75)]
    assert all(h["ngrads"] == 0 for h in pruning.history)
    state = torch.load(path, weights_only=True)
    for name in WEIGHTS:
        assert state[name].is_sparse and state[name]._nnz() == int(pruning.masks[name].sum())
    assert not state["net.0.bias"].is_sparse

    sched = OBSPruning(0.6, end_epoch=2, schedule="linear", verbose=False, obs=dict(ngrads={0: 4, 0.5: 12}))
    _trainer(tmp_path, [sched], max_epochs=3).fit(DigitsMLP())
    assert [h["target"] for h in sched.history] == pytest.approx([0.2, 0.4, 0.6])
    assert [h["ngrads"] for h in sched.history] == [4, 4, 12]


def test_works_with_mfac_preconditioner(tmp_path):
    class Spy(MFACPreconditioner):
        calls = 0

        def apply_masks(self, masks):
            Spy.calls += 1
            # The MaskableWindow protocol: keep-masks keyed by the parameter tensors themselves.
            params = dict(self._module.named_parameters())
            assert {id(p) for p in masks} == {id(params[n]) for n in WEIGHTS}
            super().apply_masks(masks)

        def on_fit_start(self, trainer, pl_module):
            self._module = pl_module
            super().on_fit_start(trainer, pl_module)

    pruning = OBSPruning(0.7, start_epoch=1, end_epoch=2, verbose=False, obs=dict(ngrads=8))
    probe = MaskProbe(pruning)
    # The preconditioner first: the worst order for OBSPruning's gradient zeroing.
    # A window longer than the run after the last pruning step, so it still holds old gradients.
    pre = Spy(ngrads=32, damp=1e-3, log_stats=False)
    assert isinstance(pre, MaskableWindow)
    module = DigitsMLP(lr=0.001)
    _trainer(tmp_path, [pre, pruning, probe], max_epochs=3).fit(module)
    assert Spy.calls == 2
    assert probe.checked == 3 * 6
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    # The window's columns follow named_parameters() order (all parameters are trainable here).
    window = next(iter(pre._pre.values())).fisher.window.to_dense()
    columns = torch.split(window, [p.numel() for p in module.parameters()], dim=1)
    by_name = dict(zip([n for n, _ in module.named_parameters()], columns, strict=True))
    for name in WEIGHTS:
        stale = by_name[name][:, ~pruning.masks[name].reshape(-1)]
        assert bool((stale == 0).all()), f"the M-FAC window still carries pruned coordinates of {name}"


def test_works_with_the_mfac_optimizer(tmp_path):
    pruning = OBSPruning(0.7, start_epoch=1, end_epoch=2, verbose=False, obs=dict(ngrads=8))
    probe = MaskProbe(pruning)
    module = DigitsMLP(optimizer="mfac", lr=0.001)
    trainer = _trainer(tmp_path, [pruning, probe], max_epochs=3)
    trainer.fit(module)
    assert probe.checked == 3 * 6
    optimizer = trainer.optimizers[0]
    window = optimizer._pre.fisher.window.to_dense()
    columns = torch.split(window, [p.numel() for p in module.parameters()], dim=1)
    by_name = dict(zip([n for n, _ in module.named_parameters()], columns, strict=True))
    for name, p in module.named_parameters():
        if name in WEIGHTS:
            pruned = ~pruning.masks[name]
            assert bool((by_name[name][:, pruned.reshape(-1)] == 0).all())
            assert bool((optimizer.state[p]["momentum_buffer"][pruned] == 0).all())


def test_manual_optimization_needs_loss_fn(tmp_path):
    with pytest.raises(ValueError, match="loss_fn=None is invalid with manual optimization"):
        _trainer(tmp_path, [OBSPruning(0.5)], max_epochs=1).fit(DigitsMLP(manual=True))

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module.net(batch[0]), batch[1])

    pruning = OBSPruning(0.5, loss_fn=loss_fn, verbose=False, obs=dict(ngrads=4))
    module = DigitsMLP(manual=True)
    _trainer(tmp_path, [pruning], max_epochs=2).fit(module)
    assert _sparsity(module) >= prune_count(TOTAL, 0.5) / TOTAL


def test_setup_rejects_bad_selection(tmp_path):
    with pytest.raises(ValueError, match="params entry 're:conv.*'"):
        _trainer(tmp_path, [OBSPruning(0.5, obs=dict(params=["re:conv.*"]))], max_epochs=1).fit(DigitsMLP())
    with pytest.raises(ValueError, match="multiple of 3"):
        _trainer(tmp_path, [OBSPruning(None, obs=dict(pattern="1:3"))], max_epochs=1).fit(DigitsMLP())


def test_non_scalar_training_loss_is_rejected(tmp_path):
    class VectorLoss(DigitsMLP):
        def training_step(self, batch, batch_idx):
            return {"loss": nn.functional.cross_entropy(self.net(batch[0]), batch[1], reduction="none")}

    with pytest.raises(ValueError, match="training_step must return a scalar"):
        _trainer(tmp_path, [OBSPruning(0.5, obs=dict(ngrads=2))], max_epochs=1).fit(VectorLoss())


def test_reused_callback_gives_the_second_model_what_a_fresh_one_gives(tmp_path):
    def run(module, pruning):
        _trainer(tmp_path, [pruning], max_epochs=2).fit(module)
        return module

    reused = OBSPruning(0.6, start_epoch=0, end_epoch=1, obs=dict(ngrads=8), verbose=False)
    run(DigitsMLP(), reused)
    first_masks = {n: m.clone() for n, m in reused.masks.items()}

    class Other(DigitsMLP):  # same names and shapes, other weights: the old masks would fit it
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            for p in self.parameters():
                torch.nn.init.normal_(p, std=0.3)

    second = run(Other(), reused)
    fresh_cb = OBSPruning(0.6, start_epoch=0, end_epoch=1, obs=dict(ngrads=8), verbose=False)
    fresh = run(Other(), fresh_cb)
    assert len(reused.history) == len(fresh_cb.history) == 2
    for name in WEIGHTS:
        assert torch.equal(reused.masks[name], fresh_cb.masks[name])
    assert any(not torch.equal(first_masks[n], reused.masks[n]) for n in WEIGHTS)
    for (name, a), b in zip(second.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_training_step_logging_on_step_is_discarded_while_sampling(tmp_path):
    """A training_step that logs with on_step=True (not allowed from on_train_epoch_start) runs
    in the sampling pass, and none of what it logs there reaches the logger."""

    class StepLogger(DigitsMLP):
        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train/step_loss", loss, on_step=True, on_epoch=True)
            return loss

    pruning = OBSPruning(0.5, start_epoch=0, end_epoch=1, obs=dict(ngrads=8), verbose=False)
    trainer = _trainer(tmp_path, [pruning], max_epochs=2, logger=CSVLogger(str(tmp_path)), log_every_n_steps=1)
    trainer.fit(StepLogger())
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    steps = [r for r in rows if r.get("train/step_loss_step")]
    assert len(steps) == 2 * 6  # the real training steps only
    assert len([r for r in rows if r.get("train/step_loss_epoch")]) == 2


@pytest.mark.parametrize("block_size", [None, 16])
def test_kernels_choice_reaches_pruning(tmp_path, block_size):
    masks = {}
    for kernels in ("auto", "torch"):
        pruning = OBSPruning(
            0.7, start_epoch=0, end_epoch=1,
            obs=dict(ngrads=8, block_size=block_size, window={"kernels": kernels}), verbose=False,
        )
        module = DigitsMLP()
        _trainer(tmp_path, [pruning], max_epochs=2).fit(module)
        assert pruning.obs.window.kernels == kernels
        masks[kernels] = (pruning.masks, [p.detach().clone() for p in module.parameters()])
    for name in WEIGHTS:
        assert torch.equal(masks["auto"][0][name], masks["torch"][0][name])
    for a, b in zip(masks["auto"][1], masks["torch"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_strategy_is_refused_at_setup():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="OBSPruning does not support strategy FSDPStrategy"):
        OBSPruning(0.5).setup(SimpleNamespace(strategy=FSDPStrategy()), DigitsMLP(), "fit")
