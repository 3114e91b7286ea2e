"""Finetuning datasets: prompt/answer pairs packed into rows, per split group.

A mixture prefix is either our paired dataset (data/xp3.py) or Megatron-DeepSpeed's two files
``PREFIX_inputs_document`` + ``PREFIX_targets_document`` (data/mtf.py); ``mtf.open_pairs`` detects
which. The packing follows the format unless ``finetune.packing`` (when the config has it) says
otherwise (see ``packing_mode``):

* Megatron-DeepSpeed pairs are packed as its DecoderPackedMTFDataset does (mtf.MTFPackedRows:
  seeded per-epoch shuffles with the run seed, greedy in-order packing, overlong pairs skipped),
  so a BLOOMZ recipe sees the rows it saw there;
* our own paired datasets keep best-fit-decreasing packing (packing.PackedRows: less padding,
  overlong pairs truncated or skipped by ``--overlong``).

A "sample" is a packed row of ``seq_length`` tokens. Each row knows its target token and target
sequence counts (``row_counts``), from the packing plan alone, so every rank can normalise the
loss over a whole global batch without reading tokens.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_bloom.config.schema import RunConfig
from megatron_bloom.data.mixtures import weighted_split_paths
from megatron_bloom.errors import UserError


PACKING_MODES = ("auto", "mtf", "best-fit")


def packing_mode(cfg: RunConfig, pairs) -> str:
    """'mtf' or 'best-fit' for a dataset: ``finetune.packing`` if set (auto when absent), else by its format."""
    from megatron_bloom.data.mtf import FORMAT_MDS

    mode = getattr(cfg.finetune, "packing", None) or "auto"
    if mode not in PACKING_MODES:
        raise UserError(f"packing {mode!r} must be one of {', '.join(PACKING_MODES)}")
    if mode == "auto":
        return "mtf" if getattr(pairs, "format", None) == FORMAT_MDS else "best-fit"
    return mode


def pad_id_for(cfg: RunConfig):
    """The pad id written into padding of Megatron-DeepSpeed pairs (their files record none):
    --tokenizer-name-or-path's, else that of a --pretrained folder holding a tokenizer, else None
    (mtf.BLOOM_PAD_ID). Only cosmetic: padding carries segment id 0 and no loss."""
    from megatron_bloom.data.tokenizer import load_tokenizer

    sources = [cfg.data.tokenizer_name_or_path] if cfg.data.tokenizer_name_or_path else []
    pretrained = cfg.finetune.pretrained
    if pretrained and os.path.isfile(os.path.join(pretrained, "tokenizer.json")):
        sources.append(pretrained)
    for source in sources:
        try:
            return load_tokenizer(source).pad_id
        except Exception:  # an unloadable tokenizer is reported by the preflight, not here
            continue
    return None


def row_counts(dataset, k: int) -> Tuple[int, int]:
    """(target tokens, target sequences) of row k of a PackedRows or a BlendedDataset of them."""
    if hasattr(dataset, "dataset_index"):
        return dataset.datasets[int(dataset.dataset_index[k])].counts(int(dataset.dataset_sample_index[k]))
    return dataset.counts(k)


class GroupNames:
    """Global language and task names over every paired dataset of the run (sorted)."""

    def __init__(self, datasets: Sequence):
        self.languages = sorted({n for d in datasets for n in d.languages})
        self.tasks = sorted({n for d in datasets for n in d.datasets})

    def maps(self, paired) -> Tuple[np.ndarray, np.ndarray]:
        return (np.array([self.languages.index(n) for n in paired.languages], dtype=np.int64),
                np.array([self.tasks.index(n) for n in paired.datasets], dtype=np.int64))


def build_finetune_datasets(cfg: RunConfig, train_rows: int, valid_rows: int):
    """(train rows, {validation group: rows}, names, packing report lines) from the data flags.

    ``--data-path [W1] P1 [W2 P2 ...]`` with ``--split`` cuts each paired dataset's pairs into
    train/valid/test ranges; ``--train-weighted-split-paths`` / ``--valid-weighted-split-paths``
    (or their ``-path`` mixture files) name fractions of each dataset's pairs per group.
    """
    from megatron_bloom.data.blends import (
        BlendedDataset,
        blend_num_samples,
        parse_data_path,
        parse_weighted_split_paths,
    )
    from megatron_bloom.data.gpt_dataset import split_boundaries
    from megatron_bloom.data.indexed_dataset import IndexedDatasetError
    from megatron_bloom.data.mtf import MTFPackedRows, open_pairs
    from megatron_bloom.data.packing import PackedRows

    d, seed, seq = cfg.data, cfg.training.seed, cfg.model.seq_length
    train_groups, valid_groups = weighted_split_paths(cfg)
    # (group name, [(weight, prefix, first fraction or None, last, index range from --split)])
    plans: List[Tuple[str, list]] = []
    valid_plans: List[Tuple[str, list]] = []
    opened: Dict[str, object] = {}
    pad: list = []

    def paired(prefix: str):
        if prefix not in opened:
            from megatron_bloom.data.mtf import FORMAT_MDS, pair_format

            if pair_format(prefix) == FORMAT_MDS and not pad:
                pad.append(pad_id_for(cfg))
            opened[prefix] = open_pairs(prefix, pad[0] if pad else None)
        return opened[prefix]

    try:
        if valid_groups and not train_groups:
            raise UserError("--valid-weighted-split-paths needs --train-weighted-split-paths (or its -path file) too")
        if train_groups:
            (group,) = parse_weighted_split_paths(train_groups, "--train-weighted-split-paths")
            plans.append((group.name, [(w, e.prefix, e.document_range(len(paired(e.prefix))))
                                       for w, e in zip(group.weights, group.entries)]))
            for g in parse_weighted_split_paths(valid_groups, "--valid-weighted-split-paths") if valid_groups else []:
                valid_plans.append((g.name, [(w, e.prefix, e.document_range(len(paired(e.prefix))))
                                             for w, e in zip(g.weights, g.entries)]))
        elif d.data_path:
            prefixes, weights = parse_data_path(d.data_path)
            train, valid = [], []
            for w, p in zip(weights, prefixes):
                b = split_boundaries(d.split, len(paired(p)))
                train.append((w, p, (b[0], b[1])))
                valid.append((w, p, (b[1], b[2])))
            plans.append(("train", [e for e in train if e[2][1] > e[2][0]]))
            if all(e[2][1] > e[2][0] for e in valid):
                valid_plans.append(("validation", valid))
            if len(plans[0][1]) != len(prefixes):
                raise UserError(f"--split {d.split} leaves some --data-path datasets without training pairs")
        else:
            raise UserError("no finetuning data: give --data-path PREFIX (paired datasets from "
                            "data_tools/preprocess_xp3.py, or Megatron-DeepSpeed's PREFIX_inputs_document + "
                            "PREFIX_targets_document) or --train-weighted-split-paths(-path)")
        names = GroupNames(list(opened.values()))
        report: List[str] = []

        def build(split: str, gi: int, name: str, entries: list, rows: int):
            parts = []
            sizes = [rows] if len(entries) == 1 else blend_num_samples([w for w, _, _ in entries], rows)
            for ci, ((w, prefix, (first, last)), n) in enumerate(zip(entries, sizes)):
                if last <= first:
                    raise UserError(f"{split} group {name!r}: {prefix} range holds no pair")
                pd = paired(prefix)
                lang_map, task_map = names.maps(pd)
                label = f"{split}/{name}/{os.path.basename(prefix)}[{first}:{last}]"
                if packing_mode(cfg, pd) == "mtf":
                    # Megatron-DeepSpeed seeds every dataset of every split with the run seed itself.
                    part = MTFPackedRows(pd, first, last, n, seq, seed, lang_map, task_map, name=label)
                else:
                    part = PackedRows(pd, first, last, n, seq, [seed, 0 if split == "train" else 1, gi, ci],
                                      cfg.finetune.overlong, lang_map, task_map, name=label)
                report.append(part.stats.line(label) + f"; {part.epochs} pass(es) for {n:,} rows")
                parts.append(part)
            if len(parts) == 1:
                return parts[0]
            return BlendedDataset(parts, [w for w, _, _ in entries], rows, names=[p.name for p in parts])

        train_ds = build("train", 0, plans[0][0], plans[0][1], train_rows)
        valid_ds = {name: build("valid", gi, name, entries, valid_rows) for gi, (name, entries) in enumerate(valid_plans)}
    except (ValueError, FileNotFoundError, IndexedDatasetError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc).splitlines()[0]) from None
    return train_ds, valid_ds, names, report
