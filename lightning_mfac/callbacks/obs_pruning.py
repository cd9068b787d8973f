r"""``OBSPruning``: gradual Optimal Brain Surgeon pruning with M-FAC during a Lightning run."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.utils.data import DataLoader

from lightning_mfac._files import atomic_save
from lightning_mfac.callbacks._guards import check_strategy
from lightning_mfac.optim.fsdp import is_dtensor, local, local_rows
from lightning_mfac.optim.masking import broadcast_masks
from lightning_mfac.pruning.config import OBSConfig
from lightning_mfac.pruning.masks import layer_sparsities, sparsity_of
from lightning_mfac.pruning.oneshot import (
    check_masks,
    check_target,
    collect_gradients,
    cycle_batches,
    mask_weights,
    preserved_norm_stats,
    prune_step,
    sparse_state_dict,
)
from lightning_mfac.pruning.schedule import gradual_schedule, ngrads_for, recomputation_targets
from lightning_mfac.pruning.selection import check_nm, select_parameters

__all__ = ["OBSPruning"]


class OBSPruning(Callback):
    r"""Prune the weights of the model gradually with Optimal Brain Surgeon on the static M-FAC
    inverse Fisher (Frantar, Kurtic & Alistarh, NeurIPS 2021), fine-tuning in between.

    At the start of each pruning epoch (before that epoch trains) the callback samples ``m``
    gradients of the training loss at the current weights, restricted to the weights still
    alive, builds ``F⁻¹`` of ``F = λI + (1/m)Σᵢ gᵢgᵢᵀ`` and prunes the weights of lowest saliency
    ``ρᵢ = wᵢ² / (2[F⁻¹]ᵢᵢ)`` up to the step's target sparsity, correcting the survivors by the OBS
    update ``δw = −F⁻¹v`` (``v_q = w_q/[F⁻¹]_qq`` on the pruned set); see
    :func:`lightning_mfac.oneshot_prune` for the step itself, configured by the same
    :class:`~lightning_mfac.pruning.config.OBSConfig`. Pruning before an epoch means the
    epoch fine-tunes the freshly pruned network, and the last step leaves at least that epoch
    to recover.

    Schedule: steps at ``start_epoch, start_epoch + frequency, …`` up to ``end_epoch`` with
    targets ``"cubic"`` ``s_j = s_f(1 − (1 − (j+1)/n)³)`` (Zhu & Gupta 2017), ``"linear"``
    ``s_j = s_f (j+1)/n``, or an explicit list (e.g. ``[0.5, 0.75, 0.875, 0.9375]``, one entry per
    step). See :mod:`lightning_mfac.pruning.schedule`.

    Gradients come from the module's own ``training_step`` on batches of
    ``trainer.train_dataloader`` (moved by ``trainer.strategy.batch_to_device``, so the module's
    batch-transfer hooks apply), back-propagated with ``torch.autograd.grad`` so the ``.grad``
    fields are untouched. The sampling pass leaves no trace in the run: what ``training_step``
    logs meanwhile is validated as in training and then discarded (it goes to a scratch result
    collection, not into the epoch's aggregated metrics); the module is in train mode, as for the training gradients that the Fisher approximates, but
    BatchNorm running statistics and torchmetrics states are restored afterwards; and the RNG
    streams are forked, so data order and dropout of the training run are the same as without
    pruning. Pass ``loss_fn(pl_module, batch)`` to use another loss (required for manual
    optimization, whose ``training_step`` steps the optimizer itself).

    Between pruning steps the masks are enforced: gradients of pruned weights are zeroed in
    ``on_after_backward`` (before any ``on_before_optimizer_step``, so a
    :class:`~lightning_mfac.MFACPreconditioner` never sees them, whatever the callback order),
    again in ``on_before_optimizer_step`` (in case a callback before this one rewrote them), and
    the weights are re-masked right after every ``optimizer.step()`` through an optimizer step
    post-hook. At each pruning step the optimizer state of pruned weights (SGD ``momentum_buffer``,
    Adam ``exp_avg``/``exp_avg_sq``, any state tensor shaped like the weight) is zeroed and
    every callback and optimizer that implements the
    :class:`~lightning_mfac.optim.masking.MaskableWindow` protocol receives the masks (keyed by
    parameter) through ``apply_masks``, so M-FAC windows drop the pruned coordinates. Pruned
    weights therefore never revive.

    Masks, the position in the schedule and the history are part of the checkpoint; a resumed
    run continues the schedule exactly (given deterministic data order, as for any resumed run).
    Without a checkpoint every ``fit`` starts afresh: a callback object reused for another model
    neither applies nor reports the masks of the previous one.
    Under DDP every rank runs the step on its own batches and rank 0's weights and masks are then
    broadcast, so replicas stay identical. Under FSDP2 (``ModelParallelStrategy`` with
    ``fully_shard``) each sampled gradient is the gradient of the global batch (every rank's batch,
    averaged by FSDP2), gathered into full rows on every rank; the step runs on full copies of the
    selected weights, rank 0's result is broadcast and each rank keeps its rows, so the masks are
    those of one process on the global batch. The masks stay full-size on every rank (the
    checkpoint holds them whole); the step's gradient matrix and weights are full-size too, so
    pruning needs the memory of one process, while training between the steps stays sharded.
    FSDP1 and DeepSpeed are refused at ``setup``.

    Args:
        sparsity: final fraction of zeros over the selected weights, in ``[0, 1)``; ``None`` with an
            explicit list (its last entry) or an ``"N:M"`` pattern (``1 − N/M``).
        start_epoch: epoch of the first pruning step.
        end_epoch: epoch of the last step, where ``sparsity`` is reached (``None``: a list
            schedule's own end, else ``start_epoch`` -- a single step).
        frequency: epochs between pruning steps.
        schedule: ``"cubic"``, ``"linear"`` or a list of sparsities, one per step.
        obs: the pruning step's settings, an :class:`~lightning_mfac.pruning.config.OBSConfig` or a
            mapping of its fields: method (``"mfac"`` or the ``"magnitude"`` baseline), ngrads
            (an int, or ``{sparsity: m}`` with key 0), damp, block_size, recomputations (sub-steps
            per pruning step, each with fresh gradients), scope, pattern, params (``None``: the
            weights of Linear and Conv layers) and window (page size, kernels, … of the static
            inverse).
        make_permanent: at the end of ``fit`` apply the masks a last time, stop enforcing them
            (the hooks are removed) and export the sparse weights to ``export_path`` (default
            ``<default_root_dir>/obs_pruning_sparse.pt``). Masks are applied to the weights
            directly, so unlike ``ModelPruning`` there is no re-parametrization to remove.
        export_path: if set, ``torch.save`` a state dict with every pruned weight as a sparse COO
            tensor (:func:`lightning_mfac.pruning.sparse_state_dict`) there at the end of ``fit``
            (rank zero), with or without ``make_permanent``.
        loss_fn: optional ``loss_fn(pl_module, batch) -> scalar`` replacing ``training_step``.
        verbose: log a per-layer sparsity table after each pruning step (rank zero, ``logging`` INFO).
    """

    def __init__(
        self,
        sparsity: float | None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        schedule: str | Sequence[float] = "cubic",
        obs: OBSConfig | Mapping[str, Any] | None = None,
        make_permanent: bool = False,
        export_path: str | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None,
        verbose: bool = True,
    ) -> None:
        self.obs = OBSConfig.coerce(obs)
        nm = self.obs.nm
        if sparsity is None and nm is not None and isinstance(schedule, str):
            sparsity = 1.0 - nm[0] / nm[1]
        self.steps = gradual_schedule(sparsity, schedule, start_epoch, end_epoch, frequency)
        self.sparsity = check_target(self.steps[-1][1], nm)
        self.schedule = schedule if isinstance(schedule, str) else [float(s) for s in schedule]
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn={loss_fn!r} is invalid: expected None or a callable loss_fn(pl_module, batch).")
        self.loss_fn = loss_fn
        self.make_permanent = bool(make_permanent)
        self.export_path = export_path
        self.verbose = bool(verbose)
        self._handles: list[Any] = []
        self._start_fit()

    def _start_fit(self) -> None:
        """Forget the masks, schedule position and history of a previous fit."""
        self.masks: dict[str, torch.Tensor] | None = None
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []
        self._named: dict[str, torch.nn.Parameter] = {}
        self.exported_to: str | None = None
        self._remove_hooks()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, "OBSPruning")
        # A checkpoint, if any, is restored after setup: a reused callback starts afresh here.
        self._start_fit()
        # Fail at setup, not at the first pruning epoch, on a wrong selection or pattern.
        named = select_parameters(pl_module, self.obs.params)
        check_nm(named, self.obs.nm)
        if self.obs.method == "mfac" and self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "loss_fn=None is invalid with manual optimization: its training_step steps the optimizer. "
                "Pass loss_fn(pl_module, batch) -> scalar loss for the pruning gradients."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Weights, callback state and optimizer state are all restored by now (resumed runs).
        self._named = select_parameters(pl_module, self.obs.params)
        self.masks = check_masks(self.masks, self._named)
        mask_weights(self._named, self.masks)
        self._mask_optimizer_state(trainer)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = [j for j, (e, _) in enumerate(self.steps) if j >= self.steps_done and e <= epoch]
        if not due:
            return
        # Normally one step; after a resume with a changed schedule, catch up in one step.
        self._prune(trainer, pl_module, due[-1])
        self.steps_done = due[-1] + 1

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mask_grads()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._mask_grads()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None or not self._named:
            return
        mask_weights(self._named, self.masks)
        path = self.export_path
        if path is None and self.make_permanent:
            path = os.path.join(trainer.default_root_dir, "obs_pruning_sparse.pt")
        if path is not None:
            state = sparse_state_dict(pl_module, self.masks)  # every rank: FSDP2 shards are gathered
            if trainer.is_global_zero:
                atomic_save(state, path)
                self.exported_to = path
        if self.make_permanent:
            self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        masks = None if self.masks is None else {n: m.detach().cpu() for n, m in self.masks.items()}
        return {"masks": masks, "steps_done": self.steps_done, "history": list(self.history), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [(int(e), float(s)) for e, s in state_dict.get("steps", [])]
        if saved and saved != self.steps:
            rank_zero_warn(
                f"OBSPruning: the checkpoint was written with the schedule {saved}, this callback has "
                f"{self.steps}; continuing from step {state_dict['steps_done']} of the new schedule."
            )
        self.masks = state_dict["masks"]
        self.steps_done = int(state_dict["steps_done"])
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ pruning
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        assert self.masks is not None
        epoch, target = self.steps[index]
        start = time.perf_counter()
        used = 0
        masks = self.masks
        show_bar = trainer.is_global_zero and _progress_bar_enabled(trainer)
        obs, subs = self.obs, recomputation_targets(sparsity_of(masks), target, self.obs.recomputations)
        source = "training_step" if self.loss_fn is None else "loss_fn"
        # FSDP2: the step runs on full copies of the weights, the same on every rank (gathered, and
        # rank 0's result broadcast), and each rank keeps its rows of the result.
        sharded = any(is_dtensor(p) for p in self._named.values())
        named = {n: p.full_tensor().detach().clone() for n, p in self._named.items()} if sharded else self._named
        with self._sampling_context(trainer, pl_module):
            stream = self._losses(trainer, pl_module)
            for sub, sub_target in enumerate(subs):
                desc = f"OBSPruning step {index + 1}/{len(self.steps)}: gradients"
                if len(subs) > 1:
                    desc += f" ({sub + 1}/{len(subs)})"

                def gradients(rows: int, _masks=masks, _desc=desc) -> torch.Tensor:
                    return collect_gradients(
                        self._named, _masks, stream, rows, None, show_bar, _desc, source, window=obs.window,
                        module=pl_module,
                    )

                masks = prune_step(named, masks, sub_target, obs, gradients=gradients)
                used += ngrads_for(obs.ngrads, sub_target) if obs.method == "mfac" else 0
                if sharded:  # the next sub-step samples gradients at the corrected weights
                    masks = self._synchronize(trainer, masks, named)
        self.masks = masks if sharded else self._synchronize(trainer, masks, self._named)
        self._mask_optimizer_state(trainer)
        by_param = {p: self.masks[n] for n, p in self._named.items()}
        broadcast_masks([cb for cb in trainer.callbacks if cb is not self], by_param)
        broadcast_masks(trainer.optimizers, by_param)  # e.g. the MFAC optimizer's window
        seconds = time.perf_counter() - start
        record = {"epoch": epoch, "target": target, "sparsity": sparsity_of(self.masks), "seconds": seconds, "ngrads": used}
        self.history.append(record)
        self._log(trainer, index, record)

    def _losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[torch.Tensor]:
        """Training losses on successive training batches, skipping steps that return ``None``."""
        loaders = trainer.train_dataloader
        if loaders is None:
            raise RuntimeError("OBSPruning needs the training dataloader to sample gradients, but the trainer has none.")
        with_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        skipped = 0
        for batch_idx, batch in enumerate(cycle_batches(_sampling_iterable(loaders))):
            batch = trainer.strategy.batch_to_device(batch)
            with trainer.precision_plugin.train_step_context():
                if self.loss_fn is not None:
                    out = self.loss_fn(pl_module, batch)
                else:
                    out = pl_module.training_step(batch, batch_idx) if with_idx else pl_module.training_step(batch)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if loss is None:
                skipped += 1
                if skipped > 1000:
                    raise RuntimeError("OBSPruning: training_step returned no loss for 1000 batches in a row.")
                continue
            skipped = 0
            yield loss

    @contextlib.contextmanager
    def _sampling_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
        modes = {m: m.training for m in pl_module.modules()}
        metrics = _snapshot_metrics(pl_module)
        devices = [trainer.strategy.root_device] if trainer.strategy.root_device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), preserved_norm_stats(pl_module), _scratch_logs(
                trainer, pl_module
            ):
                pl_module.train()
                yield
        finally:
            for m, training in modes.items():
                m.training = training
            _restore_metrics(metrics)

    @torch.no_grad()
    def _synchronize(
        self, trainer: pl.Trainer, masks: dict[str, torch.Tensor], named: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Rank 0's pruned weights ``named`` and masks on every rank; FSDP2: ``named`` are the full
        copies, and each rank's shard of a weight then takes its rows of them."""
        out = dict(masks)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            for name, p in named.items():
                dist.broadcast(p.data, src=0)
                flag = masks[name].to(p.device, torch.uint8)
                dist.broadcast(flag, src=0)
                out[name] = flag.bool()
        for name, p in self._named.items():
            if is_dtensor(p):
                local(p).copy_(local_rows(p, named[name]))
        return out

    # ------------------------------------------------------------------ enforcement
    @torch.no_grad()
    def _mask_grads(self) -> None:
        if self.masks is None:
            return
        for name, p in self._named.items():
            if p.grad is not None:
                local(p.grad).mul_(local_rows(p, self.masks[name]))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.masks is not None:
            mask_weights(self._named, self.masks)

    @torch.no_grad()
    def _mask_optimizer_state(self, trainer: pl.Trainer) -> None:
        # Momentum or Adam moments of a pruned weight would move it off zero at the next step.
        assert self.masks is not None
        by_id = {id(p): self.masks[n] for n, p in self._named.items()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    mask = by_id.get(id(p))
                    for value in optimizer.state.get(p, {}).values() if mask is not None else ():
                        if isinstance(value, torch.Tensor) and value.shape == p.shape:
                            local(value).mul_(local_rows(p, mask).to(value.device, value.dtype))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ reporting
    def _log(self, trainer: pl.Trainer, index: int, record: dict[str, Any]) -> None:
        assert self.masks is not None
        layers = layer_sparsities(self.masks)
        metrics = {
            "pruning/sparsity": record["sparsity"],
            "pruning/target": record["target"],
            "pruning/seconds": record["seconds"],
            "pruning/ngrads": float(record["ngrads"]),
            **{f"pruning/sparsity/{name}": value for name, value in layers.items()},
        }
        if trainer.is_global_zero:
            # pl_module.log is not allowed in every logger/hook combination at epoch start.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(self._table(index, record, layers))

    def _table(self, index: int, record: dict[str, Any], layers: dict[str, float]) -> str:
        assert self.masks is not None
        width = max(len("layer"), *(len(n) for n in layers))
        head = (
            f"OBSPruning step {index + 1}/{len(self.steps)} (epoch {record['epoch']}, {self.obs.method}): "
            f"target {record['target']:.4f}, reached {record['sparsity']:.4f} in {record['seconds']:.2f}s"
        )
        lines = [head, f"| {'layer':<{width}} | {'shape':<18} | {'weights':>9} | {'zeros':>9} | sparsity |"]
        lines.append(f"|{'-' * (width + 2)}|{'-' * 20}|{'-' * 11}|{'-' * 11}|----------|")
        for name, value in layers.items():
            mask = self.masks[name]
            shape = "x".join(str(s) for s in mask.shape)
            zeros = int((~mask).sum())
            lines.append(f"| {name:<{width}} | {shape:<18} | {mask.numel():>9} | {zeros:>9} | {value:>8.4f} |")
        return "\n".join(lines)


@contextlib.contextmanager
def _scratch_logs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Let ``training_step`` log as in training, into a result collection that is then dropped.

    The sampling pass runs inside ``on_train_epoch_start``, where Lightning would attribute the
    module's ``self.log`` calls to that hook (refusing ``on_step=True``) and fold the values into
    the epoch's metrics. Lightning has no public switch for this, so the training epoch loop's
    result collection and the module's current hook name are swapped for the pass.
    """
    loop = trainer.fit_loop.epoch_loop
    results, hook = loop._results, pl_module._current_fx_name
    loop._results = _ResultCollection(training=True)
    pl_module._current_fx_name = "training_step"
    try:
        yield
    finally:
        loop._results = results
        pl_module._current_fx_name = hook


def _progress_bar_enabled(trainer: pl.Trainer) -> bool:
    bar = trainer.progress_bar_callback
    return bar is not None and bool(getattr(bar, "is_enabled", True))


def _sampling_iterable(loaders: Any) -> Iterable[Any]:
    """An iterable of training batches that does not disturb the trainer's own iterator."""
    if isinstance(loaders, (list, tuple, dict)):
        combined = CombinedLoader(loaders, "max_size_cycle")
        return _Batches(combined)
    if isinstance(loaders, DataLoader) and loaders.persistent_workers and loaders.num_workers > 0:
        # iter() on a persistent-worker loader resets the one iterator the trainer is using.
        kwargs = dict(num_workers=0, collate_fn=loaders.collate_fn, pin_memory=loaders.pin_memory)
        if loaders.batch_sampler is not None:
            return DataLoader(loaders.dataset, batch_sampler=loaders.batch_sampler, **kwargs)
        return DataLoader(loaders.dataset, batch_size=loaders.batch_size, drop_last=loaders.drop_last, **kwargs)
    return loaders


class _Batches:
    """The batches of a ``CombinedLoader`` without its ``(batch, batch_idx, dataloader_idx)`` wrapping."""

    def __init__(self, combined: CombinedLoader) -> None:
        self.combined = combined

    def __iter__(self) -> Iterator[Any]:
        for batch, _, _ in self.combined:
            yield batch


def _snapshot_metrics(module: torch.nn.Module) -> list[tuple[Any, dict[str, Any]]]:
    """States of the torchmetrics ``Metric`` objects in ``module`` (a training_step may update them)."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {k: copy.deepcopy(getattr(m, k)) for k in m._defaults}
            for attr in ("_update_count", "_computed"):
                state[attr] = copy.deepcopy(getattr(m, attr, None))
            saved.append((m, state))
    return saved


def _restore_metrics(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for m, state in saved:
        for k, v in state.items():
            setattr(m, k, v)
