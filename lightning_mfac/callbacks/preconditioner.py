"""``MFACPreconditioner``: M-FAC second-order preconditioning for any optimizer in a Lightning run."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mfac import _validation as check
from lightning_mfac.fisher.config import WindowConfig
from lightning_mfac.fisher.dynamic import DAMP_MODES
from lightning_mfac.fisher.storage import STORAGES
from lightning_mfac.optim.flat import FlatPreconditioner
from lightning_mfac.optim.grafting import GRAFTS, make_grafting
from lightning_mfac.selection import match_names, name_patterns


class MFACPreconditioner(Callback):
    r"""Replace the gradients of the selected parameters by ``F⁻¹(g + weight_decay·w)`` before each
    optimizer step, where ``F = λI + (1/m)·GᵀG`` is the empirical Fisher of the last ``m`` gradients
    (dynamic M-FAC, Frantar, Kurtic & Alistarh, NeurIPS 2021). The configured optimizer then steps
    on the preconditioned gradient; with ``SGD(lr, momentum=0)`` this is exactly
    ``MFAC(lr, momentum=0, weight_decay)``.

    How it fits the training loop (Lightning calls ``on_before_optimizer_step`` once per optimizer
    step, after the closure and before clipping):

    * gradient accumulation: one window entry per optimizer step, from the accumulated gradient;
    * gradient clipping: the trainer clips the preconditioned gradient;
    * ``16-mixed``: gradients arrive unscaled; a non-finite gradient never enters the window, the
      gradients are left as they are for the scaler to skip the step, and the event is counted
      (``mfac/nonfinite_steps``). Without a scaler the affected step is skipped by clearing the
      selected gradients (``p.grad = None``), so the optimizer leaves those parameters alone;
    * DDP: gradients are already all-reduced; ``storage="auto"`` shards the window over the ranks;
    * checkpoints: window, factorization and counters go through ``state_dict``;
      ``save_window=False`` leaves the window out (a resumed run re-warms it, with a warning).

    Args:
        ngrads: window size ``m``.
        damp: dampening ``λ`` (``damp_mode="absolute"``) or the factor ``δ`` of
            ``λ = δ·mean(diag GGᵀ)/m`` (``damp_mode="relative"``: follows the gradients' scale).
        weight_decay: added to the gradient before preconditioning (leave the optimizer's at 0).
        window_dtype: ``None`` (float32; float64 for float64 parameters), ``"float32"``/``"bfloat16"``.
        storage: ``"auto"``, ``"device"``, ``"paged"`` or ``"sharded"``.
        params: ``None`` for all trainable parameters of the optimizer, else names / ``"re:<regex>"``.
        optimizers: ``None`` for every optimizer of the run, else the index or indices to precondition.
        save_window: include the window in checkpoints.
        log_stats: log window fill, time per preconditioning step and ``‖F⁻¹g‖/‖g‖``.
        page_cols, refactor_every: passed to :class:`lightning_mfac.DynamicFisherInverse`.
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
        window_dtype: Any = None,
        storage: str = "auto",
        params: list[str] | str | None = None,
        optimizers: int | list[int] | None = None,
        save_window: bool = True,
        log_stats: bool = True,
        page_cols: int | None = None,
        refactor_every: int | None = None,
        graft: Any = None,
        damp_mode: str = "absolute",
    ) -> None:
        self.ngrads = check.positive_int("ngrads", ngrads)
        self.damp = check.positive_float("damp", damp)
        self.weight_decay = check.nonnegative_float("weight_decay", weight_decay)
        check.window_dtype("window_dtype", window_dtype)
        self.window_dtype = window_dtype
        self.storage = check.one_of("storage", storage, STORAGES)
        self.params = name_patterns(params)
        if isinstance(optimizers, int):
            optimizers = [optimizers]
        if optimizers is not None:
            for i in optimizers:
                check.positive_int("optimizers", i, minimum=0)
        self.optimizers = None if optimizers is None else sorted(set(optimizers))
        self.save_window = bool(save_window)
        self.log_stats = bool(log_stats)
        if page_cols is not None:
            check.positive_int("page_cols", page_cols)
        self.page_cols = page_cols
        self.refactor_every = refactor_every
        self._pre: dict[int, FlatPreconditioner] = {}
        self._names: dict[int, list[str]] = {}
        self._signatures: dict[int, tuple[int, ...]] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self.nonfinite_steps = 0
        self.graft = check.one_of("graft", graft, (None, *GRAFTS))
        self.damp_mode = check.one_of("damp_mode", damp_mode, DAMP_MODES)
        self._grafts: dict[int, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ngrads=self.ngrads, params=self.params, optimizers=self.optimizers)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before the first step if the selection is wrong.
        for idx, optimizer in enumerate(trainer.optimizers):
            if self._wants(idx):
                self._select(pl_module, optimizer)
        if self.optimizers is not None and max(self.optimizers) >= len(trainer.optimizers):
            raise ValueError(
                f"optimizers={self.optimizers} is invalid: the run configures {len(trainer.optimizers)} optimizer(s)."
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        if not self._wants(idx):
            return
        pre = self._preconditioner(idx, pl_module, optimizer)
        g = pre.gradient([self.weight_decay] * len(pre.params))
        start = time.perf_counter()
        u, finite = pre.precondition(g)
        if not bool(finite):
            self._skip(trainer, pl_module, pre)
            return
        if idx in self._grafts:
            self._grafts[idx].graft_(pre.views(u), pre.views(g))
        for p, v in zip(pre.params, pre.views(u), strict=True):
            if p.grad is None:
                p.grad = v.to(p.dtype).clone()
            else:
                p.grad.copy_(v)
        if self.log_stats:
            if u.is_cuda:
                torch.cuda.synchronize(u.device)
            suffix = "" if len(trainer.optimizers) == 1 else f"_{idx}"
            stats = {
                f"mfac/window_fill{suffix}": pre.fisher.filled / pre.fisher.ngrads,
                f"mfac/precondition_ms{suffix}": 1e3 * (time.perf_counter() - start),
                f"mfac/ratio{suffix}": float(u.norm() / g.norm().clamp_min(1e-30)),
            }
            pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ pruning integration
    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero pruned coordinates (``masks[name]`` False) in every stored gradient, so the window no
        longer carries them; called by ``OBSPruning`` after each pruning step."""
        for idx, pre in self._pre.items():
            keeps = [masks.get(name) for name in self._names[idx]]
            if any(k is not None for k in keeps):
                pre.fisher.mask_coordinates(pre.keep_vector(keeps))
                if idx in self._grafts:
                    self._grafts[idx].apply_masks(keeps)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        pres = {idx: pre.state_dict(include_window=self.save_window) for idx, pre in self._pre.items()}
        for idx, graft in self._grafts.items():
            pres[idx]["graft"] = graft.state_dict()
        pres.update({idx: s for idx, s in self._pending.items() if idx not in pres})
        return {"preconditioners": pres, "nonfinite_steps": self.nonfinite_steps, "save_window": self.save_window}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self._pending = {int(k): v for k, v in state_dict.get("preconditioners", {}).items()}
        for idx in list(self._pending):
            if idx in self._pre:
                self._restore(idx)

    # ------------------------------------------------------------------ internals
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
        return [n for n, _ in named], [p for _, p in named]

    def _preconditioner(
        self, idx: int, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> FlatPreconditioner:
        pre = self._pre.get(idx)
        # Re-selecting walks every named parameter; skip it on the hot path unless the optimizer's
        # parameter lists changed since the window was built.
        signature = tuple(len(group["params"]) for group in optimizer.param_groups)
        if pre is not None and self._signatures.get(idx) == signature:
            return pre
        names, params = self._select(pl_module, optimizer)
        self._signatures[idx] = signature
        if pre is None:
            window = WindowConfig(
                dtype=self.window_dtype,
                storage=self.storage,
                page_cols=self.page_cols,
                refactor_every=self.refactor_every,
            )
            pre = self._pre[idx] = FlatPreconditioner(
                params, self.ngrads, self.damp, window, owner="MFACPreconditioner", names=names,
                damp_mode=self.damp_mode,
            )
            self._names[idx] = names
            if self.graft is not None:
                self._grafts[idx] = make_grafting(self.graft)
            if idx in self._pending:
                self._restore(idx)
        else:
            pre.verify(params)
        return pre

    def _restore(self, idx: int) -> None:
        state = self._pending.pop(idx)
        if idx in self._grafts and state.get("graft") is not None:
            self._grafts[idx].load_state_dict(state["graft"])
        if not self._pre[idx].load_state_dict(state):
            rank_zero_warn(
                "MFACPreconditioner: the checkpoint was saved with save_window=False; the M-FAC window "
                f"starts empty and re-warms over the next {self.ngrads} steps."
            )

    def _skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pre: FlatPreconditioner) -> None:
        self.nonfinite_steps += 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:
            for p in pre.params:
                p.grad = None
        rank_zero_warn(
            "MFACPreconditioner: non-finite gradient; it was kept out of the M-FAC window and the step is "
            + ("left to the AMP grad scaler to skip." if scaler is not None else "skipped."),
        )
        if self.log_stats:
            pl_module.log("mfac/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False, batch_size=1)
