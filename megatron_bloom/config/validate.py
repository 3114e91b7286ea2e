"""Cross-field checks that run before any process group exists.

Every message gives the numbers involved and a way to fix them, e.g.
"num_attention_heads=4 is not divisible by tensor_model_parallel_size=3; use 1, 2 or 4".
"""
from __future__ import annotations

import math
import os
import re
from typing import List, Optional

from megatron_bloom.errors import UserError
from .deepspeed_json import check_accumulation
from .schema import RunConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine")
ATTENTION_IMPLS = ("sdpa", "eager")
NAN_POLICIES = ("stop", "skip")
LOSS_NORMALIZATIONS = ("micro-batch", "global-batch")
DATA_IMPLS = ("mmap", "infer")


def _divisors(n: int, limit: int) -> List[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _or_list(values: List[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def _multiples_near(value: int, step: int) -> str:
    lower = max(step, value // step * step)
    return _or_list(sorted({lower, lower + step}))


def output_dir_problem(path: str) -> Optional[str]:
    """Why the folder ``path`` could not be created or written (None when it could), without creating it.

    The nearest existing ancestor decides: it must be a folder this process may write to. Checked at
    start-up so that a typo in --save fails in a second, not at the first save hours later.
    """
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    # os.access says yes to root on a read-only mount; the mount's own flag does not.
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"{folder} is on a read-only filesystem"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable by this user"
    return None


def validate_config(cfg: RunConfig, world_size: int, for_training: bool = True) -> RunConfig:
    """Check ``cfg`` for ``world_size`` ranks and fill the derived fields in place.

    Derived: ``parallel.data_parallel_size`` and ``training.global_batch_size``.
    Raises UserError on the first problem found.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size

    if tp < 1 or pp < 1:
        raise UserError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1")
    if world_size % (tp * pp) != 0:
        raise UserError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}; launch a multiple of {tp * pp} "
            f"processes or pick TP x PP from the divisors of {world_size}: {_or_list(_divisors(world_size, world_size))}"
        )
    dp = world_size // (tp * pp)
    if p.data_parallel_size is not None and p.data_parallel_size != dp:
        raise UserError(
            f"data_parallel_size={p.data_parallel_size} but world size {world_size} / (TP {tp} x PP {pp}) = {dp}; "
            f"drop data_parallel_size or launch {p.data_parallel_size * tp * pp} processes"
        )
    p.data_parallel_size = dp

    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        if getattr(m, name) < 1:
            raise UserError(f"{name}={getattr(m, name)} must be a positive integer")
    if m.hidden_size % m.num_attention_heads != 0:
        raise UserError(
            f"hidden_size={m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}; "
            f"use a head count from {_or_list(_divisors(m.hidden_size, 128)[-6:])}"
        )
    if m.num_attention_heads % tp != 0:
        raise UserError(
            f"num_attention_heads={m.num_attention_heads} is not divisible by tensor_model_parallel_size={tp}; "
            f"use {_or_list(_divisors(m.num_attention_heads, max(8, world_size)))}"
        )
    if m.ffn_size % tp != 0:
        raise UserError(
            f"ffn_hidden_size={m.ffn_size} is not divisible by tensor_model_parallel_size={tp}; "
            f"use a multiple of {tp}"
        )
    if pp > 1:
        # Each stage DeepSpeed cuts from the layer list needs a layer with weights (models/bloom/
        # partition.py). type:transformer|embedding fills num_layers + 2 (BLOOMZ-176B: 70 on 72).
        # An unknown method or a bad regex is reported by the method's own check below.
        from megatron_bloom.models.spec import get_model_spec

        cut, method, half = get_model_spec().partition, p.pp_partition_method, t.bf16 or t.fp16
        try:
            empty = cut.stages_without_weights(m, pp, method, tp, half)
        except (ValueError, re.error):
            empty = []
        if empty:
            most = cut.max_stages(m, method, tp, half)
            raise UserError(
                f"pipeline_model_parallel_size={pp} leaves stage {empty[0]} without weights: pp_partition_method "
                f"'{method}' fills at most {most} stages with num_layers={m.num_layers}; use at most {most} stages"
            )
        if not t.bf16 and (t.fp16 or p.zero_stage > 0) and not empty:
            # DeepSpeed's fp16 and ZeRO optimizers reduce the gradient norm once per parameter group
            # (empty groups dropped): stages with other groups enter other collectives and hang.
            # Its bf16 optimizer reduces once for all groups (BLOOMZ-176B's 72 stages ran bf16).
            groups = cut.parameter_groups(m, pp, method, tp, half)
            if len(set(groups)) > 1:
                odd = next(s for s, g in enumerate(groups) if g != groups[0])
                raise UserError(
                    f"pipeline_model_parallel_size={pp} leaves stage {odd} with only "
                    f"{'the tied LM head' if groups[odd] == {'decay'} else 'the final LayerNorm'} (one optimizer "
                    f"parameter group where the other stages have two), on which DeepSpeed's "
                    f"{'fp16' if t.fp16 else 'ZeRO'} optimizer hangs; train in bf16 (as BLOOMZ-176B's 72 stages did), "
                    f"use --zero-stage 0 in fp32, or use fewer stages")
    if m.make_vocab_size_divisible_by < 1:
        raise UserError(f"make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} must be >= 1")
    _check_megatron_deepspeed_choices(cfg)
    padded = m.padded_vocab_size(tp)
    assert padded % tp == 0 and padded >= m.vocab_size
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise UserError(f"{name}={getattr(m, name)} must be in [0, 1)")
    if m.attention_impl not in ATTENTION_IMPLS:
        raise UserError(f"attention_impl='{m.attention_impl}' is not one of {', '.join(ATTENTION_IMPLS)}")

    if p.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.sync_tp_duplicated_parameters and p.zero_stage == 3:
        raise UserError("sync_tp_duplicated_parameters averages whole parameters in every forward, which ZeRO-3 "
                          "partitions; use zero_stage 0, 1 or 2")
    if pp > 1 and p.zero_stage > 1:
        raise UserError(
            f"zero_stage={p.zero_stage} cannot be combined with pipeline_model_parallel_size={pp} "
            f"(DeepSpeed's pipeline engine keeps whole gradients per stage); use zero_stage 0 or 1"
        )
    method = p.pp_partition_method
    if not (method in ("uniform", "parameters") or method.startswith("type:")):
        raise UserError(f"pp_partition_method='{method}' must be 'uniform', 'parameters' or 'type:REGEX'")
    if method.startswith("type:"):
        try:
            re.compile(method[len("type:"):])
        except re.error as exc:
            raise UserError(f"pp_partition_method '{method}' has an invalid regex: {exc}") from None
    if p.distributed_backend not in (None, "nccl", "gloo"):
        raise UserError(f"distributed_backend='{p.distributed_backend}' must be 'nccl' or 'gloo' (or unset)")
    if p.distributed_timeout_minutes <= 0:
        raise UserError(f"distributed_timeout_minutes={p.distributed_timeout_minutes} must be > 0")

    if t.bf16 and t.fp16:
        raise UserError("bf16 and fp16 are both set; choose one (or neither for fp32)")
    if t.micro_batch_size < 1:
        raise UserError(f"micro_batch_size={t.micro_batch_size} must be >= 1")
    for name in ("num_workers", "valid_num_workers"):
        if getattr(cfg.data, name) < 0:
            raise UserError(f"{name}={getattr(cfg.data, name)} must be >= 0 (0 reads each step's batches when it starts)")
    if t.hysteresis < 1 or t.min_loss_scale <= 0:
        raise UserError(f"hysteresis={t.hysteresis} must be >= 1 and min_loss_scale={t.min_loss_scale} > 0")
    step = t.micro_batch_size * dp
    if t.global_batch_size is None:
        t.global_batch_size = step
    if t.global_batch_size < 1 or t.global_batch_size % step != 0:
        raise UserError(
            f"global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x data_parallel_size "
            f"= {t.micro_batch_size} x {dp} = {step}; use {_multiples_near(t.global_batch_size, step)}"
        )
    if t.rampup_batch_size is not None:
        if len(t.rampup_batch_size) != 3:
            raise UserError(
                f"rampup_batch_size needs 3 numbers START INCREMENT SAMPLES, got {t.rampup_batch_size}"
            )
        start, incr, _ = t.rampup_batch_size
        for name, value in (("start", start), ("increment", incr)):
            if value < 1 or value % step != 0:
                raise UserError(
                    f"rampup_batch_size {name}={value} is not divisible by micro_batch_size x data_parallel_size "
                    f"= {step}; use {_multiples_near(max(value, 1), step)}"
                )
        if (t.global_batch_size - start) % incr != 0:
            raise UserError(
                f"rampup_batch_size: global_batch_size {t.global_batch_size} - start {start} is not a multiple "
                f"of increment {incr}; pick an increment that divides {t.global_batch_size - start}"
            )
    check_accumulation(cfg)
    if t.lr_decay_style not in LR_DECAY_STYLES:
        raise UserError(f"lr_decay_style='{t.lr_decay_style}' is not one of {', '.join(LR_DECAY_STYLES)}")
    if t.nan_policy not in NAN_POLICIES:
        raise UserError(f"nan_policy='{t.nan_policy}' is not one of {', '.join(NAN_POLICIES)} (--nan-policy stop|skip)")
    if t.min_lr > t.lr:
        raise UserError(f"min_lr={t.min_lr} is larger than lr={t.lr}; lower min_lr")
    if for_training:
        if (t.train_iters is None) == (t.train_samples is None):
            raise UserError("give exactly one of train_iters (--train-iters) or train_samples (--train-samples)")
        if t.train_iters is not None and t.rampup_batch_size is not None:
            raise UserError("rampup_batch_size needs train_samples (--train-samples), not train_iters")
    _check_finetune_loss(cfg)
    if cfg.logging.log_interval < 1 or cfg.logging.eval_interval < 1:
        raise UserError("log_interval and eval_interval must be >= 1")
    if cfg.logging.eval_iters < 0:
        raise UserError(f"eval_iters={cfg.logging.eval_iters} is negative; give the batches per evaluation, "
                        f"or --eval-iters 0 for no evaluation")
    if for_training:
        for flag, path in (("--save", cfg.checkpoint.save), ("--tensorboard-dir", cfg.logging.tensorboard_dir)):
            problem = output_dir_problem(path) if path else None
            if problem:
                raise UserError(f"{flag} {path} cannot be created: {problem}; choose a writable folder")
    return cfg


def _check_finetune_loss(cfg: RunConfig) -> None:
    """The finetuning loss flags: one known normalisation, and no flag that could only be ignored."""
    f = cfg.finetune
    if f.loss_normalization not in LOSS_NORMALIZATIONS:
        raise UserError(f"loss_normalization='{f.loss_normalization}' is not one of {', '.join(LOSS_NORMALIZATIONS)} "
                        f"(--loss-normalization micro-batch|global-batch)")
    if f.reweight_loss_based_on_position_frequency:
        raise UserError("--reweight-loss-based-on-position-frequency only acts in Megatron-DeepSpeed's prefix-LM "
                        "training; finetuning uses finetune_t0.py's packed causal mask, where it changes nothing; drop it")
    if f.eod_mask_loss and f.loss_normalization == "global-batch":
        raise UserError("--eod-mask-loss needs --loss-normalization micro-batch: the global-batch mean counts target "
                        "tokens from the packing plan, which masking EOD positions would make wrong")


def _check_megatron_deepspeed_choices(cfg: RunConfig) -> None:
    """Megatron-DeepSpeed flags whose other values are not built here: one line each, naming the fix."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.training
    tp = p.tensor_model_parallel_size
    if m.position_embedding_type != "alibi":
        raise UserError(f"--position-embedding-type {m.position_embedding_type} is not built here: BLOOM uses "
                        f"ALiBi; pass --position-embedding-type alibi")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise UserError(f"--max-position-embeddings {m.max_position_embeddings} is below --seq-length "
                        f"{m.seq_length}; raise it to at least {m.seq_length} (ALiBi itself has no limit)")
    if not m.embed_layernorm:
        raise UserError("--no-embed-layernorm: every BLOOM has a LayerNorm after its word embedding, the only "
                        "architecture built here; drop the flag")
    if m.pad_vocab_size_to is not None:
        multiple = m.make_vocab_size_divisible_by
        if m.pad_vocab_size_to % multiple or m.pad_vocab_size_to % tp:
            lcm = math.lcm(multiple, tp)
            raise UserError(f"--pad-vocab-size-to {m.pad_vocab_size_to} must be a multiple of "
                            f"--make-vocab-size-divisible-by {multiple} and of TP {tp}; use "
                            f"{-(-m.pad_vocab_size_to // lcm) * lcm}")
    if d.tokenizer_type not in (None, "PretrainedFromHF"):
        raise UserError(f"--tokenizer-type {d.tokenizer_type} is not read here: only transformers tokenizers are "
                        f"(--tokenizer-type PretrainedFromHF --tokenizer-name-or-path FOLDER); save yours with "
                        f"transformers' save_pretrained and pass that folder")
    if d.data_impl not in DATA_IMPLS:
        raise UserError(f"--data-impl {d.data_impl}: only Megatron's mmap .bin/.idx datasets are read here; "
                        f"convert the data with Megatron's preprocess_data.py --dataset-impl mmap, or pass "
                        f"--data-impl mmap")
    if d.dataloader_type not in (None, "single"):
        raise UserError(f"--dataloader-type {d.dataloader_type} is not built here: samples are read once in the "
                        f"order of the sample index; pass --dataloader-type single")
    if d.test_weighted_split_paths:
        raise UserError("--test-weighted-split-paths: the trainer evaluates validation groups only; pass the test "
                        "groups as --valid-weighted-split-paths, or evaluate them with launch/evaluate.py")
    if t.optimizer != "adam":
        raise UserError(f"--optimizer {t.optimizer} is not built here: Adam (decoupled weight decay) is; pass "
                        f"--optimizer adam")
    if not p.deepspeed:
        raise UserError("--no-deepspeed: DeepSpeed is the engine of every run here; drop the flag")
    if p.remote_device != "none":
        raise UserError(f"--remote-device {p.remote_device} (ZeRO-3 parameter offload) is not supported; pass "
                        f"--remote-device none")
    if cfg.finetune.prefixlm:
        raise UserError("--prefixlm (inputs attend bidirectionally) is not built here: BLOOMZ trained with a "
                        "causal mask, the one built; drop the flag")
