"""Sparsity schedules: gradual pruning over epochs, one-shot recomputation steps, and
``ngrads`` schedules.

Gradual pruning (Zhu & Gupta, "To prune, or not to prune", 2017) raises the sparsity at pruning
steps ``j = 0 … n−1`` as

    cubic:   s_j = s_f · (1 − (1 − t_j)³),      linear:  s_j = s_f · t_j,      t_j = (j + 1) / n,

i.e. Zhu & Gupta's curve with ``s_i = 0`` sampled so that the first step already prunes and the
last one reaches ``s_f``; the cubic prunes fast while many redundant weights remain and slowly
near the target. An explicit list gives the sparsity of each step, as in the M-FAC / WoodFisher
gradual recipes (0.5, 0.75, 0.875, …: every step halves the density).

One-shot recomputation: reaching ``s_f`` in ``k`` steps, each with gradients (and so the Fisher)
recomputed at the partially pruned and corrected weights, so that no single OBS step has to rely
on the independent-weights approximation for a large pruned set (``experiments/oneshot_quality.py``
measures the gain). The spacing is this package's choice: the density shrinks geometrically,

    1 − s_j = (1 − s_0) · ((1 − s_f) / (1 − s_0))^{j/k},   j = 1 … k,

so each step removes the same fraction of the weights still alive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_mfac import _validation as check

__all__ = ["check_ngrads", "gradual_schedule", "ngrads_for", "recomputation_targets"]

SCHEDULES = ("cubic", "linear")


def check_ngrads(ngrads: int | Mapping[float, int]) -> int | dict[float, int]:
    """An int ``>= 1`` or a ``{sparsity: ngrads}`` mapping that contains the key 0."""
    if isinstance(ngrads, Mapping):
        if not any(k == 0 for k in ngrads):
            raise ValueError(
                f"ngrads={dict(ngrads)!r} is invalid: a {{sparsity: ngrads}} schedule must contain the key 0 "
                "(the number of gradients used until the first larger key is reached)."
            )
        out = {}
        for k, v in ngrads.items():
            out[check.in_unit_interval("ngrads key", k)] = check.positive_int(f"ngrads[{k!r}]", v)
        return dict(sorted(out.items()))
    return check.positive_int("ngrads", ngrads)


def ngrads_for(ngrads: int | Mapping[float, int], sparsity: float) -> int:
    """The entry with the largest key ``<=`` the target ``sparsity`` (an int applies everywhere)."""
    if not isinstance(ngrads, Mapping):
        return int(ngrads)
    return int(ngrads[max(k for k in ngrads if k <= sparsity + 1e-12)])


def recomputation_targets(initial: float, final: float, steps: int) -> list[float]:
    """Intermediate sparsities from ``initial`` to ``final`` in ``steps`` geometric density steps."""
    if final <= initial or steps == 1:
        return [final]
    ratio = (1.0 - final) / (1.0 - initial)
    targets = [1.0 - (1.0 - initial) * ratio ** (j / steps) for j in range(1, steps)]
    return [*targets, final]


def gradual_schedule(
    sparsity: float | None,
    schedule: str | Sequence[float],
    start_epoch: int,
    end_epoch: int | None,
    frequency: int,
) -> list[tuple[int, float]]:
    """``(epoch, target sparsity)`` for every pruning step; validates all arguments.

    Steps are at ``start_epoch, start_epoch + frequency, …``; with ``"cubic"``/``"linear"`` the
    last step is at ``end_epoch`` (appended if the stride skips it; ``None`` means ``start_epoch``,
    a single step). With a list, step ``j`` is at ``start_epoch + j · frequency`` and ``end_epoch``
    must be ``None`` or that last epoch; ``sparsity`` must be ``None`` or the list's last entry.
    """
    start_epoch = check.positive_int("start_epoch", start_epoch, minimum=0)
    frequency = check.positive_int("frequency", frequency)
    if end_epoch is not None:
        end_epoch = check.positive_int("end_epoch", end_epoch, minimum=0)
        if end_epoch < start_epoch:
            raise ValueError(f"end_epoch={end_epoch} is invalid: expected end_epoch >= start_epoch={start_epoch}.")
    if isinstance(schedule, str):
        check.one_of("schedule", schedule, SCHEDULES)
        if sparsity is None:
            raise ValueError(f"sparsity=None is invalid with schedule={schedule!r}: expected a number in [0, 1).")
        final = check.in_unit_interval("sparsity", sparsity)
        last = start_epoch if end_epoch is None else end_epoch
        epochs = list(range(start_epoch, last + 1, frequency))
        if epochs[-1] != last:
            epochs.append(last)
        n = len(epochs)
        if schedule == "cubic":
            targets = [final * (1.0 - (1.0 - (j + 1) / n) ** 3) for j in range(n)]
        else:
            targets = [final * (j + 1) / n for j in range(n)]
        targets[-1] = final
        return list(zip(epochs, targets, strict=True))
    if not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(
            f"schedule={schedule!r} is invalid: expected one of {list(SCHEDULES)} or a non-empty list of sparsities."
        )
    targets = [check.in_unit_interval(f"schedule[{j}]", s) for j, s in enumerate(schedule)]
    if any(b < a for a, b in zip(targets, targets[1:], strict=False)):
        raise ValueError(f"schedule={list(schedule)!r} is invalid: sparsities must be non-decreasing.")
    if sparsity is not None and not math.isclose(check.in_unit_interval("sparsity", sparsity), targets[-1]):
        raise ValueError(
            f"sparsity={sparsity!r} is invalid with an explicit schedule ending at {targets[-1]}: "
            "expected None or the schedule's last entry."
        )
    epochs = [start_epoch + j * frequency for j in range(len(targets))]
    if end_epoch is not None and end_epoch != epochs[-1]:
        raise ValueError(
            f"end_epoch={end_epoch} is invalid: a {len(targets)}-step schedule from start_epoch={start_epoch} "
            f"every {frequency} epoch(s) ends at epoch {epochs[-1]}; pass end_epoch=None or {epochs[-1]}."
        )
    return list(zip(epochs, targets, strict=True))
