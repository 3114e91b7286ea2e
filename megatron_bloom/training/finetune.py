"""Instruction finetuning (BLOOMZ-style): packed prompt/answer rows, loss on targets only.

Same loop, checkpoints, stops and monitoring as pretraining (``Trainer``), with four changes:

* **start**: weights come from ``--pretrained`` (a native checkpoint at any layout, or a
  transformers folder converted once to a weights-only native checkpoint in the run directory:
  ``checkpoint/pretrained.py``),
  with a fresh optimizer, LR schedule and data position. As soon as ``--load`` holds the
  finetune's own checkpoint, that is resumed exactly like pretraining and ``--pretrained`` is
  ignored.
* **data**: paired datasets (``data/xp3.py``) packed into rows of ``seq_length``
  (``data/packing.py``, built by ``data/finetune.py``); a "sample" is a packed row, so ``--global-batch-size``,
  ``--train-samples`` and ``consumed_samples`` count rows, as in Megatron-DeepSpeed's MTF.
* **loss**: on target tokens only, normalised as ``--loss-normalization`` says.
  ``micro-batch`` (default) is Megatron-DeepSpeed's finetune_t0.py with GPTModelPipe's
  CrossEntropy (the custom packed mask, not the prefix-LM branch): each micro-batch returns
  ``sum(losses * mask) / sum(mask)``, the mask being the target tokens (minus positions whose input
  is EOD under ``--eod-mask-loss``), and under ``--norm-target-loss`` that mask divided by the
  length of each run of ones in the flattened micro-batch, so ``sum(mask)`` counts target runs;
  DeepSpeed averages the micro-batch losses over accumulation steps and DP ranks.
  ``global-batch`` gives exact global means instead: with T target tokens in the whole global batch,
  ``sum(token losses) / T``; with ``--norm-target-loss`` each token of a target of length n weighs
  ``1/n`` and the sum is divided by the number S of target sequences in the global batch. Micro-batch
  j returns ``sum_j(weights * losses) * G * DP / T`` (or ``/ S``) for G micro-batches per rank;
  DeepSpeed's two means undo the ``G * DP`` factor, whatever the micro-batch size, accumulation and
  DP size. T and S come from the packing plan (no tokens read), so every rank knows them for the
  whole global batch (``training/data.finetune_micro_batches``, ``training/losses.FinetuningLoss``).
* **reporting**: per language and per task (xP3's ``dataset``) training and validation loss,
  (``monitoring/group_loss.py``), through ``TrainingMonitor.log_scalars``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_bloom.checkpoint.files import first_tokenizer_folder
from megatron_bloom.checkpoint.pretrained import pretrained_checkpoint, pretrained_model_config
from megatron_bloom.config import RunConfig, parse_config, validate_config
from megatron_bloom.config.loader import explicit_keys
from megatron_bloom.data.finetune import build_finetune_datasets
from megatron_bloom.errors import UserError
from megatron_bloom.monitoring.group_loss import GroupLossMeter
from megatron_bloom.training.data import finetune_micro_batches
from megatron_bloom.training.losses import FinetuningLoss
from megatron_bloom.training.pretrain import Trainer, log0

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


def finetune_run_config(argv: Optional[Sequence[str]] = None, read_tokenizer: bool = True) -> RunConfig:
    """Flags + YAML as for pretraining, with BLOOMZ defaults and the architecture of --pretrained.

    Not yet checked against a world size; ``launch/plan.py --finetune`` plans this same configuration
    (with ``read_tokenizer`` False: see ``training.sources.fill_vocabulary``).
    """
    import sys

    from megatron_bloom.training.sources import fill_from_sources
    from megatron_bloom.data.packing import OVERLONG_MODES

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    given = explicit_keys(argv)
    for section, values in FINETUNE_DEFAULTS.items():
        for key, value in values.items():
            if key not in given[section]:
                setattr(getattr(cfg, section), key, value)
    if cfg.finetune.pretrained and "model_name" not in given["model"]:
        source = pretrained_model_config(cfg.finetune.pretrained)
        for key in ARCHITECTURE_KEYS:
            if key not in given["model"]:
                setattr(cfg.model, key, getattr(source, key))
                given["model"].add(key)  # the checkpoint's vocabulary wins over the tokenizer's
    fill_from_sources(cfg, given, read_tokenizer=read_tokenizer)
    if cfg.finetune.overlong not in OVERLONG_MODES:
        raise UserError(f"overlong='{cfg.finetune.overlong}' is not one of {', '.join(OVERLONG_MODES)}")
    return cfg


def resolve_finetune_config(argv: Optional[Sequence[str]] = None) -> Tuple[RunConfig, int]:
    """``finetune_run_config`` checked against the launcher's world size."""
    from megatron_bloom.distributed.launch_env import world_size_from_env

    cfg = finetune_run_config(argv)
    world_size = world_size_from_env()
    validate_config(cfg, world_size)
    return cfg, world_size


def eod_id_of(datasets: Sequence, tokenizer: Optional[str] = None) -> int:
    """The EOD id --eod-mask-loss masks: the one the paired datasets under these (blended) packed
    rows record; when some record none (Megatron-DeepSpeed's pairs), the EOS of ``tokenizer`` too,
    as finetune_t0.py takes ``tokenizer.eod``. Several ids, or none, are refused."""
    found = set()

    def walk(d) -> None:
        if hasattr(d, "datasets"):  # a blend
            for part in d.datasets:
                walk(part)
        else:
            found.add(getattr(getattr(d, "paired", d), "eod_id", None))

    for d in datasets:
        walk(d)
    if None in found and tokenizer:
        from megatron_bloom.data.tokenizer import load_tokenizer

        try:
            found.add(load_tokenizer(tokenizer).eod_id)
        except Exception as exc:  # TokenizerLoadError, OSError, a hub name offline
            raise UserError(f"--eod-mask-loss needs the EOD id and the tokenizer {tokenizer} did not load: "
                            f"{str(exc).splitlines()[0]}") from None
    known = sorted(found - {None})
    if len(known) > 1:
        raise UserError(f"--eod-mask-loss: the paired datasets and tokenizer give different EOD ids "
                        f"({', '.join(map(str, known))}); preprocess the pairs with the run's tokenizer")
    if not known:
        raise UserError("--eod-mask-loss needs the EOD id: the paired datasets record none; give "
                        "--tokenizer-name-or-path (or a --pretrained folder holding tokenizer.json)")
    return int(known[0])


def loss_description(f, eod_id: Optional[int]) -> str:
    """One line saying what the finetuning loss averages, for the start-up log."""
    if f.loss_normalization == "global-batch":
        unit = "target sequences (--norm-target-loss)" if f.norm_target_loss else "target tokens"
        text = f"exact mean over the global batch's {unit} (--loss-normalization global-batch)"
    else:
        unit = "target runs (--norm-target-loss)" if f.norm_target_loss else "target tokens"
        text = f"mean over each micro-batch's {unit}, averaged over micro-batches and DP ranks (finetune_t0.py)"
    if eod_id is not None:
        text += f"; no loss where the input token is EOD ({eod_id}, --eod-mask-loss)"
    return text


class FinetuneTrainer(Trainer):
    """``Trainer`` with the finetuning start, data, loss normalisation and per-group reporting."""

    loss_class = FinetuningLoss

    def __init__(self, cfg: RunConfig):
        self.pretrained_source: Optional[str] = None
        self.eod_id: Optional[int] = None
        super().__init__(cfg)
        loss_fn = self.engine.module.loss_fn
        sizes = (len(self.names.languages), len(self.names.tasks))
        self.train_meter, self.eval_meter = GroupLossMeter(sizes), GroupLossMeter(sizes)
        loss_fn.meter = self.train_meter
        self._valid_groups: Dict[str, List[Dict[int, float]]] = {}

    # ---- start -------------------------------------------------------------------------------

    def _find_resume(self):
        from megatron_bloom.checkpoint import CheckpointInfo, find_checkpoint
        from megatron_bloom.checkpoint.native import read_state

        own = find_checkpoint(self.cfg.checkpoint.load)
        src = self.cfg.finetune.pretrained
        if own is not None:
            if src:
                log0(f"> {own.path} is this finetune's own checkpoint: resuming it, --pretrained ignored")
            return own
        if not src:
            log0("WARNING: no --pretrained and no checkpoint in --load: finetuning a randomly initialised model")
            return None
        c = self.cfg.checkpoint
        directory, tag = pretrained_checkpoint(src, c.save or c.load, self.cfg.parallel.tensor_model_parallel_size)
        self.pretrained_source = src
        state = read_state(os.path.join(directory, tag))
        # Weights only, whatever the source was: fresh optimizer, LR schedule and data position.
        state = dict(state, weights_only=True)
        state.setdefault("layout", {})
        log0(f"> finetuning from --pretrained {src} ({os.path.join(directory, tag)})")
        return CheckpointInfo(directory, tag, state)

    def _tokenizer_sources(self) -> List[Optional[str]]:
        """--tokenizer-name-or-path, then --pretrained's tokenizer (a transformers folder's own
        files, a native checkpoint's ``tokenizer/``), then the checkpoint started from."""
        from megatron_bloom.checkpoint.files import TOKENIZER_DIR
        from megatron_bloom.checkpoint.native import resolve_checkpoint
        from megatron_bloom.checkpoint.pretrained import is_transformers_folder

        flag, *rest = super()._tokenizer_sources()
        src = self.cfg.finetune.pretrained
        if src and os.path.isdir(src) and not is_transformers_folder(src):
            try:
                src = os.path.join(resolve_checkpoint(src)[0], TOKENIZER_DIR)
            except UserError:  # not a native checkpoint: it carries no tokenizer
                src = None
        return [flag, src, *rest]

    def trainer_state(self) -> dict:
        state = super().trainer_state()
        state["finetune"] = {"pretrained": self.pretrained_source or (self.resume.state.get("finetune", {}).get(
            "pretrained") if self.resume is not None else None)}
        return state

    # ---- data --------------------------------------------------------------------------------

    def _build_datasets(self, train_samples: int, valid_samples: int):
        cfg = self.cfg
        if valid_samples == 0:  # --eval-iters 0: no evaluation, so no validation group is read
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, valid_weighted_split_paths=None, valid_weighted_split_paths_path=None))
        train, valid, self.names, report = build_finetune_datasets(cfg, train_samples, valid_samples)
        for line in report:
            log0("> " + line)
        f = self.cfg.finetune
        # --tokenizer-name-or-path (maybe a Hub name), else the tokenizer every save carries.
        tokenizer = self.cfg.data.tokenizer_name_or_path or first_tokenizer_folder(self._tokenizer_sources())
        self.eod_id = eod_id_of([train, *valid.values()], tokenizer) if f.eod_mask_loss else None
        log0(f"> loss: {loss_description(f, self.eod_id)}")
        return train, valid

    def _batches(self, dataset, consumed: int, gbs: int):
        if not self.engine.reads_data:
            return []
        t, f = self.cfg.training, self.cfg.finetune
        return finetune_micro_batches(dataset, consumed, gbs, t.micro_batch_size, self.state.dims.dp,
                                      self.state.dp_rank, self.cfg.model.vocab_size, f.norm_target_loss,
                                      f.loss_normalization, self.eod_id)

    # ---- reporting ---------------------------------------------------------------------------

    def _reduce(self, meter: GroupLossMeter) -> List[Dict[int, float]]:
        # The last stage computed the losses; its TP ranks hold identical copies: count one.
        contributes = self.state.is_last_stage and self.state.tp_rank == 0
        return meter.reduce(contributes)

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

    @contextlib.contextmanager
    def _evaluating(self):
        loss_fn = self.engine.module.loss_fn
        loss_fn.meter = self.eval_meter
        try:
            yield
        finally:
            loss_fn.meter = self.train_meter

    def _evaluate_group(self, name: str, dataset) -> float:
        self.eval_meter.reset()
        loss = super()._evaluate_group(name, dataset)
        self._valid_groups[name] = self._reduce(self.eval_meter)
        return loss

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
