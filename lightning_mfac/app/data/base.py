"""Shared plumbing of the data modules: seeded loaders over train/val/test datasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset

from lightning_mfac.app.data.sampling import EpochShuffleSampler, ResumableDataLoader

__all__ = ["BaseDataModule"]


class BaseDataModule(pl.LightningDataModule):
    """Subclasses fill ``train_set``/``val_set``/``test_set`` in ``setup``.

    The training order is seeded by ``seed`` and, in a single-process run, a function of the epoch
    alone: a run resumed from a checkpoint, at an epoch boundary or in the middle of an epoch,
    trains on the batches an uninterrupted run trains on, in the same order. Under DDP the order
    is Lightning's ``DistributedSampler``'s (exact at epoch boundaries only).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, pin_memory: bool = False):
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.collate_fn: Callable[[list], Any] | None = None

    def _split(self, dataset: Dataset | None, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created the {stage} split")
        return dataset

    def _loader(
        self, dataset: Dataset, loader_cls: type[DataLoader] = DataLoader, **order: Any
    ) -> DataLoader:
        return loader_cls(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            drop_last=False,
            **order,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._split(self.train_set, "train")
        trainer = self.trainer
        epoch, batches_done = _resume_point(trainer) if trainer is not None else (0, 0)
        if trainer is not None and trainer.world_size > 1:
            # Lightning swaps the RandomSampler for a DistributedSampler (set_epoch: exact at epoch
            # boundaries); a sampler of our own would be wrapped instead, changing DDP's order.
            if batches_done:
                rank_zero_warn(
                    f"Resuming in the middle of epoch {epoch} under DDP: the distributed sampler starts the "
                    "epoch's order again, so the resumed run does not continue the interrupted one exactly. "
                    "Resume from an end-of-epoch checkpoint for an exact continuation.",
                    category=PossibleUserWarning,
                )
            generator = torch.Generator().manual_seed(self.seed)
            return self._loader(dataset, ResumableDataLoader, shuffle=True, generator=generator)
        sampler = EpochShuffleSampler(len(dataset), self.seed)
        # Set here, not only by Lightning's set_epoch at the epoch start: with worker processes the
        # loader draws its first indices when its iterator is created, which on resume comes first.
        sampler.resume_at(epoch, batches_done * self.batch_size)
        return self._loader(dataset, ResumableDataLoader, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split(self.val_set, "val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split(self.test_set, "test"))


def _resume_point(trainer: pl.Trainer) -> tuple[int, int]:
    """The epoch the fit loop is about to run and how many of its batches were already trained on.

    Read off the loop progress as restored from a checkpoint (before the loops adjust it at their
    start), by the rules FitLoop.reset and TrainingEpochLoop.reset apply; a run that is not
    resuming gives ``(current epoch, 0)``.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress
    epoch = epochs.current.processed  # what FitLoop passes to set_epoch
    started_not_processed = epochs.total.ready == epochs.total.started == epochs.total.processed + 1
    if not started_not_processed:
        return epoch, 0  # saved between two epochs
    batches = fit_loop.epoch_loop.batch_progress
    if batches.is_last_batch:
        # Saved after the epoch's last batch (e.g. at its closing validation): the loop moves on.
        return epoch + 1, 0
    total = batches.total
    done = batches.current.completed
    if total.ready == total.started == total.processed == total.completed + 1:
        # Saved in on_train_batch_end (ModelCheckpoint(every_n_train_steps)): that batch is
        # trained on, and the loop counts it as completed when it restarts.
        done += 1
    return epoch, done


def split_indices(n: int, holdout_sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """A seeded random partition of ``range(n)`` into the rest followed by parts of the given sizes."""
    sizes = [int(s) for s in holdout_sizes]
    rest = n - sum(sizes)
    if rest <= 0 or min(sizes, default=0) < 0:
        raise ValueError(f"cannot hold out {sizes} of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, [rest, *sizes]))


class TransformedSubset(Dataset):
    """``indices`` of an ``(image, label)`` dataset with its own image transform.

    Lets a training split (augmented) and a validation split (not augmented) share one loaded
    copy of the underlying data.
    """

    def __init__(self, dataset: Dataset, indices: torch.Tensor | list[int], transform: Callable | None):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.indices[i]]
        return (self.transform(image) if self.transform is not None else image), label
