#!/usr/bin/env python
"""Pretrain BLOOM with tensor x pipeline x data parallelism.

    torchrun --nproc-per-node 4 launch/pretrain.py --config configs/tiny.yaml \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Flags are Megatron-DeepSpeed's (``--help`` lists them); ``--config FILE`` supplies a YAML base that
flags override. The configuration is checked against the launcher's world size before any process
group exists, so an impossible layout fails here in a second.
"""
from megatron_bloom.cli import entry_point, resolve_config


def main() -> int:
    cfg, _ = resolve_config()
    # Heavy imports (torch.distributed, DeepSpeed) only once the configuration is known to be sound.
    from megatron_bloom.training.pretrain import pretrain

    return pretrain(cfg)


if __name__ == "__main__":
    entry_point(main)()
