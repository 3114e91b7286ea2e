"""One layout on one cluster: is it valid, does it fit, how fast is it; and a search over layouts.

Validity is the trainer's own check (``config.validate_config``) plus what only the planner knows
(bf16 on V100). Fit compares the fullest stage's bytes with the device memory
less a headroom for the CUDA context, NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from megatron_bloom.config import RunConfig, validate_config
from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig

from .hardware import GIB, Accelerator
from .memory import PlanError, StageMemory, stage_memory
from .performance import Performance, estimate_performance
from .stages import stages, total_parameters


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    accelerator: Accelerator

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    zero_stage: int = 1
    checkpoint_activations: bool = True
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    pp_partition_method: str = "type:transformer|embedding"
    rampup_batch_size: Optional[Tuple[int, int, int]] = None
    """START INCREMENT SAMPLES; validated like the trainer does (memory is planned at the full batch)."""
    packed_samples: bool = False
    """Micro-batches of packed samples (finetuning): each row has its own ALiBi/segment bias."""

    def short(self, dp: int) -> str:
        return (f"TP={self.tensor_model_parallel_size} PP={self.pipeline_model_parallel_size} DP={dp} "
                f"mbs={self.micro_batch_size} gbs={self.global_batch_size} ZeRO-{self.zero_stage} "
                f"{'recompute' if self.checkpoint_activations else 'no-recompute'} {self.precision}"
                f"{' packed' if self.packed_samples else ''}")


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.5
    """Fraction of peak FLOPs the matmuls reach (before bubble and exposed communication)."""
    memory_headroom: float = 0.1
    """Fraction of device memory kept free: CUDA context, NCCL buffers, allocator fragmentation."""


@dataclass
class Estimate:
    model: ModelConfig
    cluster: Cluster
    layout: Layout
    assumptions: Assumptions
    data_parallel_size: int
    parameters: int
    stages: List[StageMemory] = field(default_factory=list)
    performance: Optional[Performance] = None
    problems: List[str] = field(default_factory=list)
    """Why the layout is invalid or does not fit; empty when feasible."""

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def usable_bytes(self) -> float:
        return self.cluster.accelerator.memory_bytes * (1 - self.assumptions.memory_headroom)

    @property
    def peak(self) -> Optional[StageMemory]:
        return max(self.stages, key=lambda s: s.total) if self.stages else None


def run_config(model: ModelConfig, layout: Layout) -> RunConfig:
    """The trainer's configuration for this layout (the fields the planner looks at)."""
    cfg = RunConfig()
    cfg.model = copy.deepcopy(model)
    cfg.model.checkpoint_activations = layout.checkpoint_activations
    p, t = cfg.parallel, cfg.training
    p.tensor_model_parallel_size = layout.tensor_model_parallel_size
    p.pipeline_model_parallel_size = layout.pipeline_model_parallel_size
    p.zero_stage = layout.zero_stage
    p.pp_partition_method = layout.pp_partition_method
    t.micro_batch_size, t.global_batch_size = layout.micro_batch_size, layout.global_batch_size
    t.rampup_batch_size = list(layout.rampup_batch_size) if layout.rampup_batch_size else None
    t.bf16, t.fp16 = layout.precision == "bf16", layout.precision == "fp16"
    return cfg


def _reduce_bucket_size(cfg: RunConfig) -> float:
    from megatron_bloom.training.deepspeed_config import build_deepspeed_config

    return float(build_deepspeed_config(cfg)["zero_optimization"].get("reduce_bucket_size", 5e8))


def estimate(model: ModelConfig, cluster: Cluster, layout: Layout, assumptions: Assumptions = Assumptions()) -> Estimate:
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    result = Estimate(model, cluster, layout, assumptions, 0, total_parameters(model))
    if layout.precision not in ("bf16", "fp16", "fp32"):
        result.problems.append(f"precision '{layout.precision}' must be bf16, fp16 or fp32")
        return result
    cfg = run_config(model, layout)
    try:
        validate_config(cfg, cluster.world_size, for_training=False)
    except UserError as exc:
        result.problems.append(str(exc))
        return result
    dp = result.data_parallel_size = cfg.parallel.data_parallel_size
    acc = cluster.accelerator
    if layout.precision == "bf16" and not acc.supports_bf16:
        result.problems.append(f"{acc.name} has no bf16 support; use --precision fp16 (BLOOM's smaller models "
                               f"were trained in fp16 on V100)")
    micro_batches = layout.global_batch_size // (layout.micro_batch_size * dp)
    plan_stages = stages(model, tp, pp, layout.pp_partition_method, half_precision=layout.precision != "fp32")
    try:
        result.stages = [
            stage_memory(st, model, seq_length=model.seq_length, micro_batch_size=layout.micro_batch_size,
                         micro_batches=micro_batches, tp=tp, pp=pp, dp=dp, zero_stage=layout.zero_stage,
                         precision=layout.precision, recompute=layout.checkpoint_activations,
                         reduce_bucket_size=_reduce_bucket_size(cfg),
                         mask_in_input_dtype=acc.dropout_mask_in_input_dtype, packed_samples=layout.packed_samples)
            for st in plan_stages
        ]
    except PlanError as exc:
        result.problems.append(str(exc))
        return result
    result.performance = estimate_performance(
        model, plan_stages, acc, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node, tp=tp, pp=pp, dp=dp,
        seq_length=model.seq_length, micro_batch_size=layout.micro_batch_size,
        global_batch_size=layout.global_batch_size, zero_stage=layout.zero_stage, precision=layout.precision,
        recompute=layout.checkpoint_activations, mfu=assumptions.mfu,
    )
    peak = result.peak
    if peak.total > result.usable_bytes:
        hints = []
        if not layout.checkpoint_activations:
            hints.append("--checkpoint-activations")
        if layout.micro_batch_size > 1:
            hints.append("a smaller --micro-batch-size")
        hints.append("a larger --pp or --tp")
        if layout.zero_stage < 1 and layout.precision != "bf16":  # bf16 partitions at 0 already
            hints.append("--zero-stage 1")
        result.problems.append(
            f"does not fit: stage {peak.stage} needs {peak.total / GIB:.1f} GiB per GPU (weights "
            f"{peak.weights / GIB:.1f}, gradients {peak.gradients / GIB:.1f}, optimizer {peak.optimizer_states / GIB:.1f}, "
            f"buffers {peak.buffers / GIB:.1f}, activations {peak.activations / GIB:.1f}, all-reduce copy "
            f"{peak.allreduce_flat / GIB:.1f}) but {acc.name} leaves "
            f"{result.usable_bytes / GIB:.1f} GiB ({acc.memory_gib:.0f} GiB less {assumptions.memory_headroom:.0%} "
            f"headroom); try {', '.join(hints)}"
        )
    return result


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(model: ModelConfig, cluster: Cluster, global_batch_size: int, assumptions: Assumptions = Assumptions(), *,
           precision: str = "bf16", tp: Optional[int] = None, pp: Optional[int] = None,
           micro_batch_sizes: Optional[Sequence[int]] = None, zero_stages: Optional[Sequence[int]] = None,
           recompute: Optional[Sequence[bool]] = None,
           pp_partition_method: str = "type:transformer|embedding") -> List[Estimate]:
    """Every feasible layout of ``model`` on ``cluster``, fastest estimated step first.

    TP ranges over the divisors of the GPUs per node (TP across nodes is never faster), PP over
    what divides the world size and the layer count allows; fixed values narrow the search.
    """
    world = cluster.world_size
    tps = [tp] if tp else [d for d in _divisors(cluster.gpus_per_node) if model.num_attention_heads % d == 0]
    mbss = list(micro_batch_sizes) if micro_batch_sizes else [1, 2, 4, 8]
    recomputes = list(recompute) if recompute is not None else [True, False]
    found = []
    for t in tps:
        pps = [pp] if pp else [p for p in _divisors(world // t) if p <= model.num_layers] if world % t == 0 else []
        for p in pps:
            zeros = list(zero_stages) if zero_stages is not None else ([0, 1] if p > 1 else [0, 1, 2, 3])
            for z in zeros:
                for b in mbss:
                    for r in recomputes:
                        layout = Layout(t, p, b, global_batch_size, z, r, precision, pp_partition_method)
                        e = estimate(model, cluster, layout, assumptions)
                        if e.feasible:
                            found.append(e)
    found.sort(key=lambda e: (e.performance.step_seconds, e.peak.total))
    return found
