"""Optimal Brain Surgeon pruning with M-FAC (pure PyTorch, no Lightning).

``oneshot_prune`` prunes a model once (optionally in several recomputation steps); the gradual
Lightning callback :class:`~lightning_mfac.callbacks.obs_pruning.OBSPruning` is built on
``prune_step`` and the schedules here.
"""

from lightning_mfac.pruning.config import OBSConfig
from lightning_mfac.pruning.masks import layer_sparsities, prune_count, select_masks, sparsity_of
from lightning_mfac.pruning.obs import obs_correction, obs_saliency
from lightning_mfac.pruning.oneshot import (
    collect_gradients,
    cycle_batches,
    mask_weights,
    oneshot_prune,
    preserved_norm_stats,
    prune_step,
    sparse_state_dict,
)
from lightning_mfac.pruning.schedule import check_ngrads, gradual_schedule, ngrads_for, recomputation_targets
from lightning_mfac.pruning.selection import check_nm, parse_pattern, select_parameters

__all__ = [
    "OBSConfig",
    "check_ngrads",
    "check_nm",
    "collect_gradients",
    "cycle_batches",
    "gradual_schedule",
    "layer_sparsities",
    "mask_weights",
    "ngrads_for",
    "obs_correction",
    "obs_saliency",
    "oneshot_prune",
    "parse_pattern",
    "preserved_norm_stats",
    "prune_count",
    "prune_step",
    "recomputation_targets",
    "select_masks",
    "select_parameters",
    "sparse_state_dict",
    "sparsity_of",
]
