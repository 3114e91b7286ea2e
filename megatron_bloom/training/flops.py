"""Model FLOPs and TFLOPs per GPU with Megatron's formula (the one BLOOM-176B's logs used)."""
from __future__ import annotations

from typing import Callable


def flops_per_iteration(
    batch_size: int, seq_length: int, num_layers: int, hidden_size: int, vocab_size: int, recompute: bool
) -> float:
    """24 * c * B * s * l * h^2 * (1 + s/(6h) + V/(16 l h)), c = 4 with activation recompute else 3.

    c counts forward (1) + backward (2) + recomputed forward (1); 24 B s h^2 per layer is the
    dense matmuls, s/(6h) the attention scores, V/(16 l h) the LM head.
    """
    c = 4 if recompute else 3
    b, s, l, h, v = batch_size, seq_length, num_layers, hidden_size, vocab_size
    return 24.0 * c * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))


def tflops_per_gpu(flops: float, seconds: float, world_size: int) -> float:
    return flops / (seconds * world_size * 1e12)


def model_flops_per_iteration(cfg) -> Callable[[int], float]:
    """``global_batch_size -> flops_per_iteration`` for ``cfg``'s model (padded vocabulary, recompute)."""
    m = cfg.model
    padded_vocab = m.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)

    def flops(global_batch_size: int) -> float:
        return flops_per_iteration(global_batch_size, m.seq_length, m.num_layers, m.hidden_size, padded_vocab,
                                   m.checkpoint_activations)

    return flops
