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
from lightning_mfac.callbacks._guards import check_full_gradients, check_strategy


def _fit(tmp_path, module, callbacks=(), **trainer_kwargs):
    trainer = make_trainer(tmp_path, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(module)
    return trainer


class GradSpy(pl.Callback):
    """Records the flat gradient each time ``on_before_optimizer_step`` reaches it."""

    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().clone() for p in pl_module.parameters()]
        self.seen.append(torch.nn.utils.parameters_to_vector(grads))


class ParamSpy(pl.Callback):
    """Records the flat parameters after every training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(flat_params(pl_module))


def test_sgd_plus_callback_equals_mfac_optimizer(tmp_path):
    kw = dict(ngrads=3, damp=1e-2, weight_decay=1e-3)
    with_callback = TinyClassifier(optimizer="sgd", lr=0.05)
    _fit(tmp_path, with_callback, [MFACPreconditioner(**kw)], precision="64-true", max_steps=8)
    optimizer = TinyClassifier(optimizer="mfac", lr=0.05, mfac_kwargs=kw)
    _fit(tmp_path, optimizer, precision="64-true", max_steps=8)
    assert torch.allclose(flat_params(with_callback), flat_params(optimizer), rtol=0, atol=1e-12)
    assert not torch.equal(flat_params(with_callback), flat_params(TinyClassifier()).double())


def test_callback_matches_dense_reference(tmp_path, dense_inverse):
    """Gradients seen by the optimizer are F⁻¹g of a float64 dense Fisher of the last m gradients."""
    m, damp = 3, 1e-2
    # Lightning runs callback hooks in list order: one spy sees the raw, the other the preconditioned gradient.
    raw, pre = GradSpy(), GradSpy()
    _fit(tmp_path, TinyClassifier(), [raw, MFACPreconditioner(ngrads=m, damp=damp), pre], precision="64-true",
         max_steps=7)
    assert len(raw.seen) == len(pre.seen) == 7
    for t in range(7):
        window = torch.stack(raw.seen[max(0, t - m + 1) : t + 1])
        window = torch.cat([window, window.new_zeros(m - window.shape[0], window.shape[1])])
        assert torch.allclose(pre.seen[t], dense_inverse(window, damp) @ raw.seen[t], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- reuse across fits
def test_reused_callback_gives_the_second_model_what_a_fresh_one_gives(tmp_path):
    kw = dict(ngrads=3, damp=1e-2)
    reused = MFACPreconditioner(**kw)
    _fit(tmp_path, TinyClassifier(seed=1), [reused], precision="64-true", max_steps=5)
    second = TinyClassifier(seed=2)
    _fit(tmp_path, second, [reused], precision="64-true", max_steps=6)

    fresh = TinyClassifier(seed=2)
    _fit(tmp_path, fresh, [MFACPreconditioner(**kw)], precision="64-true", max_steps=6)
    plain = TinyClassifier(seed=2)
    _fit(tmp_path, plain, precision="64-true", max_steps=6)
    assert torch.equal(flat_params(second), flat_params(fresh))
    assert not torch.allclose(flat_params(second), flat_params(plain))
    assert reused._pre[0].fisher.count == 6
    assert all(p is q for p, q in zip(reused._pre[0].params, second.parameters(), strict=True))


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("graft", [None, "adam"])  # Adam grafting's moments and counts resume too
def test_resume_equals_uninterrupted_run(tmp_path, graft):
    # 32-true: Lightning loads a checkpoint into the module before converting it to float64, so a
    # "64-true" resume rounds the weights through float32 (with or without this callback).
    kw = dict(ngrads=4, damp=1e-2, graft=graft)
    full = TinyClassifier(optimizer="sgd_momentum", lr=0.05, scheduler=True)
    _fit(tmp_path / "a", full, [MFACPreconditioner(**kw)], max_epochs=4, max_steps=-1)

    first = TinyClassifier(optimizer="sgd_momentum", lr=0.05, scheduler=True)
    trainer = _fit(tmp_path / "b", first, [MFACPreconditioner(**kw)], max_epochs=2, max_steps=-1)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("MFACPreconditioner")]
    assert state["preconditioners"][0]["fisher"]["count"] == trainer.global_step
    if graft == "adam":
        assert set(state["preconditioners"][0]["graft"]["steps"].tolist()) == {float(trainer.global_step)}

    resumed = TinyClassifier(optimizer="sgd_momentum", lr=0.05, scheduler=True)
    trainer = make_trainer(tmp_path / "c", callbacks=[MFACPreconditioner(**kw)], max_epochs=4, max_steps=-1)
    trainer.fit(resumed, ckpt_path=ckpt)
    assert torch.equal(flat_params(resumed), flat_params(full))


def _checkpoint(tmp_path, module, callback, **kw) -> Path:
    trainer = _fit(tmp_path, module, [callback], max_epochs=1, max_steps=-1, **kw)
    ckpt = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def test_resume_without_window_rewarms_with_warning(tmp_path):
    kw = dict(ngrads=4, damp=1e-2, save_window=False)
    ckpt = _checkpoint(tmp_path, TinyClassifier(), MFACPreconditioner(**kw))
    (state,) = torch.load(ckpt, weights_only=False)["callbacks"].values()
    assert "window" not in state["preconditioners"][0]["fisher"]
    callback = MFACPreconditioner(**kw)
    with pytest.warns(UserWarning, match="re-warms"):
        make_trainer(tmp_path, callbacks=[callback], max_epochs=2, max_steps=-1).fit(TinyClassifier(), ckpt_path=ckpt)
    assert callback._pre[0].fisher.count == 6  # only the steps after the resume


@pytest.mark.parametrize(
    ("changed", "needle"),
    [
        ({"ngrads": 6}, "ngrads: 4 in the checkpoint, 6 now"),
        ({"window": {"dtype": "bfloat16"}}, "window dtype: float32 in the checkpoint, bfloat16 now"),
        ({"params": ["re:net\\.2\\..*"]}, "parameters: 4 tensors in the checkpoint, 2 selected now"),
    ],
)
def test_resume_with_other_window_settings_rebuilds_with_one_warning(tmp_path, changed, needle):
    ckpt = _checkpoint(tmp_path, TinyClassifier(), MFACPreconditioner(ngrads=4, damp=1e-2))
    callback = MFACPreconditioner(**{"ngrads": 4, "damp": 1e-2, **changed})
    trainer = make_trainer(tmp_path, callbacks=[callback], max_epochs=2, max_steps=-1)
    with pytest.warns(UserWarning, match="other window settings") as record:
        trainer.fit(TinyClassifier(), ckpt_path=ckpt)
    ours = [str(w.message) for w in record if str(w.message).startswith("MFACPreconditioner:")]
    assert len(ours) == 1 and needle in ours[0] and "rebuilt empty" in ours[0]
    assert callback._pre[0].fisher.count == 6  # the 6 steps after the resume only


def test_resume_with_other_damp_keeps_the_window(tmp_path, dense_inverse):
    ckpt = _checkpoint(tmp_path, TinyClassifier(), MFACPreconditioner(ngrads=4, damp=1e-2), precision="64-true")
    callback = MFACPreconditioner(ngrads=4, damp=3e-2)
    # max_epochs=1: the checkpoint is at the end, so fit only restores and stops.
    trainer = make_trainer(tmp_path, callbacks=[callback], max_epochs=1, max_steps=-1, precision="64-true")
    with pytest.warns(UserWarning, match=r"damp=0\.03 \(absolute\); the checkpoint was written with damp=0\.01"):
        trainer.fit(TinyClassifier(), ckpt_path=ckpt)
    fisher = callback._pre[0].fisher
    assert fisher.count == 6
    window = fisher.window.to_dense().to(torch.float64)
    x = torch.randn(window.shape[1], dtype=torch.float64)
    assert torch.allclose(fisher.mul(x), dense_inverse(window, 3e-2) @ x, rtol=1e-9, atol=1e-12)


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    class Other(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.strict_loading = False  # get past the module's own state dict check
            self.body = self.net
            del self.net

        def forward(self, x):
            return self.body(x)

    ckpt = _checkpoint(tmp_path, TinyClassifier(), MFACPreconditioner(ngrads=4, damp=1e-2))
    trainer = make_trainer(tmp_path, callbacks=[MFACPreconditioner(ngrads=4, damp=1e-2)], max_epochs=2, max_steps=-1)
    with pytest.raises(RuntimeError, match="belongs to a different model: its parameter 'net.0.weight'"):
        trainer.fit(Other(), ckpt_path=ckpt)


# ---------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_is_skipped_and_never_enters_window(tmp_path, fused):
    callback, params = MFACPreconditioner(ngrads=4, damp=1e-2), ParamSpy()
    module = TinyClassifier(nan_at_step=2, fused=fused)
    with pytest.warns(UserWarning, match="1 optimizer step.* had a non-finite gradient"):
        _fit(tmp_path, module, [callback, params], max_steps=6)
    assert callback.nonfinite_steps == 1
    fisher = callback._pre[0].fisher
    assert fisher.count == 5
    assert torch.isfinite(fisher.window.to_dense()).all()
    # Plain SGD on a zero direction, or the fused kernel told by found_inf: the weights stay put.
    assert torch.equal(params.seen[2], params.seen[1])
    assert not torch.equal(params.seen[3], params.seen[2])
    assert torch.isfinite(flat_params(module)).all()


def test_16_mixed_nonfinite_step_is_left_to_the_grad_scaler(tmp_path):
    # Lightning maps "16-mixed" to bf16 on CPU; the plugin with a real GradScaler runs the fp16 path.
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    callback = MFACPreconditioner(ngrads=4, damp=1e-2)
    module = TinyClassifier(nan_at_step=2)
    with pytest.warns(UserWarning, match="skipped by the AMP grad scaler"):
        _fit(tmp_path, module, [callback], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_steps=6)
    assert callback.nonfinite_steps == 1
    assert callback._pre[0].fisher.count == 5
    assert scaler.get_scale() == 2.0**7  # the scaler saw the inf and skipped that step
    assert torch.isfinite(flat_params(module)).all()


# ---------------------------------------------------------------------- fp16 AMP, fused optimizers
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_16_mixed_fused_optimizer_stores_the_same_window_as_unfused(tmp_path, optimizer):
    """Lightning leaves the gradients of a fused optimizer scaled (it unscales inside its step):
    the callback unscales them, so the window holds true gradients, as for the unfused optimizer.
    This runs the real fp16 autocast + GradScaler path on the CPU through the precision plugin
    (``precision="16-mixed"`` alone would be mapped to bf16 on the CPU)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    windows, params = {}, {}
    for fused in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        callback = MFACPreconditioner(ngrads=8, damp=1e-2, log_stats=False)
        module = TinyClassifier(optimizer=optimizer, lr=0.01, fused=fused)
        _fit(tmp_path, module, [callback], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_steps=5)
        assert scaler.get_scale() == 2.0**10  # no step was skipped
        windows[fused] = callback._pre[0].fisher.window.to_dense()
        params[fused] = flat_params(module)
    torch.testing.assert_close(windows[True], windows[False], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(params[True], params[False], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- loop integration
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


def test_bf16_mixed_runs_and_logs_device_tensors(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = TinyClassifier(optimizer="adam", lr=1e-2)
    callback = MFACPreconditioner(ngrads=4, damp=1e-3, window={"dtype": "bfloat16"})
    trainer = _fit(tmp_path, module, [callback], precision="bf16-mixed", max_steps=6,
                   logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert callback._pre[0].fisher.dtype == torch.bfloat16
    assert torch.isfinite(flat_params(module)).all()
    metrics = trainer.logged_metrics
    assert {"mfac/window_fill", "mfac/ratio", "mfac/nonfinite_steps"} <= set(metrics)
    assert float(metrics["mfac/window_fill"]) == 1.0
    assert float(metrics["mfac/nonfinite_steps"]) == 0.0
    assert 0 < float(metrics["mfac/ratio"]) < float("inf")
    text = Path(trainer.logger.log_dir, "metrics.csv").read_text()
    assert "mfac/ratio" in text


def test_kernels_choice_reaches_the_window(tmp_path):
    runs = {}
    for kernels in ("auto", "torch"):
        module = TinyClassifier()
        callback = MFACPreconditioner(ngrads=3, damp=1e-2, window={"kernels": kernels})
        _fit(tmp_path, module, [callback], precision="64-true", max_steps=6)
        assert callback._pre[0].window.kernels == kernels
        runs[kernels] = flat_params(module)
    torch.testing.assert_close(runs["torch"], runs["auto"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- refusals
def test_params_selection_and_bad_input(tmp_path):
    callback = MFACPreconditioner(ngrads=2, params=["re:net\\.2\\..*"])
    _fit(tmp_path, TinyClassifier(), [callback], max_steps=2)
    assert callback._names[0] == ["net.2.weight", "net.2.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        _fit(tmp_path, TinyClassifier(), [MFACPreconditioner(params=["conv.weight"])], max_steps=1)
    for kwargs, match in [
        ({"ngrads": 0}, "ngrads=0"),
        ({"damp": -1.0}, "damp=-1.0"),
        ({"window": {"storage": "ssd"}}, "storage='ssd'"),
        ({"window": {"dtype": torch.float16}}, "dtype"),
        ({"window": {"refactor_every": 0}}, "refactor_every=0"),
        ({"window": {"pages": 3}}, "unknown setting"),
        ({"params": []}, "params"),
        ({"optimizers": []}, "optimizers"),
    ]:
        with pytest.raises(ValueError, match=match):
            MFACPreconditioner(**kwargs)


def test_parameter_set_changed_after_window_built_is_an_error(tmp_path):
    class Growing(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2 and not hasattr(self, "extra"):
                self.extra = torch.nn.Parameter(torch.zeros(3))
                self.trainer.optimizers[0].add_param_group({"params": [self.extra]})
            return super().training_step(batch, batch_idx) + (self.extra.sum() if hasattr(self, "extra") else 0)

    with pytest.raises(RuntimeError, match="changed after the M-FAC window was built.*new: \\['extra'\\]"):
        _fit(tmp_path, Growing(), [MFACPreconditioner(ngrads=2)], max_steps=4)


def _strategies():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    # DeepSpeedStrategy() needs the deepspeed package; the guard only looks at the class.
    return [FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)]


@pytest.mark.parametrize("index", [0, 1])
def test_sharded_strategies_are_refused_at_setup(index):
    from types import SimpleNamespace

    strategy = _strategies()[index]
    with pytest.raises(ValueError, match=f"does not support strategy {type(strategy).__name__}.*Use FSDP2 instead"):
        MFACPreconditioner().setup(SimpleNamespace(strategy=strategy), TinyClassifier(), "fit")


def test_model_parallel_strategy_passes_the_guard():
    from lightning.pytorch.strategies import ModelParallelStrategy

    check_strategy(ModelParallelStrategy(), "MFACPreconditioner")  # FSDP2: the window follows the shards
    check_strategy(ModelParallelStrategy(), "OBSPruning")  # FSDP2: the step runs on gathered copies


def test_sparse_embedding_and_meta_parameters_are_refused_by_name(tmp_path):
    class WithEmbedding(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 6, sparse=True)

        def forward(self, x):
            return self.net(x + self.emb.weight[:1])

    with pytest.raises(ValueError, match="parameter 'emb.weight' belongs to an Embedding\\(sparse=True\\)"):
        _fit(tmp_path, WithEmbedding(), [MFACPreconditioner(ngrads=2)], max_steps=1)
    # Excluding it via params is the way out.
    _fit(tmp_path, WithEmbedding(), [MFACPreconditioner(ngrads=2, params=["re:net\\..*"])], max_steps=1,
         accelerator="cpu")

    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="parameter 'weight' .* is on the meta device"):
        check_full_gradients(meta, list(meta.named_parameters()), "MFACPreconditioner")


DDP_SCRIPT = Path(__file__).with_name("ddp_preconditioner_run.py")


@pytest.mark.slow
def test_ddp_sharded_equals_single_process(tmp_path):
    launcher = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = {}
    for mode in ("single", "ddp", "ddp32", "ddp32-resume"):
        (tmp_path / mode).mkdir()
        path = tmp_path / mode / "result.pt"
        proc = subprocess.run(
            [sys.executable, str(DDP_SCRIPT), mode, str(path)], env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        out[mode] = torch.load(path, weights_only=False)
    assert out["ddp"]["storage"] == out["ddp32-resume"]["storage"] == "ShardedWindow"
    assert out["single"]["storage"] == "DeviceWindow"
    assert torch.allclose(out["ddp"]["params"], out["single"]["params"], rtol=0, atol=1e-10)
    # Resumed from a checkpoint whose window is one file per rank, beside the checkpoint.
    *shards, named = out["ddp32-resume"]["shards"]
    assert named is True
    assert len(shards) == 2 and shards[0].endswith("rank00000-of-00002.pt") and shards[1].endswith("rank00001-of-00002.pt")
    assert torch.equal(out["ddp32-resume"]["params"], out["ddp32"]["params"])


# ---------------------------------------------------------------------- no host reads in the step
def test_steady_step_reads_nothing_on_the_host(tmp_path):
    """The whole hook (gradient in, window update, direction out, statistics logged) over 3m
    steady steps, past the engine's guarded first refactor period (2m warm-up steps): at most one
    health read per refactor interval (m steps), from the engine."""
    from dispatch_counters import DispatchCounter

    m = 8

    class Counted(MFACPreconditioner):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.reads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step < 2 * m:  # warm-up: the window fills, the first period is guarded
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)
            with DispatchCounter() as counter:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.reads.append(counter.host_reads)

    callback = Counted(ngrads=m, damp=1e-2, log_stats=True)
    _fit(tmp_path, TinyClassifier(fused=True), [callback], max_steps=5 * m, log_every_n_steps=1)
    assert len(callback.reads) == 3 * m
    assert sum(callback.reads) <= 3, callback.reads


def test_hook_driven_by_hand_without_a_trainer_run(dense_inverse):
    """experiments/optimizer_suite.py calls the hook from a plain loop (no setup/on_fit_start):
    the window is built at the first call."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(optimizers=[opt], precision_plugin=SimpleNamespace(scaler=None))
    callback = MFACPreconditioner(ngrads=2, damp=0.1, log_stats=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x).square().sum().backward()
    g = torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()]).clone()
    callback.on_before_optimizer_step(trainer, model, opt)
    u = torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()])
    window = torch.stack([g, torch.zeros_like(g)])
    torch.testing.assert_close(u, dense_inverse(window, 0.1) @ g, rtol=1e-10, atol=0)


def test_dtensor_parameters_other_than_fsdp2_s_are_refused_by_name():
    """What FSDP2 / tensor parallelism hands the callback: parameters that are DTensor shards. Row
    shards (FSDP2's Shard(0)) pass the callback's guard; a column shard (tensor parallelism) is
    refused by name where the window is laid out. A 2-rank fake process group builds them here."""
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_mfac.optim.fsdp import shard_layout

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        layer = torch.nn.Linear(4, 4)
        mesh = init_device_mesh("cpu", (2,))
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0)]))
        check_full_gradients(layer, list(layer.named_parameters()), "MFACPreconditioner")
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.full_tensor().detach(), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match="parameter 'weight' has placements .*Shard\\(dim=1\\).*expected FSDP2's default"):
            shard_layout([layer.weight, layer.bias], "MFACPreconditioner", ["weight", "bias"])
        plain = torch.nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError, match="parameter 'p' is a plain tensor but others are FSDP2 DTensors"):
            shard_layout([layer.bias, plain], "MFAC", ["bias", "p"])
    finally:
        dist.destroy_process_group()
