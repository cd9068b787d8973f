"""The M-FAC optimizer: SGD preconditioned by the dynamic inverse empirical Fisher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_mfac import _validation as check
from lightning_mfac.fisher._numerics import warn_once
from lightning_mfac.fisher.config import DynamicConfig, WindowConfig
from lightning_mfac.fisher.storage import rank_local, rank_local_value
from lightning_mfac.optim.flat import FlatPreconditioner, check_masks, check_parameters
from lightning_mfac.optim.fsdp import local
from lightning_mfac.optim.grafting import make_grafting
from lightning_mfac.optim.masking import Masks

_WINDOW_KEYS = ("ngrads", "damp", "damp_mode")
#: Why ``torch.compile`` of ``MFAC.step`` is refused, and what to do instead.
COMPILE_MESSAGE = (
    "MFAC.step cannot run under torch.compile: compile the model/loss, not the optimizer step, and "
    "call opt.step() eagerly (the step reads one number on the host per refactorization and builds "
    "its window on first use, which no single graph can hold; the steady-state step is already a "
    "fixed sequence of device ops, captured as a CUDA graph on GPUs)."
)


class MFAC(Optimizer):
    r"""Dynamic M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
    Second-Order Information", NeurIPS 2021, Section 4).

    With the window ``G`` of the last ``m = ngrads`` gradients and ``F = λI + (1/m)·GᵀG``:

    .. math::
        g_t &= \nabla L(w_t) + \text{wd}\cdot w_t, \qquad G \leftarrow \text{window} \cup \{g_t\}\\
        u_t &= F^{-1} g_t\\
        v_t &= \mu\, v_{t-1} + (1-\mu)\, u_t, \quad u_t \leftarrow v_t \qquad (\text{if } \mu > 0)\\
        w_{t+1} &= w_t - \eta\, u_t

    **Parameter groups.** One window spans all parameters of all groups, in group order, so
    ``ngrads``, ``damp`` and ``damp_mode`` are window settings: they live in ``defaults`` and in every group like
    any torch hyperparameter, but all groups must agree on them (a group that sets a different
    value is refused). ``lr``, ``momentum`` and ``weight_decay`` may differ per group.

    **Parameters without a gradient** in a step are left alone, as ``torch.optim.SGD`` does: no
    weight decay, no update, momentum untouched, and with ``graft="adam"`` their Adam moments and
    step count untouched too, as ``torch.optim.Adam`` does. They enter the window as zeros (a frozen
    layer is a zero column of ``G`` and does not change the others' directions).

    **Non-finite gradients.** A step whose gradient (with weight decay) is not finite is skipped
    without reading anything on the host: the window is left untouched, the update is multiplied
    by the device flag, momentum is kept. (The window also refuses, and the step is skipped the
    same way, in the rare case that its O(m²) update fails its accuracy check.)
    :attr:`skipped_steps_tensor` counts them on the device; :attr:`skipped_steps` reads that count
    (one host sync, only when asked).

    **Checkpoints** go through ``state_dict``/``load_state_dict`` (registered hooks): the window,
    its factorization and the skip counter are stored under ``state_dict()["mfac"]``, and resuming
    continues exactly. As with every torch optimizer, the hyperparameters in the checkpoint's
    ``param_groups`` (the window settings included) replace the constructor's; a difference is
    warned about once. The window then follows the rule of
    :meth:`~lightning_mfac.optim.flat.FlatPreconditioner.restore`: a checkpoint whose window has
    another dtype than ``window`` asks for starts an empty window (warned about once).
    Under ``torch.distributed`` the window is sharded by default and ``state_dict()`` holds this
    rank's columns only: keep one state per rank, or write all ranks' columns beside a checkpoint
    with :func:`lightning_mfac.fisher.storage.write_window_shards` (on every rank). In a Lightning
    ``Trainer``, ``lightning_mfac.callbacks.use_window_shard_checkpoint_io(trainer)`` does that for
    every checkpoint (``MFACPreconditioner`` and ``mfac-train`` call it themselves).

    **FSDP2.** On modules sharded by ``torch.distributed.fsdp.fully_shard`` (parameters that are
    ``DTensor`` row shards), each rank keeps the window columns of its own shards and updates only
    them: the ``m + 1`` dots, the Gram update and the graft's per-tensor norms are all-reduced,
    nothing of size ``d`` is. The steps equal one process's. Columns are numbered as in one process,
    so a window written by ``write_window_shards`` resumes in another world size; the momentum
    buffers (``DTensor``) and Adam-graft moments (this rank's file) resume in the same world size.
    Lightning's ``ModelParallelStrategy`` saves optimizers through ``torch.distributed.checkpoint``,
    which keeps only per-parameter state and so drops ``state_dict()["mfac"]``: under that strategy
    precondition with :class:`~lightning_mfac.MFACPreconditioner`, whose window is saved per rank.

    **Copies.** ``copy.deepcopy`` and ``pickle`` carry the window, its factorization, the graft's
    state and the skip counter (a sharded window is refused: use ``state_dict``); deep-copy the
    model and the optimizer together (``copy.deepcopy({"model": m, "opt": opt})``) so the copy's
    window is over the copied parameters. A copy then steps exactly as the original.

    **Precision.** Parameters may be float32, float64, bfloat16 or float16. The window has its own
    dtype (``window.dtype``; float32 by default for all but float64 parameters), its ``m × m``
    algebra is float64, and for bfloat16/float16 parameters the direction stays float32 through
    the graft and the lr and is rounded once, into the parameter. The momentum buffer has the
    parameter's dtype, as in ``torch.optim.SGD`` (and as torch's ``load_state_dict`` casts it).

    **torch.compile.** The step is not compiled: it builds its window on first use and reads one
    number on the host per refactorization (docs/design.md, "Host reads"), so it cannot be one
    graph. Compile the model and the loss, and call ``opt.step()`` eagerly; a compiled function
    that calls it runs it eagerly (a graph break), and ``fullgraph=True`` fails saying so. On a
    GPU the steady-state step is captured as a CUDA graph instead (``window.capture``).

    Args:
        params: parameters or parameter groups (dense; float32, float64, bfloat16 or float16; one
            device).
        lr: learning rate ``η ≥ 0``: a float, or a one-element floating-point tensor (torch.optim's
            convention; the step multiplies by it on the device, so it may be changed in place).
        momentum: ``μ ∈ [0, 1)``.
        weight_decay: ``wd ≥ 0``, added to the gradient before preconditioning.
        ngrads: window size ``m ≥ 1``.
        damp: dampening ``λ > 0`` (or the factor ``δ`` of a relative dampening).
        damp_mode: ``"absolute"`` (``λ = damp``) or ``"relative"`` (``λ = damp·mean(diag GGᵀ)/m``,
            following the scale of the gradients; see :class:`~lightning_mfac.fisher.DynamicFisherInverse`).
        window: how the window is stored and multiplied: a
            :class:`~lightning_mfac.fisher.config.WindowConfig`, a mapping of its fields
            (``dtype``, ``storage``, ``page_cols``, ``page_budget_bytes``, ``refactor_every``,
            ``kernels``, ``process_group``, ``shard_dir``) or ``None`` for the defaults.
        graft: ``None``, ``"sgd"`` or ``"adam"``: rescale ``u_t`` per parameter tensor to the norm of
            that method's direction on the same gradient, before momentum, so an lr tuned for
            SGD/Adam carries over (:mod:`lightning_mfac.optim.grafting`; Adam's moments are saved
            in ``state_dict()["mfac"]["graft"]``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ngrads: int = 1024,
        damp: float = 1e-5,
        damp_mode: str = "absolute",
        window: WindowConfig | Mapping[str, Any] | None = None,
        graft: Any = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "ngrads": ngrads,
            "damp": damp,
            "damp_mode": damp_mode,
        }
        _check_step_settings(defaults, "")
        self.window = DynamicConfig(ngrads, damp, damp_mode, window).window
        self.graft = make_grafting(graft)
        self._pre: FlatPreconditioner | None = None
        self._skipped: torch.Tensor | None = None
        super().__init__(params, defaults)
        check_parameters(self._params(), "MFAC", self._names())
        self.register_state_dict_post_hook(_save_window)
        self.register_load_state_dict_pre_hook(_load_window)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._pre is not None:
            raise RuntimeError(
                "MFAC: cannot add a parameter group after the M-FAC window was built (its coordinates are "
                "the parameters it started with): build a new optimizer instead."
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        try:
            _check_step_settings(group, where)
            self._window_config(group, where)
            first = self.param_groups[0]
            for key in _WINDOW_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"{where}: {key}={group[key]!r} differs from param_groups[0]'s {key}={first[key]!r}: "
                        f"MFAC keeps one window over all groups, so every group must use the same {key}."
                    )
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; the window, the graft's moments and
        # the skip counter are this optimizer's state too. The window travels as its state_dict
        # (CPU tensors, no engine internals such as kernels or capture), and is rebuilt around the
        # copy's own parameters in __setstate__.
        state = super().__getstate__()
        pre = self._pre
        if pre is not None and pre.sharded:
            raise TypeError(
                "MFAC: an optimizer with a sharded window cannot be copied or pickled (its state is "
                "spread over the ranks): save and load it with state_dict() / load_state_dict()."
            )
        state["window"] = self.window
        state["graft"] = self.graft
        state["_skipped"] = self._skipped
        state["_window_state"] = None if pre is None else pre.state_dict()
        state["_window_settings"] = None if pre is None else {k: getattr(pre.config, k) for k in _WINDOW_KEYS}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        window_state = state.pop("_window_state", None)
        settings = state.pop("_window_settings", None)
        super().__setstate__(state)
        # torch's load_state_dict comes through here too, with only state and param_groups: what
        # this optimizer already has stays. An unpickled one has nothing else yet (and no hooks:
        # torch drops them from a copy, so they are registered again).
        for key, default in (("window", WindowConfig()), ("graft", None), ("_skipped", None), ("_pre", None)):
            if key not in self.__dict__:
                setattr(self, key, default)
        if _save_window not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(_save_window)
        if _load_window not in self._optimizer_load_state_dict_pre_hooks.values():
            self.register_load_state_dict_pre_hook(_load_window)
        if window_state is not None:
            message = self._preconditioner(settings).restore(window_state)
            if message is not None:
                warn_once(message)

    # ------------------------------------------------------------------ counters
    @property
    def skipped_steps_tensor(self) -> torch.Tensor:
        """Steps skipped for a non-finite gradient, as a 0-dim int64 device tensor (no sync)."""
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=self._params()[0].device)
        return self._skipped

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient; reads the device counter (one host sync)."""
        return int(self.skipped_steps_tensor)

    # ------------------------------------------------------------------ step
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _names(self) -> list[str] | None:
        """The parameters' names when the optimizer was given them (``model.named_parameters()``)."""
        if not all("param_names" in group for group in self.param_groups):
            return None
        return [n for group in self.param_groups for n in group["param_names"]]

    def _window_config(self, settings: Mapping[str, Any], where: str = "") -> DynamicConfig:
        """The engine's settings from a parameter group's ``ngrads``/``damp``/``damp_mode`` (checked
        there, errors prefixed with ``where``) and the optimizer's window."""
        try:
            return DynamicConfig(settings["ngrads"], settings["damp"], settings["damp_mode"], self.window)
        except ValueError as err:
            raise ValueError(f"{where}: {err}" if where else str(err)) from None

    def _preconditioner(self, settings: Mapping[str, Any] | None = None) -> FlatPreconditioner:
        """The window, built on first use from ``settings`` (default: the groups' window settings)."""
        params = self._params()
        if self._pre is None:
            config = self._window_config(settings if settings is not None else self.param_groups[0])
            self._pre = FlatPreconditioner(params, config, owner="MFAC", names=self._names())
            if self._pre.layout is not None and self.graft is not None:  # FSDP2: norms of shards
                self.graft.sharded_norms, self.graft.norm_group = True, self._pre.layout.group
        else:
            self._pre.verify(params)
        return self._pre

    def _check_window_settings(self, pre: FlatPreconditioner) -> None:
        """Window settings edited in ``param_groups`` after the window was built cannot take effect."""
        built_with = {key: getattr(pre.config, key) for key in _WINDOW_KEYS}
        for i, group in enumerate(self.param_groups):
            for key, built in built_with.items():
                if group[key] != built:
                    raise ValueError(
                        f"MFAC: param_groups[{i}][{key!r}]={group[key]!r} but the window was built with "
                        f"{key}={built!r}: the window's {key} is fixed once it exists; build a new optimizer "
                        "to change it."
                    )

    # The step reads the host by design (once per refactor period, every step of a guarded
    # period) and builds its window on first use, so it cannot be one graph: under
    # torch.compile it runs eagerly (a graph break), and fullgraph=True fails with this reason.
    @torch.compiler.disable(reason=COMPILE_MESSAGE)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if torch.compiler.is_compiling():  # other tracers that ignore the disable above
            raise RuntimeError(COMPILE_MESSAGE)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self._preconditioner()
        self._check_window_settings(pre)
        has = pre.with_grad()
        if not any(has):  # nothing to learn from, as for torch.optim.SGD: the window stays as it is
            return loss
        decays = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        g = pre.gradient(decays, has)
        u, finite = pre.precondition(g)
        if self.graft is not None:
            self.graft.graft_(pre.direction_views, pre.gradient_views, finite, has)
        skipped = self.skipped_steps_tensor
        skipped.add_(finite.logical_not())
        views = pre.direction_views
        targets = pre.local_params()

        # Momentum first (it reads the direction), then one update per group. On a skipped step
        # the direction is zero, the momentum keeps its value (factor 1) and the update that reads
        # the momentum is multiplied by the flag: nothing moves.
        start, updates, scaled = 0, [], False
        for group in self.param_groups:
            n = len(group["params"])
            idx = [i for i in range(start, start + n) if has[i]]
            start += n
            params = [targets[i] for i in idx]
            steps = [views[i] for i in idx]
            mu = group["momentum"]
            if params and mu > 0:
                bufs = []
                for i in idx:
                    state = self.state[pre.params[i]]
                    if "momentum_buffer" not in state:  # a DTensor for a DTensor parameter, as torch.optim's
                        state["momentum_buffer"] = torch.zeros_like(pre.params[i], memory_format=torch.preserve_format)
                    bufs.append(local(state["momentum_buffer"]))
                keep = torch.where(
                    finite, torch.scalar_tensor(mu, dtype=bufs[0].dtype, device=finite.device), 1.0
                )
                torch._foreach_mul_(bufs, keep)
                torch._foreach_add_(bufs, steps, alpha=1 - mu)
                torch._foreach_copy_(steps, bufs)
                scaled = True
            updates.append((params, steps, group["lr"]))
        if scaled:
            u.mul_(finite)
        for params, steps, lr in updates:
            if not params:
                continue
            if isinstance(lr, torch.Tensor):
                # A tensor lr is read on the device, never on the host: scale the direction (an
                # internal buffer, overwritten by the next step) by it, then subtract.
                torch._foreach_mul_(steps, lr.to(device=u.device, dtype=u.dtype).reshape(()))
                torch._foreach_sub_(params, steps)
            else:
                torch._foreach_add_(params, steps, alpha=-lr)
        return loss

    # ------------------------------------------------------------------ pruning
    def apply_masks(self, masks: Masks) -> None:
        """Drop pruned coordinates (``masks[param]`` False) from the window and the momentum, so a
        pruned weight gets exactly zero update (the
        :class:`~lightning_mfac.optim.masking.MaskableWindow` protocol; ``OBSPruning`` calls it).
        Masks are keyed by parameter tensor, or by name for an optimizer built from
        ``named_parameters()``."""
        params = self._params()
        keeps = check_masks(params, masks, "MFAC", self._names())
        for p, keep in zip(params, keeps, strict=True):
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None and keep is not None:
                buf.mul_(keep.to(buf.device, buf.dtype))
        if self.graft is not None:
            self.graft.apply_masks(keeps)
        if self._pre is not None:
            self._pre.apply_masks(masks)


def _check_step_settings(group: Mapping[str, Any], where: str) -> None:
    """A group's ``lr``, ``momentum`` and ``weight_decay`` (the window's settings are a
    :class:`~lightning_mfac.fisher.config.DynamicConfig`, checked there)."""
    prefix = f"{where}: " if where else ""
    try:
        _check_lr(group["lr"])
        check.in_unit_interval("momentum", group["momentum"])
        check.nonnegative_float("weight_decay", group["weight_decay"])
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None


def _check_lr(lr: Any) -> None:
    """A float ``lr ≥ 0``, or a one-element floating-point tensor (as torch.optim takes, for loops
    that change it in place without recompiling or re-capturing), whose value is read once, here."""
    if not isinstance(lr, torch.Tensor):
        check.nonnegative_float("lr", lr)
        return
    if lr.numel() != 1 or not lr.is_floating_point() or lr.is_complex():
        raise ValueError(
            f"lr is a tensor of shape {tuple(lr.shape)} and dtype {lr.dtype}: expected a float >= 0 or a "
            "one-element floating-point tensor."
        )
    if lr.requires_grad:
        raise ValueError("lr is a tensor that requires grad: expected a plain value (detach it).")
    value = float(lr.detach().reshape(()))  # the one host read: at construction, not per step
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr=tensor({value!r}) is invalid: expected a finite number >= 0.")


# ---------------------------------------------------------------------- state hooks
def _save_window(optimizer: MFAC, state_dict: dict[str, Any]) -> dict[str, Any]:
    pre = optimizer._pre
    state_dict["mfac"] = {
        "window": pre.state_dict() if pre is not None else None,
        "skipped_steps": optimizer.skipped_steps_tensor.detach().clone(),
    }
    if optimizer.graft is not None:
        graft = optimizer.graft.state_dict()
        # FSDP2: the moments are of this rank's shards; write_window_shards puts them in its file.
        state_dict["mfac"]["graft"] = rank_local(graft) if _per_rank(pre, optimizer.graft) else graft
    return state_dict


def _per_rank(pre: FlatPreconditioner | None, graft: Any) -> bool:
    """Whether the graft's state is of this rank's FSDP2 shards (then it goes into this rank's file)."""
    return pre is not None and pre.layout is not None and graft.per_coordinate_state


def _load_window(optimizer: MFAC, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = dict(state_dict)
    extra = state_dict.pop("mfac", None)
    groups, saved = optimizer.param_groups, state_dict["param_groups"]
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved]
    if sizes != saved_sizes:
        raise ValueError(
            f"MFAC: the checkpoint's optimizer has parameter groups of sizes {saved_sizes}, this one {sizes}: "
            "the checkpoint is from a different model or optimizer setup."
        )
    # Checkpoints keep their hyperparameters (torch's rule); say so when the window's differ.
    for key in _WINDOW_KEYS:
        old = [g.get(key, groups[0][key]) for g in saved]
        if any(v != old[0] for v in old):
            raise ValueError(f"MFAC: the checkpoint's parameter groups disagree on {key} ({old}).")
        if old[0] != groups[0][key]:
            warn_once(
                f"MFAC: the checkpoint was saved with {key}={old[0]!r}, this optimizer was built with "
                f"{key}={groups[0][key]!r}; kept the checkpoint's value together with its window."
            )
    saved = [dict(g, **{key: g.get(key, groups[0][key]) for key in _WINDOW_KEYS}) for g in saved]
    state_dict["param_groups"] = saved
    if extra is None:
        return state_dict
    device = optimizer._params()[0].device
    skipped = extra.get("skipped_steps", 0)
    optimizer._skipped = torch.as_tensor(skipped, dtype=torch.int64).to(device).clone()
    if optimizer.graft is not None and extra.get("graft") is not None:
        optimizer.graft.load_state_dict(rank_local_value(extra["graft"]))
    window = extra.get("window")
    settings = {key: saved[0][key] for key in _WINDOW_KEYS}
    pre = optimizer._pre
    if pre is not None and {key: getattr(pre.config, key) for key in _WINDOW_KEYS} != settings:
        optimizer._pre = None  # a window with the checkpoint's settings replaces it
    if window is None:
        if optimizer._pre is not None:
            optimizer._pre.reset()
        return state_dict
    message = optimizer._preconditioner(settings).restore(window)
    if message is not None:
        warn_once(message)
    return state_dict
