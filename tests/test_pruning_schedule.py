"""Sparsity schedules: cubic, linear, explicit lists, recomputation steps and ngrads schedules."""

from __future__ import annotations

import pytest

from lightning_mfac.callbacks.obs_pruning import OBSPruning
from lightning_mfac.pruning import check_ngrads, gradual_schedule, ngrads_for, recomputation_targets


def test_cubic_follows_zhu_and_gupta():
    steps = gradual_schedule(0.9, "cubic", start_epoch=2, end_epoch=8, frequency=2)
    assert [e for e, _ in steps] == [2, 4, 6, 8]
    expected = [0.9 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)]
    assert [s for _, s in steps] == pytest.approx(expected)
    assert steps[-1][1] == 0.9
    # Cubic prunes most at the start: increments shrink.
    values = [0.0] + [s for _, s in steps]
    inc = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert inc == sorted(inc, reverse=True)


def test_linear_and_stride_that_skips_end_epoch():
    steps = gradual_schedule(0.8, "linear", start_epoch=0, end_epoch=5, frequency=2)
    assert [e for e, _ in steps] == [0, 2, 4, 5]
    assert [s for _, s in steps] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_single_step_when_end_epoch_is_none():
    assert gradual_schedule(0.5, "cubic", 3, None, 1) == [(3, 0.5)]


def test_explicit_list_is_one_step_per_entry():
    recipe = [0.5, 0.75, 0.875, 0.9375]
    steps = gradual_schedule(None, recipe, start_epoch=1, end_epoch=None, frequency=3)
    assert steps == [(1, 0.5), (4, 0.75), (7, 0.875), (10, 0.9375)]
    assert gradual_schedule(0.9375, recipe, 1, 10, 3) == steps


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=None), "sparsity=None"),
        (dict(start_epoch=3, end_epoch=2), "end_epoch=2"),
        (dict(frequency=0), "frequency"),
        (dict(start_epoch=-1), "start_epoch"),
        (dict(schedule="exp"), "schedule"),
        (dict(schedule=[]), "schedule"),
        (dict(schedule=[0.5, 0.4], sparsity=None), "non-decreasing"),
        (dict(schedule=[0.5, 1.0], sparsity=None), "schedule[1]"),
        (dict(schedule=[0.5, 0.7], sparsity=0.9), "sparsity=0.9"),
        (dict(schedule=[0.5, 0.7], sparsity=None, end_epoch=5), "end_epoch=5"),
    ],
)
def test_bad_schedules(kwargs, needle):
    args = dict(sparsity=0.5, schedule="cubic", start_epoch=0, end_epoch=4, frequency=1)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        OBSPruning(**args)
    assert needle in str(info.value)


def test_recomputation_targets_shrink_density_geometrically():
    targets = recomputation_targets(0.0, 0.96, 2)
    assert targets == pytest.approx([0.8, 0.96])
    targets = recomputation_targets(0.5, 0.9375, 3)
    assert targets == pytest.approx([0.75, 0.875, 0.9375])
    assert recomputation_targets(0.7, 0.5, 4) == [0.5]


def test_ngrads_schedule_uses_largest_key_not_above_target():
    schedule = check_ngrads({0: 16, 0.5: 64, 0.8: 256})
    assert [ngrads_for(schedule, s) for s in (0.0, 0.49, 0.5, 0.79, 0.95)] == [16, 16, 64, 64, 256]
    assert ngrads_for(32, 0.9) == 32
    with pytest.raises(ValueError, match="must contain the key 0"):
        check_ngrads({0.5: 64})
    with pytest.raises(ValueError, match="ngrads"):
        check_ngrads({0: 0})


def test_callback_validates_everything_at_construction():
    with pytest.raises(ValueError, match="pattern"):
        OBSPruning(0.5, obs=dict(pattern="4:2"))
    with pytest.raises(ValueError, match="sparsity=0.6"):
        OBSPruning(0.6, obs=dict(pattern="2:4"))
    with pytest.raises(ValueError, match="method"):
        OBSPruning(0.5, obs=dict(method="taylor"))
    with pytest.raises(ValueError, match="key 0"):
        OBSPruning(0.5, obs=dict(ngrads={0.3: 8}))
    with pytest.raises(ValueError, match="params"):
        OBSPruning(0.5, obs=dict(params=[]))
    assert OBSPruning(None, end_epoch=2, obs=dict(pattern="2:4")).steps[-1] == (2, 0.5)
