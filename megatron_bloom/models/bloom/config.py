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
    """Rows of the output softmax and the embedding: a checkpoint's embedding rows, or, when neither this nor the YAML sets it and --tokenizer-name-or-path is given, the tokenizer's size padded as Megatron-DeepSpeed pads it (to pad_vocab_size_to, else to a multiple of make_vocab_size_divisible_by x TP)."""
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this times tensor_model_parallel_size (Megatron)."""
    pad_vocab_size_to: Optional[int] = None
    """Megatron-DeepSpeed's --pad-vocab-size-to: the tokenizer's vocabulary is padded to exactly this many rows (BLOOM: 250880 for 250,680 tokens); must be a multiple of make_vocab_size_divisible_by and of TP."""
    seq_length: int = 128
    """Training sequence length in tokens."""
    max_position_embeddings: Optional[int] = None
    """Megatron-DeepSpeed's position-table size; ALiBi has no table, so it is only checked: at least seq_length."""
    position_embedding_type: str = "alibi"
    """Megatron-DeepSpeed's --position-embedding-type; BLOOM's 'alibi' is the only one built here ('absolute' and 'rotary' are refused)."""
    embed_layernorm: bool = True
    """LayerNorm after the word embedding (Megatron-DeepSpeed's --embed-layernorm, which every BLOOM has); --no-embed-layernorm is refused."""
    abort_on_unmet_fused_kernel_constraints: bool = False
    """Megatron-DeepSpeed's switch to abort when its fused softmax kernel cannot run; accepted and always met: no custom fused kernel is used (torch's scaled_dot_product_attention or the eager path)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm (--layernorm-epsilon, Megatron-DeepSpeed's spelling, is the same flag)."""
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
        pad_to = self.pad_vocab_size_to
        if pad_to is not None and pad_to >= self.vocab_size and pad_to % tensor_model_parallel_size == 0:
            return pad_to  # Megatron-DeepSpeed's --pad-vocab-size-to: exactly this many rows at any TP
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

