"""Weights-only native checkpoints in the training engine, and trained checkpoints out to transformers."""
import math
import os

import pytest
import torch
import transformers

from interop_helpers import run_cli, tiny_hf_model
from interop_worker import EVAL_STEP, load_weights_only_and_step, reference_loss, train_save_eval
from megatron_bloom.checkpoint.hf import read_hf_checkpoint
from megatron_bloom.checkpoint.native import model_from_state_dict, read_native_checkpoint, write_native_checkpoint
from megatron_bloom.testing import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# fp32 throughout. TP splits the matmuls and the vocabulary softmax into partial sums and the
# reference runs one process: only summation order differs, as in the engine parity tests, whose
# 2e-5 relative tolerance applies. A wrong shard or a missing weight moves the loss by >1e-2.
RTOL = 2e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny transformers BLOOM (vocab 250, 6 heads, 4 blocks) -> native checkpoint at TP=2."""
    root = tmp_path_factory.mktemp("engine")
    hf = tiny_hf_model(seed=11, vocab_size=250, hidden_size=48, n_head=6, n_layer=4, scale=0.05)
    hf.save_pretrained(root / "hf")
    cfg, sd = read_hf_checkpoint(str(root / "hf"))
    write_native_checkpoint(sd, cfg, str(root / "native"), tp=2)
    ours = model_from_state_dict(cfg, sd)
    return str(root / "native"), reference_loss(ours, step=0)


@pytest.mark.parametrize("tp, pp, dp, zero", [(2, 2, 1, 1), (1, 1, 1, 1), (1, 1, 2, 3)])
def test_engine_loads_weights_only_checkpoint(converted, tp, pp, dp, zero):
    """Written at TP=2; loaded at the same TP over 2 stages, merged to TP=1, and partitioned by ZeRO-3."""
    ckpt, want = converted
    results = run_distributed(load_weights_only_and_step, tp * pp * dp, ckpt, tp, pp, zero, timeout=300)
    loss, _, lr = results[0]
    assert all(r[0] == loss for r in results)  # every rank reports the batch mean
    assert math.isclose(loss, want, rel_tol=RTOL), (loss, want)
    # Adam's first step moves a weight by ~lr; the random init differs from the loaded weights by
    # ~0.05-0.1. A larger drift means the optimizer's master copies overwrote the loaded weights.
    assert max(r[1] for r in results) < 2 * lr


@pytest.mark.parametrize("tp, pp, zero", [(2, 2, 1), (2, 1, 2)])
def test_trained_checkpoint_to_transformers(tmp_path, tp, pp, zero):
    """Training at (TP, PP, DP=1) -> merged single model -> transformers folder.

    ZeRO-1 runs the pipeline engine (layer files); PP=1 ZeRO-2 the plain engine (engine files).
    """
    ckpt = str(tmp_path / "trained")
    engine_loss = run_distributed(train_save_eval, tp * pp, ckpt, tp, pp, 2, zero, timeout=300)[0]
    cfg, sd = read_native_checkpoint(ckpt)
    assert sd["transformer.word_embeddings.weight"].shape[0] == cfg.vocab_size == 250
    ours = model_from_state_dict(cfg, sd, attention_impl="eager")
    # The merged model is the engine's model: same loss on a batch it never trained on.
    assert math.isclose(reference_loss(ours, EVAL_STEP), engine_loss, rel_tol=RTOL)

    out = tmp_path / "hf"
    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", ckpt, "--out", out)
    assert proc.returncode == 0, proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.transformer.word_embeddings.weight.shape[0] == 250  # padded rows 250..255 not exported
    ids = torch.randint(0, 250, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Same eager kernel in both; transformers folds the ALiBi bias in with baddbmm exactly as
        # our eager path does. Observed max difference ~1e-6 on logits of magnitude ~1.
        torch.testing.assert_close(ours(ids)[..., :250], hf(ids).logits, atol=1e-5, rtol=1e-5)
