"""Console lines in Megatron-DeepSpeed's training_log format, so existing log parsers keep working.

    iteration       10/     100 | consumed samples:           80 | consumed tokens:        10240 |
    elapsed time per iteration (ms): 123.4 | learning rate: 1.000E-04 | global batch size:     8 |
    lm loss: 5.123456E+00 | loss scale: 4096.0 | grad norm: 1.234 | number of skipped iterations:   0 |
    number of nan iterations:   0 | samples per second: 64.830 | tokens per second: 8298.3 | TFLOPs: 0.01 |

(one line; wrapped here). ``loss scale`` appears for fp16 only, ``lm loss`` only when the interval
had an advanced iteration, ``grad norm`` only when the engine reported one.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from megatron_bloom.monitoring.metrics import IntervalSummary, perplexity


def format_training_line(iteration: int, train_iters: Optional[int], consumed_samples: int, consumed_tokens: int,
                         learning_rate: float, global_batch_size: int, interval: IntervalSummary, tflops_per_gpu: float,
                         grad_norm: Optional[float] = None, loss_scale: Optional[float] = None) -> str:
    total = f"/{train_iters:8d}" if train_iters is not None else ""
    parts = [
        f" iteration {iteration:8d}{total}",
        f"consumed samples: {consumed_samples:12d}",
        f"consumed tokens: {consumed_tokens:12d}",
        f"elapsed time per iteration (ms): {interval.seconds_per_iteration * 1000.0:.1f}",
        f"learning rate: {learning_rate:.3E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    if interval.mean_loss is not None:
        parts.append(f"lm loss: {interval.mean_loss:.6E}")
    if loss_scale is not None:
        parts.append(f"loss scale: {loss_scale:.1f}")
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    parts += [
        f"number of skipped iterations: {interval.skipped_iterations:3d}",
        f"number of nan iterations: {interval.nan_iterations:3d}",
        f"samples per second: {interval.samples_per_second:.3f}",
        f"tokens per second: {interval.tokens_per_second:.1f}",
        f"TFLOPs: {tflops_per_gpu:.2f}",
    ]
    return " | ".join(parts) + " |"


def format_validation_block(iteration: int, losses: Mapping[Optional[str], float]) -> str:
    """Megatron's boxed validation report, one line per validation group.

    --------------------------------------------------------------------------------------------
     validation loss at iteration 1000 | valid-en lm loss value: 2.345678E+00 | lm loss PPL: 1.044E+01 |
    --------------------------------------------------------------------------------------------
    """
    lines = []
    for group, loss in losses.items():
        name = f"{group} lm loss" if group else "lm loss"
        lines.append(
            f" validation loss at iteration {iteration} | {name} value: {loss:.6E} | "
            f"lm loss PPL: {perplexity(loss):.6E} |"
        )
    rule = "-" * (max((len(line) for line in lines), default=0) + 1)
    return "\n".join([rule, *lines, rule])


def format_memory_line(iteration: int, per_rank: Mapping[str, Sequence[float]]) -> str:
    """`` memory after iteration 10 | max rss MB: rank 0 512.3, rank 1 498.0 |``"""
    parts = [f" memory after iteration {iteration}"]
    for name, values in per_rank.items():
        parts.append(f"{name}: " + ", ".join(f"rank {r} {v:.1f}" for r, v in enumerate(values)))
    return " | ".join(parts) + " |"
