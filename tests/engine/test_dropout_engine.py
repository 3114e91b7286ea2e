"""Dropout in the engine as Megatron-DeepSpeed trains BLOOM: recompute replays the forward's masks,
TP ranks share the masks outside the TP region and draw their own inside it, every stage its own;
--sync-tp-duplicated-parameters keeps the copies of TP-duplicated parameters equal."""
import numpy as np
import pytest

from megatron_bloom.testing import run_distributed

from dropout_worker import curve, duplicated_copies_equal_after_drift, first_masks
from engine_worker import train

pytestmark = pytest.mark.distributed

STEPS = 4


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_recompute_has_the_same_loss_curve_with_dropout(tp, pp):
    plain = run_distributed(curve, tp * pp, tp, pp, False, STEPS, timeout=400)[0]
    recomputed = run_distributed(curve, tp * pp, tp, pp, True, STEPS, timeout=400)[0]
    # The recompute runs the same operations on the same masks: bit for bit, every step.
    assert recomputed == plain
    # And dropout is really on: without it the first step's loss is another one.
    assert plain[0][0] != run_distributed(train, tp * pp, tp, pp, 1, 1, timeout=400)[0][0][0]


def test_masks_per_tensor_rank_and_stage():
    out = run_distributed(first_masks, 4, 2, 2, timeout=400)
    by_coord = {(tp, pp): masks for tp, pp, masks in out}
    for pp in (0, 1):
        a, b = by_coord[(0, pp)], by_coord[(1, pp)]
        assert a.keys() == b.keys() and a
        for name in a:
            rate = (a[name] == 2).sum() / (a[name] > 0).sum()
            assert 0.4 < rate < 0.6, (name, rate)  # p = 0.5 of the nonzero inputs, over >= 2000 of them
            if "attention_dropout" in name:
                assert not np.array_equal(a[name], b[name]), f"{name}: TP ranks drew the same mask for their heads"
            else:
                assert np.array_equal(a[name], b[name]), f"{name}: outside the TP region the masks must be equal"
    for tp in (0, 1):
        first, second = by_coord[(tp, 0)], by_coord[(tp, 1)]
        for kind in ("attention_dropout", "self_attention.hidden_dropout", "mlp.hidden_dropout"):
            m0 = next(v for k, v in first.items() if k.endswith(kind))
            m1 = next(v for k, v in second.items() if k.endswith(kind))
            assert m0.shape == m1.shape and not np.array_equal(m0, m1), f"stages 0 and 1 drew the same {kind} mask"


@pytest.mark.parametrize("sync", [False, True])
def test_sync_tp_duplicated_parameters_removes_a_drift(sync):
    (equal, count), _ = run_distributed(duplicated_copies_equal_after_drift, 2, sync, timeout=300)
    assert count > 0
    assert equal is sync  # without the flag the drift stays; with it every copy is the TP average
