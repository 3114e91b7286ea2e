"""Read the DeepSpeed JSON a Megatron-DeepSpeed script passes (``--deepspeed_config FILE``).

bigscience's scripts kept part of a run's settings there and nowhere else: the fp16 loss scaling
(``initial_scale_power`` 12, ``loss_scale_window`` 500, ``hysteresis`` 2) of BLOOM-1b7 and
BLOOMZ-7b1, and the precision and ZeRO stage of every run. Those values fill the fields that no
flag and no YAML set; a value the flags set differently is refused with both named, as
Megatron-DeepSpeed asserts that its flags and the JSON agree. The engine's own JSON is still
built from the resolved configuration (``training/deepspeed_config.py``), so what runs is what
the configuration says.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterator, Set, Tuple

from megatron_bloom.errors import UserError

from .schema import RunConfig

# Keys that only tune DeepSpeed's own logging or communication: they change no number of the run.
IGNORED_KEYS = frozenset({"steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
                          "dump_state", "flops_profiler", "tensorboard", "comms_logger"})
IGNORED_ZERO_KEYS = frozenset({"reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
                               "reduce_scatter", "allgather_partitions", "round_robin_gradients",
                               "elastic_checkpoint"})

# DeepSpeed's defaults for an fp16 section that leaves a key out (deepspeed/runtime/config.py).
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}


def _load(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"--deepspeed_config {path} does not exist; pass the JSON file the script wrote")
    try:
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"--deepspeed_config {path} is not a readable JSON file: {exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"--deepspeed_config {path} must hold a JSON object")
    return values


def _enabled(values: Dict[str, Any], key: str) -> bool:
    section = values.get(key)
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _settings(values: Dict[str, Any], path: str) -> Iterator[Tuple[str, str, str, Any]]:
    """``(section, field, JSON key, value)`` for every run setting the JSON holds."""
    unknown = sorted(set(values) - IGNORED_KEYS - {
        "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
        "zero_optimization", "bf16", "fp16"})
    if unknown:
        raise UserError(f"--deepspeed_config {path}: key '{unknown[0]}' is not read here (batch sizes, "
                        f"gradient_clipping, zero_optimization.stage, bf16 and fp16 are); remove it or set "
                        f"its equivalent by flag")
    for key, section, name in (("train_micro_batch_size_per_gpu", "training", "micro_batch_size"),
                               ("train_batch_size", "training", "global_batch_size"),
                               ("gradient_clipping", "training", "clip_grad")):
        if key in values:
            yield section, name, key, values[key]
    zero = values.get("zero_optimization", {})
    if isinstance(zero, dict):
        extra = sorted(set(zero) - IGNORED_ZERO_KEYS - {"stage"})
        if extra:
            raise UserError(f"--deepspeed_config {path}: zero_optimization.{extra[0]} is not supported here "
                            f"(only the stage and communication bucket sizes are read); remove it")
        if "stage" in zero:
            yield "parallel", "zero_stage", "zero_optimization.stage", zero["stage"]
    bf16, fp16 = _enabled(values, "bf16"), _enabled(values, "fp16")
    if bf16 and fp16:
        raise UserError(f"--deepspeed_config {path} enables both bf16 and fp16; enable one")
    if "bf16" in values or "fp16" in values:
        yield "training", "bf16", "bf16.enabled", bf16
        yield "training", "fp16", "fp16.enabled", fp16
    if fp16:
        section = {**FP16_DEFAULTS, **values["fp16"]}
        static = section["loss_scale"]
        yield "training", "loss_scale", "fp16.loss_scale", float(static) if static else None
        yield "training", "initial_loss_scale", "fp16.initial_scale_power", 2.0 ** section["initial_scale_power"]
        yield "training", "loss_scale_window", "fp16.loss_scale_window", section["loss_scale_window"]
        yield "training", "hysteresis", "fp16.hysteresis", section["hysteresis"]
        yield "training", "min_loss_scale", "fp16.min_loss_scale", float(section["min_loss_scale"])


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _shown(field: str, key: str, value: Any) -> str:
    if key == "fp16.initial_scale_power" and value:
        return f"{int(math.log2(value))} (a scale of {value:g})"
    return str(value)


def apply_deepspeed_json(cfg: RunConfig, given: Dict[str, Set[str]]) -> None:
    """Fill ``cfg`` from ``cfg.parallel.deepspeed_config``; ``given`` holds the fields flags or YAML set.

    A field set by both with different values is refused in one line naming the two values.
    ``gradient_accumulation_steps`` is checked against the batch sizes once DP is known
    (``check_accumulation``).
    """
    path = cfg.parallel.deepspeed_config
    if not path:
        return
    values = _load(path)
    for section, name, key, value in _settings(values, path):
        target = getattr(cfg, section)
        if name in given.get(section, set()):
            mine = getattr(target, name)
            same = (mine == value) if not isinstance(value, float) or mine is None else math.isclose(mine, value)
            if not same:
                raise UserError(f"{_flag(name)} {mine} disagrees with {key} = {_shown(name, key, value)} in "
                                f"--deepspeed_config {path}; make them equal or drop one")
            continue
        setattr(target, name, value)


def check_accumulation(cfg: RunConfig) -> None:
    """The JSON's gradient_accumulation_steps, when it has one, equals global / (micro x DP)."""
    path = cfg.parallel.deepspeed_config
    if not path:
        return
    steps = _load(path).get("gradient_accumulation_steps")
    t, dp = cfg.training, cfg.parallel.data_parallel_size
    if steps is not None and steps * t.micro_batch_size * dp != t.global_batch_size:
        raise UserError(f"gradient_accumulation_steps = {steps} in --deepspeed_config {path} does not match "
                        f"--global-batch-size {t.global_batch_size} / (--micro-batch-size {t.micro_batch_size} x "
                        f"DP {dp}) = {t.global_batch_size / (t.micro_batch_size * dp):g}; drop it or fix the sizes")
