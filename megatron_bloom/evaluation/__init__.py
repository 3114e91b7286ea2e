"""Evaluation of BLOOM checkpoints: perplexity, zero-shot multiple choice, lm-evaluation-harness.

* ``scoring``: the batched log-likelihood scorer and the sliding windows (lm-eval's conventions);
* ``perplexity`` / ``multiple_choice``: metrics of ``launch/evaluate.py`` (``cli``);
* ``harness``: the lm-eval model ``megatron_bloom`` (imports lm_eval; ``launch/lm_eval_harness.py`` runs it);
* ``loading``: a native checkpoint or transformers folder plus its tokenizer; ``data``: jsonl rows;
  ``report``: table and TensorBoard scalars.

Nothing here imports lm_eval except ``harness``, so evaluate.py works without it.
"""
