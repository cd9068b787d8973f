"""GLUE sentence(-pair) classification through the ``datasets`` library.

Offline use: save a task once with ``load_dataset("nyu-mll/glue", "sst2").save_to_disk(path)``
and pass ``data_dir=path``. Without a ``tokenizer_name`` the module builds a word-level
tokenizer from the training split (``WordTokenizer``), so nothing is fetched from the hub;
pair it with a randomly initialised model (``bert_classifier(pretrained_name=None,
vocab_size=dm.vocab_size)``). A pretrained model needs its own tokenizer (``tokenizer_name``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lightning_mfac.app.data.base import BaseDataModule

__all__ = ["GLUEDataModule", "WordTokenizer"]

# task -> (text columns, number of labels). STS-B is left out: it is a regression task.
GLUE_TASKS: dict[str, tuple[tuple[str, ...], int]] = {
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "mnli": (("premise", "hypothesis"), 3),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
}

_WORD_RE = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Lower-cased word/punctuation tokenizer with a vocabulary built from a corpus.

    Encodes like BERT, ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with token type ids, so
    batches have the same keys whichever tokenizer made them. Unknown words map to ``[UNK]``.
    """

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
    pad_token_id, unk_token_id, cls_token_id, sep_token_id = range(4)

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(self.specials) + [w for w in vocab if w not in self.specials]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], max_vocab_size: int = 30000, min_freq: int = 1
    ) -> WordTokenizer:
        counts = Counter(w for t in texts for w in _WORD_RE.findall(t.lower()))
        # Ties broken alphabetically so the same data always gives the same ids.
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(words[: max(0, max_vocab_size - len(cls.specials))])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in _WORD_RE.findall(text.lower())]

    def __call__(
        self,
        text: list[str],
        text_pair: list[str] | None = None,
        truncation: bool = True,
        max_length: int = 128,
    ) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        pairs = text_pair if text_pair is not None else [None] * len(text)
        for a_text, b_text in zip(text, pairs, strict=True):
            a = self.encode(a_text)
            b = self.encode(b_text) if b_text is not None else None
            budget = max_length - (3 if b is not None else 2)
            if truncation and b is not None:
                # Trim the longer segment first, as Hugging Face's "longest_first" does.
                while len(a) + len(b) > budget:
                    (a if len(a) >= len(b) else b).pop()
            elif truncation:
                a = a[:budget]
            ids = [self.cls_token_id, *a, self.sep_token_id]
            types = [0] * len(ids)
            if b is not None:
                ids += [*b, self.sep_token_id]
                types += [1] * (len(b) + 1)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["token_type_ids"].append(types)
        return out


class _PadCollate:
    """Pads each batch to its longest sequence (cheaper than padding everything to max_length)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in rows[0]:
                continue
            pad = self.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([list(r[key]) + [pad] * (length - len(r[key])) for r in rows])
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return batch


class GLUEDataModule(BaseDataModule):
    """A GLUE classification task; batches are dicts ``input_ids``, ``attention_mask``, ``labels``
    (plus ``token_type_ids``).

    Splits: ``train``, ``validation`` (``validation_matched`` for MNLI), and ``test`` when its
    labels are present; GLUE's public test sets are unlabelled (label -1), so the test split is
    then the validation split.
    """

    def __init__(
        self,
        task_name: str = "sst2",
        tokenizer_name: str | None = None,
        data_dir: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        max_vocab_size: int = 30000,
        hub_name: str = "nyu-mll/glue",
    ):
        super().__init__(batch_size, num_workers, seed)
        if task_name not in GLUE_TASKS:
            raise ValueError(f"unsupported GLUE task {task_name!r}; choose from {sorted(GLUE_TASKS)}")
        self.task_name = task_name
        self.tokenizer_name = tokenizer_name
        self.data_dir = data_dir
        self.max_length = int(max_length)
        self.max_vocab_size = int(max_vocab_size)
        self.hub_name = hub_name
        self.text_columns, self.num_labels = GLUE_TASKS[task_name]
        self.num_classes = self.num_labels
        self._raw = None
        self._tokenizer = None

    def _load_raw(self):
        if self._raw is None:
            import datasets

            if self.data_dir is not None:
                raw = datasets.load_from_disk(str(self.data_dir))
                if not isinstance(raw, datasets.DatasetDict):
                    raise ValueError(
                        f"{self.data_dir} holds a single Dataset; expected a DatasetDict with splits"
                    )
            else:
                raw = datasets.load_dataset(self.hub_name, self.task_name)
            if "train" not in raw:
                raise ValueError(f"GLUE data for {self.task_name!r} has no 'train' split (found {list(raw)})")
            self._raw = raw
        return self._raw

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                train = self._load_raw()["train"]
                texts = (t for col in self.text_columns for t in train[col])
                self._tokenizer = WordTokenizer.from_texts(texts, self.max_vocab_size)
            else:
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
                except OSError as err:
                    raise RuntimeError(
                        f"could not load tokenizer {self.tokenizer_name!r} ({err}). Offline, pass a local "
                        "directory written by save_pretrained(), or tokenizer_name=None for the "
                        "word-level tokenizer built from the data."
                    ) from err
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def prepare_data(self) -> None:
        if self.data_dir is None:
            import datasets

            datasets.load_dataset(self.hub_name, self.task_name)  # download into the cache once
        if self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.tokenizer_name)

    def _tokenize(self, split):
        tokenizer = self.tokenizer

        def encode(rows):
            columns = [rows[c] for c in self.text_columns]
            return tokenizer(*columns, truncation=True, max_length=self.max_length)

        # An explicit fingerprint spares `datasets` from hashing the tokenizer, and keep_in_memory
        # keeps it from writing cache files next to the user's data.
        fingerprint = hashlib.sha256(
            f"{split._fingerprint}-{self.tokenizer_name}-{len(tokenizer)}-{self.max_length}".encode()
        ).hexdigest()[:16]
        keep = {"input_ids", "attention_mask", "token_type_ids", "label"}
        return split.map(
            encode,
            batched=True,
            remove_columns=[c for c in split.column_names if c not in keep],
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=fingerprint,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        raw = self._load_raw()
        val_name = next((n for n in ("validation", "validation_matched") if n in raw), None)
        if val_name is None:
            raise ValueError(f"GLUE data for {self.task_name!r} has no validation split (found {list(raw)})")
        self.train_set = self._tokenize(raw["train"])
        self.val_set = self._tokenize(raw[val_name])
        test = raw["test"] if "test" in raw else None
        labelled = test is not None and len(test) > 0 and min(test["label"]) >= 0
        self.test_set = self._tokenize(test) if labelled else self.val_set
        self.collate_fn = _PadCollate(self.tokenizer.pad_token_id)
