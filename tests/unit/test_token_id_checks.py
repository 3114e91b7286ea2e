"""docs/bad-inputs.md: a corpus too large to scan at start-up is left to the check of every batch,
which stops at the first batch holding a token id >= vocab_size with one line naming the sample."""
import pytest

from megatron_bloom.config import RunConfig
from megatron_bloom.data.indexed_dataset import (MMapIndexedDataset, MMapIndexedDatasetBuilder, data_file_path,
                                                 index_file_path, token_stats_path)
from megatron_bloom.errors import UserError
from megatron_bloom.training.data import pretraining_micro_batch
from megatron_bloom.training.preflight import check_data

VOCAB = 200


@pytest.fixture
def prefix(tmp_path):
    """Two documents of 33 tokens, the second holding id 399: data of a larger vocabulary, with no
    PREFIX.tokens.json (another tool's data), so start-up must scan the .bin to find it."""
    p = str(tmp_path / "corpus_text_document")
    builder = MMapIndexedDatasetBuilder(data_file_path(p), dtype="uint16")
    for doc in ([5] * 33, [7] * 32 + [399]):
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(index_file_path(p))
    assert not (tmp_path / token_stats_path("corpus_text_document")).exists()
    return p


def _cfg(prefix: str) -> RunConfig:
    cfg = RunConfig()
    cfg.model.vocab_size = VOCAB
    cfg.data.data_path = [prefix]
    return cfg


def test_start_up_scans_a_bin_within_the_limit(prefix):
    with pytest.raises(UserError, match=r"holds token id 399 >= vocab_size 200"):
        check_data(_cfg(prefix))


def test_a_bin_past_the_scan_limit_is_caught_by_the_batch_check(prefix, monkeypatch):
    scan = MMapIndexedDataset.max_token_id
    # The .bin (132 bytes) is "too large" under a 10-byte limit, as an 8 GB+ corpus is under the real one.
    monkeypatch.setattr(MMapIndexedDataset, "max_token_id", lambda self, scan_limit_bytes=10: scan(self, scan_limit_bytes))
    ds = MMapIndexedDataset(prefix)
    assert ds.max_token_id() == (None, "unknown")
    check_data(_cfg(prefix))  # start-up lets it through: it cannot know the largest id
    pretraining_micro_batch([{"text": ds[0]}], 0, VOCAB)  # a batch within the vocabulary trains
    with pytest.raises(UserError) as err:
        pretraining_micro_batch([{"text": ds[0]}, {"text": ds[1]}], 6, VOCAB)
    assert str(err.value) == ("training sample 6 holds token id 399 >= vocab_size 200: the data was tokenized "
                              "with a larger vocabulary; re-preprocess it or set --vocab-size")
