"""The schedule formulas, each against the official numpy expression it reproduces."""
import math

import numpy as np
import pytest

from ssl_modules.optimization.schedules import RunPlan, cosine, linspace_ramp, warmup_cosine


def dino_cosine_scheduler(base, final, total, warmup, start_warmup=0.0):
    """DINO / CrIBo / BAM ``utils.cosine_scheduler`` on a flat step axis (numpy, as the official code)."""
    warm = np.linspace(start_warmup, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
def test_linspace_warmup_then_cosine_is_the_official_scheduler(warmup):
    expected = dino_cosine_scheduler(2e-3, 1e-5, 40, warmup)
    ours = [warmup_cosine(i, 40, warmup, 2e-3, 1e-5, formula="linspace") for i in range(40)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
    if warmup > 1:
        assert ours[warmup - 1] == pytest.approx(2e-3)  # the peak at step W - 1, as np.linspace


def test_fraction_warmup_is_vicregl_learning_schedule():
    # official VICRegL: lr = peak * step / warmup_steps below the warm-up, then cosine to end_lr
    peak, end, total, warmup = 1.0, 1e-3, 100, 10
    for step in range(total):
        if step < warmup:
            expected = peak * step / warmup
        else:
            q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            expected = peak * q + end * (1 - q)
        assert warmup_cosine(step, total, warmup, peak, end, formula="fraction") == pytest.approx(expected, rel=1e-12)


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 10, 0.996, 1.0) == 0.996
    assert math.isclose(cosine(5, 10, 0.996, 1.0), 0.998)
    assert cosine(10, 10, 0.996, 1.0) == 1.0


@pytest.mark.parametrize("length", [0, 1, 2, 5])
def test_linspace_ramp_is_numpy_linspace_then_constant(length):
    expected = np.concatenate((np.linspace(0.04, 0.07, length), np.full(8 - length, 0.07)))
    np.testing.assert_allclose([linspace_ramp(e, 0.04, 0.07, length) for e in range(8)], expected, rtol=1e-12)


def test_run_plan_converts_epochs_with_the_real_epoch_length():
    plan = RunPlan(total_steps=10, steps_per_epoch=4)
    assert plan.epochs == 3 and plan.epoch(7) == 1 and plan.epoch(8) == 2 and plan.steps(1.5) == 6
    with pytest.raises(ValueError, match="RunPlan"):
        RunPlan(total_steps=0, steps_per_epoch=4)
