"""What one log interval adds up to: Megatron's training_log accounting, without any I/O.

Per interval (the iterations since the last console line):

- lm loss: the mean over the interval's ADVANCED iterations (skipped ones do not count, as in
  Megatron); a NaN loss in an advanced iteration (bf16 does not skip) makes the mean NaN, so it
  shows on the console instead of being hidden.
- number of skipped / nan iterations: skipped = optimizer step skipped (fp16 overflow, or a NaN/Inf
  gradient under --nan-policy skip); nan = the loss (or, when the caller says so, a gradient) was
  inf or NaN, skipped or not.
- time per iteration: the interval's time divided by its iterations (advanced + skipped).
- samples / tokens per second and TFLOPs: the interval's samples / tokens / model FLOPs over its
  time, which is Megatron's ``batch / time-per-iteration`` when the batch size is constant and
  stays right while a ramp-up changes it mid-interval.
"""
from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass
class IntervalSummary:
    """One console line's numbers (and the interval-level TensorBoard scalars)."""

    iterations: int
    advanced_iterations: int
    skipped_iterations: int
    nan_iterations: int
    mean_loss: Optional[float]
    """None when every iteration of the interval was skipped (Megatron prints no loss then)."""
    seconds: float
    samples: int
    tokens: int
    flops: float

    @property
    def seconds_per_iteration(self) -> float:
        return self.seconds / max(1, self.iterations)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def tflops_per_gpu(self, world_size: int) -> float:
        return self.flops / (self.seconds * world_size * 1e12) if self.seconds > 0 else 0.0


class IntervalStats:
    """Accumulates iterations until ``summary`` is taken, then starts over."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.iterations = 0
        self.advanced = 0
        self.skipped = 0
        self.nan = 0
        self.loss_sum = 0.0
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0
        self.step_seconds = 0.0
        self.all_timed = True
        """True while every iteration of the interval reported its own step time."""

    def add(self, loss: float, skipped: bool, samples: int, tokens: int, flops: float,
            step_seconds: Optional[float], nan: Optional[bool] = None) -> None:
        """``nan`` None: the iteration is a nan iteration when ``loss`` is not finite."""
        self.iterations += 1
        if skipped:
            self.skipped += 1
        else:
            self.advanced += 1
            self.loss_sum += loss
        if nan or (nan is None and not math.isfinite(loss)):
            self.nan += 1
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        if step_seconds is None:
            self.all_timed = False
        else:
            self.step_seconds += step_seconds

    def summary(self, wall_seconds: float) -> IntervalSummary:
        """``wall_seconds`` is used unless every iteration reported its own step time."""
        seconds = self.step_seconds if self.all_timed and self.iterations else wall_seconds
        return IntervalSummary(
            iterations=self.iterations,
            advanced_iterations=self.advanced,
            skipped_iterations=self.skipped,
            nan_iterations=self.nan,
            mean_loss=self.loss_sum / self.advanced if self.advanced else None,
            seconds=seconds,
            samples=self.samples,
            tokens=self.tokens,
            flops=self.flops,
        )


def perplexity(loss: float) -> float:
    """exp(loss) capped at exp(20) as Megatron does, so an untrained model prints a number."""
    return math.exp(min(20.0, loss))


def max_rss_mb() -> float:
    """This process's peak resident set size in MB (what ``memory/... max rss MB`` reports).

    Gather it from every rank (e.g. ``all_gather_object``) and hand the list to
    ``TrainingMonitor.log_memory``.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def rss_mb() -> Optional[float]:
    """This process's resident set size now, in MB (``memory/... rss MB``); None where /proc is missing.

    Sampled at every log interval, a value that keeps rising after warm-up is a leak; the peak
    (``max_rss_mb``) cannot show that once an early spike has set it.
    """
    try:
        with open("/proc/self/statm", "rb") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * resource.getpagesize() / (1024.0 * 1024.0)


def device_memory_mb(device) -> Dict[str, float]:
    """The accelerator's peak memory held by tensors and by torch's caching allocator on ``device``,
    in MB (``memory/... max allocated MB`` and ``max reserved MB``); {} on the CPU, where the RSS
    above is the whole story. The peak allocated is what must fit; reserved adds what fragmentation
    and the cache keep (an OOM with much reserved but not allocated points at fragmentation)."""
    import torch

    if torch.device(device).type == "cpu":
        return {}
    mb = 1024.0 * 1024.0
    return {"max allocated MB": torch.accelerator.max_memory_allocated(device) / mb,
            "max reserved MB": torch.accelerator.max_memory_reserved(device) / mb}
