"""One-shot Optimal Brain Surgeon pruning with the static M-FAC inverse Fisher.

A pruning step at target sparsity ``s`` (Frantar, Kurtic & Alistarh, NeurIPS 2021: the static
algorithm applied to OBS pruning, as in their pruning experiments):

1. take ``m`` gradients of the loss at the current weights, restricted to the ``d'`` weights
   that are still alive, as the rows of ``G ∈ ℝ^{m×d'}``;
2. build ``F⁻¹`` of ``F = λI + (1/m) GᵀG`` with :class:`~lightning_mfac.StaticFisherInverse`
   (full, or block-diagonal with ``block_size``);
3. score every alive weight by ``ρ = w² / (2 [F⁻¹]_ii)`` and prune the lowest (globally, per
   layer, or within N:M groups, see :mod:`~lightning_mfac.pruning.masks`);
4. correct the survivors by ``δw = −F⁻¹ v``, ``v_q = w_q / [F⁻¹]_qq`` on the newly pruned set
   (one IHVP, :mod:`~lightning_mfac.pruning.obs`), then set the pruned weights to exactly 0.

Restricting the gradients to alive weights makes ``F`` the Fisher of the sub-network that can
still move: the inverse of the sub-matrix, not a sub-matrix of the inverse, which is what OBS
needs once some weights are pinned at zero. ``recomputations=k`` repeats the step ``k`` times
towards the target with fresh gradients, so later steps see the corrected weights.

This module is plain PyTorch; the Lightning callback
:class:`~lightning_mfac.callbacks.obs_pruning.OBSPruning` reuses :func:`prune_step`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_mfac import _validation as check
from lightning_mfac.fisher.config import WindowConfig
from lightning_mfac.fisher.static import StaticFisherInverse
from lightning_mfac.fisher.storage import check_window_fits, plan_storage
from lightning_mfac.optim.fsdp import is_dtensor, local, local_rows
from lightning_mfac.pruning.config import OBSConfig
from lightning_mfac.pruning.masks import prune_count, select_masks, sparsity_of
from lightning_mfac.pruning.obs import obs_correction, obs_saliency
from lightning_mfac.pruning.schedule import ngrads_for, recomputation_targets
from lightning_mfac.pruning.selection import check_nm, select_parameters

__all__ = [
    "check_masks",
    "check_target",
    "collect_gradients",
    "cycle_batches",
    "mask_weights",
    "oneshot_prune",
    "preserved_norm_stats",
    "prune_step",
    "sparse_state_dict",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- validation
def check_target(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """``sparsity`` in ``[0, 1)``; with an N:M pattern at most ``1 − N/M`` (``None`` means that)."""
    if nm is None:
        return check.in_unit_interval("sparsity", sparsity)
    n, m = nm
    limit = 1.0 - n / m
    if sparsity is None:
        return limit
    value = check.in_unit_interval("sparsity", sparsity)
    if value > limit + 1e-9:
        raise ValueError(
            f"sparsity={sparsity!r} is invalid with pattern='{n}:{m}': expected at most 1 - N/M = {limit:g} "
            "(or None for exactly that)."
        )
    return min(value, limit)


def check_masks(masks: Mapping[str, torch.Tensor] | None, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks for every selected weight; names not given default to all-kept."""
    masks = dict(masks or {})
    unknown = sorted(set(masks) - set(named))
    if unknown:
        raise ValueError(f"masks has entries {unknown} that are not among the selected parameters {list(named)}.")
    out = {}
    for name, p in named.items():
        mask = masks.get(name)
        if mask is None:
            # Full size, also for an FSDP2 shard: every rank holds the whole mask.
            out[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            continue
        if not isinstance(mask, torch.Tensor) or mask.shape != p.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"masks[{name!r}] has shape {shape}: expected a tensor of shape {tuple(p.shape)}.")
        out[name] = mask.to(device=p.device, dtype=torch.bool)
    return out


# ---------------------------------------------------------------------------- helpers
@torch.no_grad()
def mask_weights(named: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries (``masks[name]`` False) of each weight in place (of an FSDP2 shard,
    its rows of the full-size mask)."""
    for name, p in named.items():
        local(p).mul_(local_rows(p, masks[name]).to(p.device, p.dtype))


def sparse_state_dict(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` on the CPU with every masked weight stored as a sparse COO tensor.

    FSDP2 shards are gathered into full tensors, so every rank of their mesh must call this."""
    state = {k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu() for k, v in model.state_dict().items()}
    for name in masks:
        if name in state:
            state[name] = state[name].to_sparse()
    return state


def cycle_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield from ``batches`` forever, re-iterating it when it runs out."""
    while True:
        seen = 0
        for batch in batches:
            seen += 1
            yield batch
        if not seen:
            raise ValueError(
                "batches yielded no batch (empty, or a one-shot iterator that is exhausted): pass a list or "
                "a DataLoader, which are re-iterated when more gradients than batches are needed."
            )


@contextlib.contextmanager
def preserved_norm_stats(model: nn.Module) -> Iterator[None]:
    """Restore the running statistics of every BatchNorm/InstanceNorm afterwards, so that the
    forward passes made only to sample gradients leave no trace in the model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


@contextlib.contextmanager
def _grad_enabled(params: Sequence[torch.Tensor]) -> Iterator[None]:
    # Frozen weights can be pruned too; they need requires_grad only while gradients are taken.
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _window_device(rows: int, dim: int, dtype: torch.dtype, device: torch.device, storage: str) -> torch.device:
    """Where the ``rows × dim`` gradient matrix is accumulated: host memory when the storage plan
    (:func:`~lightning_mfac.fisher.storage.plan_storage`) pages it, so that
    ``StaticFisherInverse`` streams it to the device; else the device itself."""
    paged = plan_storage(storage, rows, dim, dtype, device, shardable=False) == "paged"
    return torch.device("cpu") if paged and device.type == "cuda" else device


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI, SLURM files), where a nested,
    # self-erasing bar would leave cursor-movement escape codes in the file.
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def collect_gradients(
    named: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    losses: Iterator[torch.Tensor],
    ngrads: int,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "M-FAC gradients",
    source: str = "loss_fn",
    window: WindowConfig | None = None,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """``(ngrads, d')`` gradients of successive ``losses`` w.r.t. the alive entries of ``named``.

    ``torch.autograd.grad`` is used, so the ``.grad`` fields of the model are left untouched.
    The matrix is kept on ``device`` (default: that of the first weight) unless ``window.storage``
    asks for host memory (``"paged"``, or ``"auto"`` with too little free GPU memory). ``source``
    names what produced the losses in error messages.

    FSDP2 (``named`` are ``DTensor`` shards of ``module``, sharded by ``fully_shard``): the sharded
    parameters are not in the autograd graph (FSDP2 gathers them for each unit's forward and
    reduce-scatters their gradients in its backward hooks), so each loss is back-propagated with
    ``backward()`` and the averaged gradients are gathered into full rows on every rank, which
    then all hold the same matrix -- of the global batch, as one process would. The ``.grad``
    fields of ``module`` are restored afterwards. Every rank of the mesh must call this.
    """
    if any(is_dtensor(p) for p in named.values()):
        if module is None:
            raise ValueError("collect_gradients: module is required for FSDP2-sharded parameters (their "
                             "gradients come from module's backward).")
        with _saved_grads(module):
            return _collect(named, masks, losses, ngrads, device, progress, desc, source, window,
                            _fsdp2_gradients(module))
    return _collect(named, masks, losses, ngrads, device, progress, desc, source, window, _autograd_gradients)


def _autograd_gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> Sequence[torch.Tensor | None]:
    return torch.autograd.grad(loss.reshape(()), params, allow_unused=True)


def _fsdp2_gradients(module: nn.Module) -> Callable[[torch.Tensor, Sequence[torch.Tensor]], list[torch.Tensor | None]]:
    def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        loss.reshape(()).backward()
        # The same parameters in the same order on every rank: one all-gather each.
        out = [None if p.grad is None else (p.grad.full_tensor() if is_dtensor(p.grad) else p.grad) for p in params]
        module.zero_grad(set_to_none=True)
        return out

    return gradients


@contextlib.contextmanager
def _saved_grads(module: nn.Module) -> Iterator[None]:
    saved = [(p, p.grad) for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        for p, g in saved:
            p.grad = g


def _collect(named, masks, losses, ngrads, device, progress, desc, source, window, gradients) -> torch.Tensor:
    """The loop of :func:`collect_gradients`; ``gradients(loss, params)`` gives each parameter's full
    gradient of one loss (``None``: unused)."""
    params = list(named.values())
    # Column indices of the alive entries (None: all alive, no gather needed).
    index = []
    for n, p in named.items():
        keep = masks[n].reshape(-1).to(p.device)
        index.append(None if bool(keep.all()) else keep.nonzero().squeeze(1))
    widths = [p.numel() if i is None else i.numel() for p, i in zip(params, index, strict=True)]
    bounds = [0, *torch.tensor(widths).cumsum(0).tolist()]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = torch.device(device) if device is not None else params[0].device
    storage = (window or WindowConfig()).storage
    where = _window_device(ngrads, bounds[-1], dtype, device, storage)
    check_window_fits(ngrads, bounds[-1], dtype, where, "device")
    grads = torch.zeros(ngrads, bounds[-1], dtype=dtype, device=where)
    with _grad_enabled(params), _progress(ngrads, desc, progress) as bar:
        for i in range(ngrads):
            loss = next(losses)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"{source} must return a scalar floating-point loss tensor, got {shape}.")
            if not loss.requires_grad:
                raise ValueError(f"{source} returned a loss that does not depend on the pruned weights (no grad_fn).")
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"{source} returned a non-finite loss ({float(loss)}) while sampling gradients.")
            parts = gradients(loss, params)
            for j, (g, idx) in enumerate(zip(parts, index, strict=True)):
                if g is None:
                    continue  # unused weight: its row segment stays zero
                g = g.reshape(-1) if idx is None else g.reshape(-1).index_select(0, idx)
                grads[i, bounds[j] : bounds[j + 1]] = g
            if bar is not None:
                bar.update(1)
    return grads


# ---------------------------------------------------------------------------- the step
def prune_step(
    named: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    sparsity: float,
    obs: OBSConfig | Mapping[str, Any] | None = None,
    *,
    gradients: Callable[[int], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``named`` in place to ``sparsity`` in one OBS step and return the new keep-masks.

    ``obs`` gives the method, ``ngrads`` (an int, or a schedule resolved at ``sparsity``), ``damp``,
    ``block_size``, ``scope``, ``pattern`` and ``window``; its ``recomputations`` and ``params``
    are the caller's business. ``gradients(n)`` must return ``(n, d')`` gradients restricted to
    the weights alive under ``masks`` (in ``named`` order), e.g. via :func:`collect_gradients`; it
    is only called for ``method="mfac"`` and only when the step prunes anything.
    """
    obs = OBSConfig.coerce(obs)
    names = list(named)
    if not _prunes_anything(masks, sparsity, obs.scope):
        mask_weights(named, masks)
        return dict(masks)
    if obs.method == "magnitude":
        scores = {n: named[n].detach().abs() for n in names}
        new = select_masks(scores, masks, sparsity, obs.scope, obs.nm)
        mask_weights(named, new)
        return new
    if gradients is None:
        raise ValueError("method='mfac' needs gradients: pass a gradients(n) callable.")
    device = torch.device(device) if device is not None else named[names[0]].device
    alive = {n: masks[n].reshape(-1).to(device) for n in names}
    weights = torch.cat([named[n].detach().reshape(-1).to(device, torch.float64)[alive[n]] for n in names])
    grads = gradients(ngrads_for(obs.ngrads, sparsity))
    if grads.shape[1] != weights.numel():
        raise ValueError(f"gradients returned {grads.shape[1]} columns: expected one per alive weight ({weights.numel()}).")
    fisher = _static_inverse(grads, obs, device)
    del grads
    inv_diag = fisher.diag()
    saliency = obs_saliency(weights, inv_diag)
    scores, offset = {}, 0
    counts = {n: int(alive[n].sum()) for n in names}
    for n in names:
        full = torch.zeros(alive[n].shape, dtype=torch.float64, device=device)
        full[alive[n]] = saliency[offset : offset + counts[n]]
        scores[n] = full
        offset += counts[n]
    new = select_masks(scores, masks, sparsity, obs.scope, obs.nm)
    pruned = torch.cat([~new[n].reshape(-1).to(device)[alive[n]] for n in names])
    updated = weights + obs_correction(fisher, weights, pruned, inv_diag)
    updated[pruned] = 0.0
    offset = 0
    with torch.no_grad():
        for n in names:
            p = named[n]
            flat = torch.zeros(p.numel(), dtype=torch.float64, device=device)
            flat[alive[n]] = updated[offset : offset + counts[n]]
            offset += counts[n]
            p.copy_(flat.view(p.shape).to(p.device, p.dtype))
    mask_weights(named, new)
    return new


def _static_inverse(grads: torch.Tensor, obs: OBSConfig, device: torch.device) -> StaticFisherInverse:
    return StaticFisherInverse(grads, obs.damp, block_size=obs.block_size, device=device, window=obs.window)


def _prunes_anything(masks: Mapping[str, torch.Tensor], sparsity: float, scope: str) -> bool:
    if scope == "layer":
        return any(prune_count(m.numel(), sparsity) > int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return prune_count(total, sparsity) > sum(int((~m).sum()) for m in masks.values())


# ---------------------------------------------------------------------------- public entry
def oneshot_prune(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    batches: Iterable[Any] | None,
    sparsity: float | None,
    obs: OBSConfig | Mapping[str, Any] | None = None,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place with Optimal Brain Surgeon on the M-FAC inverse Fisher.

    Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021 (see the module docstring for the step).

    Args:
        model: the network; pruned weights are set to exactly 0.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss; it moves the batch to the model's
            device itself. One gradient per batch. Unused (may be ``None``) for ``"magnitude"``.
        batches: an iterable of batches (list, DataLoader), re-iterated when fewer than needed.
            Unused (may be ``None``) for ``method="magnitude"``.
        sparsity: target fraction of zeros over the selected weights, in ``[0, 1)``; with an
            ``"N:M"`` pattern at most ``1 − N/M`` (``None`` = exactly that).
        obs: the pruning settings, an :class:`~lightning_mfac.pruning.config.OBSConfig` or a
            mapping of its fields (method, ngrads, damp, block_size, recomputations, scope,
            pattern, params, window); ``None`` for the defaults.
        masks: keep-masks of weights pruned before (by name; missing names are fully kept).
        device: device of the Fisher computation (default: the weights'). With CUDA weights and a
            gradient matrix too large for the GPU, it is kept in host memory and paged.
        progress: show a tqdm bar while sampling gradients and log each step's sparsity
            (``logging`` at INFO, logger ``lightning_mfac.pruning.oneshot``).

    Gradients are taken in the model's current train/eval mode (``model.eval()`` is the usual
    choice for a trained model); BatchNorm running statistics are restored afterwards.

    Returns:
        Boolean keep-masks by parameter name (``False`` = pruned, the weight is 0).
    """
    obs = OBSConfig.coerce(obs)
    target = check_target(sparsity, obs.nm)
    if obs.method == "mfac" and not callable(loss_fn):
        raise ValueError(f"loss_fn={loss_fn!r} is invalid: expected a callable loss_fn(model, batch) -> scalar.")
    if obs.method == "mfac" and batches is None:
        raise ValueError("batches=None is invalid with method='mfac': expected an iterable of batches.")
    named = select_parameters(model, obs.params)
    check_nm(named, obs.nm)
    sharded = next((n for n, p in named.items() if is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(
            f"oneshot_prune: parameter {sharded!r} is an FSDP2 DTensor shard: one-shot pruning runs in one "
            "process or under DDP; for FSDP2, prune gradually with the OBSPruning callback."
        )
    keep = check_masks(masks, named)
    mask_weights(named, keep)

    stream = (loss_fn(model, batch) for batch in cycle_batches(batches)) if obs.method == "mfac" else None
    steps = recomputation_targets(sparsity_of(keep), target, obs.recomputations)
    with preserved_norm_stats(model):
        for j, step_target in enumerate(steps):
            def gradients(n: int, _keep=keep, _j=j) -> torch.Tensor:
                desc = f"M-FAC gradients (step {_j + 1}/{len(steps)})"
                return collect_gradients(named, _keep, stream, n, device, progress, desc, window=obs.window)

            start = time.perf_counter()
            keep = prune_step(named, keep, step_target, obs, gradients=gradients, device=device)
            if progress:
                log.info(
                    "pruning step %d/%d: sparsity %.4f in %.2fs",
                    j + 1, len(steps), sparsity_of(keep), time.perf_counter() - start,
                )
    return keep
