"""What the loss and the attention bias keep in memory, at sizes where it matters.

The vocab-parallel cross-entropy at BLOOM's real vocabulary (250,880 rows) must not make float32
copies of the logits: it keeps the logits themselves for backward, and its float32 work is
bounded by one chunk. Its peak is read from torch's profiler (every CPU allocation and free, in
order: deterministic for a given sequence of ops).

The dense ALiBi bias ([b|1, np, s, s], kept for backward by the attention kernel) is built once
per forward and shared by all layers, in the plain model, under recompute, with padding or
packed segments, in cached generation and between the blocks of a pipeline stage.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bloom_test_utils import tiny_config
from megatron_bloom.layers import cross_entropy
from megatron_bloom.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_bloom.models.bloom.alibi import AlibiMask, alibi_slopes, build_alibi_bias, make_alibi_mask
from megatron_bloom.models.bloom.model import BloomForCausalLM

BLOOM_PADDED_VOCAB = 250_880


def profiled_peak_bytes(step) -> int:
    """Largest live allocation (bytes above the start) while ``step()`` runs, from the profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate((n for _, n in events), initial=0))


@pytest.mark.parametrize("dtype, tokens", [(torch.float32, 256), (torch.bfloat16, 512)])
def test_cross_entropy_peak_is_the_gradient_and_one_chunk(dtype, tokens):
    """Forward + backward over 245 MiB of logits with 250,880 columns: beyond the logits (the
    caller's), the peak is their gradient (same dtype) and one float32 chunk. The whole-tensor
    version made float32 shifted logits and their exponentials at once: 2x the logits in fp32, 6x
    in bf16 (with the float32 copy)."""
    torch.manual_seed(0)
    logits = torch.randn(1, tokens, BLOOM_PADDED_VOCAB).to(dtype).requires_grad_(True)
    target = torch.randint(0, BLOOM_PADDED_VOCAB, (1, tokens))
    logits_bytes = logits.numel() * logits.element_size()
    chunk_bytes = cross_entropy.CHUNK_ELEMENTS * 4
    assert chunk_bytes < logits_bytes / 3  # else the bound would not tell chunked from whole

    peak = profiled_peak_bytes(lambda: vocab_parallel_cross_entropy(logits, target).sum().backward())
    # 1 MiB covers the [b, s] vectors (max, sum, target, loss and their gradients).
    assert peak <= logits_bytes + chunk_bytes + 2**20, (peak / logits_bytes, chunk_bytes / logits_bytes)


def test_cross_entropy_saves_the_logits_themselves():
    """The only logits-sized tensor saved for backward is the input: no float32 copy, no softmax.
    Saved, and float32 already, it must also come back unchanged (no in-place work on it)."""
    logits = torch.randn(2, 64, 4096, requires_grad=True)
    before = logits.detach().clone()
    target = torch.randint(0, 4096, (2, 64))
    big = []

    def pack(t):
        if t.numel() >= logits.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vocab_parallel_cross_entropy(logits, target)
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr(), [(t.dtype, t.shape) for t in big]
    loss.sum().backward()
    assert torch.equal(logits.detach(), before)


# ---- the ALiBi bias: one per forward, shared by the layers --------------------------------------------------


class BiasSpy:
    """Every dense bias built (``AlibiMask.build_bias``) and every bias a layer received
    (``AlibiMask.bias``), kept alive so that no two of them can share an ``id``."""

    def __init__(self, monkeypatch):
        self.built, self.received = [], []
        build, bias = AlibiMask.build_bias, AlibiMask.bias

        def counting_build(mask, *args, **kwargs):
            self.built.append(build(mask, *args, **kwargs))
            return self.built[-1]

        def recording_bias(mask, *args, **kwargs):
            self.received.append(bias(mask, *args, **kwargs))
            return self.received[-1]

        monkeypatch.setattr(AlibiMask, "build_bias", counting_build)
        monkeypatch.setattr(AlibiMask, "bias", recording_bias)

    def distinct_received(self) -> int:
        return len({id(t) for t in self.received})

    def reset(self) -> None:
        self.built.clear(), self.received.clear()


LAYERS = 4


def _model(impl: str, recompute: bool = False) -> BloomForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_config(num_layers=LAYERS, attention_impl=impl, checkpoint_activations=recompute)
    return BloomForCausalLM(cfg).train()


INPUTS = {
    "causal": {},
    "padding": {"attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])},
    "packed": {"segment_ids": torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [3] * 8])},
}


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_model_builds_one_bias_per_forward(impl, inputs, recompute, monkeypatch):
    """Forward + backward of a 4-layer model: one bias built, and every layer (and every
    recomputed layer) attends with that very tensor."""
    model = _model(impl, recompute)
    spy = BiasSpy(monkeypatch)
    model(torch.randint(0, 250, (2, 8)), **INPUTS[inputs]).square().mean().backward()
    assert len(spy.received) == LAYERS * (2 if recompute else 1)
    assert len(spy.built) == 1 and spy.distinct_received() == 1


def test_each_cached_generation_step_builds_one_bias(monkeypatch):
    model = _model("sdpa").eval()
    spy = BiasSpy(monkeypatch)
    ids, mask = torch.randint(0, 250, (2, 6)), torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        _, cache = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert len(spy.built) == 1 and spy.distinct_received() == 1
        model(ids[:, 4:], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert len(spy.built) == 2 and spy.distinct_received() == 2
    assert spy.built[1].shape[-2:] == (2, 6)  # the new queries against every key


def test_head_ranges_get_their_own_bias_from_one_mask():
    """Tensor parallelism: each rank's heads have their own slopes. One mask serves any head range
    and never hands one range's bias to another."""
    mask = make_alibi_mask(5, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    slopes = alibi_slopes(6)
    first = mask.bias(slopes[:3], torch.float32, (0, 3, 6))
    second = mask.bias(slopes[3:], torch.float32, (3, 3, 6))
    assert first is not second
    assert torch.equal(first, build_alibi_bias(slopes[:3], 5, attention_mask=torch.tensor([[0, 1, 1, 1, 1]])))
    assert torch.equal(second, build_alibi_bias(slopes[3:], 5, attention_mask=torch.tensor([[0, 1, 1, 1, 1]])))
    assert mask.bias(slopes[:3], torch.float32, (0, 3, 6)) is first
    assert mask.bias(slopes[:3], torch.bfloat16, (0, 3, 6)).dtype == torch.bfloat16


def _stage_blocks(recompute: bool):
    """The blocks of one pipeline stage, built from the layer specs as DeepSpeed builds them."""
    from megatron_bloom.models.bloom.pipeline import ParallelTransformerLayerPipe, bloom_layer_specs

    torch.manual_seed(0)
    cfg = tiny_config(num_layers=LAYERS, attention_impl="sdpa", checkpoint_activations=recompute)
    specs = bloom_layer_specs(cfg, cfg.padded_vocab_size(1))
    return [spec.build() for spec in specs if getattr(spec, "typename", None) is ParallelTransformerLayerPipe]


def _run_stage(blocks, activation):
    for block in blocks:
        activation = block(activation)
    return activation


def test_pipeline_stage_shares_one_causal_bias_across_micro_batches(monkeypatch):
    """Without segment ids the bias depends on the length only: one for the stage, every
    micro-batch and every block."""
    blocks = _stage_blocks(recompute=False)
    spy = BiasSpy(monkeypatch)
    outputs = [_run_stage(blocks, torch.randn(2, 8, 48, requires_grad=True)) for _ in range(3)]
    for out in outputs:
        out.square().sum().backward()
    assert len(spy.received) == 3 * LAYERS
    assert len(spy.built) == 1 and spy.distinct_received() == 1


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
def test_pipeline_stage_builds_one_packed_bias_per_micro_batch(recompute, monkeypatch):
    """Packed micro-batches (1F1B order: two forwards, then their backwards): one bias per
    micro-batch's forward, and with recompute one more per backward, never one per block."""
    blocks = _stage_blocks(recompute)
    spy = BiasSpy(monkeypatch)
    segments = [torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [3] * 8]), torch.tensor([[1] * 5 + [2] * 3, [4] * 8])]
    outs = [_run_stage(blocks, (torch.randn(2, 8, 48, requires_grad=True), seg)) for seg in segments]
    assert len(spy.built) == 2 and spy.distinct_received() == 2
    forward_biases = list(spy.built)
    for out, _ in outs:
        out.square().sum().backward()
    assert len(spy.built) == (4 if recompute else 2)
    # Each micro-batch's blocks used its own bias, built from its own segments.
    for bias, seg in zip(forward_biases, segments):
        want = build_alibi_bias(blocks[0].self_attention.alibi_slopes, 8, segment_ids=seg)
        assert torch.equal(bias, want)


@pytest.mark.parametrize("inputs", ["causal", "packed"])
def test_sdpa_keeps_one_bias_for_backward(inputs, monkeypatch):
    """torch's SDPA saves its attention mask for backward: all layers together keep one bias."""
    model = _model("sdpa")
    spy = BiasSpy(monkeypatch)
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randint(0, 250, (2, 8)), **INPUTS[inputs])
    kept = {t.untyped_storage().data_ptr() for t in spy.received} & saved
    assert len(spy.received) == LAYERS and len(kept) == 1
    out.sum().backward()


def test_planned_loss_bytes_are_the_measured_peak():
    """planning/memory.py's last-stage term, 2 e s b Vp / t (the logits and their gradient), is
    what forward + backward of the loss holds at its peak, give or take one float32 chunk."""
    from megatron_bloom.config.schema import ModelConfig
    from megatron_bloom.planning.memory import CROSS_ENTROPY_CHUNK_BYTES, loss_bytes

    assert CROSS_ENTROPY_CHUNK_BYTES == 4 * cross_entropy.CHUNK_ELEMENTS
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=BLOOM_PADDED_VOCAB)
    b, s = 2, 256
    planned = loss_bytes(cfg, s, b, 1, "fp32")
    logits = torch.randn(b, s, cfg.padded_vocab_size(1), requires_grad=True)  # the caller's (the stage output)
    target = torch.randint(0, cfg.vocab_size, (b, s))
    held = logits.numel() * logits.element_size() + profiled_peak_bytes(
        lambda: vocab_parallel_cross_entropy(logits, target).mean().backward())
    assert planned <= held <= planned + CROSS_ENTROPY_CHUNK_BYTES + 2**20, (held / planned)
