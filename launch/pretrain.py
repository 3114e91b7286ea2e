#!/usr/bin/env python
"""Pretrain BLOOM with tensor x pipeline x data parallelism.

    torchrun --nproc-per-node 4 launch/pretrain.py --config configs/demo.yaml \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --data-path PREFIX ...

Flags are Megatron-DeepSpeed's (``--help`` lists them); ``--config FILE`` supplies a YAML base that
flags override. The configuration is checked against the launcher's world size before any process
group exists, so an impossible layout fails here in a second.
"""
from megatron_bloom.cli import pretrain_main as main

if __name__ == "__main__":
    main()
