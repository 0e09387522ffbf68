import math

from ssl_modules.schedules import StepSchedule, cosine, linear_warmup, warmup_cosine


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10, 1.0, 0.1) == 0.0
    assert math.isclose(warmup_cosine(5, 100, 10, 1.0, 0.1), 0.5)
    assert math.isclose(warmup_cosine(10, 100, 10, 1.0, 0.1), 1.0)
    assert math.isclose(warmup_cosine(55, 100, 10, 1.0, 0.1), 0.55)
    assert math.isclose(warmup_cosine(100, 100, 10, 1.0, 0.1), 0.1)
    assert math.isclose(warmup_cosine(150, 100, 10, 1.0, 0.1), 0.1)


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 10, 0.996, 1.0) == 0.996
    assert math.isclose(cosine(5, 10, 0.996, 1.0), 0.998)
    assert cosine(10, 10, 0.996, 1.0) == 1.0


def test_linear_warmup_is_constant_afterwards():
    assert math.isclose(linear_warmup(15, 30, 0.04, 0.07), 0.055)
    assert linear_warmup(40, 30, 0.04, 0.07) == 0.07


def test_step_schedule_weight_decay_cosine():
    sched = StepSchedule(total_steps=20, warmup_steps=2, peak_lr=1.0, final_lr=0.0, weight_decay=0.04,
                         final_weight_decay=0.4)
    assert math.isclose(sched.wd(0), 0.04) and math.isclose(sched.wd(20), 0.4)
    assert StepSchedule(20, 2, 1.0, 0.0, 0.05).wd(13) == 0.05
