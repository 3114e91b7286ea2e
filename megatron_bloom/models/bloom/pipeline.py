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
same model, and ``BloomSequential`` (one stage, any ZeRO stage) builds the same one too. Under TP
each layer is built whole and then sharded (Megatron's CPU-initialisation scheme).

Between stages the activation is a tensor ``[b, s, h]``, or a tuple ``(hidden, segment_ids)`` for
packed samples; each block rebuilds its ALiBi/causal/segment mask from that (cheap, and avoids
sending a [b, np, s, s] mask between stages).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.layers import RNGStatesTracker, VocabParallelEmbedding, vocab_parallel_cross_entropy
from megatron_bloom.layers.duplicated import is_tp_duplicated
from megatron_bloom.layers.mappings import Group, group_size
from megatron_bloom.layers.random import recompute, trackers_in
from megatron_bloom.models.bloom.alibi import make_alibi_mask
from megatron_bloom.models.bloom.init import init_block_, init_embedding_, init_layernorm_, seed_layer
from megatron_bloom.models.bloom.model import BloomBlock, TiedLMHead
from megatron_bloom.models.bloom.parallelize import ParallelLMHead, parallel_lm_loss, shard_block_

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


class LMLoss:
    """Pipeline loss (vocab-parallel), in one of two forms chosen by the labels tuple:

    * ``(labels, loss_mask)`` (pretraining): token mean over the micro-batch's masked tokens.
    * ``(labels, loss_weights, scale, *group_ids)`` (finetuning): ``sum(loss * loss_weights) *
      scale[0]``. The data side picks weights and scale so that DeepSpeed's mean over micro-batches
      and DP ranks of these values is the mean over the GLOBAL batch (see training/finetune.py).
      When ``meter`` is set, it also receives the per-token losses with the weights and the
      ``group_ids`` tensors (e.g. language and task of each token) for per-group reporting.
    """

    def __init__(self, tp_group: Group, vocab_start: int):
        self.tp_group = tp_group
        self.vocab_start = vocab_start
        self.meter = None

    def __call__(self, logits: torch.Tensor, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        target, loss_mask = labels[0], (labels[1] if len(labels) > 1 else None)
        if len(labels) <= 2:
            return parallel_lm_loss(logits, target, loss_mask, self.vocab_start, self.tp_group)
        losses = vocab_parallel_cross_entropy(logits, target, self.vocab_start, self.tp_group)  # [b, s] fp32
        weights = loss_mask.to(losses.dtype)
        if self.meter is not None:
            self.meter.add(losses.detach(), weights, labels[3:])
        return (losses * weights).sum() * labels[2].reshape(-1)[0].to(losses.dtype)


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


class BloomSequential(nn.Module):
    """All layer specs on one stage, built like PipelineModule builds them; forward returns the loss.

    Used when PP == 1, where DeepSpeed's plain engine (ZeRO 0-3) replaces the pipeline engine.
    """

    def __init__(self, specs: List[Any], loss_fn: LMLoss, base_seed: int):
        super().__init__()
        from deepspeed.pipe import TiedLayerSpec

        self.loss_fn = loss_fn
        self.layers = nn.ModuleList()
        self.funcs: List[Any] = []
        tied = {}
        for idx, spec in enumerate(specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    seed_layer(base_seed + idx)
                    tied[spec.key] = spec.build()
                    self.layers.append(tied[spec.key])
                module = tied[spec.key]
                self.funcs.append(module if spec.forward_fn is None else (lambda x, m=module, f=spec.forward_fn: f(m, x)))
            else:
                seed_layer(base_seed + idx)
                module = spec.build()
                self.layers.append(module)
                self.funcs.append(module)

    def logits(self, inputs: Activation) -> torch.Tensor:
        x = inputs
        for f in self.funcs:
            x = f(x)
        return x

    def forward(self, inputs: Activation, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.logits(inputs), labels)


def mark_grad_norm_owners(module: nn.Module, tp_rank: int) -> None:
    """Make every parameter count exactly once in DeepSpeed's global gradient norm.

    DeepSpeed counts a parameter when ``is_model_parallel_parameter(p)`` or when the rank is
    model-parallel rank 0, and skips ``ds_pipe_replicated`` ones in ZeRO. Left alone, the pipeline
    engine's ZeRO-0 path counts replicated parameters (LayerNorms, biases) of stages > 0 nowhere,
    and a tied embedding's second copy twice under TP. Here: a TP-sharded parameter is counted on
    its rank; a TP-replicated one on TP rank 0 only; a tied copy that is not the owner, never.
    """
    for p in module.parameters():
        sharded = not is_tp_duplicated(p)
        p.tp_sharded = sharded  # keeps "is this a shard" when the flags below say "not counted here"
        replicated_copy = bool(getattr(p, "ds_pipe_replicated", False))
        counted = not replicated_copy and (sharded or tp_rank == 0)
        p.model_parallel = counted
        p.tensor_model_parallel = counted
