"""Random inputs for benchmarks: fixed-seed tensors, no disk or decoding cost."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from lightning_mfac.app.data.base import BaseDataModule

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(BaseDataModule):
    """Gaussian images with labels from a fixed random linear "teacher".

    Labels are a function of the input, so the task is learnable and accuracies in benchmark
    tables mean something. All samples are materialised: memory is
    ``(num_samples + 2 * num_eval_samples) * prod(input_shape) * 4`` bytes.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        num_samples: int = 1024,
        num_eval_samples: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.input_shape = tuple(int(s) for s in input_shape)  # Hydra passes a ListConfig
        self.in_channels = self.input_shape[0]
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.num_eval_samples = (
            int(num_eval_samples) if num_eval_samples is not None else max(1, self.num_samples // 4)
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        dim = 1
        for s in self.input_shape:
            dim *= s
        teacher = torch.randn(dim, self.num_classes, generator=gen)

        def make(n: int) -> TensorDataset:
            x = torch.randn(n, *self.input_shape, generator=gen)
            return TensorDataset(x, (x.view(n, -1) @ teacher).argmax(1))

        self.train_set = make(self.num_samples)
        self.val_set = make(self.num_eval_samples)
        self.test_set = make(self.num_eval_samples)
