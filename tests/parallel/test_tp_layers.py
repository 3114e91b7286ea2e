"""Each tensor-parallel layer against its unsharded torch equivalent: outputs and every gradient."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_bloom.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
    vocab_parallel_cross_entropy,
)

pytestmark = pytest.mark.distributed

# fp32 on one machine; sharded matmuls sum over a split inner dimension in a different order, so
# results agree to rounding (~1e-7 relative), not bitwise. 1e-5 leaves margin without hiding a
# real bug (a wrong shard or a missing reduce is off by O(1)).
ATOL = 1e-5


def _gather_dim(t, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _mlp_parity():
    torch.manual_seed(0)
    group = dist.group.WORLD
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    ref = fc2(F.gelu(fc1(x)))
    ref.square().sum().backward()

    col, row = ColumnParallelLinear(fc1, group), RowParallelLinear(fc2, group)
    xp = x.detach().clone().requires_grad_(True)
    out = row(F.gelu(col(xp)))
    out.square().sum().backward()

    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(xp.grad, x.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(_gather_dim(col.weight.grad, 0), fc1.weight.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(_gather_dim(col.bias.grad, 0), fc1.bias.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(_gather_dim(row.weight.grad, 1), fc2.weight.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(row.bias.grad, fc2.bias.grad, atol=ATOL, rtol=0)

    gathered = ColumnParallelLinear(fc1, group, gather_output=True)(x.detach())
    torch.testing.assert_close(gathered, fc1(x.detach()), atol=ATOL, rtol=0)
    return True


def _embedding_and_loss_parity():
    torch.manual_seed(1)
    group = dist.group.WORLD
    vocab, padded, hidden = 21, 24, 8  # 3 padding rows, masked out of the softmax
    emb = nn.Embedding(padded, hidden)
    ids = torch.randint(0, vocab, (2, 7))
    target = torch.randint(0, vocab, (2, 7))

    def logits_of(weight, start):
        h = ref_emb_out if weight is emb.weight else par_emb_out
        z = h @ weight.t()  # [b, s, V_local]
        cols = torch.arange(start, start + weight.shape[0])
        return z.masked_fill(cols >= vocab, float("-inf"))

    ref_emb_out = emb(ids)
    ref_loss = F.cross_entropy(logits_of(emb.weight, 0).flatten(0, 1), target.flatten(), reduction="none")
    ref_loss.sum().backward()

    pemb = VocabParallelEmbedding(emb, group)
    par_emb_out = pemb(ids)
    from megatron_bloom.layers import copy_to_tensor_parallel_region

    par_emb_out = copy_to_tensor_parallel_region(par_emb_out, group)
    loss = vocab_parallel_cross_entropy(logits_of(pemb.weight, pemb.vocab_start_index), target, pemb.vocab_start_index, group)
    loss.sum().backward()

    torch.testing.assert_close(loss.flatten(), ref_loss.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(_gather_dim(pemb.weight.grad, 0), emb.weight.grad, atol=ATOL, rtol=0)
    assert torch.all(_gather_dim(pemb.weight.grad, 0)[vocab:] == 0)  # padding rows never learn
    return True


def _scatter_gather_are_duals():
    x = torch.arange(12.0).reshape(1, 12).requires_grad_(True)
    part = scatter_to_tensor_parallel_region(x, dist.group.WORLD)
    whole = gather_from_tensor_parallel_region(part * 2, dist.group.WORLD)
    whole.sum().backward()
    assert torch.equal(whole, 2 * x.detach())
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_column_row_linear(tp):
    from megatron_bloom.testing import run_distributed

    assert all(run_distributed(_mlp_parity, tp, timeout=90))


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding_and_cross_entropy(tp):
    from megatron_bloom.testing import run_distributed

    assert all(run_distributed(_embedding_and_loss_parity, tp, timeout=90))


def test_scatter_gather():
    from megatron_bloom.testing import run_distributed

    assert all(run_distributed(_scatter_gather_are_duals, 3, timeout=90))


def test_single_rank_cross_entropy_matches_torch():
    torch.manual_seed(2)
    logits = torch.randn(4, 6, 11, requires_grad=True)
    target = torch.randint(0, 11, (4, 6))
    ours = vocab_parallel_cross_entropy(logits, target)
    ref = F.cross_entropy(logits.detach().clone().requires_grad_(True).flatten(0, 1), target.flatten(), reduction="none")
    torch.testing.assert_close(ours.flatten(), ref, atol=1e-6, rtol=0)
    l2 = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(l2.flatten(0, 1), target.flatten()).backward()
    ours.mean().backward()
    torch.testing.assert_close(logits.grad, l2.grad, atol=1e-7, rtol=0)
