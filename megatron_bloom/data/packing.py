"""Pack prompt/answer pairs into rows of ``seq_length`` tokens for finetuning.

Each pair ``inputs + targets`` (targets end with EOD) becomes one *segment* of a row; a row holds as
many segments as fit, the rest is padding. Worked example, seq_length 12, pairs A (3 + 2 tokens),
B (4 + 3), and a row [A, B]:

    position     0  1  2  3  4 | 5  6  7  8  9 10 11
    tokens       a0 a1 a2 A0 A1| b0 b1 b2 b3 B0 B1 B2     (capital = target token)
    labels       a1 a2 A0 A1 -- | b1 b2 b3 B0 B1 B2 --    (next token inside the segment only)
    loss_mask    0  0  1  1  0 | 0  0  0  1  1  1  0      exactly the target tokens are predicted
    segment_ids  1  1  1  1  1 | 2  2  2  2  2  2  2      0 would mark padding

The model builds a causal mask that never crosses segments and restarts ALiBi positions at each
segment (``make_alibi_mask(segment_ids=...)``), so a packed pair sees exactly what it would alone.

Planning uses only the pair sizes (no token is read):

* a pair longer than a row: ``truncate`` (default) drops input tokens from the LEFT so the whole
  target fits (a prompt's end usually carries the question); ``skip`` drops the pair. A pair whose
  target alone cannot fit after at least one input token is skipped in both modes. Every case is
  counted in ``PackingStats``, never silently.
* rows are filled by best-fit decreasing: pairs by decreasing length (ties in a seeded random
  order), each into the fullest row that still has room, else a new row. That keeps padding to a
  few percent on xP3-like length mixes. The rows are then shuffled with the same seed.
* more rows than one pass gives: the pairs are packed again for each further epoch, with the
  epoch number mixed into the seed.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

OVERLONG_MODES = ("truncate", "skip")


@dataclass
class PackingStats:
    """What one packing pass did; ``line`` is what the trainer prints."""

    pairs: int = 0
    """Pairs offered."""
    packed: int = 0
    """Pairs placed in a row (truncated ones included)."""
    truncated: int = 0
    """Pairs whose inputs were cut from the left to fit (overlong=truncate)."""
    truncated_tokens: int = 0
    """Input tokens dropped by that truncation."""
    skipped_overlong: int = 0
    """Pairs longer than a row, dropped because overlong=skip."""
    skipped_unfittable: int = 0
    """Pairs dropped in any mode: the target alone leaves no room for one input token, or no input."""
    rows: int = 0
    tokens: int = 0
    """Tokens placed in rows (the rest of rows * seq_length is padding)."""
    target_tokens: int = 0
    seq_length: int = 0

    @property
    def fill_rate(self) -> float:
        return self.tokens / max(self.rows * self.seq_length, 1)

    def merge(self, other: "PackingStats") -> "PackingStats":
        out = PackingStats(seq_length=self.seq_length or other.seq_length)
        for name in ("pairs", "packed", "truncated", "truncated_tokens", "skipped_overlong", "skipped_unfittable",
                     "rows", "tokens", "target_tokens"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def line(self, name: str) -> str:
        return (f"packing {name}: {self.pairs:,} pairs -> {self.rows:,} rows of {self.seq_length} tokens, "
                f"fill rate {self.fill_rate:.2%} ({self.target_tokens:,} target tokens); "
                f"overlong: {self.truncated:,} truncated ({self.truncated_tokens:,} input tokens dropped), "
                f"{self.skipped_overlong:,} skipped; {self.skipped_unfittable:,} skipped as unfittable "
                f"(target >= seq_length or empty inputs)")


@dataclass
class Packing:
    """Rows as runs of items; item j is pair ``pair[j]`` with ``kept_inputs[j]`` input tokens."""

    row_ptr: np.ndarray
    """int64 [rows + 1]: items of row r are row_ptr[r]:row_ptr[r+1], in segment order."""
    pair: np.ndarray
    """int64 [items]: pair index (into the sizes given to ``pack_pairs``)."""
    kept_inputs: np.ndarray
    """int64 [items]: input tokens kept (the last ones) of each item."""
    targets: np.ndarray
    """int64 [items]: target tokens of each item (all kept)."""
    stats: PackingStats = field(default_factory=PackingStats)

    @property
    def rows(self) -> int:
        return len(self.row_ptr) - 1

    def row_target_tokens(self) -> np.ndarray:
        """int64 [rows]: target tokens per row (loss-bearing positions)."""
        return np.add.reduceat(self.targets, self.row_ptr[:-1]) if len(self.pair) else np.zeros(self.rows, np.int64)

    def row_sequences(self) -> np.ndarray:
        """int64 [rows]: segments (pairs) per row."""
        return np.diff(self.row_ptr)


def plan_pairs(input_sizes: np.ndarray, target_sizes: np.ndarray, seq_length: int,
               overlong: str = "truncate") -> Tuple[np.ndarray, np.ndarray, PackingStats]:
    """(keep mask [n], kept input tokens [n], stats) for pairs of the given sizes."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong={overlong!r} must be one of {', '.join(OVERLONG_MODES)}")
    inp = np.asarray(input_sizes, dtype=np.int64)
    tgt = np.asarray(target_sizes, dtype=np.int64)
    stats = PackingStats(pairs=len(inp), seq_length=seq_length)
    too_long = inp + tgt > seq_length
    # At least one input token must precede the target: the first target token is predicted from it.
    unfittable = (tgt > seq_length - 1) | (inp < 1) | (tgt < 1)
    stats.skipped_unfittable = int(unfittable.sum())
    kept = inp.copy()
    if overlong == "skip":
        skipped = too_long & ~unfittable
        stats.skipped_overlong = int(skipped.sum())
        keep = ~(unfittable | too_long)
    else:
        cut = too_long & ~unfittable
        kept[cut] = seq_length - tgt[cut]
        stats.truncated = int(cut.sum())
        stats.truncated_tokens = int((inp - kept)[cut].sum())
        keep = ~unfittable
    kept[~keep] = 0
    return keep, kept, stats


def best_fit_decreasing(lengths: Sequence[int], capacity: int, rng: np.random.RandomState) -> Tuple[np.ndarray, np.ndarray, int]:
    """(row of each item, placement order, number of rows) for items of ``lengths`` <= capacity.

    Items go in decreasing length (equal lengths in an order drawn from ``rng``), each into the row
    with the least room left that still fits it, else into a new row. Remaining capacities are
    kept in a sorted list with a stack of rows per capacity: O(log C) per item.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = rng.permutation(n)
    order = order[np.argsort(-lengths[order], kind="stable")]
    free: Dict[int, List[int]] = {}
    caps: List[int] = []  # sorted remaining capacities that have at least one row
    row_of = np.empty(n, dtype=np.int64)
    rows = 0
    length_list = lengths.tolist()
    for i in order.tolist():
        size = length_list[i]
        j = bisect.bisect_left(caps, size)
        if j < len(caps):
            cap = caps[j]
            stack = free[cap]
            row = stack.pop()
            if not stack:
                del free[cap]
                caps.pop(j)
            rest = cap - size
        else:
            row, rows = rows, rows + 1
            rest = capacity - size
        row_of[i] = row
        if rest > 0:
            if rest in free:
                free[rest].append(row)
            else:
                free[rest] = [row]
                bisect.insort(caps, rest)
    return row_of, order, rows


def pack_pairs(input_sizes: np.ndarray, target_sizes: np.ndarray, seq_length: int, seed,
               overlong: str = "truncate", pair_ids: Optional[np.ndarray] = None) -> Packing:
    """Plan rows for pairs of the given sizes (``pair_ids`` names them; default 0..n-1)."""
    keep, kept, stats = plan_pairs(input_sizes, target_sizes, seq_length, overlong)
    tgt = np.asarray(target_sizes, dtype=np.int64)
    ids = np.arange(len(keep), dtype=np.int64) if pair_ids is None else np.asarray(pair_ids, dtype=np.int64)
    idx = np.flatnonzero(keep)
    lengths = kept[idx] + tgt[idx]
    rng = np.random.RandomState(seed)
    row_of, order, rows = best_fit_decreasing(lengths, seq_length, rng)
    # Rows in a seeded random order, so a batch is not all long (or all short) pairs.
    row_order = rng.permutation(rows)
    new_row = np.empty(rows, dtype=np.int64)
    new_row[row_order] = np.arange(rows)
    placed_rank = np.empty(len(idx), dtype=np.int64)
    placed_rank[order] = np.arange(len(idx))
    # Items grouped by (shuffled) row; inside a row in placement order (longest first).
    items = np.lexsort((placed_rank, new_row[row_of])) if len(idx) else np.zeros(0, np.int64)
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(new_row[row_of], minlength=rows), out=row_ptr[1:])
    stats.packed = len(idx)
    stats.rows = rows
    stats.tokens = int(lengths.sum())
    stats.target_tokens = int(tgt[idx].sum())
    return Packing(row_ptr, ids[idx][items], kept[idx][items], tgt[idx][items], stats)


class PackedRows:
    """Rows of one paired dataset's pairs ``[first, last)``: at least ``num_rows`` of them.

    ``language_map`` / ``task_map`` translate the dataset's own language and dataset ids to the
    run's global ids (several datasets may be blended). ``seed`` is an int or a sequence of ints
    (e.g. run seed, split, group, component). Every rank builds the same rows from the same seed;
    only sizes are read to plan them.
    """

    def __init__(self, paired, first: int, last: int, num_rows: int, seq_length: int, seed,
                 overlong: str = "truncate", language_map: Optional[np.ndarray] = None,
                 task_map: Optional[np.ndarray] = None, name: str = ""):
        self.paired = paired
        self.seq_length = seq_length
        self.name = name or paired.prefix
        pair_ids = np.arange(first, last, dtype=np.int64)
        inp, tgt = paired.input_sizes[first:last], paired.target_sizes[first:last]
        packs: List[Packing] = []
        total = 0
        epoch = 0
        while True:
            pack = pack_pairs(inp, tgt, seq_length, [*np.atleast_1d(seed).tolist(), epoch], overlong, pair_ids)
            if pack.rows == 0:
                raise ValueError(f"{self.name}: no pair of [{first}, {last}) fits in rows of {seq_length} tokens "
                                 f"({pack.stats.line(self.name)})")
            packs.append(pack)
            total += pack.rows
            epoch += 1
            if total >= num_rows:
                break
        self.epochs = epoch
        self.stats = packs[0].stats  # per pass; later epochs differ only in fill rate
        self.fill_rate = sum(p.stats.tokens for p in packs) / (total * seq_length)
        offsets = np.cumsum([0] + [len(p.pair) for p in packs])
        self.row_ptr = np.concatenate([packs[0].row_ptr[:1]] + [p.row_ptr[1:] + o for p, o in zip(packs, offsets)])
        self.pair = np.concatenate([p.pair for p in packs])
        self.kept_inputs = np.concatenate([p.kept_inputs for p in packs])
        self.targets = np.concatenate([p.targets for p in packs])
        self.row_target_tokens = np.concatenate([p.row_target_tokens() for p in packs])
        self.row_sequences = np.concatenate([p.row_sequences() for p in packs])
        n_lang, n_task = len(paired.languages), len(paired.datasets)
        self.language_map = np.arange(n_lang) if language_map is None else np.asarray(language_map, dtype=np.int64)
        self.task_map = np.arange(n_task) if task_map is None else np.asarray(task_map, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def counts(self, k: int) -> Tuple[int, int]:
        """(target tokens, target sequences) of row k, without reading tokens."""
        return int(self.row_target_tokens[k]), int(self.row_sequences[k])

    def __getitem__(self, k: int) -> Dict[str, np.ndarray]:
        """Row k as arrays of ``seq_length``: tokens, labels, loss_mask, sequence_weight, segment_ids,
        language, task (the last two are global ids, meaningful where loss_mask is 1)."""
        s = self.seq_length
        pad = self.paired.pad_id
        tokens = np.full(s, pad, dtype=np.int64)
        labels = np.full(s, pad, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        weight = np.zeros(s, dtype=np.float32)
        segment_ids = np.zeros(s, dtype=np.int64)
        language = np.zeros(s, dtype=np.int64)
        task = np.zeros(s, dtype=np.int64)
        pos = 0
        for seg, j in enumerate(range(int(self.row_ptr[k]), int(self.row_ptr[k + 1])), start=1):
            pair, kin, tg = int(self.pair[j]), int(self.kept_inputs[j]), int(self.targets[j])
            x = np.concatenate([self.paired.inputs(pair, keep_last=kin), self.paired.targets(pair)])
            n = kin + tg
            tokens[pos:pos + n] = x
            labels[pos:pos + n - 1] = x[1:]  # the segment's last position predicts nothing
            first_target = pos + kin - 1  # the position whose label is the first target token
            loss_mask[first_target:pos + n - 1] = 1.0
            weight[first_target:pos + n - 1] = 1.0 / tg
            segment_ids[pos:pos + n] = seg
            language[pos:pos + n] = self.language_map[self.paired.language_ids[pair]]
            task[pos:pos + n] = self.task_map[self.paired.dataset_ids[pair]]
            pos += n
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "sequence_weight": weight,
                "segment_ids": segment_ids, "language": language, "task": task}
