"""One M-FAC window over a fixed list of parameters, shared by the ``MFAC`` optimizer and the
``MFACPreconditioner`` callback: flatten the gradients (plus weight decay) in parameter order,
feed the window, return ``F⁻¹g``, and scatter a flat vector back onto the parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_mfac import _validation as check
from lightning_mfac.fisher import DynamicFisherInverse


def check_parameters(params: Sequence[torch.Tensor], owner: str) -> None:
    if not params:
        raise ValueError(f"{owner}: the parameter selection is empty: expected at least one trainable tensor.")
    device = params[0].device
    for p in params:
        if p.is_sparse or p.is_complex() or not p.is_floating_point():
            raise ValueError(
                f"{owner}: parameter of shape {tuple(p.shape)} has dtype {p.dtype}"
                f"{' (sparse)' if p.is_sparse else ''}: expected dense real floating-point parameters."
            )
        if p.device != device:
            raise ValueError(
                f"{owner}: parameters live on {device} and {p.device}: one window needs all of them on one device."
            )


class FlatPreconditioner:
    """Dynamic M-FAC over the concatenation of ``params`` (``parameters_to_vector`` order)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        ngrads: int,
        damp: float,
        window_dtype: Any = None,
        storage: str = "auto",
        page_cols: int | None = None,
        refactor_every: int | None = None,
        process_group: Any = None,
        owner: str = "MFAC",
    ) -> None:
        check_parameters(params, owner)
        self.owner = owner
        self.params = list(params)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        default = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.fisher = DynamicFisherInverse(
            self.dim,
            ngrads,
            damp,
            device=self.device,
            dtype=check.window_dtype("window_dtype", window_dtype, default),
            storage=storage,
            page_cols=page_cols,
            refactor_every=refactor_every,
            process_group=process_group,
        )

    def verify(self, params: Sequence[torch.Tensor]) -> None:
        """The window's coordinates are tied to the parameter list it was built for."""
        shapes = [tuple(p.shape) for p in params]
        if shapes != self.shapes:
            raise RuntimeError(
                f"{self.owner}: the set of preconditioned parameters changed after the M-FAC window was built "
                f"({len(self.shapes)} tensors / {self.dim} coordinates before, {len(shapes)} tensors / "
                f"{sum(int(torch.Size(s).numel()) for s in shapes)} now). Build a new optimizer/callback "
                "(or call reset) after changing the model."
            )

    def gradient(self, weight_decay: Sequence[float]) -> torch.Tensor:
        """``∇L + weight_decay·w`` flattened; a parameter without gradient contributes zeros."""
        dtype = torch.float64 if self.fisher.cdtype == torch.float64 else torch.float32
        parts = []
        for p, wd in zip(self.params, weight_decay, strict=True):
            g = p.grad.detach().reshape(-1).to(dtype) if p.grad is not None else p.new_zeros(p.numel(), dtype=dtype)
            if wd:
                g = g + wd * p.detach().reshape(-1).to(dtype)
            parts.append(g)
        return torch.cat(parts)

    def precondition(self, g: torch.Tensor) -> torch.Tensor | None:
        """``F⁻¹g`` after adding ``g`` to the window, or ``None`` (window untouched) if ``g`` is not finite."""
        return self.fisher.update_mul(g, skip_nonfinite=True)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` split into tensors shaped like the parameters."""
        return [t.view(s) for t, s in zip(flat.split([int(torch.Size(s).numel()) for s in self.shapes]), self.shapes, strict=True)]

    def keep_vector(self, keeps: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Flat boolean mask from per-parameter masks (``None`` keeps everything)."""
        parts = [
            (k.reshape(-1).to(self.device, torch.bool) if k is not None else torch.ones(p.numel(), dtype=torch.bool, device=self.device))
            for p, k in zip(self.params, keeps, strict=True)
        ]
        return torch.cat(parts)

    def state_dict(self, include_window: bool = True) -> dict[str, Any]:
        state = {"shapes": self.shapes}
        fisher = self.fisher.state_dict()
        if not include_window:
            fisher = {k: v for k, v in fisher.items() if k not in ("window", "gram", "inv")}
        state["fisher"] = fisher
        return state

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore; returns False when the checkpoint left the window out (the window re-warms)."""
        if [tuple(s) for s in state["shapes"]] != self.shapes:
            raise RuntimeError(
                f"{self.owner}: the checkpoint's M-FAC window was built for parameters of shapes "
                f"{state['shapes'][:4]}…, which do not match the current ones {self.shapes[:4]}…."
            )
        if "window" not in state["fisher"]:
            self.fisher.reset()
            return False
        self.fisher.load_state_dict(state["fisher"])
        return True
