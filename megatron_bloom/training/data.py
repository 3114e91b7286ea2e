"""Pretraining batches: datasets from the configuration, and this rank's micro-batches of a step.

Sample order is Megatron's: global sample k of the run belongs to micro-batch k // mbs, which
goes to DP rank (k // mbs) % DP. A step that starts at ``consumed_samples`` with global batch G
reads exactly samples [consumed, consumed + G), whatever the layout, so changing DP, TP or PP
changes who reads a sample, never which samples a step sees.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import RunConfig

MicroBatch = Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


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
        barrier=dist.barrier if dist.is_initialized() else None,
    )
    try:
        if train_groups:
            (group,) = parse_weighted_split_paths(train_groups, "--train-weighted-split-paths")
            train = build_group_dataset(group, train_samples, opts, split_name="train")
            valid = {}
            if valid_groups:
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


def weighted_split_paths(cfg: RunConfig) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """(train groups, validation groups) from the flags or from the mixture files their *_path flags name."""
    from megatron_bloom.data.xp3 import read_weighted_split_paths_file

    d = cfg.data
    out = []
    for kind in ("train", "valid"):
        inline = getattr(d, f"{kind}_weighted_split_paths")
        path = getattr(d, f"{kind}_weighted_split_paths_path")
        if inline and path:
            raise UserError(f"--{kind}-weighted-split-paths and --{kind}-weighted-split-paths-path are both given; keep one")
        if path:
            try:
                inline = read_weighted_split_paths_file(path, f"--{kind}-weighted-split-paths-path")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        out.append(inline)
    return out[0], out[1]


def micro_batches_for_step(
    dataset,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    dp_rank: int,
    vocab_size: int,
) -> List[MicroBatch]:
    """This DP rank's micro-batches of the step starting at ``consumed_samples``."""
    out = []
    per_micro = micro_batch_size * dp_size
    for j in range(global_batch_size // per_micro):
        start = consumed_samples + j * per_micro + dp_rank * micro_batch_size
        rows = [np.asarray(dataset[k % len(dataset)]["text"], dtype=np.int64) for k in range(start, start + micro_batch_size)]
        tokens = torch.from_numpy(np.stack(rows))  # [mbs, seq + 1]
        top = int(tokens.max())
        if top >= vocab_size:
            raise UserError(
                f"training sample {start} holds token id {top} >= vocab_size {vocab_size}: the data was "
                f"tokenized with a larger vocabulary; re-preprocess it or set --vocab-size"
            )
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        out.append((inputs, (labels, torch.ones(labels.shape, dtype=torch.float32))))
    return out


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
