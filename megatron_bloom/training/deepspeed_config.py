"""The DeepSpeed JSON config, derived from the RunConfig: one source of truth, nothing to keep in sync."""
from __future__ import annotations

from typing import Any, Dict

from megatron_bloom.config.schema import RunConfig


def gradient_accumulation_steps(cfg: RunConfig, global_batch_size: int | None = None) -> int:
    t, dp = cfg.training, cfg.parallel.data_parallel_size
    gbs = global_batch_size or t.global_batch_size
    return gbs // (t.micro_batch_size * dp)


def deepspeed_zero_stage(cfg: RunConfig) -> int:
    """The ``zero_optimization.stage`` DeepSpeed runs ``cfg`` at: ``zero_stage``, but 1 for bf16 at 0.

    bf16 at ZeRO-0 is BLOOM-176B's setting ("bf16 must use z0! it implements its own zero stage 1
    equivalent"): the DeepSpeed of its day ran BF16_Optimizer there, with fp32 master weights and
    fp32 gradient accumulation, the fp32 state partitioned over DP by the optimizer itself.
    DeepSpeed 0.19 picks that optimizer, with fp32 accumulation, at stage 1 only (engine.py,
    ``_do_optimizer_sanity_check``): at stage 0 it refuses fp32 accumulation ("unsupported mix of
    model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32") and without it runs
    BF16_Optimizer with bf16 accumulation buffers (under the pipeline engine; FP16_Optimizer in bf16
    under the plain one). Stage 1 is therefore how BLOOM's optimizer runs today: the same class,
    the same bf16_zero_pp_rank_* files, and the stage a checkpoint's layout records.
    """
    if cfg.training.bf16 and cfg.parallel.zero_stage == 0:
        return 1
    return cfg.parallel.zero_stage


def build_deepspeed_config(cfg: RunConfig) -> Dict[str, Any]:
    """DeepSpeed config for ``cfg`` (validated: data_parallel_size and global_batch_size are set)."""
    t = cfg.training
    zero_stage = deepspeed_zero_stage(cfg)
    ds: Dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg),
        "gradient_clipping": t.clip_grad,
        "steps_per_print": 10**9,  # our own log line reports progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, see optimizer.py
        "zero_optimization": {"stage": zero_stage},
        "checkpoint": {"load_universal": False},
    }
    if zero_stage in (1, 2):
        # One bucket per step on small models; large enough never to split a BLOOM layer.
        ds["zero_optimization"].update(
            {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "overlap_comm": False, "contiguous_gradients": True}
        )
    if t.bf16:
        ds["bf16"] = {"enabled": True}
        # BLOOM-176B: bf16 weights, fp32 master weights AND fp32 gradient accumulation.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif t.fp16:
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": t.loss_scale or 0,  # 0 = dynamic
            "initial_scale_power": int(round(__import__("math").log2(t.initial_loss_scale))),
            "loss_scale_window": t.loss_scale_window,
            "hysteresis": t.hysteresis,
            "min_loss_scale": t.min_loss_scale,
        }
    if cfg.parallel.pipeline_model_parallel_size > 1:
        ds["pipeline"] = {"activation_checkpoint_interval": 0}
    return ds
