"""Tokenize xP3-style prompt/answer jsonl into paired datasets for launch/finetune.py.

    python data_tools/preprocess_xp3.py --input xp3/en xp3/fr --output-prefix data/xp3 \\
        --tokenizer-name-or-path bigscience/bloom --prepend-space --split-by language

Rows are JSON objects with string ``inputs`` and ``targets`` and optional ``language``, ``dataset``
and ``template``. An --input is a jsonl / jsonl.gz file or a folder searched recursively for them;
xP3 ships one folder per language, so a row without ``language`` takes its file's folder name, and
one without ``dataset`` its file name (without extension). Each pair is stored as one document of
two sequences (see megatron_bloom/data/xp3.py): the inputs tokens, and the targets tokens with EOD
appended (``--prepend-space`` puts a space before every target first, as BLOOMZ's data did).

``--output-format megatron-deepspeed`` writes Megatron-DeepSpeed's two files per dataset instead,
``PREFIX_inputs_document.{bin,idx}`` and ``PREFIX_targets_document.{bin,idx}``, laid out byte for
byte as its tools/preprocess_data.py writes them for the same token ids (the xP3 recipe ran it with
``--json-keys inputs`` and ``--json-keys targets --append-eod --prepend-space``); they carry no
names, so the finetune reads language and task off the prefix (megatron_bloom/data/mtf.py).

``--split-by language`` (or ``file``) writes one dataset per language (file) as ``PREFIX_<name>``
plus ``PREFIX.mixture.txt``, a bigscience mixture file for ``--train-weighted-split-paths-path``
(one line of double-quoted groups, which Megatron-DeepSpeed's parser reads too) whose weights
follow ``--mixture-weights``; ``--mixture-per-group`` writes one group per language instead (the
shape of a ``--valid-weighted-split-paths-path`` file, each language evaluated on its own). Outputs are
written as ``*.tmp`` and renamed when complete; problems print one ``error:`` line (exit code 2)
naming ``file:line``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np

from data_tools import run_tool
from megatron_bloom.atomic import atomic_write_text
from megatron_bloom.data.blends import weighted_split_group_text, weighted_split_paths_file_text
from megatron_bloom.data.indexed_dataset import best_dtype
from megatron_bloom.data.mtf import FORMAT_MDS, MegatronDeepSpeedPairsWriter
from megatron_bloom.data.readers import InputError, _text_problem, make_output_dir
from megatron_bloom.data.tokenizer import TokenizerLoadError, load_tokenizer
from megatron_bloom.data.xp3 import UNKNOWN, PairedDatasetWriter
from megatron_bloom.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def input_files(paths: List[str]) -> List[Tuple[str, str]]:
    """(file, folder-derived language) for every input; folders are searched recursively, sorted."""
    out = []
    for path in paths:
        if os.path.isfile(path):
            out.append((path, os.path.basename(os.path.dirname(os.path.abspath(path)))))
        elif os.path.isdir(path):
            found = sorted(
                os.path.join(root, f) for root, _, files in os.walk(path) for f in files if f.endswith(SUFFIXES)
            )
            if not found:
                raise InputError(f"{path}: folder holds no {'/'.join(SUFFIXES)} file")
            out.extend((f, os.path.basename(os.path.dirname(f))) for f in found)
        else:
            raise InputError(f"{path}: no such file or folder")
    return out


def file_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_rows(path: str, folder_language: str, skip_bad: bool, stats: dict) -> Iterator[Tuple[int, str, str, str, str, str]]:
    """(line number, inputs, targets, language, dataset, template) of every usable line."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                reason = None
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    reason = "invalid UTF-8; re-encode the file as UTF-8"
                except json.JSONDecodeError as exc:
                    reason = f"malformed JSON: {exc.msg} at column {exc.colno}"
                if reason is None and not isinstance(obj, dict):
                    reason = f"expected a JSON object, got {type(obj).__name__}"
                if reason is None:
                    for key in ("inputs", "targets"):
                        if key not in obj:
                            reason = f"key {key!r} is missing (keys: {', '.join(map(str, obj)) or 'none'})"
                            break
                        reason = _text_problem(key, obj[key])
                        if reason:
                            break
                if reason is None and not obj["inputs"].strip():
                    reason = "'inputs' is empty: the first target token would have nothing to be predicted from"
                if reason is not None:
                    if not skip_bad:
                        raise InputError(f"{path}:{line_no}: {reason}; fix it or pass --skip-bad-lines")
                    stats["bad"] += 1
                    stats["first_bad"] = stats["first_bad"] or f"{path}:{line_no}: {reason}"
                    continue

                def name(key: str, default: str) -> str:
                    value = obj.get(key)
                    return str(value) if isinstance(value, str) and value else default

                yield (line_no, obj["inputs"], obj["targets"], name("language", folder_language or UNKNOWN),
                       name("dataset", file_stem(path)), name("template", ""))
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def preprocess(args) -> dict:
    start = time.perf_counter()
    files = input_files(args.input)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path)
    if tokenizer.eod_id is None:
        raise TokenizerLoadError(f"{args.tokenizer_name_or_path}: tokenizer has no eos token to end targets with")
    make_output_dir(args.output_prefix)  # before any input is read: a bad folder fails in a second
    dtype = best_dtype(tokenizer.vocab_size)
    meta = {
        "tokenizer": str(args.tokenizer_name_or_path),
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "pad_id": tokenizer.pad_id,
        "prepend_space": bool(args.prepend_space),
        "inputs": [os.path.basename(os.path.normpath(p)) for p in args.input],
    }
    writers: Dict[str, object] = {}
    stats = {"bad": 0, "first_bad": None, "pairs": 0}
    writer_class = MegatronDeepSpeedPairsWriter if args.output_format == FORMAT_MDS else PairedDatasetWriter

    def writer_for(group: str):
        if group not in writers:
            prefix = args.output_prefix if args.split_by == "none" else f"{args.output_prefix}_{safe_name(group)}"
            writers[group] = writer_class(prefix, dtype, meta)
        return writers[group]

    def flush(batch: list) -> None:
        """Tokenize a batch of rows (line, inputs, targets, language, dataset, template, file, group)."""
        if not batch:
            return
        inputs = tokenizer.encode_batch([r[1] for r in batch])
        space = " " if args.prepend_space else ""
        targets = tokenizer.encode_batch([space + r[2] for r in batch])
        by_group: Dict[str, list] = {}
        for row, inp, tgt in zip(batch, inputs, targets):
            if not inp:
                raise InputError(f"{row[6]}:{row[0]}: 'inputs' tokenizes to no token")
            by_group.setdefault(row[7], []).append(
                (np.asarray(inp, dtype=dtype), np.asarray(tgt + [tokenizer.eod_id], dtype=dtype), row[3], row[4], row[5])
            )
        for group, rows in by_group.items():
            cols = list(zip(*rows))
            writer_for(group).add_pairs(cols[0], cols[1], cols[2], cols[3], cols[4])
        stats["pairs"] += len(batch)
        batch.clear()

    committed = False
    metas: Dict[str, dict] = {}
    try:
        for path, folder_language in files:
            batch: list = []
            for line_no, inputs, targets, language, dataset, template in read_rows(
                    path, folder_language, args.skip_bad_lines, stats):
                group = {"none": "", "language": language, "file": file_stem(path)}[args.split_by]
                batch.append((line_no, inputs, targets, language, dataset, template, path, group))
                if len(batch) >= args.batch_size:
                    flush(batch)
            flush(batch)
        if stats["pairs"] == 0:
            raise InputError(f"no usable pair in {', '.join(args.input)} ({stats['bad']} bad lines skipped)")
        metas = {group: w.commit() for group, w in writers.items()}
        committed = True
    finally:
        if not committed:
            for w in writers.values():
                w.discard()
    stats["outputs"] = {group: w.prefix for group, w in writers.items()}
    stats["metas"] = metas
    if args.split_by != "none":
        stats["mixture"] = write_mixture(args.output_prefix + ".mixture.txt", metas, stats["outputs"],
                                         args.mixture_weights, args.mixture_range, args.mixture_name,
                                         args.mixture_per_group)
    stats["seconds"] = time.perf_counter() - start
    return stats


def write_mixture(path: str, metas: Dict[str, dict], prefixes: Dict[str, str], weighting: str, span: str,
                  name: str = "train", per_group: bool = False) -> str:
    """A bigscience mixture file, '"NAME: W START:END PREFIX, ..."' on one line, weights by pairs/tokens/uniform.

    ``per_group`` writes '"NAME_<group>: 1 START:END PREFIX" "NAME_<group2>: ..."' instead.
    """
    groups = sorted(metas)
    if weighting == "pairs":
        weights = [metas[g]["num_pairs"] for g in groups]
    elif weighting == "tokens":
        weights = [metas[g]["input_tokens"] + metas[g]["target_tokens"] for g in groups]
    else:
        weights = [1.0] * len(groups)
    total = float(sum(weights))
    try:
        if per_group:
            texts = [weighted_split_group_text(f"{name}_{safe_name(g)}", [(1.0, span, prefixes[g])]) for g in groups]
        else:
            texts = [weighted_split_group_text(name, [(w / total, span, prefixes[g]) for g, w in zip(groups, weights)])]
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    atomic_write_text(path, weighted_split_paths_file_text(texts))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="jsonl/jsonl.gz files or folders of them (one folder per language)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.{bin,idx,pairs.npy,pairs.json} (or PREFIX_<name>.* "
                   "per group; see --output-format)")
    p.add_argument("--tokenizer-name-or-path", required=True, help="tokenizer folder, tokenizer.json, or Hub name")
    p.add_argument("--prepend-space", action="store_true", help="put a space before every target before tokenizing it")
    p.add_argument("--split-by", choices=["none", "language", "file"], default="none",
                   help="one paired dataset for everything, or one per language / per input file (+ PREFIX.mixture.txt)")
    p.add_argument("--mixture-weights", choices=["pairs", "tokens", "uniform"], default="pairs",
                   help="weights written to PREFIX.mixture.txt with --split-by (default: by number of pairs)")
    p.add_argument("--mixture-range", default="0:1", help="START:END fraction of each dataset in the mixture file")
    p.add_argument("--mixture-name", default="train", help="group name in the mixture file (default train)")
    p.add_argument("--mixture-per-group", action="store_true",
                   help="one mixture group per language/file, named NAME_<group> (a validation mixture)")
    p.add_argument("--output-format", choices=["paired", FORMAT_MDS], default="paired",
                   help="paired: PREFIX.{bin,idx,pairs.npy,pairs.json}; megatron-deepspeed: "
                        "PREFIX_inputs_document.{bin,idx} + PREFIX_targets_document.{bin,idx}")
    p.add_argument("--batch-size", type=int, default=1000, help="rows per tokenizer call")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of stopping")
    return p


def summary(stats: dict) -> str:
    parts = []
    for group, meta in sorted(stats["metas"].items()):
        langs = ", ".join(f"{k} {v['pairs']:,}" for k, v in sorted(meta["per_language"].items()))
        parts.append(f"{stats['outputs'][group]}: {meta['num_pairs']:,} pairs, {meta['input_tokens']:,} input + "
                     f"{meta['target_tokens']:,} target tokens ({langs})")
    line = f"done in {stats['seconds']:.1f}s: {stats['pairs']:,} pairs; skipped {stats['bad']} bad lines"
    if stats["first_bad"]:
        line += f" (first: {stats['first_bad']})"
    line += "; wrote " + "; ".join(parts)
    if stats.get("mixture"):
        line += f"; mixture {stats['mixture']}"
    return line


def preprocess_command(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    stats = preprocess(args)
    print(summary(stats), file=sys.stderr)
    return 0


def main(argv=None) -> None:
    """``python data_tools/preprocess_xp3.py`` and ``megatron-bloom-preprocess-xp3``."""
    run_tool(preprocess_command, argv)


if __name__ == "__main__":
    main()
