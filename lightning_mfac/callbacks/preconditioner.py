"""``MFACPreconditioner``: M-FAC second-order preconditioning for any optimizer in a Lightning run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mfac import _validation as check
from lightning_mfac.callbacks._guards import check_full_gradients, check_strategy
from lightning_mfac.callbacks.window_shards import use_window_shard_checkpoint_io
from lightning_mfac.fisher.config import DynamicConfig, WindowConfig
from lightning_mfac.fisher.storage import rank_local, rank_local_value
from lightning_mfac.optim.flat import FlatPreconditioner, check_masks
from lightning_mfac.optim.fsdp import local
from lightning_mfac.optim.grafting import GRAFTS, make_grafting
from lightning_mfac.optim.masking import Masks
from lightning_mfac.selection import match_names, name_patterns


class MFACPreconditioner(Callback):
    r"""Replace the gradients of the selected parameters by ``F⁻¹(g + weight_decay·w)`` before each
    optimizer step, where ``F = λI + (1/m)·GᵀG`` is the empirical Fisher of the last ``m`` gradients
    (dynamic M-FAC, Frantar, Kurtic & Alistarh, NeurIPS 2021). The configured optimizer then steps
    on the preconditioned gradient.

    Equivalence with the :class:`~lightning_mfac.MFAC` optimizer: ``SGD(lr)`` (no momentum, weight
    decay, dampening or Nesterov) plus this callback makes the same steps as
    ``MFAC(lr, momentum=0, weight_decay)`` with the same ``ngrads``, ``damp`` and ``window``, as long
    as the gradient is not clipped. Lightning clips after ``on_before_optimizer_step``, so with
    clipping the two differ: here the window stores the raw gradient and the clip bounds
    ``F⁻¹g``; with ``MFAC`` the clip bounds the raw gradient, which then enters the window. SGD
    momentum is not MFAC's momentum either (MFAC averages ``v = μv + (1−μ)u`` from ``v = 0``).

    How it fits the training loop (Lightning calls ``on_before_optimizer_step`` once per optimizer
    step, after the closure and before clipping):

    * gradient accumulation: one window entry per optimizer step, from the accumulated gradient;
    * gradient clipping: the trainer clips the preconditioned gradient;
    * a parameter without a gradient in a step contributes zeros to the window and keeps
      ``grad=None``, so the optimizer leaves it alone (as ``torch.optim`` and ``MFAC`` do);
    * ``16-mixed``: the window stores unscaled gradients. Lightning unscales them for ordinary
      optimizers; for those that unscale inside their step (``fused=True`` SGD/Adam/AdamW) the
      callback calls the grad scaler's ``unscale_`` itself, so the optimizer sees the scaler's
      usual contract. A non-finite gradient never enters the window and the scaler, which has
      found it, skips the step;
    * without a scaler, a non-finite gradient stays out of the window and the step is skipped on
      the device: through the optimizer's ``found_inf`` for optimizers that take it (``fused=True``),
      else by handing the optimizer a zero gradient (an exact skip for plain SGD). The count is
      logged as ``mfac/nonfinite_steps`` and a warning is given at the end of the epoch;
    * nothing in the step reads a device value on the host: statistics are logged as tensors;
    * strategies: a single device, DDP (gradients are all-reduced before this hook;
      ``window.storage="auto"`` shards the window over the ranks) or FSDP2
      (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``: each rank keeps the
      window columns of its own parameter shards). FSDP1 and DeepSpeed are refused at ``setup``;
    * each ``fit`` starts afresh: the windows belong to the parameters (by identity) of the run,
      unless the run resumes from a checkpoint, which restores them;
    * checkpoints: window, factorization and counters go through ``state_dict``;
      ``save_window=False`` leaves the window out (a resumed run re-warms it, with a warning).
      A checkpoint written with another ``ngrads``, window dtype or parameter selection starts an
      empty window; another ``damp`` keeps the window and refactorizes it with the new ``damp``;
      either way one warning names the old and new values.

    Args:
        ngrads: window size ``m``.
        damp: dampening ``λ`` (``damp_mode="absolute"``) or the factor ``δ`` of
            ``λ = δ·mean(diag GGᵀ)/m`` (``damp_mode="relative"``: follows the gradients' scale).
        weight_decay: added to the gradient before preconditioning (leave the optimizer's at 0).
        window: a :class:`~lightning_mfac.fisher.config.WindowConfig` or a mapping of its fields
            (dtype, storage, page_cols, page_budget_bytes, refactor_every, kernels, process_group,
            shard_dir). Under DDP the window is sharded by default and checkpointed as one file per
            rank beside each checkpoint, in ``<checkpoint>.mfac-window/``.
        params: ``None`` for all trainable parameters of the optimizer, else names / ``"re:<regex>"``.
        optimizers: ``None`` for every optimizer of the run, else the index or indices to precondition.
        save_window: include the window in checkpoints.
        log_stats: log the window fill and ``‖F⁻¹g‖/‖g‖`` (as device tensors, no host read).
        graft: ``None``, ``"sgd"`` or ``"adam"``: rescale ``F⁻¹g`` per parameter tensor to the norm
            of that method's direction on the same gradient, so the optimizer keeps the lr tuned
            without the callback (see :mod:`lightning_mfac.optim.grafting`). With several
            preconditioned optimizers each gets its own grafting state.
        damp_mode: ``"absolute"`` or ``"relative"`` (how ``damp`` is read, see above).
    """

    def __init__(
        self,
        ngrads: int = 1024,
        damp: float = 1e-5,
        weight_decay: float = 0.0,
        window: WindowConfig | dict[str, Any] | None = None,
        params: list[str] | str | None = None,
        optimizers: int | list[int] | None = None,
        save_window: bool = True,
        log_stats: bool = True,
        graft: Any = None,
        damp_mode: str = "absolute",
    ) -> None:
        #: The window's settings, checked once (``ngrads``, ``damp``, ``damp_mode``, ``window``).
        cfg = self.config = DynamicConfig(ngrads, damp, damp_mode, window)
        self.ngrads, self.damp, self.damp_mode, self.window = cfg.ngrads, cfg.damp, cfg.damp_mode, cfg.window
        self.weight_decay = check.nonnegative_float("weight_decay", weight_decay)
        self.params = name_patterns(params)
        if isinstance(optimizers, int):
            optimizers = [optimizers]
        if optimizers is not None:
            if not isinstance(optimizers, (list, tuple)) or not optimizers:
                raise ValueError(f"optimizers={optimizers!r} is invalid: expected None, an index or a list of indices.")
            for i in optimizers:
                check.positive_int("optimizers", i, minimum=0)
        self.optimizers = None if optimizers is None else sorted(set(optimizers))
        self.save_window = bool(save_window)
        self.log_stats = bool(log_stats)
        self.graft = check.one_of("graft", graft, (None, *GRAFTS))
        self._start_fit()

    @property
    def state_key(self) -> str:
        # Not ngrads or damp: a run resumed with other values must still find its state (and say
        # what changed) instead of having Lightning drop it.
        return self._generate_state_key(params=self.params, optimizers=self.optimizers)

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps of this fit whose gradient was not finite (reads a device counter)."""
        return int(self._nonfinite)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, "MFACPreconditioner")
        self._start_fit()
        use_window_shard_checkpoint_io(trainer)  # a sharded window's checkpoint: every rank's columns

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimizers is not None and max(self.optimizers) >= len(trainer.optimizers):
            raise ValueError(
                f"optimizers={self.optimizers} is invalid: the run configures {len(trainer.optimizers)} optimizer(s)."
            )
        for idx, optimizer in enumerate(trainer.optimizers):
            if self._wants(idx):
                self._build(idx, pl_module, optimizer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), None)
        if idx is None or not self._wants(idx):
            return
        if idx not in self._pre:  # driven without on_fit_start (e.g. a hand-written loop)
            self._build(idx, pl_module, optimizer)
        pre = self._pre[idx]
        self._check_unchanged(idx, pl_module, optimizer)
        has_grad = pre.with_grad()
        if not any(has_grad):
            return  # no backward this step (training_step returned None): nothing to add
        scaler = _grad_scaler(trainer)
        handles_scaling = getattr(optimizer, "_step_supports_amp_scaling", False)
        if scaler is not None and handles_scaling:
            _unscale(scaler, optimizer)
        g = pre.gradient(self.weight_decay, has_grad)
        # A non-finite g left the window untouched and gave a zero direction: a skipped step for
        # plain SGD. With a scaler, the found_inf of unscale_ makes it skip; a fused optimizer
        # without one takes the flag itself. No host read either way.
        u, finite = pre.precondition(g)
        if idx in self._grafts:  # in place on the direction; a skipped step keeps the grafting state
            self._grafts[idx].graft_(pre.direction_views, pre.gradient_views, finite, has_grad)
        self._count_nonfinite(finite)
        if scaler is None and handles_scaling:
            optimizer.found_inf = (~finite).to(torch.float32)
        # As torch.optim leaves a parameter without gradient alone, so does the preconditioner.
        with torch.no_grad():
            torch._foreach_copy_(
                [local(p.grad) for p, has in zip(pre.params, has_grad, strict=True) if has],
                [v for v, has in zip(pre.direction_views, has_grad, strict=True) if has],
            )
        if self.log_stats:
            suffix = "" if len(trainer.optimizers) == 1 else f"_{idx}"
            stats = {
                f"mfac/window_fill{suffix}": pre.fill(),
                f"mfac/ratio{suffix}": torch.linalg.vector_norm(u) / torch.linalg.vector_norm(g).clamp_min(1e-30),
                "mfac/nonfinite_steps": self._nonfinite.to(torch.float32),
            }
            pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = self.nonfinite_steps  # one host read per epoch
        if count > self._warned_nonfinite:
            rank_zero_warn(
                f"MFACPreconditioner: {count - self._warned_nonfinite} optimizer step(s) of this epoch had a "
                "non-finite gradient; they were kept out of the M-FAC window and skipped"
                + (" by the AMP grad scaler." if _grad_scaler(trainer) is not None else ".")
            )
            self._warned_nonfinite = count

    # ------------------------------------------------------------------ pruning integration
    def apply_masks(self, masks: Masks) -> None:
        """Zero pruned coordinates (``masks[param]`` False) in every stored gradient, so the window
        no longer carries them (the :class:`~lightning_mfac.optim.masking.MaskableWindow`
        protocol; ``OBSPruning`` calls it after each pruning step)."""
        for idx, pre in self._pre.items():
            pre.apply_masks(masks)
            if idx in self._grafts:
                self._grafts[idx].apply_masks(check_masks(pre.params, masks, "MFACPreconditioner", pre.names))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        windows = {idx: self._window_state(idx) for idx in self._pre}
        windows.update({idx: s for idx, s in self._pending.items() if idx not in windows})
        return {"preconditioners": windows, "nonfinite_steps": self.nonfinite_steps, "save_window": self.save_window}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._nonfinite = int(state_dict.get("nonfinite_steps", 0))
        self._warned_nonfinite = self._nonfinite
        self._pending = {int(k): v for k, v in state_dict.get("preconditioners", {}).items()}
        for idx in list(self._pending):
            if idx in self._pre:
                self._restore(idx)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint written with other ``params``/``optimizers`` holds its state under another
        # key. When it is the only MFACPreconditioner state and no other instance claims it, adopt
        # it, so the change is reported (and the window rebuilt) instead of silently dropped.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = type(self).__qualname__ + "{"
        ours = [k for k in states if isinstance(k, str) and k.startswith(prefix)]
        claimed = {cb.state_key for cb in trainer.callbacks if isinstance(cb, MFACPreconditioner)}
        if len(ours) == 1 and ours[0] not in claimed:
            self.load_state_dict(states[ours[0]])

    # ------------------------------------------------------------------ internals
    def _start_fit(self) -> None:
        """Forget everything of a previous fit: windows, parameters, pending state, counters."""
        self._pre: dict[int, FlatPreconditioner] = {}
        self._config = self.config  # with the run's shard directory once ``setup`` knows it
        self._grafts: dict[int, Any] = {}
        self._names: dict[int, list[str]] = {}
        self._signatures: dict[int, tuple[int, ...]] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._model_shapes: dict[str, tuple[int, ...]] = {}
        self._nonfinite: torch.Tensor | int = 0
        self._warned_nonfinite = 0

    def _wants(self, idx: int) -> bool:
        return self.optimizers is None or idx in self.optimizers

    def _select(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> tuple[list[str], list]:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in owned and p.requires_grad]
        if self.params is not None:
            keep = set(match_names([n for n, _ in named], self.params))
            named = [(n, p) for n, p in named if n in keep]
        if not named:
            raise ValueError(
                f"params={self.params!r} selects no trainable parameter of the optimizer "
                f"{type(optimizer).__name__}: expected at least one."
            )
        check_full_gradients(pl_module, named, "MFACPreconditioner")
        return [n for n, _ in named], [p for _, p in named]

    def _build(self, idx: int, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        names, params = self._select(pl_module, optimizer)
        self._pre[idx] = FlatPreconditioner(params, self._config, owner="MFACPreconditioner", names=names)
        self._names[idx] = names
        if self.graft is not None:
            self._grafts[idx] = make_grafting(self.graft)
            if self._pre[idx].layout is not None:  # FSDP2: per-tensor norms of this rank's shards
                self._grafts[idx].sharded_norms, self._grafts[idx].norm_group = True, self._pre[idx].layout.group
        self._signatures[idx] = _signature(optimizer)
        self._model_shapes = {n: tuple(p.shape) for n, p in pl_module.named_parameters()}
        if idx in self._pending:
            self._restore(idx)

    def _check_unchanged(self, idx: int, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # Re-selecting walks every named parameter: only when the optimizer's lists changed.
        signature = _signature(optimizer)
        if signature == self._signatures[idx]:
            return
        names, params = self._select(pl_module, optimizer)
        before = self._pre[idx].params
        if len(params) != len(before) or any(p is not q for p, q in zip(params, before, strict=False)):
            old = self._names[idx]
            raise RuntimeError(
                "MFACPreconditioner: the preconditioned parameters changed after the M-FAC window was built "
                f"({len(old)} tensors before, {len(names)} now; new: {[n for n in names if n not in old][:4]}, "
                f"gone: {[n for n in old if n not in names][:4]}). The window's coordinates belong to the "
                "parameter tensors it was built for: start a new fit after changing the model or the optimizer."
            )
        self._signatures[idx] = signature

    def _window_state(self, idx: int) -> dict[str, Any]:
        pre = self._pre[idx]
        state = {
            "ngrads": pre.config.ngrads,
            "damp": pre.config.damp,
            "damp_mode": pre.config.damp_mode,
            "dtype": _dtype_name(pre.dtype),
            **pre.state_dict(include_window=self.save_window),  # with the parameter names
        }
        if idx in self._grafts:
            graft = self._grafts[idx].state_dict()
            # FSDP2: the moments are of this rank's shards, so they go into this rank's file.
            state["graft"] = rank_local(graft) if pre.layout is not None and self._grafts[idx].per_coordinate_state else graft
        return state

    def _restore(self, idx: int) -> None:
        state = self._pending.pop(idx)
        pre, names = self._pre[idx], self._names[idx]
        saved = list(zip(state["names"], [tuple(s) for s in state["shapes"]], strict=True))
        foreign = [(n, s) for n, s in saved if self._model_shapes.get(n) != s]
        if foreign:
            name, shape = foreign[0]
            here = self._model_shapes.get(name)
            raise RuntimeError(
                "MFACPreconditioner: the checkpoint's M-FAC window belongs to a different model: its parameter "
                f"{name!r} of shape {shape} is " + ("not in this model" if here is None else f"of shape {here} here")
                + f" ({len(foreign)} of {len(saved)} saved parameters do not match). Resume from a checkpoint "
                "of this model, or drop the callback state from the checkpoint."
            )
        saved_names = [n for n, _ in saved]
        if saved_names == names and idx in self._grafts and state.get("graft") is not None:
            self._grafts[idx].load_state_dict(rank_local_value(state["graft"]))  # per-parameter: kept unless they changed
        message = pre.restore(state)
        if message is not None:
            rank_zero_warn(message)

    def _count_nonfinite(self, finite: torch.Tensor) -> None:
        # A device counter (no host read); a restored count is a Python int until the first step.
        self._nonfinite = (~finite).to(torch.int64) + self._nonfinite


def _signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    return tuple(id(p) for group in optimizer.param_groups for p in group["params"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _grad_scaler(trainer: pl.Trainer) -> Any:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _unscale(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the gradients of an optimizer that would unscale inside its own step (Lightning
    leaves those scaled), so that the window stores true gradients; ``scaler.step`` then passes
    ``grad_scale=None`` and the ``found_inf`` that ``unscale_`` computed on the device."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as err:
        if "already been called" not in str(err):  # unscaled earlier in this step: nothing to do
            raise
