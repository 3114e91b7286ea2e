"""Instruction finetuning (BLOOMZ-style): packed prompt/answer rows, loss on targets only.

Same loop, checkpoints, stops and monitoring as pretraining (``Trainer``), with four changes:

* **start**: weights come from ``--pretrained`` (a native checkpoint at any layout, or a
  transformers folder converted once to a weights-only native checkpoint in the run directory),
  with a fresh optimizer, LR schedule and data position. As soon as ``--load`` holds the
  finetune's own checkpoint, that is resumed exactly like pretraining and ``--pretrained`` is
  ignored.
* **data**: paired datasets (``data/xp3.py``) packed into rows of ``seq_length``
  (``data/packing.py``); a "sample" is a packed row, so ``--global-batch-size``,
  ``--train-samples`` and ``consumed_samples`` count rows, as in Megatron-DeepSpeed's MTF.
* **loss**: exact global means. With T target tokens in the whole global batch, the token-mean
  loss is ``sum(token losses) / T``; with ``--norm-target-loss`` each token of a target of length
  n weighs ``1/n`` and the sum is divided by the number S of target sequences in the global batch.
  DeepSpeed reports and differentiates ``mean over DP ranks of mean over the G micro-batches of
  each micro-batch's loss``, so micro-batch j returns ``sum_j(weights * losses) * G * DP / T``
  (or ``/ S``); the two means then undo the ``G * DP`` factor and the result is the global mean,
  whatever the micro-batch size, accumulation and DP size. T and S come from the packing plan
  (no tokens read), so every rank knows them for the whole global batch.
* **reporting**: per language and per task (xP3's ``dataset``) training and validation loss,
  through ``TrainingMonitor.log_scalars``.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_bloom.errors import UserError
from megatron_bloom.config import RunConfig, parse_config, validate_config
from megatron_bloom.config.schema import SECTIONS
from megatron_bloom.training.losses import FinetuningLoss
from megatron_bloom.training.pretrain import Trainer, _log0

FINETUNE_DEFAULTS: Dict[str, Dict[str, object]] = {
    "training": {
        "lr": 2e-5,
        "min_lr": 0.0,
        "lr_decay_style": "constant",
        "lr_warmup_iters": 0,
        "lr_warmup_samples": 0,
        "weight_decay": 1e-4,
        "clip_grad": 1.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
    },
}
"""BLOOMZ's finetuning hyper-parameters; they replace the pretraining defaults unless set by flag or YAML."""

ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                     "layer_norm_epsilon", "apply_residual_connection_post_layernorm")
"""Model fields taken from --pretrained when neither a flag, the YAML nor --model-name sets them."""

PRETRAINED_DIR = "pretrained"
"""Sub-folder of the run directory holding a converted --pretrained source."""


# ---- configuration -------------------------------------------------------------------------------


def explicitly_set(argv: Sequence[str]) -> Dict[str, set]:
    """{section: field names} given on the command line or in the --config YAML."""
    from megatron_bloom.config.loader import _flag_index, build_parser, load_yaml

    ns, _ = build_parser().parse_known_args(list(argv))
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    out: Dict[str, set] = {s: set() for s in SECTIONS}
    if "config" in given:
        for section, values in load_yaml(given.pop("config")).items():
            out[section].update(values)
    index = _flag_index()
    for name in given:
        section, key = index[name]
        out[section].add(key)
    return out


def pretrained_model_config(path: str):
    """The ModelConfig of a --pretrained source (reads only its configuration, not its weights)."""
    from megatron_bloom.checkpoint.native import STATE_FILE, model_config_from_state, read_state, resolve_checkpoint

    if not os.path.isdir(path):
        raise UserError(f"--pretrained {path}: no such directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron_bloom.checkpoint.hf import _read_json, model_config_from_hf

        return model_config_from_hf(_read_json(os.path.join(path, "config.json")), os.path.join(path, "config.json"))
    directory, tag = resolve_checkpoint(path)
    ckpt = os.path.join(directory, tag)
    return model_config_from_state(read_state(ckpt), os.path.join(ckpt, STATE_FILE))


def resolve_finetune_config(argv: Optional[Sequence[str]] = None) -> Tuple[RunConfig, int]:
    """Flags + YAML as for pretraining, with BLOOMZ defaults and the architecture of --pretrained."""
    import sys

    from megatron_bloom.data.packing import OVERLONG_MODES
    from megatron_bloom.distributed.launch_env import world_size_from_env

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    given = explicitly_set(argv)
    for section, values in FINETUNE_DEFAULTS.items():
        for key, value in values.items():
            if key not in given[section]:
                setattr(getattr(cfg, section), key, value)
    if cfg.finetune.pretrained and "model_name" not in given["model"]:
        source = pretrained_model_config(cfg.finetune.pretrained)
        for key in ARCHITECTURE_KEYS:
            if key not in given["model"]:
                setattr(cfg.model, key, getattr(source, key))
    if cfg.finetune.overlong not in OVERLONG_MODES:
        raise UserError(f"overlong='{cfg.finetune.overlong}' is not one of {', '.join(OVERLONG_MODES)}")
    world_size = world_size_from_env()
    validate_config(cfg, world_size)
    return cfg, world_size


# ---- data ----------------------------------------------------------------------------------------


def row_counts(dataset, k: int) -> Tuple[int, int]:
    """(target tokens, target sequences) of row k of a PackedRows or a BlendedDataset of them."""
    if hasattr(dataset, "dataset_index"):
        return dataset.datasets[int(dataset.dataset_index[k])].counts(int(dataset.dataset_sample_index[k]))
    return dataset.counts(k)


def finetune_micro_batches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                           dp_size: int, dp_rank: int, vocab_size: int, norm_target_loss: bool) -> list:
    """This DP rank's micro-batches of the step starting at ``consumed_samples`` (rows in Megatron order).

    Each is ``((input_ids, segment_ids), (labels, loss_weights, scale, language, task))``; see the
    module docstring for ``scale``.
    """
    n = len(dataset)
    per_micro = micro_batch_size * dp_size
    num_micro = global_batch_size // per_micro
    counts = np.array([row_counts(dataset, (consumed_samples + i) % n) for i in range(global_batch_size)])
    total = int(counts[:, 1 if norm_target_loss else 0].sum())
    # float64 then one rounding: the factor every layout multiplies its partial sums by.
    scale = torch.tensor([num_micro * dp_size / total if total else 0.0], dtype=torch.float64).float()
    out = []
    for j in range(num_micro):
        start = consumed_samples + j * per_micro + dp_rank * micro_batch_size
        rows = [dataset[k % n] for k in range(start, start + micro_batch_size)]
        b = {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}  # [mbs, s] each
        top = int(b["tokens"].max())
        if top >= vocab_size:
            raise UserError(f"finetuning row {start} holds token id {top} >= vocab_size {vocab_size}: the pairs were "
                            f"tokenized with a larger vocabulary; re-preprocess them or set --vocab-size")
        weights = b["sequence_weight"] if norm_target_loss else b["loss_mask"]
        out.append(((b["tokens"], b["segment_ids"]), (b["labels"], weights, scale, b["language"], b["task"])))
    return out


class _Names:
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
    from megatron_bloom.data.packing import PackedRows
    from megatron_bloom.data.xp3 import PairedDataset
    from megatron_bloom.training.data import weighted_split_paths

    d, seed, seq = cfg.data, cfg.training.seed, cfg.model.seq_length
    train_groups, valid_groups = weighted_split_paths(cfg)
    # (group name, [(weight, prefix, first fraction or None, last, index range from --split)])
    plans: List[Tuple[str, list]] = []
    valid_plans: List[Tuple[str, list]] = []
    opened: Dict[str, PairedDataset] = {}

    def paired(prefix: str) -> PairedDataset:
        if prefix not in opened:
            opened[prefix] = PairedDataset(prefix)
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
                            "data_tools/preprocess_xp3.py) or --train-weighted-split-paths(-path)")
        names = _Names(list(opened.values()))
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


# ---- per-language / per-task loss ------------------------------------------------------------------


class GroupLossMeter:
    """Sums of weighted token losses and of weights per group id, for each grouping (language, task).

    ``LMLoss`` feeds it every micro-batch on the last pipeline stage; ``reduce`` adds up every rank's
    sums (a collective: every rank calls it at the same points) and returns per-group means, which
    are token means (or per-sequence means with --norm-target-loss) over everything seen.
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.reset()

    def reset(self) -> None:
        self.sums = [torch.zeros(2, n, dtype=torch.float64) for n in self.sizes]

    def add(self, losses: torch.Tensor, weights: torch.Tensor, groups: Sequence[torch.Tensor]) -> None:
        w = weights.reshape(-1).detach().double().cpu()
        lw = losses.reshape(-1).detach().double().cpu() * w
        for k, ids in enumerate(groups[: len(self.sizes)]):
            n = self.sizes[k]
            ids = ids.reshape(-1).long().cpu().clamp(0, max(n - 1, 0))
            self.sums[k][0] += torch.bincount(ids, weights=lw, minlength=n)[:n]
            self.sums[k][1] += torch.bincount(ids, weights=w, minlength=n)[:n]

    def reduce(self, contributes: bool, device) -> List[Dict[int, float]]:
        """[{group id: mean}] per grouping, over all ranks; groups with no weight are left out."""
        flat = torch.cat([s.reshape(-1) for s in self.sums]) if self.sums else torch.zeros(0, dtype=torch.float64)
        if not contributes:
            flat = torch.zeros_like(flat)
        flat = flat.to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        flat = flat.cpu()
        out, offset = [], 0
        for n in self.sizes:
            sums, weights = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
            offset += 2 * n
            out.append({i: float(sums[i] / weights[i]) for i in range(n) if weights[i] > 0})
        self.reset()
        return out


# ---- trainer -------------------------------------------------------------------------------------


class FinetuneTrainer(Trainer):
    """``Trainer`` with the finetuning start, data, loss normalisation and per-group reporting."""

    loss_class = FinetuningLoss

    def __init__(self, cfg: RunConfig):
        self.pretrained_source: Optional[str] = None
        super().__init__(cfg)
        loss_fn = self.engine.module.loss_fn
        sizes = (len(self.names.languages), len(self.names.tasks))
        self.train_meter, self.eval_meter = GroupLossMeter(sizes), GroupLossMeter(sizes)
        loss_fn.meter = self.train_meter
        self._valid_groups: Dict[str, List[Dict[int, float]]] = {}

    # ---- start -------------------------------------------------------------------------------

    def _run_dir(self) -> str:
        c = self.cfg.checkpoint
        run = c.save or c.load
        if not run:
            raise UserError("--pretrained needs --save (or --load): the converted weights are written there")
        return run

    def _convert_once(self, write) -> Tuple[str, str]:
        """Rank 0 writes a weights-only native checkpoint to <run>/pretrained (once); all ranks wait."""
        from megatron_bloom.checkpoint.native import resolve_checkpoint

        target = os.path.join(self._run_dir(), PRETRAINED_DIR)
        if self.rank == 0 and not os.path.isfile(os.path.join(target, "latest")):
            tmp = f"{target}.tmp.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write(tmp)
                if os.path.exists(target):
                    shutil.rmtree(target)  # an older attempt without its 'latest': incomplete
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _log0(f"> converted --pretrained {self.cfg.finetune.pretrained} to {target}")
        # Every rank waits for the conversion (collective: every rank takes this path).
        ok = torch.tensor([1.0 if os.path.isfile(os.path.join(target, "latest")) or self.rank != 0 else 0.0],
                          device=self.state.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            raise UserError(f"converting --pretrained to {target} failed on rank 0")
        return resolve_checkpoint(target)

    def _pretrained_checkpoint(self, src: str) -> Tuple[str, str]:
        """(directory, tag) of a native checkpoint with layer files holding --pretrained's weights."""
        from megatron_bloom.checkpoint import native

        tp = self.cfg.parallel.tensor_model_parallel_size
        if os.path.isfile(os.path.join(src, "config.json")):
            from megatron_bloom.checkpoint import hf

            def write(out: str) -> None:
                cfg, sd = hf.read_hf_checkpoint(src)
                special = hf.special_tokens_from_hf(hf._read_json(os.path.join(src, "config.json")))
                tok = src if hf.has_tokenizer_files(src) else None
                native.write_native_checkpoint(sd, cfg, out, tp, tokenizer_dir=tok, special_tokens=special)

            return self._convert_once(write)
        directory, tag = native.resolve_checkpoint(src)
        names = os.listdir(os.path.join(directory, tag))
        if any(native.LAYER_FILE_RE.match(n) for n in names):
            return directory, tag

        def write_merged(out: str) -> None:  # a PP=1 ZeRO-2 checkpoint: engine files only
            cfg, sd = native.read_native_checkpoint(directory, tag)
            native.write_native_checkpoint(sd, cfg, out, tp)

        return self._convert_once(write_merged)

    def _find_resume(self):
        from megatron_bloom.checkpoint import CheckpointInfo, find_checkpoint
        from megatron_bloom.checkpoint.native import read_state

        own = find_checkpoint(self.cfg.checkpoint.load)
        src = self.cfg.finetune.pretrained
        if own is not None:
            if src:
                _log0(f"> {own.path} is this finetune's own checkpoint: resuming it, --pretrained ignored")
            return own
        if not src:
            _log0("WARNING: no --pretrained and no checkpoint in --load: finetuning a randomly initialised model")
            return None
        directory, tag = self._pretrained_checkpoint(src)
        self.pretrained_source = src
        state = read_state(os.path.join(directory, tag))
        # Weights only, whatever the source was: fresh optimizer, LR schedule and data position.
        state = dict(state, weights_only=True)
        state.setdefault("layout", {})
        _log0(f"> finetuning from --pretrained {src} ({os.path.join(directory, tag)})")
        return CheckpointInfo(directory, tag, state)

    def trainer_state(self) -> dict:
        state = super().trainer_state()
        state["finetune"] = {"pretrained": self.pretrained_source or (self.resume.state.get("finetune", {}).get(
            "pretrained") if self.resume is not None else None)}
        return state

    # ---- data --------------------------------------------------------------------------------

    def _build_datasets(self, train_samples: int, valid_samples: int):
        train, valid, self.names, report = build_finetune_datasets(self.cfg, train_samples, valid_samples)
        for line in report:
            _log0("> " + line)
        return train, valid

    def _batches(self, dataset, consumed: int, gbs: int):
        if not self.engine.reads_data:
            return []
        t = self.cfg.training
        return finetune_micro_batches(dataset, consumed, gbs, t.micro_batch_size, self.state.dims.dp,
                                      self.state.dp_rank, self.cfg.model.vocab_size, self.cfg.finetune.norm_target_loss)

    # ---- reporting ---------------------------------------------------------------------------

    def _reduce(self, meter: GroupLossMeter) -> List[Dict[int, float]]:
        # The last stage computed the losses; its TP ranks hold identical copies: count one.
        contributes = self.state.is_last_stage and self.state.tp_rank == 0
        return meter.reduce(contributes, self.state.device)

    def _named(self, groups: List[Dict[int, float]], suffix: str) -> Tuple[Dict[str, float], Dict[str, float]]:
        langs = {f"{self.names.languages[i]} {suffix}": v for i, v in groups[0].items()}
        tasks = {f"{self.names.tasks[i]} {suffix}": v for i, v in groups[1].items()}
        return langs, tasks

    def _after_step(self, result) -> None:
        if self.iteration % self.cfg.logging.log_interval != 0:
            return
        langs, tasks = self._named(self._reduce(self.train_meter), "lm loss")
        self.monitor.log_scalars("lm-loss-training/per-language", langs, self.iteration, self.consumed_samples,
                                 self.consumed_tokens)
        self.monitor.log_scalars("lm-loss-training/per-task", tasks, self.iteration, self.consumed_samples,
                                 self.consumed_tokens)

    def evaluate(self) -> Dict[str, float]:
        loss_fn = self.engine.module.loss_fn
        results = {}
        gbs = self.batch_schedule.global_batch_size(self.consumed_samples)
        loss_fn.meter = self.eval_meter
        try:
            for name, dataset in self.valid_ds.items():
                self.eval_meter.reset()
                losses = [self.engine.eval_step(self._batches(dataset, i * gbs, gbs),
                                                gbs // (self.cfg.training.micro_batch_size * self.state.dims.dp))
                          for i in range(self.cfg.logging.eval_iters)]
                results[name] = sum(losses) / len(losses)
                self._valid_groups[name] = self._reduce(self.eval_meter)
        finally:
            loss_fn.meter = self.train_meter
        return results

    def _validate(self) -> None:
        super()._validate()
        for name, groups in self._valid_groups.items():
            langs, tasks = self._named(groups, "lm loss validation")
            self.monitor.log_scalars(f"lm-loss-validation/{name}/per-language", langs, self.iteration,
                                     self.consumed_samples, self.consumed_tokens)
            self.monitor.log_scalars(f"lm-loss-validation/{name}/per-task", tasks, self.iteration,
                                     self.consumed_samples, self.consumed_tokens)


def finetune(cfg: RunConfig) -> int:
    return FinetuneTrainer(cfg).train()
