"""An offline language-modelling corpus: the English help texts in ``pydoc_data.topics``.

The Python standard library ships them (about 465 KB), so a real-text LM run needs no
download. The text is split contiguously (train first, then val, then test) so that no
passage leaks between splits, and cut into non-overlapping ``seq_len``-token chunks.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lightning_mfac.app.data.base import BaseDataModule

__all__ = ["TextCorpusDataModule", "load_pydoc_corpus"]


def load_pydoc_corpus() -> str:
    from pydoc_data.topics import topics

    # Sorted by topic name: a fixed order whatever the dict order of the Python version.
    return "\n\n".join(topics[k] for k in sorted(topics))


class _Chunks(Dataset):
    def __init__(self, tokens: torch.Tensor, seq_len: int):
        n = len(tokens) // seq_len
        self.chunks = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i]}


class TextCorpusDataModule(BaseDataModule):
    """Batches ``{"input_ids": LongTensor(batch, seq_len)}`` of byte- or character-level tokens.

    ``tokenization="byte"`` uses the UTF-8 bytes (``vocab_size`` 256); ``"char"`` uses the
    distinct characters of the corpus (``vocab_size`` about 100). ``text`` replaces the default
    corpus.
    """

    def __init__(
        self,
        seq_len: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        tokenization: str = "byte",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        text: str | None = None,
    ):
        super().__init__(batch_size, num_workers, seed)
        if tokenization not in ("byte", "char"):
            raise ValueError(f"tokenization must be 'byte' or 'char', got {tokenization!r}")
        self.seq_len = int(seq_len)
        self.tokenization = tokenization
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.text = text if text is not None else load_pydoc_corpus()
        if tokenization == "byte":
            self.chars: list[str] | None = None
            self.vocab_size = 256
        else:
            self.chars = sorted(set(self.text))
            self.vocab_size = len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        if self.chars is None:
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        if self.chars is None:
            return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids.tolist())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokens = self.encode(self.text)
        n = len(tokens)
        n_test, n_val = int(n * self.test_fraction), int(n * self.val_fraction)
        n_train = n - n_val - n_test
        if min(n_train, n_val, n_test) < self.seq_len:
            raise ValueError(f"a {n}-token corpus is too short for seq_len={self.seq_len} in every split")
        self.train_set = _Chunks(tokens[:n_train], self.seq_len)
        self.val_set = _Chunks(tokens[n_train : n_train + n_val], self.seq_len)
        self.test_set = _Chunks(tokens[n_train + n_val :], self.seq_len)
