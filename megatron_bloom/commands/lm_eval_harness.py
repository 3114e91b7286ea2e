"""lm-evaluation-harness's command line with our model registered as ``megatron_bloom``.

    python launch/lm_eval_harness.py --model megatron_bloom --model_args load=CKPT[,tokenizer=DIR][,batch_size=N] \
        --tasks TASKS [--include_path DIR] [--log_samples --output_path OUT] ...

Every argument is lm-eval's own (``lm_eval --help``), passed through unchanged; other models
(``--model hf``) work as well. Needed because lm-eval 0.4.x does not discover models registered
outside its package: this imports ``megatron_bloom.evaluation.harness`` (which registers the model),
then calls ``lm_eval.__main__.cli_evaluate()``. Requires ``pip install 'lm-eval[hf]'``.
"""
from __future__ import annotations

from megatron_bloom.errors import fail


def main() -> None:
    """``launch/lm_eval_harness.py`` and ``megatron-bloom-lm-eval``; lm-eval reads ``sys.argv`` itself."""
    try:
        from megatron_bloom.evaluation.harness import cli_main
    except ImportError as exc:
        fail(f"lm-evaluation-harness is not installed ({exc}); pip install 'lm-eval[hf]'")
    cli_main()
