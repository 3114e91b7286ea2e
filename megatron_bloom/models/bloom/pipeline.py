"""BLOOM as a list of layer specs: cut into stages by DeepSpeed's PipelineModule, or run whole.

    idx 0        EmbeddingPipe          (tied "embed": word embeddings, vocab-parallel under TP)
    idx 1        EmbedLayerNormPipe     word_embeddings_layernorm
    idx 2..L+1   TransformerBlockPipe   h.0 .. h.{L-1}
    idx L+2      FinalLayerNormPipe     ln_f
    idx L+3      EmbeddingPipe again    (tied: the LM head on the same matrix, last stage)

The partition method ``type:transformer|embedding`` counts the two EmbeddingPipe specs as layers,
as BLOOM did, so the first and last stages carry fewer blocks.

Every spec is built right after seeding the RNGs with ``seed + idx`` (DeepSpeed's ``seed_layers``),
so a layer's initial weights depend only on its index: every (TP, PP, DP) layout starts from the
same model, and ``training/deepspeed_glue.BloomSequential`` (one stage, any ZeRO stage) builds the
same one too. Under TP each layer is built whole and then sharded (Megatron's CPU-initialisation
scheme). The loss and the DeepSpeed wrappers live in ``training/`` (losses.py, deepspeed_glue.py).

Between stages the activation is a tensor ``[b, s, h]``, or a tuple ``(hidden, segment_ids)`` for
packed samples; each block rebuilds its ALiBi/causal/segment mask from that (cheap, and avoids
sending a [b, np, s, s] mask between stages).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from megatron_bloom.layers import RNGStatesTracker, VocabParallelEmbedding
from megatron_bloom.layers.mappings import Group, group_size
from megatron_bloom.layers.random import recompute, trackers_in
from megatron_bloom.models.bloom.alibi import make_alibi_mask
from megatron_bloom.models.bloom.config import ModelConfig
from megatron_bloom.models.bloom.init import init_block_, init_embedding_, init_layernorm_
from megatron_bloom.models.bloom.model import BloomBlock, TiedLMHead
from megatron_bloom.models.bloom.parallelize import ParallelLMHead, shard_block_

Activation = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _split(inputs: Activation) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(inputs, (tuple, list)):
        return inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return inputs, None


def _join(x: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> Activation:
    return x if segment_ids is None else (x, segment_ids)


class EmbeddingPipe(nn.Module):
    """Word embeddings; the same module (tied) also serves as the LM head on the last stage."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp_group: Group = None):
        super().__init__()
        full = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        init_embedding_(full, cfg)
        if group_size(tp_group) > 1:
            self.word_embeddings = VocabParallelEmbedding(full, tp_group)
            head = ParallelLMHead(self.word_embeddings, cfg.vocab_size, tp_group)
        else:
            self.word_embeddings = full
            head = TiedLMHead(full, cfg.vocab_size)
        # Not registered as a submodule: it owns no parameter and must not add state-dict keys.
        self.__dict__["lm_head"] = head

    def forward(self, inputs: Activation) -> Activation:
        input_ids, segment_ids = _split(inputs)
        return _join(self.word_embeddings(input_ids), segment_ids)  # [b, s, h]


def lm_head_forward(embedding: EmbeddingPipe, inputs: Activation) -> torch.Tensor:
    """Last stage: final hidden states -> logits [b, s, v/tp] on the tied embedding matrix."""
    hidden, _ = _split(inputs)
    return embedding.lm_head(hidden)


class EmbedLayerNormPipe(nn.Module):
    """The embedding's LayerNorm, then hidden dropout on the embedding output (Megatron-DeepSpeed's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        init_layernorm_(self.word_embeddings_layernorm)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, inputs: Activation) -> Activation:
        hidden, segment_ids = _split(inputs)
        return _join(self.embedding_dropout(self.word_embeddings_layernorm(hidden)), segment_ids)


class TransformerBlockPipe(BloomBlock):
    """One BLOOM block taking and returning a pipeline activation."""

    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group: Group = None,
                 tracker: Optional[RNGStatesTracker] = None):
        super().__init__(cfg)
        self.layer_number = layer_number
        self.recompute = cfg.checkpoint_activations
        init_block_(self, cfg)
        shard_block_(self, cfg, tp_group, tracker)
        self.rng_trackers = trackers_in(self)  # fixed once sharded: not searched for in every forward

    def _block(self, hidden: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        mask = make_alibi_mask(hidden.shape[1], 0, None, segment_ids, hidden.device)
        return super().forward(hidden, mask)[0]

    def forward(self, inputs: Activation) -> Activation:
        hidden, segment_ids = _split(inputs)
        if self.recompute and torch.is_grad_enabled():
            out = recompute(self._block, hidden, segment_ids, trackers=self.rng_trackers)
        else:
            out = self._block(hidden, segment_ids)
        return _join(out, segment_ids)


class FinalLayerNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        init_layernorm_(self.ln_f)

    def forward(self, inputs: Activation) -> Activation:
        hidden, segment_ids = _split(inputs)
        return _join(self.ln_f(hidden), segment_ids)


def bloom_layer_specs(cfg: ModelConfig, padded_vocab_size: int, tp_group: Group = None,
                      tracker: Optional[RNGStatesTracker] = None) -> List[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = lambda **kw: TiedLayerSpec(  # noqa: E731
        "embed", EmbeddingPipe, cfg, padded_vocab_size, tp_group, tied_weight_attr="word_embeddings.weight", **kw
    )
    return [
        embed(),
        LayerSpec(EmbedLayerNormPipe, cfg),
        *[LayerSpec(TransformerBlockPipe, cfg, i, tp_group, tracker) for i in range(cfg.num_layers)],
        LayerSpec(FinalLayerNormPipe, cfg),
        embed(forward_fn=lm_head_forward),
    ]
