"""Strong second-order and matrix-aware baselines for side-by-side runs with M-FAC.

* **SINGD** (Lin et al., "Structured Inverse-Free Natural Gradient", ICML 2024) through the
  official ``singd`` package, including its KFAC-like mode (IKFAC, ``kfac_like=True``) and its
  structured factors (dense, diagonal, block-diagonal, hierarchical, Toeplitz).
* **Shampoo** (the blocked, grafted "scalable" variant), **SOAP** and **Muon** through the
  ``pytorch-optimizer`` package.

Install them with ``pip install "lightning-mfac[baselines]"``.

Every entry point is an optimizer factory with the app's calling convention
``factory(params, **hyperparameters)`` (Hydra ``_partial_: true``). SINGD hooks the model's layers
and Muon tells hidden weight matrices from embeddings and the classifier head, so those two also
take the model: they carry ``needs_model = True``, and :class:`lightning_mfac.app.tasks.Task` then calls
``factory(params, model=task.model)``.

SINGD's limits, checked here rather than left silent: it preconditions only ``nn.Linear`` and
``nn.Conv2d`` layers. Without this adapter the parameters of every other layer (BatchNorm,
LayerNorm, embeddings, Hugging Face ``Conv1D``...) would not be trained at all. ``unsupported``
chooses what happens to them: ``"sgd"`` (default) applies SINGD's own update without a
preconditioner (SGD with the same lr, momentum and weight decay), ``"freeze"`` leaves them
untrained (``singd``'s behaviour), ``"error"`` refuses the model. Each choice names the layers.
"""

from __future__ import annotations

import enum
import functools
import importlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

try:
    from singd.optim.optimizer import SINGD as _SINGDBase
except ImportError:  # the `baselines` extra is optional
    _SINGDBase = None

__all__ = [
    "SINGD",
    "SINGD_STRUCTURES",
    "muon",
    "needs_model",
    "shampoo",
    "singd",
    "soap",
    "unsupported_singd_layers",
]

_INSTALL_HINT = 'pip install "lightning-mfac[baselines]"'

#: Structure names accepted for SINGD's Kronecker factors: friendly aliases -> ``singd`` names.
SINGD_STRUCTURES = {
    "dense": "dense",
    "diagonal": "diagonal",
    "block_diagonal": "block30diagonal",
    "block30diagonal": "block30diagonal",
    "hierarchical": "hierarchical15_15",
    "hierarchical15_15": "hierarchical15_15",
    "toeplitz": "triltoeplitz",
    "lower_toeplitz": "triltoeplitz",
    "triltoeplitz": "triltoeplitz",
    "upper_toeplitz": "triutoeplitz",
    "triutoeplitz": "triutoeplitz",
}
_SINGD_LAYERS = (nn.Linear, nn.Conv2d)
_UNSUPPORTED_MODES = ("sgd", "freeze", "error")


def needs_model(factory: Callable[..., Any]) -> bool:
    """Whether an optimizer factory (possibly a ``functools.partial``) wants ``model=``."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return bool(getattr(factory, "needs_model", False))


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"preconditioner_dtype={value!r} is invalid: expected null, 'float32' or 'bfloat16'.")
    return dtype


def _pair(value: Any, name: str) -> tuple[Any, Any]:
    if isinstance(value, str) or value is None or isinstance(value, torch.dtype):
        return value, value
    items = tuple(value)
    if len(items) != 2:
        raise ValueError(f"{name}={value!r} is invalid: expected one value or a pair (K, C).")
    return items[0], items[1]


def _structure(name: Any) -> str:
    key = str(name).lower()
    if key not in SINGD_STRUCTURES:
        raise ValueError(f"structures={name!r} is invalid: expected one of {sorted(SINGD_STRUCTURES)}.")
    return SINGD_STRUCTURES[key]


def unsupported_singd_layers(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> list[str]:
    """``"name (Type)"`` of every module that holds trainable parameters SINGD cannot precondition.

    Only parameters in ``params`` (default: all trainable ones) count; parameters that a
    container registers directly (e.g. ``nn.MultiheadAttention.in_proj_weight``) count too.
    """
    wanted = {id(p) for p in (params if params is not None else model.parameters()) if p.requires_grad}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, _SINGD_LAYERS):
            continue
        if any(id(p) in wanted for p in module.parameters(recurse=False)):
            found.append(f"{name or '<root>'} ({type(module).__name__})")
    return found


def _covered(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, _SINGD_LAYERS) for p in m.parameters(recurse=False)}


class SINGD(_SINGDBase if _SINGDBase is not None else torch.optim.Optimizer):
    """``singd.optim.optimizer.SINGD`` made fit for a Lightning training loop.

    On top of the package's optimizer:

    * ``step(closure)`` works: Lightning passes the training step as a closure, which ``singd``
      refuses. The closure (forward and backward) runs first, so SINGD's layer hooks see the
      batch exactly as in the package's own loop (forward, backward, ``step()``);
    * layers SINGD does not support are reported by name and handled as ``unsupported`` says
      (see the module docstring); the names are in ``self.unsupported_layers``;
    * a supported layer whose forward hook never ran (a ``Linear`` that its parent calls
      functionally, as ``nn.MultiheadAttention`` does with ``out_proj``) keeps its previous
      preconditioner instead of failing with a ``KeyError``, with a warning naming it.

    Arguments are those of ``singd``'s ``SINGD``; ``structures`` may be one name for both factors
    or a pair, with the aliases of :data:`SINGD_STRUCTURES`, and ``preconditioner_dtype`` may be
    dtype names. Its signature is the package's, ``SINGD(model, params, ...)``; the app's factory is
    :func:`singd`.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        *,
        structures: str | Sequence[str] = "dense",
        preconditioner_dtype: Any = None,
        unsupported: str = "sgd",
        **kwargs: Any,
    ) -> None:
        if _SINGDBase is None:
            raise ImportError(f"SINGD needs the `singd` package: {_INSTALL_HINT}")
        if unsupported not in _UNSUPPORTED_MODES:
            raise ValueError(f"unsupported={unsupported!r} is invalid: expected one of {list(_UNSUPPORTED_MODES)}.")
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        if any(isinstance(p, dict) for p in params):
            raise TypeError("SINGD adapter: pass a list of parameters, not parameter groups.")
        self.unsupported_layers = unsupported_singd_layers(model, params)
        covered = _covered(model)
        if self.unsupported_layers:
            head = (
                f"SINGD preconditions only nn.Linear and nn.Conv2d layers; {len(self.unsupported_layers)} "
                f"layer(s) with trainable parameters are not supported: {', '.join(self.unsupported_layers)}"
            )
            if unsupported == "error":
                raise ValueError(
                    f"{head}. Pass unsupported='sgd' to train them with SINGD's update without a "
                    "preconditioner, or unsupported='freeze' to leave them untrained."
                )
            if unsupported == "freeze":
                params = [p for p in params if id(p) in covered]
                warnings.warn(f"{head}. They are NOT trained (unsupported='freeze').", stacklevel=2)
            else:
                warnings.warn(
                    f"{head}. They are trained with SINGD's momentum update without a preconditioner "
                    "(plain SGD with the same lr, momentum and weight decay; unsupported='sgd').",
                    stacklevel=2,
                )
        if not any(id(p) in covered for p in params):
            raise ValueError("SINGD: the model has no trainable nn.Linear or nn.Conv2d layer to precondition.")
        k, c = _pair(structures, "structures")
        dk, dc = _pair(preconditioner_dtype, "preconditioner_dtype")
        super().__init__(
            model,
            params=params,
            structures=(_structure(k), _structure(c)),
            preconditioner_dtype=(_dtype(dk), _dtype(dc)),
            warn_unsupported=False,
            **kwargs,
        )
        hooked = {id(p) for m in self.module_names for p in m.parameters(recurse=False)}
        self._fallback = {id(p) for group in self.param_groups for p in group["params"] if id(p) not in hooked}
        self._no_statistics: set[str] = set()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        return loss

    def _update_preconditioner(self, module: nn.Module) -> None:
        name = self.module_names[module]
        due = self.steps % self._get_param_group_entry(module, "T") == 0
        if due and (name not in self.H_Ks or name not in self.H_Cs):
            self.H_Ks.pop(name, None)
            self.H_Cs.pop(name, None)
            if name not in self._no_statistics:
                self._no_statistics.add(name)
                warnings.warn(
                    f"SINGD: layer {name!r} ({type(module).__name__}) produced no curvature statistics "
                    "(its forward hook did not run, e.g. a parent module calls it functionally); "
                    "its preconditioner is left unchanged.",
                    stacklevel=2,
                )
            return
        super()._update_preconditioner(module)

    # ``singd`` pickles its structured matrices as objects, which a ``weights_only`` load (how
    # Lightning resumes) refuses; the checkpoint holds their class name and plain attributes.
    _MATRICES = ("Ks", "Cs", "m_Ks", "m_Cs", "H_Ks", "H_Cs")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in self._MATRICES:
            state[key] = {
                name: {"structure": type(m).__name__, "attributes": dict(vars(m))} for name, m in state[key].items()
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        classes = {cls.__name__: cls for cls in self.SUPPORTED_STRUCTURES.values()}
        for key in self._MATRICES:
            matrices = {}
            for name, packed in state_dict[key].items():
                if isinstance(packed, dict):  # written by this class
                    m = classes[packed["structure"]].__new__(classes[packed["structure"]])
                    vars(m).update(packed["attributes"])
                    packed = m
                matrices[name] = packed
            state_dict[key] = matrices
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def _step(self) -> None:
        super()._step()
        if not self._fallback:
            return
        # The same update SINGD applies to its layers, with the identity as preconditioner.
        scale = self._get_grad_scale(self.steps)
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if id(p) not in self._fallback or p.grad is None:
                    continue
                d = p.grad / scale if scale != 1.0 else p.grad.clone()
                if decay != 0.0:
                    d.add_(p, alpha=decay)
                if momentum != 0.0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    d = state["momentum_buffer"].mul_(momentum).add_(d)
                p.add_(d, alpha=-lr)


def singd(
    params: Iterable[Any] | None = None,
    model: nn.Module | None = None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.9,
    damping: float = 1e-3,
    alpha1: float = 0.5,
    weight_decay: float = 0.0,
    T: int = 10,
    lr_cov: float = 1e-2,
    structures: str | Sequence[str] = "dense",
    kfac_like: bool = False,
    kfac_approx: str = "expand",
    loss_average: str | None = "batch",
    preconditioner_dtype: Any = None,
    normalize_lr_cov: bool = False,
    init_grad_scale: float = 1.0,
    unsupported: str = "sgd",
) -> SINGD:
    """SINGD for ``model`` (the app passes it). ``kfac_like=True`` is IKFAC, the variant whose
    update matches KFAC's (Riemannian momentum ``alpha1`` is then ignored). See :class:`SINGD`."""
    if model is None:
        raise TypeError("singd() needs model=...: SINGD installs hooks on the model's layers.")
    return SINGD(
        model,
        params,
        lr=lr,
        momentum=momentum,
        damping=damping,
        # The package warns and zeroes alpha1 itself; doing it here keeps IKFAC configs quiet.
        alpha1=0.0 if kfac_like else alpha1,
        weight_decay=weight_decay,
        T=T,
        lr_cov=lr_cov,
        structures=structures,
        kfac_like=kfac_like,
        kfac_approx=kfac_approx,
        loss_average=loss_average,
        preconditioner_dtype=preconditioner_dtype,
        normalize_lr_cov=normalize_lr_cov,
        init_grad_scale=init_grad_scale,
        unsupported=unsupported,
    )


singd.needs_model = True


def _pytorch_optimizer():
    try:
        import pytorch_optimizer
    except ImportError as err:
        raise ImportError(f"Shampoo, SOAP and Muon need the `pytorch-optimizer` package: {_INSTALL_HINT}") from err
    return pytorch_optimizer


_GRAFTS = {"none": 0, "sgd": 1, "adagrad": 2, "rmsprop": 3, "sqrtn": 4}
_PACKAGE = "pytorch_optimizer."


def _pack(value: Any) -> Any:
    """Helper objects of ``pytorch_optimizer`` (Shampoo's preconditioners and grafts) as plain
    dicts, so that checkpoints load with ``torch.load(weights_only=True)``, as Lightning resumes."""
    cls = type(value)
    if cls.__module__.startswith(_PACKAGE):
        name = f"{cls.__module__}:{cls.__qualname__}"
        if isinstance(value, enum.Enum):
            return {"__pytorch_optimizer_enum__": name, "value": value.value}
        return {"__pytorch_optimizer_object__": name, "attributes": {k: _pack(v) for k, v in vars(value).items()}}
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pack(v) for v in value]
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    if not isinstance(value, dict):
        return value
    name = value.get("__pytorch_optimizer_enum__") or value.get("__pytorch_optimizer_object__")
    if not isinstance(name, str):
        return {k: _unpack(v) for k, v in value.items()}
    module, _, qualname = name.partition(":")
    if not module.startswith(_PACKAGE):  # only ever rebuild the package's own classes
        raise ValueError(f"refusing to rebuild {name!r} from an optimizer checkpoint")
    cls = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    if "__pytorch_optimizer_enum__" in value:
        return cls(value["value"])
    obj = cls.__new__(cls)
    vars(obj).update({k: _unpack(v) for k, v in value["attributes"].items()})
    return obj


@functools.cache
def _scalable_shampoo() -> type:
    base = _pytorch_optimizer().ScalableShampoo

    class ScalableShampoo(base):
        # Unpacked only after the package's own load_state_dict, which walks the saved and the
        # loaded state side by side and needs both in the same (packed) form.
        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            return {**state, "state": _pack(state["state"])}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            for p in list(self.state):
                self.state[p] = _unpack(self.state[p])

    return ScalableShampoo


def shampoo(
    params: Iterable[Any],
    *,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    graft: str = "rmsprop",
    block_size: int = 256,
    start_preconditioning_step: int = 25,
    preconditioning_compute_steps: int = 20,
    statistics_compute_steps: int = 1,
    no_preconditioning_for_layers_with_dim_gt: int = 8192,
    nesterov: bool = True,
    matrix_eps: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Shampoo as ``pytorch_optimizer.ScalableShampoo`` (Anil et al., 2020): Kronecker-factored
    inverse roots over blocks of at most ``block_size`` rows/columns, recomputed every
    ``preconditioning_compute_steps`` steps, with the step size grafted from ``graft``
    (``"rmsprop"``: Adam-like magnitudes, so an AdamW learning rate; ``"sgd"``: an SGD one).

    The plain ``pytorch_optimizer.Shampoo`` keeps a dense ``n × n`` factor for every tensor
    dimension (3.7 GB for a 30522-token embedding) and is not offered here.
    """
    if graft not in _GRAFTS:
        raise ValueError(f"graft={graft!r} is invalid: expected one of {list(_GRAFTS)}.")
    return _scalable_shampoo()(
        params,
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        graft_type=_GRAFTS[graft],
        block_size=block_size,
        start_preconditioning_step=start_preconditioning_step,
        preconditioning_compute_steps=preconditioning_compute_steps,
        statistics_compute_steps=statistics_compute_steps,
        no_preconditioning_for_layers_with_dim_gt=no_preconditioning_for_layers_with_dim_gt,
        nesterov=nesterov,
        matrix_eps=matrix_eps,
        **kwargs,
    )


def soap(
    params: Iterable[Any],
    *,
    lr: float = 3e-3,
    betas: Sequence[float] = (0.95, 0.95),
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precondition_dim: int = 10000,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's factors, the basis refreshed
    every ``precondition_frequency`` steps; dimensions above ``max_precondition_dim`` (large
    embeddings) are left unrotated."""
    return _pytorch_optimizer().SOAP(
        params,
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precondition_dim=max_precondition_dim,
        **kwargs,
    )


def _muon_split(params: list[torch.Tensor], model: nn.Module | None) -> tuple[list, list]:
    """Muon orthogonalizes hidden weight matrices only; embeddings, the output head, biases and
    norm gains go to AdamW (Jordan et al.'s recipe)."""
    excluded: set[int] = set()
    if model is not None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:  # the classifier / LM head: the last Linear registered
            excluded.update(id(p) for p in linears[-1].parameters(recurse=False))
        for m in model.modules():
            if isinstance(m, nn.Embedding | nn.EmbeddingBag):
                excluded.update(id(p) for p in m.parameters(recurse=False))
    hidden = [p for p in params if p.ndim >= 2 and id(p) not in excluded]
    ids = {id(p) for p in hidden}
    return hidden, [p for p in params if id(p) not in ids]


def muon(
    params: Iterable[Any],
    model: nn.Module | None = None,
    *,
    lr: float = 0.02,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    ns_steps: int = 5,
    use_adjusted_lr: bool = False,
    adamw_lr: float = 3e-4,
    adamw_betas: Sequence[float] = (0.9, 0.95),
    adamw_wd: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Muon (``pytorch_optimizer.Muon``) with the parameters split into its two groups.

    Muon's orthogonalized momentum update (Newton-Schulz) goes to the hidden weight matrices,
    convolution kernels included (flattened to ``out × in·k·k``); AdamW (``adamw_lr``,
    ``adamw_betas``, ``adamw_wd``) trains the rest. With ``model`` (the app passes it), the
    embeddings (``nn.Embedding``) and the output head (the model's last ``nn.Linear``) count as
    "the rest"; without it the split is by shape alone: tensors of 2 or more dimensions are
    matrices.
    """
    params = [p for p in params if p.requires_grad]
    hidden, rest = _muon_split(params, model)
    groups = []
    if hidden:
        groups.append({"params": hidden, "use_muon": True})
    if rest:
        groups.append({"params": rest, "use_muon": False})
    return _pytorch_optimizer().Muon(
        groups,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        ns_steps=ns_steps,
        use_adjusted_lr=use_adjusted_lr,
        adamw_lr=adamw_lr,
        adamw_betas=tuple(adamw_betas),
        adamw_wd=adamw_wd,
        **kwargs,
    )


muon.needs_model = True
