"""LightningModule tasks: real (tiny) Trainer runs on CPU for each task type."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from lit_models import quiet_trainer

from lightning_mfac.app.data import DigitsDataModule, GLUEDataModule, TextCorpusDataModule
from lightning_mfac.app.models import bert_classifier, gpt_lm, quickstart_cnn
from lightning_mfac.app.tasks import ImageClassifier, LanguageModel, SequenceClassifier


def tiny_trainer(**kwargs) -> pl.Trainer:
    # The epoch ends at step 3, so validation runs once.
    options = dict(max_steps=3, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2, num_sanity_val_steps=0)
    return quiet_trainer(**{**options, **kwargs})


def test_image_classifier_fit_and_test():
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    task = ImageClassifier(quickstart_cnn(num_classes=dm.num_classes, in_channels=dm.in_channels))
    assert task.num_classes == 10  # read off the model's head
    before = [p.detach().clone() for p in task.parameters()]
    trainer = tiny_trainer()
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters(), strict=True))
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    # val/acc is the accuracy of the trained model on the validated batches (2 of 32 images).
    task.eval()
    with torch.no_grad():
        batches = [b for _, b in zip(range(2), dm.val_dataloader(), strict=False)]
        correct = sum(int((task(x).argmax(1) == y).sum()) for x, y in batches)
    assert float(metrics["val/acc"]) == pytest.approx(correct / sum(len(y) for _, y in batches), abs=1e-6)
    trainer.test(task, datamodule=dm, verbose=False)
    assert {"test/loss", "test/acc"} <= set(trainer.callback_metrics)


def test_default_and_partial_optimizers():
    model = quickstart_cnn()
    sgd = ImageClassifier(model).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.1

    task = ImageClassifier(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5),
        scheduler_interval="step",
    )
    config = task.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "step"
    assert sum(p.numel() for g in config["optimizer"].param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_hydra_instantiation():
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = {
        "_target_": "lightning_mfac.app.tasks.ImageClassifier",
        "model": {"_target_": "lightning_mfac.app.models.resnet20", "num_classes": 10},
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9},
        "lr_scheduler": {
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "_partial_": True,
            "T_max": 10,
        },
        "label_smoothing": 0.1,
    }
    task = hydra_utils.instantiate(cfg)
    config = task.configure_optimizers()
    assert config["optimizer"].defaults["lr"] == 0.05 and task.label_smoothing == 0.1
    dm = hydra_utils.instantiate(
        {"_target_": "lightning_mfac.app.data.SyntheticDataModule", "input_shape": [3, 8, 8], "num_samples": 8}
    )
    assert dm.input_shape == (3, 8, 8)


def test_label_smoothing_changes_the_loss():
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    plain = ImageClassifier(quickstart_cnn()).eval()
    torch.manual_seed(0)
    smooth = ImageClassifier(quickstart_cnn(), label_smoothing=0.2).eval()
    loss, logits, _ = plain.compute_loss((x, y))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    assert not torch.allclose(smooth.compute_loss((x, y))[0], loss)


def test_image_classifier_learns_digits():
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    task = ImageClassifier(quickstart_cnn(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer = tiny_trainer(max_steps=-1, max_epochs=1, limit_train_batches=1.0, limit_val_batches=1.0)
    trainer.fit(task, datamodule=dm)
    assert trainer.callback_metrics["val/acc"] > 0.5


def _tiny_glue(tmp_path):
    datasets = pytest.importorskip("datasets")
    words = ["good", "great", "fun", "bad", "awful", "dull"]
    rows = [(f"a {words[i % 6]} movie", int(i % 6 < 3)) for i in range(24)]
    split = {"sentence": [r[0] for r in rows], "label": [r[1] for r in rows], "idx": list(range(len(rows)))}
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(split), validation=datasets.Dataset.from_dict(split)
    )
    dd.save_to_disk(str(tmp_path / "glue"))
    return str(tmp_path / "glue")


def test_sequence_classifier_fit(tmp_path):
    pytest.importorskip("transformers")
    pl.seed_everything(0)
    dm = GLUEDataModule(task_name="sst2", data_dir=_tiny_glue(tmp_path), batch_size=8, max_length=16)
    model = bert_classifier(
        num_labels=dm.num_labels,
        vocab_size=dm.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    task = SequenceClassifier(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    assert task.num_classes == 2
    trainer = tiny_trainer()
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    trainer.test(task, datamodule=dm, verbose=False)
    assert {"test/loss", "test/acc"} <= set(trainer.callback_metrics)


def test_language_model_fit_and_perplexity():
    pytest.importorskip("transformers")
    pl.seed_everything(0)
    dm = TextCorpusDataModule(seq_len=32, batch_size=8)
    model = gpt_lm(vocab_size=dm.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    task = LanguageModel(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    trainer = tiny_trainer()
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/ppl"} <= set(metrics)
    # Near-uniform predictions after 3 steps: perplexity close to the vocabulary size.
    assert 50 < metrics["val/ppl"] < 2 * dm.vocab_size

    # val/ppl is exp of the per-token mean loss over the evaluated batches, which matches
    # the shifted next-token loss Hugging Face computes itself from labels=input_ids.
    task.eval()
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            if i == 2:
                break
            ours = task.compute_loss(batch)[0]
            torch.testing.assert_close(
                ours, model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            )
            losses.append(ours)
    trainer.validate(task, datamodule=dm, verbose=False)
    torch.testing.assert_close(
        trainer.callback_metrics["val/ppl"],
        torch.tensor(math.exp(torch.stack(losses).mean())),
        rtol=1e-4,
        atol=1e-3,
    )
