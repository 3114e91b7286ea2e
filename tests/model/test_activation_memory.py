"""What the loss and the attention bias keep in memory, at sizes where it matters.

The vocab-parallel cross-entropy at BLOOM's real vocabulary (250,880 rows) must not make float32
copies of the logits: it keeps the logits themselves for backward, and its float32 work is
bounded by one chunk. Its peak is read from torch's profiler (every CPU allocation and free, in
order: deterministic for a given sequence of ops).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_bloom.layers import cross_entropy
from megatron_bloom.layers.cross_entropy import vocab_parallel_cross_entropy

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
