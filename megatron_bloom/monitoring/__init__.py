"""TensorBoard, wandb and the console, fed from one place (``monitor.TrainingMonitor``) with
Megatron-DeepSpeed's metric names; ``group_loss.GroupLossMeter`` adds per-group (language, task) losses."""
from megatron_bloom.monitoring.console import format_training_line, format_validation_block
from megatron_bloom.monitoring.group_loss import GroupLossMeter
from megatron_bloom.monitoring.metrics import IntervalSummary, max_rss_mb, perplexity, rss_mb
from megatron_bloom.monitoring.monitor import TrainingMonitor, arguments_markdown
from megatron_bloom.monitoring.tensorboard import TensorBoardWriter
from megatron_bloom.monitoring.wandb_writer import WandbWriter

__all__ = [
    "TrainingMonitor",
    "GroupLossMeter",
    "TensorBoardWriter",
    "WandbWriter",
    "IntervalSummary",
    "arguments_markdown",
    "format_training_line",
    "format_validation_block",
    "max_rss_mb",
    "rss_mb",
    "perplexity",
]
