"""Communication volume and step time of one layout, from stated assumptions (all printed).

Volumes are bytes one GPU sends per optimizer step, with ring collectives: an all-reduce of X
bytes over n ranks sends 2 (n-1)/n X, a reduce-scatter or all-gather (n-1)/n X.

    tensor parallel   per micro-batch and block: 2 all-reduces of the [s, b, h] activation forward
                      (attention and MLP outputs), 2 backward (their inputs' gradients), 2 more
                      when the block is recomputed; +1 on the first stage (vocab-parallel
                      embedding) and +1 on the last (LM-head input gradient)
    pipeline          per micro-batch: the activation forward and its gradient backward (each TP
                      rank sends its whole copy, as DeepSpeed's pipeline engine does); per step the
                      tied-embedding gradient all-reduce between the first and last stage
    data parallel     per step, by optimizer path: BF16_Optimizer (bf16 + ZeRO-0/1, BLOOM)
                      all-reduces fp32 gradients and all-gathers bf16 weights; ZeRO-0 all-reduces
                      gradients; ZeRO-1/2 reduce-scatter gradients and all-gather weights; ZeRO-3
                      also all-gathers weights for every forward and backward of every micro-batch

Time: each micro-batch slot on the slowest stage costs its FLOPs at ``mfu`` x peak plus its
tensor-parallel and pipeline transfers (on the critical path in Megatron/DeepSpeed); 1F1B needs
m + PP - 1 slots; the data-parallel reduction runs after the last slot. FLOPs are Megatron's
formula (training/flops.py, the one BLOOM's logs used), so TFLOPs here and in the training log
count the same work (recomputation included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.training.flops import flops_per_iteration

from .hardware import Accelerator
from .memory import element_bytes
from .stages import Stage


@dataclass(frozen=True)
class Performance:
    micro_batches: int
    """Micro-batches per pipeline per step: global batch / (micro batch x DP)."""
    bubble: float
    """Pipeline bubble (PP - 1) / m: idle slots relative to useful ones."""
    communication_bytes: Dict[str, float]
    """Bytes one GPU sends per step, by kind (tensor_parallel, pipeline, data_parallel)."""
    communication_seconds: Dict[str, float]
    compute_seconds: float
    """Compute of the slowest stage over all m + PP - 1 slots."""
    step_seconds: float
    tflops_per_gpu: float
    tokens_per_second: float


def _ring(kind: str, n: int, size: float) -> float:
    if n <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * size


def estimate_performance(cfg: ModelConfig, stages: List[Stage], acc: Accelerator, *, nodes: int, gpus_per_node: int,
                         tp: int, pp: int, dp: int, seq_length: int, micro_batch_size: int, global_batch_size: int,
                         zero_stage: int, precision: str, recompute: bool, mfu: float) -> Performance:
    s, b, h = seq_length, micro_batch_size, cfg.hidden_size
    e = element_bytes(precision)
    m = global_batch_size // (micro_batch_size * dp)
    world = nodes * gpus_per_node
    vocab = cfg.padded_vocab_size(tp)
    activation = e * s * b * h

    # Links: TP peers are adjacent ranks, DP peers TP apart, pipeline neighbours TP x DP apart.
    def bandwidth(span: int) -> float:
        return (acc.intra_node_gbps if span <= gpus_per_node else acc.inter_node_gbps) * 1e9

    bw_tp, bw_dp, bw_pp = bandwidth(tp), bandwidth(tp * dp), bandwidth(tp * dp * pp if pp > 1 else 1)

    c = 4 if recompute else 3
    # Forward of one block: QKV + dense 8bsh^2, MLP 4bshf, scores and context 4bs^2h; training does
    # c = 3 forwards' worth (4 when the block is recomputed). The LM head is never recomputed.
    block_flops = c * (8 * b * s * h * h + 4 * b * s * h * cfg.ffn_size + 4 * b * s * s * h)
    head_flops = 3 * 2 * b * s * h * vocab
    peak = acc.peak_tflops(precision) * 1e12 * mfu

    slots = []
    tp_bytes_by_stage = []
    for st in stages:
        flops = (st.blocks * block_flops + (head_flops if st.is_last else 0)) / tp
        reductions = st.blocks * (6 if recompute else 4) + (1 if st.is_first else 0) + (1 if st.is_last else 0)
        tp_bytes = reductions * _ring("all_reduce", tp, activation)
        pp_bytes = (0 if st.is_last else activation) + (0 if st.is_first else activation) if pp > 1 else 0
        tp_bytes_by_stage.append(tp_bytes)
        slots.append((flops / peak, tp_bytes / bw_tp, pp_bytes / bw_pp, flops, tp_bytes, pp_bytes))
    slowest = max(slots, key=lambda x: x[0] + x[1] + x[2])
    slot_time = slowest[0] + slowest[1] + slowest[2]
    n_slots = m + pp - 1

    # Data parallel, on the stage with the most parameters.
    n = max(st.parameters for st in stages)
    if precision == "bf16" and zero_stage <= 1:
        dp_bytes = _ring("all_reduce", dp, n * 4) + _ring("all_gather", dp, n * e)
    elif zero_stage == 0:
        dp_bytes = _ring("all_reduce", dp, n * e)
    elif zero_stage in (1, 2):
        dp_bytes = _ring("reduce_scatter", dp, n * e) + _ring("all_gather", dp, n * e)
    else:
        dp_bytes = m * (2 * _ring("all_gather", dp, n * e) + _ring("reduce_scatter", dp, n * e))
    tied = _ring("all_reduce", 2, vocab * h / tp * (4 if precision == "bf16" else e)) if pp > 1 else 0.0

    comm_bytes = {
        "tensor_parallel": m * max(tp_bytes_by_stage),
        "pipeline": m * (slowest[5]) + tied,
        "data_parallel": dp_bytes,
    }
    comm_seconds = {
        "tensor_parallel": n_slots * slowest[1],
        "pipeline": n_slots * slowest[2] + tied / bw_pp,
        "data_parallel": dp_bytes / bw_dp,
    }
    step = n_slots * slot_time + comm_seconds["data_parallel"] + tied / bw_pp
    model_flops = flops_per_iteration(global_batch_size, s, cfg.num_layers, h, vocab, recompute)
    return Performance(
        micro_batches=m,
        bubble=(pp - 1) / m,
        communication_bytes=comm_bytes,
        communication_seconds=comm_seconds,
        compute_seconds=n_slots * slowest[0],
        step_seconds=step,
        tflops_per_gpu=model_flops / (step * world) / 1e12,
        tokens_per_second=global_batch_size * s / step,
    )
