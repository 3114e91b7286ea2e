"""Megatron-DeepSpeed's state in ``mp_rank_XX_model_states.pt``: its args namespace, read and written.

Megatron-DeepSpeed hands DeepSpeed a client state that lands in every model-parallel rank's engine
file next to DeepSpeed's own keys::

    args                  argparse.Namespace of every flag, after its post-processing: enums
                          (position_embedding_type=PositionEmbeddingType.alibi), torch dtypes
                          (params_dtype), consumed_train_samples / consumed_valid_samples
    checkpoint_version    3.0
    iteration             the iteration the checkpoint was saved at
    tokens                consumed training tokens
    checkpoint_info       {"padded_vocab_size", "original_vocab_size"}
    lr_scheduler          (DeepSpeed's key) AnnealingLR's state: max_lr, min_lr, warmup_steps,
                          decay_steps, num_steps, decay_style, ... where steps count SAMPLES

Reading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with an allow-list of
``argparse.Namespace`` and Megatron's enums, stood in for by the classes below under their
``megatron.enums`` names, so no Megatron code needs to be installed and nothing else is executed.
Writing pickles the same classes under those names, so Megatron-DeepSpeed reads our args as its own.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import importlib.util
import sys
import types
from typing import Any, Dict, Iterator, List

from megatron_bloom.errors import UserError

CHECKPOINT_VERSION = 3.0
ENUM_MODULE = "megatron.enums"


class PositionEmbeddingType(enum.Enum):
    rotary = 1
    absolute = 2
    alibi = 3


class AttnMaskType(enum.Enum):
    padding = 1
    causal = 2
    prefix = 3
    custom = 4


class LayerType(enum.Enum):
    encoder = 1
    decoder = 2


class AttnType(enum.Enum):
    self_attn = 1
    cross_attn = 2


ENUMS = (PositionEmbeddingType, AttnMaskType, LayerType, AttnType)
"""Megatron-DeepSpeed's ``megatron/enums.py``, member for member."""



def _numpy_array_globals() -> List[Any]:
    """What a pickled numpy array (Megatron's ``np_rng_state``) names: data only, no code runs."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]


ALLOWED_GLOBALS: List[Any] = [argparse.Namespace, *((cls, f"{ENUM_MODULE}.{cls.__name__}") for cls in ENUMS),
                              *_numpy_array_globals()]
"""What ``torch.load(weights_only=True)`` may build besides tensors, containers and numbers: the
args namespace, Megatron's enums and numpy arrays (its saved numpy RNG state)."""


def args_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """The args of an engine file's state as a dict (``iteration`` added), {} when there are none."""
    args = state.get("args")
    out = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    if "iteration" in state:
        out.setdefault("iteration", state["iteration"])
    return out


@contextlib.contextmanager
def megatron_enums_importable() -> Iterator[None]:
    """While saving: make ``megatron.enums`` resolve to the classes above, so pickle names them so.

    pickle writes a class by module and name after checking that importing them gives the class
    back. When a real Megatron is importable nothing is touched and its own enums must be used
    (``enum_classes``); otherwise two module objects are registered for the duration only.
    """
    if "megatron" in sys.modules or importlib.util.find_spec("megatron") is not None:
        yield
        return
    package = types.ModuleType("megatron")
    package.__path__ = []  # a package, so "megatron.enums" resolves below it
    module = types.ModuleType(ENUM_MODULE)
    for cls in ENUMS:
        setattr(module, cls.__name__, cls)
    package.enums = module
    sys.modules["megatron"], sys.modules[ENUM_MODULE] = package, module
    saved = {cls: cls.__module__ for cls in ENUMS}
    for cls in ENUMS:
        cls.__module__ = ENUM_MODULE
    try:
        yield
    finally:
        for cls, name in saved.items():
            cls.__module__ = name
        sys.modules.pop(ENUM_MODULE, None)
        sys.modules.pop("megatron", None)


def enum_classes() -> Dict[str, type]:
    """Name -> the enum class to write: a real Megatron's when it is importable, else ours."""
    if importlib.util.find_spec("megatron") is not None:
        try:
            import megatron.enums as real  # noqa: F401 - a user's Megatron-DeepSpeed install

            return {cls.__name__: getattr(real, cls.__name__) for cls in ENUMS}
        except (ImportError, AttributeError):
            pass
    return {cls.__name__: cls for cls in ENUMS}


# ---- writing ---------------------------------------------------------------------------------------


def megatron_args(cfg, *, padded_vocab_size: int, world_size: int, consumed_train_samples: int = 0,
                  consumed_valid_samples: int = 0, consumed_train_tokens: int = 0,
                  iteration: int = 0) -> argparse.Namespace:
    """The args namespace Megatron-DeepSpeed would hold for the run ``cfg`` (a RunConfig).

    Our flags carry Megatron's names, so every configuration field is copied under its own name;
    the values Megatron derives after parsing are added under its names (padded_vocab_size,
    params_dtype, position_embedding_type, ...).
    """
    import torch

    values: Dict[str, Any] = {}
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        if dataclasses.is_dataclass(part):
            for f in dataclasses.fields(part):
                values.setdefault(f.name, getattr(part, f.name))
    m, t, p = cfg.model, cfg.training, cfg.parallel
    enums = enum_classes()
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    values.update(
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.seq_length,
        encoder_seq_length=m.seq_length,
        layernorm_epsilon=m.layer_norm_epsilon,
        padded_vocab_size=padded_vocab_size,
        position_embedding_type=enums["PositionEmbeddingType"].alibi,
        embed_layernorm=True,
        apply_residual_connection_post_layernorm=m.apply_residual_connection_post_layernorm,
        params_dtype=torch.bfloat16 if t.bf16 else torch.half if t.fp16 else torch.float,
        world_size=world_size,
        data_parallel_size=world_size // (tp * pp),
        consumed_train_samples=int(consumed_train_samples),
        consumed_valid_samples=int(consumed_valid_samples),
        consumed_train_tokens=int(consumed_train_tokens),
        iteration=int(iteration),
        deepspeed=True,
        zero_stage=p.zero_stage,
        tokenizer_type="PretrainedFromHF",
        curriculum_learning=False,
    )
    return argparse.Namespace(**values)


def lr_scheduler_state(schedule, consumed_samples: int) -> Dict[str, Any]:
    """AnnealingLR's state_dict for our schedule (``training/schedules.LearningRateSchedule``)."""
    return {
        "max_lr": schedule.max_lr,
        "warmup_steps": schedule.warmup_samples,
        "num_steps": int(consumed_samples),
        "warmup_tokens": 0,
        "num_tokens": 0,
        "decay_style": schedule.decay_style,
        "decay_steps": schedule.decay_samples,
        "min_lr": schedule.min_lr,
    }


def client_state(cfg, schedule, *, iteration: int, consumed_samples: int, consumed_tokens: int,
                 padded_vocab_size: int, world_size: int, consumed_valid_samples: int = 0) -> Dict[str, Any]:
    """Megatron-DeepSpeed's keys of an engine file (see the module docstring); save inside
    ``megatron_enums_importable()``."""
    args = megatron_args(cfg, padded_vocab_size=padded_vocab_size, world_size=world_size,
                         consumed_train_samples=consumed_samples, consumed_valid_samples=consumed_valid_samples,
                         consumed_train_tokens=consumed_tokens, iteration=iteration)
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "tokens": int(consumed_tokens),
        "checkpoint_info": {"padded_vocab_size": padded_vocab_size, "original_vocab_size": cfg.model.vocab_size},
        "lr_scheduler": lr_scheduler_state(schedule, consumed_samples),
    }


def megatron_engine_state(cfg, padded_vocab_size: int, iteration: int) -> Dict[str, Any]:
    """An engine file of a weights-only checkpoint: DeepSpeed's pipeline keys without weights
    (``module`` None: they are in the layer files) and Megatron-DeepSpeed's args and counters."""
    p = cfg.parallel
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    args = megatron_args(cfg, padded_vocab_size=padded_vocab_size, world_size=mp, iteration=iteration)
    return {
        "module": None,
        "optimizer": None,
        "lr_scheduler": None,
        "global_steps": int(iteration),
        "skipped_steps": 0,
        "dp_world_size": 1,
        "mp_world_size": mp,
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "tokens": 0,
        "checkpoint_info": {"padded_vocab_size": padded_vocab_size, "original_vocab_size": cfg.model.vocab_size},
    }


# ---- reading a Megatron-DeepSpeed training checkpoint ------------------------------------------------


LOAD_FLAGS = ("no_load_optim", "no_load_rng", "finetune", "reset_progress")
"""Megatron-DeepSpeed's flags that load less of a checkpoint than all of it (config.checkpoint)."""


def trainer_state_from_megatron(state: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Our trainer state (what ``megatron_bloom.pt`` holds) from an engine file of Megatron-DeepSpeed.

    iteration from ``iteration``; consumed samples from ``args.consumed_train_samples``; tokens
    from ``tokens``; the LR schedule from DeepSpeed's ``lr_scheduler`` (AnnealingLR counts
    samples); the layout (TP, PP, DP, ZeRO stage) and the model shape from the args.
    """
    args = args_dict(state)
    need = ("num_layers", "hidden_size", "num_attention_heads", "tensor_model_parallel_size",
            "pipeline_model_parallel_size")
    missing = [k for k in need if args.get(k) is None]
    if missing or "iteration" not in state:
        raise UserError(f"{where} lacks Megatron-DeepSpeed's args ({', '.join(missing) or 'iteration'}): "
                        f"not a Megatron-DeepSpeed training checkpoint; convert its weights with "
                        f"'megatron-bloom-convert-checkpoint megatron-deepspeed-to-native' and start from those")
    pe = args.get("position_embedding_type")
    if pe is not None and getattr(pe, "name", pe) != "alibi":
        raise UserError(f"{where}: position_embedding_type is {getattr(pe, 'name', pe)}, not alibi: not a BLOOM checkpoint")
    tp, pp = int(args["tensor_model_parallel_size"]), int(args["pipeline_model_parallel_size"])
    world = args.get("world_size")
    dp = int(args.get("data_parallel_size") or (world // (tp * pp) if world else 1))
    sched = state.get("lr_scheduler") or {}
    zero = int(args.get("zero_stage") or 0)
    if zero == 0 and args.get("bf16"):
        # BLOOM's bf16 runs at "ZeRO-0" used DeepSpeed's BF16_Optimizer (fp32 masters and gradients
        # partitioned over DP), which DeepSpeed now runs as ZeRO-1 with bf16 and fp32 accumulation:
        # the same optimizer and the same bf16_zero_pp_rank_* files.
        zero = 1
    model = {
        "num_layers": int(args["num_layers"]),
        "hidden_size": int(args["hidden_size"]),
        "num_attention_heads": int(args["num_attention_heads"]),
        "ffn_hidden_size": args.get("ffn_hidden_size"),
    }
    if model["ffn_hidden_size"] == 4 * model["hidden_size"]:
        model["ffn_hidden_size"] = None
    padded = args.get("padded_vocab_size") or (state.get("checkpoint_info") or {}).get("padded_vocab_size")
    if padded:
        # Megatron's tokenizer size need not be the model's vocab_size (BLOOM: 250,680 tokens in a
        # 250,880-row embedding), so the embedding's row count is what is compared.
        model["padded_vocab_size"] = int(padded)
    out: Dict[str, Any] = {
        "iteration": int(state["iteration"]),
        "consumed_samples": int(args.get("consumed_train_samples") or 0),
        "consumed_tokens": int(state.get("tokens") or args.get("consumed_train_tokens") or 0),
        "layout": {"tp": tp, "pp": pp, "dp": dp, "zero": zero},
        # The load flags of the run that saved it: a run given them resumes its own checkpoints in full.
        "config": {"model": model, "checkpoint": {k: bool(args.get(k)) for k in LOAD_FLAGS}},
        "weights_only": False,
        "megatron_deepspeed": True,
    }
    if sched:
        out["lr_schedule"] = {
            "max_lr": float(sched.get("max_lr", 0.0)),
            "min_lr": float(sched.get("min_lr", 0.0)),
            "warmup_samples": int(sched.get("warmup_steps", 0)),
            "decay_samples": int(sched.get("decay_steps", 0)),
            "decay_style": str(sched.get("decay_style", "constant")),
        }
    return out
