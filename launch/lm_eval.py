#!/usr/bin/env python
"""lm-evaluation-harness's command line with our model registered as ``megatron_bloom``.

    python launch/lm_eval.py --model megatron_bloom --model_args load=CKPT[,tokenizer=DIR][,batch_size=N] \
        --tasks TASKS [--include_path DIR] [--log_samples --output_path OUT] ...

Every argument is lm-eval's own (``lm_eval --help``), passed through unchanged; other models
(``--model hf``) work as well. Needed because lm-eval 0.4.x does not discover models registered
outside its package: this imports ``megatron_bloom.evaluation.harness`` (which registers the model),
then calls ``lm_eval.__main__.cli_evaluate()``. Requires ``pip install 'lm-eval[hf]'``.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script, Python puts this file's folder first on sys.path, where this file would
    # shadow the real ``lm_eval`` package: drop it, and make the repo's packages importable.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, os.path.dirname(here))


def main() -> None:
    try:
        from megatron_bloom.evaluation.harness import cli_main
    except ImportError as exc:
        print(f"error: lm-evaluation-harness is not installed ({exc}); pip install 'lm-eval[hf]'", file=sys.stderr)
        raise SystemExit(2) from None
    cli_main()


if __name__ == "__main__":
    main()
