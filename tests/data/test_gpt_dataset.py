"""GPT dataset indices: Megatron semantics, token stream integrity, determinism, cache and ranks."""
import os
import threading

import numpy as np
import pytest

from megatron_bloom.data import gpt_dataset as gd
from megatron_bloom.data.gpt_dataset import (
    GPTDataset,
    build_index_mappings,
    build_sample_idx,
    index_cache_paths,
    num_epochs_needed,
    split_boundaries,
    split_document_ranges,
)
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron_bloom.data.samplers import PretrainingSampler


def write_corpus(tmp_path, lengths, name="corpus"):
    """A .bin/.idx whose token at position p of document d is d * 1000 + p, so any token names its source."""
    prefix = str(tmp_path / name)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d, n in enumerate(lengths):
        builder.add_item(np.arange(n, dtype=np.int32) + d * 1000)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix, MMapIndexedDataset(prefix)


def reference_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """Megatron's sequential walk (helpers.cpp build_sample_idx), written out as the spec."""
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_pos, offset = 0, 0
    for k in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[doc_idx[doc_pos]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                doc_pos += 1
                offset = 0
        out[k] = (doc_pos, offset)
    return out


def stream_of(ds, indexed):
    """The concatenated tokens of ds.doc_idx: what the samples must be cut from."""
    return np.concatenate([np.asarray(indexed[int(d)], dtype=np.int64) for d in ds.doc_idx])


# --- split parsing ---------------------------------------------------------------------------------


def test_split_boundaries_follow_megatron_rounding():
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    # Each third rounds down to 3; Megatron moves the missing document onto every later boundary.
    assert split_boundaries("1,1,1", 10) == [0, 4, 7, 10]
    assert split_boundaries("98/2", 10) == [0, 10, 10, 10]
    assert split_boundaries("1", 7) == [0, 7, 7, 7]
    assert split_document_ranges("8,1,1", 100) == [(0, 80), (80, 90), (90, 100)]


@pytest.mark.parametrize("bad, word", [("9a,1", "'9a'"), ("1,2,3,4", "4 parts"), ("0,0,0", "sums to 0"), ("1,-1", "'-1'")])
def test_split_errors_name_the_problem(bad, word):
    with pytest.raises(ValueError, match=word):
        split_boundaries(bad, 100)


# --- pure index building ---------------------------------------------------------------------------


def test_num_epochs_matches_megatron_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens, seq, n = int(rng.integers(1, 5000)), int(rng.integers(1, 300)), int(rng.integers(1, 2000))
        epochs, total = 0, 0
        while True:  # Megatron's _num_epochs
            epochs += 1
            total += tokens
            if (total - 1) // seq >= n:
                break
        assert num_epochs_needed(tokens, seq, n) == epochs


@pytest.mark.parametrize("seq_length", [1, 7, 64])
def test_vectorized_sample_idx_equals_sequential_walk(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(1, 50, size=300).astype(np.int32)
    sizes[[3, 50, 51]] = 0  # empty documents are skipped, not counted
    doc_idx = rng.permutation(np.tile(np.arange(300), 2)).astype(np.int32)
    n = (int(sizes[doc_idx].sum()) - 1) // seq_length
    got = build_sample_idx(sizes, doc_idx, seq_length, n)
    np.testing.assert_array_equal(got, reference_sample_idx(sizes, doc_idx, seq_length, n))


def test_indices_deterministic_per_seed_and_different_across_seeds():
    sizes = np.random.default_rng(1).integers(5, 200, size=2000).astype(np.int32)
    docs = np.arange(100, 1900)
    a = build_index_mappings(docs, sizes, 5000, 64, seed=1234)
    b = build_index_mappings(docs, sizes, 5000, 64, seed=1234)
    c = build_index_mappings(docs, sizes, 5000, 64, seed=4321)
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.doc_idx, c.doc_idx)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)


def test_megatron_random_stream_order():
    # Same RandomState draws in the same order as Megatron: one shuffle of the tiled documents,
    # then one of [0, total_samples). This pins the order so a refactor cannot silently change it.
    sizes = np.full(50, 10, dtype=np.int32)
    docs = np.arange(10, 40)
    m = build_index_mappings(docs, sizes, 20, 8, seed=7)
    rng = np.random.RandomState(7)
    expect_doc = docs.astype(np.int32).copy()
    rng.shuffle(expect_doc)
    total = (300 - 1) // 8
    expect_shuffle = np.arange(total, dtype=np.uint32)
    rng.shuffle(expect_shuffle)
    np.testing.assert_array_equal(m.doc_idx, expect_doc)
    np.testing.assert_array_equal(m.shuffle_idx, expect_shuffle)


@pytest.mark.parametrize("num_samples, separate", [(720, False), (420, True)])
def test_multi_epoch_and_last_epoch_handling(num_samples, separate):
    # 30 docs x 100 tokens = 3000 tokens = 187 samples of 16 per epoch.
    sizes = np.full(30, 100, dtype=np.int32)
    docs = np.arange(30)
    m = build_index_mappings(docs, sizes, num_samples, 16, seed=3)
    per_epoch = (3000 - 1) // 16
    assert m.num_epochs == num_epochs_needed(3000, 16, num_samples)
    assert m.num_epochs > 1
    np.testing.assert_array_equal(np.bincount(m.doc_idx, minlength=30), np.full(30, m.num_epochs))
    total = len(m.sample_idx) - 1
    assert total >= num_samples
    np.testing.assert_array_equal(np.sort(m.shuffle_idx), np.arange(total))
    from_earlier = ((m.num_epochs - 1) * 3000 - 1) // 16
    # Megatron: a last epoch with < 80% of an epoch's samples is shuffled apart and served last.
    assert separate == (num_samples - from_earlier < int(0.8 * per_epoch))
    if separate:
        np.testing.assert_array_equal(np.sort(m.doc_idx[-30:]), docs)
        np.testing.assert_array_equal(np.sort(m.shuffle_idx[:from_earlier]), np.arange(from_earlier))


# --- the dataset on real files ---------------------------------------------------------------------


def test_samples_reconstruct_the_split_token_stream(tmp_path):
    lengths = np.random.default_rng(2).integers(1, 40, size=120)
    prefix, indexed = write_corpus(tmp_path, lengths)
    lo, hi = split_document_ranges("80,15,5", 120)[0]
    seq = 16
    tokens = int(lengths[lo:hi].sum())
    n = (tokens - 1) // seq  # everything one epoch holds
    ds = GPTDataset("train", prefix, np.arange(lo, hi), indexed, n, seq, seed=5)
    assert ds.num_epochs == 1 and len(ds) == n
    # One epoch: every split document exactly once, nothing from outside the split.
    np.testing.assert_array_equal(np.sort(ds.doc_idx), np.arange(lo, hi))
    stream = stream_of(ds, indexed)
    assert len(stream) == tokens
    pieces = [ds.sample_tokens(k) for k in range(n)]
    assert all(p.dtype == np.int64 and p.shape == (seq + 1,) for p in pieces)
    for k in range(n - 1):
        assert pieces[k][-1] == pieces[k + 1][0]  # consecutive samples share one token
    rebuilt = np.concatenate([p[:-1] for p in pieces] + [pieces[-1][-1:]])
    np.testing.assert_array_equal(rebuilt, stream[: n * seq + 1])
    # Tokens of each document appear in order within it (token = doc * 1000 + position).
    assert np.all(np.diff(stream % 1000)[np.diff(stream // 1000) == 0] == 1)
    # __getitem__ serves the same samples, in shuffle_idx order.
    for i in (0, 1, n - 1):
        np.testing.assert_array_equal(ds[i]["text"], pieces[int(ds.shuffle_idx[i])])
    with pytest.raises(IndexError):
        ds[n]


def test_multi_epoch_dataset_reads_across_epoch_boundaries(tmp_path):
    prefix, indexed = write_corpus(tmp_path, [13, 7, 21, 5, 9])
    seq = 8
    ds = GPTDataset("train", prefix, np.arange(5), indexed, 40, seq, seed=11)
    assert ds.num_epochs == num_epochs_needed(55, seq, 40) > 1
    stream = stream_of(ds, indexed)
    for k in range(len(ds)):
        np.testing.assert_array_equal(ds.sample_tokens(k), stream[k * seq : k * seq + seq + 1])


def test_second_build_loads_the_cache(tmp_path, monkeypatch):
    prefix, indexed = write_corpus(tmp_path, [30] * 40)
    first = GPTDataset("train", prefix, np.arange(36), indexed, 100, 16, seed=1)
    assert first.index_was_built
    paths = index_cache_paths(prefix, "train", np.arange(36), indexed.sizes, 100, 16, 1)
    assert all(os.path.dirname(p) == str(tmp_path) for p in paths.values())  # next to the data

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index rebuilt although the cache is complete")

    monkeypatch.setattr(gd, "build_index_mappings", no_rebuild)
    second = GPTDataset("train", prefix, np.arange(36), indexed, 100, 16, seed=1)
    assert not second.index_was_built
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # Any change of split, samples or seed is a different key, so a different file set.
    other = index_cache_paths(prefix, "train", np.arange(35), indexed.sizes, 100, 16, 1)
    assert other["doc_idx"] != paths["doc_idx"]


def test_interrupted_build_is_never_loaded(tmp_path, monkeypatch):
    prefix, indexed = write_corpus(tmp_path, [30] * 40)
    args = ("train", prefix, np.arange(40), indexed, 60, 16)
    paths = index_cache_paths(prefix, "train", np.arange(40), indexed.sizes, 60, 16, 2)
    real_save = np.save

    def dies_on_shuffle_idx(f, arr, allow_pickle=False):
        if f.name.startswith(paths["shuffle_idx"]):
            f.write(b"\x93NUMPY half")  # a partial write, then the "kill"
            raise KeyboardInterrupt
        real_save(f, arr, allow_pickle=allow_pickle)

    monkeypatch.setattr(gd.np, "save", dies_on_shuffle_idx)
    with pytest.raises(KeyboardInterrupt):
        GPTDataset(*args, seed=2)
    monkeypatch.setattr(gd.np, "save", real_save)
    assert os.path.isfile(paths["doc_idx"]) and not os.path.exists(paths["shuffle_idx"])
    # A SIGKILL would also leave the temp file behind: plant one, it must be ignored.
    with open(paths["shuffle_idx"] + ".tmp-1-deadbeef", "wb") as f:
        f.write(b"\x93NUMPY half")
    # A rank that does not build refuses the incomplete set rather than loading part of it.
    with pytest.raises(FileNotFoundError, match="build_on_this_rank"):
        GPTDataset(*args, seed=2, build_on_this_rank=False)
    ds = GPTDataset(*args, seed=2)
    assert ds.index_was_built
    expect = build_index_mappings(np.arange(40), indexed.sizes, 60, 16, 2)
    np.testing.assert_array_equal(ds.shuffle_idx, expect.shuffle_idx)


def test_one_rank_builds_while_the_others_wait(tmp_path):
    prefix, indexed = write_corpus(tmp_path, [25] * 60)
    cache = tmp_path / "cache"
    world = 3
    barrier = threading.Barrier(world, timeout=30)
    results, errors = {}, []

    def rank(r):
        try:
            ds = GPTDataset(
                "train", prefix, np.arange(60), indexed, 80, 32, seed=9,
                build_on_this_rank=(r == 0), barrier=barrier.wait, cache_dir=str(cache),
            )
            results[r] = ds
        except Exception as e:  # surfaced below with the rank
            errors.append((r, e))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [results[r].index_was_built for r in range(world)] == [True, False, False]
    for r in (1, 2):
        np.testing.assert_array_equal(results[r].shuffle_idx, results[0].shuffle_idx)
    assert not [p for p in os.listdir(cache) if ".tmp-" in p]


# --- sampler: data-parallel order and resume -------------------------------------------------------


def test_sampler_megatron_rank_order():
    # Sample k goes to rank (k // micro_batch_size) % data_parallel_size.
    mbs, dp, total = 2, 3, 40
    for r in range(dp):
        batches = list(PretrainingSampler(total, 0, mbs, r, dp))
        assert all(len(b) == mbs for b in batches)
        assert all((k // mbs) % dp == r for b in batches for k in b)
    assert list(PretrainingSampler(total, 0, mbs, 1, dp))[:2] == [[2, 3], [8, 9]]


def test_dp_ranks_partition_every_global_batch():
    mbs, dp, total = 4, 4, 1000
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    for step in range(len(per_rank[0])):
        union = sorted(k for r in range(dp) for k in per_rank[r][step])
        assert union == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    # 1000 = 62 full global batches of 16 + 8 dropped samples.
    assert len(per_rank[0]) == 62 and len(PretrainingSampler(total, 0, mbs, 0, dp)) == 62


def test_resume_from_consumed_samples_equals_the_continuous_stream():
    mbs, dp, total = 3, 2, 500
    for r in range(dp):
        continuous = list(PretrainingSampler(total, 0, mbs, r, dp))
        first = PretrainingSampler(total, 0, mbs, r, dp)
        it = iter(first)
        head = [next(it) for _ in range(17)]
        state = first.state_dict()
        assert state["consumed_samples"] == 17 * mbs * dp
        resumed = PretrainingSampler(total, 0, mbs, r, dp)
        resumed.load_state_dict(state)
        assert head + list(resumed) == continuous
        # The constructor argument is the same resume point.
        assert head + list(PretrainingSampler(total, state["consumed_samples"], mbs, r, dp)) == continuous


def test_resumed_samples_are_the_same_tokens(tmp_path):
    prefix, indexed = write_corpus(tmp_path, [40] * 50)
    ds = GPTDataset("train", prefix, np.arange(50), indexed, 120, 16, seed=4)
    run = [ds[k]["text"] for b in PretrainingSampler(120, 0, 2, 0, 1) for k in b]
    resumed = [ds[k]["text"] for b in PretrainingSampler(120, 50, 2, 0, 1) for k in b]
    for a, b in zip(run[50:], resumed):
        np.testing.assert_array_equal(a, b)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data_parallel_rank=2"):
        PretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples=11"):
        PretrainingSampler(10, 11, 1, 0, 1)
    # Not dropping the tail: rank 0 gets what is left of the short last global batch.
    assert list(PretrainingSampler(10, 0, 2, 0, 2, drop_last=False))[-1] == [8, 9]
