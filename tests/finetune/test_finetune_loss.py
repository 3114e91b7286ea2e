"""Packed finetuning through BloomEngine: samples never see each other, and under
``--loss-normalization global-batch`` the loss is the global mean (the default, finetune_t0.py's
per micro-batch mean, is checked against a reference in test_t0_loss.py).

Each layout below reads the same global batch of 8 packed rows (loss mask on target tokens only)
and reports, from the same initial weights: the evaluation loss in both modes (token mean, and
per-sequence mean = --norm-target-loss), one token-mean training step (loss, gradient norm) and
then one per-sequence step. Layout A (one process, micro-batches of 2 x 4 accumulation steps) is
also checked against the definition: a single forward of all 8 rows, summed per token.

Tolerance 1e-5 relative: fp32 throughout; layouts only change the order of floating-point sums
(partial sums per micro-batch, the DP all-reduce, a 2-stage pipeline), which moves these values
by ~1e-7. A wrong normalisation (per micro-batch means, a missing DP or accumulation factor)
moves them by whole percents: with 8 rows of 1-5 targets each, micro-batch counts differ a lot.
The second step's gradient norm follows an Adam update from the first step's gradients, so it
checks the per-sequence mode's gradient scale as well as its loss.
"""
import math

import pytest

from megatron_bloom.testing import run_distributed

from finetune_worker import run, write_pairs

pytestmark = pytest.mark.distributed
RTOL = 1e-5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("pairs") / "pairs")
    write_pairs(prefix)
    return prefix


@pytest.fixture(scope="module")
def reference(pairs):
    """Layout A: 1 process, PP=1 pipeline engine (ZeRO-1), micro-batch 2, 4 accumulation steps."""
    return run_distributed(run, 1, pairs, 1, 1, 1, 2, manual=True, isolation=True, timeout=300)[0]


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL)


def test_loss_is_the_global_mean_over_target_tokens_or_sequences(reference):
    r = reference
    assert close(r["eval_token"], r["manual_token"]), (r["eval_token"], r["manual_token"])
    assert close(r["eval_norm"], r["manual_norm"]), (r["eval_norm"], r["manual_norm"])
    assert not close(r["eval_token"], r["eval_norm"])  # the two modes really weigh tokens differently
    assert close(r["step1"][0], r["manual_token"])  # the training step reports the same loss
    assert r["step1"][1] is not None and r["step2"][1] is not None


def test_packed_samples_do_not_see_each_other_pp1(reference):
    iso = reference["isolation"]
    assert iso["others_bitwise_equal"] and iso["changed_sample_differs"]
    # Same sample alone vs packed: another sequence length, so other kernels' summation order.
    assert iso["alone_max_abs_diff"] < 1e-5, iso


def test_per_language_and_task_losses_cover_the_batch(reference):
    languages, tasks = reference["groups_step1"]
    assert set(languages) == {0, 1} and set(tasks) == {0, 1, 2}
    assert all(v > 0 for v in list(languages.values()) + list(tasks.values()))


LAYOUTS = {
    # name: (world size, tp, pp, zero, micro batch size)
    "dp2-mbs2-gas2": (2, 1, 1, 1, 2),
    "pp2-mbs1-gas8": (2, 1, 2, 1, 1),
    "dp2-zero2-mbs4-gas1": (2, 1, 1, 2, 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_same_losses_and_gradients(pairs, reference, name):
    world, tp, pp, zero, mbs = LAYOUTS[name]
    results = run_distributed(run, world, pairs, tp, pp, zero, mbs, isolation=(pp > 1), timeout=300)
    out = results[-1]  # the last rank is on the last pipeline stage
    for key in ("eval_token", "eval_norm"):
        assert close(out[key], reference[key]), (key, out[key], reference[key])
    for key in ("step1", "step2"):
        (loss, norm), (ref_loss, ref_norm) = out[key], reference[key]
        assert close(loss, ref_loss), (key, loss, ref_loss)
        assert norm is not None and close(norm, ref_norm), (key, norm, ref_norm)
    if pp > 1:
        iso = out["isolation"]
        assert iso["others_bitwise_equal"] and iso["changed_sample_differs"], iso
