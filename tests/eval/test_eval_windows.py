"""Sliding windows and the context/continuation split, as pure functions."""
import pytest

from megatron_bloom.evaluation.scoring import encode_pair, model_input, sliding_windows

PREFIX = -1  # distinct from every token id below


def _scored(tokens, max_length, stride):
    """position -> number of tokens the model reads before predicting it, per window request."""
    seq = [PREFIX, *tokens]
    seen = {}
    for ctx, cont in sliding_windows(tokens, PREFIX, max_length, stride):
        inp = model_input(ctx, cont, max_length)
        assert 1 <= len(inp) <= max_length
        # the request must be a contiguous slice of seq whose continuation follows the context
        joined = [*ctx, *cont]
        start = next(i for i in range(len(seq)) if seq[i : i + len(joined)] == joined)
        first = start + len(ctx)
        for offset in range(len(cont)):
            p = first + offset
            assert p not in seen, f"position {p} scored twice"
            # the model reads inp, which ends right before the last continuation token
            seen[p] = len(inp) - (len(cont) - 1 - offset)
    return seen


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 8])
def test_every_token_once_with_enough_context(max_length):
    for n in range(0, 23):
        tokens = list(range(100, 100 + n))
        for stride in range(1, max_length + 1):
            seen = _scored(tokens, max_length, stride)
            assert sorted(seen) == list(range(1, n + 1))
            for p, context in seen.items():
                assert context >= min(p, max_length - stride + 1), (n, stride, p, context)
                assert context <= min(p, max_length)
            if stride == 1:  # stride 1: every token reads the full window
                assert all(c == min(p, max_length) for p, c in seen.items())


def test_stride_equal_to_max_length_gives_lm_evals_rolling_windows():
    utils = pytest.importorskip("lm_eval.utils")
    for n in range(0, 30):
        tokens = list(range(100, 100 + n))
        for max_length in (1, 2, 4, 7):
            theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=PREFIX, max_seq_len=max_length, context_len=1)]
            ours = sliding_windows(tokens, PREFIX, max_length, max_length)
            assert [(list(c), list(t)) for c, t in ours] == [(list(c), list(t)) for c, t in theirs]


def test_bad_window_settings():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows([1, 2], 0, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows([1, 2], 0, 4, 0)


def test_encode_pair_follows_the_harness():
    # a character-level "tokenizer" that shows where the split happens
    def encode(text):
        return [ord(c) for c in text]

    assert encode_pair(encode, "is ", "Paris", 1) == (encode("is"), encode(" Paris"))
    assert encode_pair(encode, "is", " Paris", 1) == (encode("is"), encode(" Paris"))
    assert encode_pair(encode, "", "Paris", 1) == ([1], encode("Paris"))
    assert encode_pair(encode, "  ", "Paris", 1) == ([1], encode("  Paris"))

