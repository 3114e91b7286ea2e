"""What every entry point does first and last: resolve and check the config, report errors in one line.

A user error (bad config, missing file, corrupt data) ends the process with ``error: <message>``
on stderr and exit code 2, never a traceback; the process group is destroyed on every exit path.
Every ``torch.load`` of a command is weights-only (``checkpoint/trust.py``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

from megatron_bloom.config import RunConfig, parse_config, validate_config
from megatron_bloom.errors import UserError, run_main


def check_config(cfg: RunConfig, world_size: int, for_training: bool = True) -> None:
    """``validate_config`` and, for training, the LR schedule's unit checks (iterations vs samples).

    Needs no process group and imports no torch: ``launch/plan.py`` runs the same checks.
    """
    validate_config(cfg, world_size, for_training=for_training)
    if for_training:
        from megatron_bloom.training.schedules import LearningRateSchedule

        LearningRateSchedule.from_config(cfg.training)


def check_pretrain_config(cfg: RunConfig) -> None:
    """What ``launch/pretrain.py`` refuses beyond ``check_config`` (``launch/plan.py`` checks it too)."""
    if cfg.data.reset_attention_mask:
        raise UserError("--reset-attention-mask (no attention across EOD) is not built for pretraining: documents "
                        "attend across EOD here, as BLOOM trained; drop it")


def resolve_config(argv: Optional[Sequence[str]] = None, for_training: bool = True) -> Tuple[RunConfig, int]:
    """Parse flags + YAML and validate against the launcher's world size, before any process group."""
    from megatron_bloom.config.loader import explicit_keys
    from megatron_bloom.distributed.launch_env import world_size_from_env
    from megatron_bloom.training.sources import fill_from_sources

    cfg = parse_config(argv)
    fill_from_sources(cfg, explicit_keys(argv))
    world_size = world_size_from_env()
    check_config(cfg, world_size, for_training=for_training)
    return cfg, world_size


def entry_point(main: Callable[..., int | None]) -> Callable[..., None]:
    """Wrap ``main`` so user errors print one line, and the process group always goes down."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        from megatron_bloom.distributed.init import shutdown

        from megatron_bloom.checkpoint.trust import weights_only_loading

        def run() -> int:
            # No file is ever unpickled in full, whoever calls torch.load (checkpoint/trust.py).
            with weights_only_loading():
                code = main(*args, **kwargs) or 0
            shutdown(together=True)  # every rank returns from main: leave together
            return code

        run_main(run, cleanup=shutdown)

    return wrapper


def run_training(cfg: RunConfig, finetune: bool = False) -> int:
    """Check the inputs of a resolved configuration, then (and only then) import and run the trainer."""
    from megatron_bloom.training.preflight import check_training_inputs

    check_training_inputs(cfg, finetune=finetune)  # data, tokenizer, checkpoints: seconds, before any process group
    if finetune:
        from megatron_bloom.training.finetune import finetune as train
    else:
        from megatron_bloom.training.pretrain import pretrain as train
    return train(cfg)


def pretrain_command(argv: Optional[Sequence[str]] = None) -> int:
    """launch/pretrain.py: check the configuration first, then the inputs, then train."""
    cfg, _ = resolve_config(argv)
    check_pretrain_config(cfg)
    return run_training(cfg)


def pretrain_main(argv: Optional[Sequence[str]] = None) -> None:
    """``launch/pretrain.py`` and ``megatron-bloom-pretrain``: one ``error:`` line and exit 2 on bad input."""
    entry_point(pretrain_command)(argv)
