"""Bytes per GPU: weights, gradients, optimizer states, buffers and activations, per pipeline stage.

Model and optimizer states, bytes per parameter held by a rank (N parameters on the rank, d = DP),
as DeepSpeed 0.19 allocates them through our engine (counted from live tensors by
``planning/measure.py``; tests/unit/test_plan.py checks them within 10%):

    precision ZeRO  weights  gradients            optimizer (fp32 master + Adam m, v)
    bf16      0, 1  2        2 + 4 (bf16 + fp32   12/d    BF16_Optimizer, BLOOM-176B's path
                             accumulation, whole)
    bf16      2     2        4/d                  12/d
    bf16/fp16 3     w/d      g/d                  12/d    (+ gathered parameters, see stage_memory;
                                                          not checked to 10%: modelled high)
    fp16      0     2        2                    12
    fp16      1     2        2                    12/d
    fp16      2     2        2/d                  12/d
    fp32      0     4        4                    8       (no master copy)
    fp32      1     4        4                    12/d    (DeepSpeed keeps an fp32 partition copy)
    fp32      2     4        4/d                  12/d

bf16 at ZeRO-0 runs DeepSpeed's BF16_Optimizer at its stage 1 (``deepspeed_zero_stage`` in
training/deepspeed_config.py), as BLOOM-176B's ZeRO-0 did: the fp32 master weights and Adam
moments are partitioned over DP, but its fp32 gradient buffer is whole on every rank (allocated
flat for all of the rank's parameters; only the step reads a partition of it).
ZeRO 1-3 through DeepSpeedZeroOptimizer (not BF16_Optimizer) also hold reduction buckets of
``reduce_bucket_size`` elements in the gradient dtype (5e8 in deepspeed_config.py: 1 GB in 16 bit),
two at once for ZeRO-1 under the pipeline engine (see ``reduce_bucket_bytes``).

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (Megatron's eager attention, no sequence parallelism), with e bytes per activation
element (2 for bf16/fp16, 4 for fp32) and dropout masks of k bytes per element only when dropout is
on (k = 1 on GPUs, where torch keeps bool masks; k = e on CPUs, where it keeps them in the input's
dtype). One block, one micro-batch of b sequences of s tokens, hidden h, a heads, TP t:

    full   s b h (4e + 2 k m_h)  +  s b h 12e / t  +  a s^2 b (e + m_a (k + e)) / t
           [LN and QKV/MLP inputs are replicated; Q, K, V, dense input, GeLU in/out are split;
            softmax output (+ its dropout mask and output)]; with e=2 and dropout on this is the
            paper's s b h (34 -> 10 + 24/t + 5 a s / (h t))
    recomputed (--checkpoint-activations): e s b h per block (its input), plus one block's full
           activations while it is recomputed in the backward pass.

With DeepSpeed's 1F1B schedule stage i keeps min(PP - i, m) micro-batches in flight (m = micro-
batches per step), so the first stage holds the most. The first stage adds the embedding output.

The last stage (one micro-batch in flight) adds the final LayerNorm input, the LM-head input and
the logits with their gradient (``loss_bytes``): 2 e s b Vp / t. The vocab-parallel cross-entropy
keeps the logits themselves for backward, no float32 copy (the pipeline engine holds the same
tensor as the stage's output), and its backward writes the gradient, in the logits' dtype, while
they are alive. Its float32 work runs in chunks of ``CROSS_ENTROPY_CHUNK_BYTES``, not counted.

Every stage adds, after its last backward, the flat copy DeepSpeed's gradient all-reduce makes
(``allreduce_flat_bytes``) under ZeRO-0 and BF16_Optimizer, which hold no reduction buckets: the
pipeline engine's ``ReduceGrads`` flattens the rank's gradients into buckets of up to 5e8 elements
(``MEMORY_OPT_ALLREDUCE_SIZE``), even at DP = 1, in the gradients' dtype (fp32 for BF16_Optimizer).
At BLOOM's widths (250,880 rows, h 1024, TP 2, fp32) that is 565 MB on stage 0, the step's peak;
tests/scale/test_real_widths.py finds it in each rank's resident set during ``ReduceGrads``.

Every stage with blocks adds the ALiBi + causal bias (``alibi_bias_bytes``) that attention adds to
its scores, B (a/t) s^2 e per forward, with B = b for packed samples (each row has its own segment
mask) and B = 1 otherwise (it broadcasts over the batch). It is built once per forward and shared
by the stage's blocks; attention kernels keep it for backward. Unpacked, it is one tensor for
every micro-batch (it depends on s alone); packed, one per micro-batch in flight, or one with
recompute (only the latest micro-batch's is kept, for the blocks' recompute).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from megatron_bloom.config.schema import ModelConfig

from .stages import Stage


ZERO3_MAX_LIVE_PARAMETERS = 1e9
"""DeepSpeed's default stage3_max_live_parameters (our deepspeed_config.py keeps the default)."""

CROSS_ENTROPY_CHUNK_BYTES = 4 * 2**24
"""The cross-entropy's float32 chunk (``layers/cross_entropy.CHUNK_ELEMENTS`` logits): 64 MiB."""


class PlanError(ValueError):
    """A layout that cannot run, with the reason and a fix."""


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def state_bytes_per_parameter(precision: str, zero_stage: int, dp: int) -> Tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per parameter on a rank; see the table above."""
    w = element_bytes(precision)
    if precision == "bf16":
        if zero_stage <= 1:
            return w, 2 + 4, 12 / dp
        return (w if zero_stage == 2 else w / dp), 4 / dp, 12 / dp
    master = 4 if (precision != "fp32" or zero_stage >= 1) else 0
    optimizer = (master + 8) / (dp if zero_stage >= 1 else 1)
    gradients = w if zero_stage <= 1 else w / dp
    weights = w if zero_stage <= 2 else w / dp
    return weights, gradients, optimizer


def reduce_bucket_bytes(precision: str, zero_stage: int, reduce_bucket_size: float) -> float:
    """Gradient buckets of DeepSpeedZeroOptimizer (BF16_Optimizer and ZeRO-0 have none).

    ZeRO-1 runs under DeepSpeed's pipeline engine here, whose gradient reduction appends a second
    bucket to the one allocated for backward: two are alive at the peak. ZeRO-2/3 hold one.
    """
    if zero_stage == 0 or (precision == "bf16" and zero_stage <= 1):
        return 0.0
    return (2 if zero_stage == 1 else 1) * reduce_bucket_size * element_bytes(precision)


def block_activation_bytes(cfg: ModelConfig, seq_length: int, micro_batch_size: int, tp: int, precision: str,
                           mask_in_input_dtype: bool = False) -> float:
    """Full (not recomputed) activations one block keeps for one micro-batch; see the module docstring."""
    e = element_bytes(precision)
    s, b, h, a = seq_length, micro_batch_size, cfg.hidden_size, cfg.num_attention_heads
    k = e if mask_in_input_dtype else 1
    mask_h = k if cfg.hidden_dropout > 0 else 0
    mask_a = 1 if cfg.attention_dropout > 0 else 0
    ffn_scale = cfg.ffn_size / (4 * h)  # GeLU in/out are 4e of the 12e when ffn = 4h
    replicated = s * b * h * (4 * e + 2 * mask_h)
    split = s * b * h * (4 * e + 8 * e * ffn_scale) / tp
    attention = a * s * s * b * (e + mask_a * (k + e)) / tp
    return replicated + split + attention


def loss_bytes(cfg: ModelConfig, seq_length: int, micro_batch_size: int, tp: int, precision: str) -> float:
    """The last stage's logits and their gradient, 2 e s b Vp / t (see the module docstring)."""
    e = element_bytes(precision)
    return 2 * e * seq_length * micro_batch_size * cfg.padded_vocab_size(tp) / tp


def alibi_bias_bytes(cfg: ModelConfig, seq_length: int, micro_batch_size: int, tp: int, precision: str,
                     packed_samples: bool = False) -> float:
    """One forward's ALiBi + causal bias ``[b|1, a/t, s, s]``: (b if packed else 1) (a/t) s^2 e."""
    batch = micro_batch_size if packed_samples else 1
    return batch * cfg.num_attention_heads / tp * seq_length**2 * element_bytes(precision)


ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's ``MEMORY_OPT_ALLREDUCE_SIZE``: the pipeline engine's gradient all-reduce bucket."""


def allreduce_flat_bytes(parameters: float, precision: str, zero_stage: int) -> float:
    """The flat bucket ``ReduceGrads`` builds where no ZeRO optimizer reduces: min(N, 5e8) elements of
    the gradient dtype (fp32 accumulation under BF16_Optimizer). ZeRO 1-3 optimizers reduce into
    their own buckets (``reduce_bucket_bytes``)."""
    bf16_optimizer = precision == "bf16" and zero_stage <= 1
    if zero_stage != 0 and not bf16_optimizer:
        return 0.0
    grad_bytes = 4 if precision in ("bf16", "fp32") else 2
    return min(parameters, ALLREDUCE_BUCKET_ELEMENTS) * grad_bytes


@dataclass(frozen=True)
class StageMemory:
    stage: int
    parameters: int
    weights: float
    gradients: float
    optimizer_states: float
    buffers: float
    activations: float
    micro_batches_in_flight: int
    allreduce_flat: float = 0.0
    """The gradient all-reduce's flat copy under ZeRO-0 / BF16_Optimizer (``allreduce_flat_bytes``)."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.buffers + self.activations + self.allreduce_flat


def stage_memory(stage: Stage, cfg: ModelConfig, *, seq_length: int, micro_batch_size: int, micro_batches: int,
                 tp: int, pp: int, dp: int, zero_stage: int, precision: str, recompute: bool,
                 reduce_bucket_size: float, mask_in_input_dtype: bool = False,
                 packed_samples: bool = False) -> StageMemory:
    """One stage's bytes per GPU. ``packed_samples``: micro-batches of packed samples (segment ids,
    as finetuning packs them), whose ALiBi bias has a batch dimension."""
    w, g, o = state_bytes_per_parameter(precision, zero_stage, dp)
    n = stage.parameters
    weights = n * w
    if zero_stage == 3:
        # Gathered parameters stay alive up to DeepSpeed's stage3_max_live_parameters (1e9
        # elements): on a small model that is all of it. Measured lower on small models (prefetch
        # and release interleave), so this errs high.
        weights += min(n, ZERO3_MAX_LIVE_PARAMETERS) * element_bytes(precision)
    e = element_bytes(precision)
    s, b, h = seq_length, micro_batch_size, cfg.hidden_size
    in_flight = min(pp - stage.index, micro_batches)
    full = block_activation_bytes(cfg, s, b, tp, precision, mask_in_input_dtype)
    per_block = e * s * b * h if recompute else full
    acts = in_flight * stage.blocks * per_block
    if recompute and stage.blocks:
        acts += full
    if stage.blocks:
        biases = in_flight if packed_samples and not recompute else 1
        acts += biases * alibi_bias_bytes(cfg, s, b, tp, precision, packed_samples)
    if stage.is_first:
        acts += in_flight * e * s * b * h  # embedding output = word_embeddings_layernorm input
    if stage.is_last:
        acts += 2 * e * s * b * h  # ln_f input and LM-head input
        acts += loss_bytes(cfg, s, b, tp, precision)
    return StageMemory(stage.index, n, weights, n * g, n * o, reduce_bucket_bytes(precision, zero_stage, reduce_bucket_size),
                       acts, in_flight, allreduce_flat_bytes(n, precision, zero_stage))
