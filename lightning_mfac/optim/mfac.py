"""The M-FAC optimizer: SGD preconditioned by the dynamic inverse empirical Fisher."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_mfac import _validation as check
from lightning_mfac.fisher._numerics import warn_once
from lightning_mfac.fisher.storage import STORAGES
from lightning_mfac.optim.flat import FlatPreconditioner


class MFAC(Optimizer):
    r"""Dynamic M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
    Second-Order Information", NeurIPS 2021, Section 4).

    With the window ``G`` of the last ``m = ngrads`` gradients and ``F = λI + (1/m)·GᵀG``:

    .. math::
        g_t &= \nabla L(w_t) + \text{wd}\cdot w_t, \qquad G \leftarrow \text{window} \cup \{g_t\}\\
        u_t &= F^{-1} g_t\\
        v_t &= \mu\, v_{t-1} + (1-\mu)\, u_t, \quad u_t \leftarrow v_t \qquad (\text{if } \mu > 0)\\
        w_{t+1} &= w_t - \eta\, u_t

    One window spans all parameters of all groups, in group order; ``lr``, ``momentum`` and
    ``weight_decay`` may differ per group. A step whose gradient is not finite is skipped (no
    window entry, no update) and counted in ``state_dict()["mfac"]["skipped_steps"]``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate ``η ≥ 0``.
        momentum: ``μ ∈ [0, 1)``.
        weight_decay: ``wd ≥ 0``, added to the gradient before preconditioning.
        ngrads: window size ``m ≥ 1``.
        damp: dampening ``λ > 0``.
        window_dtype: ``None`` (float64 for float64 parameters, else float32), ``torch.float32``
            or ``torch.bfloat16`` (halves the memory traffic, error ~1e-2).
        storage: ``"auto"``, ``"device"``, ``"paged"`` or ``"sharded"`` (see ``lightning_mfac.fisher``).
        page_cols, refactor_every, process_group: passed to :class:`DynamicFisherInverse`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ngrads: int = 1024,
        damp: float = 1e-5,
        window_dtype: Any = None,
        storage: str = "auto",
        page_cols: int | None = None,
        refactor_every: int | None = None,
        process_group: Any = None,
    ) -> None:
        defaults = {
            "lr": check.nonnegative_float("lr", lr),
            "momentum": check.in_unit_interval("momentum", momentum),
            "weight_decay": check.nonnegative_float("weight_decay", weight_decay),
        }
        self._mfac_config = {
            "ngrads": check.positive_int("ngrads", ngrads),
            "damp": check.positive_float("damp", damp),
            "window_dtype": window_dtype,
            "storage": storage,
            "page_cols": page_cols,
            "refactor_every": refactor_every,
            "process_group": process_group,
        }
        check.window_dtype("window_dtype", window_dtype)
        check.one_of("storage", storage, STORAGES)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check.nonnegative_float("lr", group["lr"])
            check.in_unit_interval("momentum", group["momentum"])
            check.nonnegative_float("weight_decay", group["weight_decay"])
        self._pre: FlatPreconditioner | None = None
        self._pending: dict[str, Any] | None = None
        self.skipped_steps = 0

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _preconditioner(self) -> FlatPreconditioner:
        params = self._params()
        if self._pre is None:
            self._pre = FlatPreconditioner(params, owner="MFAC", **self._mfac_config)
            if self._pending is not None:
                self._pre.load_state_dict(self._pending)
                self._pending = None
        else:
            self._pre.verify(params)
        return self._pre

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self._preconditioner()
        decays = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        u = pre.precondition(pre.gradient(decays))
        if u is None:
            self.skipped_steps += 1
            warn_once("MFAC: skipped a step with a non-finite gradient; the window was left untouched.")
            return loss
        views = iter(pre.views(u))
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                step = next(views).to(p.dtype)
                if mu > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p)
                    buf.mul_(mu).add_(step, alpha=1 - mu)
                    step = buf
                p.add_(step, alpha=-lr)
        return loss

    def apply_masks(self, masks: dict[torch.Tensor, torch.Tensor]) -> None:
        """Drop pruned coordinates (``masks[param]`` False) from the window and the momentum, so a
        pruned weight gets exactly zero update; ``OBSPruning`` calls this after each pruning step."""
        for p, keep in masks.items():
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(keep.to(buf.device, buf.dtype))
        if self._pre is not None:
            self._pre.fisher.mask_coordinates(self._pre.keep_vector([masks.get(p) for p in self._pre.params]))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        window = self._pre.state_dict() if self._pre is not None else self._pending
        state["mfac"] = {"window": window, "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        window = extra.get("window")
        if window is None:
            return
        if self._pre is not None:
            self._pre.load_state_dict(window)
        else:
            self._pending = window
