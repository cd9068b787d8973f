"""The real ``mfac-train`` console script: composition, end-to-end runs, multirun, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_mfac.app import config_dir
from lightning_mfac.app.cli import ConfigError, validate_config

CONF = config_dir()
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# The console script's entry point, run with this interpreter (a stale `mfac-train` on PATH may
# belong to another checkout).
MFAC_TRAIN = [sys.executable, "-m", "lightning_mfac.app.cli"]
# Tiny settings: a couple of batches per epoch, windows of 4 gradients.
TINY = [
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "preconditioner.ngrads=4",
    "pruning.callback.obs.ngrads=4",
    "pruning.callback.start_epoch=0",
    "pruning.callback.end_epoch=1",
]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*MFAC_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _compose(overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


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


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.lr=-1"], "optimizer.lr=-1"),
        (["pruning.callback.sparsity=1.0"], "pruning.callback.sparsity=1.0"),
        (["preconditioner.ngrads=0"], "preconditioner.ngrads=0"),
        (["preconditioner.damp=0"], "preconditioner.damp=0"),
        (["data.batch_size=abc"], "data.batch_size='abc'"),
        (["data=imagenet"], "data.data_dir"),
        (["data=cifar10", "data.data_dir=/nonexistent/cifar"], "data.data_dir='/nonexistent/cifar'"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(_compose(overrides))


def test_console_script_reports_bad_value_and_unknown_choice(tmp_path):
    proc = _run(["optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert proc.returncode == 2
    assert "mfac-train: error: optimizer.lr=-1 is out of range" in proc.stderr
    proc = _run(["optimizer=nesterov_adam"], tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'optimizer/nesterov_adam'" in proc.stderr and "sgd" in proc.stderr


@pytest.mark.slow
def test_quickstart_end_to_end_with_wandb_offline_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["trainer.max_epochs=2", *TINY, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mfac-train summary" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["test"]["test/acc"] <= 1.0
    assert summary["global_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert (run_dir / "sparsity.csv").read_text().startswith("layer,params,sparsity")
    # W&B offline: a real run directory inside the run's output directory.
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = wandb_run.glob("run-*.wandb")
    logged = records.read_bytes()
    # The resolved config, the training metrics and the M-FAC statistics are in the run's records.
    for needle in (b"task_name", b"val/acc", b"mfac/ratio", b"final/global_sparsity"):
        assert needle in logged, needle
    assert list((wandb_run / "files" / "media" / "table").glob("sparsity_*.table.json"))
    assert summary["logger_dir"] == str(wandb_run)
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    keys = list(state["callbacks"])
    assert any(k.startswith("OBSPruning") for k in keys) and any(k.startswith("MFACPreconditioner") for k in keys)

    resumed_dir = tmp_path / "resumed"
    proc = _run(["trainer.max_epochs=3", *TINY, f"ckpt_path={last}", f"hydra.run.dir={resumed_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    resumed = json.loads((resumed_dir / "summary.json").read_text())
    # The masks came back with the checkpoint: the sparsity is kept, not re-grown from zero.
    assert resumed["global_sparsity"] >= summary["global_sparsity"] - 1e-6


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(
        ["-m", "optimizer=sgd,adamw", "preconditioner=none", "pruning=none", "logger=csv",
         "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert (sweep / "0" / "csv").exists() and (sweep / "1" / "csv").exists()


@pytest.mark.slow
def test_ddp_cpu_run(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = _run(
        ["trainer=ddp_cpu", "trainer.max_epochs=1", *TINY, "pruning=none", "logger=csv", f"hydra.run.dir={run_dir}"],
        tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "test/acc" in summary["test"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("MFACPreconditioner")]
    assert state["preconditioners"][0]["fisher"]["count"] == 4


@pytest.mark.parametrize(("group", "needle"), [("hparams_search=optuna", "OptunaSweeper"), ("launcher=slurm", "submitit")])
def test_sweep_and_launcher_configs_compose(group, needle):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[group], return_hydra_config=True)
    node = cfg.hydra.sweeper if "optuna" in group else cfg.hydra.launcher
    assert needle in str(node._target_)
