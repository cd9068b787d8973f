"""Learning-rate grafting for M-FAC: keep M-FAC's *direction*, take the *step size* of a simpler method.

For every parameter tensor the M-FAC direction ``u = F⁻¹g`` is rescaled to the norm that the
grafted method's direction would have on the same gradient ``g`` (Agarwal et al., "Disentangling
Adaptive Gradient Methods from Learning Rates", 2020; the distributed Shampoo implementation
grafts per block the same way):

* ``"sgd"``: ``‖u‖ ← ‖g‖``, so ``lr·u`` has the norm of SGD's step ``lr·g``;
* ``"adam"``: ``‖u‖ ← ‖m̂/(√v̂ + ε)‖`` with Adam's own moments ``m``, ``v`` and bias correction
  (``torch.optim.Adam``'s conventions), so ``lr·u`` has the norm of Adam's step.

This is what lets a user keep the learning rate tuned for SGD or Adam: the raw M-FAC direction's
scale is ``~1/λ`` along directions the window has not seen, which makes lr and damp interact.

Everything runs with ``torch._foreach_*`` ops on the device; a zero M-FAC direction stays zero
(the scale is taken as 0 instead of dividing by zero), and nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_mfac import _validation as check

GRAFTS = ("sgd", "adam")


class Grafting:
    """Per-tensor norm grafting. Subclasses say which norm the M-FAC direction takes."""

    name = "none"
    #: Set for parameters sharded by FSDP2 (the optimizer does it): the norms are then of this
    #: rank's shards, and their squares are summed over this process group.
    norm_group: Any = None
    sharded_norms = False
    #: Whether the state holds tensors shaped like the gradients (under FSDP2: this rank's shards,
    #: checkpointed per rank).
    per_coordinate_state = False

    def target_norms(
        self,
        grads: list[torch.Tensor],
        finite: torch.Tensor | None = None,
        has_grad: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """The norm of the grafted method's direction, one 0-d tensor per gradient tensor.
        ``finite`` (a 0-d bool tensor, False for a step the caller skips) keeps state unchanged.
        ``has_grad`` (host booleans): tensors marked False had no gradient this step; their state
        is left alone, as ``torch.optim`` leaves such parameters alone."""
        raise NotImplementedError

    @torch.no_grad()
    def graft_(
        self,
        directions: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        finite: torch.Tensor | None = None,
        has_grad: Sequence[bool] | None = None,
    ) -> None:
        """Rescale each ``directions[i]`` in place to the grafted norm computed from ``grads[i]``.

        ``finite``: the caller's device flag for "this gradient is finite". When it is False the
        step is a skip: the directions become 0 and the grafting state stays as it was, decided on
        the device (no host read). ``has_grad``: see :meth:`target_norms`."""
        directions, grads = list(directions), list(grads)
        if len(directions) != len(grads):
            raise ValueError(
                f"{type(self).__name__}: {len(directions)} directions for {len(grads)} gradients."
            )
        if not directions:
            return
        target = torch.stack(self.target_norms(grads, finite, has_grad))
        current = torch.stack(torch._foreach_norm(directions))
        if self.sharded_norms:  # every rank holds a shard of every tensor: one all-reduce of both norms
            both = torch.stack([target.to(current.dtype), current]).square()
            dist.all_reduce(both, group=self.norm_group)
            target, current = both.sqrt().unbind()
        # One vector of scales for all tensors. where(), not clamp_min(): a tiny but non-zero
        # direction must still get the full target norm.
        ok = current > 0 if finite is None else (current > 0) & finite
        scales = torch.where(ok, target.to(current.dtype) / current, 0.0)
        torch._foreach_mul_(directions, scales.unbind())

    def apply_masks(self, keeps: Sequence[torch.Tensor | None]) -> None:
        """Forget pruned coordinates (``keeps[i]`` False) in any per-coordinate state."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise RuntimeError(
                f"graft: the checkpoint was saved with graft={state.get('name')!r}, this run uses "
                f"graft={self.name!r}: use the same graft to resume."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SGDGrafting(Grafting):
    """``‖u‖ ← ‖g‖``: stateless."""

    name = "sgd"

    def target_norms(
        self,
        grads: list[torch.Tensor],
        finite: torch.Tensor | None = None,
        has_grad: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        return list(torch._foreach_norm(grads))


class AdamGrafting(Grafting):
    """``‖u‖ ← ‖m̂/(√v̂ + ε)‖``; the moments (float32, or float64 for float64 gradients) and the
    per-tensor step counts (as ``torch.optim.Adam``'s per-parameter ``step``) are this object's
    state and go into checkpoints."""

    name = "adam"
    per_coordinate_state = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2) in [0, 1).")
        self.betas = (
            check.in_unit_interval("betas[0]", betas[0]),
            check.in_unit_interval("betas[1]", betas[1]),
        )
        self.eps = check.positive_float("eps", eps)
        self.steps: torch.Tensor | int = 0  # a device tensor once stepping: skips are decided on the device
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []

    def target_norms(
        self,
        grads: list[torch.Tensor],
        finite: torch.Tensor | None = None,
        has_grad: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        device = grads[0].device
        if not self.exp_avg:
            self.exp_avg = [torch.zeros_like(g, dtype=_state_dtype(g)) for g in grads]
            self.exp_avg_sq = [torch.zeros_like(m) for m in self.exp_avg]
            self.steps = torch.full((len(grads),), float(self.steps), dtype=torch.float64, device=device)
        elif [m.shape for m in self.exp_avg] != [g.shape for g in grads]:
            raise RuntimeError(
                "graft='adam': the parameter shapes changed since Adam's moments were created "
                f"({len(self.exp_avg)} tensors before, {len(grads)} now)."
            )
        elif self.exp_avg[0].device != device:  # a checkpoint mapped to another device
            self.exp_avg = [m.to(device) for m in self.exp_avg]
            self.exp_avg_sq = [v.to(device) for v in self.exp_avg_sq]
            self.steps = self.steps.to(device)
        # Only the tensors with a gradient this step (a host fact: no device read) are updated.
        live = list(range(len(grads))) if has_grad is None else [i for i, h in enumerate(has_grad) if h]
        if not live:
            return [torch.zeros((), dtype=m.dtype, device=device) for m in self.exp_avg]
        everyone = len(live) == len(grads)
        exp_avg = [self.exp_avg[i] for i in live]
        exp_avg_sq = [self.exp_avg_sq[i] for i in live]
        b1, b2 = self.betas
        g = [grads[i].to(m.dtype) for i, m in zip(live, exp_avg, strict=True)]
        if finite is None:
            decay1, decay2 = b1, b2
        else:
            # A skipped step: a zero gradient (not inf/NaN) and decay factors of 1 leave both
            # moments exactly as they were, decided on the device without copying them.
            g = [torch.where(finite, x, 0.0) for x in g]
            one = torch.ones((), dtype=g[0].dtype, device=device)
            decay1, decay2 = torch.where(finite, b1, one), torch.where(finite, b2, one)
        torch._foreach_mul_(exp_avg, decay1)
        torch._foreach_add_(exp_avg, g, alpha=1 - b1)
        torch._foreach_mul_(exp_avg_sq, decay2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - b2)
        increment = 1.0 if finite is None else finite.to(self.steps.dtype)
        if everyone:
            self.steps = self.steps + increment
        else:
            mask = torch.tensor(list(has_grad), dtype=self.steps.dtype).to(device, non_blocking=True)
            self.steps = self.steps + mask * increment
        steps = self.steps.clamp_min(1)  # a tensor's skipped first step: its norm is discarded anyway
        bc1 = 1 - torch.pow(b1, steps)
        bc2_sqrt = (1 - torch.pow(b2, steps)).sqrt().unbind()
        # torch.optim.Adam's convention: m̂ / (√v / √(1-β2ᵗ) + ε).
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [bc2_sqrt[i] for i in live])
        torch._foreach_add_(denom, self.eps)
        step = torch._foreach_div(exp_avg, denom)
        norms = torch._foreach_norm(step)
        if everyone:  # one division for all tensors
            return list((torch.stack(norms) / bc1.to(norms[0].dtype)).unbind())
        out = [torch.zeros((), dtype=m.dtype, device=device) for m in self.exp_avg]
        for i, n in zip(live, norms, strict=True):
            out[i] = n / bc1[i].to(n.dtype)
        return out

    def apply_masks(self, keeps: Sequence[torch.Tensor | None]) -> None:
        for m, v, keep in zip(self.exp_avg, self.exp_avg_sq, keeps, strict=False):
            if keep is not None:
                k = keep.reshape(m.shape).to(m.device, m.dtype)
                m.mul_(k)
                v.mul_(k)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "steps": self.steps.clone() if isinstance(self.steps, torch.Tensor) else self.steps,
            "betas": self.betas,
            "eps": self.eps,
            "exp_avg": [m.clone() for m in self.exp_avg],
            "exp_avg_sq": [v.clone() for v in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.exp_avg = [m.clone() for m in state["exp_avg"]]
        self.exp_avg_sq = [v.clone() for v in state["exp_avg_sq"]]
        device = self.exp_avg[0].device if self.exp_avg else None
        if not self.exp_avg:  # saved before the first step
            self.steps = 0
            return
        steps = torch.as_tensor(state["steps"], dtype=torch.float64, device=device).clone()
        if steps.dim() == 0:  # checkpoints with one count shared by all tensors
            steps = steps.expand(len(self.exp_avg)).clone()
        self.steps = steps

    def __repr__(self) -> str:
        return f"AdamGrafting(betas={self.betas}, eps={self.eps})"


def _state_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float64 if g.dtype == torch.float64 else torch.float32


def make_grafting(graft: Any) -> Grafting | None:
    """``None`` (no grafting), ``"sgd"``, ``"adam"`` or a :class:`Grafting` instance."""
    if graft is None or isinstance(graft, Grafting):
        return graft
    check.one_of("graft", graft, (None, *GRAFTS))
    return SGDGrafting() if graft == "sgd" else AdamGrafting()
