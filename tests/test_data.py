"""Data modules on small files written in each data set's real on-disk format (no network)."""

from __future__ import annotations

import inspect
import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mfac.app.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    GLUEDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    TextCorpusDataModule,
    WordTokenizer,
)
from lightning_mfac.app.data.cifar import CIFAR10_MEAN, CIFAR10_STD

# ---------------------------------------------------------------- digits


def test_digits_splits_shapes_and_determinism():
    dm = DigitsDataModule(batch_size=50, seed=3)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 270
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, *dm.input_shape) == (50, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and y.max() < dm.num_classes
    # Same seed, same split and same shuffling order; another seed, another split.
    again = DigitsDataModule(batch_size=50, seed=3)
    again.setup("fit")
    torch.testing.assert_close(next(iter(again.train_dataloader()))[0], x)
    other = DigitsDataModule(batch_size=50, seed=4)
    other.setup("fit")
    assert not torch.equal(other.val_set.tensors[1], dm.val_set.tensors[1])


# ---------------------------------------------------------------- CIFAR-10


class _Py2Str(str):
    """A string pickled as Python 2 ``str`` (opcode SHORT_BINSTRING), as in the real CIFAR files."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj):
        data = obj.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + struct.pack("<B", len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _dump_py2(obj, path):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_batch(images: np.ndarray, labels: list[int], name: str) -> dict:
    # Rows hold the 1024 red, then green, then blue values of a 32x32 image in row-major order.
    return {
        _Py2Str("batch_label"): _Py2Str(name),
        _Py2Str("labels"): labels,
        _Py2Str("data"): images.reshape(len(images), 3072),
        _Py2Str("filenames"): [_Py2Str(f"img_{i}.png") for i in range(len(images))],
    }


@pytest.fixture
def cifar_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        _dump_py2(
            _cifar_batch(images, [(b + i) % 10 for i in range(4)], f"training batch {b} of 5"),
            folder / f"data_batch_{b}",
        )
    test_images = np.zeros((6, 3, 32, 32), dtype=np.uint8)
    test_images[:, 0] = 255  # pure red images
    test_images[0, 2, 5, 7] = 128  # one blue pixel at row 5, column 7
    _dump_py2(_cifar_batch(test_images, [0, 1, 2, 3, 4, 5], "testing batch 1 of 1"), folder / "test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump_py2(
        {
            _Py2Str("num_cases_per_batch"): 10000,
            _Py2Str("label_names"): [_Py2Str(n) for n in names],
            _Py2Str("num_vis"): 3072,
        },
        folder / "batches.meta",
    )
    return tmp_path


def test_cifar_files_have_the_real_format(cifar_dir):
    # The snippet on the CIFAR-10 web page reads the batches with bytes keys.
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (4, 3072)
    assert batch[b"labels"] == [1, 2, 3, 4]


def test_cifar10_datamodule(cifar_dir):
    dm = CIFAR10DataModule(data_dir=str(cifar_dir), batch_size=8, val_size=4, augment=False)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 6)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long

    image, label = dm.test_set[0]
    assert label == 0
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(image[:, 0, 0], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std)
    torch.testing.assert_close(image[2, 5, 7], (128 / 255 - mean[2]) / std[2])
    # Train and val partition the 20 training images.
    train_labels = {dm.train_set.indices[i] for i in range(16)}
    assert train_labels.isdisjoint(dm.val_set.indices)


def test_cifar10_augmentation_and_val_on_test(cifar_dir):
    dm = CIFAR10DataModule(data_dir=str(cifar_dir), batch_size=6, val_size=0, augment=True)
    dm.setup("fit")
    assert dm.val_set is dm.test_set and len(dm.train_set) == 20
    torch.manual_seed(0)
    crops = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert crops.shape == (8, 3, 32, 32)
    assert not all(torch.equal(crops[0], c) for c in crops[1:])
    # Evaluation images are never augmented: the same image under any random state.
    evals = []
    for seed in range(4):
        torch.manual_seed(seed)
        evals.append(dm.test_set[0][0])
    assert all(torch.equal(evals[0], e) for e in evals[1:])


def test_cifar10_missing_files_names_data_dir(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="data_dir=.*nowhere.*download=True"):
        dm.setup("fit")


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog", "fish"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_imagefolder_datamodule(image_dir):
    dm = ImageFolderDataModule(data_dir=str(image_dir), image_size=8, batch_size=4)
    assert dm.num_classes == 3  # known before setup, for sizing the model
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9, 6) and dm.test_set is dm.val_set
    assert dm.classes == ["cat", "dog", "fish"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and dm.input_shape == (3, 8, 8)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 8, 8) and yv.tolist() == [0, 0, 1, 1]


def test_imagefolder_missing_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    dm = ImageFolderDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="val.*data_dir"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="train"):
        _ = ImageFolderDataModule(data_dir=str(tmp_path / "missing")).num_classes


# ---------------------------------------------------------------- GLUE


def _save_glue(path, pair: bool, test_labels: list[int]):
    datasets = pytest.importorskip("datasets")

    def split(texts, labels):
        if pair:
            cols = {"sentence1": [t[0] for t in texts], "sentence2": [t[1] for t in texts]}
        else:
            cols = {"sentence": texts}
        features = {k: datasets.Value("string") for k in cols}
        features["label"] = datasets.ClassLabel(names=["negative", "positive"])
        features["idx"] = datasets.Value("int32")
        return datasets.Dataset.from_dict(
            {**cols, "label": labels, "idx": list(range(len(labels)))}, features=datasets.Features(features)
        )

    if pair:
        train = [("The cat sat.", "A cat was sitting."), ("It rained.", "The sun shone all day long.")] * 3
        val = [("Dogs bark.", "Dogs make noise.")]
        test = [("Birds fly.", "Birds can fly.")] * len(test_labels)
    else:
        train = ["a good movie", "bad film !", "great, great fun", "awful", "good acting", "boring plot"]
        val = ["good fun", "an awful movie"]
        test = ["unseen words here"] * len(test_labels)
    dd = datasets.DatasetDict(
        train=split(train, [1, 0, 1, 0, 1, 0]),
        validation=split(val, [1, 0][: len(val)]),
        test=split(test, test_labels),
    )
    dd.save_to_disk(str(path))
    return path


def test_glue_single_sentence_with_word_tokenizer(tmp_path):
    data_dir = _save_glue(tmp_path / "sst2", pair=False, test_labels=[-1, -1])
    dm = GLUEDataModule(task_name="sst2", data_dir=str(data_dir), batch_size=4, max_length=4)
    assert dm.num_labels == dm.num_classes == 2
    assert dm.vocab_size == 4 + 13  # specials + the distinct training words and punctuation
    dm.setup("fit")
    assert dm.test_set is dm.val_set  # GLUE test labels are hidden (-1)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 4
    assert (batch["input_ids"][:, 0] == WordTokenizer.cls_token_id).all()
    # Padding positions are masked out and hold the pad id.
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == WordTokenizer.pad_token_id).all()
    val = next(iter(dm.val_dataloader()))
    assert val["labels"].tolist() == [1, 0]
    assert val["input_ids"].tolist()[0] == [2, dm.tokenizer.index["good"], dm.tokenizer.index["fun"], 3]


def test_glue_pair_task_keeps_labelled_test(tmp_path):
    data_dir = _save_glue(tmp_path / "mrpc", pair=True, test_labels=[1, 0, 1])
    dm = GLUEDataModule(task_name="mrpc", data_dir=str(data_dir), batch_size=3, max_length=8)
    dm.setup("test")
    assert len(dm.test_set) == 3 and dm.test_set is not dm.val_set
    batch = next(iter(dm.test_dataloader()))
    assert batch["labels"].tolist() == [1, 0, 1]
    ids, types = batch["input_ids"][0], batch["token_type_ids"][0]
    assert len(ids) <= 8 and (ids == WordTokenizer.sep_token_id).sum() == 2
    assert types[0] == 0 and types[-1] == 1
    # "Birds" is not in the training vocabulary.
    assert WordTokenizer.unk_token_id in ids.tolist()


def test_glue_with_a_local_hugging_face_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    data_dir = _save_glue(tmp_path / "sst2", pair=False, test_labels=[-1])
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "fun", "movie", "an"]
    tok_dir = tmp_path / "tokenizer"
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    # transformers 5 takes the vocabulary itself, earlier versions a vocab file.
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:
        tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    else:
        tokenizer = transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(str(tok_dir))
    dm = GLUEDataModule(task_name="sst2", data_dir=str(data_dir), tokenizer_name=str(tok_dir), batch_size=2)
    assert dm.vocab_size == 9
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"][0].tolist() == [2, 5, 6, 3, 0]
    assert val["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]


def test_glue_rejects_unknown_task():
    with pytest.raises(ValueError, match="stsb"):
        GLUEDataModule(task_name="stsb")


# ---------------------------------------------------------------- text corpus


@pytest.mark.parametrize("tokenization", ["byte", "char"])
def test_text_corpus(tokenization):
    dm = TextCorpusDataModule(seq_len=64, batch_size=16, tokenization=tokenization)
    dm.setup("fit")
    tokens = dm.encode(dm.text)
    assert dm.decode(tokens[:1000]) == dm.text[: len(dm.decode(tokens[:1000]))]
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) * 64 > len(tokens) - 3 * 64 and min(sizes[1:]) > 300
    batch = next(iter(dm.train_dataloader()))["input_ids"]
    assert batch.shape == (16, 64) and batch.dtype == torch.long
    assert 0 <= batch.min() and batch.max() < dm.vocab_size
    # Contiguous split: train is the start of the text, val follows it, test is the end.
    torch.testing.assert_close(dm.train_set[0]["input_ids"], tokens[:64])
    n_train = len(tokens) - int(0.05 * len(tokens)) * 2
    torch.testing.assert_close(dm.val_set[0]["input_ids"], tokens[n_train : n_train + 64])
    assert len(dm.test_set) * 64 >= int(0.05 * len(tokens)) - 64
    if tokenization == "byte":
        assert dm.vocab_size == 256
    else:
        assert dm.vocab_size == len(set(dm.text)) < 256


def test_text_corpus_is_real_english():
    text = TextCorpusDataModule().text
    assert len(text) > 400_000 and "the" in text.split()


# ---------------------------------------------------------------- synthetic


def test_synthetic():
    dm = SyntheticDataModule(input_shape=[3, 16, 16], num_classes=5, num_samples=64, batch_size=32, seed=1)
    dm.setup("fit")
    assert dm.input_shape == (3, 16, 16) and dm.in_channels == 3
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (64, 16, 16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.max() < 5
    again = SyntheticDataModule(input_shape=(3, 16, 16), num_classes=5, num_samples=64, seed=1)
    again.setup()
    torch.testing.assert_close(again.train_set.tensors[0], dm.train_set.tensors[0])
    assert len(set(dm.train_set.tensors[1].tolist())) > 1
