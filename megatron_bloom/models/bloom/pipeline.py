"""BLOOM as a list of layer specs: cut into stages by DeepSpeed's PipelineModule, or run whole.

The list is Megatron-DeepSpeed's ``GPTModelPipe`` for BLOOM, index for index, so that checkpoints
(one ``layer_XX-model_YY-model_states.pt`` per layer with weights and TP rank) have its file names
and keys and its tools read ours (``sharding.py`` holds the numbering)::

    idx 0        _to_float16                   no weights: Megatron-DeepSpeed casts float inputs to fp16/bf16
    idx 1        EmbeddingPipe                 tied "embed": word_embeddings (vocab-parallel under TP) and
                                               its LayerNorm word_embeddings.norm, then embedding dropout
    idx 2        <lambda>                      no weights: Megatron-DeepSpeed transposes to [s, b, h] here
    idx 3..L+2   ParallelTransformerLayerPipe  h.0 .. h.{L-1}
    idx L+3      undo                          no weights: the transpose back
    idx L+4      MixedFusedLayerNorm           the final LayerNorm (keys ``weight`` / ``bias``)
    idx L+5      EmbeddingPipe again           tied: the LM head on the same matrix
    idx L+6      float16_to_fp32               no weights; only in fp16/bf16 runs (``half_precision``)

The names are Megatron-DeepSpeed's too: DeepSpeed's ``type:REGEX`` partitioning matches the regex
against each spec's class or function name, so with the same names every regex cuts the same
stages (``planning/stages.py`` computes the cut; tests/parallel/test_pipeline_partition.py checks
it against a transcription of GPTModelPipe). ``type:transformer|embedding`` counts the two
EmbeddingPipe specs as layers, as BLOOM did: L blocks make up to L + 2 stages, the first and last
of which may hold only an embedding (BLOOMZ-176B: 70 blocks on 72 stages).

Our blocks work batch-first on integer ids and our loss takes logits of any float type, so the
four weightless steps pass their input through; they are kept for the numbering and for DeepSpeed's
``uniform`` partitioning, which counts them.

Every spec is built right after seeding the RNGs with ``seed + idx`` (DeepSpeed's ``seed_layers``),
so a layer's initial weights depend only on its index: every (TP, PP, DP) layout starts from the
same model, and ``training/deepspeed_glue.BloomSequential`` (one stage, any ZeRO stage) builds the
same one too. Under TP each layer is built whole and then sharded (Megatron's CPU-initialisation
scheme). The loss and the DeepSpeed wrappers live in ``training/`` (losses.py, deepspeed_glue.py).

Between stages the activation is a tensor ``[b, s, h]``, or a tuple ``(hidden, segment_ids)`` for
packed samples, never the [b, np, s, s] ALiBi/causal/segment bias. The blocks of a stage share one
``AlibiMaskCache`` (``bloom_layer_specs`` hands the same one to each), so the first block of a
forward builds the mask and the bias and the stage's other blocks, recomputed or not, use them.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from megatron_bloom.layers import RNGStatesTracker, VocabParallelEmbedding
from megatron_bloom.layers.mappings import Group, group_size
from megatron_bloom.layers.random import recompute, trackers_in
from megatron_bloom.models.bloom.alibi import AlibiMaskCache
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
    """Word embeddings, their LayerNorm and the embedding dropout (Megatron-DeepSpeed's EmbeddingPipe
    with --embed-layernorm); the same module (tied) also serves as the LM head on the last stage.

    The LayerNorm sits inside ``word_embeddings`` (key ``word_embeddings.norm.*``), as in
    Megatron-DeepSpeed. ``with_norm=False`` builds the last stage's tied copy, which only lends its
    matrix to the LM head: Megatron-DeepSpeed gives that copy no LayerNorm either.
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp_group: Group = None, with_norm: bool = True):
        super().__init__()
        full = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        init_embedding_(full, cfg)
        if group_size(tp_group) > 1:
            self.word_embeddings = VocabParallelEmbedding(full, tp_group)
            head = ParallelLMHead(self.word_embeddings, cfg.vocab_size, tp_group)
        else:
            self.word_embeddings = full
            head = TiedLMHead(full, cfg.vocab_size)
        if with_norm:
            self.word_embeddings.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
            init_layernorm_(self.word_embeddings.norm)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        # Not registered as a submodule: it owns no parameter and must not add state-dict keys.
        self.__dict__["lm_head"] = head

    def forward(self, inputs: Activation) -> Activation:
        input_ids, segment_ids = _split(inputs)
        hidden = self.word_embeddings.norm(self.word_embeddings(input_ids))  # [b, s, h]
        return _join(self.embedding_dropout(hidden), segment_ids)


def lm_head_forward(embedding: EmbeddingPipe, inputs: Activation) -> torch.Tensor:
    """Last stage: final hidden states -> logits [b, s, v/tp] on the tied embedding matrix."""
    hidden, _ = _split(inputs)
    return embedding.lm_head(hidden)


def _to_float16(inputs: Activation) -> Activation:
    """Layer 0. Megatron-DeepSpeed casts float inputs to the training dtype here; ours are token ids."""
    return inputs


# Layer 2. Megatron-DeepSpeed's blocks take [s, b, h] and a lambda transposes to it; ours take
# [b, s, h], so nothing moves. A lambda too, so that a type: regex sees the same name, "<lambda>".
to_sequence_first = lambda inputs: inputs  # noqa: E731


def undo(inputs: Activation) -> Activation:
    """Layer L+3, Megatron-DeepSpeed's transpose back to [b, s, h] (ours never left it)."""
    return inputs


def float16_to_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Layer L+6 in fp16/bf16 runs. Megatron-DeepSpeed upcasts the logits here; our loss upcasts them."""
    return logits


class ParallelTransformerLayerPipe(BloomBlock):
    """One BLOOM block taking and returning a pipeline activation.

    ``masks`` is the stage's shared ``AlibiMaskCache``; a block built alone gets its own.
    """

    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group: Group = None,
                 tracker: Optional[RNGStatesTracker] = None, masks: Optional[AlibiMaskCache] = None):
        super().__init__(cfg)
        self.layer_number = layer_number
        self.recompute = cfg.checkpoint_activations
        init_block_(self, cfg)
        shard_block_(self, cfg, tp_group, tracker)
        self.rng_trackers = trackers_in(self)  # fixed once sharded: not searched for in every forward
        self.masks = masks if masks is not None else AlibiMaskCache()

    def _block(self, hidden: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        mask = self.masks.get(hidden.shape[1], segment_ids, hidden.device)
        return super().forward(hidden, mask)[0]

    def forward(self, inputs: Activation) -> Activation:
        hidden, segment_ids = _split(inputs)
        if self.recompute and torch.is_grad_enabled():
            out = recompute(self._block, hidden, segment_ids, trackers=self.rng_trackers)
        else:
            out = self._block(hidden, segment_ids)
        return _join(out, segment_ids)


class MixedFusedLayerNorm(nn.LayerNorm):
    """The final LayerNorm as the pipeline layer itself, so its keys are ``weight`` and ``bias``.

    A plain LayerNorm under the class name of Megatron-DeepSpeed's final LayerNorm (see the module
    docstring: ``type:`` regexes match class names).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        init_layernorm_(self)

    def forward(self, inputs: Activation) -> Activation:
        hidden, segment_ids = _split(inputs)
        return _join(super().forward(hidden), segment_ids)


def bloom_layer_specs(cfg: ModelConfig, padded_vocab_size: int, tp_group: Group = None,
                      tracker: Optional[RNGStatesTracker] = None, half_precision: bool = False) -> List[Any]:
    """The layer list of the module docstring; ``half_precision`` (fp16 or bf16) appends ``float16_to_fp32``."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = lambda **kw: TiedLayerSpec(  # noqa: E731
        "embed", EmbeddingPipe, cfg, padded_vocab_size, tp_group, tied_weight_attr="word_embeddings.weight", **kw
    )
    # DeepSpeed builds a tied module from the first of its specs on a stage: the embedding's
    # (with the LayerNorm) on the first stage, the LM head's (without) on a later last stage.
    # The blocks a process builds (its stage's) share one mask cache.
    masks = AlibiMaskCache()
    specs = [
        _to_float16,
        embed(with_norm=True),
        to_sequence_first,
        *[LayerSpec(ParallelTransformerLayerPipe, cfg, i, tp_group, tracker, masks) for i in range(cfg.num_layers)],
        undo,
        LayerSpec(MixedFusedLayerNorm, cfg),
        embed(with_norm=False, forward_fn=lm_head_forward),
    ]
    return specs + [float16_to_fp32] if half_precision else specs
