"""Batch sampler for pretraining: which sample indices each data-parallel rank reads, resumably.

Megatron's order: the samples from `consumed_samples` on are cut into global micro-batches of
micro_batch_size * data_parallel_size consecutive indices, and rank r takes the r-th slice of
micro_batch_size. With consumed_samples = 0, micro_batch_size = 2 and data_parallel_size = 3:

    global index   0 1 | 2 3 | 4 5 || 6 7 | 8 9 | 10 11 || ...
    rank           0 0   1 1   2 2     0 0   1 1    2  2

i.e. sample k goes to rank (k // micro_batch_size) % data_parallel_size. Nothing is random here:
the shuffling lives in the dataset's shuffle_idx, so resuming only needs the consumed count.
The trainer deals each step's samples through it (``training/data.micro_batches_for_step``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List


STATE_KEYS = ("consumed_samples", "total_samples", "micro_batch_size", "data_parallel_size")
"""What ``state_dict`` records; only ``consumed_samples`` is read back."""


@dataclass
class PretrainingSampler:
    """Yields this rank's micro-batches (lists of dataset indices), starting at consumed_samples.

    Use as `DataLoader(dataset, batch_sampler=sampler)`. A trailing global micro-batch that is not
    full is dropped (every rank must run the same number of steps) unless drop_last=False.

    `state_dict()["consumed_samples"]` counts samples whose indices were handed out, over all
    ranks. A DataLoader prefetches, so that runs ahead of training: a checkpoint should store the
    trainer's own consumed count (samples the optimizer actually stepped on) and resume with
    `load_state_dict({"consumed_samples": that})` or by passing it to the constructor.
    """

    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    data_parallel_rank: int
    data_parallel_size: int
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.total_samples <= 0:
            raise ValueError(f"total_samples={self.total_samples} must be > 0")
        if self.micro_batch_size <= 0 or self.data_parallel_size <= 0:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} and data_parallel_size="
                             f"{self.data_parallel_size} must be > 0")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank={self.data_parallel_rank} is not in [0, {self.data_parallel_size})")
        self.load_state_dict({"consumed_samples": self.consumed_samples})

    @property
    def global_micro_batch(self) -> int:
        """Samples consumed by one micro-batch step of all data-parallel ranks."""
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank still yields."""
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.global_micro_batch
        return full if self.drop_last or remaining % self.global_micro_batch == 0 else full + 1

    def __iter__(self) -> Iterator[List[int]]:
        step = self.global_micro_batch
        own = self.data_parallel_rank * self.micro_batch_size
        # Arithmetic per micro-batch rather than a loop over every sample index.
        while self.consumed_samples < self.total_samples:
            start = self.consumed_samples
            end = min(start + step, self.total_samples)
            if end - start < step and self.drop_last:
                return
            self.consumed_samples = end
            # A short last global batch gives low ranks full slices and high ranks short or empty ones.
            yield list(range(min(start + own, end), min(start + own + self.micro_batch_size, end)))

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["consumed_samples"]; other keys are informational.

        Micro-batch size and data-parallel size may differ from the saved run's: the order of
        global sample indices does not depend on them, only how they are dealt to ranks.
        """
        consumed = int(state["consumed_samples"])
        if not 0 <= consumed <= self.total_samples:
            raise ValueError(
                f"consumed_samples={consumed} is outside [0, total_samples={self.total_samples}]; the checkpoint "
                f"belongs to a longer run or another dataset"
            )
        self.consumed_samples = consumed
