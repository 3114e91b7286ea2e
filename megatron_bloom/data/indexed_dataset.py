"""Token datasets on disk in Megatron's MMIDIDX format (`prefix.bin` + `prefix.idx`).

The layout is byte-compatible with the reader in Megatron-LM / Megatron-DeepSpeed, so shards made
by either tool chain load in the other:

    prefix.idx  magic b"MMIDIDX\\x00\\x00" (9 bytes)
                version      <Q  (always 1)
                dtype code   <B  (see _DTYPE_BY_CODE)
                n_sequences  <Q
                n_doc_idx    <Q  (number of documents + 1)
                sizes        int32[n_sequences]   tokens in each sequence
                pointers     int64[n_sequences]   byte offset of each sequence in .bin
                doc_idx      int64[n_doc_idx]     first sequence of each document, starts at 0
    prefix.bin  every sequence's tokens, concatenated, in `dtype`
    prefix.tokens.json  (ours, optional) the largest token id and what it was computed over

The .idx does not store the largest token id, yet a dataset tokenized with a larger vocabulary
than the model's must fail at start-up, not at the batch that first holds such an id. Scanning
the .bin is fast when it is in the page cache (`python benchmarks/dataset.py --scan-gb 1` times
it) but a multi-TB corpus read cold on every rank at every requeue is not, so the writers record
the largest id in a small sidecar (`max_token_id`, checked against the .bin size and sequence
count so a stale one is ignored); data from other tools without it is scanned when its .bin is
at most `SCAN_LIMIT_BYTES`.

A "sequence" is what one `add_item` call wrote (one json key of one document when preprocessing);
a "document" is a run of sequences closed by `end_document`. Preprocessing writes one sequence per
document, so the two counts usually match.

Nothing here imports torch: the preprocessing tools load this module in every worker process and
torch would add about a second to each start.
"""
from __future__ import annotations

import array
import json
import os
import shutil
import struct

import numpy as np

from megatron_bloom.atomic import atomic_write_text

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# Header: magic, version, dtype code, number of sequences, number of doc_idx entries.
_HEADER = struct.Struct("<9sQBQQ")

_DTYPE_BY_CODE = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_BY_DTYPE = {np.dtype(t): code for code, t in _DTYPE_BY_CODE.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated or inconsistent; the message names the file and fix."""


SCAN_LIMIT_BYTES = 8 << 30
"""Largest .bin scanned for its largest token id when it has no sidecar (docs/bad-inputs.md says how long)."""


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def token_stats_path(prefix: str) -> str:
    return prefix + ".tokens.json"


def write_token_stats(path: str, max_token_id: int | None, num_sequences: int, bin_bytes: int, **extra) -> None:
    """Write the sidecar (see the module docstring) atomically; ``extra`` adds e.g. the tokenizer."""
    stats = {"max_token_id": max_token_id, "num_sequences": num_sequences, "bin_bytes": bin_bytes, **extra}
    atomic_write_text(path, json.dumps(stats, indent=1, sort_keys=True))


def best_dtype(vocab_size: int) -> type:
    """Smallest token dtype for a vocabulary.

    The cut-off is 65500 rather than 65536 to match Megatron's preprocess_data, so the same
    tokenizer gives the same .bin whichever tool wrote it.
    """
    return np.uint16 if vocab_size < 65500 else np.int32


def _dtype_code(dtype) -> int:
    try:
        return _CODE_BY_DTYPE[np.dtype(dtype)]
    except KeyError:
        supported = ", ".join(np.dtype(t).name for t in _DTYPE_BY_CODE.values())
        raise IndexedDatasetError(f"dtype {np.dtype(dtype).name} cannot be stored in MMIDIDX; use one of {supported}") from None


def _as_numpy(item) -> np.ndarray:
    # torch tensors are accepted without importing torch: .numpy() is their zero-copy view.
    if isinstance(item, np.ndarray):
        return item
    if hasattr(item, "numpy"):
        return item.detach().cpu().numpy() if hasattr(item, "detach") else item.numpy()
    return np.asarray(item)


class MMapIndexedDataset:
    """Read-only view of an MMIDIDX dataset; the .bin file is memory-mapped, never loaded whole.

    `ds[i]` is sequence i as a numpy array (a view into the map: copy it before writing to it).
    The constructor checks the header and that the .bin holds exactly what the index points to,
    so a truncated copy or a .bin/.idx pair from different runs fails here, not mid-training.
    ``sizes`` (tokens per sequence), ``pointers`` (byte offsets into the .bin) and ``doc_idx``
    (first sequence of each document) are read-only views of the mapped .idx; ``dtype`` is the
    token dtype.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path}: file not found; pass the prefix without .bin/.idx and run "
                    f"data_tools/preprocess_data.py to create it"
                )
        self._read_index(idx_path)
        self._map_data(bin_path)

    def _read_index(self, idx_path: str) -> None:
        idx_bytes = os.path.getsize(idx_path)
        regenerate = "re-run data_tools/preprocess_data.py to regenerate it"
        if idx_bytes < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: {idx_bytes} bytes is shorter than the MMIDIDX header; {regenerate}")
        with open(idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != _MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: not an MMIDIDX index (magic {magic!r}); only the mmap format is supported, {regenerate}"
            )
        if version != _VERSION:
            raise IndexedDatasetError(f"{idx_path}: index version {version}, only version {_VERSION} is supported; {regenerate}")
        if code not in _DTYPE_BY_CODE:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}; {regenerate}")
        expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if idx_bytes != expected:
            raise IndexedDatasetError(
                f"{idx_path}: {idx_bytes} bytes but the header describes {n_seq} sequences and {n_doc} doc_idx "
                f"entries ({expected} bytes); the file is truncated or corrupt, {regenerate}"
            )
        self.dtype = np.dtype(_DTYPE_BY_CODE[code])
        # The whole index is small next to the .bin, but mapping it keeps start-up O(1) for huge corpora.
        self._idx_buffer = np.memmap(idx_path, mode="r", dtype=np.uint8) if idx_bytes else np.empty(0, np.uint8)
        offset = _HEADER.size
        self.sizes = np.frombuffer(self._idx_buffer, dtype=np.int32, count=n_seq, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(self._idx_buffer, dtype=np.int64, count=n_seq, offset=offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(self._idx_buffer, dtype=np.int64, count=n_doc, offset=offset)
        if n_doc == 0 or self.doc_idx[0] != 0 or self.doc_idx[-1] > n_seq:
            raise IndexedDatasetError(
                f"{idx_path}: doc_idx must start at 0 and end at most at {n_seq} sequences; the index is corrupt, {regenerate}"
            )

    def _map_data(self, bin_path: str) -> None:
        bin_bytes = os.path.getsize(bin_path)
        n = len(self.sizes)
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_bytes != expected:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_bytes} bytes but {index_file_path(self.path_prefix)} expects {expected}; the .bin is "
                f"truncated or belongs to another .idx, re-run data_tools/preprocess_data.py for this prefix"
            )
        # np.memmap refuses empty files, and an empty dataset is legal (e.g. a filtered-out shard).
        self._bin_buffer = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_bytes else np.empty(0, np.uint8)

    def __getstate__(self):
        # Pickle the path, not the maps: np.memmap would pickle as a full in-memory copy of the
        # .bin, which DataLoader workers started with spawn would each receive.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence `idx` (to its end when length is None)."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.path_prefix}")
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {size}")
        start = int(self.pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_buffer, dtype=self.dtype, count=length, offset=start)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def recorded_max_token_id(self) -> tuple[bool, int | None]:
        """(found, largest id) from the sidecar; found is False when it is missing, unreadable or
        describes another .bin (a different size or sequence count)."""
        try:
            with open(token_stats_path(self.path_prefix), encoding="utf-8") as f:
                stats = json.load(f)
            matches = (stats["bin_bytes"] == len(self._bin_buffer) and stats["num_sequences"] == len(self))
            value = stats["max_token_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return False, None
        if not matches or not (value is None or isinstance(value, int)):
            return False, None
        return True, value

    def scan_max_token_id(self, chunk_tokens: int = 1 << 24) -> int | None:
        """Largest token id in the .bin (None when empty), read in chunks of the memory map."""
        tokens = np.frombuffer(self._bin_buffer, dtype=self.dtype)
        if tokens.size == 0:
            return None
        return max(int(tokens[s : s + chunk_tokens].max()) for s in range(0, tokens.size, chunk_tokens))

    def max_token_id(self, scan_limit_bytes: int = SCAN_LIMIT_BYTES) -> tuple[int | None, str]:
        """(largest token id or None, how it was found: 'sidecar', 'scan', 'empty' or 'unknown').

        'unknown': no valid sidecar and a .bin larger than ``scan_limit_bytes``.
        """
        found, value = self.recorded_max_token_id()
        if found:
            return value, "sidecar"
        if len(self._bin_buffer) == 0:
            return None, "empty"
        if len(self._bin_buffer) > scan_limit_bytes:
            return None, "unknown"
        return self.scan_max_token_id(), "scan"

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))


class MMapIndexedDatasetBuilder:
    """Writes the .bin as items arrive; `finalize` writes the .idx (so an .idx means a complete .bin).

    Sizes and doc_idx are kept in `array.array`s rather than Python lists: they take 4/8 bytes per
    entry and extend from a numpy buffer without a Python loop.
    """

    def __init__(self, bin_path: str, dtype=np.int64):
        self._dtype = np.dtype(dtype)
        self._code = _dtype_code(self._dtype)
        self._bin_path = bin_path
        self._file = open(bin_path, "wb")
        self._sizes = array.array("i")
        self._doc_idx = array.array("q", [0])
        self._max_id: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def max_token_id(self) -> int | None:
        """Largest token id written so far (None before any token), for the sidecar."""
        return self._max_id

    def _seen(self, arr: np.ndarray) -> None:
        # One vectorized pass over ids already in memory: negligible next to tokenizing them.
        if arr.size:
            top = int(arr.max())
            self._max_id = top if self._max_id is None else max(self._max_id, top)

    def write_token_stats(self, path: str, **extra) -> None:
        """Write the sidecar of what was written so far (call after `finalize`)."""
        write_token_stats(path, self._max_id, len(self._sizes), os.path.getsize(self._bin_path), **extra)

    def add_item(self, tokens) -> None:
        """Append one sequence (np.ndarray, torch.Tensor or a list of ints)."""
        arr = np.ascontiguousarray(_as_numpy(tokens), dtype=self._dtype).reshape(-1)
        self._seen(arr)
        self._file.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)

    def add_items(self, items) -> None:
        """Append several sequences with one write (does not close documents)."""
        arrays = [np.asarray(_as_numpy(t), dtype=self._dtype).reshape(-1) for t in items]
        if not arrays:
            return
        flat = np.concatenate(arrays)
        self._seen(flat)
        self._file.write(flat.tobytes())
        self._sizes.extend(a.size for a in arrays)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append `len(lengths)` one-sequence documents whose tokens are `tokens`, concatenated.

        The preprocessing writer's path: one write and two buffer copies per batch, no per-document
        Python work.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        tokens = np.ascontiguousarray(tokens, dtype=self._dtype)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._seen(tokens)
        self._file.write(tokens.tobytes())
        first = len(self._sizes)
        self._sizes.frombytes(lengths.astype(np.int32).tobytes())
        self._doc_idx.frombytes(np.arange(first + 1, first + 1 + lengths.size, dtype=np.int64).tobytes())

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_prefix: str) -> None:
        """Append every sequence and document of another dataset (same dtype) to this one."""
        other = MMapIndexedDataset(another_prefix)
        if other.dtype != self._dtype:
            raise IndexedDatasetError(
                f"{index_file_path(another_prefix)}: dtype {other.dtype.name} differs from the output's "
                f"{self._dtype.name}; preprocess every shard with the same tokenizer"
            )
        top, _ = other.max_token_id(scan_limit_bytes=1 << 62)  # the copy below reads it all anyway
        if top is not None:
            self._max_id = top if self._max_id is None else max(self._max_id, top)
        offset = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(other.sizes).tobytes())
        # other.doc_idx[0] is 0, the end of what we already have; skip it to avoid an empty document.
        self._doc_idx.frombytes((np.asarray(other.doc_idx[1:]) + offset).astype(np.int64).tobytes())
        with open(data_file_path(another_prefix), "rb") as src:
            shutil.copyfileobj(src, self._file, length=16 << 20)

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else np.empty(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self._dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, self._code, len(sizes), len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())

    def close(self) -> None:
        """Close the .bin without writing an index (for aborted runs)."""
        if not self._file.closed:
            self._file.close()
