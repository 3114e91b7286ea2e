"""xP3-style prompt/answer pairs on disk: ONE paired dataset, so inputs and targets cannot drift apart.

    PREFIX.bin / PREFIX.idx   MMIDIDX (indexed_dataset.py); document i is exactly two sequences:
                              2i = the inputs (prompt) tokens, 2i+1 = the targets tokens, EOD last
    PREFIX.pairs.npy          int32 [num_pairs, 3]: language id, dataset id, template id of pair i
    PREFIX.pairs.json         names behind those ids, tokenizer, options and counts (see PAIRS_FORMAT)

The .idx holds both halves of a pair in one document, so no second file can be shuffled, merged or
truncated on its own; opening checks that every document has two sequences and that the id table
has one row per document. Files are written as ``*.tmp`` and renamed into place, the .idx and the
.json last, so an interrupted preprocessing run leaves nothing that looks finished.

Mixtures reuse Megatron's flags (blends.py): ``--data-path W1 P1 W2 P2`` or
``--train-weighted-split-paths "train: W START:END PREFIX, ..."`` where START:END are fractions of
each prefix's pairs, and bigscience's mixture files (see ``read_weighted_split_paths_file``).
A mixture prefix may also name Megatron-DeepSpeed's two-file pairs (``PREFIX_inputs_document`` +
``PREFIX_targets_document``, see mtf.py); ``mtf.open_pairs`` opens either format.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_bloom.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    token_stats_path,
)

PAIRS_FORMAT = "megatron-bloom-pairs"
PAIRS_VERSION = 1
UNKNOWN = "unknown"
"""Name recorded when a row has no language/dataset/template and none can be derived."""


def pairs_ids_path(prefix: str) -> str:
    return prefix + ".pairs.npy"


def pairs_meta_path(prefix: str) -> str:
    return prefix + ".pairs.json"


def is_paired_dataset(prefix: str) -> bool:
    return os.path.isfile(pairs_meta_path(prefix)) and MMapIndexedDataset.exists(prefix)


class PairedDataset:
    """Read-only view of a paired dataset; tokens stay memory-mapped.

    ``input_sizes`` / ``target_sizes`` (int64 [n]) let packing plan rows without reading a token.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        regenerate = "re-run data_tools/preprocess_xp3.py for it"
        if not os.path.isfile(pairs_meta_path(prefix)):
            hint = " (it is a plain pretraining dataset)" if MMapIndexedDataset.exists(prefix) else ""
            raise IndexedDatasetError(f"{pairs_meta_path(prefix)}: not found{hint}; finetuning needs paired "
                                      f"inputs/targets from data_tools/preprocess_xp3.py")
        with open(pairs_meta_path(prefix), encoding="utf-8") as fh:
            try:
                self.meta = json.load(fh)
            except json.JSONDecodeError as exc:
                raise IndexedDatasetError(f"{pairs_meta_path(prefix)}: not valid JSON ({exc.msg}); {regenerate}") from None
        if self.meta.get("format") != PAIRS_FORMAT or self.meta.get("version") != PAIRS_VERSION:
            raise IndexedDatasetError(f"{pairs_meta_path(prefix)}: format {self.meta.get('format')!r} version "
                                      f"{self.meta.get('version')!r}, expected {PAIRS_FORMAT!r} {PAIRS_VERSION}; {regenerate}")
        self.indexed = MMapIndexedDataset(prefix)
        n = int(self.meta["num_pairs"])
        doc_idx = np.asarray(self.indexed.doc_idx)
        if len(self.indexed) != 2 * n or len(doc_idx) != n + 1 or not np.array_equal(doc_idx, np.arange(0, 2 * n + 1, 2)):
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: {len(self.indexed)} sequences in {len(doc_idx) - 1} documents, but "
                f"{pairs_meta_path(prefix)} describes {n} pairs of exactly two sequences; {regenerate}"
            )
        try:
            ids = np.load(pairs_ids_path(prefix), mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise IndexedDatasetError(f"{pairs_ids_path(prefix)}: unreadable ({exc}); {regenerate}") from None
        if ids.shape != (n, 3):
            raise IndexedDatasetError(f"{pairs_ids_path(prefix)}: shape {ids.shape}, expected ({n}, 3); {regenerate}")
        self.language_ids = np.asarray(ids[:, 0], dtype=np.int64)
        self.dataset_ids = np.asarray(ids[:, 1], dtype=np.int64)
        self.template_ids = np.asarray(ids[:, 2], dtype=np.int64)
        self.languages: List[str] = list(self.meta["languages"])
        self.datasets: List[str] = list(self.meta["datasets"])
        self.templates: List[str] = list(self.meta["templates"])
        for name, col, names in (("language", self.language_ids, self.languages), ("dataset", self.dataset_ids, self.datasets)):
            if n and (col.min() < 0 or col.max() >= len(names)):
                raise IndexedDatasetError(f"{pairs_ids_path(prefix)}: {name} ids outside [0, {len(names)}); {regenerate}")
        sizes = np.asarray(self.indexed.sizes, dtype=np.int64)
        self.input_sizes = sizes[0::2]
        self.target_sizes = sizes[1::2]

    def __len__(self) -> int:
        return len(self.input_sizes)

    def inputs(self, i: int, keep_last: Optional[int] = None) -> np.ndarray:
        """Input tokens of pair i; ``keep_last`` keeps only that many from the end (left truncation)."""
        size = int(self.input_sizes[i])
        keep = size if keep_last is None else min(keep_last, size)
        return self.indexed.get(2 * i, offset=size - keep, length=keep)

    def targets(self, i: int) -> np.ndarray:
        return self.indexed.get(2 * i + 1)

    @property
    def eod_id(self) -> Optional[int]:
        return self.meta.get("eod_id")

    @property
    def pad_id(self) -> int:
        pad = self.meta.get("pad_id")
        return int(pad if pad is not None else (self.eod_id or 0))


class PairedDatasetWriter:
    """Appends pairs to ``PREFIX.*.tmp``; ``commit`` renames them into place, ``discard`` removes them."""

    def __init__(self, prefix: str, dtype, meta: Optional[dict] = None):
        self.prefix = prefix
        from megatron_bloom.data.readers import make_output_dir

        make_output_dir(prefix, "--output-prefix")
        self._builder = MMapIndexedDatasetBuilder(data_file_path(prefix) + ".tmp", dtype)
        self._names: Dict[str, Dict[str, int]] = {"languages": {}, "datasets": {}, "templates": {}}
        self._ids: List[np.ndarray] = []
        self.meta = dict(meta or {})
        self.num_pairs = 0
        self.input_tokens = 0
        self.target_tokens = 0
        self.per_language: Dict[str, List[int]] = {}

    def _id(self, kind: str, name: str) -> int:
        table = self._names[kind]
        if name not in table:
            table[name] = len(table)
        return table[name]

    def add_pairs(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], languages: Sequence[str],
                  datasets: Sequence[str], templates: Sequence[str]) -> None:
        """Append pairs (token arrays, targets already ending with EOD) with their names."""
        n = len(inputs)
        if not (len(targets) == len(languages) == len(datasets) == len(templates) == n):
            raise ValueError("inputs, targets, languages, datasets and templates must have the same length")
        if n == 0:
            return
        lengths = np.empty(2 * n, dtype=np.int64)
        for j, (inp, tgt) in enumerate(zip(inputs, targets)):
            # One document of exactly two sequences per pair: the layout PairedDataset checks.
            self._builder.add_items([inp, tgt])
            self._builder.end_document()
            lengths[2 * j], lengths[2 * j + 1] = len(inp), len(tgt)
        ids = np.empty((n, 3), dtype=np.int32)
        for j in range(n):
            ids[j] = (self._id("languages", languages[j]), self._id("datasets", datasets[j]), self._id("templates", templates[j]))
            stats = self.per_language.setdefault(languages[j], [0, 0, 0])
            stats[0] += 1
            stats[1] += int(lengths[2 * j])
            stats[2] += int(lengths[2 * j + 1])
        self._ids.append(ids)
        self.num_pairs += n
        self.input_tokens += int(lengths[0::2].sum())
        self.target_tokens += int(lengths[1::2].sum())

    def commit(self) -> dict:
        """Write the index, id table and metadata, then move everything into place; returns the metadata."""
        p = self.prefix
        self._builder.finalize(index_file_path(p) + ".tmp")
        ids = np.concatenate(self._ids) if self._ids else np.empty((0, 3), np.int32)
        with open(pairs_ids_path(p) + ".tmp", "wb") as fh:
            np.save(fh, ids)
        meta = dict(self.meta)
        meta.update(
            format=PAIRS_FORMAT,
            version=PAIRS_VERSION,
            num_pairs=self.num_pairs,
            input_tokens=self.input_tokens,
            target_tokens=self.target_tokens,
            languages=list(self._names["languages"]),
            datasets=list(self._names["datasets"]),
            templates=list(self._names["templates"]),
            per_language={k: {"pairs": v[0], "input_tokens": v[1], "target_tokens": v[2]} for k, v in self.per_language.items()},
        )
        with open(pairs_meta_path(p) + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, ensure_ascii=False)
        # A stale .idx/.json next to a new .bin would look finished: remove them first, move them last.
        for path in (pairs_meta_path(p), index_file_path(p)):
            if os.path.exists(path):
                os.remove(path)
        self._builder.write_token_stats(token_stats_path(p), vocab_size=self.meta.get("vocab_size"))
        for path in (data_file_path(p), pairs_ids_path(p), index_file_path(p), pairs_meta_path(p)):
            os.replace(path + ".tmp", path)
        return meta

    def discard(self) -> None:
        self._builder.close()
        for path in (data_file_path(self.prefix), index_file_path(self.prefix), pairs_ids_path(self.prefix),
                     pairs_meta_path(self.prefix)):
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


def read_weighted_split_paths_file(path: str, option: str) -> List[str]:
    """Groups of a mixture file for ``--train/valid-weighted-split-paths-path``.

    bigscience's files (and ours, see blends.weighted_split_paths_file_text) are ONE line of
    double-quoted groups separated by spaces: ``"train: W START:END PATH, ..."`` or
    ``"validation_en: ..." "validation_fr: ..."``, as Megatron-DeepSpeed reads them. Also accepted:
    one group per line, quoted or not, blank lines and ``#`` comments. Relative PATHs are taken
    relative to the current directory, as they would be on the command line.
    """
    from megatron_bloom.data.blends import split_mixture_line

    if not os.path.isfile(path):
        raise ValueError(f"{option} {path}: no such file")
    groups = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip().startswith("#"):
                continue
            try:
                groups.extend(g for g in split_mixture_line(line) if g)
            except ValueError as exc:
                raise ValueError(f"{option} {path}:{line_no}: {exc}") from None
    if not groups:
        raise ValueError(f"{option} {path}: the file holds no group; write '\"NAME: W START:END PATH, ...\"'")
    return groups
