"""TensorBoard, wandb and the console, fed from one place with Megatron-DeepSpeed's metric names.

The trainer calls, on EVERY rank (only the logging rank writes or prints anything)::

    monitor = TrainingMonitor(cfg, is_logging_rank=rank == world_size - 1, world_size=world_size,
                              train_iters=total_iterations, flops_per_iteration=model_flops)
    monitor.reset_timer()                                   # right before the first step
    for ...:
        result = engine.train_step(...)
        consumed_samples += gbs; consumed_tokens += gbs * seq_length
        monitor.record_step(iteration, consumed_samples=..., consumed_tokens=..., loss=result.loss,
                            learning_rate=lr, global_batch_size=gbs, grad_norm=result.grad_norm,
                            loss_scale=result.loss_scale, skipped=result.skipped)
        if iteration % cfg.logging.eval_interval == 0:
            with monitor.untimed():                         # keep eval out of iteration time
                losses = {"valid-en": ..., "valid-fr": ...}
            monitor.log_validation(iteration, losses, consumed_samples, consumed_tokens)
    monitor.close()

Tags written (step = iteration unless the tag says `` vs samples`` / `` vs tokens``):

every iteration   lm-loss-training/lm loss (+ vs samples, vs tokens; advanced iterations only),
                  learning-rate/learning-rate (+ vs samples, vs tokens), grad-norm/grad-norm
                  (+ vs samples, vs tokens), loss-scale/loss-scale (+ ..., fp16 only),
                  batch-size/batch-size (+ vs samples; --no-log-batch-size-to-tensorboard drops it),
                  steps-vs-samples/*, steps-vs-tokens/*
log interval      iteration-time/iteration-time (s, + vs samples, vs tokens), iteration-time/
                  samples per second (+ per replica), iteration-time/tokens per second (+ per
                  replica), iteration-time/TFLOPs per gpu (estimated),
                  skipped-iterations/skipped-iterations, nan-iterations/nan-iterations (counts in
                  the interval)
log_validation    lm-loss-validation/<group>/lm loss validation (+ vs samples, vs tokens) and
                  .../lm loss validation ppl (+ vs samples, vs tokens; --no-log-validation-ppl-to-tensorboard
                  drops it)
log_memory        memory/rank <r> <name>, e.g. memory/rank 3 max rss MB, memory/rank 3 rss MB, and on a
                  GPU memory/rank 3 max allocated MB, memory/rank 3 max reserved MB
once              text 'arguments': the resolved config as a markdown table
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from megatron_bloom.monitoring.console import format_memory_line, format_training_line, format_validation_block
from megatron_bloom.monitoring.metrics import IntervalStats, perplexity
from megatron_bloom.monitoring.tensorboard import TensorBoardWriter
from megatron_bloom.monitoring.wandb_writer import WandbWriter


def _print(line: str) -> None:
    print(line, flush=True)


def arguments_markdown(cfg) -> str:
    """The resolved config as a two-column markdown table (TensorBoard's text tab renders it)."""
    from megatron_bloom.config.loader import config_to_dict

    rows = ["| argument | value |", "|---|---|"]
    for section, values in config_to_dict(cfg).items():
        for name, value in values.items():
            shown = str(value).replace("|", "\\|")
            rows.append(f"| {section}.{name} | {shown} |")
    return "\n".join(rows)


class TrainingMonitor:
    """Per-step, per-interval, validation and memory metrics to TensorBoard, wandb and stdout."""

    def __init__(
        self,
        cfg,
        is_logging_rank: bool,
        world_size: int,
        train_iters: Optional[int] = None,
        start_iteration: int = 0,
        run_name: Optional[str] = None,
        print_fn: Callable[[str], None] = _print,
        flops_per_iteration: Optional[Callable[[int], float]] = None,
    ):
        """``cfg`` is a validated RunConfig.

        ``train_iters``: the run's total iterations (ramp-up included) shown in the console line;
        None shows none. ``flops_per_iteration(global_batch_size)``: model FLOPs of one step
        (training/flops.py), for the TFLOPs estimate; None reports 0.
        """
        self.enabled = bool(is_logging_rank)
        self.world_size = world_size
        self.log_interval = cfg.logging.log_interval
        self.fp16 = cfg.training.fp16
        self.log_batch_size = cfg.logging.log_batch_size_to_tensorboard
        self.log_validation_ppl = cfg.logging.log_validation_ppl_to_tensorboard
        m, p = cfg.model, cfg.parallel
        self.seq_length = m.seq_length
        self.data_parallel_size = p.data_parallel_size or max(
            1, world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        )
        self.train_iters = train_iters
        self._flops = flops_per_iteration or (lambda global_batch_size: 0.0)
        self.print_fn = print_fn
        self.writers: List = []
        self.interval = IntervalStats()
        self._interval_start = time.perf_counter()
        self._untimed_seconds = 0.0
        if not self.enabled:
            return
        lg = cfg.logging
        if lg.tensorboard_dir:
            self.writers.append(TensorBoardWriter(lg.tensorboard_dir, max_queue=lg.tensorboard_queue_size))
        if lg.wandb_project:
            from megatron_bloom.config.loader import config_to_dict

            directory = lg.tensorboard_dir or cfg.checkpoint.save
            self.writers.append(WandbWriter(lg.wandb_project, directory, config_to_dict(cfg), name=run_name))
        for writer in self.writers:
            writer.add_text("arguments", arguments_markdown(cfg), start_iteration)

    # -- timing ----------------------------------------------------------------------------------

    def reset_timer(self) -> None:
        """Start the interval clock now (call right before the first training step)."""
        self._interval_start = time.perf_counter()
        self._untimed_seconds = 0.0

    @contextlib.contextmanager
    def untimed(self):
        """Time spent inside (evaluation, checkpoint saves) is left out of the iteration time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._untimed_seconds += time.perf_counter() - start

    # -- writing ---------------------------------------------------------------------------------

    def _write(self, values: Mapping[str, float], iteration: int, samples: Optional[int],
               tokens: Optional[int]) -> None:
        for writer in self.writers:
            writer.log(values, iteration, samples, tokens)

    def log_scalars(self, prefix: str, values: Mapping[str, float], iteration: int,
                    consumed_samples: Optional[int] = None, consumed_tokens: Optional[int] = None) -> None:
        """Write ``<prefix>/<name>`` at ``iteration``, plus `` vs samples`` / `` vs tokens`` copies when given.

        For metrics later features add, e.g. ``log_scalars("lm-loss-training/per-language",
        {"fr lm loss": 2.1}, it, samples, tokens)``.
        """
        if not self.enabled:
            return
        out: Dict[str, float] = {}
        for name, value in values.items():
            tag = f"{prefix}/{name}" if prefix else name
            out[tag] = float(value)
            if consumed_samples is not None:
                out[f"{tag} vs samples"] = float(value)
            if consumed_tokens is not None:
                out[f"{tag} vs tokens"] = float(value)
        self._write(out, iteration, consumed_samples, consumed_tokens)

    def record_step(
        self,
        iteration: int,
        *,
        consumed_samples: int,
        consumed_tokens: int,
        loss: float,
        learning_rate: float,
        global_batch_size: int,
        grad_norm: Optional[float] = None,
        loss_scale: Optional[float] = None,
        skipped: bool = False,
        nan: Optional[bool] = None,
        step_time: Optional[float] = None,
        force_log: bool = False,
    ) -> Optional[str]:
        """Record optimizer step ``iteration`` (1-based, as Megatron counts).

        ``consumed_samples``/``consumed_tokens`` are the totals AFTER this step. ``step_time`` (s)
        is this step's duration; leave it None to use the wall clock between console lines.
        ``nan``: the step saw a NaN/Inf loss or gradient (None: judge from ``loss`` alone).
        Prints and returns the console line when ``iteration % log_interval == 0`` or
        ``force_log``; returns None otherwise and on non-logging ranks.
        """
        if not self.enabled:
            return None
        samples_this_step = global_batch_size
        self.interval.add(float(loss), skipped, samples_this_step, samples_this_step * self.seq_length,
                          self._flops(global_batch_size), step_time, nan=nan)
        s, t = consumed_samples, consumed_tokens
        values: Dict[str, float] = {
            "steps-vs-samples/y=steps,x=samples": iteration,
            "steps-vs-samples/y=samples,x=steps": s,
            "steps-vs-tokens/y=steps,x=tokens": iteration,
            "steps-vs-tokens/y=tokens,x=steps": t,
            "learning-rate/learning-rate": learning_rate,
            "learning-rate/learning-rate vs samples": learning_rate,
            "learning-rate/learning-rate vs tokens": learning_rate,
        }
        if self.log_batch_size:
            values["batch-size/batch-size"] = values["batch-size/batch-size vs samples"] = global_batch_size
        if not skipped:
            for suffix in ("", " vs samples", " vs tokens"):
                values[f"lm-loss-training/lm loss{suffix}"] = float(loss)
        if grad_norm is not None:
            for suffix in ("", " vs samples", " vs tokens"):
                values[f"grad-norm/grad-norm{suffix}"] = float(grad_norm)
        if self.fp16 and loss_scale is not None:
            for suffix in ("", " vs samples", " vs tokens"):
                values[f"loss-scale/loss-scale{suffix}"] = float(loss_scale)
        self._write(values, iteration, s, t)
        if not (force_log or iteration % self.log_interval == 0):
            return None
        return self._log_interval(iteration, s, t, learning_rate, global_batch_size, grad_norm,
                                  loss_scale if self.fp16 else None)

    def _log_interval(self, iteration, samples, tokens, learning_rate, global_batch_size, grad_norm,
                      loss_scale) -> str:
        now = time.perf_counter()
        summary = self.interval.summary(now - self._interval_start - self._untimed_seconds)
        self.interval.reset()
        self._interval_start, self._untimed_seconds = now, 0.0
        tflops = summary.tflops_per_gpu(self.world_size)
        dp = self.data_parallel_size
        per_iteration = summary.seconds_per_iteration
        self._write(
            {
                "iteration-time/iteration-time": per_iteration,
                "iteration-time/iteration-time vs samples": per_iteration,
                "iteration-time/iteration-time vs tokens": per_iteration,
                "iteration-time/samples per second": summary.samples_per_second,
                "iteration-time/samples per second per replica": summary.samples_per_second / dp,
                "iteration-time/tokens per second": summary.tokens_per_second,
                "iteration-time/tokens per second per replica": summary.tokens_per_second / dp,
                "iteration-time/TFLOPs per gpu (estimated)": tflops,
                "skipped-iterations/skipped-iterations": summary.skipped_iterations,
                "nan-iterations/nan-iterations": summary.nan_iterations,
            },
            iteration, samples, tokens,
        )
        line = format_training_line(iteration, self.train_iters, samples, tokens, learning_rate,
                                    global_batch_size, summary, tflops, grad_norm, loss_scale)
        self.print_fn(line)
        return line

    def log_validation(self, iteration: int, losses: Mapping[Optional[str], float], consumed_samples: int,
                       consumed_tokens: int) -> Optional[str]:
        """Validation loss per group (key None or '' for a single unnamed set); prints Megatron's box."""
        if not self.enabled:
            return None
        values: Dict[str, float] = {}
        for group, loss in losses.items():
            base = f"lm-loss-validation/{group}" if group else "lm-loss-validation"
            loss = float(loss)
            for suffix in ("", " vs samples", " vs tokens"):
                values[f"{base}/lm loss validation{suffix}"] = loss
                if self.log_validation_ppl:
                    values[f"{base}/lm loss validation ppl{suffix}"] = perplexity(loss)
        self._write(values, iteration, consumed_samples, consumed_tokens)
        block = format_validation_block(iteration, losses)
        self.print_fn(block)
        return block

    def log_memory(self, iteration: int, per_rank: Mapping[str, Sequence[float]]) -> Optional[str]:
        """Per-rank memory numbers, e.g. ``{"max rss MB": [gathered max_rss_mb() of every rank]}``."""
        if not self.enabled:
            return None
        values = {
            f"memory/rank {rank} {name}": float(v) for name, column in per_rank.items() for rank, v in enumerate(column)
        }
        self._write(values, iteration, None, None)
        line = format_memory_line(iteration, per_rank)
        self.print_fn(line)
        return line

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        """Flush and close every writer (idempotent)."""
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()

    def __enter__(self) -> "TrainingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

