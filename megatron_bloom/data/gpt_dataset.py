"""GPT pretraining samples cut from an MMIDIDX token dataset, with Megatron's index semantics.

The documents of one split (a range of document ids) are concatenated in a shuffled order and cut
into samples of `seq_length + 1` tokens; sample k starts at token k * seq_length of that stream, so
consecutive samples share one token (the last label of sample k is the first input of sample k+1).
The preprocessor already appended EOD to every document, so nothing is inserted between them.

Three arrays describe that, exactly as in Megatron-LM / Megatron-DeepSpeed:

    doc_idx      int32 [num_epochs * num_documents]   document ids in stream order
    sample_idx   [num_total_samples + 1, 2]           (position in doc_idx, token offset) where
                                                      sample k starts; sample k ends at entry k+1
    shuffle_idx  [num_total_samples]                  order in which samples are served

They use the same `np.random.RandomState(seed)` calls in the same order as Megatron, so the same
documents, seed, seq_length and num_samples give the same sample order as a Megatron-DeepSpeed run.
The arrays are built once (vectorized numpy: millions of documents take seconds) by one rank and
cached as .npy files next to the data; every rank then memory-maps them.

Worked example, seq_length=4, documents of 3, 5 and 2 tokens in stream order A B C:

    stream      a0 a1 a2 b0 b1 b2 b3 b4 c0 c1      (10 tokens -> (10 - 1) // 4 = 2 samples)
    sample 0    a0 a1 a2 b0 b1                     sample_idx[0] = (0, 0)
    sample 1                b1 b2 b3 b4 c0         sample_idx[1] = (1, 1), sample_idx[2] = (2, 0)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_bloom.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

# Bump when the meaning of the cached arrays changes, so stale caches are never loaded.
_INDEX_FORMAT_VERSION = 1
# Megatron's rule: a last epoch holding fewer than this fraction of an epoch's samples is shuffled
# on its own, so its few samples are not spread (and diluted) over the whole run.
_SEPARATE_LAST_EPOCH_FRACTION = 0.80


# --------------------------------------------------------------------------------------------------
# Split parsing
# --------------------------------------------------------------------------------------------------


def parse_split(split: str) -> List[float]:
    """'969,30,1' (or '969/30/1', or '1') -> three normalized weights for train, valid and test."""
    sep = "," if "," in split else ("/" if "/" in split else None)
    parts = split.split(sep) if sep else [split]
    if len(parts) > 3:
        raise ValueError(f"--split {split!r} has {len(parts)} parts; give at most three: TRAIN,VALID,TEST")
    weights = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--split {split!r}: {part.strip()!r} is not a number; expected e.g. 969,30,1") from None
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"--split {split!r}: {part.strip()!r} must be a finite number >= 0")
        weights.append(value)
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"--split {split!r} sums to 0; give at least one positive weight, e.g. 969,30,1")
    return [w / total for w in weights]


def split_boundaries(split: str, num_documents: int) -> List[int]:
    """Document boundaries [0, train_end, valid_end, num_documents] with Megatron's rounding.

    Each part is rounded on its own (Python's round-half-even) and the rounding surplus is then
    taken off every boundary after the first, which is what Megatron's get_train_valid_test_split_
    does; keeping it means the same --split picks the same documents as a Megatron run.
    """
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    surplus = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - surplus for b in bounds[1:]]
    if any(b < 0 for b in bounds) or bounds != sorted(bounds):
        raise ValueError(f"--split {split!r} over {num_documents} documents gives boundaries {bounds}; use more documents")
    return bounds


def split_document_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """[(start, end)] document-id ranges of train, valid and test; an empty split has start == end."""
    b = split_boundaries(split, num_documents)
    return [(b[0], b[1]), (b[1], b[2]), (b[2], b[3])]


# --------------------------------------------------------------------------------------------------
# Index building (pure numpy; no caching, no ranks)
# --------------------------------------------------------------------------------------------------


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose stream holds num_samples samples.

    E epochs hold (E * tokens_per_epoch - 1) // seq_length samples: every sample needs seq_length
    new tokens plus one it shares with the next. Closed form of Megatron's incrementing loop.
    """
    if tokens_per_epoch <= 0:
        raise ValueError("the documents of this split hold no tokens; check --split and the .idx sizes")
    need = num_samples * seq_length + 1  # E * tokens_per_epoch must reach this
    return max(1, -(-need // tokens_per_epoch))


def _separate_last_epoch(num_epochs: int, tokens_per_epoch: int, seq_length: int, num_samples: int) -> Tuple[bool, int]:
    """(whether the last epoch is shuffled apart, samples in the epochs before it)."""
    if num_epochs == 1:
        return False, 0
    from_earlier_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - from_earlier_epochs
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    # num_epochs_needed guarantees 0 <= last_epoch_samples <= samples_per_epoch.
    assert 0 <= last_epoch_samples <= samples_per_epoch + 1, (last_epoch_samples, samples_per_epoch)
    separate = last_epoch_samples < int(_SEPARATE_LAST_EPOCH_FRACTION * samples_per_epoch)
    return separate, from_earlier_epochs


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool) -> np.ndarray:
    """Documents repeated num_epochs times and shuffled.

    As in Megatron the epochs are shuffled together (one document can come back before every other
    has been seen), except a separated last epoch, which is shuffled on its own and put last.
    """
    documents = np.asarray(documents)
    if separate_last_epoch and num_epochs > 1:
        first = build_doc_idx(documents, num_epochs - 1, rng, False)
        last = build_doc_idx(documents, 1, rng, False)
        return np.concatenate((first, last))
    doc_idx = np.tile(documents, num_epochs).astype(np.int32)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (doc_idx position, offset) of the token where each sample starts.

    Sample k starts at stream token k * seq_length, so entry k is found by a binary search of that
    position in the cumulative document lengths: no per-sample Python loop. Entry k+1 is also the
    last token of sample k. Entry 0 is (0, 0) even if the first document is empty, as in Megatron.
    """
    lengths = np.asarray(sizes)[doc_idx].astype(np.int64)
    ends = np.cumsum(lengths)  # ends[j]: stream position just after document doc_idx[j]
    stream_tokens = int(ends[-1]) if len(ends) else 0
    if num_samples * seq_length >= stream_tokens:
        raise ValueError(f"{num_samples} samples of {seq_length} tokens need more than the {stream_tokens} tokens of doc_idx")
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    # First document whose end lies beyond the position; empty documents are skipped naturally.
    doc_pos = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[doc_pos] - lengths[doc_pos])
    big = max(len(doc_idx), int(lengths.max(initial=0))) >= np.iinfo(np.int32).max
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64 if big else np.int32)
    sample_idx[0] = 0
    sample_idx[1:, 0] = doc_pos
    sample_idx[1:, 1] = offsets
    return sample_idx


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


@dataclass
class IndexMappings:
    """The three arrays a GPTDataset reads through (see the module docstring)."""

    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    num_epochs: int


def build_index_mappings(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int, seed: int) -> IndexMappings:
    """doc_idx, sample_idx and shuffle_idx for `num_samples` samples of the given documents."""
    if num_samples < 1 or seq_length < 1:
        raise ValueError(f"num_samples={num_samples} and seq_length={seq_length} must both be >= 1")
    documents = np.asarray(documents)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate_last, from_earlier = _separate_last_epoch(num_epochs, tokens_per_epoch, seq_length, num_samples)
    # One generator for all three arrays, consumed in Megatron's order: doc_idx, then shuffle_idx.
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total_samples)
    shuffle_idx = build_shuffle_idx(from_earlier if separate_last else total_samples, total_samples, rng)
    return IndexMappings(doc_idx, sample_idx, shuffle_idx, num_epochs)


# --------------------------------------------------------------------------------------------------
# Cache: built by one rank, written atomically, memory-mapped by all
# --------------------------------------------------------------------------------------------------

_ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


def _cache_key(
    data_prefix: str, name: str, documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int, seed: int,
    cache_dir: Optional[str],
) -> Tuple[str, str]:
    """(path stem of the cache files, JSON description of what they were built from).

    The readable part of the name says what a human needs (split name, samples, seq length, seed);
    the hash covers the exact document set and the dataset's size, so a re-preprocessed corpus or a
    changed --split never loads another run's indices. The data directory is not part of the key:
    moving data together with its caches keeps them valid.
    """
    documents = np.ascontiguousarray(documents, dtype=np.int64)
    description = json.dumps({
        "version": _INDEX_FORMAT_VERSION,
        "dataset": os.path.basename(data_prefix),
        "name": name,
        "num_sequences": int(len(sizes)),
        "documents_md5": hashlib.md5(documents.tobytes()).hexdigest(),
        "num_documents": int(len(documents)),
        "tokens_per_epoch": int(np.asarray(sizes)[documents].sum(dtype=np.int64)),
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
    }, indent=1, sort_keys=True)
    digest = hashlib.md5(description.encode()).hexdigest()[:12]
    directory = cache_dir if cache_dir is not None else (os.path.dirname(data_prefix) or ".")
    base = os.path.basename(data_prefix)
    return os.path.join(directory, f"{base}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_{digest}"), description


def index_cache_paths(
    data_prefix: str, name: str, documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int, seed: int,
    cache_dir: Optional[str] = None,
) -> dict:
    """{"doc_idx", "sample_idx", "shuffle_idx", "description"} -> file path (default: next to the data)."""
    stem, _ = _cache_key(data_prefix, name, documents, sizes, num_samples, seq_length, seed, cache_dir)
    paths = {a: f"{stem}_{a}.npy" for a in _ARRAYS}
    paths["description"] = f"{stem}_description.json"
    return paths


def load_or_build_index_mappings(
    data_prefix: str, name: str, documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int, seed: int,
    build_on_this_rank: bool = True, barrier: Optional[Callable[[], None]] = None, cache_dir: Optional[str] = None,
) -> Tuple[IndexMappings, bool]:
    """(mappings memory-mapped from the cache, whether this call built them).

    Call on every rank with the same arguments. Ranks with build_on_this_rank=True build the cache
    if any file is missing (pass True on one rank, or one rank per node without a shared
    filesystem); then everyone calls `barrier()` and loads. A build killed halfway leaves only temp
    files, never the three final names, so the next start rebuilds rather than loading garbage.
    """
    stem, description = _cache_key(data_prefix, name, documents, sizes, num_samples, seq_length, seed, cache_dir)
    paths = {a: f"{stem}_{a}.npy" for a in _ARRAYS}
    complete = all(os.path.isfile(paths[a]) for a in _ARRAYS)
    built = False
    try:
        if build_on_this_rank and not complete:
            start = time.time()
            os.makedirs(os.path.dirname(paths["doc_idx"]) or ".", exist_ok=True)
            mappings = build_index_mappings(documents, sizes, num_samples, seq_length, seed)
            # Written for humans wondering what a cache file holds; never read back.
            # A unique temporary name: builders on several nodes sharing a filesystem cannot collide.
            atomic_write_bytes(f"{stem}_description.json", lambda f: f.write(description.encode()), unique=True)
            # shuffle_idx is renamed last; the loader checks all three, so order only aids debugging.
            for a in _ARRAYS:
                atomic_write_bytes(paths[a], lambda f, arr=getattr(mappings, a): np.save(f, arr, allow_pickle=False),
                                   unique=True)
            built = True
            logger.info("built %s index for %s (%d epochs, %d samples) in %.2fs", name, data_prefix,
                        mappings.num_epochs, len(mappings.shuffle_idx), time.time() - start)
    finally:
        # Reached even when the build raised, so waiting ranks fail on the missing cache below
        # instead of hanging in the barrier until a collective timeout.
        if barrier is not None:
            barrier()
    missing = [paths[a] for a in _ARRAYS if not os.path.isfile(paths[a])]
    if missing:
        raise FileNotFoundError(
            f"index cache {missing[0]} was not built: pass build_on_this_rank=True on one rank that shares this "
            f"filesystem (one per node without a shared filesystem), or check that rank's error"
        )
    loaded = {a: np.load(paths[a], mmap_mode="r", allow_pickle=False) for a in _ARRAYS}
    tokens_per_epoch = int(np.asarray(sizes)[np.asarray(documents)].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    return IndexMappings(loaded["doc_idx"], loaded["sample_idx"], loaded["shuffle_idx"], epochs), built


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


class GPTDataset:
    """Samples of seq_length + 1 tokens from `documents` of an MMapIndexedDataset.

    `len(ds)` is every sample of the epochs needed (at least num_samples, as in Megatron);
    `ds[i]` is {"text": int64 array [seq_length + 1]} of the i-th sample in shuffled order. No torch
    import: torch's DataLoader takes any object with __len__ and __getitem__. Resuming is the
    sampler's job (PretrainingSampler starts at consumed_samples); the order here never changes.
    """

    def __init__(
        self, name: str, data_prefix: str, documents: Sequence[int], indexed_dataset, num_samples: int,
        seq_length: int, seed: int, *, build_on_this_rank: bool = True, barrier: Optional[Callable[[], None]] = None,
        cache_dir: Optional[str] = None,
    ):
        documents = np.asarray(documents, dtype=np.int64)
        n_seq = len(indexed_dataset.sizes)
        if len(documents) == 0 or documents.min() < 0 or documents.max() >= n_seq:
            raise ValueError(f"{name}: documents must be a non-empty set of ids in [0, {n_seq}) of {data_prefix}")
        self.name = name
        self.data_prefix = data_prefix
        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        self.num_samples = num_samples
        mappings, self.index_was_built = load_or_build_index_mappings(
            data_prefix, name, documents, indexed_dataset.sizes, num_samples, seq_length, seed,
            build_on_this_rank=build_on_this_rank, barrier=barrier, cache_dir=cache_dir,
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = mappings.doc_idx, mappings.sample_idx, mappings.shuffle_idx
        self.num_epochs = mappings.num_epochs

    def __len__(self) -> int:
        # sample k spans sample_idx[k] .. sample_idx[k+1], hence the -1.
        return self.sample_idx.shape[0] - 1

    def sample_tokens(self, k: int) -> np.ndarray:
        """Tokens of sample k in stream (unshuffled) order, int64 [seq_length + 1]."""
        first_doc, first_off = (int(v) for v in self.sample_idx[k])
        last_doc, last_off = (int(v) for v in self.sample_idx[k + 1])
        get = self.indexed_dataset.get
        if first_doc == last_doc:
            return np.array(get(int(self.doc_idx[first_doc]), offset=first_off, length=last_off - first_off + 1), dtype=np.int64)
        pieces = [get(int(self.doc_idx[first_doc]), offset=first_off)]
        pieces += [get(int(self.doc_idx[j])) for j in range(first_doc + 1, last_doc)]
        pieces.append(get(int(self.doc_idx[last_doc]), length=last_off + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, idx: int) -> dict:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {n} samples")
        return {"text": self.sample_tokens(int(self.shuffle_idx[idx]))}
