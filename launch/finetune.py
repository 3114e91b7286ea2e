#!/usr/bin/env python
"""Finetune BLOOM on packed prompt/answer pairs (xP3 / BLOOMZ style) with TP x PP x DP.

    torchrun --nproc-per-node 4 launch/finetune.py --config configs/finetune-demo.yaml \
        --pretrained PRETRAINED --data-path data/xp3 --save ckpt --load ckpt

Takes the pretraining flags (``--help`` lists them) plus ``--pretrained`` (a native checkpoint at
any layout, or a transformers BLOOM folder, converted once into ``<save>/pretrained``),
``--norm-target-loss`` and ``--overlong truncate|skip``. Unless a flag or the YAML says otherwise:
BLOOMZ's Adam betas 0.9/0.95, lr 2e-5 constant without warmup, weight decay 1e-4, clipping 1.0,
and the architecture of ``--pretrained``. Data are paired datasets from
data_tools/preprocess_xp3.py. Rerunning the same command resumes the finetune's own checkpoint
from ``--load`` once it has one (``--pretrained`` is then ignored).
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bloom.cli import entry_point  # noqa: E402


def main() -> int:
    from megatron_bloom.data.preflight import check_training_inputs
    from megatron_bloom.training.finetune import finetune, resolve_finetune_config

    cfg, _ = resolve_finetune_config()
    check_training_inputs(cfg)  # data, tokenizer, checkpoints: seconds, before any process group
    return finetune(cfg)


if __name__ == "__main__":
    entry_point(main)()
