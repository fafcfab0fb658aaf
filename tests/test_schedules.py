"""The training schedules: LR warmup-stable-decay, batch-size ramp, bias-update speed, MTP weight."""

import math

import pytest

from dsv3.train.schedules import LRSchedule, batch_size_at, bias_update_speed, lr_schedule, mtp_weight


def test_lr_warmup_plateau_decay_and_floor():
    s = LRSchedule(peak_lr=1e-3, warmup_steps=10, total_steps=100)  # decay from step 80
    assert s.lr(0) == pytest.approx(1e-4)  # small but non-zero on the first update
    assert s.lr(9) == pytest.approx(1e-3)  # warm-up reaches peak on its last step
    assert all(s.lr(t) == pytest.approx(1e-3) for t in range(10, 81))
    # cosine from step 80 to the last step trained, 99, which runs at the floor
    assert s.lr(90) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 10 / 19)))
    decay = [s.lr(t) for t in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert s.lr(99) == pytest.approx(1e-4) and s.lr(10_000) == pytest.approx(1e-4)
    short = LRSchedule(peak_lr=1.0, warmup_steps=1, total_steps=10)
    assert short.lr(9) == pytest.approx(0.1)  # the last step of a short run too (it used to train at 0.55)


def test_lr_report_shape():
    """--lr-shape report: the report's five phases, one step standing in for 100M of its 14.8T tokens."""
    s = lr_schedule("report", 2.2e-4, 148_000, 2000, decay_start_frac=0.8, final_lr_frac=0.5)  # last two ignored
    assert s.lr(1999) == 2.2e-4 and s.lr(99_999) == 2.2e-4  # warm-up over 2K steps, constant to 10T
    assert s.lr(121_500) == pytest.approx(0.5 * (2.2e-4 + 2.2e-5))  # cosine midpoint of 10T -> 14.3T
    assert all(s.lr(t) == pytest.approx(2.2e-5) for t in (143_000, 145_000, 146_329))  # 14.3T -> 14.633T
    assert all(s.lr(t) == pytest.approx(7.3e-6) for t in (146_330, 147_999, 148_000))  # the last 167B tokens
    assert lr_schedule("wsd", 1e-3, 100, None, 0.8, 0.1) == LRSchedule(1e-3, 5, 100)  # 5 % warm-up
    with pytest.raises(ValueError, match="unknown LR shape"):
        lr_schedule("linear", 1e-3, 100, None, 0.8, 0.1)


def test_lr_decay_start_frac():
    # 2.2e-4 peak, 2.2e-5 final, decay starting at 10T of 14.3T tokens (steps standing in for tokens).
    s = LRSchedule(2.2e-4, warmup_steps=2000, total_steps=143_000, decay_start_frac=10 / 14.3)
    assert s.decay_start == 100_000
    assert s.lr(99_999) == 2.2e-4
    assert s.lr(143_000) == pytest.approx(2.2e-5)


def test_for_run_scales_warmup():
    assert LRSchedule.for_run(1e-3, 200).warmup_steps == 10
    assert LRSchedule.for_run(1e-3, 1_000_000).warmup_steps == 2000
    assert LRSchedule.for_run(1e-3, 3).warmup_steps == 1
    one = LRSchedule.for_run(1e-3, 1)
    assert one.lr(0) == pytest.approx(1e-3) and math.isfinite(one.lr(1))
    assert LRSchedule.for_run(1e-3, 100, decay_start_frac=0.5).decay_start == 50


def test_lr_rejects_bad_fields():
    with pytest.raises(ValueError):
        LRSchedule(1e-3, warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError):
        LRSchedule(1e-3, 1, 10, final_lr_frac=2.0)
    with pytest.raises(ValueError):
        LRSchedule(1e-3, 1, 10, decay_start_frac=0.8, decay_end_frac=0.5)


def test_batch_ramp():
    sizes = [batch_size_at(t, 3072, 15360, 100) for t in range(120)]
    assert sizes[0] == 3072 and sizes[100] == 15360 and sizes[-1] == 15360
    assert sizes[50] == (3072 + 15360) // 2
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(isinstance(b, int) for b in sizes)
    assert batch_size_at(0, 3072, 15360, 0) == 15360
    assert all(batch_size_at(t, 8, 64, 30, multiple_of=8) % 8 == 0 for t in range(40))
    with pytest.raises(ValueError):
        batch_size_at(0, 12, 64, 30, multiple_of=8)


def test_bias_speed_and_mtp_weight_switch_points():
    total = 14.8e12
    assert bias_update_speed(14.29e12, total) == 0.001
    assert bias_update_speed(14.3e12, total) == 0.0
    assert mtp_weight(9.99e12, total) == 0.3
    assert mtp_weight(10e12, total) == 0.1
    assert mtp_weight(500, 1000, switch_frac=0.5) == 0.1


def test_batch_plan_counts_tokens_through_the_ramp():
    """The bias freeze and the MTP switch are token-indexed (report): under a batch ramp a step's share
    of the tokens lags its share of the steps; without one the two are equal exactly."""
    from dsv3.train.schedules import BatchPlan, batch_size_at

    flat = BatchPlan(steps=10, end=8)
    assert [flat.fraction(s) for s in range(11)] == [s / 10 for s in range(11)]
    plan = BatchPlan(steps=10, end=16, start=4, ramp_steps=4, multiple_of=2)
    sizes = [plan.batch_size(s) for s in range(10)]
    assert sizes == [batch_size_at(s, 4, 16, 4, multiple_of=2) for s in range(10)]
    assert plan.total == sum(sizes) and plan.fraction(10) == 1.0
    assert all(plan.fraction(s) == sum(sizes[:s]) / sum(sizes) for s in range(11))
    assert plan.fraction(5) < 0.5  # the ramp's small batches carry fewer tokens


def test_lr_phases_are_token_indexed_under_a_batch_ramp():
    """The report places its LR phases by tokens: under a batch ramp each boundary is the last step that
    starts within that share of the run's tokens (BatchPlan.fraction), not that share of the steps.
    Without a ramp the schedule is the step-indexed one exactly."""
    from dsv3.train.schedules import BatchPlan

    plan = BatchPlan(steps=1000, end=64, start=8, ramp_steps=400)
    s = lr_schedule("report", 1e-3, 1000, 20, 0.8, 0.1, plan)
    for frac, step in ((10 / 14.8, s.decay_start), (14.3 / 14.8, s.decay_end)):
        assert plan.fraction(step) <= frac + 1e-12 < plan.fraction(step + 1)
    assert s.decay_start > int(10 / 14.8 * 1000)  # the ramp's small batches: the tokens' share lags
    tail = max(t for t in range(1001) if plan.fraction(t) <= 14.633 / 14.8 + 1e-12)
    assert s.lr(tail - 1) == pytest.approx(1e-4) and s.lr(tail) == pytest.approx(7.3e-6 / 2.2e-4 * 1e-3)
    flat = lr_schedule("report", 1e-3, 1000, 20, 0.8, 0.1, BatchPlan(steps=1000, end=64))
    assert flat.token_fraction is None and flat == lr_schedule("report", 1e-3, 1000, 20, 0.8, 0.1)
    big = lr_schedule("report", 2.2e-4, 148_000, 2000, 0.8, 0.1, BatchPlan(148_000, end=64, start=64, ramp_steps=9))
    assert [big.lr(t) for t in (146_329, 146_330)] == [lr_schedule("report", 2.2e-4, 148_000, 2000, 0.8, 0.1).lr(t)
                                                       for t in (146_329, 146_330)]  # a "ramp" that never ramps
