"""Tensor-parallel BLOOM equals the single-device model: logits, loss, every gradient, and training.

The reference is built on every rank from the same seed; the TP model is the same weights sharded
(with its vocabulary padded further when TP needs it: padding rows must change nothing).
"""
import copy

import pytest
import torch
import torch.distributed as dist

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.layers import model_parallel_tracker
from megatron_bloom.models.bloom import BloomForCausalLM, causal_lm_loss
from megatron_bloom.models.bloom.parallelize import parallelize_bloom, vocab_start_index
from megatron_bloom.models.loss import parallel_lm_loss
from megatron_bloom.testing import run_distributed

pytestmark = pytest.mark.distributed

# fp32: sharded matmuls and the split softmax sum in a different order than one process does;
# differences are a few ulps of O(1) activations. 2e-5 is ~100x that and far below any real bug.
ATOL = 2e-5


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=96, num_attention_heads=12, vocab_size=250, seq_length=16,
                init_method_std=0.05,  # 12 heads: not a power of two; 250: not a multiple of 128
                hidden_dropout=0.0, attention_dropout=0.0)  # parity with one process needs no dropout
    base.update(kw)
    return ModelConfig(**base)


def _grow_vocab(model, cfg, padded):
    """The same model with more (zero, masked) padding rows."""
    big = BloomForCausalLM(cfg, padded)
    sd = model.state_dict()
    emb = sd["transformer.word_embeddings.weight"]
    new = torch.zeros(padded, emb.shape[1])
    new[: emb.shape[0]] = emb
    sd["transformer.word_embeddings.weight"] = new
    big.load_state_dict(sd)
    return big


def _gather(t, dim, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


SHARD_DIM = {
    "word_embeddings.weight": 0,
    "query_key_value.weight": 0,
    "query_key_value.bias": 0,
    "dense_h_to_4h.weight": 0,
    "dense_h_to_4h.bias": 0,
    "self_attention.dense.weight": 1,
    "dense_4h_to_h.weight": 1,
}


def _shard_dim(name):
    for suffix, dim in SHARD_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def _parity(cfg_kwargs, steps):
    tp = dist.get_world_size()
    group = dist.group.WORLD
    cfg = _cfg(**cfg_kwargs)
    torch.manual_seed(0)
    ref = BloomForCausalLM(cfg)  # padded to 256 rows
    tp_model = parallelize_bloom(_grow_vocab(ref, cfg, cfg.padded_vocab_size(tp)), group,
                                 model_parallel_tracker(0, dist.get_rank()))
    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length + 1))
    attention_mask = torch.ones(3, cfg.seq_length, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding in one row
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]
    loss_mask = attention_mask.float()

    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    tp_opt = torch.optim.AdamW(tp_model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ref_logits = ref(input_ids, attention_mask)
        ref_loss = causal_lm_loss(ref_logits, labels, loss_mask)
        logits = tp_model(input_ids, attention_mask)  # [b, s, v/tp]
        loss = parallel_lm_loss(logits, labels, loss_mask, vocab_start_index(tp_model), group)
        ref_opt.zero_grad(), tp_opt.zero_grad()
        ref_loss.backward(), loss.backward()
        torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
        if step == 0:
            full = _gather(logits.detach(), -1, group)
            torch.testing.assert_close(full[..., : cfg.vocab_size], ref_logits.detach()[..., : cfg.vocab_size],
                                       atol=ATOL, rtol=0)
            ref_grads = {k: p.grad for k, p in ref.named_parameters()}
            for name, p in tp_model.named_parameters():
                dim = _shard_dim(name)
                grad = p.grad if dim is None else _gather(p.grad, dim, group)
                want = ref_grads[name]
                if name.endswith("word_embeddings.weight"):
                    assert torch.all(grad[want.shape[0]:] == 0), "padding rows got a gradient"
                    grad = grad[: want.shape[0]]
                torch.testing.assert_close(grad, want, atol=ATOL, rtol=0, msg=name)
        ref_opt.step(), tp_opt.step()
        losses.append(loss.item())

    # Replicated parameters (LayerNorms, row-parallel biases) must stay bitwise equal on all ranks.
    replicated = {n: p.detach() for n, p in tp_model.named_parameters() if _shard_dim(n) is None}
    for name, value in replicated.items():
        others = [torch.empty_like(value) for _ in range(tp)]
        dist.all_gather(others, value.contiguous(), group=group)
        assert all(torch.equal(o, value) for o in others), f"{name} drifted across TP ranks"
    return losses


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_device(tp):
    losses = run_distributed(_parity, tp, {}, 3, timeout=120)
    assert all(l == losses[0] for l in losses)  # every TP rank computes the same loss


def test_tp_post_layernorm_residual_and_eager_attention():
    run_distributed(_parity, 2, {"apply_residual_connection_post_layernorm": True, "attention_impl": "eager",
                                 "num_attention_heads": 6, "hidden_size": 60}, 2, timeout=120)


def _dropout_streams():
    """Attention-probability dropout differs per TP rank; hidden dropout (replicated) is identical."""
    rank = dist.get_rank()
    cfg = _cfg(attention_dropout=0.3, hidden_dropout=0.3)
    torch.manual_seed(0)
    model = parallelize_bloom(BloomForCausalLM(cfg, cfg.padded_vocab_size(2)), dist.group.WORLD,
                              model_parallel_tracker(1234, rank))
    model.train()
    torch.manual_seed(7)  # the default generator: identical on both ranks
    attn = model.transformer.h[0].self_attention
    x = torch.ones(1, 4, 8, 8)
    with attn.rng_tracker.fork():  # where the attention forward draws its probabilities' masks
        mask_attn = attn.attention_dropout(x) == 0
    mask_hidden = attn.hidden_dropout(torch.ones(64)) == 0
    both_attn = _gather(mask_attn.float(), 0, dist.group.WORLD)
    both_hidden = _gather(mask_hidden.float()[None], 0, dist.group.WORLD)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    loss = parallel_lm_loss(model(ids[:, :-1]), ids[:, 1:], None, vocab_start_index(model), dist.group.WORLD)
    loss.backward()
    return (not torch.equal(both_attn[0], both_attn[1]), torch.equal(both_hidden[0], both_hidden[1]),
            loss.item())


def test_tp_dropout_rng_streams():
    out = run_distributed(_dropout_streams, 2, timeout=90)
    for attn_differs, hidden_same, _ in out:
        assert attn_differs and hidden_same
    assert out[0][2] == out[1][2]  # the loss (after the all-reduces) is the same on both ranks


def _one_bias_per_rank():
    """Forward + backward of the TP model with packed samples: the dense ALiBi bias each rank builds."""
    from megatron_bloom.models.bloom.alibi import AlibiMask, alibi_slopes, build_alibi_bias

    tp, rank = dist.get_world_size(), dist.get_rank()
    cfg = _cfg()
    torch.manual_seed(0)
    model = parallelize_bloom(BloomForCausalLM(cfg, cfg.padded_vocab_size(tp)), dist.group.WORLD,
                              model_parallel_tracker(0, rank))
    built = []
    build = AlibiMask.build_bias

    def counting_build(mask, *args):
        built.append(build(mask, *args))
        return built[-1]

    AlibiMask.build_bias = counting_build  # this rank's process only
    try:
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
        segment_ids = torch.tensor([[1] * 6 + [2] * 10, [3] * 16])
        logits = model(tokens[:, :-1], segment_ids=segment_ids)
        parallel_lm_loss(logits, tokens[:, 1:], None, vocab_start_index(model), dist.group.WORLD).backward()
    finally:
        AlibiMask.build_bias = build
    attn = model.transformer.h[0].self_attention
    heads = attn.alibi_slopes.shape[0]
    want = build_alibi_bias(alibi_slopes(cfg.num_attention_heads)[attn.head_start : attn.head_start + heads],
                            cfg.seq_length, segment_ids=segment_ids)
    return len(built), torch.equal(built[0], want), attn.head_start


def test_tp_ranks_build_one_bias_each_for_their_heads():
    """Each rank builds one bias per forward, for its own heads, shared by its layers."""
    out = run_distributed(_one_bias_per_rank, 2, timeout=90)
    assert [(n, equal) for n, equal, _ in out] == [(1, True), (1, True)]
    assert out[0][2] != out[1][2]  # different head ranges, so different slopes
