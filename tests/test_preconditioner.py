"""MFACPreconditioner inside real Lightning Trainer runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_models import TinyClassifier, flat_params, make_trainer

from lightning_mfac import MFACPreconditioner


def _fit(tmp_path, module, callbacks=(), **trainer_kwargs):
    trainer = make_trainer(tmp_path, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(module)
    return trainer


def test_sgd_plus_callback_equals_mfac_optimizer(tmp_path):
    kw = dict(ngrads=3, damp=1e-2, weight_decay=1e-3)
    with_callback = TinyClassifier(optimizer="sgd", lr=0.05)
    _fit(tmp_path, with_callback, [MFACPreconditioner(**kw)], precision="64-true", max_steps=8)
    optimizer = TinyClassifier(optimizer="mfac", lr=0.05, mfac_kwargs=kw)
    _fit(tmp_path, optimizer, precision="64-true", max_steps=8)
    assert torch.allclose(flat_params(with_callback), flat_params(optimizer), rtol=0, atol=1e-12)
    assert not torch.equal(flat_params(with_callback), flat_params(TinyClassifier()).double())


def test_callback_matches_dense_reference(tmp_path):
    """Gradients seen by the optimizer are F⁻¹g of a float64 dense Fisher of the last m gradients."""
    m, damp = 3, 1e-2

    class Spy(pl.Callback):
        def __init__(self):
            self.raw, self.pre = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.detach().clone() for p in pl_module.parameters()]
            (self.raw if not self.pre or len(self.raw) == len(self.pre) else self.pre).append(
                torch.nn.utils.parameters_to_vector(grads)
            )

    spy = Spy()
    module = TinyClassifier(optimizer="sgd", lr=0.05)
    # Lightning runs callback hooks in list order: the spy sees the raw and then the preconditioned gradient.
    spy_after = Spy()
    _fit(tmp_path, module, [spy, MFACPreconditioner(ngrads=m, damp=damp), spy_after], precision="64-true", max_steps=7)
    raw, pre = spy.raw, spy_after.raw
    assert len(raw) == len(pre) == 7
    for t in range(7):
        window = torch.stack(raw[max(0, t - m + 1) : t + 1])
        window = torch.cat([window, window.new_zeros(m - window.shape[0], window.shape[1])])
        fisher = damp * torch.eye(window.shape[1], dtype=torch.float64) + window.T @ window / m
        assert torch.allclose(pre[t], torch.linalg.solve(fisher, raw[t]), rtol=1e-9, atol=1e-12)


def test_resume_equals_uninterrupted_run(tmp_path):
    # 32-true: Lightning loads a checkpoint into the module before converting it to float64, so a
    # "64-true" resume rounds the weights through float32 (with or without this callback).
    kw = dict(ngrads=4, damp=1e-2)
    full = TinyClassifier(optimizer="sgd_momentum", lr=0.05, scheduler=True)
    _fit(tmp_path / "a", full, [MFACPreconditioner(**kw)], max_epochs=4, max_steps=-1)

    first = TinyClassifier(optimizer="sgd_momentum", lr=0.05, scheduler=True)
    trainer = _fit(tmp_path / "b", first, [MFACPreconditioner(**kw)], max_epochs=2, max_steps=-1)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("MFACPreconditioner")]
    assert state["preconditioners"][0]["fisher"]["count"] == trainer.global_step

    resumed = TinyClassifier(optimizer="sgd_momentum", lr=0.05, scheduler=True)
    trainer = make_trainer(tmp_path / "c", callbacks=[MFACPreconditioner(**kw)], max_epochs=4, max_steps=-1)
    trainer.fit(resumed, ckpt_path=ckpt)
    assert torch.equal(flat_params(resumed), flat_params(full))


def test_resume_without_window_rewarms_with_warning(tmp_path):
    kw = dict(ngrads=4, damp=1e-2, save_window=False)
    first = TinyClassifier()
    trainer = _fit(tmp_path, first, [MFACPreconditioner(**kw)], max_epochs=1, max_steps=-1)
    ckpt = tmp_path / "nowindow.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    (state,) = saved["callbacks"].values()
    assert "window" not in state["preconditioners"][0]["fisher"]
    callback = MFACPreconditioner(**kw)
    with pytest.warns(UserWarning, match="re-warms"):
        make_trainer(tmp_path, callbacks=[callback], max_epochs=2, max_steps=-1).fit(TinyClassifier(), ckpt_path=ckpt)
    assert callback._pre[0].fisher.count == 6  # only the steps after the resume


def test_nonfinite_gradient_never_enters_window(tmp_path):
    callback = MFACPreconditioner(ngrads=4, damp=1e-2)
    module = TinyClassifier(nan_at_step=2)
    with pytest.warns(UserWarning, match="non-finite gradient"):
        _fit(tmp_path, module, [callback], max_steps=6)
    assert callback.nonfinite_steps == 1
    fisher = callback._pre[0].fisher
    assert fisher.count == 5
    assert torch.isfinite(fisher.window.to_dense()).all()
    assert torch.isfinite(flat_params(module)).all()


def test_gradient_accumulation_one_entry_per_optimizer_step(tmp_path):
    callback = MFACPreconditioner(ngrads=8, damp=1e-2)
    trainer = _fit(tmp_path, TinyClassifier(), [callback], max_steps=3, accumulate_grad_batches=2)
    assert trainer.global_step == 3
    assert callback._pre[0].fisher.count == 3


def test_gradient_clipping_applies_to_preconditioned_gradient(tmp_path):
    seen = []

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(torch.nn.utils.parameters_to_vector([p.grad for p in pl_module.parameters()]).norm())

    _fit(tmp_path, TinyClassifier(), [MFACPreconditioner(ngrads=4, damp=1e-4), After()], max_steps=4,
         gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert len(seen) == 4 and all(n <= 0.5 + 1e-5 for n in seen)


def test_bf16_mixed_runs_and_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = TinyClassifier(optimizer="adam", lr=1e-2)
    callback = MFACPreconditioner(ngrads=4, damp=1e-3, window_dtype="bfloat16")
    trainer = _fit(tmp_path, module, [callback], precision="bf16-mixed", max_steps=6,
                   logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert callback._pre[0].fisher.dtype == torch.bfloat16
    assert torch.isfinite(flat_params(module)).all()
    metrics = trainer.logged_metrics
    assert {"mfac/window_fill", "mfac/precondition_ms", "mfac/ratio"} <= set(metrics)
    assert float(metrics["mfac/window_fill"]) == 1.0
    text = Path(trainer.logger.log_dir, "metrics.csv").read_text()
    assert "mfac/ratio" in text


def test_params_selection_and_bad_input(tmp_path):
    callback = MFACPreconditioner(ngrads=2, params=["re:net\\.2\\..*"])
    _fit(tmp_path, TinyClassifier(), [callback], max_steps=2)
    assert callback._names[0] == ["net.2.weight", "net.2.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        _fit(tmp_path, TinyClassifier(), [MFACPreconditioner(params=["conv.weight"])], max_steps=1)
    for kwargs, match in [
        ({"ngrads": 0}, "ngrads=0"),
        ({"damp": -1.0}, "damp=-1.0"),
        ({"storage": "ssd"}, "storage='ssd'"),
        ({"window_dtype": torch.float16}, "window_dtype"),
        ({"params": []}, "params"),
    ]:
        with pytest.raises(ValueError, match=match):
            MFACPreconditioner(**kwargs)


DDP_SCRIPT = Path(__file__).with_name("ddp_preconditioner_run.py")


@pytest.mark.slow
def test_ddp_sharded_equals_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = {}
    for mode in ("single", "ddp"):
        path = tmp_path / f"{mode}.pt"
        proc = subprocess.run(
            [sys.executable, str(DDP_SCRIPT), mode, str(path)], env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        out[mode] = torch.load(path, weights_only=False)
    assert out["ddp"]["storage"] == "ShardedWindow"
    assert out["single"]["storage"] == "DeviceWindow"
    assert torch.allclose(out["ddp"]["params"], out["single"]["params"], rtol=0, atol=1e-10)


def test_16_mixed_nonfinite_step_is_left_to_the_grad_scaler(tmp_path):
    # Lightning maps "16-mixed" to bf16 on CPU; the plugin with a real GradScaler runs the fp16 path.
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    callback = MFACPreconditioner(ngrads=4, damp=1e-2)
    module = TinyClassifier(nan_at_step=2)
    with pytest.warns(UserWarning, match="left to the AMP grad scaler"):
        _fit(tmp_path, module, [callback], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_steps=6)
    assert callback.nonfinite_steps == 1
    assert callback._pre[0].fisher.count == 5
    assert scaler.get_scale() == 2.0**7  # the scaler saw the inf and skipped that step
    assert torch.isfinite(flat_params(module)).all()


def test_parameter_set_changed_after_window_built_is_an_error(tmp_path):
    class Growing(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2 and not hasattr(self, "extra"):
                self.extra = torch.nn.Parameter(torch.zeros(3))
                self.trainer.optimizers[0].add_param_group({"params": [self.extra]})
            return super().training_step(batch, batch_idx) + (self.extra.sum() if hasattr(self, "extra") else 0)

    with pytest.raises(RuntimeError, match="changed after the M-FAC window was built"):
        _fit(tmp_path, Growing(), [MFACPreconditioner(ngrads=2)], max_steps=4)
