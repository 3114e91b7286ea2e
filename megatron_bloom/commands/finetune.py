"""Finetune BLOOM on packed prompt/answer pairs (xP3 / BLOOMZ style) with TP x PP x DP.

    torchrun --nproc-per-node 4 launch/finetune.py --config configs/finetune-tp2-pp2.yaml \
        --pretrained PRETRAINED --data-path data/xp3 --save ckpt --load ckpt

Takes the pretraining flags (``--help`` lists them) plus ``--pretrained`` (a native checkpoint at
any layout, or a transformers BLOOM folder, converted once into ``<save>/pretrained``; its
tokenizer, unless ``--tokenizer-name-or-path`` names one, is the one every save carries in ``<save>/tokenizer``),
``--overlong truncate|skip`` and the loss flags of Megatron-DeepSpeed's finetune_t0.py:
``--norm-target-loss``, ``--eod-mask-loss``, ``--loss-on-targets-only`` (always the case) and
``--loss-normalization micro-batch|global-batch`` (per micro-batch means as finetune_t0.py by default,
or the exact global-batch mean). Unless a flag or the YAML says otherwise:
BLOOMZ's Adam betas 0.9/0.95, lr 2e-5 constant without warmup, weight decay 1e-4, clipping 1.0,
and the architecture of ``--pretrained``. Data are paired datasets from
data_tools/preprocess_xp3.py. Rerunning the same command resumes the finetune's own checkpoint
from ``--load`` once it has one (``--pretrained`` is then ignored).
"""
from __future__ import annotations

from typing import Optional, Sequence

from megatron_bloom.cli import entry_point, run_training


def finetune_command(argv: Optional[Sequence[str]] = None) -> int:
    """Check the configuration (with ``--pretrained``'s architecture) first, then the inputs, then train."""
    from megatron_bloom.training.finetune import resolve_finetune_config

    cfg, _ = resolve_finetune_config(argv)
    return run_training(cfg, finetune=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``launch/finetune.py`` and ``megatron-bloom-finetune``: one ``error:`` line and exit 2 on bad input."""
    entry_point(finetune_command)(argv)
