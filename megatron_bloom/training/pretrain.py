"""The pretraining loop: schedules, data, evaluation, checkpoints, stop conditions, monitoring.

One command serves the first run and every requeue: ``--load`` pointing at an empty directory
starts from scratch; otherwise the newest complete checkpoint is resumed, at the saved layout
(bitwise) or at another one (through a universal checkpoint, converted automatically once).

Evaluation: every ``eval_interval`` iterations and once at the end (unless the last iteration
just evaluated), ``eval_iters`` batches of each validation group; ``--eval-iters 0`` is none at
all. Every save carries the run's tokenizer in ``<save>/tokenizer`` (``_tokenizer_sources``), so
``convert_checkpoint.py native-to-hf`` gives a folder transformers loads whole.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_bloom.checkpoint import (
    check_compatible,
    convert_to_universal,
    find_checkpoint,
    load_rng,
    save_checkpoint,
)
from megatron_bloom.checkpoint.files import TOKENIZER_DIR, first_tokenizer_folder
from megatron_bloom.errors import UserError
from megatron_bloom.config import RunConfig, config_to_dict, save_resolved_config
from megatron_bloom.distributed import init_distributed, set_seed
from megatron_bloom.distributed.collectives import all_gather_values, broadcast_values, on_rank0_while_others_poll
from megatron_bloom.training.data import (
    build_datasets,
    StepReader,
    micro_batches_for_step,
    parse_skip_ranges,
    skip_sample_ranges_to_add,
)
from megatron_bloom.monitoring import TrainingMonitor
from megatron_bloom.monitoring.metrics import device_memory_mb, max_rss_mb, rss_mb
from megatron_bloom.training.deepspeed_config import deepspeed_zero_stage
from megatron_bloom.training.flops import model_flops_per_iteration
from megatron_bloom.training.losses import PretrainingLoss
from megatron_bloom.training.schedules import LearningRateSchedule, build_batch_schedule, total_train_iters
from megatron_bloom.training.signals import EXIT_REQUEUE, StopRequests


# Known-harmless library noise on every rank, every step (results are checked by the parity tests):
# DeepSpeed's pipeline engine backprops through a c10d broadcast, and calls a renamed all-gather.
warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")


def layout_of(cfg: RunConfig) -> Dict[str, int]:
    """What a checkpoint's files depend on; "zero" is DeepSpeed's stage (bf16 at 0 runs at 1)."""
    p = cfg.parallel
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "dp": p.data_parallel_size, "zero": deepspeed_zero_stage(cfg)}


def log0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


class Trainer:
    loss_class: type = PretrainingLoss
    """The loss (training/losses.py) matching the labels ``_batches`` produces."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t, p = cfg.training, cfg.parallel
        self.stop = StopRequests(t.kill_switch_path)
        if self.stop.kill_switch():
            raise UserError(f"kill switch {t.kill_switch_path} exists; remove it to train")
        self.skip_iteration_ranges = parse_skip_ranges(t.skip_train_iteration_range)
        self.state = init_distributed(
            p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
            backend=p.distributed_backend, timeout_minutes=p.distributed_timeout_minutes,
        )
        set_seed(t.seed)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        from megatron_bloom.training.engine import BloomEngine, half_precision_warning

        precision_warning = half_precision_warning("bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
                                                   self.state.device)
        if precision_warning:
            log0(precision_warning)

        self.lr_schedule = LearningRateSchedule.from_config(t)
        self.batch_schedule = build_batch_schedule(t, p.data_parallel_size)
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self.skipped_iterations = 0
        self.nan_iterations = 0
        self.skipped_sample_ranges: Dict[str, list] = {}

        # Resume point: decided before the engine exists (a layout change needs a universal load).
        self.resume = self._find_resume()
        self.same_layout = True
        self.weights_only = False
        self.load_flags: Dict[str, bool] = {}
        universal = False
        load_dir = None
        if self.resume is not None:
            check_compatible(self.resume, cfg.model)
            self.weights_only = bool(self.resume.state.get("weights_only"))
            saved = self.resume.layout
            self.same_layout = self.weights_only or saved == layout_of(cfg)
            self.load_flags = self._load_flags()
            module_only = self.load_flags["no_load_optim"] or self.load_flags["finetune"]
            load_dir = self.resume.directory
            if not self.same_layout and not module_only:  # weights alone load at any layout
                universal = True
                if saved.get("zero") == 0 or layout_of(cfg)["zero"] == 0:
                    raise UserError(
                        f"checkpoint {self.resume.path} was saved at {saved}; changing layout goes through a "
                        f"universal checkpoint, which needs ZeRO-1 on both sides (--zero-stage 1)"
                    )
                load_dir = os.path.join(self.resume.directory, "universal")
                log0(f"> layout changed {saved} -> {layout_of(cfg)}: converting {self.resume.path} to {load_dir}")
                converted = os.path.join(load_dir, self.resume.tag)  # renamed into place when complete
                on_rank0_while_others_poll(
                    lambda: convert_to_universal(self.resume.directory, self.resume.tag, load_dir, cfg.model),
                    done=lambda: os.path.isdir(converted), failure_file=converted + ".failed",
                    what=f"converting {self.resume.path} to a universal checkpoint")

        self.engine = BloomEngine(cfg, self.state, load_universal=universal, loss_class=self.loss_class)
        if self.resume is not None:
            self._load(load_dir)

        # Every evaluation reads the same first eval_iters global batches of each validation group.
        # --eval-iters 0 is Megatron's "no evaluation": no validation group, so none is evaluated
        # (periodically or at the end). With eval_interval past the last iteration, only the final
        # evaluation runs, as in Megatron-DeepSpeed.
        self.train_ds, self.valid_ds = self._build_datasets(
            self._total_train_samples(), cfg.logging.eval_iters * t.global_batch_size
        )
        if cfg.logging.eval_iters == 0:
            if self.valid_ds:
                log0("> --eval-iters 0: no evaluation")
            self.valid_ds = {}
        if self.rank == 0 and cfg.checkpoint.save:
            save_resolved_config(cfg, cfg.checkpoint.save)
        # Written into <save>/tokenizer by the first save of this process (a no-op when there already).
        self.tokenizer_to_save = first_tokenizer_folder(self._tokenizer_sources())

        self.monitor = TrainingMonitor(cfg, is_logging_rank=self.rank == 0, world_size=self.world,
                                       train_iters=total_train_iters(t, p.data_parallel_size),
                                       start_iteration=self.iteration,
                                       flops_per_iteration=model_flops_per_iteration(cfg))

    # ---- hooks (the finetuning trainer overrides these) ------------------------------------------

    def _find_resume(self):
        """The checkpoint to start from (None: from scratch); decided before the engine exists."""
        info = find_checkpoint(self.cfg.checkpoint.load)
        if self.cfg.checkpoint.load and info is None:
            log0(f"WARNING: --load {self.cfg.checkpoint.load}: no checkpoint there yet; starting from scratch")
        return info

    def _tokenizer_sources(self) -> List[Optional[str]]:
        """Where the run's tokenizer may be, in order (the first local tokenizer folder wins):
        --tokenizer-name-or-path, then the ``tokenizer/`` folder of the checkpoint started from."""
        resumed = os.path.join(self.resume.directory, TOKENIZER_DIR) if self.resume is not None else None
        return [self.cfg.data.tokenizer_name_or_path, resumed]

    def _build_datasets(self, train_samples: int, valid_samples: int):
        """(train dataset, {validation group: dataset}); indexed by global sample number."""
        return build_datasets(self.cfg, train_samples, valid_samples)

    def _after_step(self, result) -> None:
        """Called on every rank after each optimizer step has been recorded."""

    # ---- bookkeeping ----------------------------------------------------------------------------

    def _total_train_samples(self) -> int:
        t = self.cfg.training
        if t.train_samples is not None:
            return t.train_samples
        return t.train_iters * t.global_batch_size

    def _total_iterations_estimate(self) -> int:
        t = self.cfg.training
        if t.train_iters is not None:
            return t.train_iters
        return self.batch_schedule.iterations_for_samples(t.train_samples)

    def _done(self) -> bool:
        t = self.cfg.training
        if t.train_iters is not None:
            return self.iteration >= t.train_iters
        return self.consumed_samples >= t.train_samples

    def trainer_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "skipped_iterations": self.skipped_iterations,
            "nan_iterations": self.nan_iterations,
            "skipped_sample_ranges": self.skipped_sample_ranges,
            "lr_schedule": self.lr_schedule.state_dict(),
            "layout": layout_of(self.cfg),
            "config": config_to_dict(self.cfg),
            "weights_only": False,
        }

    def megatron_state(self) -> dict:
        """Megatron-DeepSpeed's keys for the engine files (its args, iteration, tokens, LR state)."""
        from megatron_bloom.checkpoint.megatron_args import client_state

        return client_state(self.cfg, self.lr_schedule, iteration=self.iteration,
                            consumed_samples=self.consumed_samples, consumed_tokens=self.consumed_tokens,
                            padded_vocab_size=self.engine.padded_vocab_size, world_size=self.world)

    def _load_flags(self) -> Dict[str, bool]:
        """Which of --no-load-optim, --no-load-rng, --finetune, --reset-progress apply to the checkpoint.

        As Megatron-DeepSpeed's load_checkpoint, except that a checkpoint saved by a run that was
        itself given a flag is resumed in full: that run already applied it, and its requeued jobs,
        which repeat the same command, must not drop their own optimizer or progress each time.
        """
        from megatron_bloom.checkpoint.megatron_args import LOAD_FLAGS

        given = {name: getattr(self.cfg.checkpoint, name) for name in LOAD_FLAGS}
        saved_by = self.resume.state.get("config", {}).get("checkpoint", {})
        applied = {name: on and not saved_by.get(name, False) for name, on in given.items()}
        kept = [name for name, on in given.items() if on and not applied[name]]
        if kept:
            log0(f"> {self.resume.path} was saved by a run given --{', --'.join(n.replace('_', '-') for n in kept)}: "
                 f"resuming it in full")
        return applied

    def _load(self, load_dir: str) -> None:
        info = self.resume
        if self.weights_only:
            from megatron_bloom.checkpoint.native import load_weights_only

            load_weights_only(self.engine, info.directory, info.tag)
            log0(f"> loaded weights from {info.path} (fresh optimizer, schedule and data position)")
            return
        s, flags = info.state, self.load_flags
        if flags["no_load_optim"] or flags["finetune"]:
            from megatron_bloom.checkpoint.native import load_weights_only

            load_weights_only(self.engine, info.directory, info.tag)
            log0(f"> loaded the weights of {info.path}, not its optimizer state (--no-load-optim/--finetune)")
        else:
            self.engine.load(load_dir, info.tag, optimizer_steps=s["iteration"] - s.get("skipped_iterations", 0))
        reset = flags["finetune"] or flags["reset_progress"]
        self.iteration = 0 if reset else s["iteration"]
        self.consumed_samples = 0 if flags["reset_progress"] else s["consumed_samples"]
        self.consumed_tokens = 0 if flags["reset_progress"] else s["consumed_tokens"]
        if not reset:
            self.skipped_iterations = s.get("skipped_iterations", 0)
            self.nan_iterations = s.get("nan_iterations", 0)
            self.skipped_sample_ranges = dict(s.get("skipped_sample_ranges", {}))
            if "lr_schedule" in s:
                self.lr_schedule.load_state_dict(s["lr_schedule"])
        fresh_rng = flags["no_load_rng"] or flags["finetune"]
        restored = not fresh_rng and load_rng(info, self.rank, self.same_layout, self.engine.tracker)
        if not restored:
            # Another layout (streams cannot be mapped rank to rank) or a flag: derive fresh ones
            # deterministically, each stage and TP rank its own as at the start of a run.
            set_seed(self.cfg.training.seed + self.iteration)
            self.engine.seed_dropout(self.cfg.training.seed + self.iteration)
            if flags["no_load_rng"]:
                log0(f"> --no-load-rng: RNG streams drawn fresh from --seed {self.cfg.training.seed}")
        if reset:
            log0(f"> loaded {info.path} (saved at iteration {s['iteration']}); starting at iteration 0 with "
                 f"{self.consumed_samples} samples consumed (--{'finetune' if flags['finetune'] else 'reset-progress'})")
        else:
            log0(f"> resumed {info.path} at iteration {self.iteration}, {self.consumed_samples} samples"
                 + ("" if self.same_layout else f" (layout {info.layout} -> {layout_of(self.cfg)})"))

    def save(self) -> None:
        c = self.cfg.checkpoint
        if not c.save:
            return
        start = time.time()
        path = save_checkpoint(self.engine, c.save, self.iteration, self.trainer_state(), c.keep_last_k,
                               client_state=self.megatron_state(), tokenizer_dir=self.tokenizer_to_save)
        log0(f"> saved checkpoint {path} in {time.time() - start:.2f} s"
             + (f" (tokenizer files of {self.tokenizer_to_save} in {os.path.join(c.save, TOKENIZER_DIR)})"
                if self.tokenizer_to_save else ""))
        self.tokenizer_to_save = None  # copied once per process

    # ---- steps ----------------------------------------------------------------------------------

    def _in_skipped_range(self) -> bool:
        return any(lo <= self.consumed_samples < hi for lo, hi in self.skipped_sample_ranges.values())

    def _batches(self, dataset, consumed: int, gbs: int):
        if not self.engine.reads_data:
            return []
        t = self.cfg.training
        return micro_batches_for_step(dataset, consumed, gbs, t.micro_batch_size, self.state.dims.dp,
                                      self.state.dp_rank, self.cfg.model.vocab_size)

    def _evaluating(self):
        """Context around a whole evaluation (every validation group); a hook for subclasses."""
        return contextlib.nullcontext()

    def _evaluate_group(self, name: str, dataset) -> float:
        """Mean loss over the first ``eval_iters`` global batches of one validation group."""
        gbs = self.batch_schedule.global_batch_size(self.consumed_samples)
        # --valid-num-workers threads read the next batches while one is evaluated.
        read = StepReader(lambda consumed, size: self._batches(dataset, consumed, size),
                          self.cfg.data.valid_num_workers if self.engine.reads_data else 0, lambda consumed: gbs)
        losses = []
        try:
            for i in range(self.cfg.logging.eval_iters):
                # Evaluation reads its own dataset from the start each time: comparable numbers.
                losses.append(self.engine.eval_step(read(i * gbs, gbs),
                                                    gbs // (self.cfg.training.micro_batch_size * self.state.dims.dp)))
        finally:
            read.close()
        if not losses:  # unreachable: --eval-iters 0 leaves no validation group (see __init__)
            raise RuntimeError(f"evaluated no batch of validation group {name!r}")
        return sum(losses) / len(losses)

    def evaluate(self) -> Dict[str, float]:
        """{validation group: mean loss}; subclasses hook in through ``_evaluating`` and ``_evaluate_group``."""
        with self._evaluating():
            return {name: self._evaluate_group(name, dataset) for name, dataset in self.valid_ds.items()}

    def train(self) -> int:
        cfg, t, lg = self.cfg, self.cfg.training, self.cfg.logging
        self.stop.install()
        start_time = time.time()
        first_iteration = self.iteration
        exit_code = 0
        log0(f"> training from iteration {self.iteration} ({self.consumed_samples} samples consumed)")
        self.monitor.reset_timer()
        read_step = StepReader(lambda consumed, gbs: self._batches(self.train_ds, consumed, gbs),
                               cfg.data.num_workers if self.engine.reads_data else 0,
                               self.batch_schedule.global_batch_size)
        try:
            while not self._done():
                gbs = self.batch_schedule.global_batch_size(self.consumed_samples)
                new_skip = skip_sample_ranges_to_add(self.skip_iteration_ranges, self.iteration + 1,
                                                     self.consumed_samples, gbs, self.skipped_sample_ranges)
                if new_skip:
                    self.skipped_sample_ranges[new_skip[0]] = new_skip[1:]
                step_start = time.time()
                if self._in_skipped_range():
                    self.iteration += 1
                    self.consumed_samples += gbs
                    self.consumed_tokens += gbs * cfg.model.seq_length
                    self.skipped_iterations += 1
                    log0(f"> iteration {self.iteration}: skipped (--skip-train-iteration-range)")
                    continue
                if gbs != self.engine.gradient_accumulation_steps * t.micro_batch_size * self.state.dims.dp:
                    self.engine.set_gradient_accumulation_steps(gbs // (t.micro_batch_size * self.state.dims.dp))
                lr = self.lr_schedule.lr(self.consumed_samples)
                self.engine.set_learning_rate(lr)
                result = self.engine.train_step(read_step(self.consumed_samples, gbs), iteration=self.iteration + 1)
                elapsed = time.time() - step_start
                self.iteration += 1
                self.consumed_samples += gbs
                self.consumed_tokens += gbs * cfg.model.seq_length
                if result.skipped:
                    self.skipped_iterations += 1
                # Megatron's "nan iterations": the loss or (fp32/bf16) a gradient was NaN/Inf.
                nan = result.nonfinite is not None or not math.isfinite(result.loss)
                if nan:
                    self.nan_iterations += 1
                if result.nonfinite is not None:
                    log0(f"> iteration {self.iteration}: NaN/Inf gradient, {result.nonfinite}; update skipped on "
                          f"every rank (--nan-policy skip; nan iterations so far: {self.nan_iterations})")
                self.monitor.record_step(
                    self.iteration,
                    consumed_samples=self.consumed_samples,
                    consumed_tokens=self.consumed_tokens,
                    loss=result.loss,
                    learning_rate=lr,
                    global_batch_size=gbs,
                    grad_norm=result.grad_norm,
                    loss_scale=result.loss_scale,
                    skipped=result.skipped,
                    nan=nan,
                    step_time=elapsed,
                )
                self._after_step(result)
                if self.iteration % lg.log_interval == 0:
                    self.monitor.log_memory(self.iteration, self._memory_by_rank())
                if self.valid_ds and self.iteration % lg.eval_interval == 0:
                    self._validate()
                saved = False
                if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0:
                    with self.monitor.untimed():
                        self.save()
                    saved = True
                signal_seen, kill_switch = self.stop.agreed()
                minutes = (time.time() - start_time) / 60.0
                reason = None
                if signal_seen:
                    reason, exit_code = f"signal {self.stop.signal_received or 'on another rank'}", EXIT_REQUEUE
                elif kill_switch:
                    reason = f"kill switch {t.kill_switch_path}"
                elif t.exit_interval and self.iteration % t.exit_interval == 0:
                    reason = f"--exit-interval {t.exit_interval}"
                elif t.exit_duration_in_mins is not None and self._agreed_over_time(minutes):
                    reason = f"--exit-duration-in-mins {t.exit_duration_in_mins} ({minutes:.1f} min)"
                if reason:
                    if not saved:
                        with self.monitor.untimed():
                            self.save()
                    log0(f"> stopping at iteration {self.iteration}: {reason}; exit code {exit_code}")
                    return exit_code
            # A finished run started again takes no step: the checkpoint it resumed from is the
            # final one, and rewriting it in place would only open a window for a kill to corrupt it.
            took_steps = self.iteration != first_iteration
            if (took_steps and cfg.checkpoint.save
                    and not (cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0)):
                self.save()
            if self.valid_ds and self.iteration % lg.eval_interval != 0:
                self._validate()
            log0(f"> training done at iteration {self.iteration} ({self.consumed_samples} samples)")
            return 0
        finally:
            read_step.close()
            self.stop.uninstall()
            self.monitor.close()

    def _validate(self) -> None:
        with self.monitor.untimed():
            losses = self.evaluate()
        self.monitor.log_validation(self.iteration, losses, self.consumed_samples, self.consumed_tokens)

    def _agreed_over_time(self, minutes: float) -> bool:
        # Ranks' clocks differ slightly; rank 0 decides so that every rank stops at the same step.
        return bool(broadcast_values([minutes > self.cfg.training.exit_duration_in_mins], src=0)[0])

    def _memory_by_rank(self) -> Dict[str, list]:
        """{"max rss MB": [per rank], "rss MB": [...]}: the peak and the resident size now; on an
        accelerator also its "max allocated MB" and "max reserved MB" (every rank has the same kind)."""
        now = rss_mb()
        device = device_memory_mb(self.state.device)
        parts = all_gather_values([max_rss_mb(), math.nan if now is None else now, *device.values()])
        memory = {"max rss MB": [p[0] for p in parts]}
        if now is not None:
            memory["rss MB"] = [p[1] for p in parts]
        for i, name in enumerate(device, start=2):
            memory[name] = [p[i] for p in parts]
        return memory


def pretrain(cfg: RunConfig) -> int:
    from megatron_bloom.config.schema import FinetuneConfig

    if cfg.finetune != FinetuneConfig():
        import dataclasses

        default = FinetuneConfig()
        given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(default)
                 if getattr(cfg.finetune, f.name) != getattr(default, f.name)]
        raise UserError(f"{', '.join(given)}: finetuning option(s), which pretraining does not take; "
                        f"run launch/finetune.py, or drop them")
    trainer = Trainer(cfg)
    return trainer.train()
