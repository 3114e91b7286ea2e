"""Learning-rate and batch-size schedules, both counted in consumed SAMPLES (Megatron semantics).

Everything here is a pure function of ``consumed_samples`` (the number of training samples seen
before the step being taken), so a resumed run that restores consumed_samples gets exactly the
LR and batch size the uninterrupted run had, whatever its parallel layout.

How Megatron uses them in the training loop (and how the trainer should)::

    gbs = batch.global_batch_size(consumed)         # before the step
    lr  = lr_schedule.lr(consumed)                   # LR the step's optimizer update uses
    ... step ...
    consumed += gbs

Megatron's AnnealingLR sets the LR once at construction (``step(0)``) and then after every
optimizer step, so the step taken after ``consumed`` samples uses ``lr(consumed)``: with warmup the
very first update runs at LR 0. The value its ``training_log`` prints is read after the scheduler
moved, i.e. ``lr(consumed + gbs)``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Tuple

from megatron_bloom.config.validate import LR_DECAY_STYLES
from megatron_bloom.errors import UserError


class LearningRateSchedule:
    """Linear warmup to ``max_lr``, then constant / linear / cosine decay to ``min_lr``.

    Megatron's AnnealingLR with its step counter counting samples (``--lr-warmup-samples``,
    ``--lr-decay-samples``). With n consumed samples, W = warmup_samples, D = decay_samples:

        n <= W (W > 0):  max_lr * n / W
        constant:        max_lr
        n > D:           min_lr
        otherwise:       r = (n - W) / (D - W)         # decay counted from sample 0, not from W
                         linear: min_lr + (max_lr - min_lr) * (1 - r)
                         cosine: min_lr + (max_lr - min_lr) * (cos(pi r) + 1) / 2

    Worked example (max 1e-3, min 1e-4, W=100, D=1100, cosine): lr(50) = 5e-4, lr(100) = 1e-3,
    lr(600) = 5.5e-4 (r = 0.5), lr(1100) = 1e-4, lr(5000) = 1e-4.
    """

    def __init__(self, max_lr: float, min_lr: float, warmup_samples: int, decay_samples: int, decay_style: str):
        if decay_style not in LR_DECAY_STYLES:
            raise UserError(f"lr_decay_style='{decay_style}' is not one of {', '.join(LR_DECAY_STYLES)}")
        if min_lr < 0 or max_lr < min_lr:
            raise UserError(f"need 0 <= min_lr <= lr, got min_lr={min_lr}, lr={max_lr}")
        if warmup_samples < 0:
            raise UserError(f"lr warmup of {warmup_samples} samples must be >= 0")
        if decay_style != "constant" and decay_samples <= warmup_samples:
            raise UserError(
                f"lr decay ends at {decay_samples} samples, not after the warmup's {warmup_samples}: decay is "
                "counted from sample 0 (Megatron), so lr_decay_samples/iters must exceed the warmup"
            )
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.warmup_samples = int(warmup_samples)
        self.decay_samples = int(decay_samples)
        self.decay_style = decay_style

    @classmethod
    def from_config(cls, training_cfg) -> "LearningRateSchedule":
        """Build from a ``TrainingConfig`` (after ``validate_config`` filled global_batch_size).

        train_iters runs convert iterations to samples with the final global batch size:
        warmup = lr_warmup_samples if > 0 else lr_warmup_iters * global_batch_size,
        decay = (lr_decay_iters or train_iters) * global_batch_size.
        train_samples runs: warmup = lr_warmup_samples, decay = lr_decay_samples or train_samples.
        """
        t = training_cfg
        gbs = t.global_batch_size
        if t.train_iters is not None:
            if gbs is None:
                raise UserError("global_batch_size is unset; run validate_config before building the LR schedule")
            if t.lr_decay_samples is not None:
                raise UserError(
                    "lr_decay_samples needs train_samples; with train_iters give lr_decay_iters instead"
                )
            warmup = t.lr_warmup_samples if t.lr_warmup_samples > 0 else t.lr_warmup_iters * gbs
            decay = (t.lr_decay_iters or t.train_iters) * gbs
        elif t.train_samples is not None:
            if t.lr_warmup_iters > 0 or t.lr_decay_iters is not None:
                raise UserError(
                    "lr_warmup_iters/lr_decay_iters need train_iters; with train_samples give "
                    "lr_warmup_samples/lr_decay_samples instead"
                )
            warmup = t.lr_warmup_samples
            decay = t.lr_decay_samples or t.train_samples
        else:
            raise UserError("give train_iters or train_samples to build the LR schedule")
        return cls(t.lr, t.min_lr, warmup, decay, t.lr_decay_style)

    def lr(self, consumed_samples: int) -> float:
        n = consumed_samples
        if self.warmup_samples > 0 and n <= self.warmup_samples:
            return self.max_lr * float(n) / float(self.warmup_samples)
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_samples:
            return self.min_lr
        ratio = float(n - self.warmup_samples) / float(self.decay_samples - self.warmup_samples)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    __call__ = lr

    # -- checkpointing ---------------------------------------------------------------------------

    _FIELDS = ("max_lr", "min_lr", "warmup_samples", "decay_samples", "decay_style")

    def state_dict(self) -> Dict[str, Any]:
        """The hyper-parameters (the schedule has no other state: the LR follows consumed samples)."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def load_state_dict(self, state: Dict[str, Any], use_checkpoint: bool = False) -> Dict[str, Tuple[Any, Any]]:
        """Reconcile with a checkpoint's schedule; returns ``{name: (checkpoint value, config value)}``.

        By default the configuration wins (Megatron's ``--override-lr-scheduler``), so a resumed
        run can change its schedule; ``use_checkpoint=True`` takes the checkpoint's values instead
        (``--use-checkpoint-lr-scheduler``). Either way every difference is listed in one warning.
        """
        changed = {
            name: (state[name], getattr(self, name))
            for name in self._FIELDS
            if name in state and state[name] != getattr(self, name)
        }
        if not changed:
            return changed
        winner = "checkpoint" if use_checkpoint else "config"
        listing = ", ".join(f"{name}: checkpoint {ckpt!r} -> config {cfg!r}" for name, (ckpt, cfg) in changed.items())
        warnings.warn(f"learning-rate schedule differs from the checkpoint's ({listing}); using the {winner} values")
        if use_checkpoint:
            for name, (ckpt, _) in changed.items():
                setattr(self, name, ckpt)
        return changed

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"LearningRateSchedule({args})"


# -------------------------------------------------------------------------------------------------
# Batch size


class ConstantBatchSize:
    """The same global batch size for the whole run (no ramp-up)."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int):
        self.global_batch = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_size = int(data_parallel_size)
        self._check(self.global_batch, "global_batch_size")

    def _check(self, value: int, name: str) -> None:
        step = self.micro_batch_size * self.data_parallel_size
        if value < 1 or value % step != 0:
            raise UserError(
                f"{name}={value} is not a positive multiple of micro_batch_size x data_parallel_size "
                f"= {self.micro_batch_size} x {self.data_parallel_size} = {step}"
            )

    @property
    def ramp_end_samples(self) -> int:
        """Consumed samples from which the batch size is final (0: from the start)."""
        return 0

    def global_batch_size(self, consumed_samples: int) -> int:
        return self.global_batch

    def num_micro_batches(self, consumed_samples: int) -> int:
        """Micro-batches per step on each data-parallel rank (the gradient accumulation steps)."""
        return self.global_batch_size(consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def iterations_for_samples(self, train_samples: int) -> int:
        """Optimizer steps a run of ``train_samples`` takes (see ``train_iters_for_samples``)."""
        return train_iters_for_samples(self, train_samples)


class BatchSizeRampup(ConstantBatchSize):
    """Megatron's ``--rampup-batch-size START INCREMENT RAMP_SAMPLES``.

    The batch grows from ``start`` to ``global_batch_size`` in (global - start) / increment equal
    steps of ``increment``, spread evenly over ``ramp_samples`` consumed samples:

        global_batch_size(n) = min(global, start + floor(n * increments / ramp_samples) * increment)

    which is Megatron's ``start + int(n / (ramp_samples / increments)) * increment`` in exact
    integer arithmetic (Megatron divides in floating point; the two can differ only when n lands
    exactly on an increment boundary, and then this version is the intended one).

    BLOOM-176B: start 192, increment 16, ramp 9,765,625 samples, global 2048 -> 116 increments,
    one every 84,186.4 samples; the batch is 2048 from consumed sample 9,765,625 on.
    """

    def __init__(
        self,
        start: int,
        increment: int,
        ramp_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
    ):
        super().__init__(global_batch_size, micro_batch_size, data_parallel_size)
        self.start, self.increment, self.ramp_samples = int(start), int(increment), int(ramp_samples)
        self._check(self.start, "rampup_batch_size start")
        self._check(self.increment, "rampup_batch_size increment")
        if self.start > self.global_batch:
            raise UserError(f"rampup_batch_size start={start} is larger than global_batch_size={global_batch_size}")
        if (self.global_batch - self.start) % self.increment != 0:
            raise UserError(
                f"rampup_batch_size: global_batch_size {global_batch_size} - start {start} is not a multiple "
                f"of increment {increment}"
            )
        if self.ramp_samples < 0:
            raise UserError(f"rampup_batch_size ramp samples={ramp_samples} must be >= 0")
        self.num_increments = (self.global_batch - self.start) // self.increment

    @property
    def ramp_end_samples(self) -> int:
        return self.ramp_samples if self.num_increments > 0 else 0

    def _stage(self, consumed_samples: int) -> int:
        if self.num_increments == 0 or consumed_samples >= self.ramp_samples:
            return self.num_increments
        return consumed_samples * self.num_increments // self.ramp_samples

    def global_batch_size(self, consumed_samples: int) -> int:
        return self.start + self._stage(consumed_samples) * self.increment

    def _next_stage_start(self, consumed_samples: int) -> int:
        """The first consumed-sample count at which the batch is larger than at ``consumed_samples``."""
        k = self._stage(consumed_samples) + 1
        return -(-k * self.ramp_samples // self.num_increments)  # ceil(k * R / increments)


def build_batch_schedule(training_cfg, data_parallel_size: int) -> ConstantBatchSize:
    """``BatchSizeRampup`` when ``rampup_batch_size`` is set, else ``ConstantBatchSize``."""
    t = training_cfg
    if t.global_batch_size is None:
        raise UserError("global_batch_size is unset; run validate_config before building the batch schedule")
    if t.rampup_batch_size is None:
        return ConstantBatchSize(t.global_batch_size, t.micro_batch_size, data_parallel_size)
    if len(t.rampup_batch_size) != 3:
        raise UserError(f"rampup_batch_size needs 3 numbers START INCREMENT SAMPLES, got {t.rampup_batch_size}")
    start, increment, ramp = (int(v) for v in t.rampup_batch_size)
    return BatchSizeRampup(start, increment, ramp, t.global_batch_size, t.micro_batch_size, data_parallel_size)


def train_iters_for_samples(schedule: ConstantBatchSize, train_samples: int) -> int:
    """Optimizer steps a ``train_samples`` run takes: the largest N whose N batches fit in train_samples.

    With ramp-up this is Megatron's ``update_train_iters``: it walks the ramp one batch at a time
    while consumed <= ramp samples, then adds (train_samples - consumed) // global_batch_size whole
    batches (a partial last batch is dropped). Here the walk jumps a whole ramp stage at a time,
    so BLOOM-176B's 12,658 ramp steps (or a far longer ramp) cost one loop turn per increment.
    """
    iterations, consumed = 0, 0
    while True:
        batch = schedule.global_batch_size(consumed)
        fit = max(0, (train_samples - consumed) // batch)  # whole batches left at this size
        if batch >= schedule.global_batch:
            return iterations + fit
        # Steps at this batch size: those that start before the next stage begins.
        in_stage = -(-(schedule._next_stage_start(consumed) - consumed) // batch)
        if fit < in_stage:
            return iterations + fit
        iterations += in_stage
        consumed += in_stage * batch


def total_train_iters(training_cfg, data_parallel_size: int) -> int:
    """The run's length in iterations: ``train_iters``, or what ``train_samples`` works out to."""
    t = training_cfg
    if t.train_iters is not None:
        return int(t.train_iters)
    if t.train_samples is None:
        raise UserError("give train_iters or train_samples")
    return train_iters_for_samples(build_batch_schedule(t, data_parallel_size), int(t.train_samples))


def batch_size_changes(schedule: ConstantBatchSize, until_samples: int) -> List[Tuple[int, int, int]]:
    """``(iteration, consumed_samples, global_batch_size)`` at the start and at every change.

    Iterations count from 0 (the first step); useful for printing a ramp plan.
    """
    changes: List[Tuple[int, int, int]] = []
    iteration, consumed = 0, 0
    while consumed <= until_samples:
        batch = schedule.global_batch_size(consumed)
        changes.append((iteration, consumed, batch))
        if batch >= schedule.global_batch:
            break
        steps = -(-(schedule._next_stage_start(consumed) - consumed) // batch)
        iteration += steps
        consumed += steps * batch
    return changes

