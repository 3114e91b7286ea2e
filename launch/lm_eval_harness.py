#!/usr/bin/env python
"""lm-evaluation-harness's command line with our model registered as ``megatron_bloom``.

    python launch/lm_eval_harness.py --model megatron_bloom --model_args load=CKPT[,tokenizer=DIR][,batch_size=N] \
        --tasks TASKS [--include_path DIR] [--log_samples --output_path OUT] ...

Every argument is lm-eval's own (``lm_eval --help``), passed through unchanged. Requires
``pip install 'lm-eval[hf]'``; see megatron_bloom/commands/lm_eval_harness.py.
"""
from megatron_bloom.commands.lm_eval_harness import main

if __name__ == "__main__":
    main()
