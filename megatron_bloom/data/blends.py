"""Mixing several datasets by weight: flag parsing, Megatron's blending order, dataset builders.

Two ways to name the data, as in Megatron-DeepSpeed:

* `--data-path PREFIX` or `--data-path W1 PREFIX1 W2 PREFIX2 ...` with `--split 969,30,1`: every
  prefix is cut into train/valid/test by document ranges, and each split blends the prefixes.
* `--train-weighted-split-paths "NAME: W START:END PATH, W START:END PATH"` (exactly one group) and
  `--valid-weighted-split-paths "NAME1: ..." "NAME2: ..."` (any number of named groups, each
  evaluated and reported on its own). START:END are fractions of each dataset's documents.

The blend order follows Megatron's helpers.cpp exactly: sample k goes to the dataset whose count
lags its weight most, argmax_i(w_i * max(k, 1) - count_i), lowest index on ties. That greedy is
sequential, so it is computed in blocks simulated side by side (see build_blending_indices).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_bloom.data.gpt_dataset import GPTDataset, split_boundaries
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset

logger = logging.getLogger(__name__)

# Megatron builds each component with 0.5% more samples than its weight asks for, so that the
# greedy blend (whose counts can run a sample or two ahead of weight * k) never runs out.
BLEND_OVERSAMPLE = 1.005


# --------------------------------------------------------------------------------------------------
# --data-path
# --------------------------------------------------------------------------------------------------


def _tokens(value: Union[str, Sequence[str]]) -> List[str]:
    # YAML may give one string or a list; argparse nargs='*' gives a list. Either way, whitespace
    # separates tokens (Megatron does not support prefixes containing spaces either).
    items = [value] if isinstance(value, str) else list(value)
    return [t for item in items for t in str(item).split()]


def _number(token: str) -> Optional[float]:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_data_path(data_path: Union[str, Sequence[str]]) -> Tuple[List[str], List[float]]:
    """(prefixes, weights summing to 1) from 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'."""
    tokens = _tokens(data_path)
    usage = "expected 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'"
    if not tokens:
        raise ValueError(f"--data-path is empty; {usage}")
    if len(tokens) == 1:
        if _number(tokens[0]) is not None:
            raise ValueError(f"--data-path: weight {tokens[0]!r} has no prefix after it; {usage}")
        return tokens, [1.0]
    prefixes, weights = [], []
    for i in range(0, len(tokens), 2):
        weight = _number(tokens[i])
        if weight is None:
            raise ValueError(f"--data-path: {tokens[i]!r} (token {i + 1}) should be a weight but is not a number; {usage}")
        if i + 1 == len(tokens):
            raise ValueError(f"--data-path: weight {tokens[i]!r} (token {i + 1}) has no prefix after it; {usage}")
        if weight <= 0:
            raise ValueError(f"--data-path: weight {tokens[i]!r} of {tokens[i + 1]!r} must be > 0; drop the dataset instead")
        weights.append(weight)
        prefixes.append(tokens[i + 1])
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def blend_num_samples(weights: Sequence[float], num_samples: int) -> List[int]:
    """Samples to build for each component of a blend of num_samples (Megatron's 1.005 margin)."""
    return [int(math.ceil(num_samples * w * BLEND_OVERSAMPLE)) for w in weights]


# --------------------------------------------------------------------------------------------------
# Blending order
# --------------------------------------------------------------------------------------------------


def _greedy_blocks(weights: np.ndarray, starts: np.ndarray, counts: np.ndarray, length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Run the greedy for `length` steps from each (start step, start counts); blocks side by side."""
    counts = counts.copy()
    rows = np.arange(len(starts))
    picks = np.empty((len(starts), length), dtype=np.int32)
    base = starts.astype(np.float64)
    for t in range(length):
        # Same double arithmetic as helpers.cpp, so near-ties break the same way.
        step = np.maximum(base + t, 1.0)
        error = np.multiply.outer(step, weights)
        error -= counts
        pick = error.argmax(axis=1)  # first maximum = lowest dataset index, as in the C++
        picks[:, t] = pick
        counts[rows, pick] += 1
    return picks, counts


def _largest_remainder(weights: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Counts after `steps` samples, apportioned by largest remainder: a good guess of the greedy's."""
    ideal = np.multiply.outer(steps.astype(np.float64), weights)
    counts = np.floor(ideal)
    short = (steps - counts.sum(axis=1)).astype(np.int64)
    rank = np.argsort(np.argsort(counts - ideal, axis=1, kind="stable"), axis=1)
    return counts + (rank < short[:, None])


def build_blending_indices(weights: Sequence[float], size: int, block: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of each of `size` blended samples, as Megatron's greedy.

    The greedy is a recurrence on the count vector, so it cannot be vectorized over steps. Instead
    the steps are cut into blocks of `block`, each started from a guessed count vector and all
    simulated at once (numpy over blocks). Block b's end counts are then compared with block b+1's
    guessed start; where they differ, b+1 is rerun from b's end. When every start equals its
    predecessor's end, all blocks are exact by induction from block 0, which starts from zeros.
    Greedy trajectories from nearby count vectors merge within a few steps, so one rerun round of
    a few blocks is typical: 10M samples of 2-46 datasets take 0.3-2.5 s on one core.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"blend weights must be finite and > 0, got {weights.tolist()}")
    # Normalized exactly once here, as Megatron's BlendableDataset does: a second normalization
    # could flip last bits and with them a near-tie, diverging from Megatron's order.
    weights = weights / np.sum(weights)
    num = len(weights)
    if size <= 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64)
    length = block or int(min(4096, max(64, math.isqrt(size))))
    num_blocks = -(-size // length)
    starts = np.arange(num_blocks, dtype=np.int64) * length
    start_counts = _largest_remainder(weights, starts)
    start_counts[0] = 0
    picks = np.empty((num_blocks, length), dtype=np.int32)
    end_counts = np.empty_like(start_counts)
    todo = np.arange(num_blocks)
    while len(todo):
        picks[todo], end_counts[todo] = _greedy_blocks(weights, starts[todo], start_counts[todo], length)
        successors = todo[todo + 1 < num_blocks] + 1
        stale = successors[np.any(start_counts[successors] != end_counts[successors - 1], axis=1)]
        start_counts[stale] = end_counts[stale - 1]
        todo = stale
    dataset_index = picks.reshape(-1)[:size].astype(np.uint8 if num <= 255 else np.int32)
    # Each sample's index within its dataset: its rank among that dataset's samples so far.
    order = np.argsort(dataset_index, kind="stable")
    taken = np.bincount(dataset_index, minlength=num)
    firsts = np.concatenate(([0], np.cumsum(taken)[:-1]))
    sample_index = np.empty(size, dtype=np.int64)
    sample_index[order] = np.arange(size, dtype=np.int64) - np.repeat(firsts, taken)
    return dataset_index, sample_index


class BlendedDataset:
    """`size` samples drawn from `datasets` by weight in Megatron's greedy order.

    Each component must hold the samples the blend takes from it; blend_num_samples(weights, size)
    gives Megatron's sizes, which always suffice.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, names: Optional[Sequence[str]] = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights; give one weight per dataset")
        self.datasets = list(datasets)
        self.names = list(names) if names is not None else [getattr(d, "data_prefix", str(i)) for i, d in enumerate(datasets)]
        self.size = size
        start = time.time()
        # The given weights, not a normalized copy: build_blending_indices normalizes them itself.
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        logger.info("blending indices for %d samples of %d datasets in %.2fs", size, len(datasets), time.time() - start)
        taken = np.bincount(self.dataset_index, minlength=len(datasets))
        for i, (dataset, n) in enumerate(zip(self.datasets, taken)):
            if n > len(dataset):
                raise ValueError(
                    f"blend takes {n} samples from {self.names[i]} but it has {len(dataset)}; build it with "
                    f"blend_num_samples(weights, {size})[{i}] = {blend_num_samples(self.weights, size)[i]} samples"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


# --------------------------------------------------------------------------------------------------
# --(train|valid)-weighted-split-paths
# --------------------------------------------------------------------------------------------------

_GROUP_FORMAT = "'NAME: WEIGHT START:END PATH, WEIGHT START:END PATH, ...'"


@dataclass(frozen=True)
class WeightedSplitEntry:
    """One dataset of a group: its weight and the [start, end) fraction of its documents."""

    weight: float
    start: float
    end: float
    prefix: str

    def document_range(self, num_documents: int) -> Tuple[int, int]:
        """[first, last) document ids, rounded like Megatron-DeepSpeed's get_split_by_range_."""
        return int(round(self.start * num_documents)), int(round(self.end * num_documents))


@dataclass(frozen=True)
class DatasetGroup:
    """A named blend, e.g. one validation language; weights are normalized over the group."""

    name: str
    entries: Tuple[WeightedSplitEntry, ...]

    @property
    def prefixes(self) -> List[str]:
        return [e.prefix for e in self.entries]

    @property
    def weights(self) -> List[float]:
        total = sum(e.weight for e in self.entries)
        return [e.weight / total for e in self.entries]


def _parse_range(text: str, where: str) -> Tuple[float, float]:
    parts = text.split(":")
    values = [_number(p) for p in parts]
    if len(parts) != 2 or None in values:
        raise ValueError(f"{where}: range {text!r} is not START:END with two numbers, e.g. 0:0.95")
    start, end = values
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{where}: range {text!r} needs 0 <= START < END <= 1 (fractions of the documents)")
    return start, end


def parse_weighted_split_group(text: str, option: str = "--valid-weighted-split-paths") -> DatasetGroup:
    """'NAME: W START:END PATH, W START:END PATH' -> DatasetGroup."""
    if ":" not in text:
        raise ValueError(f"{option}: group {text!r} has no 'NAME:'; expected {_GROUP_FORMAT}, one quoted string per group")
    name, body = text.split(":", 1)
    name = name.strip()
    # A name with spaces means the 'NAME:' part is missing and the colon found is a range's.
    if not name or len(name.split()) != 1:
        raise ValueError(f"{option}: group {text!r} does not start with 'NAME:'; expected {_GROUP_FORMAT}")
    entries = []
    for raw in body.split(","):
        fields = raw.split()
        where = f"{option} group {name!r} entry {raw.strip()!r}"
        if len(fields) != 3:
            raise ValueError(f"{where}: has {len(fields)} fields; expected WEIGHT START:END PATH")
        weight = _number(fields[0])
        if weight is None or weight <= 0:
            raise ValueError(f"{where}: weight {fields[0]!r} is not a number > 0")
        start, end = _parse_range(fields[1], where)
        entries.append(WeightedSplitEntry(weight, start, end, fields[2]))
    return DatasetGroup(name, tuple(entries))


def parse_weighted_split_paths(values: Union[str, Sequence[str]], option: str = "--valid-weighted-split-paths") -> List[DatasetGroup]:
    """Every group of a --*-weighted-split-paths flag; names must be unique (they label metrics).

    The train flag takes exactly one group, as in Megatron-DeepSpeed.
    """
    groups = [parse_weighted_split_group(v, option) for v in ([values] if isinstance(values, str) else values)]
    if not groups:
        raise ValueError(f"{option} was given without a group; expected {_GROUP_FORMAT}")
    if option.startswith("--train") and len(groups) != 1:
        raise ValueError(f"{option} takes exactly one group, got {len(groups)} ({', '.join(g.name for g in groups)}); merge them into one")
    seen = set()
    for g in groups:
        if g.name in seen:
            raise ValueError(f"{option}: group name {g.name!r} is used twice; each group is reported under its own name")
        seen.add(g.name)
    return groups


def weighted_split_group_text(name: str, entries: Sequence[Tuple[float, str, str]]) -> str:
    """'NAME: W START:END PATH, W START:END PATH' from (weight, 'START:END', path) entries.

    Refuses what Megatron-DeepSpeed's parser would misread: a name with a colon, space or quote, a
    path with a space, comma or quote (it splits entries on commas and fields on whitespace).
    """
    if not name or re.search(r'[\s:"]', name):
        raise ValueError(f"mixture group name {name!r} must be one word without ':' or quotes")
    parts = []
    for weight, span, path in entries:
        if not path or re.search(r'[\s,"]', path):
            raise ValueError(f"mixture path {path!r} holds whitespace, a comma or a quote, which "
                             f"Megatron-DeepSpeed's --*-weighted-split-paths parser splits on; rename it")
        _parse_range(span, f"mixture group {name!r}")
        parts.append(f"{float(weight):.10g} {span} {path}")
    if not parts:
        raise ValueError(f"mixture group {name!r} has no entry")
    return f"{name}: " + ", ".join(parts)


def weighted_split_paths_file_text(groups: Sequence[str]) -> str:
    """A bigscience mixture file: ONE line of double-quoted groups separated by one space, then a newline.

    That is the only shape Megatron-DeepSpeed's ``--*-weighted-split-paths-path`` accepts (it checks
    the first character is '"', the line ends with '"' and a newline, and splits on '" "').
    """
    if not groups:
        raise ValueError("a mixture file needs at least one group")
    return '"' + '" "'.join(groups) + '"\n'


def split_mixture_line(line: str) -> List[str]:
    """Groups of one mixture-file line: '"G1" "G2" ...' (bigscience's shape), a quoted group, or a bare group."""
    text = line.strip()
    if not text:
        return []
    quote = text[0]
    if quote not in "'\"":
        return [text]
    if len(text) < 2 or text[-1] != quote:
        raise ValueError(f"line starts with {quote} but does not end with it: {text[:60]!r}...")
    return [g.strip() for g in re.split(quote + r"\s+" + quote, text[1:-1])]


# --------------------------------------------------------------------------------------------------
# Builders (open the .bin/.idx files; everything above is pure)
# --------------------------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    """What every GPTDataset of a run shares."""

    seq_length: int
    seed: int
    build_on_this_rank: bool = True
    """True on the rank (or one per node) that writes the index caches."""
    barrier: Optional[Callable[[], None]] = None
    """Called once per dataset after the cache build; e.g. torch.distributed.barrier."""
    cache_dir: Optional[str] = None
    """Where index caches go; None puts them next to the data."""


def _gpt_dataset(name: str, prefix: str, first: int, last: int, num_samples: int, opts: BuildOptions, indexed=None):
    indexed = indexed if indexed is not None else MMapIndexedDataset(prefix)
    # The name goes into cache file names; group names come from the command line.
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return GPTDataset(
        name, prefix, np.arange(first, last, dtype=np.int64), indexed, num_samples, opts.seq_length, opts.seed,
        build_on_this_rank=opts.build_on_this_rank, barrier=opts.barrier, cache_dir=opts.cache_dir,
    )


def build_train_valid_test_datasets(
    data_path: Union[str, Sequence[str]], split: str, train_valid_test_num_samples: Sequence[int], opts: BuildOptions,
) -> List[Optional[object]]:
    """[train, valid, test] from --data-path and --split; None where a split is empty or unused.

    With one prefix each entry is a GPTDataset; with several, a BlendedDataset over the prefixes.
    """
    prefixes, weights = parse_data_path(data_path)
    parts: List[List[object]] = [[], [], []]
    for prefix, weight in zip(prefixes, weights):
        indexed = MMapIndexedDataset(prefix)
        bounds = split_boundaries(split, len(indexed.sizes))
        for i, name in enumerate(("train", "valid", "test")):
            wanted = train_valid_test_num_samples[i]
            n = wanted if len(prefixes) == 1 else blend_num_samples([weight], wanted)[0]
            if bounds[i + 1] > bounds[i] and wanted > 0:
                parts[i].append(_gpt_dataset(name, prefix, bounds[i], bounds[i + 1], n, opts, indexed))
    out: List[Optional[object]] = []
    for i, datasets in enumerate(parts):
        if not datasets:
            out.append(None)
        elif len(prefixes) == 1:
            out.append(datasets[0])
        elif len(datasets) != len(prefixes):
            raise ValueError(f"--split {split!r} leaves some --data-path prefixes without {('train', 'valid', 'test')[i]} documents")
        else:
            out.append(BlendedDataset(datasets, weights, train_valid_test_num_samples[i], names=prefixes))
    return out


def build_group_dataset(group: DatasetGroup, num_samples: int, opts: BuildOptions, split_name: str = "train"):
    """The GPTDataset (one entry) or BlendedDataset of a weighted-split-paths group."""
    weights = group.weights
    datasets = []
    for entry, n in zip(group.entries, blend_num_samples(weights, num_samples)):
        indexed = MMapIndexedDataset(entry.prefix)
        first, last = entry.document_range(len(indexed.sizes))
        if last <= first:
            raise ValueError(f"group {group.name!r}: range {entry.start}:{entry.end} of {entry.prefix} holds no document")
        n = num_samples if len(group.entries) == 1 else n
        datasets.append(_gpt_dataset(f"{split_name}-{group.name}", entry.prefix, first, last, n, opts, indexed))
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, weights, num_samples, names=group.prefixes)


def build_valid_group_datasets(groups: Sequence[DatasetGroup], num_samples: int, opts: BuildOptions) -> Dict[str, object]:
    """{group name: dataset} so evaluation can loop over groups and report each under its name."""
    return {g.name: build_group_dataset(g, num_samples, opts, split_name="valid") for g in groups}
