"""Our BLOOM against transformers' BloomForCausalLM with the same weights (float32, CPU)."""
import pytest
import torch

from bloom_test_utils import twin_models, with_impl

# Float32 with different summation orders (fused tanh-GeLU kernel, sdpa vs baddbmm, bias folded
# into the scores before vs after the matmul). Observed differences are ~1e-6 on logits of
# magnitude ~5; 5e-5 leaves a margin while any real mistake (a wrong slope, mask or residual)
# moves logits by 1e-2 or more.
ATOL = 5e-5
RTOL = 1e-5


def _compare(hf, ours, cfg, ids, attention_mask=None):
    with torch.no_grad():
        expected = hf(ids, attention_mask=attention_mask).logits  # [b, s, vocab]
        got = ours(ids, attention_mask=attention_mask)  # [b, s, padded_vocab]
    assert got.shape[-1] == ours.padded_vocab_size >= cfg.vocab_size
    real = got[..., : cfg.vocab_size]
    if attention_mask is None:
        torch.testing.assert_close(real, expected, atol=ATOL, rtol=RTOL)
    else:
        keep = attention_mask.bool()  # padding positions' outputs are meaningless in both
        torch.testing.assert_close(real[keep], expected[keep], atol=ATOL, rtol=RTOL)
    # Padded columns never win and never change a log-softmax.
    assert int(got.argmax(-1).max()) < cfg.vocab_size
    torch.testing.assert_close(
        got.log_softmax(-1)[..., : cfg.vocab_size], real.log_softmax(-1), atol=0, rtol=0
    )


@pytest.mark.parametrize(
    "heads,hidden,vocab,layers",
    [(3, 24, 250, 2), (5, 40, 131, 1), (6, 48, 250, 2), (12, 48, 1000, 1), (8, 32, 256, 2)],
)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_logits_match_transformers(heads, hidden, vocab, layers, impl):
    hf, ours, cfg = twin_models(
        num_attention_heads=heads, hidden_size=hidden, vocab_size=vocab, num_layers=layers,
        attention_impl=impl,
    )
    torch.manual_seed(1)
    for b, s in [(2, 9), (1, 1), (3, 17)]:
        _compare(hf, ours, cfg, torch.randint(0, vocab, (b, s)))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padding_matches_transformers(impl):
    hf, ours, cfg = twin_models(attention_impl=impl)
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :10] = 0  # a single real token
    _compare(hf, ours, cfg, ids, mask)
    # Same tokens without padding: the real positions give the same logits (positions come from
    # cumsum(mask) - 1, so left padding does not shift ALiBi).
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask)[0, 4:]
        alone = ours(ids[:1, 4:])[0]
    torch.testing.assert_close(padded, alone, atol=ATOL, rtol=RTOL)


def test_post_layernorm_residual_matches_transformers():
    hf, ours, cfg = twin_models(apply_residual_connection_post_layernorm=True)
    torch.manual_seed(3)
    _compare(hf, ours, cfg, torch.randint(0, cfg.vocab_size, (2, 13)))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :5] = 0
    _compare(hf, ours, cfg, torch.randint(0, cfg.vocab_size, (2, 13)), mask)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_generation_matches_full_forward_and_transformers(impl):
    hf, ours, cfg = twin_models(num_attention_heads=3, hidden_size=36, attention_impl=impl)
    torch.manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding, as batched generation does
    with torch.no_grad():
        logits, cache = ours(ids, attention_mask=mask, use_cache=True)
        hf_out = hf(ids, attention_mask=mask, use_cache=True)
        hf_cache = hf_out.past_key_values
        for _ in range(5):
            next_ids = logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
            ids = torch.cat([ids, next_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            logits, cache = ours(next_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            assert logits.shape[1] == 1 and cache[0][0].shape[2] == ids.shape[1]
            full = ours(ids, attention_mask=mask)[:, -1:]
            torch.testing.assert_close(logits, full, atol=ATOL, rtol=RTOL)
            hf_out = hf(next_ids, attention_mask=mask, past_key_values=hf_cache, use_cache=True)
            hf_cache = hf_out.past_key_values
            torch.testing.assert_close(
                logits[..., : cfg.vocab_size], hf_out.logits, atol=ATOL, rtol=RTOL
            )


def test_cache_without_mask_and_multi_token_steps():
    _, ours, cfg = twin_models(num_attention_heads=5, hidden_size=40)
    torch.manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = ours(ids)
        first, cache = ours(ids[:, :5], use_cache=True)
        second, cache = ours(ids[:, 5:9], past_key_values=cache, use_cache=True)
        third, _ = ours(ids[:, 9:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first, second, third], 1), full, atol=ATOL, rtol=RTOL)


def test_sdpa_equals_eager_with_padding_and_segments():
    _, eager, cfg = twin_models()
    sdpa = with_impl(eager, "sdpa")
    torch.manual_seed(6)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    seg = torch.tensor([[1] * 5 + [2] * 7 + [3] * 4, [0] * 3 + [1] * 9 + [2] * 2 + [0] * 2])
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"segment_ids": seg}):
            a, b = eager(ids, **kwargs), sdpa(ids, **kwargs)
            keep = torch.ones_like(ids, dtype=torch.bool)
            for key in ("attention_mask", "segment_ids"):
                if key in kwargs:
                    keep = kwargs[key] != 0
            torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=RTOL)
