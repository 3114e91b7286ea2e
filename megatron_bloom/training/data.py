"""Batches: pretraining datasets from the configuration, and this rank's micro-batches of a step
(pretraining samples or finetuning rows, through the one slicer ``micro_batches_for_step``).

Sample order is Megatron's: global sample k of the run belongs to micro-batch k // mbs, which
goes to DP rank (k // mbs) % DP. A step that starts at ``consumed_samples`` with global batch G
reads exactly samples [consumed, consumed + G), whatever the layout, so changing DP, TP or PP
changes who reads a sample, never which samples a step sees.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_bloom.config.schema import RunConfig
from megatron_bloom.config.validate import LOSS_NORMALIZATIONS
from megatron_bloom.data.finetune import row_counts
from megatron_bloom.data.mixtures import weighted_split_paths
from megatron_bloom.data.samplers import PretrainingSampler
from megatron_bloom.distributed.collectives import barrier
from megatron_bloom.errors import UserError

MicroBatch = Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[Sequence[dict], int, int], tuple]
"""(rows, first sample number, vocab_size) -> one micro-batch."""


def build_datasets(cfg: RunConfig, train_samples: int, valid_samples: int):
    """(train dataset, {validation group name: dataset}). Index caches are built by global rank 0."""
    from megatron_bloom.data.blends import (
        BuildOptions,
        build_group_dataset,
        build_train_valid_test_datasets,
        build_valid_group_datasets,
        parse_weighted_split_paths,
    )

    d = cfg.data
    train_groups, valid_groups = weighted_split_paths(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    opts = BuildOptions(
        seq_length=cfg.model.seq_length,
        seed=cfg.training.seed,
        build_on_this_rank=rank == 0,
        barrier=barrier if dist.is_initialized() else None,
    )
    try:
        if train_groups:
            (group,) = parse_weighted_split_paths(train_groups, "--train-weighted-split-paths")
            train = build_group_dataset(group, train_samples, opts, split_name="train")
            valid = {}
            if valid_groups and valid_samples > 0:  # 0: --eval-iters 0, no evaluation
                groups = parse_weighted_split_paths(valid_groups, "--valid-weighted-split-paths")
                valid = build_valid_group_datasets(groups, valid_samples, opts)
            return train, valid
        if not d.data_path:
            raise UserError("no training data: give --data-path PREFIX (or --train-weighted-split-paths)")
        train, valid, _ = build_train_valid_test_datasets(d.data_path, d.split, [train_samples, valid_samples, 0], opts)
    except (ValueError, FileNotFoundError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc).splitlines()[0]) from None
    if train is None:
        raise UserError(f"--split {d.split} leaves no training documents; give the train part a weight")
    return train, ({"validation": valid} if valid is not None else {})


def micro_batches_for_step(
    dataset,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
    vocab_size: int,
    collate: Optional[Collate] = None,
) -> list:
    """This DP rank's micro-batches of the step starting at ``consumed_samples``.

    ``PretrainingSampler`` deals the step's global sample numbers to DP ranks; each micro-batch is
    ``collate(rows, first sample number, vocab_size)`` of its rows (``pretraining_micro_batch``
    unless given). Sample numbers past the dataset's end wrap around.
    """
    collate = collate or pretraining_micro_batch
    n = len(dataset)
    sampler = PretrainingSampler(consumed_samples + global_batch_size, consumed_samples, micro_batch_size, dp_rank,
                                 dp_size)
    return [collate([dataset[k % n] for k in indices], indices[0], vocab_size) for indices in sampler]


def pretraining_micro_batch(rows: Sequence[dict], first: int, vocab_size: int) -> MicroBatch:
    """``(input_ids, (labels, loss_mask))`` from GPT samples of ``seq_length + 1`` tokens."""
    tokens = torch.from_numpy(np.stack([np.asarray(r["text"], dtype=np.int64) for r in rows]))  # [mbs, seq + 1]
    top = int(tokens.max())
    if top >= vocab_size:
        raise UserError(
            f"training sample {first} holds token id {top} >= vocab_size {vocab_size}: the data was "
            f"tokenized with a larger vocabulary; re-preprocess it or set --vocab-size"
        )
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return inputs, (labels, torch.ones(labels.shape, dtype=torch.float32))


def run_normalized(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (any shape) with each value divided by the length of its run of equal values in the
    flattened mask: [0,1,1,0,1] -> [0, .5, .5, 0, 1], so every run of ones sums to 1.

    This is finetune_t0.py's ``fast_normalize`` under ``--norm-target-loss``: runs are counted over
    the micro-batch flattened row after row, so a target ending one row and a target starting the
    next count as ONE run. That happens with Megatron-DeepSpeed's packing (data/mtf.py: a row filled
    to its last token, then a row whose first pair has a one-token input), as it did there; never
    with best-fit rows (data/packing.py), whose last position predicts nothing.
    """
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return mask.clone()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    run_id = torch.cumsum(starts.long(), 0) - 1
    lengths = torch.bincount(run_id)  # int64, one per run
    return (flat / lengths[run_id]).reshape(mask.shape)


def finetune_micro_batches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                           dp_size: int, dp_rank: int, vocab_size: int, norm_target_loss: bool,
                           normalization: str = "global-batch", eod_id: Optional[int] = None) -> list:
    """This DP rank's finetuning micro-batches of the step starting at ``consumed_samples`` (packed rows).

    Each is ``((input_ids, segment_ids), (labels, loss_weights, norm, language, task))``, for
    ``training/losses.FinetuningLoss``: the micro-batch's loss is ``sum(weights * losses) * norm[0]``,
    divided by ``sum(weights)`` when ``norm[1]`` is 1.

    * ``normalization="micro-batch"`` (``--loss-normalization``'s default; Megatron-DeepSpeed's
      finetune_t0.py): ``norm = [1, 1]``, so each micro-batch returns its own mean. The weights are
      the targets-only loss mask, times ``tokens != eod_id`` when ``eod_id`` is given
      (``--eod-mask-loss``), and under ``norm_target_loss`` that mask ``run_normalized`` over the
      flattened micro-batch: the divisor ``sum(weights)`` is then the number of target runs in the
      micro-batch. DeepSpeed averages those means over the micro-batches and DP ranks.
    * ``normalization="global-batch"`` (the default of this function, for callers that predate the
      flag): with T target tokens in the whole global batch (or S target sequences under
      ``norm_target_loss``, each token of a target of length n then weighing 1/n), ``norm =
      [G * DP / T (or / S), 0]`` for G micro-batches per rank: DeepSpeed's mean over micro-batches
      and DP ranks is then the global mean, whatever the micro-batch size, accumulation and DP size.
      T and S come from the packing plan, so ``eod_id`` (which would change them) is refused.

    Target tokens equal to the pad id are trained (finetune_t0.py also drops ``labels == pad``:
    tokenizers never produce BLOOM's ``<pad>`` from text, and padding positions bear no loss here).
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not one of {', '.join(LOSS_NORMALIZATIONS)}")
    per_micro_batch = normalization == "micro-batch"
    if eod_id is not None and not per_micro_batch:
        raise UserError("--eod-mask-loss needs --loss-normalization micro-batch")
    if per_micro_batch:
        norm = torch.tensor([1.0, 1.0], dtype=torch.float32)
    else:
        n = len(dataset)
        num_micro = global_batch_size // (micro_batch_size * dp_size)
        counts = np.array([row_counts(dataset, (consumed_samples + i) % n) for i in range(global_batch_size)])
        total = int(counts[:, 1 if norm_target_loss else 0].sum())
        # float64 then one rounding: the factor every layout multiplies its partial sums by.
        scale = torch.tensor([num_micro * dp_size / total if total else 0.0], dtype=torch.float64).float()
        norm = torch.cat([scale, torch.zeros(1)])

    def collate(rows: Sequence[dict], first: int, vocab_size: int):
        b = {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}  # [mbs, s] each
        top = int(b["tokens"].max())
        if top >= vocab_size:
            raise UserError(f"finetuning row {first} holds token id {top} >= vocab_size {vocab_size}: the pairs were "
                            f"tokenized with a larger vocabulary; re-preprocess them or set --vocab-size")
        if per_micro_batch:
            weights = b["loss_mask"].float()
            if eod_id is not None:
                weights = weights * (b["tokens"] != eod_id)
            if norm_target_loss:
                weights = run_normalized(weights)
        else:
            weights = b["sequence_weight"] if norm_target_loss else b["loss_mask"]
        return (b["tokens"], b["segment_ids"]), (b["labels"], weights, norm, b["language"], b["task"])

    return micro_batches_for_step(dataset, consumed_samples, global_batch_size, micro_batch_size, dp_size, dp_rank,
                                  vocab_size, collate)


def parse_skip_ranges(ranges: Optional[Sequence[str]]) -> List[Tuple[int, int]]:
    """'START-END' iteration ranges (inclusive, 1-based iterations as Megatron prints them)."""
    out = []
    for text in ranges or []:
        parts = text.split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
            raise UserError(f"--skip-train-iteration-range '{text}' is not START-END with START <= END, e.g. 100-200")
        out.append((int(parts[0]), int(parts[1])))
    return out


def skip_sample_ranges_to_add(
    iteration_ranges: Sequence[Tuple[int, int]], next_iteration: int, consumed_samples: int, global_batch_size: int,
    known: Dict[str, List[int]],
) -> Optional[List[int]]:
    """When ``next_iteration`` starts a skip range not yet recorded, its absolute sample range.

    Ranges are converted to samples the first time they are reached and stored in the checkpoint,
    so a resume (or a changed batch size) skips the same data, not the same iteration numbers.
    """
    for start, end in iteration_ranges:
        key = f"{start}-{end}"
        if next_iteration == start and key not in known:
            n = (end - start + 1) * global_batch_size
            return [key, consumed_samples, consumed_samples + n]
    return None


class StepReader:
    """Reads training steps' micro-batches ahead of the step that trains (``--num-workers``).

    ``read(consumed_samples, global_batch_size)`` gives one step's micro-batches (a list).
    With ``workers`` > 0, handing out the step at ``consumed`` starts reading the next ``workers``
    steps in as many background threads (``global_batch_size_at(consumed)`` is the schedule's
    batch size at a sample position), so reading overlaps training. A request for any other step
    (a skipped range moved the position) is read in place, and the read-ahead restarts after it.
    Which batches a step gets never depends on this: reading is a pure function of the step, only
    its timing changes. Threads rather than processes: the reads are memory-mapped numpy
    gathers, and a thread needs no fork of a process holding a DeepSpeed engine and its groups.
    """

    def __init__(self, read: Callable[[int, int], list], workers: int, global_batch_size_at: Callable[[int], int]):
        from concurrent.futures import ThreadPoolExecutor

        self.read, self.workers, self.global_batch_size_at = read, workers, global_batch_size_at
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="step-reader") if workers > 0 else None
        self.pending: Dict[Tuple[int, int], "object"] = {}

    def __call__(self, consumed_samples: int, global_batch_size: int) -> list:
        key = (consumed_samples, global_batch_size)
        future = self.pending.pop(key, None)
        if self.pool is None:
            return self.read(*key)
        if future is None:
            self._drop_pending()
            batches = self.read(*key)
        else:
            batches = future.result()  # a failed read raises here, when its step is due
        self._read_ahead(consumed_samples + global_batch_size)
        return batches

    def _read_ahead(self, consumed: int) -> None:
        for _ in range(self.workers):
            gbs = self.global_batch_size_at(consumed)
            if (consumed, gbs) not in self.pending:
                self.pending[(consumed, gbs)] = self.pool.submit(self.read, consumed, gbs)
            consumed += gbs

    def _drop_pending(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()

    def close(self) -> None:
        if self.pool is not None:
            self._drop_pending()
            self.pool.shutdown(wait=True)
