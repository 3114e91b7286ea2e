"""Dropout of our BLOOM: attention dropout inside the SDPA kernel drawn from the tracker's stream,
the tracker on the device's own generator, recompute replaying tracked masks, Megatron's seeds."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bloom_test_utils import tiny_config
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.layers.random import (
    RNGStatesTracker,
    default_generator,
    dropout_seeds,
    model_parallel_tracker,
)
from megatron_bloom.models.bloom.alibi import make_alibi_mask
from megatron_bloom.models.bloom.model import BloomAttention, BloomForCausalLM, causal_lm_loss

HEADS, HN, S, B = 4, 32, 32, 4


def probe_attention(impl: str, p: float) -> BloomAttention:
    """An attention whose output shows its dropped probabilities.

    q = k = 0 (scores are the ALiBi bias alone), v_t = e_t (the input puts a one-hot of its position
    in every head's slot) and dense is the identity, so output[b, i, n*hn + j] is head n's
    probability of key j for query i after dropout: 0 exactly where it was dropped (j <= i).
    """
    cfg = ModelConfig(hidden_size=HEADS * HN, num_attention_heads=HEADS, attention_dropout=p, hidden_dropout=0.0,
                      attention_impl=impl)
    attn = BloomAttention(cfg)
    with torch.no_grad():
        w = torch.zeros(HEADS, 3, HN, HEADS * HN)  # query_key_value rows are [np, 3, hn]
        for n in range(HEADS):
            w[n, 2, :, n * HN:(n + 1) * HN] = torch.eye(HN)
        attn.query_key_value.weight.copy_(w.reshape(3 * HEADS * HN, HEADS * HN))
        attn.query_key_value.bias.zero_()
        attn.dense.weight.copy_(torch.eye(HEADS * HN))
        attn.dense.bias.zero_()
    return attn


def probs_after_dropout(attn: BloomAttention) -> torch.Tensor:
    x = torch.zeros(B, S, HEADS, HN)
    x[:, torch.arange(S), :, torch.arange(S)] = 1.0  # position t: one-hot e_t in every head's slot
    out, _ = attn(x.reshape(B, S, HEADS * HN), make_alibi_mask(S))
    return out.reshape(B, S, HEADS, HN).transpose(1, 2)  # [b, np, sq, sk]


CAUSAL = torch.ones(S, S).tril().bool()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_dropout_rate_and_scaling(impl):
    attn = probe_attention(impl, 0.3)
    clean = probs_after_dropout(attn.eval()).detach()
    dropped = probs_after_dropout(attn.train()).detach()
    kept = (dropped != 0) & CAUSAL
    rate = 1 - kept.sum().item() / (B * HEADS * CAUSAL.sum().item())
    # 8448 causal probabilities: the rate's standard deviation is 0.005.
    assert abs(rate - 0.3) < 0.03, rate
    # Kept probabilities are scaled by 1 / (1 - p), as nn.Dropout does.
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.7, rtol=1e-5, atol=1e-7)


def test_attention_dropout_runs_inside_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    attn = probe_attention("sdpa", 0.3)
    monkeypatch.setattr(attn, "_eager_attention", lambda *a: pytest.fail("fell back to eager attention"))
    probs_after_dropout(attn.train())
    probs_after_dropout(attn.eval())
    assert calls == [0.3, 0.0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tensor_parallel_ranks_draw_independent_masks_from_their_stream(impl):
    """Two TP ranks' trackers (seed + 2718 + tp): each rank's masks come from its own stream."""
    attn = probe_attention(impl, 0.3).train()
    masks = {}
    for tp_rank in (0, 1, 0):
        attn.rng_tracker = model_parallel_tracker(1234, tp_rank)
        before = torch.get_rng_state()
        masks.setdefault(tp_rank, []).append((probs_after_dropout(attn) == 0) & CAUSAL)
        # The draws came from the tracked stream, not the default generator.
        assert torch.equal(torch.get_rng_state(), before)
    same_rank = masks[0]
    assert torch.equal(same_rank[0], same_rank[1])  # a stream is reproducible
    a, b = masks[0][0].float(), masks[1][0].float()
    n = B * HEADS * CAUSAL.sum().item()
    # Independent draws: both dropped for p^2 = 9% of the probabilities (standard deviation 0.3%).
    both = (a * b).sum().item() / n
    assert abs(both - 0.09) < 0.02, both


def test_tracker_swaps_the_generator_of_its_device():
    device = torch.device("cpu")
    assert default_generator(device) is torch.default_generator
    tracker = RNGStatesTracker(device)
    tracker.add("model-parallel", 99)
    torch.manual_seed(5)
    outside = torch.rand(3)
    torch.manual_seed(5)
    with tracker.fork():
        inside = torch.rand(3)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator(device).manual_seed(99)))
    assert torch.equal(torch.rand(3), outside)  # the default stream went on as if nothing happened
    with tracker.fork():
        after = torch.rand(3)
    assert not torch.equal(after, inside)  # the tracked stream advanced and was kept


def test_megatron_deepspeed_seeds():
    # The worked example of layers/random.py: --seed 42, TP=2, PP=2.
    assert [dropout_seeds(42, tp, pp) for pp in (0, 1) for tp in (0, 1)] == [
        (42, 2760), (42, 2761), (142, 2860), (142, 2861)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_recompute_replays_the_tracked_masks(impl):
    """The repro of the tracker bug: recompute drew other attention masks than the forward."""
    cfg = tiny_config(hidden_dropout=0.2, attention_dropout=0.5, attention_impl=impl, checkpoint_activations=True)
    torch.manual_seed(0)
    recomputed = BloomForCausalLM(cfg).train()
    plain = BloomForCausalLM(dataclasses.replace(cfg, checkpoint_activations=False)).train()
    plain.load_state_dict(recomputed.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    grads = []
    for model in (plain, recomputed):
        tracker = model_parallel_tracker(1234, 1)
        for block in model.transformer.h:
            block.self_attention.rng_tracker = tracker
        torch.manual_seed(1)
        model.zero_grad()
        causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
