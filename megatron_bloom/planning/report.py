"""Text and JSON views of an estimate (the text for people, one JSON object for scripts)."""
from __future__ import annotations

from typing import Dict, List

from .estimate import Estimate
from .hardware import GIB


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def assumptions_text(e: Estimate) -> str:
    acc, a = e.cluster.accelerator, e.assumptions
    return (f"peak {acc.peak_tflops(e.layout.precision):g} TFLOPs ({e.layout.precision}) per {acc.name}, "
            f"MFU {a.mfu:.2f}, intra-node {acc.intra_node_gbps:g} GB/s, inter-node {acc.inter_node_gbps:g} GB/s "
            f"per GPU, {acc.memory_gib:.0f} GiB with {a.memory_headroom:.0%} headroom")


def model_label(e: Estimate) -> str:
    """--model-name, or the size of an architecture given by its flags."""
    return e.model.model_name or f"BLOOM ({e.parameters / 1e9:.1f}B parameters)"


def text(e: Estimate) -> str:
    m, c, lay = e.model, e.cluster, e.layout
    name = model_label(e)
    lines = [
        f"plan: {name} on {c.nodes} nodes x {c.gpus_per_node} {c.accelerator.name} ({c.world_size} GPUs)",
        f"  parameters     {e.parameters:,} ({m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} "
        f"heads, vocabulary {m.vocab_size} padded to {m.padded_vocab_size(lay.tensor_model_parallel_size)}, "
        f"sequence {m.seq_length})",
        f"  layout         {lay.short(e.data_parallel_size)}",
    ]
    if e.stages:
        perf = e.performance
        lines.append(f"  stages         blocks per stage {' '.join(str(s) for s in _blocks(e))} ({lay.pp_partition_method}); "
                     f"{perf.micro_batches} micro-batches per step")
        lines.append("  memory per GPU (GiB)")
        lines.append("    stage  params/GPU   weights  gradients optimizer  buffers activations allreduce   total  in-flight")
        rows = e.stages if len(e.stages) <= 16 else sorted({e.stages[0], e.stages[-1], e.peak}, key=lambda s: s.stage)
        for s in rows:
            lines.append(f"    {s.stage:5d} {s.parameters:11,d} {_gib(s.weights)}  {_gib(s.gradients)} {_gib(s.optimizer_states)}"
                         f" {_gib(s.buffers)}   {_gib(s.activations)}  {_gib(s.allreduce_flat)} {_gib(s.total)}"
                         f"  {s.micro_batches_in_flight:5d}")
        peak = e.peak
        lines.append(f"    fullest: stage {peak.stage}, {peak.total / GIB:.2f} GiB of {e.usable_bytes / GIB:.2f} usable")
        lines.append(f"  bubble         (PP-1)/m = {lay.pipeline_model_parallel_size - 1}/{perf.micro_batches} = {perf.bubble:.1%}")
        lines.append("  communication  per GPU per step:")
        for kind in ("tensor_parallel", "pipeline", "data_parallel"):
            lines.append(f"    {kind:16s} {_gb(perf.communication_bytes[kind]):>12s}  ~{perf.communication_seconds[kind]:.2f} s")
        lines.append(f"  step time      ~{perf.step_seconds:.2f} s (compute {perf.compute_seconds:.2f} s); "
                     f"~{perf.tflops_per_gpu:.1f} TFLOPs per GPU (Megatron formula); ~{perf.tokens_per_second:,.0f} tokens/s")
    lines.append(f"  assumptions    {assumptions_text(e)}")
    lines.append("  verdict        " + ("fits" if e.feasible else "DOES NOT WORK: " + "; ".join(e.problems)))
    return "\n".join(lines)


def _blocks(e: Estimate) -> List[int]:
    from .stages import stages

    lay = e.layout
    return [s.blocks for s in stages(e.model, lay.tensor_model_parallel_size, lay.pipeline_model_parallel_size,
                                     lay.pp_partition_method)]


def to_dict(e: Estimate) -> Dict:
    out: Dict = {
        "model": e.model.model_name,
        "parameters": e.parameters,
        "nodes": e.cluster.nodes,
        "gpus_per_node": e.cluster.gpus_per_node,
        "gpu": e.cluster.accelerator.name,
        "world_size": e.cluster.world_size,
        "layout": {
            "tensor_model_parallel_size": e.layout.tensor_model_parallel_size,
            "pipeline_model_parallel_size": e.layout.pipeline_model_parallel_size,
            "data_parallel_size": e.data_parallel_size,
            "micro_batch_size": e.layout.micro_batch_size,
            "global_batch_size": e.layout.global_batch_size,
            "zero_stage": e.layout.zero_stage,
            "checkpoint_activations": e.layout.checkpoint_activations,
            "precision": e.layout.precision,
            "seq_length": e.model.seq_length,
        },
        "feasible": e.feasible,
        "problems": e.problems,
        "assumptions": {
            "peak_tflops": e.cluster.accelerator.peak_tflops(e.layout.precision),
            "mfu": e.assumptions.mfu,
            "intra_node_gbps": e.cluster.accelerator.intra_node_gbps,
            "inter_node_gbps": e.cluster.accelerator.inter_node_gbps,
            "memory_gib": e.cluster.accelerator.memory_gib,
            "memory_headroom": e.assumptions.memory_headroom,
        },
    }
    if e.stages:
        peak, perf = e.peak, e.performance
        out["memory_bytes"] = {
            "stage": peak.stage, "parameters_per_gpu": peak.parameters, "weights": peak.weights,
            "gradients": peak.gradients, "optimizer_states": peak.optimizer_states, "buffers": peak.buffers,
            "activations": peak.activations, "allreduce_flat": peak.allreduce_flat, "total": peak.total,
            "usable": e.usable_bytes,
        }
        out["stages"] = [
            {"stage": s.stage, "parameters_per_gpu": s.parameters, "total_bytes": s.total,
             "activations_bytes": s.activations, "micro_batches_in_flight": s.micro_batches_in_flight}
            for s in e.stages
        ]
        out["micro_batches"] = perf.micro_batches
        out["bubble"] = perf.bubble
        out["communication_bytes"] = perf.communication_bytes
        out["step_seconds"] = perf.step_seconds
        out["tflops_per_gpu"] = perf.tflops_per_gpu
        out["tokens_per_second"] = perf.tokens_per_second
    return out


def search_table(found: List[Estimate], limit: int) -> str:
    lines = [f"feasible layouts: {len(found)} (fastest first; showing {min(limit, len(found))})",
             "   #   TP  PP   DP  mbs  ZeRO recompute  GiB/GPU  bubble   step s  TFLOPs"]
    for i, e in enumerate(found[:limit], 1):
        lay, perf = e.layout, e.performance
        lines.append(f"  {i:2d} {lay.tensor_model_parallel_size:4d} {lay.pipeline_model_parallel_size:3d} "
                     f"{e.data_parallel_size:4d} {lay.micro_batch_size:4d} {lay.zero_stage:5d} "
                     f"{'yes' if lay.checkpoint_activations else 'no':>9s} {e.peak.total / GIB:8.1f} "
                     f"{perf.bubble:6.1%} {perf.step_seconds:8.2f} {perf.tflops_per_gpu:7.1f}")
    return "\n".join(lines)


def layout_key(e: Estimate) -> Dict:
    lay = e.layout
    return {"tensor_model_parallel_size": lay.tensor_model_parallel_size,
            "pipeline_model_parallel_size": lay.pipeline_model_parallel_size,
            "data_parallel_size": e.data_parallel_size, "micro_batch_size": lay.micro_batch_size,
            "zero_stage": lay.zero_stage, "checkpoint_activations": lay.checkpoint_activations,
            "step_seconds": e.performance.step_seconds, "tflops_per_gpu": e.performance.tflops_per_gpu,
            "memory_gib": e.peak.total / GIB}
