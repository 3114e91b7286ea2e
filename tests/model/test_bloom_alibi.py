"""ALiBi slopes and the attention bias builder, against transformers' BLOOM helpers."""
import pytest
import torch
from transformers.models.bloom import modeling_bloom as hf_bloom

from megatron_bloom.models.bloom.alibi import alibi_slopes, build_alibi_bias, make_alibi_mask


@pytest.mark.parametrize("n", list(range(1, 34)) + [48, 96, 112, 128])
def test_slopes_equal_transformers_bitwise(n):
    expected = hf_bloom._get_alibi_slopes(n, torch.device("cpu"))
    got = alibi_slopes(n)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, expected)


def test_slopes_slice_by_head_range():
    full = alibi_slopes(112)
    for tp in (2, 4, 8):
        chunks = [full[r * 112 // tp : (r + 1) * 112 // tp] for r in range(tp)]
        assert torch.equal(torch.cat(chunks), full)


def _hf_bias(mask: torch.Tensor, n: int, dtype=torch.float32):
    """transformers' alibi + its additive causal/padding mask, as one [b, n, s, s] tensor."""
    b, s = mask.shape
    alibi = hf_bloom.build_alibi_tensor(mask, n, dtype).view(b, n, 1, s)  # [b, n, 1, s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()  # [s, s]
    allowed = causal[None, None] & mask.bool()[:, None, None, :]  # [b, 1, s, s]
    return torch.where(allowed, alibi, torch.finfo(dtype).min)  # [b, n, s, s]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bias_matches_transformers_alibi_plus_mask(dtype):
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    got = build_alibi_bias(alibi_slopes(5), 6, attention_mask=mask, dtype=dtype)
    assert got.shape == (3, 5, 6, 6) and got.dtype == dtype
    assert torch.equal(got, _hf_bias(mask, 5, dtype))


def test_bias_without_mask_broadcasts_over_batch():
    got = build_alibi_bias(alibi_slopes(4), 5)
    assert got.shape == (1, 4, 5, 5)
    ones = torch.ones(3, 5, dtype=torch.long)
    assert torch.equal(got.expand(3, -1, -1, -1), _hf_bias(ones, 4))
    assert build_alibi_bias(alibi_slopes(4), 5, batch_size=3).shape == (3, 4, 5, 5)


def test_fully_masked_rows_give_no_nan():
    mask = torch.tensor([[0, 0, 0, 1]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bias = build_alibi_bias(alibi_slopes(2), 4, attention_mask=mask, dtype=dtype)
        assert torch.isfinite(bias).all()
        probs = torch.softmax(bias.float() + torch.randn(1, 2, 4, 4), -1)
        assert not probs.isnan().any()


def test_segments_restart_positions_and_block_other_segments():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 3, 3]])
    mask = make_alibi_mask(8, segment_ids=seg)
    assert mask.key_positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    allowed = mask.allowed[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],  # segment 0 = padding: sees nothing, is seen by nobody
            [0, 0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(allowed, expected)


def test_repeated_segment_id_is_a_new_sample_when_not_contiguous():
    seg = torch.tensor([[1, 1, 2, 1, 1]])
    mask = make_alibi_mask(5, segment_ids=seg)
    assert mask.key_positions.tolist() == [[0, 1, 0, 0, 1]]
    assert not mask.allowed[0, 0, 3, :3].any()


def test_segments_combined_with_padding_mask_count_only_real_tokens():
    seg = torch.tensor([[1, 1, 1, 2, 2, 2]])
    am = torch.tensor([[0, 1, 1, 1, 0, 1]])
    mask = make_alibi_mask(6, segment_ids=seg, attention_mask=am)
    assert mask.key_positions.tolist() == [[0, 0, 1, 0, 0, 1]]


def test_past_length_gives_last_rows_of_full_bias():
    torch.manual_seed(0)
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2]])
    slopes = alibi_slopes(3)
    for kwargs in ({}, {"attention_mask": am}, {"segment_ids": seg}):
        full = build_alibi_bias(slopes, 7, **kwargs)  # [b|1, 3, 7, 7]
        for past in (0, 3, 6):
            step = build_alibi_bias(slopes, 7 - past, past_length=past, **kwargs)
            assert step.shape[-2:] == (7 - past, 7)
            assert torch.equal(step, full[:, :, past:])


def test_wrong_mask_length_is_rejected():
    with pytest.raises(ValueError, match="past_length"):
        make_alibi_mask(3, past_length=2, attention_mask=torch.ones(1, 3))
