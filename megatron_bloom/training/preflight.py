"""Start-up checks of a training run's inputs: data, tokenizer and the checkpoint to resume.

Run by the entry point after the configuration is validated and before any process group, model
or DeepSpeed engine exists, so that a wrong input fails in seconds with one ``error:`` line
instead of after the engine is built (tens of seconds to minutes at scale) or at the first bad
batch. Every check is cheap whatever the corpus or model size:

* a local ``--tokenizer-name-or-path`` loads and has no more tokens than the model's vocabulary
  (a Hub name is not looked up: no network at start-up);
* every data prefix opens (header, and .bin size against the .idx: no data is read);
* every validation part holds documents (pairs) with tokens, unless ``--eval-iters 0`` asks for
  no evaluation (see ``check_validation``);
* its largest token id is below the model's ``vocab_size``: read from the ``PREFIX.tokens.json``
  sidecar the preprocessing tools write, or, for data from other tools, from a scan of the
  memory-mapped .bin when it is at most ``SCAN_LIMIT_BYTES`` (see indexed_dataset.py); larger
  unrecorded data is left to the per-batch check of the training loop;
* the checkpoint ``--load`` would resume has a readable state, the model's shape, and no
  truncated ``.pt`` file; so has a native ``--pretrained`` (finetuning).

Only global rank 0 runs them: the other ranks would fail the same way, and thousands of ranks
reading the same files at once is what a shared filesystem handles worst. The launcher (torchrun,
srun --kill-on-bad-exit) then stops the others.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Tuple

from megatron_bloom.errors import UserError
from megatron_bloom.config.vocab import megatron_padded_vocab_size
from megatron_bloom.config.schema import RunConfig


def data_prefixes(cfg: RunConfig) -> List[Tuple[str, str]]:
    """(flag, prefix) of every dataset the run reads, in flag order, without duplicates."""
    from megatron_bloom.data.blends import parse_data_path, parse_weighted_split_paths
    from megatron_bloom.data.xp3 import read_weighted_split_paths_file

    d = cfg.data
    out: List[Tuple[str, str]] = []
    try:
        # As training.data.build_datasets: a train group wins over --data-path, and validation
        # groups are read only along with it.
        if d.train_weighted_split_paths or d.train_weighted_split_paths_path:
            for kind in ("train", "valid"):
                flag = f"--{kind}-weighted-split-paths"
                groups = getattr(d, f"{kind}_weighted_split_paths")
                path = getattr(d, f"{kind}_weighted_split_paths_path")
                if path and groups:
                    raise UserError(f"{flag} and {flag}-path are both given; keep one")
                if path:
                    groups, flag = read_weighted_split_paths_file(path, flag + "-path"), flag + "-path"
                if groups:
                    out += [(flag, p) for g in parse_weighted_split_paths(groups, flag) for p in g.prefixes]
        elif d.data_path:
            out += [("--data-path", p) for p in parse_data_path(d.data_path)[0]]
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    seen, unique = set(), []
    for flag, prefix in out:
        if prefix not in seen:
            seen.add(prefix)
            unique.append((flag, prefix))
    return unique


def check_data(cfg: RunConfig, finetune: bool = False) -> None:
    """Every prefix opens and holds no token id >= the model's vocab_size.

    A finetune's prefix is a pair dataset: ours (one .bin/.idx) or Megatron-DeepSpeed's
    ``PREFIX_inputs_document`` + ``PREFIX_targets_document``, each file checked.
    """
    from megatron_bloom.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset
    from megatron_bloom.data.mtf import indexed_prefixes

    vocab = cfg.model.vocab_size
    for flag, prefix in data_prefixes(cfg):
        for sub in indexed_prefixes(prefix, pairs=finetune):
            try:
                ds = MMapIndexedDataset(sub)
            except IndexedDatasetError as exc:
                raise UserError(f"{flag}: {exc}") from None
            top, _ = ds.max_token_id()
            if top is not None and top >= vocab:
                raise UserError(
                    f"{sub} holds token id {top} >= vocab_size {vocab}: it was tokenized with a larger vocabulary "
                    f"than the model's; pass that tokenizer (--tokenizer-name-or-path, which sizes the vocabulary), "
                    f"set --vocab-size {megatron_padded_vocab_size(top + 1, cfg.parallel.tensor_model_parallel_size, cfg.model.make_vocab_size_divisible_by)} "
                    f"or more, or re-preprocess the data with the model's tokenizer"
                )


def _validation_parts(cfg: RunConfig) -> list:
    """(where, prefix, WeightedSplitEntry or None for --split) of every validation part the run
    evaluates, as training.data.build_datasets and data.finetune cut them."""
    from megatron_bloom.data.blends import parse_data_path, parse_weighted_split_paths
    from megatron_bloom.data.mixtures import weighted_split_paths

    d = cfg.data
    train_groups, valid_groups = weighted_split_paths(cfg)
    try:
        if train_groups:  # validation groups are read only along with a train group
            groups = parse_weighted_split_paths(valid_groups, "--valid-weighted-split-paths") if valid_groups else []
            return [(f"validation group {g.name!r}", e.prefix, e) for g in groups for e in g.entries]
        prefixes = parse_data_path(d.data_path)[0] if d.data_path else []
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    return [(f"--split {d.split}", p, None) for p in prefixes]


def check_validation(cfg: RunConfig, finetune: bool = False) -> None:
    """Every validation part holds documents (pairs) and tokens, unless --eval-iters 0 asks for no evaluation.

    Evaluation reads ``eval_iters`` batches of each validation group; a part asked for but empty (a
    --split validation share that rounds to no document, a range that holds no document, files of
    empty documents) would otherwise mean no evaluation at all, or a failure after the engine is
    built. A --split whose validation weight is 0 asks for none: no evaluation, as in Megatron.
    Only sizes are read (the .idx files).
    """
    from megatron_bloom.data.gpt_dataset import parse_split, split_boundaries
    from megatron_bloom.data.indexed_dataset import MMapIndexedDataset
    from megatron_bloom.data.mtf import open_pairs

    iters = cfg.logging.eval_iters
    if iters == 0:
        return
    fix = f"or pass --eval-iters 0 for no evaluation (--eval-iters {iters} asks for {iters} batch(es) per evaluation)"
    unit = "pairs" if finetune else "documents"
    for where, prefix, entry in _validation_parts(cfg):
        if finetune:
            pairs = open_pairs(prefix)
            sizes = pairs.input_sizes + pairs.target_sizes
        else:
            sizes = MMapIndexedDataset(prefix).sizes
        n = len(sizes)
        if entry is None:
            if parse_split(cfg.data.split)[1] == 0:
                continue  # no validation part asked for: no evaluation, as in Megatron
            first, last = split_boundaries(cfg.data.split, n)[1:3]
            widen = "give validation a larger share of --split"
        else:
            first, last = entry.document_range(n)
            widen = f"widen the range {entry.start:g}:{entry.end:g}"
        if last <= first:
            raise UserError(f"{where}: no validation {unit} in {prefix} ({n} {unit} in all); {widen}, {fix}")
        if int(sizes[first:last].sum()) == 0:
            raise UserError(f"{where}: the validation {unit} [{first}, {last}) of {prefix} hold no tokens; {widen}, {fix}")


def check_tokenizer(cfg: RunConfig) -> None:
    """A local --tokenizer-name-or-path loads and fits in the model's vocabulary."""
    from megatron_bloom.data.tokenizer import TokenizerLoadError, load_tokenizer, looks_like_hub_id

    name = cfg.data.tokenizer_name_or_path
    if not name:
        return
    if not os.path.exists(os.path.expanduser(name)) and looks_like_hub_id(name):
        return  # a Hub name: resolved (or refused) by the tools that use it, not over the network here
    try:
        tokenizer = load_tokenizer(name)
    except TokenizerLoadError as exc:
        raise UserError(f"--tokenizer-name-or-path: {exc}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {name} has {tokenizer.vocab_size} tokens but vocab_size is {cfg.model.vocab_size}; "
            f"drop --vocab-size (the tokenizer then sizes it), set --vocab-size "
            f"{megatron_padded_vocab_size(tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size, cfg.model.make_vocab_size_divisible_by)} "
            f"or more, or use the model's tokenizer"
        )


def check_checkpoints(cfg: RunConfig) -> None:
    """The checkpoint --load would resume is of this model's shape, and every file it would read is
    intact and holds only data (``checkpoint/trust.py``); so is --pretrained (finetuning).

    A checkpoint of another layout (TP, PP, DP) is fine: resume converts it (see pretrain.py), or
    loads the universal checkpoint an earlier conversion left next to it, which is checked too.
    """
    from megatron_bloom.checkpoint.manager import check_compatible, find_checkpoint
    from megatron_bloom.checkpoint.native import resolve_checkpoint
    from megatron_bloom.checkpoint.trust import check_checkpoint_folder, check_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no checkpoint yet" is reported by the trainer itself
        info = find_checkpoint(cfg.checkpoint.load)
    if info is not None:
        check_compatible(info, cfg.model)
        fix = f"restore it, or delete {info.path} and point 'latest' at an earlier checkpoint"
        check_checkpoint_folder(info.path, fix)
        universal = os.path.join(info.directory, "universal", info.tag)
        if os.path.isdir(universal):
            check_checkpoint_folder(universal, f"delete {universal}: it is converted again from {info.path}")
        return  # a finetune that resumes its own checkpoint ignores --pretrained
    src = cfg.finetune.pretrained
    if not src:
        return
    if os.path.isfile(os.path.join(src, "config.json")):
        from megatron_bloom.checkpoint.hf import weight_files

        for path in weight_files(src):  # safetensors hold no code; a pytorch_model*.bin may
            if not path.endswith(".safetensors"):
                check_file(path, f"re-export {src} as safetensors, or take it from a source you trust")
    else:
        check_checkpoint_folder(os.path.join(*resolve_checkpoint(src)))


def check_training_inputs(cfg: RunConfig, data: bool = True, finetune: bool = False) -> None:
    """All of the above on global rank 0 (see the module docstring); raises UserError."""
    from megatron_bloom.distributed.launch_env import detect_launch_env

    if detect_launch_env().rank != 0:
        return
    check_tokenizer(cfg)  # first: "the tokenizer is larger than the model" says more than a token id
    if data:
        check_data(cfg, finetune)
        check_validation(cfg, finetune)
    check_checkpoints(cfg)
