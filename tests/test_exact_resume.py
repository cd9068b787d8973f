"""A single-process run resumed from a checkpoint trains exactly as the uninterrupted run.

Real Trainer runs on CPU with the digits data module: the resumed parameters must be bit-identical
to the uninterrupted run's, for checkpoints at epoch boundaries and in the middle of an epoch.
Then the sampler's own guarantees, and the DDP train loader, whose order stays Lightning's.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lit_models import quiet_trainer
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from lightning_mfac import MFAC
from lightning_mfac.app.data import DigitsDataModule
from lightning_mfac.app.data.sampling import EpochShuffleSampler, ResumableDataLoader
from lightning_mfac.app.models import quickstart_cnn
from lightning_mfac.app.tasks import ImageClassifier

NOT_RESUMABLE = "dataloader is not resumable"

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "mfac": functools.partial(MFAC, lr=0.05, ngrads=4, damp=1e-2),
}


def fit(
    root: Path,
    *,
    epochs: int = 3,
    ckpt_path: str | None = None,
    checkpoint: ModelCheckpoint | None = None,
    optimizer: str = "sgd",
    batch_size: int = 16,
    num_workers: int = 0,
    **trainer_kwargs,
) -> list[torch.Tensor]:
    """Parameters after ``epochs`` epochs of a fresh task, data module and Trainer."""
    torch.manual_seed(0)  # the same initial weights in every run
    dm = DigitsDataModule(batch_size=batch_size, num_workers=num_workers, seed=1)
    task = ImageClassifier(
        quickstart_cnn(num_classes=dm.num_classes, in_channels=dm.in_channels, width=4),
        optimizer=OPTIMIZERS[optimizer],
    )
    options = dict(limit_train_batches=5, limit_val_batches=0, num_sanity_val_steps=0)
    trainer = quiet_trainer(
        max_epochs=epochs,
        enable_checkpointing=checkpoint is not None,
        callbacks=[checkpoint] if checkpoint is not None else [],
        default_root_dir=str(root),
        **{**options, **trainer_kwargs},
    )
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return [p.detach().clone() for p in task.parameters()]


def interrupted_and_resumed(
    tmp_path: Path, checkpoint_options: dict, resume_from: str, **kwargs
) -> list[torch.Tensor]:
    """Run with checkpoints, then resume a fresh run from the checkpoint named ``resume_from``."""
    folder = tmp_path / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=folder, filename="{epoch}-{step}", save_top_k=-1, **checkpoint_options
    )
    fit(tmp_path / "interrupted", checkpoint=checkpoint, **kwargs)
    ckpt = folder / f"{resume_from}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in folder.iterdir())
    return fit(tmp_path / "resumed", ckpt_path=str(ckpt), **kwargs)


def assert_bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


# ---------------------------------------------------------------- resumed runs


@pytest.mark.parametrize("optimizer", ["sgd", "mfac"])
@pytest.mark.parametrize("limit_val_batches", [0, 2], ids=["no-val", "val"])
def test_resume_at_an_epoch_boundary_is_exact(tmp_path, optimizer, limit_val_batches):
    # 5 batches an epoch: the checkpoint after epoch 0 is at step 5. The old loader re-seeded its
    # shuffling generator on every build, so the resumed epoch 1 replayed epoch 0's order.
    kwargs = dict(optimizer=optimizer, limit_val_batches=limit_val_batches)
    uninterrupted = fit(tmp_path / "uninterrupted", **kwargs)
    resumed = interrupted_and_resumed(tmp_path, dict(every_n_epochs=1), "epoch=0-step=5", **kwargs)
    assert_bit_identical(uninterrupted, resumed)


@pytest.mark.parametrize(
    ("checkpoint_options", "resume_from", "kwargs"),
    [
        # Step 8 is the 3rd of epoch 1's 5 batches.
        pytest.param(dict(every_n_train_steps=2), "epoch=1-step=8", {}, id="mid-epoch"),
        pytest.param(
            dict(every_n_train_steps=2), "epoch=1-step=8", dict(optimizer="mfac"), id="mid-epoch-mfac"
        ),
        pytest.param(
            dict(every_n_train_steps=2),
            "epoch=1-step=8",
            dict(limit_val_batches=2),
            id="mid-epoch-with-validation",
        ),
        # A worker process draws indices as soon as the loader's iterator exists, which on resume is
        # before Lightning's set_epoch: the data module must have placed the sampler already.
        pytest.param(
            dict(every_n_train_steps=2), "epoch=1-step=8", dict(num_workers=1), id="mid-epoch-worker-process"
        ),
        # 6 batches, 2 per step: step 4 is after the first 2 batches of epoch 1.
        pytest.param(
            dict(every_n_train_steps=1),
            "epoch=1-step=4",
            dict(accumulate_grad_batches=2, limit_train_batches=6),
            id="accumulated-gradients",
        ),
        # The whole training split: 1257 samples make 39 full batches of 32 and one of 9.
        pytest.param(
            dict(every_n_train_steps=30),
            "epoch=0-step=30",
            dict(limit_train_batches=1.0, batch_size=32, epochs=2),
            id="whole-epoch-short-last-batch",
        ),
        # Saved in on_validation_end of a validation inside the epoch.
        pytest.param(
            dict(save_on_train_epoch_end=False),
            "epoch=0-step=2",
            dict(limit_val_batches=2, val_check_interval=2),
            id="mid-epoch-validation",
        ),
        # Saved after the epoch's last batch but before the epoch closed: the resumed run goes on
        # with epoch 1, not with the rest of epoch 0 nor a replay of it.
        pytest.param(dict(every_n_train_steps=5), "epoch=0-step=5", {}, id="on-the-last-batch"),
    ],
)
def test_resume_mid_epoch_continues_the_epoch_exactly(tmp_path, checkpoint_options, resume_from, kwargs):
    uninterrupted = fit(tmp_path / "uninterrupted", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = interrupted_and_resumed(tmp_path, checkpoint_options, resume_from, **kwargs)
    assert_bit_identical(uninterrupted, resumed)
    # The loader is resumable, so Lightning does not warn that the resumed run is unreliable.
    assert not [w for w in caught if NOT_RESUMABLE in str(w.message)]


def test_mid_epoch_resume_with_another_batch_size_warns(tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=folder, filename="{epoch}-{step}", save_top_k=-1, every_n_train_steps=2
    )
    fit(tmp_path / "interrupted", epochs=1, checkpoint=checkpoint)
    with pytest.warns(UserWarning, match=r"batch_size 16 -> 8"):
        fit(tmp_path / "resumed", epochs=1, batch_size=8, ckpt_path=str(folder / "epoch=0-step=2.ckpt"))


def test_the_train_loader_starts_where_each_checkpoint_left_off(tmp_path):
    # A checkpoint after every step of 2 epochs of 5 batches; step 5 is saved after epoch 0's last
    # batch, before the epoch closed, so its run goes on with epoch 1 from the start.
    folder = tmp_path / "checkpoints"
    fit(
        tmp_path / "run",
        epochs=2,
        checkpoint=ModelCheckpoint(dirpath=folder, filename="{step}", save_top_k=-1, every_n_train_steps=1),
    )
    dm = DigitsDataModule(batch_size=16, seed=1)
    dm.setup("fit")
    for step in range(1, 11):
        dm.trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        loops = torch.load(folder / f"step={step}.ckpt", weights_only=True)["loops"]
        dm.trainer.fit_loop.load_state_dict(loops["fit_loop"])  # as Trainer.fit(ckpt_path=...) does
        sampler = dm.train_dataloader().sampler
        assert (sampler.epoch, sampler.pending_skip) == (step // 5, step % 5 * 16), step
    # Under DDP the distributed sampler cannot continue the epoch: said so.
    dm.trainer = quiet_trainer(devices=2, strategy="ddp")
    dm.trainer.fit_loop.load_state_dict(
        torch.load(folder / "step=8.ckpt", weights_only=True)["loops"]["fit_loop"]
    )
    with pytest.warns(PossibleUserWarning, match="middle of epoch 1 under DDP"):
        dm.train_dataloader()


def test_a_changed_order_warns_only_when_resuming_mid_epoch(recwarn):
    dm = DigitsDataModule(batch_size=16, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    from_ddp = {**loader.state_dict(), "sampler": "DistributedSampler", "seed": 0}
    loader.load_state_dict(from_ddp)  # an epoch boundary: the order of the next epoch is the same
    assert not recwarn.list
    loader.sampler.resume_at(2, 32)
    with pytest.warns(UserWarning, match=r"sampler DistributedSampler -> EpochShuffleSampler, seed 0 -> 1"):
        loader.load_state_dict(from_ddp)


# ---------------------------------------------------------------- the sampler


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(50)) and len(sampler) == 50
        assert list(sampler) == order  # iterating again (e.g. a pruning callback) changes nothing
        orders.append(order)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    # Another sampler with the same seed, asked for epoch 1 first, agrees; another seed does not.
    again = EpochShuffleSampler(50, seed=3)
    again.set_epoch(1)
    assert list(again) == orders[1]
    other = EpochShuffleSampler(50, seed=4)
    other.set_epoch(1)
    assert list(other) != orders[1]
    # The order does not depend on the global RNG.
    torch.manual_seed(123)
    assert sampler.permutation(0).tolist() == orders[0]


def test_a_skip_applies_to_one_iteration_of_its_epoch():
    sampler = EpochShuffleSampler(20, seed=0)
    full = sampler.permutation(2).tolist()
    sampler.resume_at(2, 7)
    sampler.set_epoch(2)  # Lightning's call at the start of the resumed epoch keeps the skip
    assert sampler.pending_skip == 7 and len(sampler) == 20
    assert list(sampler) == full[7:]
    assert list(sampler) == full and sampler.pending_skip == 0
    # A skip meant for one epoch is dropped when another epoch starts.
    sampler.resume_at(2, 7)
    sampler.set_epoch(3)
    assert list(sampler) == sampler.permutation(3).tolist()
    with pytest.raises(ValueError, match="cannot skip 21 of 20"):
        sampler.resume_at(0, 21)


# ---------------------------------------------------------------- the loaders


def test_single_process_train_loader_is_resumable_with_batches_of_the_epoch_order():
    dm = DigitsDataModule(batch_size=50, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochShuffleSampler)
    first = loader.sampler.permutation(0)[:50]
    torch.testing.assert_close(next(iter(loader))[1], dm.train_set.tensors[1][first], rtol=0, atol=0)
    state = {"sampler": "EpochShuffleSampler", "seed": 3, "batch_size": 50, "num_samples": len(dm.train_set)}
    assert loader.state_dict() == state
    # The evaluation loaders keep the data order.
    val_x, _ = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(val_x, dm.val_set.tensors[0][:50], rtol=0, atol=0)


def test_ddp_train_loader_keeps_the_distributed_order():
    dm = DigitsDataModule(batch_size=10, seed=3)
    dm.setup("fit")
    # A DDP Trainer that is never fitted: only its world size is read.
    dm.trainer = quiet_trainer(devices=2, strategy="ddp")
    assert dm.trainer.world_size == 2
    loader = dm.train_dataloader()
    # A RandomSampler, which Lightning replaces by a DistributedSampler (a sampler of our own would
    # be wrapped instead, giving another order); rebuilt as Lightning does, the loader keeps its class.
    assert isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=1, shuffle=True, seed=0)
    rebuilt = _update_dataloader(loader, sampler)
    assert isinstance(rebuilt, ResumableDataLoader) and rebuilt.sampler is sampler
    plain = DataLoader(dm.train_set, batch_size=10, sampler=sampler)
    for (x, y), (px, py) in zip(rebuilt, plain, strict=True):
        assert torch.equal(x, px) and torch.equal(y, py)
