"""One M-FAC window over a fixed list of parameters, shared by the ``MFAC`` optimizer and the
``MFACPreconditioner`` callback: the layer between those two surfaces and the engine
(:class:`~lightning_mfac.fisher.DynamicFisherInverse`), which neither of them touches. It holds the
engine's settings, its state (checkpoints and the one rule for resuming them, :meth:`FlatPreconditioner.restore`)
and the masks pruning hands it (keyed by parameter name or tensor).

A :class:`FlatPreconditioner` owns two flat ``d``-vectors laid out in parameter order (the order
of ``parameters_to_vector``) and, once, views of them shaped like the parameters. Each step then
costs a constant number of tensor operations whatever the number of parameter tensors: the
gradients are copied in with one ``torch._foreach_copy_``, the window is fed, and the direction
is handed back as a flat vector and as parameter-shaped views for ``torch._foreach_*`` updates.
Nothing here reads a device value on the host.

Parameters without a gradient in a step (a frozen layer left in the optimizer, a branch that
did not run) contribute zeros to the window and get no weight decay, as ``torch.optim.SGD``
would leave them alone; the caller must also leave them un-updated (the direction has entries
for them whenever earlier gradients coupled them to the others). A parameter that never has a
gradient therefore adds a zero column to the window and changes nothing for the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_mfac.fisher import DynamicFisherInverse
from lightning_mfac.fisher.config import DynamicConfig, WindowConfig
from lightning_mfac.optim.fsdp import local, local_rows, shard_layout
from lightning_mfac.optim.masking import Masks


def describe(index: int, p: torch.Tensor, names: Sequence[str] | None) -> str:
    """How an error message names parameter ``index``: its name where known, shape and dtype."""
    name = f"{names[index]!r} " if names is not None else ""
    return f"parameter {name}(index {index}, shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})"


#: Parameter dtypes a window takes (the window's own storage dtype is ``WindowConfig.dtype``).
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ALLOWED_DTYPES = "float32, float64, bfloat16 or float16"


def check_parameters(params: Sequence[torch.Tensor], owner: str, names: Sequence[str] | None = None) -> None:
    """Refuse, naming the parameter, anything one flat window cannot hold: sparse, complex,
    integer (or float8) or meta-device tensors, or tensors spread over several devices; each with
    its own message, since the remedy differs."""
    if not params:
        raise ValueError(
            f"{owner}: the parameter selection is empty: expected at least one trainable tensor."
        )
    if names is not None and len(names) != len(params):
        raise ValueError(f"{owner}: {len(names)} names for {len(params)} parameters.")
    device = params[0].device
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{owner}: parameter index {i} is a {type(p).__name__}: expected a torch.Tensor.")
        # Twice in one window, a tensor would get two coordinate ranges and its step applied twice.
        if first.setdefault(id(p), i) != i:
            raise ValueError(f"{owner}: {describe(i, p, names)} is the same tensor as parameter index "
                             f"{first[id(p)]}: expected each parameter once.")
        if p.layout != torch.strided:
            raise ValueError(
                f"{owner}: {describe(i, p, names)} has layout {p.layout}: expected a dense "
                "(torch.strided) parameter: one flat window holds dense gradients."
            )
        if p.is_complex():
            raise ValueError(
                f"{owner}: {describe(i, p, names)} has the complex dtype {p.dtype}: expected a real "
                f"floating-point dtype ({ALLOWED_DTYPES}), as M-FAC's window is real. To precondition it, "
                "keep the parameter as a real (..., 2) tensor and take torch.view_as_complex of it in forward."
            )
        if not p.is_floating_point():
            raise ValueError(
                f"{owner}: {describe(i, p, names)} has the non-floating-point dtype {p.dtype}: expected a "
                f"real floating-point dtype ({ALLOWED_DTYPES}). A tensor of this dtype has no gradient: "
                "register it as a buffer or leave it out of the optimizer."
            )
        if p.dtype not in PARAM_DTYPES:
            raise ValueError(
                f"{owner}: {describe(i, p, names)} has dtype {p.dtype}, which M-FAC does not train: expected "
                f"{ALLOWED_DTYPES} (keep a float32 master copy of a lower-precision parameter)."
            )
        if p.is_meta:
            raise ValueError(
                f"{owner}: {describe(i, p, names)} is on the meta device and has no data: materialize the "
                "model (e.g. `module.to_empty(device=...)` and initialize it) before building the optimizer."
            )
        if p.device != device:
            raise ValueError(
                f"{owner}: {describe(i, p, names)} is on {p.device} but parameter index 0 is on {device}: "
                "one window needs all of its parameters on one device."
            )


def check_masks(
    params: Sequence[torch.Tensor],
    masks: Masks,
    owner: str,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor | None]:
    """The mask of each parameter (``None`` where ``masks`` has none), each checked for its shape.

    ``masks`` is keyed by parameter name (where ``names`` are known) or by the tensor itself;
    entries for other parameters are not this window's business and are ignored."""
    by_name = any(isinstance(key, str) for key in masks)
    if by_name and names is None:
        raise ValueError(
            f"{owner}: masks keyed by parameter name, but this window does not know its parameters' names: "
            "key them by the parameter tensors."
        )
    keeps = [masks.get(names[i] if by_name else p) for i, p in enumerate(params)]
    for i, (p, k) in enumerate(zip(params, keeps, strict=True)):
        if k is not None and tuple(k.shape) != tuple(p.shape):
            raise ValueError(
                f"{owner}: the mask of {describe(i, p, names)} has shape {tuple(k.shape)}: expected the parameter's shape."
            )
    return keeps


def sparse_gradient_error(owner: str, index: int, p: torch.Tensor, names: Sequence[str] | None) -> ValueError:
    return ValueError(
        f"{owner}: {describe(index, p, names)} has a {p.grad.layout} gradient (e.g. nn.Embedding(sparse=True)): "
        "M-FAC's window holds dense gradients. Use sparse=False for this module or leave the parameter out "
        "of the M-FAC window."
    )


class FlatPreconditioner:
    """Dynamic M-FAC over the concatenation of ``params`` (``parameters_to_vector`` order).

    The API the optimizer and the callback use, and nothing more:

    * :meth:`gradient` — the flat ``∇L + weight_decay·w`` of this step (an internal buffer);
    * :meth:`precondition` — feed it to the window, get ``(F⁻¹g, finite)`` on the device;
    * :attr:`gradient_views` / :attr:`direction_views` — the last gradient and direction, shaped
      like ``params`` (for ``torch._foreach_*``; no view is made per step);
    * :meth:`with_grad` — which parameters had a gradient (they are the ones to update);
    * :meth:`apply_masks`, :meth:`verify`;
    * the engine's settings and state: :attr:`config` (``ngrads``, ``damp``, ``damp_mode``,
      ``window``), :attr:`dtype`, :meth:`fill`, :meth:`reset`, :meth:`set_damp`, :meth:`state_dict` and
      :meth:`restore` (the one rule for resuming a window, shared by both surfaces).

    The engine itself (:attr:`fisher`, a :class:`~lightning_mfac.fisher.DynamicFisherInverse`) is
    this class's business; the optimizer and the callback go through the methods above.

    Args:
        params: the parameters, all dense, floating point, on one device (checked here).
        config: the engine's settings, a :class:`~lightning_mfac.fisher.config.DynamicConfig` or a
            mapping of its fields (``ngrads``, ``damp``, ``damp_mode``, ``window``); a window dtype of
            ``None`` becomes float64 for float64 parameters, else float32.
        owner: prefix of error messages (``"MFAC"``, ``"MFACPreconditioner"``).
        names: parameter names, where the caller knows them: for error messages, masks keyed by
            name, and checkpoints (a resumed window is only kept for the same names).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        config: DynamicConfig | Mapping[str, Any] | None = None,
        *,
        owner: str = "MFAC",
        names: Sequence[str] | None = None,
    ) -> None:
        params = list(params)
        check_parameters(params, owner, names)
        self.owner = owner
        self.params = params
        self.names = list(names) if names is not None else None
        self.shapes = [tuple(p.shape) for p in params]
        #: FSDP2: which coordinates each rank holds (``None`` for ordinary parameters). The flat
        #: vectors are then this rank's shards, concatenated in parameter order.
        self.layout = shard_layout(params, owner, names)
        self.local_shapes = [tuple(local(p).shape) for p in params]
        self.sizes = [local(p).numel() for p in params]
        self.dim = sum(self.sizes)
        self.device = params[0].device
        config = DynamicConfig.coerce(config)
        #: The window settings as given (before the dtype is settled from the parameters).
        self.window: WindowConfig = config.window
        window = self.window
        if window.dtype is None:  # the parameters' precision decides (float64 stays float64)
            config = config.replace(window=window.replace(dtype=window.resolved_dtype(params[0].dtype)))
        self.fisher = DynamicFisherInverse(self.dim, device=self.device, config=config, layout=self.layout)
        # The gradient enters the window at the window's compute precision. The direction comes
        # back in the parameters' dtype when they share float32 or float64 (so the foreach updates
        # take the fast path); otherwise -- mixed dtypes, or bfloat16/float16 parameters, whose
        # rounding would come before the graft, the momentum and the lr -- at the compute
        # precision, and the update rounds it once, into each parameter.
        grad_dtype = torch.float64 if self.fisher.cdtype == torch.float64 else torch.float32
        dtypes = {p.dtype for p in params}
        dir_dtype = dtypes.pop() if len(dtypes) == 1 else grad_dtype
        if dir_dtype not in (torch.float32, torch.float64):
            dir_dtype = grad_dtype
        self._grad = torch.zeros(self.dim, dtype=grad_dtype, device=self.device)
        self._direction = torch.zeros(self.dim, dtype=dir_dtype, device=self.device)
        self.gradient_views: list[torch.Tensor] = self.views(self._grad)
        """Views of the last :meth:`gradient` shaped like ``params`` (valid until the next call)."""
        self.direction_views: list[torch.Tensor] = self.views(self._direction)
        """Views of the last direction shaped like ``params`` (valid until the next step)."""

    # ------------------------------------------------------------------ the step
    def verify(self, params: Sequence[torch.Tensor]) -> None:
        """The window's coordinates are tied to the parameter list it was built for."""
        if len(params) == len(self.params) and all(p is q for p, q in zip(params, self.params, strict=True)):
            return
        shapes = [tuple(p.shape) for p in params]
        raise RuntimeError(
            f"{self.owner}: the set of preconditioned parameters changed after the M-FAC window was built "
            f"({len(self.shapes)} tensors / {self.dim} coordinates before, {len(shapes)} tensors / "
            f"{sum(int(torch.Size(s).numel()) for s in shapes)} now). Build a new optimizer/callback "
            "(or call reset) after changing the model."
        )

    def with_grad(self) -> list[bool]:
        """Which parameters have a gradient now; a sparse gradient is refused, naming the parameter."""
        has = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None and g.layout != torch.strided:
                raise sparse_gradient_error(self.owner, i, p, self.names)
            has.append(g is not None)
        return has

    @torch.no_grad()
    def gradient(
        self, weight_decay: float | Sequence[float] = 0.0, has_grad: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """``∇L + weight_decay·w`` flattened into an internal buffer (overwritten by the next call).

        ``weight_decay`` is one value or one per parameter. A parameter without gradient
        contributes zeros and no decay. ``has_grad`` is :meth:`with_grad` if the caller has it.
        """
        has = self.with_grad() if has_grad is None else has_grad
        decays = (
            [float(weight_decay)] * len(self.params)
            if isinstance(weight_decay, (int, float))
            else weight_decay
        )
        if len(decays) != len(self.params):
            raise ValueError(f"{self.owner}: {len(decays)} weight decays for {len(self.params)} parameters.")
        dst = [v for v, h in zip(self.gradient_views, has, strict=True) if h]
        if len(dst) < len(self.params):
            torch._foreach_zero_([v for v, h in zip(self.gradient_views, has, strict=True) if not h])
        if dst:
            torch._foreach_copy_(dst, [local(p.grad) for p, h in zip(self.params, has, strict=True) if h])
        # One foreach per run of equal decay values (one per parameter group in practice).
        start = 0
        for end in range(1, len(self.params) + 1):
            if end == len(self.params) or decays[end] != decays[start]:
                wd = decays[start]
                if wd:
                    idx = [i for i in range(start, end) if has[i]]
                    if idx:
                        torch._foreach_add_(
                            [self.gradient_views[i] for i in idx], [local(self.params[i]) for i in idx], alpha=wd
                        )
                start = end
        return self._grad

    @torch.no_grad()
    def precondition(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``g`` to the window and return ``(F⁻¹g, finite)``, both on the device.

        ``finite`` is a boolean 0-dim tensor. Where it is False, ``g`` was not finite (or, rarely,
        the window's O(m²) update failed its check), nothing was stored and the direction is all
        zeros, so a caller that scales its step by ``finite`` (or ignores it, for a plain
        ``p -= lr·u``) skips the step without a host read.
        The direction lives in an internal buffer (see :attr:`direction_views`).
        """
        # The engine writes the direction (zero when rejected) into the buffer the views are of.
        _, finite = self.fisher.update_mul(g, return_finite=True, out=self._direction)
        return self._direction, finite

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` split into tensors shaped like the parameters (one view per parameter: for hot
        paths prefer :attr:`direction_views`)."""
        return [t.view(s) for t, s in zip(flat.split(self.sizes), self.local_shapes, strict=True)]

    def local_params(self) -> list[torch.Tensor]:
        """The tensors a step updates in place: the parameters, or their FSDP2 shards (views)."""
        return [local(p) for p in self.params]

    # ------------------------------------------------------------------ pruning
    def keep_vector(self, keeps: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Flat boolean mask from per-parameter masks (``None`` keeps everything)."""
        parts = [
            (
                k.reshape(-1).to(self.device, torch.bool)
                if k is not None
                else torch.ones(local(p).numel(), dtype=torch.bool, device=self.device)
            )
            for p, k in zip(self.params, keeps, strict=True)
        ]
        return torch.cat(parts)

    def apply_masks(self, masks: Masks) -> None:
        """Zero the coordinates where ``masks[param]`` is False in every stored gradient (the
        :class:`~lightning_mfac.optim.masking.MaskableWindow` protocol: keyed by name or tensor, see
        :func:`check_masks`); parameters not in ``masks`` keep all their coordinates."""
        keeps = check_masks(self.params, masks, self.owner, self.names)
        # FSDP2: masks are full-size; this rank's window holds the columns of its rows only.
        keeps = [None if k is None else local_rows(p, k) for p, k in zip(self.params, keeps, strict=True)]
        if any(k is not None for k in keeps):
            self.fisher.mask_coordinates(self.keep_vector(keeps))

    # ------------------------------------------------------------------ the engine's settings
    @property
    def config(self) -> DynamicConfig:
        """The settings in effect (the window's dtype settled; ``damp`` as last set)."""
        return self.fisher.config

    @property
    def dtype(self) -> torch.dtype:
        """The window's storage dtype."""
        return self.fisher.dtype

    @property
    def sharded(self) -> bool:
        """Whether the window is spread over the ranks of a process group (its state is too)."""
        return self.fisher.storage in ("ShardedWindow", "LocalShardWindow")

    def fill(self) -> torch.Tensor:
        """The fraction of the window that holds gradients (a device tensor: no host read)."""
        return self.fisher.filled.to(torch.float32) / self.fisher.ngrads

    def reset(self) -> None:
        """Empty the window (it re-warms over the next ``ngrads`` steps)."""
        self.fisher.reset()

    def set_damp(self, damp: float, damp_mode: str | None = None) -> None:
        """Use another dampening from now on, keeping the window (refactorized with it)."""
        self.fisher.set_damp(damp, damp_mode)

    # ------------------------------------------------------------------ state
    def state_dict(self, include_window: bool = True) -> dict[str, Any]:
        fisher = self.fisher.state_dict()
        if not include_window:
            fisher = {k: v for k, v in fisher.items() if k not in ("window", "core", "core_inverse")}
        state: dict[str, Any] = {"shapes": list(self.shapes), "fisher": fisher}
        if self.names is not None:
            state["names"] = list(self.names)
        return state

    def restore(self, state: Mapping[str, Any]) -> str | None:
        """Resume from :meth:`state_dict` under the one rule both surfaces follow: the window keeps
        the settings in effect, i.e. this window's own:

        * a checkpoint of another model (parameter shapes) is an error;
        * one of another shape -- other parameter names (where both sides know them), ``ngrads`` or
          window dtype -- or one saved without its window leaves the window empty (it re-warms);
        * one with another dampening keeps its window, refactorized with the dampening in effect
          (:meth:`set_damp`).

        ``MFAC`` builds its window from the checkpoint's ``param_groups`` (torch's rule: the
        checkpoint's hyper-parameters win), so nothing differs there; ``MFACPreconditioner`` builds
        it from its constructor's arguments (a callback's settings are the run's).

        Returns ``None`` when the window came back as it was saved, else one sentence saying what
        differed and what was done, for the caller to warn with.
        """
        config, saved = self.config, state["fisher"]
        changes = []
        saved_names = state.get("names")
        if saved_names is not None and self.names is not None and list(saved_names) != self.names:
            changes.append(
                f"parameters: {len(saved_names)} tensors in the checkpoint, {len(self.names)} selected now "
                f"(new: {[n for n in self.names if n not in saved_names][:4]}, "
                f"gone: {[n for n in saved_names if n not in self.names][:4]})"
            )
        else:  # the same parameters must have the same shapes
            self._check_shapes(state)
        if saved["ngrads"] != config.ngrads:
            changes.append(f"ngrads: {saved['ngrads']} in the checkpoint, {config.ngrads} now")
        dtype = str(self.dtype).replace("torch.", "")
        if saved.get("dtype", dtype) != dtype:
            changes.append(f"window dtype: {saved['dtype']} in the checkpoint, {dtype} now")
        rewarm = f"re-warms over the next {config.ngrads} steps"
        if changes:
            self.reset()
            return (f"{self.owner}: resuming with other window settings than the checkpoint's ("
                    + "; ".join(changes) + f"). The window was rebuilt empty and {rewarm}.")
        if "window" not in saved:
            self.reset()
            return (f"{self.owner}: the checkpoint was saved with save_window=False; the M-FAC window "
                    f"starts empty and {rewarm}.")
        self.fisher.load_state_dict(saved)
        old = (saved["damp"], saved.get("damp_mode", "absolute"))
        if old == (config.damp, config.damp_mode):
            return None
        self.set_damp(config.damp, config.damp_mode)
        return (f"{self.owner}: resuming with damp={config.damp:g} ({config.damp_mode}); the checkpoint was "
                f"written with damp={old[0]:g} ({old[1]}). The window was kept and refactorized with "
                f"damp={config.damp:g}.")

    def _check_shapes(self, state: Mapping[str, Any]) -> None:
        saved = [tuple(s) for s in state["shapes"]]
        if saved != self.shapes:
            raise RuntimeError(
                f"{self.owner}: the checkpoint's M-FAC window was built for {len(saved)} parameters of shapes "
                f"{saved[:4]}{'…' if len(saved) > 4 else ''}, which do not match the current {len(self.shapes)} "
                f"of shapes {self.shapes[:4]}{'…' if len(self.shapes) > 4 else ''}: the checkpoint is from a "
                "different model."
            )
