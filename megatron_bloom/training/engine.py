"""The 3D-parallel engine: BLOOM layers + our TP groups + DeepSpeed's pipeline engine and ZeRO.

    ZeRO 0/1 (any PP): PipelineModule under DeepSpeed's PipelineEngine (1F1B schedule)
    ZeRO 2/3 (PP = 1): BloomSequential under DeepSpeed's plain engine, our TP groups as its mpu

Both build the same layers from the same per-layer seeds, so every layout starts from, and
(up to float summation order) follows, the same trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from megatron_bloom.checkpoint.universal import universal_checkpoint_info
from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import RunConfig
from megatron_bloom.distributed.collectives import all_reduce_
from megatron_bloom.distributed.mpu import DeepSpeedMPU
from megatron_bloom.distributed.parallel_state import ParallelState
from megatron_bloom.layers import RNGStatesTracker, seed_dropout_streams
from megatron_bloom.layers.duplicated import sync_tp_duplicated_parameters_
from megatron_bloom.models.spec import get_model_spec
from megatron_bloom.training.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps
from megatron_bloom.training.deepspeed_glue import (
    BloomSequential,
    allow_fp16_on_any_cpu,
    cache_cpu_info,
    build_pipeline_module,
    mark_grad_norm_owners,
    norm_of_no_gradients_is_zero,
)
from megatron_bloom.training.losses import PretrainingLoss
from megatron_bloom.training.nonfinite import (
    GradientGuard,
    Injection,
    NonFinite,
    NonFiniteGradients,
    optimizer_step_skipped,
    parameters_in_forward_order,
)
from megatron_bloom.training.optimizer import build_optimizer, loading_any_adam_state

MicroBatch = Tuple[object, Tuple[torch.Tensor, ...]]
"""(inputs, (labels, loss_mask)): inputs is input_ids [b, s] or (input_ids, segment_ids)."""


@dataclass
class StepResult:
    loss: float
    """Mean loss of the global batch (the same on every rank)."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping (None when DeepSpeed does not report it)."""
    skipped: bool
    """True when the optimizer step was skipped (fp16 overflow, or a NaN/Inf gradient under --nan-policy skip)."""
    loss_scale: Optional[float]
    nonfinite: Optional[NonFinite] = None
    """Where a NaN/Inf gradient was seen first when --nan-policy skip skipped the update for it."""


def emulated_cpu_half_precision(precision: str) -> bool:
    """Whether this CPU lacks oneDNN's kernels for ``precision`` ("bf16"/"fp16") matmuls.

    torch then computes them with a generic kernel: on an AMD EPYC with AVX2 only, 512^3 bf16 and
    fp16 matmuls ran at about 1 GFLOP/s on one thread against 60-95 GFLOP/s in fp32. bf16 needs
    AVX-512 (BW/VL/DQ) or AMX; fp16 needs AVX512-FP16 or AMX-FP16. False for fp32 and where torch
    cannot tell.
    """
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(precision)
    try:
        return probe is not None and not getattr(torch.ops.mkldnn, probe)()
    except (AttributeError, RuntimeError):
        return False


def half_precision_warning(precision: str, device: torch.device) -> Optional[str]:
    """The start-up line for a bf16/fp16 run on a CPU that only emulates that precision, else None."""
    if device.type != "cpu" or not emulated_cpu_half_precision(precision):
        return None
    return (f"WARNING: this CPU has no native {precision} matmul kernels; torch emulates them, tens of "
            f"times slower than fp32 matmuls: fine for checking a {precision} run, drop --{precision} to train fast")


class BloomEngine:
    def __init__(self, cfg: RunConfig, state: ParallelState, load_universal: bool = False,
                 loss_class: type = PretrainingLoss):
        """``loss_class(tp_group, vocab_start)`` builds the loss (training/losses.py) the labels are for."""
        import deepspeed

        self.cfg, self.state = cfg, state
        # DeepSpeed's comm layer wraps the default group we created (it does not create another).
        deepspeed.init_distributed(dist_backend=state.backend, auto_mpi_discovery=False)
        m, p = cfg.model, cfg.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        self.padded_vocab_size = m.padded_vocab_size(tp)
        # Attention dropout's stream; seeded below, once building has stopped reseeding per layer.
        self.tracker = RNGStatesTracker(state.device)
        vocab_start = state.tp_rank * (self.padded_vocab_size // tp)
        specs = get_model_spec().layer_specs(m, self.padded_vocab_size, state.tp_group if tp > 1 else None, self.tracker,
                                             half_precision=cfg.training.fp16 or cfg.training.bf16)
        loss_fn = loss_class(state.tp_group if tp > 1 else None, vocab_start)
        # DeepSpeed's pipeline engine (even with one stage) whenever ZeRO allows it: its checkpoints
        # have Megatron-DeepSpeed's BLOOM layout (layer_XX-model_YY-model_states.pt), so every
        # layout saves the same parameter names. ZeRO-2/3 need the plain engine.
        self.is_pipeline = pp > 1 or p.zero_stage <= 1
        if self.is_pipeline:
            module = build_pipeline_module(specs, loss_fn, cfg)
        else:
            module = BloomSequential(specs, loss_fn, cfg.training.seed)
        if p.sync_tp_duplicated_parameters:
            sync_tp_duplicated_parameters_(module, state.tp_group if tp > 1 else None)
        mark_grad_norm_owners(module, state.tp_rank)
        # Saved with every checkpoint: how TP shards merge when the layout changes on resume.
        module.universal_checkpoint_info = universal_checkpoint_info(m)
        self.module = module
        optimizer = build_optimizer(module, cfg.training)
        self._torch_optimizer = optimizer
        self.ds_config = build_deepspeed_config(cfg)
        # Fixed at initialize time in DeepSpeed: decided before the engine exists.
        self.ds_config["checkpoint"]["load_universal"] = load_universal
        cache_cpu_info()
        if cfg.training.fp16:
            allow_fp16_on_any_cpu()
        if cfg.training.bf16:
            norm_of_no_gradients_is_zero()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=self.ds_config,
            mpu=None if self.is_pipeline else DeepSpeedMPU(state),
        )
        # After everything that may draw random numbers while building (per-layer init seeds).
        self.seed_dropout(cfg.training.seed)
        self.gradient_accumulation_steps = gradient_accumulation_steps(cfg)
        t = cfg.training
        if t.clip_grad > 0 and not (t.fp16 or t.bf16 or p.zero_stage > 0):
            # Plain fp32 without ZeRO: DeepSpeed clips with the right norm (given our owner marks)
            # but throws the norm away; keep it so it can be logged like the other paths'.
            self.engine.clip_fp32_gradients = self._clip_fp32_gradients_and_record
        self._skipped_before = 0
        # fp16's loss scaler already skips non-finite steps; the guard is for fp32 and bf16.
        self.guard = GradientGuard(parameters_in_forward_order(self), state.rank, state.device,
                                   check=not t.fp16, injection=Injection.from_env())
        self._nonfinite: Optional[NonFinite] = None
        self._deepspeed_model_step = self.engine._take_model_step
        # Both DeepSpeed engines call this once per optimizer step on every rank (pipeline:
        # _exec_optimizer_step; plain: step() at the accumulation boundary), with every gradient of
        # the step computed: the one place to agree on skipping before anything is applied.
        self.engine._take_model_step = self._guarded_model_step

    def seed_dropout(self, seed: int) -> None:
        """Seed this rank's dropout streams from ``seed`` as Megatron-DeepSpeed does (layers/random.py)."""
        seed_dropout_streams(self.tracker, seed, self.state.tp_rank, self.state.pp_rank)

    def _guarded_model_step(self, lr_kwargs=None) -> None:
        found = self._nonfinite = self.guard.agree()
        if found is None:
            return self._deepspeed_model_step(lr_kwargs)
        if self.cfg.training.nan_policy == "stop":
            it, at = self.guard.iteration, self.state.dims.coord(found.rank)
            raise NonFiniteGradients(
                f"iteration {it}: NaN/Inf gradient, {found} (pipeline stage {at.pp}, tensor rank {at.tp}, "
                f"data rank {at.dp}); stopped before the update (--nan-policy stop); resume from the last "
                f"checkpoint with --nan-policy skip or --skip-train-iteration-range {it}-{it}"
            )
        with optimizer_step_skipped(self._torch_optimizer):
            self._deepspeed_model_step(lr_kwargs)

    def _clip_fp32_gradients_and_record(self) -> None:
        from deepspeed.runtime.utils import clip_grad_norm_

        self.engine._global_grad_norm = clip_grad_norm_(
            parameters=self.engine.module.parameters(),
            max_norm=self.engine.gradient_clipping(),
            mpu=self.engine.mpu,
        )

    # ---------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        t = self.cfg.training
        return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_gradient_accumulation_steps(self, steps: int) -> None:
        """Batch-size ramp-up changes the number of micro-batches per step."""
        self.gradient_accumulation_steps = steps
        self.engine.set_train_batch_size(steps * self.cfg.training.micro_batch_size * self.state.dims.dp)

    def _to_device(self, batch: MicroBatch) -> MicroBatch:
        dev = self.state.device

        def move(x):
            if isinstance(x, (tuple, list)):
                return tuple(move(t) for t in x)
            return x.to(dev, non_blocking=True)

        return move(batch[0]), move(batch[1])

    def train_step(self, micro_batches: Sequence[MicroBatch], iteration: Optional[int] = None) -> StepResult:
        """One optimizer step over this rank's ``gradient_accumulation_steps`` micro-batches.

        Only the first and last pipeline stages read data; other stages may pass an empty list.
        ``iteration`` (1-based, as the trainer counts) names the step in NaN/Inf reports.
        """
        self.engine.train()
        self.guard.begin_step(iteration)
        self._nonfinite = None
        if self.is_pipeline:
            batches = [self._to_device(b) for b in micro_batches]
            loss = self.engine.train_batch(data_iter=iter(batches)).item()
        else:
            assert len(micro_batches) == self.gradient_accumulation_steps, (
                f"{len(micro_batches)} micro-batches for {self.gradient_accumulation_steps} accumulation steps"
            )
            total = torch.zeros((), dtype=torch.float32, device=self.state.device)
            for batch in micro_batches:
                inputs, labels = self._to_device(batch)
                loss = self.engine(inputs, labels)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().float()
            total /= len(micro_batches)
            if self.state.dims.dp > 1:
                all_reduce_(total, group=self.state.dp_group)
                total /= self.state.dims.dp
            loss = total.item()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = norm.item()
        skipped_total = int(getattr(self.engine, "skipped_steps", 0))
        skipped = skipped_total > self._skipped_before or self._nonfinite is not None
        self._skipped_before = skipped_total
        if self._nonfinite is not None:
            norm = None  # NaN/Inf by construction; nothing was applied with it
        scale = getattr(self.optimizer, "cur_scale", None) if self.cfg.training.fp16 else None
        return StepResult(loss=loss, grad_norm=norm, skipped=skipped, loss_scale=scale, nonfinite=self._nonfinite)

    @torch.no_grad()
    def eval_step(self, micro_batches: Sequence[MicroBatch], num_micro_batches: Optional[int] = None) -> float:
        """Mean loss over micro-batches without updating anything (same on every rank).

        Middle pipeline stages read no data and pass an empty list: ``num_micro_batches`` tells
        them how many micro-batches the schedule has (every stage must run the same schedule).
        """
        self.engine.eval()
        if self.is_pipeline:
            batches = [self._to_device(b) for b in micro_batches]
            count = num_micro_batches if num_micro_batches is not None else len(batches)
            return self.engine.eval_batch(data_iter=iter(batches), num_micro_batches=count).item()
        total = torch.zeros((), dtype=torch.float32, device=self.state.device)
        for batch in micro_batches:
            inputs, labels = self._to_device(batch)
            total += self.engine(inputs, labels).float()
        total /= max(len(micro_batches), 1)
        if self.state.dims.dp > 1:
            all_reduce_(total, group=self.state.dp_group)
            total /= self.state.dims.dp
        return total.item()

    def load(self, directory: str, tag: str, optimizer_steps: int = 0) -> None:
        """Weights and optimizer state from ``directory/tag`` (a universal checkpoint if so built).

        ``optimizer_steps`` (steps taken, skipped ones excluded) is Adam's step count for a state
        that records none per parameter (Megatron-DeepSpeed's apex Adam keeps it per group).
        """
        import os
        import pickle

        from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable
        from megatron_bloom.checkpoint.trust import TRUSTED, check_checkpoint_folder, deepspeed_loading

        base = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW inside DeepSpeed's wrapper
        # DeepSpeed unpickles with weights_only=False: forced weights-only here, with the allow-list.
        # Engine files hold Megatron-DeepSpeed's args (its enums); optimizer shards may hold apex's Adam state.
        try:
            with deepspeed_loading(), megatron_enums_importable(), loading_any_adam_state(base, optimizer_steps):
                path, _ = self.engine.load_checkpoint(
                    directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
                )
        except pickle.UnpicklingError:  # a file changed after the pre-flight check read it: name it
            folder = os.path.join(directory, tag)
            check_checkpoint_folder(folder)
            raise UserError(f"a file of {folder} was refused by the weights-only loader (checkpoint files may "
                            f"hold only {TRUSTED})") from None
        if path is None:
            raise UserError(f"DeepSpeed found no checkpoint files for this rank in {directory}/{tag}")

    @property
    def reads_data(self) -> bool:
        """Whether this rank's stage consumes micro-batches (first or last pipeline stage)."""
        return self.state.is_first_stage or self.state.is_last_stage
