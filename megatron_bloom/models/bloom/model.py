"""Single-device BLOOM, laid out so tensor and pipeline parallelism can be added from outside.

Module and parameter names are transformers' (``transformer.h.3.self_attention.query_key_value``),
so a transformers state dict loads key for key (the embedding may have extra padded rows).

Nothing here imports ``torch.distributed``. The parallel forms are made by replacing modules:

* ``query_key_value`` / ``dense_h_to_4h`` -> column-parallel linears, ``dense`` / ``dense_4h_to_h``
  -> row-parallel linears. Attention reads its local head count from the ``query_key_value``
  output at run time and its ALiBi slopes from its own ``alibi_slopes`` buffer
  (``BloomAttention.set_head_range``), never from the config.
* ``transformer.word_embeddings`` -> a vocab-parallel embedding, and ``lm_head`` -> a
  ``TiedLMHead`` on it with its own ``vocab_start_index``.
* Pipeline stages use the pieces one by one: ``BloomModel.embed``, ``make_alibi_mask``, each
  ``BloomBlock``, then ``BloomForCausalLM.head`` (``ln_f`` + ``lm_head``).

One ``AlibiMask`` per forward is passed to every block (and to the recomputed ones): its dense
ALiBi bias is built by the first layer and shared by all (see ``alibi.py``).

Notation in shape comments: b batch, s / sq / sk sequence (query / key), h hidden, np local
attention heads, hn head dim, v (padded, local) vocabulary rows.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_bloom.layers.random import dropout_rng, recompute, trackers_in
from megatron_bloom.models.bloom.alibi import AlibiMask, alibi_slopes, make_alibi_mask
from megatron_bloom.models.bloom.config import ModelConfig
from megatron_bloom.models.bloom.init import init_block_, init_embedding_, init_layernorm_

LayerKV = Tuple[Tensor, Tensor]
"""One layer's cached (key, value)."""
KVCache = List[LayerKV]
"""Per layer (key, value), each ``[b, np, sk, hn]``."""


class BloomAttention(nn.Module):
    """Self-attention with ALiBi; fused QKV stored per head as ``[np, 3, hn]`` like BLOOM.

    Attention-probability dropout draws inside ``rng_tracker.fork()`` when a tracker is set (the
    training engine sets one on every rank, so each TP rank and stage has its own masks); without
    one, from the default generator.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size={cfg.hidden_size} is not divisible by "
                f"num_attention_heads={cfg.num_attention_heads}"
            )
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.total_heads = cfg.num_attention_heads
        self.attention_impl = cfg.attention_impl
        if self.attention_impl not in ("sdpa", "eager"):
            raise ValueError(f"attention_impl must be 'sdpa' or 'eager', got {cfg.attention_impl!r}")
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_dropout = nn.Dropout(cfg.attention_dropout)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)
        self.rng_tracker = None
        self.set_head_range(0, cfg.num_attention_heads)

    def set_head_range(self, start: int, count: int) -> None:
        """Make this module compute heads ``[start, start + count)`` of the full model.

        Only the ALiBi slopes depend on it; tensor parallelism calls this after slicing
        ``query_key_value``. The slopes are a non-persistent buffer: derived, never checkpointed.
        """
        if start < 0 or count < 1 or start + count > self.total_heads:
            raise ValueError(f"head range [{start}, {start + count}) outside 0..{self.total_heads}")
        self.head_start = start
        device = None
        if "alibi_slopes" in self._buffers and self._buffers["alibi_slopes"] is not None:
            device = self._buffers["alibi_slopes"].device
        slopes = alibi_slopes(self.total_heads, device=device)[start : start + count]
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def reset_alibi_slopes(self) -> None:
        """Recompute the slopes of the current head range (after ``to_empty`` from meta)."""
        self.set_head_range(self.head_start, self.alibi_slopes.shape[0])

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the slopes; transformers keeps them in float32 and rounds
        # only slope * position, so keep float32 here and follow the device only.
        slopes = self._buffers["alibi_slopes"]
        out = super()._apply(fn, recurse)
        moved = self._buffers["alibi_slopes"]
        if moved.dtype != slopes.dtype:
            self._buffers["alibi_slopes"] = slopes.to(moved.device)
        return out

    def _dropout_p(self) -> float:
        return self.attention_dropout.p if self.training else 0.0

    def _dropout_rng(self):
        """Where attention dropout draws: the tracker's fork when something is dropped, else nowhere."""
        return dropout_rng(self.rng_tracker if self._dropout_p() > 0 else None)

    def forward(self, hidden_states: Tensor, mask: AlibiMask, layer_past: Optional[LayerKV] = None,
                use_cache: bool = False) -> Tuple[Tensor, Optional[LayerKV]]:
        b, sq, _ = hidden_states.shape
        hn = self.head_dim
        mixed = self.query_key_value(hidden_states)  # [b, sq, np*3*hn]
        # Local heads come from the (possibly column-parallel) projection, not from the config.
        np_local = mixed.shape[-1] // (3 * hn)
        if np_local != self.alibi_slopes.shape[0]:
            raise RuntimeError(
                f"query_key_value gives {np_local} heads but alibi_slopes has "
                f"{self.alibi_slopes.shape[0]}; call set_head_range after resharding"
            )
        mixed = mixed.view(b, sq, np_local, 3, hn)  # [b, sq, np, 3, hn]
        query, key, value = (t.transpose(1, 2) for t in mixed.unbind(3))  # 3 x [b, np, sq, hn]

        if layer_past is not None:
            key = torch.cat([layer_past[0], key], dim=2)  # [b, np, sk, hn]
            value = torch.cat([layer_past[1], value], dim=2)  # [b, np, sk, hn]
        present = (key, value) if use_cache else None

        # Built by the first layer and shared by the others (the same tensor, kept once for backward).
        heads = (self.head_start, np_local, self.total_heads)
        bias = mask.bias(self.alibi_slopes, query.dtype, heads)  # [b|1, np, sq, sk]
        if self.attention_impl == "sdpa":
            # The kernel drops probabilities with the device's default generator: drawn inside the
            # tracker's fork, the masks come from this rank's tensor-parallel stream.
            with self._dropout_rng():
                context = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=bias, dropout_p=self._dropout_p(), scale=1.0 / math.sqrt(hn)
                )  # [b, np, sq, hn]
        else:
            context = self._eager_attention(query, key, value, bias)  # [b, np, sq, hn]

        context = context.transpose(1, 2).reshape(b, sq, np_local * hn)  # [b, sq, np*hn]
        output = self.hidden_dropout(self.dense(context))  # [b, sq, h]
        return output, present

    def _eager_attention(self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor) -> Tensor:
        """transformers' reference: baddbmm(bias, q, k^T) then softmax in float32."""
        b, np_local, sq, hn = query.shape
        sk = key.shape[2]
        bias = bias.expand(b, np_local, sq, sk).reshape(b * np_local, sq, sk)  # [b*np, sq, sk]
        q = query.reshape(b * np_local, sq, hn)  # [b*np, sq, hn]
        k_t = key.reshape(b * np_local, sk, hn).transpose(1, 2)  # [b*np, hn, sk]
        scores = torch.baddbmm(bias, q, k_t, beta=1.0, alpha=1.0 / math.sqrt(hn))  # [b*np, sq, sk]
        if scores.dtype == torch.float16:
            # finfo.min plus a negative score overflows float16 to -inf; a fully masked row
            # (left-padding query) would then be all -inf and softmax NaN.
            scores = scores.clamp_min(torch.finfo(torch.float16).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [b*np, sq, sk]
        with self._dropout_rng():
            probs = self.attention_dropout(probs.view(b, np_local, sq, sk))  # [b, np, sq, sk]
        v = value.reshape(b * np_local, sk, hn)  # [b*np, sk, hn]
        context = torch.bmm(probs.view(b * np_local, sq, sk), v)  # [b*np, sq, hn]
        return context.view(b, np_local, sq, hn)  # [b, np, sq, hn]


class BloomMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, hidden_states: Tensor) -> Tensor:
        # BLOOM's tanh GeLU; torch's fused kernel uses sqrt(2/pi) where BLOOM wrote 0.79788456,
        # a 1e-9 relative difference, far below float32 rounding of the matmuls around it.
        x = F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh")  # [b, s, ffn]
        return self.hidden_dropout(self.dense_4h_to_h(x))  # [b, s, h]


class BloomBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = BloomMLP(cfg)
        self.apply_residual_connection_post_layernorm = cfg.apply_residual_connection_post_layernorm

    def forward(self, hidden_states: Tensor, mask: AlibiMask, layer_past: Optional[LayerKV] = None,
                use_cache: bool = False) -> Tuple[Tensor, Optional[LayerKV]]:
        """``[b, s, h]`` -> ``([b, s, h], present (k, v) or None)``."""
        post_ln = self.apply_residual_connection_post_layernorm
        ln_out = self.input_layernorm(hidden_states)
        residual = ln_out if post_ln else hidden_states
        attn_out, present = self.self_attention(ln_out, mask, layer_past, use_cache)
        hidden_states = residual + attn_out
        ln_out = self.post_attention_layernorm(hidden_states)
        residual = ln_out if post_ln else hidden_states
        return residual + self.mlp(ln_out), present


class BloomModel(nn.Module):
    """Embedding + its LayerNorm, the blocks, the final LayerNorm (transformers' ``transformer``).

    In training, hidden dropout also applies to the embedding output after its LayerNorm, as
    Megatron-DeepSpeed trained BLOOM (transformers' BLOOM, an inference model, has none there).
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.h = nn.ModuleList([BloomBlock(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.checkpoint_activations = cfg.checkpoint_activations

    def embed(self, input_ids: Tensor) -> Tensor:
        """Pipeline stage 0: ``[b, s]`` token ids -> ``[b, s, h]``."""
        return self.embedding_dropout(self.word_embeddings_layernorm(self.word_embeddings(input_ids)))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False) -> Tuple[Tensor, Optional[KVCache]]:
        """``[b, s]`` ids -> final-LayerNorm hidden states ``[b, s, h]`` and the new cache."""
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        mask = make_alibi_mask(
            input_ids.shape[1], past_length, attention_mask, segment_ids, input_ids.device
        )
        hidden_states = self.embed(input_ids)  # [b, s, h]
        presents: Optional[KVCache] = [] if use_cache else None
        recompute_blocks = self.checkpoint_activations and torch.is_grad_enabled() and not use_cache
        for i, block in enumerate(self.h):
            layer_past = past_key_values[i] if past_key_values else None
            if recompute_blocks:
                hidden_states, present = recompute(
                    block, hidden_states, mask, layer_past, False, trackers=trackers_in(block)
                )
            else:
                hidden_states, present = block(hidden_states, mask, layer_past, use_cache)
            if presents is not None:
                presents.append(present)
        return self.ln_f(hidden_states), presents


class TiedLMHead(nn.Module):
    """Logits from the word-embedding matrix, with padded vocabulary rows masked out.

    Holds a plain (unregistered) reference to the embedding module, so it owns no parameter and
    the tie cannot break when the model is moved or re-materialised. ``state_dict`` still lists
    ``lm_head.weight`` (the same tensor) so keys match transformers; loading ignores that key.

    Rows with global index >= ``vocab_size`` exist only for padding. Their logits are set to
    ``finfo.min``: exp() of them is 0, so they never change a softmax, a loss or a sample, and
    their gradient is 0. A vocab-parallel copy sets ``vocab_start_index`` to its first row.
    """

    def __init__(self, embedding: nn.Module, vocab_size: int, vocab_start_index: int = 0):
        super().__init__()
        self.tie(embedding)
        self.vocab_size = vocab_size
        self.vocab_start_index = vocab_start_index
        self._register_state_dict_hook(TiedLMHead._add_weight_key)
        self._register_load_state_dict_pre_hook(TiedLMHead._drop_weight_key)

    def tie(self, embedding: nn.Module) -> None:
        """Point the head at (a new) embedding module, e.g. after it was replaced."""
        # Bypass nn.Module.__setattr__ so the embedding is not registered a second time.
        self.__dict__["embedding"] = embedding

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    @staticmethod
    def _add_weight_key(module, state_dict, prefix, local_metadata):
        # Same storage as transformer.word_embeddings.weight, as for a tied transformers model.
        state_dict[prefix + "weight"] = module.weight.detach()

    @staticmethod
    def _drop_weight_key(state_dict, prefix, *args):
        state_dict.pop(prefix + "weight", None)

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = F.linear(hidden_states, self.weight)  # [b, s, v]
        real = self.vocab_size - self.vocab_start_index  # real rows held by this copy
        if real < logits.shape[-1]:
            start = max(real, 0)
            # In-place on a slice of the output: F.linear's backward does not need its output,
            # and this avoids copying a [b, s, v] tensor with a 250k vocabulary.
            logits[..., start:] = torch.finfo(logits.dtype).min
        return logits


class BloomForCausalLM(nn.Module):
    """BLOOM with a tied LM head. ``forward`` returns logits ``[b, s, padded_vocab]``."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: Optional[int] = None):
        super().__init__()
        self.config = cfg
        self.padded_vocab_size = padded_vocab_size or cfg.padded_vocab_size(1)
        if self.padded_vocab_size < cfg.vocab_size:
            raise ValueError(
                f"padded_vocab_size={self.padded_vocab_size} < vocab_size={cfg.vocab_size}"
            )
        self.transformer = BloomModel(cfg, self.padded_vocab_size)
        self.lm_head = TiedLMHead(self.transformer.word_embeddings, cfg.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Megatron init (see ``init.py``), drawn in order from the current RNG state, and the ALiBi
        slopes of each attention's head range. (The training engine draws each layer after seeding
        with ``seed + layer index`` instead, see ``pipeline.py``.)"""
        cfg = self.config
        t = self.transformer
        init_embedding_(t.word_embeddings, cfg)
        init_layernorm_(t.word_embeddings_layernorm)
        for block in t.h:
            init_block_(block, cfg)
        init_layernorm_(t.ln_f)
        # Non-persistent buffers are not in checkpoints; re-derive them too, so that
        # init_weights after to_empty() (meta-device construction) gives a usable model.
        self.reset_derived_buffers()

    def reset_derived_buffers(self) -> None:
        """Recompute the buffers derived from the configuration (ALiBi slopes), e.g. after
        ``to_empty`` from the meta device and loading a state dict."""
        for module in self.modules():
            if isinstance(module, BloomAttention):
                module.reset_alibi_slopes()

    def head(self, hidden_states: Tensor) -> Tensor:
        """Last pipeline stage: block output ``[b, s, h]`` -> logits ``[b, s, v]``."""
        return self.lm_head(self.transformer.ln_f(hidden_states))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False):
        """Logits ``[b, s, padded_vocab]``, or ``(logits, cache)`` when ``use_cache``.

        Args:
            input_ids: ``[b, s]`` token ids (only the new tokens when a cache is given).
            attention_mask: ``[b, past + s]``, 1 for real tokens, 0 for padding.
            segment_ids: ``[b, past + s]`` packed-sample ids (0 = padding); see ``make_alibi_mask``.
            past_key_values: cache returned by a previous call with ``use_cache=True``.
        """
        hidden_states, presents = self.transformer(
            input_ids, attention_mask, segment_ids, past_key_values, use_cache
        )
        logits = self.lm_head(hidden_states)  # [b, s, v]
        return (logits, presents) if use_cache else logits


def causal_lm_loss(logits: Tensor, labels: Tensor, loss_mask: Optional[Tensor] = None) -> Tensor:
    """Token-mean cross entropy in float32.

    ``labels`` must already be shifted by the caller (Megatron convention: the sample gives
    ``tokens = x[:-1]`` and ``labels = x[1:]``), so ``labels[:, t]`` is the target of
    ``logits[:, t]``. ``loss_mask`` ``[b, s]`` (1 = count) weights tokens; the mean is over its sum.
    Labels equal to -100 are ignored as in torch's cross entropy.
    """
    v = logits.shape[-1]
    losses = F.cross_entropy(
        logits.float().reshape(-1, v), labels.reshape(-1), reduction="none", ignore_index=-100
    )  # [b*s]
    weights = (labels.reshape(-1) != -100).float()  # [b*s]
    if loss_mask is not None:
        weights = weights * loss_mask.reshape(-1).float()
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)
