"""A training order that a resumed run can continue exactly, also in the middle of an epoch."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochShuffleSampler", "ResumableDataLoader"]


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(num_samples)`` anew in each epoch, as a pure function of ``(seed, epoch)``.

    Guarantees:

    * the order of epoch ``e`` depends only on ``seed``, ``num_samples`` and ``e``: not on the
      global RNG, nor on how many times the sampler was iterated before (a pruning callback that
      draws batches of its own does not shift the training order), so a run resumed from a
      checkpoint draws the very order an uninterrupted run draws;
    * each epoch's order is a permutation of ``range(num_samples)``;
    * :meth:`resume_at` makes the next iteration, and only that one, leave out the samples an
      interrupted run had already trained on in that epoch.

    ``set_epoch`` is the hook Lightning calls at each epoch start (as for ``DistributedSampler``).
    """

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    @property
    def pending_skip(self) -> int:
        """How many leading samples of the epoch's order the next iteration leaves out."""
        return self._skip

    def set_epoch(self, epoch: int) -> None:
        # A skip is a position inside one epoch: it means nothing for another.
        if int(epoch) != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, consumed: int) -> None:
        """The next iteration yields ``epoch``'s order without its first ``consumed`` samples."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"cannot skip {consumed} of {self.num_samples} samples")
        self.epoch = int(epoch)
        self._skip = int(consumed)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of ``epoch`` (default: the current one), whole."""
        epoch = self.epoch if epoch is None else int(epoch)
        # SeedSequence mixes (seed, epoch) into well-separated generator seeds; seed + epoch would
        # give seed 0 / epoch 1 the same order as seed 1 / epoch 0. It takes non-negative entropy.
        state = np.random.SeedSequence([self.seed % 2**64, epoch % 2**64]).generate_state(1, np.uint64)[0]
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(int(state)))

    def __iter__(self) -> Iterator[int]:
        # The skip is taken here, when the iteration starts, so that it belongs to exactly one.
        skip, self._skip = self._skip, 0
        return iter(self.permutation()[skip:].tolist())

    def __len__(self) -> int:
        # The whole epoch even while a skip is pending: Lightning sizes the epoch (and counts the
        # batches already done against it) from len(loader).
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning treats as resumable mid-epoch.

    Lightning decides that from the presence of ``state_dict``/``load_state_dict`` (otherwise it
    warns on every mid-epoch resume). The position is not kept here: the data module reads it
    from the trainer's restored loop progress, which counts trained batches exactly, whereas a
    count of yielded batches would include what the fetcher or the workers prefetched. The state
    records what that position means in samples (sampler, seed, batch size, data set size), so
    that a mid-epoch resume whose skipped samples would not be the ones already trained on warns.

    It has no ``__init__`` of its own, so Lightning can rebuild it with another sampler (a
    ``DistributedSampler`` under DDP) as it does a plain ``DataLoader``.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": type(self.sampler).__name__,
            "seed": getattr(self.sampler, "seed", None),
            "batch_size": self.batch_size,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only a pending skip can land on the wrong samples; at an epoch boundary a changed setting
        # is the user's new run, not a misplaced continuation.
        resuming_mid_epoch = isinstance(self.sampler, EpochShuffleSampler) and self.sampler.pending_skip > 0
        now = self.state_dict()
        changed = {
            key: (state_dict[key], now[key])
            for key in now
            if key in state_dict and state_dict[key] != now[key]
        }
        if resuming_mid_epoch and changed:
            details = ", ".join(f"{key} {was} -> {is_}" for key, (was, is_) in changed.items())
            warnings.warn(
                f"Resuming mid-epoch with another training loader than the checkpoint's ({details}): the rest "
                "of the interrupted epoch is not the samples it had left. Resume from an end-of-epoch "
                "checkpoint, or with the checkpoint's settings, for an exact continuation.",
                stacklevel=2,
            )
