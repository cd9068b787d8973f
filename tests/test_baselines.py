"""The baselines (SINGD, Shampoo, SOAP, Muon) as ``optimizer=`` choices of the app, their adapters,
and the training-step benchmark's smoke run."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from lit_models import quiet_trainer
from torch import nn

pytest.importorskip("singd")
pytest.importorskip("pytorch_optimizer")

from lightning_mfac.app import config_dir
from lightning_mfac.app.assembly import build_datamodule, build_task  # noqa: E402
from lightning_mfac.app.baselines import SINGD, muon, shampoo, singd, soap, unsupported_singd_layers  # noqa: E402
from lightning_mfac.app.checks import validate_config  # noqa: E402
from lightning_mfac.app.models import quickstart_cnn  # noqa: E402
from lightning_mfac.app.tasks import ImageClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The console script's entry point, run with this interpreter (a stale `mfac-train` on PATH may
# belong to another checkout).
MFAC_TRAIN = [sys.executable, "-m", "lightning_mfac.app"]
BASELINES = ["singd", "shampoo", "soap", "muon"]


def _compose(overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(max_steps=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    return quiet_trainer(**{**options, **kwargs})


class Mixed(nn.Module):
    """Supported (Linear, Conv2d) next to unsupported (Embedding, LayerNorm, BatchNorm) layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(6 + 3, 4)

    def forward(self, ids, img):
        a = self.norm(self.emb(ids)).mean(1)
        b = self.bn(self.conv(img)).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def _mixed_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(11, (5, 7), generator=gen), torch.randn(5, 1, 6, 6, generator=gen), torch.randint(4, (5,), generator=gen)


def _steps(model, opt, n=2, closure=False):
    ids, img, y = _mixed_batch()
    for _ in range(n):
        opt.zero_grad()

        def loss_fn():
            loss = nn.functional.cross_entropy(model(ids, img), y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


# ---------------------------------------------------------------------- the app's choices


@pytest.mark.parametrize("name", BASELINES)
def test_optimizer_choice_composes_and_trains(name):
    cfg = _compose([f"optimizer={name}", "preconditioner=none", "pruning=none", "logger=none", "data.batch_size=32"])
    validate_config(cfg)
    pl.seed_everything(0)
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm)
    before = [p.detach().clone() for p in task.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SINGD names the quickstart CNN's BatchNorm layers
        trainer = _trainer()
        trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 2
    after = list(task.parameters())
    # Every parameter trains, BatchNorm's included (SINGD: unsupported=sgd).
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_singd_structures_and_ikfac_from_config():
    cfg = _compose(
        ["optimizer=singd", "scheduler=none", "optimizer.structures=[hierarchical,diagonal]", "optimizer.kfac_like=true"]
    )
    with pytest.warns(UserWarning, match="bn0 \\(BatchNorm2d\\)"):
        opt = build_task(cfg, _DM).configure_optimizers()
    assert isinstance(opt, SINGD)
    group = opt.param_groups[0]
    assert group["structures"] == ("hierarchical15_15", "diagonal")
    assert group["kfac_like"] is True and group["alpha1"] == 0.0


class _DMStub:
    num_classes, in_channels = 10, 1


_DM = _DMStub()


def test_singd_under_bf16_mixed():
    pl.seed_everything(0)
    from lightning_mfac.app.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=32)
    opt = functools.partial(singd, lr=0.05, structures="block_diagonal", T=1)
    task = ImageClassifier(quickstart_cnn(), optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(precision="bf16-mixed", max_steps=3, limit_train_batches=3)
        trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in task.parameters())
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


# ---------------------------------------------------------------------- SINGD's limits


def test_singd_names_unsupported_layers():
    model = Mixed()
    names = unsupported_singd_layers(model)
    assert names == ["emb (Embedding)", "norm (LayerNorm)", "bn (BatchNorm2d)"]
    with pytest.raises(ValueError, match=r"emb \(Embedding\), norm \(LayerNorm\), bn \(BatchNorm2d\)"):
        singd(model.parameters(), model=model, unsupported="error")


@pytest.mark.parametrize("mode", ["sgd", "freeze"])
def test_singd_trains_or_freezes_unsupported_layers(mode):
    torch.manual_seed(0)
    model = Mixed()
    with pytest.warns(UserWarning, match="not supported: emb \\(Embedding\\)"):
        opt = singd(model.parameters(), model=model, lr=0.1, unsupported=mode, T=1)
    emb, head = model.emb.weight.detach().clone(), model.head.weight.detach().clone()
    _steps(model, opt, closure=True)  # Lightning's way: the closure runs inside step()
    assert not torch.equal(head, model.head.weight)
    assert torch.equal(emb, model.emb.weight) == (mode == "freeze")
    assert opt.unsupported_layers == ["emb (Embedding)", "norm (LayerNorm)", "bn (BatchNorm2d)"]


def test_singd_fallback_is_sgd_with_momentum():
    torch.manual_seed(0)
    model = Mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = singd(model.parameters(), model=model, lr=0.1, momentum=0.9, weight_decay=0.01)
    ids, img, y = _mixed_batch()
    expected, buf = model.emb.weight.detach().clone(), None
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids, img), y).backward()
        d = model.emb.weight.grad + 0.01 * expected
        buf = d if buf is None else 0.9 * buf + d
        expected = expected - 0.1 * buf
        opt.step()
    torch.testing.assert_close(model.emb.weight.detach(), expected)


def test_singd_layer_without_forward_hook_keeps_its_preconditioner():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)  # calls out_proj functionally
    with pytest.warns(UserWarning, match="in_proj_weight|<root> \\(MultiheadAttention\\)"):
        opt = singd(attn.parameters(), model=attn, lr=0.1, T=1)
    x = torch.randn(3, 5, 8)
    before = attn.out_proj.weight.detach().clone()
    with pytest.warns(UserWarning, match="'out_proj' .* produced no curvature statistics"):
        for _ in range(2):
            opt.zero_grad()
            attn(x, x, x)[0].square().mean().backward()
            opt.step()
    assert not torch.equal(before, attn.out_proj.weight)


def test_singd_requires_the_model():
    with pytest.raises(TypeError, match="needs model"):
        singd(nn.Linear(2, 2).parameters())


@pytest.mark.parametrize("make", ["singd", "shampoo"])
def test_checkpoint_loads_weights_only_and_resumes_exactly(make):
    def build(model):
        if make == "singd":
            return singd(model.parameters(), model=model, lr=0.05, T=1, structures="hierarchical")
        return shampoo(model.parameters(), lr=1e-2, start_preconditioning_step=1, preconditioning_compute_steps=1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(10, 8), torch.randint(3, (10,))
    opt = build(model)

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # how Lightning resumes
    clone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    clone.load_state_dict(saved["model"])
    opt2 = build(clone)
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        step(model, opt)
        step(clone, opt2)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------- Muon, SOAP


def test_muon_splits_hidden_matrices_from_head_embeddings_and_vectors():
    model = Mixed()
    opt = muon(model.parameters(), model=model)
    groups = {g["use_muon"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups[True] == {id(model.conv.weight)}  # the head and the embedding go to AdamW
    assert id(model.head.weight) in groups[False] and id(model.emb.weight) in groups[False]
    # Without the model: by shape alone.
    by_shape = muon(model.parameters())
    hidden = next(g for g in by_shape.param_groups if g["use_muon"])
    assert {id(p) for p in hidden["params"]} == {id(model.emb.weight), id(model.conv.weight), id(model.head.weight)}
    _steps(model, opt)


def test_soap_trains_a_conv_net():
    torch.manual_seed(0)
    model = quickstart_cnn()
    opt = soap(model.parameters(), lr=3e-3, precondition_frequency=1)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- real processes


def test_mfac_train_with_singd(tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    args = [
        "optimizer=singd", "preconditioner=none", "pruning=none", "logger=none", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run([*MFAC_TRAIN, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mfac-train summary" in proc.stdout
    assert "SINGD preconditions only nn.Linear and nn.Conv2d" in proc.stderr
    assert "bn0 (BatchNorm2d)" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["test"]) == {"test/loss", "test/acc"}
    # What trained and was saved is SINGD: its parameter groups carry the Kronecker structures.
    state = torch.load(summary["checkpoints"]["last"], weights_only=False)
    (opt_state,) = state["optimizer_states"]
    assert opt_state["param_groups"][0]["structures"] == ("dense", "dense")


def test_bench_train_step_quick(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "experiments" / "bench_train_step.py"), "--quick", "--models", "resnet20",
        "--optimizers", "mfac,sgd+mfac-callback,singd-dense", "--singd-unsupported", "error",
        "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| resnet20 | mfac |" in proc.stdout
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sgd", "mfac", "sgd+mfac-callback", "singd-dense"}
    assert rows["sgd"]["ratio_to_sgd"] == pytest.approx(1.0)
    assert rows["mfac"]["median_ms"] > 0 and rows["mfac"]["state_mb"] > 0
    # ResNet-20 has BatchNorm: with unsupported=error SINGD's failure is a table entry, not a crash.
    assert "BatchNorm2d" in rows["singd-dense"]["error"]
    assert "| resnet20 | singd-dense | error: ValueError" in proc.stdout
