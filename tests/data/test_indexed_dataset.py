"""MMIDIDX reader/builder: round trips, byte compatibility with an independent writer, corruption checks."""
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron_bloom.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)

# The format as published by Megatron (written out here from the spec, not from our module):
# magic, <Q version=1, <B dtype code, <Q n sequences, <Q n doc_idx, int32 sizes, int64 pointers,
# int64 doc_idx. Codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.
SPEC_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}


def independent_write(prefix, documents, dtype):
    """Write `documents` (a list of documents, each a list of sequences) straight from the spec."""
    sizes, doc_idx, blobs = [], [0], []
    for doc in documents:
        for seq in doc:
            arr = np.asarray(seq, dtype=dtype)
            blobs.append(arr.tobytes())
            sizes.append(arr.size)
        doc_idx.append(len(sizes))
    pointers, offset = [], 0
    for blob in blobs:
        pointers.append(offset)
        offset += len(blob)
    with open(prefix + ".bin", "wb") as f:
        f.write(b"".join(blobs))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", SPEC_CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(sizes, dtype=np.int32).tobytes())
        f.write(np.array(pointers, dtype=np.int64).tobytes())
        f.write(np.array(doc_idx, dtype=np.int64).tobytes())


def random_documents(rng, n_docs, vocab, max_seqs=3):
    return [
        [rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist() for _ in range(int(rng.integers(1, max_seqs + 1)))]
        for _ in range(n_docs)
    ]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_independent_writer_reads_back(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 25, 60000 if dtype == np.uint16 else 250_000)
    prefix = str(tmp_path / "ref")
    independent_write(prefix, docs, dtype)
    ds = MMapIndexedDataset(prefix)
    flat = [seq for doc in docs for seq in doc]
    assert len(ds) == len(flat)
    assert ds.dtype == np.dtype(dtype)
    assert ds.sizes.dtype == np.int32 and ds.doc_idx.dtype == np.int64
    assert ds.sizes.tolist() == [len(s) for s in flat]
    for i, seq in enumerate(flat):
        assert ds[i].tolist() == seq
    expected_doc_idx = np.cumsum([0] + [len(d) for d in docs])
    np.testing.assert_array_equal(ds.doc_idx, expected_doc_idx)


def test_builder_is_byte_identical_to_independent_writer(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_documents(rng, 30, 1000)
    independent_write(str(tmp_path / "ref"), docs, np.uint16)
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "ours.bin"), np.uint16)
    for d, doc in enumerate(docs):
        # Exercise every way in: numpy, torch, a list of sequences at once.
        if d % 3 == 0:
            builder.add_items([np.array(s) for s in doc])
        else:
            for seq in doc:
                builder.add_item(torch.tensor(seq, dtype=torch.int64) if d % 3 == 1 else np.array(seq))
        builder.end_document()
    builder.finalize(str(tmp_path / "ours.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def test_add_documents_fast_path_matches_per_item(tmp_path):
    seqs = [[5, 6, 7], [], [8], [9, 10]]
    a = MMapIndexedDatasetBuilder(str(tmp_path / "a.bin"), np.int32)
    a.add_documents(np.array([5, 6, 7, 8, 9, 10]), np.array([3, 0, 1, 2]))
    a.finalize(str(tmp_path / "a.idx"))
    b = MMapIndexedDatasetBuilder(str(tmp_path / "b.bin"), np.int32)
    for s in seqs:
        b.add_item(np.array(s))
        b.end_document()
    b.finalize(str(tmp_path / "b.idx"))
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_get_offsets_slices_and_negative_index(tmp_path):
    independent_write(str(tmp_path / "d"), [[list(range(10))], [[20, 21, 22]]], np.uint16)
    ds = MMapIndexedDataset(str(tmp_path / "d"))
    assert ds.get(0, offset=3, length=4).tolist() == [3, 4, 5, 6]
    assert ds.get(0, offset=8).tolist() == [8, 9]
    assert ds[-1].tolist() == [20, 21, 22]
    assert [x.tolist() for x in ds[0:2]] == [list(range(10)), [20, 21, 22]]
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds.get(1, offset=2, length=5)


def test_pickles_by_path_not_by_content(tmp_path):
    independent_write(str(tmp_path / "d"), [[list(range(5000))]], np.int32)
    ds = MMapIndexedDataset(str(tmp_path / "d"))
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the 20 kB of tokens stay on disk
    assert pickle.loads(blob)[0].tolist() == list(range(5000))


def test_merge_file_offsets_documents(tmp_path):
    independent_write(str(tmp_path / "a"), [[[1, 2]], [[3], [4, 5]]], np.uint16)
    independent_write(str(tmp_path / "b"), [[[6]], [[7, 8, 9]]], np.uint16)
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    builder.merge_file_(str(tmp_path / "a"))
    builder.merge_file_(str(tmp_path / "b"))
    builder.finalize(str(tmp_path / "m.idx"))
    independent_write(str(tmp_path / "ref"), [[[1, 2]], [[3], [4, 5]], [[6]], [[7, 8, 9]]], np.uint16)
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_merge_rejects_other_dtype(tmp_path):
    independent_write(str(tmp_path / "a"), [[[1, 2]]], np.int32)
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="dtype int32"):
        builder.merge_file_(str(tmp_path / "a"))
    builder.close()


def test_empty_dataset_round_trips(tmp_path):
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16)
    builder.finalize(str(tmp_path / "e.idx"))
    ds = MMapIndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.doc_idx.tolist() == [0]


def test_best_dtype_cutoff():
    assert best_dtype(1000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(250880) == np.int32  # BLOOM's padded vocabulary


# --- corruption is detected at load, with the file named -------------------------------------
@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    independent_write(prefix, [[list(range(50))], [list(range(7))]], np.uint16)
    return prefix


def _expect_error(prefix, *fragments):
    with pytest.raises(IndexedDatasetError) as info:
        MMapIndexedDataset(prefix)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_truncated_bin_is_detected(good):
    with open(data_file_path(good), "r+b") as f:
        f.truncate(20)
    _expect_error(good, data_file_path(good), "truncated", "preprocess_data.py")


def test_bin_from_another_index_is_detected(good, tmp_path):
    other = str(tmp_path / "other")
    independent_write(other, [[list(range(30))]], np.uint16)
    (tmp_path / "good.idx").write_bytes((tmp_path / "other.idx").read_bytes())
    _expect_error(good, data_file_path(good), "expects 60")


def test_truncated_idx_is_detected(good):
    data = open(index_file_path(good), "rb").read()
    open(index_file_path(good), "wb").write(data[:-5])
    _expect_error(good, index_file_path(good), "truncated")


def test_bad_magic_and_version_are_detected(good):
    data = bytearray(open(index_file_path(good), "rb").read())
    open(index_file_path(good), "wb").write(b"TNTIDX\x00\x00\x00" + bytes(data[9:]))
    _expect_error(good, index_file_path(good), "not an MMIDIDX")
    data[9:17] = struct.pack("<Q", 2)
    open(index_file_path(good), "wb").write(bytes(data))
    _expect_error(good, "version 2")


def test_missing_files_are_reported(tmp_path):
    _expect_error(str(tmp_path / "absent"), "absent.idx", "file not found")
