"""BLOOM's architecture configuration: the run configuration's ``model`` section.

Field docstrings are read back by ``config.docs`` for ``--help`` and docs/configuration.md.
Imports nothing heavy: it is loaded with the configuration, before torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    """Architecture of the BLOOM model."""

    model_name: Optional[str] = None
    """Named architecture (bloom-560m, bloom-1b1, bloom-1b7, bloom-3b, bloom-7b1, bloom-176b, tiny); its values fill unset fields."""
    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 64
    """Hidden size h."""
    num_attention_heads: int = 4
    """Number of attention heads."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner size; None means 4 * hidden_size as in BLOOM."""
    vocab_size: int = 256
    """Number of real tokens (the tokenizer's vocabulary size or a checkpoint's embedding rows)."""
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this times tensor_model_parallel_size (Megatron)."""
    seq_length: int = 128
    """Training sequence length in tokens."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_method_std: float = 0.0048
    """Standard deviation of the normal weight init (BLOOM-176B used 0.0048)."""
    hidden_dropout: float = 0.1
    """Dropout on the embedding output and on the attention and MLP outputs before the residual add (Megatron's default, which BLOOM trained with)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (Megatron's default, which BLOOM trained with)."""
    apply_residual_connection_post_layernorm: bool = False
    """Residual taken after the LayerNorm instead of before it (False in every released BLOOM)."""
    checkpoint_activations: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    attention_impl: str = "sdpa"
    """Attention kernel: 'sdpa' (torch scaled_dot_product_attention with an ALiBi bias) or 'eager' (baddbmm + softmax reference)."""

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Rows of the embedding: vocab_size rounded up to make_vocab_size_divisible_by * TP.

        BLOOM's tokenizer has 250,680 tokens and its checkpoints 250,880 rows (a multiple of 128 * 4
        already); rows added here exist only so every TP rank holds the same number of rows, and
        are masked out of every softmax and loss.
        """
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple
