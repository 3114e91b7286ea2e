"""LR and batch-size schedules against hand-computed numbers and a literal Megatron-style walk."""
import math
import warnings

import pytest

from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import TrainingConfig
from megatron_bloom.training.schedules import (
    BatchSizeRampup,
    ConstantBatchSize,
    LearningRateSchedule,
    batch_size_changes,
    build_batch_schedule,
    total_train_iters,
    train_iters_for_samples,
)

MAX, MIN, W, D = 1e-3, 1e-4, 100, 1100


def approx(x):
    # Closed-form values computed by hand; only float rounding separates them.
    return pytest.approx(x, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_zero(style):
    s = LearningRateSchedule(MAX, MIN, W, D, style)
    assert s.lr(0) == 0.0
    assert s.lr(25) == approx(2.5e-4)
    assert s.lr(50) == approx(5e-4)
    assert s.lr(100) == approx(1e-3)


def test_linear_decay_points():
    s = LearningRateSchedule(MAX, MIN, W, D, "linear")
    assert s.lr(101) == approx(1e-4 + 9e-4 * (1 - 1 / 1000))
    assert s.lr(350) == approx(7.75e-4)  # r = 250/1000 = 0.25 -> 1e-4 + 9e-4 * 0.75
    assert s.lr(600) == approx(5.5e-4)  # r = 0.5
    assert s.lr(1100) == approx(1e-4)  # r = 1
    assert s.lr(1101) == 1e-4 and s.lr(10**9) == 1e-4


def test_cosine_decay_points():
    s = LearningRateSchedule(MAX, MIN, W, D, "cosine")
    assert s.lr(350) == approx(8.681980515339464e-4)  # 1e-4 + 9e-4 * (cos(pi/4) + 1) / 2
    assert s.lr(600) == approx(5.5e-4)  # cos(pi/2) = 0
    assert s.lr(850) == approx(2.318019484660536e-4)  # 1e-4 + 9e-4 * (cos(3pi/4) + 1) / 2
    assert s.lr(1100) == approx(1e-4)
    assert s.lr(5000) == 1e-4


def test_constant_and_no_warmup():
    assert LearningRateSchedule(MAX, MIN, W, D, "constant").lr(10**9) == MAX
    s = LearningRateSchedule(MAX, 0.0, 0, 1000, "linear")
    assert s.lr(0) == MAX  # no warmup: decay starts at max_lr
    assert s.lr(500) == approx(5e-4)
    assert s.lr(1000) == 0.0


def test_bad_schedules_are_rejected():
    with pytest.raises(UserError, match="decay_style"):
        LearningRateSchedule(MAX, MIN, W, D, "exponential")
    with pytest.raises(UserError, match="min_lr"):
        LearningRateSchedule(1e-4, 1e-3, W, D, "cosine")
    with pytest.raises(UserError, match="exceed the warmup"):
        LearningRateSchedule(MAX, MIN, 1000, 1000, "cosine")


def test_iters_and_samples_configs_are_the_same_schedule():
    by_iters = TrainingConfig(train_iters=100, global_batch_size=8, lr=MAX, min_lr=MIN, lr_warmup_iters=10,
                              lr_decay_iters=80, lr_decay_style="cosine")
    by_samples = TrainingConfig(train_samples=800, global_batch_size=8, lr=MAX, min_lr=MIN, lr_warmup_samples=80,
                                lr_decay_samples=640, lr_decay_style="cosine")
    a, b = LearningRateSchedule.from_config(by_iters), LearningRateSchedule.from_config(by_samples)
    assert a.state_dict() == b.state_dict() == {
        "max_lr": MAX, "min_lr": MIN, "warmup_samples": 80, "decay_samples": 640, "decay_style": "cosine"}
    assert [a.lr(8 * i) for i in range(101)] == [b.lr(8 * i) for i in range(101)]


def test_from_config_defaults_and_precedence():
    # decay defaults to the run length; lr_warmup_samples wins over lr_warmup_iters.
    s = LearningRateSchedule.from_config(TrainingConfig(train_iters=50, global_batch_size=4, lr_warmup_iters=5,
                                                        lr_warmup_samples=7))
    assert (s.warmup_samples, s.decay_samples) == (7, 200)
    s = LearningRateSchedule.from_config(TrainingConfig(train_iters=50, global_batch_size=4, lr_warmup_iters=5))
    assert (s.warmup_samples, s.decay_samples) == (20, 200)
    s = LearningRateSchedule.from_config(TrainingConfig(train_samples=1000, lr_warmup_samples=10))
    assert (s.warmup_samples, s.decay_samples) == (10, 1000)
    with pytest.raises(UserError, match="lr_warmup_samples/lr_decay_samples"):
        LearningRateSchedule.from_config(TrainingConfig(train_samples=1000, lr_warmup_iters=3))
    with pytest.raises(UserError, match="lr_decay_iters"):
        LearningRateSchedule.from_config(TrainingConfig(train_iters=10, global_batch_size=4, lr_decay_samples=30))


def test_state_dict_round_trip_and_mismatch_policy():
    cfg_sched = LearningRateSchedule(MAX, MIN, W, D, "cosine")
    saved = cfg_sched.state_dict()
    same = LearningRateSchedule(MAX, MIN, W, D, "cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an identical schedule loads silently
        assert same.load_state_dict(saved) == {}
    assert [same.lr(n) for n in range(0, 1200, 7)] == [cfg_sched.lr(n) for n in range(0, 1200, 7)]

    changed = LearningRateSchedule(2e-3, MIN, W, 2100, "linear")
    with pytest.warns(UserWarning, match=r"max_lr: checkpoint 0.001 -> config 0.002.*decay_samples.*using the config"):
        diff = changed.load_state_dict(saved)
    assert diff == {"max_lr": (MAX, 2e-3), "decay_samples": (D, 2100), "decay_style": ("cosine", "linear")}
    assert changed.state_dict() == {"max_lr": 2e-3, "min_lr": MIN, "warmup_samples": W, "decay_samples": 2100,
                                    "decay_style": "linear"}

    with pytest.warns(UserWarning, match="using the checkpoint values"):
        changed.load_state_dict(saved, use_checkpoint=True)
    assert changed.state_dict() == saved


# -------------------------------------------------------------------------------------------------
# Batch size


def megatron_style_batch(start, increment, ramp, global_bs):
    """Megatron's formula in floating point, as its RampupBatchsizeNumMicroBatches computes it."""
    per_increment = ramp / ((global_bs - start) / increment)

    def gbs(consumed):
        if consumed > ramp:
            return global_bs
        return start + int(consumed / per_increment) * increment

    return gbs


def walk(gbs, steps):
    """[(consumed before the step, batch)] for ``steps`` steps."""
    out, consumed = [], 0
    for _ in range(steps):
        b = gbs(consumed)
        out.append((consumed, b))
        consumed += b
    return out


def test_rampup_sequence_small():
    r = BatchSizeRampup(16, 16, 1000, 64, micro_batch_size=2, data_parallel_size=2)
    assert r.num_increments == 3  # (64 - 16) / 16, one every 333.3 samples
    batches = [b for _, b in walk(r.global_batch_size, 45)]
    # By hand: 16 until consumed >= 334 (21 steps: 0..320), 32 until >= 667 (11 steps: 336..656),
    # 48 until >= 1000 (7 steps: 688..976), then 64 from consumed 1024 on.
    assert batches == [16] * 21 + [32] * 11 + [48] * 7 + [64] * 6
    assert walk(r.global_batch_size, 45) == walk(megatron_style_batch(16, 16, 1000, 64), 45)
    assert [r.num_micro_batches(c) for c in (0, 336, 688, 1024, 10**6)] == [4, 8, 12, 16, 16]
    assert batch_size_changes(r, 10**6) == [(0, 0, 16), (21, 336, 32), (32, 688, 48), (39, 1024, 64)]


def brute_force_iters(gbs, train_samples):
    """Largest N whose first N batches fit in train_samples."""
    n, consumed = 0, 0
    while consumed + gbs(consumed) <= train_samples:
        consumed += gbs(consumed)
        n += 1
    return n


def megatron_update_train_iters(gbs, ramp, global_bs, train_samples):
    """Megatron's update_train_iters: walk the ramp, then whole global batches."""
    iterations, consumed = 0, 0
    while consumed <= ramp:
        consumed += gbs(consumed)
        iterations += 1
    return iterations + (train_samples - consumed) // global_bs


def test_train_iters_for_samples_small():
    r = BatchSizeRampup(16, 16, 1000, 64, 2, 2)
    assert train_iters_for_samples(r, 2000) == r.iterations_for_samples(2000) == 39 + (2000 - 1024) // 64 == 54
    for t in (0, 15, 16, 500, 1023, 1024, 1087, 1088, 2000, 12345):
        assert train_iters_for_samples(r, t) == brute_force_iters(r.global_batch_size, t), t
    for t in (1024, 2000, 12345):  # once the ramp fits, exactly Megatron's accounting
        assert train_iters_for_samples(r, t) == megatron_update_train_iters(r.global_batch_size, 1000, 64, t)
    assert train_iters_for_samples(ConstantBatchSize(64, 2, 2), 2000) == 31


def test_bloom_176b_ramp():
    # BLOOM-176B (tr11-176B-ml): --rampup-batch-size 192 16 9_765_625 --global-batch-size 2048
    # --train-samples 220_000_000, micro batch 2, DP 8.
    ramp = 9_765_625
    r = BatchSizeRampup(192, 16, ramp, 2048, micro_batch_size=2, data_parallel_size=8)
    assert r.num_increments == 116
    megatron = megatron_style_batch(192, 16, ramp, 2048)
    steps = walk(r.global_batch_size, 12_700)
    assert steps == walk(megatron, 12_700)  # every ramp step agrees with Megatron's float formula
    first_full = next(i for i, (_, b) in enumerate(steps) if b == 2048)
    # Expected: the first step that starts at or past the end of the ramp.
    assert first_full == next(i for i, (c, _) in enumerate(steps) if c >= ramp)
    assert steps[first_full - 1][1] == 2032 and steps[first_full - 1][0] < ramp <= steps[first_full][0]
    assert (first_full, steps[first_full][0]) == (12_658, 9_765_808)
    # Each increment lasts ramp/116 = 84,186.4 samples, so it starts within one batch of k * that.
    for it, consumed, batch in batch_size_changes(r, 10**9):
        k = (batch - 192) // 16
        assert math.ceil(k * ramp / 116) <= consumed < math.ceil(k * ramp / 116) + batch
        assert steps[it] == (consumed, batch)
    assert r.num_micro_batches(0) == 12 and r.num_micro_batches(10**8) == 128
    total = train_iters_for_samples(r, 220_000_000)
    assert total == megatron_update_train_iters(megatron, ramp, 2048, 220_000_000) == 115_311


def test_build_batch_schedule_and_total_iters():
    t = TrainingConfig(micro_batch_size=2, global_batch_size=64, rampup_batch_size=[16, 16, 1000], train_samples=2000)
    sched = build_batch_schedule(t, data_parallel_size=2)
    assert isinstance(sched, BatchSizeRampup) and sched.global_batch_size(0) == 16
    assert total_train_iters(t, 2) == 54
    t = TrainingConfig(micro_batch_size=2, global_batch_size=64, train_samples=2000)
    assert isinstance(build_batch_schedule(t, 2), ConstantBatchSize)
    assert total_train_iters(t, 2) == 31
    assert total_train_iters(TrainingConfig(global_batch_size=8, train_iters=77), 1) == 77


def test_bad_rampups_are_rejected():
    with pytest.raises(UserError, match="micro_batch_size x data_parallel_size"):
        BatchSizeRampup(12, 16, 1000, 64, 2, 4)  # 12 is not a multiple of 8
    with pytest.raises(UserError, match="not a multiple of increment"):
        BatchSizeRampup(16, 32, 1000, 64, 2, 2)
    with pytest.raises(UserError, match="larger than global_batch_size"):
        BatchSizeRampup(128, 16, 1000, 64, 2, 2)
    degenerate = BatchSizeRampup(64, 16, 1000, 64, 2, 2)  # start == global: no ramp at all
    assert degenerate.global_batch_size(0) == 64 and train_iters_for_samples(degenerate, 640) == 10
