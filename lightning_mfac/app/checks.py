"""What ``mfac-train`` checks before any training starts: every value, package, checkpoint and
folder a run needs. A failed check is a :class:`ConfigError` whose message names the config key;
the app prints it as one line and leaves no output folder."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_mfac import _validation as check
from lightning_mfac.app.tasks import TASKS
from lightning_mfac.fisher.config import DynamicConfig, WindowConfig
from lightning_mfac.fisher.storage import (
    WindowMemoryError,
    check_window_fits,
    locate_window_shards,
    plan_storage,
    window_files,
    window_shard_folder,
)
from lightning_mfac.pruning.config import OBSConfig


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def _number(cfg: DictConfig, key: str, *, minimum: float | None = None, strict: bool = False,
            below: float | None = None, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {kind}.")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected a finite number.")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{key}={value!r} is out of range: expected {kind} {'>' if strict else '>='} {minimum}.")
    if below is not None and value >= below:
        raise ConfigError(f"{key}={value!r} is out of range: expected {kind} < {below}.")


def enabled(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _is_mfac_optimizer(cfg: DictConfig) -> bool:
    target = str(OmegaConf.select(cfg, "optimizer._target_", default="") or "")
    return target.rsplit(".", 1)[-1] == "MFAC"


#: Targets that need a package of an optional extra: (module, extra).
OPTIONAL_PACKAGES = {
    "lightning_mfac.app.baselines.singd": ("singd", "baselines"),
    "lightning_mfac.app.baselines.shampoo": ("pytorch_optimizer", "baselines"),
    "lightning_mfac.app.baselines.soap": ("pytorch_optimizer", "baselines"),
    "lightning_mfac.app.baselines.muon": ("pytorch_optimizer", "baselines"),
    "lightning_mfac.app.models.bert_classifier": ("transformers", "nlp"),
    "lightning_mfac.app.models.gpt_lm": ("transformers", "nlp"),
    "lightning_mfac.app.data.GLUEDataModule": ("datasets", "nlp"),
}


def _targets(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """``(config key, _target_)`` of every instantiated object in the config."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield key or "<root>", node["_target_"]
        for k, v in node.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))


def _check_optional_packages(cfg: DictConfig) -> None:
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    for key, target in _targets({k: v for k, v in tree.items() if k != "hydra"}):
        if target in OPTIONAL_PACKAGES:
            module, extra = OPTIONAL_PACKAGES[target]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"{key} ({target.rsplit('.', 1)[-1]}) needs the `{module}` package, which is not "
                    f'installed: pip install "lightning-mfac[{extra}]".'
                )


#: Keys of a node that Hydra's ``instantiate`` reads itself, and ``model.task`` (the app's).
_NOT_ARGUMENTS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _check_arguments(cfg: DictConfig) -> None:
    """Every key of an instantiated node is a parameter of its ``_target_``: a misspelt or extra
    key (``+optimizer.foo=1``) would otherwise surface as a TypeError deep inside the run."""
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    for key, target in _targets({k: v for k, v in tree.items() if k != "hydra"}):
        try:
            obj = get_object(target)
        except Exception as err:  # noqa: BLE001 - any import failure is the same user error
            raise ConfigError(f"{key}._target_={target!r} cannot be imported: {str(err).splitlines()[0]}") from None
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
            continue
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        node = OmegaConf.select(cfg, key) if key != "<root>" else cfg
        ignored = _NOT_ARGUMENTS | ({"task"} if key == "model" else set())
        allowed = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for name in node.keys():
            if name in ignored or name in allowed:
                continue
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"did you mean {key}.{close[0]}?" if close else (
                f"expected some of {allowed}" if len(allowed) <= 16 else f"see the parameters of {target}")
            raise ConfigError(f"{key}.{name} is not a parameter of {target.rsplit('.', 1)[-1]}: {hint}.")


def _check_settings(cfg: DictConfig, key: str, config: type) -> None:
    """Build the library config ``config`` from the node at ``key`` (its fields only: the node also
    holds the surface's own arguments), turning its error into one naming ``key``."""
    node = OmegaConf.select(cfg, key, default=None)
    if not isinstance(node, DictConfig):
        return
    values = OmegaConf.to_container(node, resolve=True)
    window = values.pop("window", None)
    try:
        WindowConfig.coerce(window)
    except (ValueError, TypeError) as err:
        text = str(err)
        raise ConfigError(f"{key}.{text}" if text.startswith("window") else f"{key}.window.{text}") from None
    fields = {f.name for f in dataclasses.fields(config)} - {"window"}
    try:
        config(**{k: v for k, v in values.items() if k in fields})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}.{err}") from None


#: Optimizers that step FSDP2's DTensor shards (the others mix plain tensors into their state).
FSDP2_OPTIMIZERS = {"torch.optim.SGD": "sgd", "torch.optim.AdamW": "adamw"}


def _check_fsdp2(cfg: DictConfig) -> None:
    """``trainer=fsdp2`` (ModelParallelStrategy) runs what steps sharded parameters, nothing else."""
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if not OmegaConf.is_dict(strategy) or not str(strategy.get("_target_", "")).endswith("ModelParallelStrategy"):
        return
    target = str(OmegaConf.select(cfg, "optimizer._target_", default="") or "")
    if _is_mfac_optimizer(cfg):
        # ModelParallelStrategy checkpoints optimizers through torch.distributed.checkpoint, which
        # keeps only per-parameter state: the window would be dropped from every checkpoint.
        raise ConfigError(
            "optimizer=mfac does not run under trainer.strategy=ModelParallelStrategy (FSDP2): its "
            "checkpoints keep only per-parameter optimizer state, so the M-FAC window would be lost; use "
            "optimizer=sgd or adamw with preconditioner=mfac, whose window is saved per rank."
        )
    if target not in FSDP2_OPTIMIZERS:
        raise ConfigError(
            f"optimizer._target_={target!r} does not run under trainer.strategy=ModelParallelStrategy "
            f"(FSDP2): use optimizer={', '.join(sorted(set(FSDP2_OPTIMIZERS.values())))} (with or without "
            "preconditioner=mfac), or trainer=ddp."
        )
    kind = OmegaConf.select(cfg, "pruning.kind", default=None)
    if kind == "oneshot":
        raise ConfigError(
            "pruning.kind='oneshot' does not run under trainer.strategy=ModelParallelStrategy (FSDP2): use "
            "gradual pruning (pruning=mfac or magnitude), or one-shot with trainer=ddp or on one device."
        )
    tp = strategy.get("tensor_parallel_size", "auto")
    if tp != 1:
        raise ConfigError(
            f"trainer.strategy.tensor_parallel_size={tp!r} is not supported: the experiment models have no "
            "tensor-parallel plan; use 1 (FSDP2 data parallelism over all devices)."
        )


def validate_config(cfg: DictConfig) -> None:
    """Fail before any training starts, naming the offending key."""
    _check_optional_packages(cfg)
    _check_arguments(cfg)
    _check_fsdp2(cfg)
    _number(cfg, "seed", integer=True)
    for key in ("optimizer.lr", "optimizer.weight_decay"):
        _number(cfg, key, minimum=0)
    _number(cfg, "optimizer.momentum", minimum=0, below=1)
    # The library's own configs check the engine settings, once; their errors get the key's prefix.
    if _is_mfac_optimizer(cfg):
        _check_settings(cfg, "optimizer", DynamicConfig)
    if enabled(cfg.get("preconditioner")):
        _check_settings(cfg, "preconditioner", DynamicConfig)
    kind = OmegaConf.select(cfg, "pruning.kind", default=None)
    if kind in ("gradual", "oneshot"):
        _check_settings(cfg, "pruning.callback.obs" if kind == "gradual" else "pruning.obs", OBSConfig)
    for key in ("pruning.sparsity", "pruning.callback.sparsity"):
        _number(cfg, key, minimum=0, below=1)
    _number(cfg, "data.batch_size", minimum=1, integer=True)
    _number(cfg, "trainer.max_epochs", minimum=-1, integer=True)
    _number(cfg, "trainer.max_steps", minimum=-1, integer=True)
    _number(cfg, "trainer.accumulate_grad_batches", minimum=1, integer=True)
    if "data_dir" in cfg.data.keys():
        if OmegaConf.is_missing(cfg.data, "data_dir"):
            raise ConfigError("data.data_dir is missing: this data set needs data.data_dir=<path>.")
        path = cfg.data.data_dir
        if path is not None and not cfg.data.get("download", False) and not Path(str(path)).exists():
            hint = " (pass data.download=true to fetch it)" if "download" in cfg.data else ""
            raise ConfigError(f"data.data_dir={path!r} does not exist{hint}.")
    if cfg.model.get("task", "image") not in TASKS:
        raise ConfigError(f"model.task={cfg.model.get('task')!r} is invalid: expected one of {sorted(TASKS)}.")
    if kind not in (None, "gradual", "oneshot"):
        raise ConfigError(f"pruning.kind={kind!r} is invalid: expected 'gradual' or 'oneshot'.")
    if _is_mfac_optimizer(cfg) and enabled(cfg.get("preconditioner")):
        # F⁻¹ applied twice: the steps shrink by another factor of the Fisher and learning stalls.
        raise ConfigError(
            "optimizer=mfac with preconditioner=mfac would precondition every gradient twice: "
            "use optimizer=mfac preconditioner=none, or keep preconditioner=mfac with another optimizer."
        )
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={ckpt!r} does not exist (expected a .ckpt file written by mfac-train).")


def fit_pruning_schedule(cfg: DictConfig) -> str | None:
    """Fit a gradual schedule into ``trainer.max_epochs``; returns what was changed, if anything.

    The last pruning step runs at the start of its epoch, so it must be an epoch the run reaches.
    Named schedules (cubic, linear) are scaled into the run; an explicit list is refused.
    """
    from lightning_mfac.pruning import gradual_schedule

    if OmegaConf.select(cfg, "pruning.kind", default=None) != "gradual":
        return None
    node = cfg.pruning.callback
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if not isinstance(max_epochs, int) or max_epochs < 1:
        return None  # a step-bounded run: its length in epochs is unknown here
    start, end, freq = node.get("start_epoch", 0), node.get("end_epoch"), node.get("frequency", 1)
    schedule = node.get("schedule", "cubic")
    try:
        steps = gradual_schedule(node.get("sparsity"), OmegaConf.to_object(schedule) if OmegaConf.is_config(schedule)
                                 else schedule, start, end, freq)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pruning.callback: {err}") from err
    last = steps[-1][0]
    if last < max_epochs:
        return None
    if not isinstance(schedule, str):
        raise ConfigError(
            f"pruning.callback.schedule ends at epoch {last}, but trainer.max_epochs={max_epochs} stops before it: "
            f"give a schedule whose last step is at most epoch {max_epochs - 1}, or raise trainer.max_epochs."
        )
    new_end = max_epochs - 1
    scale = new_end / last if last else 0.0
    new_start = min(int(start * scale), new_end)
    new_freq = max(1, int(freq * scale))
    with open_dict(node):
        node.start_epoch, node.end_epoch, node.frequency = new_start, new_end, new_freq
    return (
        f"the pruning schedule (epochs {start}..{last}) does not fit trainer.max_epochs={max_epochs}: "
        f"scaled to epochs {new_start}..{new_end} (every {new_freq}) so the run reaches its target"
    )


def checkpoint_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU as data only (``weights_only=True``): a user-supplied file is
    never unpickled as code, whatever objects it names (what the app writes is tensors and
    plain containers, which load this way)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resume(cfg: DictConfig, task: pl.LightningModule) -> None:
    """A checkpoint that cannot resume this run fails here, in one line, before any training."""
    path = cfg.get("ckpt_path")
    if path is None:
        return
    try:
        state = checkpoint_state(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated or not a "
                          f"PyTorch file: {reason}).") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"ckpt_path={str(path)!r} is not a Lightning checkpoint (it has no 'state_dict').")
    saved, own = state["state_dict"], task.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise ConfigError(
            f"ckpt_path={str(path)!r} was saved from a different model than model={cfg.model._target_}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} mis-shaped tensors "
            f"(e.g. {example!r})."
        )
    try:
        files = list(window_files(locate_window_shards(state, path)))
    except (ValueError, KeyError, TypeError) as err:  # a crafted or damaged manifest
        raise ConfigError(f"ckpt_path={str(path)!r} holds a bad sharded-window manifest: {err}") from None
    for file in files:
        # A DDP run's window lives in per-rank files beside the checkpoint; without them the resume
        # would fail inside fit, after the run folder and the logger were set up.
        if not Path(file).is_file():
            raise ConfigError(
                f"ckpt_path={str(path)!r} refers to the sharded M-FAC window file {file!r}, which does not "
                f"exist: copy the folder {Path(window_shard_folder(path)).name!r} along with the checkpoint."
            )
    pruned = [k for k in state.get("callbacks", {}) if str(k).startswith("OBSPruning")]
    if pruned and OmegaConf.select(cfg, "pruning.kind", default=None) != "gradual":
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds the masks of a gradual pruning run; resuming it without "
            "pruning would let the pruned weights grow back: resume with the same pruning= choice "
            "(e.g. pruning=mfac)."
        )



def check_data(cfg: DictConfig, dm: pl.LightningDataModule) -> None:
    """The splits a run reads hold samples, and training yields at least one batch (an empty split
    would fail at the end of the run, or train on nothing)."""
    needed = ["train", "val"] + (["test"] if cfg.get("test") else [])
    for split in needed:
        dataset = getattr(dm, f"{split}_set", None)
        if dataset is None or len(dataset) > 0:
            continue
        keys = [f"data.{k}={cfg.data[k]!r}" for k in cfg.data if split in str(k)]
        raise ConfigError(f"data: the {split} split of {type(dm).__name__} is empty"
                          + (f" ({', '.join(keys)})" if keys else "") + ": expected at least one sample.")


def check_window_memory(cfg: DictConfig, task: pl.LightningModule) -> None:
    """An M-FAC window larger than the memory where it would live fails here, naming its key,
    before anything is allocated (the optimizer builds its window at the first step, inside fit)."""
    params = [p for p in task.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    device = torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    several = devices not in (1, "1", None) or OmegaConf.select(cfg, "trainer.num_nodes", default=1) != 1
    nodes = ["optimizer"] if _is_mfac_optimizer(cfg) else []
    if enabled(cfg.get("preconditioner")) and OmegaConf.select(cfg, "preconditioner.params", default=None) is None:
        nodes.append("preconditioner")  # a parameter selection: its size is known only to the callback
    for node in nodes:
        rows = OmegaConf.select(cfg, f"{node}.ngrads", default=None)
        if not isinstance(rows, int):
            continue
        window = OmegaConf.select(cfg, f"{node}.window", default=None) or {}
        storage = str(window.get("storage", "auto") or "auto")
        if storage == "sharded" or (several and storage == "auto"):
            continue  # each rank holds its share; the library checks it at allocation
        name = window.get("dtype")
        dtype = check.window_dtype(f"{node}.window.dtype", name) if name else (
            torch.float64 if params and params[0].dtype == torch.float64 else torch.float32)
        try:
            check_window_fits(rows, dim, dtype, device, plan_storage(storage, rows, dim, dtype, device, shardable=False))
        except WindowMemoryError as err:
            raise ConfigError(f"{node}.ngrads={rows}: {err}") from None


def _writable_folder(path: Path, key: str) -> None:
    """Create ``path`` (as Hydra would next) and write a probe file in it; on failure, remove the
    folders made here and raise a ConfigError naming ``key``."""
    path = path.absolute()
    made = []
    probe = path
    while not probe.exists():
        made.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                pass
        reason = err.strerror or str(err)
        raise ConfigError(f"{key}={str(path)!r} cannot hold the run's outputs ({reason}"
                          + (f": {err.filename}" if err.filename and str(err.filename) != str(path) else "")
                          + f"): choose a writable folder with {key}=<path>.") from None


class OutputFolderCheck(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): an output folder that cannot be
    created or written is one line and exit code 2, before Hydra would fail creating it with a
    traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            _writable_folder(Path(str(OmegaConf.select(config, key))), key)
        except ConfigError as err:
            if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
                print(f"mfac-train: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
