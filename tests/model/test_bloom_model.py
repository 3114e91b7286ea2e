"""Behaviour of our BLOOM on its own: kernels, recompute, packing, padding, init, dtypes."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bloom_test_utils import tiny_config, twin_models, with_impl
from megatron_bloom.models.bloom.model import BloomForCausalLM, TiedLMHead, causal_lm_loss


def _batch(cfg, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]  # inputs, labels shifted by the caller


def _loss_and_grads(model, ids, labels, loss_mask=None, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model(ids, **kwargs), labels, loss_mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sdpa_equals_eager_loss_and_gradients():
    _, eager, cfg = twin_models()
    sdpa = with_impl(eager, "sdpa")
    eager.train(), sdpa.train()
    ids, labels = _batch(cfg)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    # Padding queries see no key; their (uniform-softmax) outputs are garbage in every kernel and
    # the kernels differentiate them differently, so, as in training, they are out of the loss.
    loss_e, grads_e = _loss_and_grads(eager, ids, labels, mask, attention_mask=mask)
    loss_s, grads_s = _loss_and_grads(sdpa, ids, labels, mask, attention_mask=mask)
    # float32, different summation order inside the attention kernel: ~1e-7 relative.
    torch.testing.assert_close(loss_s, loss_e, atol=1e-6, rtol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_s[name], grads_e[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_activation_checkpointing_gives_equal_loss_and_gradients(impl):
    _, plain, cfg = twin_models(attention_impl=impl, num_layers=3)
    ckpt = BloomForCausalLM(dataclasses.replace(plain.config, checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    plain.train(), ckpt.train()
    ids, labels = _batch(cfg)
    loss_a, grads_a = _loss_and_grads(plain, ids, labels)
    loss_b, grads_b = _loss_and_grads(ckpt, ids, labels)
    # Recompute runs the very same kernels on the very same inputs: bitwise equal.
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_activation_checkpointing_with_dropout_replays_the_same_masks():
    cfg = tiny_config(hidden_dropout=0.2, attention_dropout=0.2, checkpoint_activations=True)
    torch.manual_seed(0)
    ckpt = BloomForCausalLM(cfg).train()
    plain = BloomForCausalLM(dataclasses.replace(cfg, checkpoint_activations=False)).train()
    plain.load_state_dict(ckpt.state_dict())
    ids, labels = _batch(cfg)
    torch.manual_seed(1)
    loss_a, grads_a = _loss_and_grads(plain, ids, labels)
    torch.manual_seed(1)
    loss_b, grads_b = _loss_and_grads(ckpt, ids, labels)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_changing_one_packed_segment_leaves_others_bitwise_unchanged(impl):
    _, model, cfg = twin_models(attention_impl=impl)
    seg = torch.tensor([[1] * 6 + [2] * 5 + [3] * 5, [1] * 10 + [2] * 4 + [0] * 2])
    ids, _ = _batch(cfg)
    changed = ids.clone()
    changed[0, 6:11] = (changed[0, 6:11] + 7) % cfg.vocab_size  # segment 2 of sample 0
    changed[1, 14:] = (changed[1, 14:] + 3) % cfg.vocab_size  # padding of sample 1
    with torch.no_grad():
        a = model(ids, segment_ids=seg)
        b = model(changed, segment_ids=seg)
    untouched = torch.ones_like(ids, dtype=torch.bool)
    untouched[0, 6:11] = False
    untouched[1, 14:] = False
    assert torch.equal(a[untouched], b[untouched])
    assert not torch.equal(a[0, 6:11], b[0, 6:11])
    # A packed segment gives the logits it would give alone (positions restart at 0).
    with torch.no_grad():
        alone = model(ids[:1, 11:16])
    torch.testing.assert_close(a[:1, 11:16], alone, atol=5e-5, rtol=1e-5)


def test_padded_vocab_rows_never_change_loss_or_get_gradient():
    _, model, cfg = twin_models(vocab_size=200)  # padded to 256
    assert model.padded_vocab_size == 256
    model.train()
    ids, labels = _batch(cfg)
    loss_a, grads = _loss_and_grads(model, ids, labels)
    emb_grad = grads["transformer.word_embeddings.weight"]
    assert torch.count_nonzero(emb_grad[cfg.vocab_size :]) == 0
    with torch.no_grad():
        model.transformer.word_embeddings.weight[cfg.vocab_size :].normal_(0, 10.0)
    loss_b, _ = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss_a, loss_b)
    logits = model(ids)
    assert (logits[..., cfg.vocab_size :] == torch.finfo(logits.dtype).min).all()
    assert torch.softmax(logits, -1)[..., cfg.vocab_size :].max() == 0


def test_sharded_head_masks_only_its_own_padded_rows():
    emb = nn.Embedding(128, 8)  # rows 128..255 of a 250-token vocabulary padded to 256
    head = TiedLMHead(emb, vocab_size=250, vocab_start_index=128)
    logits = head(torch.randn(1, 3, 8))
    assert torch.isfinite(logits[..., :122]).all()
    assert (logits[..., 122:] == torch.finfo(logits.dtype).min).all()


def test_state_dict_keys_and_tie():
    hf, ours, _ = twin_models()
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert ours.lm_head.weight is ours.transformer.word_embeddings.weight
    sd = ours.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.word_embeddings.weight"].data_ptr()
    assert "lm_head.weight" not in dict(ours.named_parameters())
    for moved in (copy.deepcopy(ours), ours.to(torch.bfloat16)):
        assert moved.lm_head.weight is moved.transformer.word_embeddings.weight


def test_megatron_init():
    cfg = tiny_config(hidden_size=256, num_attention_heads=4, num_layers=8, init_method_std=0.02)
    torch.manual_seed(0)
    model = BloomForCausalLM(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    emb = model.transformer.word_embeddings.weight
    assert emb[cfg.vocab_size :].abs().max() == 0
    assert abs(emb[: cfg.vocab_size].std().item() - 0.02) < 0.002
    for name, p in model.named_parameters():
        if name.endswith("bias"):  # linear and LayerNorm biases alike
            assert p.abs().max() == 0, name
        elif "layernorm" in name or "ln_f" in name:
            assert (p == 1).all(), name
        elif name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            assert abs(p.std().item() - out_std) < 0.1 * out_std, name
        elif name.endswith(("query_key_value.weight", "dense_h_to_4h.weight")):
            assert abs(p.std().item() - 0.02) < 0.002, name


def test_local_heads_follow_query_key_value_shape():
    """Two 'ranks' holding heads 0-2 and 3-5 add up to the full attention (row-parallel dense)."""
    _, model, cfg = twin_models()
    attn = model.transformer.h[0].self_attention
    hn = attn.head_dim
    x = torch.randn(2, 7, cfg.hidden_size)
    from megatron_bloom.models.bloom.alibi import make_alibi_mask

    mask = make_alibi_mask(7)
    with torch.no_grad():
        full, _ = attn(x, mask)
        total = torch.zeros_like(full)
        for start in (0, 3):
            part = copy.deepcopy(attn)
            rows = slice(start * 3 * hn, (start + 3) * 3 * hn)  # qkv stored per head [np, 3, hn]
            part.query_key_value = nn.Linear(cfg.hidden_size, 3 * 3 * hn)
            part.query_key_value.weight.copy_(attn.query_key_value.weight[rows])
            part.query_key_value.bias.copy_(attn.query_key_value.bias[rows])
            part.dense = nn.Linear(3 * hn, cfg.hidden_size, bias=False)
            part.dense.weight.copy_(attn.dense.weight[:, start * hn : (start + 3) * hn])
            part.set_head_range(start, 3)
            total += part(x, mask)[0]
        total += attn.dense.bias
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-5)


def test_slopes_stay_float32_when_model_is_cast():
    model = BloomForCausalLM(tiny_config()).to(torch.bfloat16)
    slopes = model.transformer.h[0].self_attention.alibi_slopes
    assert slopes.dtype == torch.float32
    assert "alibi_slopes" not in str(list(model.state_dict()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_half_parameters_forward_backward_finite(dtype, impl):
    torch.manual_seed(0)
    cfg = tiny_config(attention_impl=impl)
    model = BloomForCausalLM(cfg).to(dtype).train()
    ids, labels = _batch(cfg)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # fully masked rows in half precision
    logits = model(ids, attention_mask=mask)
    assert logits.dtype == dtype
    loss = causal_lm_loss(logits, labels, loss_mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_autocast_close_to_fp32(impl, dtype):
    torch.manual_seed(0)
    cfg = tiny_config(attention_impl=impl)
    model = BloomForCausalLM(cfg).train()
    ids, labels = _batch(cfg)
    ref = causal_lm_loss(model(ids), labels)
    with torch.autocast("cpu", dtype=dtype):
        loss = causal_lm_loss(model(ids), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 has 8 mantissa bits (fp16 11); the loss (~log 250 = 5.5) agrees to ~1e-2.
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=0)


def test_meta_construction_then_to_empty_and_init_weights():
    cfg = tiny_config()
    with torch.device("meta"):
        model = BloomForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = BloomForCausalLM(cfg)
    for a, b in zip(model.transformer.h, reference.transformer.h):
        assert torch.equal(a.self_attention.alibi_slopes, b.self_attention.alibi_slopes)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 4)))).all()


def test_loss_helper_mask_and_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]])
    per_token = F.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="none")
    expected = per_token[mask.view(-1).bool()].mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels, mask), expected)
    torch.testing.assert_close(causal_lm_loss(logits, labels), per_token.mean())
    assert causal_lm_loss(logits, labels, torch.zeros_like(mask)) == 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fp16_fully_masked_row_with_very_negative_scores_is_not_nan(impl):
    """finfo(fp16).min plus a score below -16 overflows to -inf; a left-padding row whose every
    score is that negative must still not produce NaN (it would poison a masked loss: NaN * 0)."""
    from megatron_bloom.models.bloom.alibi import make_alibi_mask

    model = BloomForCausalLM(tiny_config(attention_impl=impl)).half()
    attn = model.transformer.h[0].self_attention
    mask = make_alibi_mask(4, attention_mask=torch.tensor([[0, 0, 1, 1]]))
    bias = mask.bias(attn.alibi_slopes, torch.float16)  # [1, 6, 4, 4]
    q = torch.full((1, 6, 4, 8), 4.0, dtype=torch.float16)  # q.k / sqrt(8) = -45 everywhere
    v = torch.randn(1, 6, 4, 8).half()
    if impl == "eager":
        out = attn._eager_attention(q, -q, v, bias)
    else:
        out = F.scaled_dot_product_attention(q, -q, v, attn_mask=bias)
    assert not out.isnan().any()
