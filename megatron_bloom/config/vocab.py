"""Megatron-DeepSpeed's vocabulary padding (its ``_vocab_size_with_padding``), for any model family."""
from __future__ import annotations

from typing import Optional


def megatron_padded_vocab_size(tokens: int, tensor_model_parallel_size: int, make_vocab_size_divisible_by: int = 128,
                               pad_vocab_size_to: Optional[int] = None) -> int:
    """Embedding rows Megatron-DeepSpeed gives a tokenizer of ``tokens`` tokens (its ``_vocab_size_with_padding``).

    ``pad_vocab_size_to`` when given (it must be at least ``tokens``; ``validate_config`` checks its
    divisibility), else ``tokens`` rounded up to a multiple of ``make_vocab_size_divisible_by x TP``.
    Every row takes part in the softmax, as in Megatron-DeepSpeed.
    """
    if pad_vocab_size_to is not None:
        return max(pad_vocab_size_to, tokens)
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-tokens // multiple) * multiple
