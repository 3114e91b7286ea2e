"""Megatron-DeepSpeed's xP3 pairs (two MMIDIDX files per prefix) and its DecoderPackedMTFDataset packing.

Megatron-DeepSpeed (bigscience's ``t0loading`` finetune_t0.py, used for BLOOMZ) tokenizes an xP3
jsonl twice with ``tools/preprocess_data.py``: ``--json-keys inputs`` and ``--json-keys targets
--append-eod --prepend-space``. A mixture entry ``PREFIX`` then means four files::

    PREFIX_inputs_document.bin / .idx     document i = the prompt tokens of pair i
    PREFIX_targets_document.bin / .idx    document i = " " + answer tokens + EOD of pair i

Both are plain MMIDIDX (indexed_dataset.py), one sequence per document; nothing ties pair i of one
file to pair i of the other but the order, so opening checks the counts agree. They hold no names:
language and task come from the prefix (``names_from_prefix``). Our own paired format (xp3.py,
``PREFIX.bin/.idx/.pairs.json/.pairs.npy``) keeps working; ``open_pairs`` tells them apart.

Packing as DecoderPackedMTFDataset does it (``mtf_sample_index`` / ``MTFPackedRows``):

* One ``numpy.random.RandomState(seed)`` per dataset, with the run's ``--seed`` itself (every
  dataset, train and valid, uses the same seed). Epoch after epoch it shuffles ``arange(n)`` in
  place and appends the permutation to one stream of pair ids (the ``shuffle_index``).
* The stream is cut greedily, in order, into rows of at most ``seq_length + 1`` tokens (a pair is
  inputs + targets tokens): a pair that does not fit closes the row and opens the next. A pair
  longer than ``seq_length + 1`` closes the row and is SKIPPED (never truncated). A row still open
  at the end of an epoch continues with the next epoch's first pairs. Epochs are added until more
  than ``num_samples`` rows exist (``len > num_samples``); the row left open at the end is dropped.
* A row is the pairs' tokens back to back, then padding: ``segment_ids`` 1, 2, ... per pair (0 on
  padding), ``is_inputs`` true on input tokens. Training (finetune_t0.get_batch_pipe) uses
  ``tokens = row[:-1]``, ``labels = row[1:]`` and a loss on positions whose label is a target token
  (``~is_inputs[1:]``, padding excluded), so the first target token is predicted from the last
  input token and a target's EOD is the last label of its segment.
* ``--norm-target-loss`` there divides each run of loss positions by its length: 1/len(target) per
  target token, which is our ``sequence_weight``.

Deliberate differences, all invisible on bigscience's xP3 training mixtures (ranges ``0:1`` /
``0:0.950``, BLOOM's tokenizer):

* Megatron-DeepSpeed shuffles ``arange(len(range))`` and reads those ids WITHOUT adding the range
  start, so a ``0.950:1`` validation range actually reads the first 5 % of the file (training
  pairs). We add the start: the pairs read are those of the range. For ranges starting at 0 the
  rows are identical.
* It masks out any label equal to the pad id (that is how it drops padding). We drop padding by its
  segment id 0 instead, so a target token that happens to equal the pad id still counts; BLOOM's
  pad is a special token that text never produces.
* A pair with an empty inputs or targets document trips an assertion there; here it is skipped and
  counted (``skipped_unfittable``), like an overlong pair.
* It caches the index in ``.npy`` files next to the data; here every rank builds it in memory
  (one Python step per row, not per pair; 10M pairs took 13-29 s on a loaded 2-core machine, a
  third of it RandomState's shuffle, which Megatron-DeepSpeed pays too).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_bloom.data.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    token_stats_path,
)
from megatron_bloom.data.packing import PackingStats
from megatron_bloom.errors import UserError

FORMAT_PAIRED = "paired"
FORMAT_MDS = "megatron-deepspeed"
INPUTS_KEY = "inputs"
TARGETS_KEY = "targets"
LEVEL = "document"
BLOOM_PAD_ID = 3
"""BLOOM tokenizer's <pad>; used for padding positions when no --tokenizer-name-or-path says otherwise
(the value never reaches the loss: padding has segment id 0 and weight 0)."""
UNKNOWN = "unknown"

XP3_LANGUAGES = frozenset(
    "ak ar as bm bn ca code en es eu fon fr gu hi id ig ki kn lg ln ml mr ne nso ny or pa pt rn rw sn st sw "
    "ta te tn ts tum tw ur vi wo xh yo zh zu".split()
)
"""The 46 language folders of xP3 (bigscience data/xp3 scripts), 'code' included."""
SPLIT_WORDS = frozenset({"train", "validation", "valid", "test", "dev"})


def mds_prefix(prefix: str, key: str) -> str:
    """``PREFIX_{key}_document``: the name Megatron-DeepSpeed's preprocess_data.py gives json key ``key``."""
    return f"{prefix}_{key}_{LEVEL}"


def mds_files(prefix: str) -> List[str]:
    return [path(mds_prefix(prefix, key)) for key in (INPUTS_KEY, TARGETS_KEY) for path in (data_file_path, index_file_path)]


def paired_files(prefix: str) -> List[str]:
    return [data_file_path(prefix), index_file_path(prefix), prefix + ".pairs.json", prefix + ".pairs.npy"]


def pair_format(prefix: str) -> str:
    """``"paired"`` (xp3.py) or ``"megatron-deepspeed"`` (two files) for a mixture prefix; UserError if neither.

    Our paired format wins when both sets of files exist.
    """
    paired, mds = paired_files(prefix), mds_files(prefix)
    if all(os.path.isfile(p) for p in paired):
        return FORMAT_PAIRED
    if all(os.path.isfile(p) for p in mds):
        return FORMAT_MDS
    for key in (INPUTS_KEY, TARGETS_KEY):
        suffix = f"_{key}_{LEVEL}"
        if prefix.endswith(suffix):
            raise UserError(f"{prefix}: give the pair's prefix without {suffix!r}, i.e. {prefix[:-len(suffix)]} "
                            f"(it names both {INPUTS_KEY} and {TARGETS_KEY} files)")
    # Name the missing files of the format that is partly there (else of both).
    partial = [files for files in (mds, paired) if any(os.path.isfile(p) for p in files)]
    missing = [p for files in (partial or [mds, paired]) for p in files if not os.path.isfile(p)]
    raise UserError(
        f"{prefix}: no finetuning pairs: missing {', '.join(missing)}; create Megatron-DeepSpeed's two files "
        f"(tools/preprocess_data.py --json-keys inputs, then --json-keys targets --append-eod --prepend-space, or "
        f"data_tools/preprocess_xp3.py --output-format megatron-deepspeed) or our paired dataset "
        f"(data_tools/preprocess_xp3.py), and name the prefix without suffixes"
    )


def indexed_prefixes(prefix: str, pairs: bool = False) -> List[str]:
    """The MMIDIDX prefixes behind a data prefix, for a start-up check that opens every file of a run.

    ``[prefix]`` for plain (pretraining) data and our paired format; Megatron-DeepSpeed's
    ``[PREFIX_inputs_document, PREFIX_targets_document]`` when those are there. With ``pairs``
    (a finetune's prefixes), a prefix of neither format raises pair_format's UserError, which names
    the missing files and both ways to create them.
    """
    if pairs:
        return [prefix] if pair_format(prefix) == FORMAT_PAIRED else [mds_prefix(prefix, k) for k in (INPUTS_KEY, TARGETS_KEY)]
    if not MMapIndexedDataset.exists(prefix) and any(os.path.isfile(f) for f in mds_files(prefix)):
        pair_format(prefix)  # names the missing half when only part of a pair is there
        return [mds_prefix(prefix, k) for k in (INPUTS_KEY, TARGETS_KEY)]
    return [prefix]


def names_from_prefix(prefix: str) -> Tuple[str, str]:
    """(language, task) read off a bigscience prefix name; ``"unknown"`` where the name says nothing.

    The language is the last ``_`` field when it is an xP3 language or a two-letter code
    (``xp3_train_en``, ``xp3_en`` -> en); the task is what is left without split words
    (``xp3_train_en`` -> xp3, ``p31t0_train`` -> p31t0).
    """
    fields = [f for f in os.path.basename(os.path.normpath(prefix)).split("_") if f]
    language = UNKNOWN
    if fields and (fields[-1] in XP3_LANGUAGES or re.fullmatch(r"[a-z]{2}", fields[-1])):
        language = fields.pop()
    task = "_".join(f for f in fields if f.lower() not in SPLIT_WORDS)
    return language, task or UNKNOWN


class MegatronDeepSpeedPairs:
    """Pairs from ``PREFIX_inputs_document`` + ``PREFIX_targets_document``; same interface as xp3.PairedDataset.

    ``input_sizes`` / ``target_sizes`` (int64 [n]) plan rows without reading a token. Every pair
    gets the one language and task of ``names_from_prefix``.
    """

    format = FORMAT_MDS

    def __init__(self, prefix: str, pad_id: Optional[int] = None):
        self.prefix = prefix
        self.input_path, self.target_path = mds_prefix(prefix, INPUTS_KEY), mds_prefix(prefix, TARGETS_KEY)
        self.inputs_data = MMapIndexedDataset(self.input_path)
        self.targets_data = MMapIndexedDataset(self.target_path)
        n_in, n_tg = len(self.inputs_data.sizes), len(self.targets_data.sizes)
        d_in, d_tg = len(self.inputs_data.doc_idx) - 1, len(self.targets_data.doc_idx) - 1
        if n_in != n_tg or d_in != d_tg:
            raise UserError(
                f"{index_file_path(self.input_path)} holds {d_in:,} documents ({n_in:,} sequences) but "
                f"{index_file_path(self.target_path)} holds {d_tg:,} ({n_tg:,}): pair i is document i of both, "
                f"so they must come from the same jsonl; preprocess_data.py drops a row whose text tokenizes "
                f"to nothing from one file only: remove such rows and re-run both keys"
            )
        self.input_sizes = np.asarray(self.inputs_data.sizes, dtype=np.int64)
        self.target_sizes = np.asarray(self.targets_data.sizes, dtype=np.int64)
        language, task = names_from_prefix(prefix)
        self.languages: List[str] = [language]
        self.datasets: List[str] = [task]
        self.templates: List[str] = [""]
        zeros = np.zeros(n_in, dtype=np.int64)
        self.language_ids = self.dataset_ids = self.template_ids = zeros
        self.pad_id = BLOOM_PAD_ID if pad_id is None else int(pad_id)
        self.eod_id: Optional[int] = None

    def __len__(self) -> int:
        return len(self.input_sizes)

    def inputs(self, i: int, keep_last: Optional[int] = None) -> np.ndarray:
        size = int(self.input_sizes[i])
        keep = size if keep_last is None else min(keep_last, size)
        return self.inputs_data.get(i, offset=size - keep, length=keep)

    def targets(self, i: int) -> np.ndarray:
        return self.targets_data.get(i)


def open_pairs(prefix: str, pad_id: Optional[int] = None):
    """The pairs of a mixture prefix in whichever format it is (see ``pair_format``)."""
    if pair_format(prefix) == FORMAT_MDS:
        return MegatronDeepSpeedPairs(prefix, pad_id)
    from megatron_bloom.data.xp3 import PairedDataset

    return PairedDataset(prefix)


# --------------------------------------------------------------------------------------------------
# DecoderPackedMTFDataset's index
# --------------------------------------------------------------------------------------------------


def mtf_sample_index(sizes: np.ndarray, num_samples: int, capacity: int, seed: int
                     ) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """(sample_index int64 [rows, 2], shuffle_index int64 [epochs * n], epochs, skipped) as Megatron-DeepSpeed.

    ``sizes`` are the pairs' token counts (inputs + targets); ``capacity`` is ``seq_length + 1``.
    Row r holds the pairs ``shuffle_index[sample_index[r, 0]:sample_index[r, 1]]`` (positions in
    the stream of all epochs). ``skipped`` counts pair occurrences longer than a row. Where a row
    starting at each pair would end is one vectorized ``searchsorted`` per epoch; following those
    ends from row to row is the only Python loop (one step per row).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    if n == 0 or not np.any(sizes <= capacity):
        raise ValueError(f"no pair of the {n} given fits in a row of {capacity} tokens (seq_length + 1)")
    rng = np.random.RandomState(seed)
    shuffles: List[np.ndarray] = []
    rows: List[Tuple[int, int]] = []
    skipped = 0
    start = 0  # stream position where the open row starts
    while len(rows) <= num_samples:
        order = np.arange(n, dtype=np.int64)
        rng.shuffle(order)
        shuffles.append(order)
        # The open row's pairs (it may span earlier epochs when rows hold more pairs than n) + this epoch's.
        first_epoch = start // n
        tail = np.concatenate(shuffles[first_epoch:])[start - first_epoch * n:]
        cum = np.concatenate(([0], np.cumsum(sizes[tail])))
        m = len(tail)
        # nxt[i]: a row starting at pair i holds pairs i..nxt[i]-1 (pair nxt[i] is the first that does not fit).
        nxt = np.searchsorted(cum, cum[:-1] + capacity, side="right") - 1
        i = 0
        while i < m:
            j = int(nxt[i])
            if j >= m:
                break  # the row stays open for the next epoch
            if j > i:
                rows.append((start + i, start + j))
                i = j
            else:  # pair i alone is longer than a row: skipped
                skipped += 1
                i += 1
        start += i
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2), np.concatenate(shuffles), len(shuffles), skipped


class MTFPackedRows:
    """Rows of pairs ``[first, last)`` packed as DecoderPackedMTFDataset packs them (module docstring).

    Same interface as packing.PackedRows: ``len``, ``counts(k)``, ``row[k]`` with tokens, labels,
    loss_mask, sequence_weight, segment_ids, language, task (each ``seq_length`` long), ``stats``,
    ``epochs``, ``name``. ``stats`` covers every epoch built (``pairs`` counts pair occurrences) and
    its ``seq_length`` is the row capacity ``seq_length + 1``. ``seed`` is one int, the run's seed.
    """

    def __init__(self, paired, first: int, last: int, num_rows: int, seq_length: int, seed: int,
                 language_map: Optional[np.ndarray] = None, task_map: Optional[np.ndarray] = None, name: str = ""):
        self.paired = paired
        self.first = first
        self.seq_length = seq_length
        self.name = name or paired.prefix
        capacity = seq_length + 1
        inp = np.asarray(paired.input_sizes[first:last], dtype=np.int64)
        tgt = np.asarray(paired.target_sizes[first:last], dtype=np.int64)
        empty = (inp < 1) | (tgt < 1)
        sizes = np.where(empty, capacity + 1, inp + tgt)  # an empty half is skipped like an overlong pair
        try:
            self.sample_index, self.shuffle_index, self.epochs, skipped = mtf_sample_index(
                sizes, num_rows, capacity, int(np.atleast_1d(seed)[0]))
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        stream_tgt = np.concatenate(([0], np.cumsum(tgt[self.shuffle_index])))
        stream_tok = np.concatenate(([0], np.cumsum((inp + tgt)[self.shuffle_index])))
        s, e = self.sample_index[:, 0], self.sample_index[:, 1]
        self.row_target_tokens = stream_tgt[e] - stream_tgt[s]
        self.row_sequences = e - s
        n_empty = int(empty.sum()) * self.epochs
        self.stats = PackingStats(
            pairs=self.epochs * len(inp), packed=int(self.row_sequences.sum()), skipped_overlong=skipped - n_empty,
            skipped_unfittable=n_empty, rows=len(self.sample_index), tokens=int((stream_tok[e] - stream_tok[s]).sum()),
            target_tokens=int(self.row_target_tokens.sum()), seq_length=capacity)
        self.fill_rate = self.stats.fill_rate
        self.language_map = np.arange(len(paired.languages)) if language_map is None else np.asarray(language_map, np.int64)
        self.task_map = np.arange(len(paired.datasets)) if task_map is None else np.asarray(task_map, np.int64)

    def __len__(self) -> int:
        return len(self.sample_index)

    def pair_ids(self, k: int) -> np.ndarray:
        """Pair ids (into the whole dataset) of row k, in segment order."""
        s, e = self.sample_index[k]
        return self.first + self.shuffle_index[s:e]

    def counts(self, k: int) -> Tuple[int, int]:
        """(target tokens, target sequences) of row k, without reading tokens."""
        return int(self.row_target_tokens[k]), int(self.row_sequences[k])

    def packed(self, k: int) -> Dict[str, np.ndarray]:
        """Row k as DecoderPackedMTFDataset returns it: ``seq_length + 1`` token ids, segment ids, is_inputs."""
        cap = self.seq_length + 1
        tokens = np.full(cap, self.paired.pad_id, dtype=np.int64)
        segments = np.zeros(cap, dtype=np.int64)
        is_inputs = np.zeros(cap, dtype=bool)
        pos = 0
        for seg, pair in enumerate(self.pair_ids(k).tolist(), start=1):
            x, y = self.paired.inputs(pair), self.paired.targets(pair)
            tokens[pos:pos + len(x)] = x
            tokens[pos + len(x):pos + len(x) + len(y)] = y
            segments[pos:pos + len(x) + len(y)] = seg
            is_inputs[pos:pos + len(x)] = True
            pos += len(x) + len(y)
        return {"decoder_token_ids": tokens, "decoder_segment_ids": segments, "decoder_is_inputs": is_inputs}

    def __getitem__(self, k: int) -> Dict[str, np.ndarray]:
        row = self.packed(k)
        full, seg, is_in = row["decoder_token_ids"], row["decoder_segment_ids"], row["decoder_is_inputs"]
        ids = self.pair_ids(k)
        segment_ids = seg[:-1].copy()
        target = (~is_in[1:]) & (seg[1:] != 0)  # the label is a target token of a pair
        loss_mask = target.astype(np.float32)
        # 1 / target length of the label's pair (segment s is ids[s - 1]).
        tg_len = np.concatenate(([1], np.asarray(self.paired.target_sizes, np.int64)[ids]))
        weight = np.where(target, 1.0 / tg_len[seg[1:]], 0.0).astype(np.float32)
        langs = np.concatenate(([0], self.language_map[np.asarray(self.paired.language_ids)[ids]]))
        tasks = np.concatenate(([0], self.task_map[np.asarray(self.paired.dataset_ids)[ids]]))
        return {"tokens": full[:-1].copy(), "labels": full[1:].copy(), "loss_mask": loss_mask, "sequence_weight": weight,
                "segment_ids": segment_ids, "language": langs[segment_ids], "task": tasks[segment_ids]}


# --------------------------------------------------------------------------------------------------
# Writing the two files
# --------------------------------------------------------------------------------------------------


class MegatronDeepSpeedPairsWriter:
    """Writes ``PREFIX_inputs_document.{bin,idx}`` and ``PREFIX_targets_document.{bin,idx}`` as
    Megatron-DeepSpeed's preprocess_data.py would for the same token ids: MMIDIDX, one sequence per
    document, its dtype choice (uint16 below 65500 tokens, else int32). Files are written as
    ``*.tmp`` and renamed by ``commit`` (the .idx files last); a ``.tokens.json`` sidecar per file
    records the largest id, as for every dataset this project writes.
    """

    def __init__(self, prefix: str, dtype, meta: Optional[dict] = None):
        from megatron_bloom.data.readers import make_output_dir

        make_output_dir(prefix, "--output-prefix")
        self.prefix = prefix
        self.meta = dict(meta or {})
        self.paths = [mds_prefix(prefix, INPUTS_KEY), mds_prefix(prefix, TARGETS_KEY)]
        self._builders = [MMapIndexedDatasetBuilder(data_file_path(p) + ".tmp", dtype) for p in self.paths]
        self.num_pairs = 0
        self.input_tokens = 0
        self.target_tokens = 0
        self.per_language: Dict[str, List[int]] = {}

    def add_pairs(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], languages: Sequence[str],
                  datasets: Sequence[str] = (), templates: Sequence[str] = ()) -> None:
        """Append pairs (targets already ending with EOD); names only feed the summary."""
        if len(inputs) != len(targets) or len(languages) != len(inputs):
            raise ValueError("inputs, targets and languages must have the same length")
        if not len(inputs):
            return
        for builder, seqs in zip(self._builders, (inputs, targets)):
            lengths = np.array([len(s) for s in seqs], dtype=np.int64)
            builder.add_documents(np.concatenate([np.asarray(s) for s in seqs]), lengths)
        for inp, tgt, lang in zip(inputs, targets, languages):
            stats = self.per_language.setdefault(lang, [0, 0, 0])
            stats[0] += 1
            stats[1] += len(inp)
            stats[2] += len(tgt)
            self.input_tokens += len(inp)
            self.target_tokens += len(tgt)
        self.num_pairs += len(inputs)

    def commit(self) -> dict:
        """Move the files into place; returns counts in the shape xp3.PairedDatasetWriter.commit does."""
        for path, builder in zip(self.paths, self._builders):
            builder.finalize(index_file_path(path) + ".tmp")
        for path, builder in zip(self.paths, self._builders):
            if os.path.exists(index_file_path(path)):
                os.remove(index_file_path(path))  # no stale .idx next to a new .bin
            builder.write_token_stats(token_stats_path(path), vocab_size=self.meta.get("vocab_size"))
            os.replace(data_file_path(path) + ".tmp", data_file_path(path))
        for path in self.paths:
            os.replace(index_file_path(path) + ".tmp", index_file_path(path))
        out = dict(self.meta)
        out.update(format=FORMAT_MDS, num_pairs=self.num_pairs, input_tokens=self.input_tokens,
                   target_tokens=self.target_tokens,
                   per_language={k: {"pairs": v[0], "input_tokens": v[1], "target_tokens": v[2]}
                                 for k, v in self.per_language.items()})
        return out

    def discard(self) -> None:
        for path, builder in zip(self.paths, self._builders):
            builder.close()
            for f in (data_file_path(path) + ".tmp", index_file_path(path) + ".tmp"):
                if os.path.exists(f):
                    os.remove(f)
