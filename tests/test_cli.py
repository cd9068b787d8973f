"""The real ``mfac-train``: composition, the user flows of the README, errors, and what a run leaves behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_mfac.app import config_dir
from lightning_mfac.app.assembly import build_callbacks, build_datamodule, build_task
from lightning_mfac.app.callbacks import StopOnDivergence, TrainingDiverged
from lightning_mfac.app.checks import ConfigError, check_resume, fit_pruning_schedule, validate_config
from lightning_mfac.app.report import global_sparsity, layer_sparsity
from lightning_mfac.app.run import _run_label

ROOT = Path(__file__).resolve().parents[1]
CONF = config_dir()
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# The console script's entry point, run with this interpreter (a stale `mfac-train` on PATH may
# belong to another checkout).
MFAC_TRAIN = [sys.executable, "-m", "lightning_mfac.app"]
# Tiny settings: a couple of batches per epoch, windows of 4 gradients.
TINY = [
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "optimizer.ngrads=4",
    "pruning.callback.obs.ngrads=4",
    "pruning.callback.start_epoch=0",
    "pruning.callback.end_epoch=1",
]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*MFAC_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("mfac-train: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]


# ---------------------------------------------------------------------- composition
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset):
    cfg = _compose([f"experiment={preset}"])
    assert cfg.task_name == preset
    assert "_target_" in cfg.trainer and "_target_" in cfg.model
    try:
        validate_config(cfg)
    except ConfigError as err:  # presets on real data sets need their files
        assert "data.data_dir" in str(err)


def test_console_script_prints_a_preset_config(tmp_path):
    proc = _run(["experiment=resnet50_imagenet_prune95", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sparsity: 0.95" in proc.stdout and "lightning_mfac.app.models.resnet50" in proc.stdout


def test_help_names_the_app_its_groups_and_examples(tmp_path):
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "powered by Hydra" not in out and out.lstrip().startswith("mfac-train")
    for group in ("optimizer", "preconditioner", "pruning", "callbacks", "trainer", "experiment", "logger"):
        assert re.search(rf"^{group}: ", out, re.M), group
    assert re.search(r"^optimizer: adamw, mfac, .*sgd", out, re.M)
    examples = [ln for ln in out.splitlines() if ln.strip().startswith("mfac-train ")]
    assert len(examples) >= 3
    # Every example composes and validates.
    for line in examples:
        args = [a for a in shlex.split(line.split("#")[0])[1:] if a != "-m" and not a.startswith("--")]
        args = [a.split(",")[0] if "=" in a else a for a in args]
        cfg = _compose([a for a in args if not a.startswith("data.download")])
        try:
            validate_config(cfg)
        except ConfigError as err:
            assert "data.data_dir" in str(err)
    assert not list(tmp_path.iterdir())


def test_trainer_group_exposes_strategy_devices_and_num_nodes():
    for trainer in ("cpu", "gpu", "ddp", "ddp_cpu"):
        cfg = _compose([f"trainer={trainer}", "trainer.strategy=ddp", "trainer.devices=2", "trainer.num_nodes=1"])
        assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 2, 1)


def test_run_folder_label_carries_the_overrides():
    assert _run_label("") == ""
    assert _run_label("optimizer=adamw,seed=1") == "_optimizer-adamw_seed-1"
    assert _run_label("+trainer.limit_val_batches=2,optimizer=sgd") == "_optimizer-sgd_+trainer.limit_val_batches-2"
    label = _run_label("data.data_dir=/a/b c," + "x" * 200)
    assert not set("/ =,~") & set(label) and len(label) <= 82


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.lr=-1"], "optimizer.lr=-1"),
        (["pruning.callback.sparsity=1.0"], "pruning.callback.sparsity=1.0"),
        (["preconditioner=mfac", "optimizer=sgd", "preconditioner.ngrads=0"], "preconditioner.ngrads=0"),
        (["preconditioner=mfac", "optimizer=sgd", "preconditioner.damp=0"], "preconditioner.damp=0"),
        (["data.batch_size=abc"], "data.batch_size='abc'"),
        (["data=imagenet"], "data.data_dir"),
        (["data=cifar10", "data.data_dir=/nonexistent/cifar"], "data.data_dir='/nonexistent/cifar'"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt' does not exist"),
        (["optimizer=mfac", "preconditioner=mfac"], "precondition every gradient twice"),
        (["optimizer.damp=1e300"], "optimizer.damp=1e+300 is out of range"),
        (["+optimizer.foo=1"], "optimizer.foo is not a parameter of MFAC"),
        (["optimizer.window.dtype=int8"], "optimizer.window.dtype='int8' is invalid"),
        (["+optimizer.window.foo=1"], "optimizer.window: unknown setting(s) ['foo']"),
        (["+optimizer.damp_mode=rel"], "optimizer.damp_mode='rel' is invalid: expected one of ['absolute', 'relative']"),
        (["pruning.callback.obs.ngrads=0"], "pruning.callback.obs.ngrads=0 is invalid"),
        (["pruning=oneshot", "pruning.obs.recomputations=0"], "pruning.obs.recomputations=0"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch is not a parameter of Trainer: did you mean trainer.max_epochs?"),
        (["preconditioner=mfac", "optimizer=sgd", "+preconditioner.ngrad=3"],
         "preconditioner.ngrad is not a parameter of MFACPreconditioner: did you mean preconditioner.ngrads?"),
        (["optimizer._target_=lightning_mfac.NoSuchOptimizer"],
         "optimizer._target_='lightning_mfac.NoSuchOptimizer' cannot be imported"),
        (["trainer=fsdp2_cpu", "optimizer=shampoo", "pruning=none"],
         "optimizer._target_='lightning_mfac.app.baselines.shampoo' does not run under "
         "trainer.strategy=ModelParallelStrategy (FSDP2): use optimizer=adamw, sgd"),
        (["trainer=fsdp2_cpu", "pruning=none"], "optimizer=mfac does not run under trainer.strategy="
         "ModelParallelStrategy (FSDP2): its checkpoints keep only per-parameter optimizer state"),
        (["trainer=fsdp2_cpu", "optimizer=sgd", "pruning=oneshot"], "pruning.kind='oneshot' does not run"),
        (["trainer=fsdp2", "optimizer=sgd", "pruning=none", "trainer.strategy.tensor_parallel_size=2"],
         "trainer.strategy.tensor_parallel_size=2 is not supported"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(_compose(overrides))


def test_optimizer_and_preconditioner_are_orthogonal():
    """Choosing an optimizer trains that optimizer: no hidden preconditioner, no lr tuned for another one."""
    default = _compose([])
    assert default.optimizer._target_ == "lightning_mfac.MFAC" and "_target_" not in default.preconditioner
    for name in ("sgd", "adamw", "singd", "shampoo", "soap", "muon"):
        cfg = _compose([f"optimizer={name}"])
        plain = _compose([f"optimizer={name}", "~experiment"])
        assert "_target_" not in cfg.preconditioner, name
        # The quickstart preset changes no optimizer value: the group's own defaults apply.
        assert cfg.optimizer == plain.optimizer, name
    cfg = _compose(["optimizer=adamw", "preconditioner=mfac"])
    validate_config(cfg)
    assert cfg.preconditioner._target_ == "lightning_mfac.MFACPreconditioner"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith("mfac-train")]


def test_every_readme_command_composes_and_trains_what_it_names():
    commands = _readme_commands()
    assert len(commands) >= 8
    for line in commands:
        args = shlex.split(line)[1:]
        sweep = "-m" in args
        args = [a for a in args if a != "-m" and not a.startswith("--")]
        if any("<" in a for a in args):
            continue  # a placeholder path
        variants = [args]
        if sweep:  # every value of each comma list, the other lists at their first value
            first = [a.split(",")[0] for a in args]
            variants = [first]
            for i, a in enumerate(args):
                if "," in a and "=" in a:
                    key, values = a.split("=", 1)
                    variants += [first[:i] + [f"{key}={v}"] + first[i + 1:] for v in values.split(",")]
        for overrides in variants:
            cfg = _compose([a for a in overrides if not a.startswith("data.download")])
            try:
                validate_config(cfg)
            except ConfigError as err:
                assert "data.data_dir" in str(err), line
            chosen = dict(a.split("=", 1) for a in overrides if "=" in a)
            if chosen.get("preconditioner") != "mfac":
                assert "_target_" not in cfg.preconditioner, f"{line}: trains with a preconditioner it does not name"
            if "optimizer" in chosen:
                leaf = yaml.safe_load((CONF / "optimizer" / f"{chosen['optimizer']}.yaml").read_text())["_target_"]
                assert cfg.optimizer._target_ == leaf, line


def test_gradual_schedule_is_fitted_into_the_run():
    cfg = _compose(["trainer.max_epochs=2"])  # quickstart schedule: steps at epochs 1..3
    note = fit_pruning_schedule(cfg)
    assert note and "scaled to epochs" in note
    assert cfg.pruning.callback.end_epoch == 1 and cfg.pruning.callback.start_epoch <= 1
    cfg = _compose(["trainer.max_epochs=1"])
    assert fit_pruning_schedule(cfg)
    assert (cfg.pruning.callback.start_epoch, cfg.pruning.callback.end_epoch) == (0, 0)
    assert fit_pruning_schedule(_compose([])) is None  # 6 epochs: fits as configured
    cfg = _compose(["trainer.max_epochs=2", "pruning.callback.schedule=[0.3,0.5,0.7]", "pruning.callback.end_epoch=null",
                    "pruning.callback.sparsity=null"])
    with pytest.raises(ConfigError, match="pruning.callback.schedule ends at epoch 3"):
        fit_pruning_schedule(cfg)


# ---------------------------------------------------------------------- resume checks
@pytest.fixture(scope="module")
def quickstart_task():
    cfg = _compose(["logger=none"])
    pl.seed_everything(0)
    return cfg, build_task(cfg, build_datamodule(cfg))


def _resume(cfg, task, tmp_path, payload, raw: bytes | None = None, extra=()):
    path = tmp_path / "x.ckpt"
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(payload, path)
    cfg = _compose(["logger=none", f"ckpt_path={path}", *extra])
    validate_config(cfg)
    check_resume(cfg, task)


def test_resume_from_bad_checkpoints_is_one_clear_error(quickstart_task, tmp_path):
    cfg, task = quickstart_task
    good = {"state_dict": task.state_dict(), "callbacks": {}}
    torch.save(good, tmp_path / "good.ckpt")
    whole = (tmp_path / "good.ckpt").read_bytes()
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        _resume(cfg, task, tmp_path, None, raw=whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        _resume(cfg, task, tmp_path, None, raw=b"")
    with pytest.raises(ConfigError, match="is not a Lightning checkpoint"):
        _resume(cfg, task, tmp_path, {"weights": torch.zeros(3)})
    other = {"state_dict": {"model.encoder.weight": torch.zeros(4, 4)}, "callbacks": {}}
    with pytest.raises(ConfigError, match="different model.*missing.*model.encoder.weight|different model"):
        _resume(cfg, task, tmp_path, other)
    _resume(cfg, task, tmp_path, good)  # the same model resumes


def test_resume_of_a_ddp_checkpoint_without_its_window_files_is_refused(quickstart_task, tmp_path):
    from lightning_mfac.fisher.storage import SHARDED_CHECKPOINT_FORMAT

    cfg, task = quickstart_task
    manifest = {"format": SHARDED_CHECKPOINT_FORMAT, "rows": 4, "dim": 9, "dtype": "torch.float32",
                "directory": str(tmp_path / "elsewhere.ckpt.mfac-window"),
                "files": [(0, 5, "window-0123456789ab-000-rank00000-of-00002.pt")]}
    state = {"state_dict": task.state_dict(),
             "callbacks": {"MFACPreconditioner{}": {"preconditioners": {0: {"fisher": {"window": manifest}}}}}}
    with pytest.raises(ConfigError, match=r"sharded M-FAC window file .*rank00000-of-00002.pt.*does not exist: "
                                          r"copy the folder 'x.ckpt.mfac-window' along"):
        _resume(cfg, task, tmp_path, state)
    manifest["files"] = [(0, 5, "../../etc/passwd")]
    with pytest.raises(ConfigError, match=r"bad sharded-window manifest: .*not a plain file name"):
        _resume(cfg, task, tmp_path, state)


def test_resume_of_a_pruned_run_without_pruning_is_refused(quickstart_task, tmp_path):
    cfg, task = quickstart_task
    pruned = {"state_dict": task.state_dict(), "callbacks": {"OBSPruning{'sparsity': 0.7}": {"masks": {}}}}
    with pytest.raises(ConfigError, match="masks of a gradual pruning run.*pruning=mfac"):
        _resume(cfg, task, tmp_path, pruned, extra=["pruning=none"])
    _resume(cfg, task, tmp_path, pruned)  # with pruning: fine


# ---------------------------------------------------------------------- callbacks from the config
def test_callbacks_come_from_the_config_group_in_order(tmp_path):
    cfg = _compose([
        "logger=none", "optimizer=sgd", "preconditioner=mfac",
        f"callbacks.best_checkpoint.dirpath={tmp_path}", f"callbacks.last_checkpoint.dirpath={tmp_path}",
        "+callbacks.early_stop._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.early_stop.monitor=val/loss",
        "~callbacks.lr_monitor",
    ])
    names = [type(c).__name__ for c in build_callbacks(cfg)]
    assert names == ["ModelCheckpoint", "ModelCheckpoint", "StopOnDivergence", "MetricHistory", "TQDMProgressBar",
                     "ModelSummary", "EarlyStopping", "OBSPruning", "MFACPreconditioner"]
    cfg.trainer.enable_progress_bar = False
    assert "TQDMProgressBar" not in [type(c).__name__ for c in build_callbacks(cfg)]


def test_stop_on_divergence():
    guard = StopOnDivergence()

    class T:
        current_epoch, global_step = 2, 17

    guard.on_train_batch_end(T, None, {"loss": torch.tensor(2.0)}, None, 0)
    guard.on_train_batch_end(T, None, {"loss": torch.tensor(1999.0)}, None, 0)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 17"):
        guard.on_train_batch_end(T, None, {"loss": torch.tensor(float("nan"))}, None, 0)
    with pytest.raises(TrainingDiverged, match="loss is 2001 at epoch 2, step 17, over 1000x the first loss 2"):
        guard.on_train_batch_end(T, None, {"loss": torch.tensor(2001.0)}, None, 0)
    with pytest.raises(ValueError, match="check_every=0"):
        StopOnDivergence(check_every=0)
    with pytest.raises(ValueError, match="max_ratio=0.5"):
        StopOnDivergence(max_ratio=0.5)


# ---------------------------------------------------------------------- real processes
def test_console_script_errors_are_one_line_and_leave_nothing(tmp_path, tmp_path_factory):
    blocker = tmp_path_factory.mktemp("elsewhere") / "a-file"  # an output folder below a file
    blocker.write_text("")
    for args, needle, status in (
        (["optimizer.lr=-1"], "optimizer.lr=-1 is out of range", 2),
        (["optimizer=mfac", "preconditioner=mfac"], "precondition every gradient twice", 2),
        (["ckpt_path=nothing/here.ckpt"], "ckpt_path='nothing/here.ckpt' does not exist", 2),
        (["model.width=abc"], "model:", 2),
        (["+optimizer.foo=1"], "optimizer.foo is not a parameter of MFAC", 2),
        # A window of 10⁸ gradients of the quickstart CNN: terabytes, refused before allocating.
        (["optimizer.ngrads=100000000"], "optimizer.ngrads=100000000: the M-FAC window needs", 2),
        (["+data.val_fraction=0.6", "+data.test_fraction=0.5"],
         "data: val_fraction=0.6 + test_fraction=0.5 leaves no training images", 2),
        (["+data.val_fraction=0.0"], "data: the val split of DigitsDataModule is empty (data.val_fraction=0.0)", 2),
        ([f"hydra.run.dir={blocker}/run"], f"hydra.run.dir='{blocker}/run' cannot hold the run's outputs", 2),
    ):
        proc = _run(args, tmp_path)
        assert proc.returncode == status, proc.stderr[-3000:]
        _one_line_error(proc, needle)
        assert not list(tmp_path.iterdir()), list(tmp_path.rglob("*"))
    proc = _run(["optimizer=nesterov_adam"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'optimizer/nesterov_adam'" in proc.stderr and "sgd" in proc.stderr


@pytest.mark.slow
def test_divergence_stops_the_run_with_a_reason(tmp_path):
    proc = _run(["optimizer.lr=1e6", "logger=none", "pruning=none", "trainer.max_epochs=3", *TINY[:5]], tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    _one_line_error(proc, "training diverged")
    assert "mfac-train summary" not in proc.stdout


def _wandb_records(run_dir: Path) -> bytes:
    (records,) = run_dir.glob("run-*.wandb")
    return records.read_bytes()


@pytest.mark.slow
def test_quickstart_end_to_end_with_wandb_offline_plots_and_resume(tmp_path):
    proc = _run(["trainer.max_epochs=2", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mfac-train summary" in proc.stdout
    for noise in ("litlogger", "anonymous", "Deprecat", "ModelSummary", "┏"):
        assert noise not in proc.stdout + proc.stderr, noise
    # The run folder names the task and the overrides.
    (run_dir,) = (tmp_path / "outputs" / "quickstart").iterdir()
    assert "_optimizer.ngrads-4_pruning.callback.end_epoch-1" in run_dir.name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pruning"]["target"] == pytest.approx(0.7) and summary["pruning"]["note"] is None
    assert summary["global_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert (run_dir / "sparsity.csv").read_text().startswith("layer,params,sparsity")
    for png in ("curves.png", "sparsity.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # W&B offline: a real run directory inside the run's output directory, with plots and tables.
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    logged = _wandb_records(wandb_run)
    for needle in (b"task_name", b"val/acc", b"final/global_sparsity", b"plots/curves"):
        assert needle in logged, needle
    media = wandb_run / "files" / "media"
    assert list((media / "table").glob("sparsity_*.table.json")) and list((media / "table").glob("curves_*.table.json"))
    assert len(list((media / "images").rglob("*.png"))) == 2
    assert summary["logger_dir"] == str(wandb_run)
    # last.ckpt is the end of training; the summary names it and the best one.
    last = Path(summary["checkpoints"]["last"])
    assert last.name == "last.ckpt" and Path(summary["checkpoints"]["best"]["path"]).is_file()
    state = torch.load(last, weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 8
    keys = list(state["callbacks"])
    assert any(k.startswith("OBSPruning") for k in keys)

    resumed_dir = tmp_path / "resumed"
    proc = _run(["trainer.max_epochs=3", *TINY, f"ckpt_path={last}", f"hydra.run.dir={resumed_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    resumed = json.loads((resumed_dir / "summary.json").read_text())
    # The masks came back with the checkpoint: the sparsity is kept, not re-grown from zero.
    assert resumed["global_sparsity"] >= summary["global_sparsity"] - 1e-6

    # Resuming a run that had already finished trains nothing, measures its objective on the
    # validation set and tests the very model of the first run.
    finished_dir = tmp_path / "finished"
    proc = _run(["trainer.max_epochs=2", *TINY, f"ckpt_path={last}", f"hydra.run.dir={finished_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = json.loads((finished_dir / "summary.json").read_text())
    assert finished["test"] == summary["test"]
    assert finished["optimized"] == pytest.approx(summary["optimized"])
    # Lightning brings back the first run's best path but not its score: said so, not "nan".
    assert "nan" not in proc.stdout
    if finished["checkpoints"].get("best", {}).get("score") is None:
        assert "score not restored" in proc.stdout


def _test_accuracy(ckpt: Path, overrides: list[str]) -> tuple[float, float]:
    cfg = _compose(["logger=none", *overrides])
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm)
    task.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2,
                         enable_checkpointing=False)
    (metrics,) = trainer.test(task, datamodule=dm, verbose=False)
    return metrics["test/acc"], global_sparsity(layer_sparsity(task))


@pytest.mark.slow
def test_oneshot_pruning_saves_the_pruned_model(tmp_path):
    run_dir = tmp_path / "run"
    args = ["pruning=oneshot", "pruning.obs.ngrads=4", "trainer.max_epochs=1", "logger=none", *TINY[:5],
            f"hydra.run.dir={run_dir}"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert summary["pruning"]["kind"] == "oneshot" and summary["pruning"]["reached"] == pytest.approx(0.7, abs=0.01)
    acc, sparsity = _test_accuracy(Path(summary["checkpoints"]["last"]), [])
    assert sparsity == pytest.approx(summary["global_sparsity"], abs=1e-9)
    assert acc == pytest.approx(summary["test"]["test/acc"], abs=1e-9)
    assert "weights_only" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_under_target_run_says_so(tmp_path):
    run_dir = tmp_path / "run"
    # A step-bounded run stops in epoch 0: the schedule's last step (epoch 1) never comes.
    args = ["trainer.max_epochs=-1", "trainer.max_steps=4", "logger=none", *TINY, f"hydra.run.dir={run_dir}"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pruning"]["reached"] < 0.7 - 0.005
    assert "below its target 0.7000" in summary["pruning"]["note"]
    assert "NOTE: the run ended at sparsity" in proc.stdout
    assert "mfac-train: warning: the run ended at sparsity" in proc.stderr


@pytest.mark.slow
def test_multirun_jobs_each_have_their_own_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(
        ["-m", "optimizer=sgd,adamw", "pruning=none", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
         "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
         f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert "optimizer-sgd" in jobs[0].name and "optimizer-adamw" in jobs[1].name
    records = []
    for job, name in zip(jobs, ("sgd", "adamw"), strict=True):
        (run,) = (job / "wandb").glob("offline-run-*")
        records.append(_wandb_records(run))
        assert f"optimizer={name}".encode() in records[-1]
        assert f"quickstart/{sweep.name}".encode() in records[-1]  # grouped by sweep
    assert b"optimizer=adamw" not in records[0]  # job 1 did not write into job 0's run


@pytest.mark.slow
def test_optuna_objective_is_the_validation_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = _run(
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
         "pruning=none", "logger=none", "trainer.max_epochs=1", *TINY[:5], f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 < best["best_value"] <= 1.0
    accs = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(accs) == 2 and all(a["optimized"] == a["optimized"] for a in accs)  # no NaN
    assert best["best_value"] == pytest.approx(max(a["optimized"] for a in accs))


@pytest.mark.slow
def test_ddp_cpu_run(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = _run(
        ["trainer=ddp_cpu", "trainer.max_epochs=1", *TINY[:4], "optimizer=sgd", "preconditioner=mfac",
         "preconditioner.ngrads=4", "pruning=none", "logger=csv", f"hydra.run.dir={run_dir}"],
        tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "test/acc" in summary["test"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("MFACPreconditioner")]
    assert state["preconditioners"][0]["fisher"]["count"] == 4
    # The sharded window's per-rank files are beside each kept checkpoint, and only there.
    manifest = state["preconditioners"][0]["fisher"]["window"]
    assert manifest["directory"] == str(run_dir / "checkpoints" / "last.ckpt.mfac-window")
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    folders = sorted((run_dir / "checkpoints").glob("*.ckpt.mfac-window"))
    assert [f"{c.name}.mfac-window" for c in ckpts] == [f.name for f in folders]
    for ckpt in ckpts:
        (saved,) = [v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
                    if k.startswith("MFACPreconditioner")]
        named = sorted(name for _, _, name in saved["preconditioners"][0]["fisher"]["window"]["files"])
        assert sorted(p.name for p in Path(f"{ckpt}.mfac-window").iterdir()) == named and len(named) == 2
    assert not (run_dir / "mfac-window-shards").exists()


def _window_manifest(ckpt: Path) -> dict:
    (state,) = [v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
                if k.startswith("MFACPreconditioner")]
    return state["preconditioners"][0]["fisher"]


def test_fsdp2_cpu_run_shards_the_window_and_resumes(tmp_path):
    """``trainer=fsdp2_cpu``: the real app under ModelParallelStrategy (fully_shard by the task's
    configure_model) on 2 gloo processes, gradual OBS pruning to 50 % in 2 epochs; each rank's
    window holds only its shards' columns, in its own file beside the checkpoint, the summary counts
    the zeros of every shard, and a second run resumes from the checkpoint with its masks."""
    run_dir = tmp_path / "fsdp2"
    common = ["trainer=fsdp2_cpu", *TINY[:4], "optimizer=adamw", "preconditioner=mfac",
              "preconditioner.ngrads=4", "pruning=mfac", *TINY[5:8], "pruning.callback.sparsity=0.5",
              "logger=csv"]
    proc = _run([*common, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "test/acc" in summary["test"]
    assert summary["global_sparsity"] == pytest.approx(0.5, abs=1e-3)  # both ranks' zeros: half the weights
    last = run_dir / "checkpoints" / "last.ckpt"
    fisher = _window_manifest(last)
    assert fisher["count"] == 8
    window = fisher["window"]
    per_rank: dict[str, int] = {}
    for start, stop, name in window["files"]:
        per_rank[name] = per_rank.get(name, 0) + stop - start
    assert len(per_rank) == 2 and all(0 < n < window["dim"] for n in per_rank.values())
    assert sum(per_rank.values()) == window["dim"]  # the shards tile the parameters exactly once
    assert sorted(p.name for p in Path(f"{last}.mfac-window").iterdir()) == sorted(per_rank)

    resumed_dir = tmp_path / "resumed"
    proc = _run([*common, "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={resumed_dir}"],
                tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 4 more gradients entered the resumed window: the restored one, not an empty one, was kept;
    # the masks came back with the checkpoint and still hold.
    assert _window_manifest(resumed_dir / "checkpoints" / "last.ckpt")["count"] == 12
    resumed = json.loads((resumed_dir / "summary.json").read_text())
    assert resumed["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(("group", "needle"), [("hparams_search=optuna", "OptunaSweeper"), ("launcher=slurm", "submitit")])
def test_sweep_and_launcher_configs_compose(group, needle):
    cfg = _compose([group], hydra=True)
    node = cfg.hydra.sweeper if "optuna" in group else cfg.hydra.launcher
    assert needle in str(node._target_)
    if "optuna" in group:
        # The searched keys exist in the default run (a typo would search nothing).
        plain = _compose([])
        for key in node.params:
            assert OmegaConf.select(plain, key) is not None, key


@pytest.mark.parametrize(
    ("overrides", "module", "extra"),
    [(["optimizer=singd"], "singd", "baselines"), (["optimizer=soap"], "pytorch_optimizer", "baselines")],
)
def test_a_missing_optional_package_is_one_config_error(monkeypatch, overrides, module, extra):
    """Without the extra installed, the run stops before training with the pip command to run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=rf"needs the `{module}` package.*lightning-mfac\[{extra}\]"):
        validate_config(cfg)


@pytest.mark.parametrize(("overrides", "node"), [
    (["optimizer=mfac"], "optimizer"), ([], "optimizer"), (["optimizer=sgd", "preconditioner=mfac"], "preconditioner"),
])
def test_window_settings_are_all_overridable_from_the_command_line(overrides, node):
    """Every WindowConfig field (but the process group, an object) is in the config, so
    `mfac-train optimizer.window.kernels=torch` works without Hydra's `+`, and the defaults match."""
    import dataclasses

    from lightning_mfac.fisher.config import WindowConfig

    window = _compose(overrides)[node].window
    fields = {f.name: f.default for f in dataclasses.fields(WindowConfig) if f.name != "process_group"}
    assert set(window) == set(fields)
    assert WindowConfig.coerce(dict(window)) == WindowConfig()
    assert _compose([*overrides, f"{node}.window.kernels=torch"])[node].window.kernels == "torch"


def test_help_into_a_reader_that_leaves_early_is_no_traceback(tmp_path):
    """`mfac-train --help | head -2`: the reader is gone before the help is written (closed here
    at once, seconds before the interpreter has started)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*MFAC_TRAIN, "--help"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err  # 128 + SIGPIPE: the write hit the closed pipe
    assert "Traceback" not in err, err
